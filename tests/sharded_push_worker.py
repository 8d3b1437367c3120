"""One rank of tests/test_sharded.py, under `torchrun --nproc_per_node 2`: a tiny VLM sharded over gloo
by FSDP2's `fully_shard` or DeepSpeed ZeRO-3's `zero.Init` pushes its weights to align-serve with every
rank taking part (`weights.push_gathered`), on each transport, then as the async snapshot
(`weights.host_copy`). After every push the main rank checks that the server answers greedily exactly
as the gathered model does. Then a sharded LoRA model pushes its adapter (tests/sharded_lora_worker.py).
Prints one JSON line per check on rank 0."""

import json
import math
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.fsdp import fully_shard

from tests.sharded_lora_worker import push_adapter_from_every_rank
from tests.test_weights import SMALL_BUCKET, Trainer, served
from trainer_client import AlignClient
from trainer_client.cli import end_distributed_process
from trainer_client.weights import Gathered, full_shape, host_copy, named_weights, push_gathered, push_one


def shard(model, sharding: str, root=None) -> None:
    """Shard `model` (its decoder layers, then `root`: the model itself, or the PEFT model around it)."""
    root = model if root is None else root
    if sharding == "fsdp2":
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(root)
        return
    import deepspeed

    # DeepSpeed's CPU backend would first compile its shared-memory collectives (minutes on 2 cores);
    # gloo carries these gathers as well.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    deepspeed.zero.Init(module=root, config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3}})


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p.ds_tensor


def perturb(model, seed: int) -> None:
    """Each rank moves its own shard: the full model is whatever the shards gather into."""
    g = torch.Generator().manual_seed(seed * 10 + dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            part = local(p)
            part.add_(torch.randn(part.shape, generator=g) * 0.5 * (part.std() if part.numel() > 1 else 1.0))


def gathered_greedy(model, reference: Trainer) -> list[int] | None:
    """The full model's greedy answer (rank 0), from tensors every rank gathers together."""
    with named_weights(model) as pairs:
        full = dict(zip((name for name, _ in pairs), Gathered(pairs), strict=True))
    if dist.get_rank() != 0:
        return None
    with torch.no_grad():
        for name, p in reference.model.named_parameters():
            p.copy_(full[name])
    return reference.greedy()


def main(sharding: str, model_dir: str, url: str, transports: list[str]) -> None:
    PartialState(cpu=True)  # the gloo group, as accelerate sets it up for the trainer's own collectives
    rank = dist.get_rank()
    reference = Trainer(model_dir)  # every rank loads it; the main one keeps it as the unsharded twin
    model = type(reference.model).from_pretrained(model_dir)
    shard(model, sharding)
    first = next(model.parameters())
    report = {"shard_elements": local(first).numel(), "full_elements": math.prod(full_shape(first))}
    client = AlignClient(url) if rank == 0 else None
    before = None
    for seed, transport in enumerate(transports, start=1):
        perturb(model, seed)
        expected = gathered_greedy(model, reference)
        with named_weights(model) as pairs:
            if transport == "snapshot":  # the async path: gather to host memory, then a plain push
                snapshot = host_copy(pairs, keep=rank == 0)
                version = push_one(client, 0, snapshot, "http", SMALL_BUCKET).weight_version if rank == 0 else None
            else:
                version = push_gathered(client, 0, pairs, transport, bucket_bytes=SMALL_BUCKET).weight_version
        if rank == 0:
            tokens, tagged = served(client, reference)
            print(json.dumps({"transport": transport, "version": version, "tagged": tagged, "served": tokens,
                              "expected": expected, "changed": expected != before, **report}), flush=True)
            before = expected

    # The main rank's push fails half way (its progress callback raises after the first bucket): every
    # rank still finishes the gathers, and every rank raises, none hangs in a collective.
    def fail(sent: int, total: int) -> None:
        raise RuntimeError("the main rank's push broke")

    with named_weights(model) as pairs:
        try:
            push_gathered(client, 0, pairs, "http", bucket_bytes=SMALL_BUCKET, progress=fail)
            raised = None
        except RuntimeError as exc:
            raised = str(exc)
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, raised)
    if rank == 0:
        print(json.dumps({"failure": outcomes, "version_after": client.info(refresh=True).weight_version}), flush=True)
    for line in push_adapter_from_every_rank(sharding, model_dir, client, rank == 0, shard, local):
        print(json.dumps(line), flush=True)
    end_distributed_process()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","))
