"""Memory of a sharded push: what each FSDP2 rank holds while every rank gathers and the main one streams.

The 0.73 GB random Qwen2 text model of bench/weight_sync.py, sharded by `fully_shard` over gloo in 2
processes (CPU), pushed to align-serve (transformers engine) with `weights.push_gathered`. A thread in
each rank samples its RSS every 2 ms through the push. The claim to check: a rank holds its shard
plus about one bucket (and the tensor being gathered), never the whole model.

    python bench/sharded_push.py                   # 64 MB buckets, http
    python bench/sharded_push.py --bucket-mb 256 --transport tcp
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 2**20


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def rank_main(model_dir: str, url: str, transport: str, bucket_mb: int) -> None:
    import gc

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from trainer_client import AlignClient
    from trainer_client.weights import named_weights, push_gathered

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    gc.collect()
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    client = AlignClient(url) if rank == 0 else None
    with named_weights(model) as pairs:
        push_gathered(client, 0, pairs, transport, bucket_bytes=bucket_mb * MB)  # warm: allocator, gloo buffers
        dist.barrier()
        base, peak, done = rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        push_gathered(client, 0, pairs, transport, bucket_bytes=bucket_mb * MB)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    row = {"rank": rank, "full_mb": full_bytes / MB, "shard_mb": shard_bytes / MB, "largest_tensor_mb": largest / MB,
           "bucket_mb": bucket_mb, "rss_before_mb": base / MB, "rss_peak_mb": peak[0] / MB,
           "push_growth_mb": (peak[0] - base) / MB, "seconds": seconds}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    from bench.weight_sync import build_model
    from tests.utils import ServerProcess, free_port

    p = argparse.ArgumentParser()
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--transport", default="http", choices=["http", "tcp", "shm"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.hidden, args.layers)
        server = ServerProcess(model, "transformers", log_dir=Path(tmp)).wait_ready()
        try:
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
                                  "--rank-worker", str(model), server.url, args.transport, str(args.bucket_mb)],
                                 capture_output=True, text=True, cwd=ROOT)
        finally:
            server.stop()
    if run.returncode != 0:
        sys.exit(run.stdout[-3000:] + run.stderr[-3000:])
    rows = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("[")))
    print(f"model {rows[0]['full_mb']:.0f} MB, largest tensor {rows[0]['largest_tensor_mb']:.0f} MB, "
          f"{args.bucket_mb} MB buckets, {args.transport}, 2 FSDP2 ranks on CPU (gloo)")
    print("rank  shard MB  RSS before MB  RSS peak MB  growth during push MB  push s")
    for r in rows:
        print(f"{r['rank']:>4}  {r['shard_mb']:>8.0f}  {r['rss_before_mb']:>13.0f}  {r['rss_peak_mb']:>11.0f}  "
              f"{r['push_growth_mb']:>21.0f}  {r['seconds']:>6.2f}")
    for r in rows:
        print(f"ratio rank {r['rank']} push growth / (bucket + largest tensor): "
              f"{r['push_growth_mb'] / (r['bucket_mb'] + r['largest_tensor_mb']):.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        rank_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
