"""Everything in the training process: the server client, weight senders, trainers, rewards."""

from trainer_client.client import (
    AlignClient,
    AlignConnectionError,
    AlignServerError,
    AlignTimeoutError,
    collapse_image_runs,
)

__all__ = ["AlignClient", "AlignConnectionError", "AlignServerError", "AlignTimeoutError", "collapse_image_runs"]
