"""The LoRA part of tests/sharded_push_worker.py (the same ranks, after the full pushes): a tiny VLM with a
PEFT LoRA adapter, sharded by FSDP2 or ZeRO-3, pushes its adapter through the trainer's `WeightPusher`
(`--lora_sync adapter`: the base weights, then the adapter), every rank taking part; then the async path's
snapshot (`weights.host_copy` of the adapter) goes from the main rank alone. The main rank checks that the
server answers greedily exactly as the unsharded PEFT twin does."""

import types

import torch.distributed as dist

from tests.test_lora import LoraTrainer
from tests.test_weights import served
from trainer_client.weight_pusher import WeightPusher
from trainer_client.weights import adapter_weights, host_copy, is_sharded, push_one

SEED = 5


def push_adapter_from_every_rank(sharding: str, model_dir: str, client, main: bool, shard, local) -> list[dict]:
    """One line per push (on the main rank): what the server served against the twin's own answer."""
    twin = LoraTrainer(model_dir)  # every rank builds the same adapter; the main one keeps this copy whole
    twin.perturb(SEED)
    expected = twin.greedy()
    with twin.model.disable_adapter():
        base = twin.greedy()
    sharded = LoraTrainer(model_dir)
    sharded.perturb(SEED)
    model = sharded.model
    shard(model.get_base_model(), sharding, root=model)
    pairs, _ = adapter_weights(model)
    first = pairs[0][1]
    report = {"adapter_sharded": is_sharded(pairs), "changed": expected != base,
              "shard_elements": local(first).numel() if is_sharded(pairs[:1]) else None}
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(is_main_process=main, unwrap_model=lambda m: m),
                                    model=model, state=types.SimpleNamespace(global_step=0))
    pusher = WeightPusher(trainer, client, "http", lora_sync="adapter")
    pusher.push([0])
    lines = []
    if main:
        tokens, version = served(client, twin)
        lines.append({"push": "adapter", "adapter_sync": pusher.adapter_sync, "version": version, "served": tokens,
                      "expected": expected, **report})
    with pusher.weights() as (pairs, adapter):
        snapshot = host_copy(pairs, keep=main)
    if main:
        push_one(client, 0, snapshot, "http", adapter=adapter)
        tokens, version = served(client, twin)
        lines.append({"push": "adapter snapshot", "version": version, "served": tokens, "expected": expected})
    dist.barrier()
    return lines
