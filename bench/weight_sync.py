"""Weight sync speed: every CPU transport, the per-tensor baseline and the memory-copy floor, one run.

A random Qwen2 text model of about 0.7 GB (fp32, hidden 1024, 12 layers) is built locally and served
by `align-serve`; the trainer side here pushes the same weights through each transport:

- `http`, `tcp`, `shm`: bucketed syncs (256 MB buckets), end to end: init, stream, commit (the
  server's swap into the live model included);
- per-tensor: http with one request per tensor (what TRL <= 1.10 did), same server, same commit;
- copy bound: one in-process memory copy of the same bytes, the floor for any transfer between two
  processes on one host;
- LoRA (r=16 on q, k, v, o, gate, up, down, docs/lora.md): the adapter alone vs the merged model
  (shm), bytes and seconds per sync, and the server's seconds per generate batch serving the
  adapter vs serving the merged weights. The server runs with --enable-lora for the whole run.

    python bench/weight_sync.py                    # transformers engine (light on memory)
    python bench/weight_sync.py --engine vllm      # the vLLM engine (needs ~8 GB)

On a GPU (trainer and server on one device; nccl and ipc are vLLM's own engines, see docs/gpu.md):

    python bench/weight_sync.py --engine vllm --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
        --transports nccl ipc http
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from examples.tiny_model import build  # noqa: E402
from tests.utils import ServerProcess  # noqa: E402
from trainer_client import AlignClient  # noqa: E402
from trainer_client.weights import DEFAULT_BUCKET_BYTES  # noqa: E402


def build_model(out: Path, hidden: int, layers: int) -> Path:
    """The tiny text model's tokenizer and config, grown to `hidden` x `layers` with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    build(out, "qwen2_vl", text_only=True, seed=0)
    config = AutoConfig.from_pretrained(out)
    config.update(dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                       head_dim=64, layer_types=["full_attention"] * layers))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def copy_bound(nbytes: int, device: str, repeats: int = 3) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def timed_push(client: AlignClient, model, transport: str, bucket_bytes: int, label: str, repeats: int) -> float:
    best = float("inf")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in range(repeats):
        with tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"{label} #{r + 1}", leave=False) as bar:
            def progress(sent, total, bar=bar):
                bar.update(sent - bar.n)

            start = time.perf_counter()
            client.push_weights(model, transport=transport, bucket_bytes=bucket_bytes, progress=progress)
            best = min(best, time.perf_counter() - start)
    return best


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def lora_rows(client: AlignClient, model, repeats: int, batch: int, tokens: int) -> dict:
    """Adapter vs merged: sync seconds and bytes, then generate seconds per batch with each served."""
    from peft import LoraConfig, get_peft_model

    from trainer_client.weights import adapter_weights, named_weights

    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                            init_lora_weights=False))  # B != 0: the adapter changes the model
    pairs, _ = adapter_weights(peft)
    adapter_bytes = sum(t.numel() * t.element_size() for _, t in pairs)
    merged_bytes = sum(p.numel() * p.element_size() for p in peft.get_base_model().parameters()) - adapter_bytes
    prompts = [[(7 * i + j) % 200 + 10 for j in range(32)] for i in range(batch)]

    def generate() -> int:
        out = client.generate(prompt_ids=prompts, temperature=0.0, max_tokens=tokens)
        return sum(len(c.token_ids) for r in out.results for c in r.completions)

    merged_sync = timed(lambda: client.push_weights(peft, transport="shm"), repeats)
    generate()  # warm-up on the merged weights
    merged_tokens = generate()
    merged_gen = timed(generate, repeats)
    with named_weights(peft, merge=False) as base:  # as align-train does: the base, then adapters on it
        client.push_weights(base, transport="shm")
    adapter_sync = timed(lambda: client.push_adapter(peft, transport="shm"), repeats)
    generate()
    adapter_tokens = generate()
    adapter_gen = timed(generate, repeats)
    return dict(adapter_bytes=adapter_bytes, merged_bytes=merged_bytes, adapter_sync=adapter_sync,
                merged_sync=merged_sync, adapter_gen=adapter_gen, merged_gen=merged_gen,
                adapter_tokens=adapter_tokens, merged_tokens=merged_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--bucket-mb", type=int, default=DEFAULT_BUCKET_BYTES // 2**20)
    p.add_argument("--repeats", type=int, default=3, help="best of N per transport")
    p.add_argument("--transports", nargs="+", default=["http", "tcp", "shm"],
                   choices=["http", "tcp", "shm", "nccl", "ipc"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the trainer's weights live")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="trainer's and server's")
    p.add_argument("--gen-batch", type=int, default=8, help="LoRA rows: prompts per generate batch")
    p.add_argument("--gen-tokens", type=int, default=32, help="LoRA rows: tokens generated per prompt")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        print(f"building a random Qwen2 (hidden {args.hidden}, {args.layers} layers) ...", flush=True)
        model_dir = build_model(Path(tmp) / "model", args.hidden, args.layers)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device)
        tensors = list(model.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        print(f"model: {nbytes / 1e9:.2f} GB in {len(tensors)} tensors; starting align-serve "
              f"({args.engine}) ...", flush=True)
        extra = ["--dtype", args.dtype, "--enable-lora", "--max-lora-rank", "16"]
        if args.device == "cuda" and args.engine == "vllm":
            extra += ["--gpu-memory-utilization", "0.3"]  # the trainer's copy shares the device
        # ipc: the CUDA IPC handles cross our HTTP route pickled, which vLLM accepts only with this set
        server = ServerProcess(model_dir, args.engine, log_dir=Path(tmp), extra=extra,
                               env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"} if "ipc" in args.transports else None)
        try:
            server.wait_ready(timeout=900)
            client = AlignClient(server.url)
            bucket = args.bucket_mb * 2**20
            timed_push(client, model, "shm", bucket, "warm-up", 1)
            results = {"copy bound (in-process memcpy)": copy_bound(nbytes, args.device)}
            for transport in args.transports:
                how = "vLLM's engine" if transport in ("nccl", "ipc") else f"{args.bucket_mb} MB buckets"
                results[f"{transport} ({how})"] = timed_push(client, model, transport, bucket, transport, args.repeats)
            results["per-tensor http (1 request per tensor)"] = timed_push(
                client, model, "http", 1, "per-tensor", max(1, args.repeats - 1))
            lora = lora_rows(client, model, args.repeats, args.gen_batch, args.gen_tokens)
            version = client.info(refresh=True).weight_version
        finally:
            server.stop()

    copy = results["copy bound (in-process memcpy)"]
    per_tensor = results["per-tensor http (1 request per tensor)"]
    print(f"\nweight sync of {nbytes / 1e9:.2f} GB ({len(tensors)} tensors) into align-serve ({args.engine}), "
          f"best of {args.repeats}; server ended at weight_version {version}")
    print(f"{'path':<42}{'seconds':>9}{'GB/s':>8}{'x copy':>9}{'per-tensor / this':>19}")
    for name, seconds in results.items():
        print(f"{name:<42}{seconds:>9.3f}{nbytes / seconds / 1e9:>8.2f}{seconds / copy:>9.1f}"
              f"{per_tensor / seconds:>19.1f}")
    print("\ngoals: bucketed http/tcp >= 5x faster than per-tensor, within 3x of the copy bound")
    for t in ("http", "tcp"):
        if t not in args.transports:
            continue
        s = results[f"{t} ({args.bucket_mb} MB buckets)"]
        print(f"  {t}: {per_tensor / s:.1f}x faster than per-tensor ({'met' if per_tensor / s >= 5 else 'NOT met'}), "
              f"{s / copy:.1f}x the copy bound ({'met' if s / copy <= 3 else 'NOT met'})")

    print(f"\nLoRA r=16 on {', '.join(LORA_TARGETS)} (shm, best of {args.repeats}); generate: {args.gen_batch} "
          f"prompts x {args.gen_tokens} tokens, greedy")
    print(f"{'':<10}{'MB per sync':>13}{'s per sync':>12}{'s per generate':>16}{'tokens':>8}")
    for kind in ("adapter", "merged"):
        print(f"{kind:<10}{lora[kind + '_bytes'] / 1e6:>13.1f}{lora[kind + '_sync']:>12.3f}"
              f"{lora[kind + '_gen']:>16.3f}{lora[kind + '_tokens']:>8}")
    print(f"ratio adapter / merged bytes: {lora['adapter_bytes'] / lora['merged_bytes']:.4f}")
    print(f"ratio adapter / merged sync: {lora['adapter_sync'] / lora['merged_sync']:.2f}")
    print(f"ratio adapter / merged generate: {lora['adapter_gen'] / lora['merged_gen']:.2f}")


if __name__ == "__main__":
    main()
