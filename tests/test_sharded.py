"""Sharded trainers push whole weights, and LoRA adapters: FSDP2 (`fully_shard`) and DeepSpeed ZeRO-3
(`zero.Init`), 2 processes over gloo on CPU, against a real align-serve (--enable-lora). Every rank takes
part; the server ends up serving exactly the gathered model, or the base with the gathered adapter."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_lora import LORA_SERVER
from tests.utils import ServerProcess, free_port

ROOT = Path(__file__).parents[1]
TRANSPORTS = ["http", "tcp", "shm", "snapshot"]


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    s = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir, extra=LORA_SERVER)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.mark.parametrize("sharding", ["fsdp2", pytest.param("zero3", marks=pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="the dev extra installs deepspeed on Linux only"))])
def test_sharded_push_from_every_rank_serves_the_gathered_model(sharding, tiny_vlm, server):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "tests.sharded_push_worker", sharding, str(tiny_vlm), server.url, ",".join(TRANSPORTS)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    pushes, failure, adapter, snapshot = lines[:-3], lines[-3], lines[-2], lines[-1]
    assert [p["transport"] for p in pushes] == TRANSPORTS
    for p in pushes:
        assert p["shard_elements"] * 2 == p["full_elements"]  # each rank held half: the model was sharded
        assert p["changed"], p  # each push changed the answer, so a stale server could not pass
        assert p["tagged"] == p["version"]
        assert p["served"] == p["expected"], p
    assert [p["version"] for p in pushes] == list(range(pushes[0]["version"], pushes[0]["version"] + 4))
    # A push the main rank broke half way raised on both ranks (no hang) and committed nothing.
    assert failure["failure"][0] == "the main rank's push broke"
    assert failure["failure"][1].startswith("the main process's weight push failed: RuntimeError")
    assert failure["version_after"] == pushes[-1]["version"]
    # A sharded LoRA model (--lora_sync adapter): its adapter tensors are shards too (ZeRO-3's
    # state_dict() copies lost that, and the main rank gathered alone while the other skipped it), every
    # rank pushes the base and then the adapter, and the server answers as the unsharded PEFT twin.
    assert adapter["adapter_sync"] and adapter["adapter_sharded"], adapter
    assert adapter["shard_elements"] and adapter["changed"]
    assert adapter["version"] == failure["version_after"] + 2  # the base weights, then the adapter
    assert adapter["served"] == adapter["expected"], adapter
    assert snapshot["version"] == adapter["version"] + 1 and snapshot["served"] == snapshot["expected"], snapshot


def test_sharded_setups_server_mode_cannot_gather_are_refused_at_start():
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    from trainer_client.trainers import sharding_refusal

    assert sharding_refusal(None, None) is None
    assert sharding_refusal(FullyShardedDataParallelPlugin(fsdp_version=2), None) is None
    assert "set fsdp_version: 2" in sharding_refusal(FullyShardedDataParallelPlugin(fsdp_version=1), None)
    offload = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=True)
    assert "set fsdp_offload_params: false" in sharding_refusal(offload, None)
    assert sharding_refusal(None, DeepSpeedPlugin(zero_stage=3)) is None
