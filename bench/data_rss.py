"""Memory of image datasets: `align-train` RSS at start-up and after training steps for a small and a
10x bigger dataset of 512x512 images (lazy decoding: it must not grow with the row count), and
`align-serve` RSS after many distinct images were uploaded (bounded by --image-cache-bytes).

    python bench/data_rss.py [--rows 2000 20000] [--steps 50] [--server-images 10000] [--image-cache-mb 256]

Each training run is a fresh process (`--vllm-mode none`, tiny Qwen2-VL, batch 2 x 2 generations)
reading a local datasets folder (data/train-*.parquet with PNG bytes) through `--dataset_name`,
with a fresh datasets cache, so start-up includes the parquet-to-Arrow conversion and the row check.
Memory is read from /proc: VmHWM (peak RSS), RssAnon (heap: what decoded images would fill) and
RssFile (pages of mapped files, the Arrow table among them, which the kernel can drop).
"""

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIDE = 512
SHARD_ROWS = 1000


def proc_memory(pid: str | int = "self") -> dict[str, float]:
    """MiB of the /proc/PID/status fields that matter here."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def png(rng: random.Random) -> bytes:
    """A distinct 512x512 picture: a coloured shape somewhere on a coloured ground."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIDE, SIDE), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    x, y, r = rng.randrange(SIDE), rng.randrange(SIDE), rng.randrange(20, 200)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r),
                                                              fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_dataset(root: Path, rows: int, seed: int = 0) -> int:
    """data/train-*.parquet shards as on the hub (problem, answer, image bytes); returns the bytes written."""
    import datasets

    rng = random.Random(seed)
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image": datasets.Image()})
    (root / "data").mkdir(parents=True)
    shards = (rows + SHARD_ROWS - 1) // SHARD_ROWS
    for s in range(shards):
        n = min(SHARD_ROWS, rows - s * SHARD_ROWS)
        part = {"problem": ["What colour is the shape? Answer with one word."] * n, "answer": ["red"] * n,
                "image": [{"bytes": png(rng), "path": None} for _ in range(n)]}
        datasets.Dataset.from_dict(part, features=features).to_parquet(
            str(root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet"))
    return sum(f.stat().st_size for f in (root / "data").iterdir())


def child(dataset: str, model: str, steps: int) -> None:
    """One training run; prints a JSON line with memory at step 1 and after `steps` steps."""
    started = time.monotonic()
    from transformers import TrainerCallback

    from trainer_client.config import parse_args
    from trainer_client.trainers import build_trainer

    out = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            out["startup_s"] = time.monotonic() - started
            out["start"] = proc_memory()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                out["end"] = proc_memory()

    with tempfile.TemporaryDirectory() as tmp:
        method, align, config, _ = parse_args([
            "grpo", "--model", model, "--dataset_name", dataset, "--output_dir", tmp, "--vllm-mode", "none",
            "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "4",
            "--max_steps", str(steps), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--logging_steps", str(steps)])
        t = time.monotonic()
        trainer = build_trainer(method, align, config)
        out["load_s"] = time.monotonic() - t
        trainer.add_callback(Probe())
        trainer.train()
    print("RESULT " + json.dumps(out), flush=True)


def train_rows(model: Path, rows: int, steps: int, work: Path) -> dict:
    folder = work / f"rows{rows}"
    t = time.monotonic()
    size = write_dataset(folder, rows)
    print(f"  wrote {rows:,} rows ({size / 2**20:.0f} MiB of parquet) in {time.monotonic() - t:.0f} s", flush=True)
    # A fresh datasets cache per run: start-up pays the parquet-to-Arrow conversion a first run pays.
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / f"cache{rows}"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, __file__, "--child", str(folder), str(model), str(steps)],
                         capture_output=True, text=True, env=env)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if run.returncode or line is None:
        sys.exit(f"training on {rows} rows failed:\n{run.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    arrow = sum(f.stat().st_size for f in (work / f"cache{rows}").rglob("*.arrow"))
    return {"rows": rows, "parquet_mib": size / 2**20, "arrow_mib": arrow / 2**20, **result}


def server_rss(model: Path, images: int, cache_mb: int, work: Path) -> dict:
    from tests.utils import ServerProcess
    from trainer_client import AlignClient

    server = ServerProcess(model, "transformers", log_dir=work,
                           extra=["--image-cache-bytes", str(cache_mb * 2**20)]).wait_ready()
    try:
        client = AlignClient([server.url])
        before = proc_memory(server.proc.pid)
        rng = random.Random(1)
        t = time.monotonic()
        steps = []  # RSS after each quarter of the uploads: a bounded cache levels off
        with ThreadPoolExecutor(4) as pool:  # overlaps the HTTP round trips; the server decodes each once
            for _ in range(4):
                for _ in pool.map(client.upload_image, (png(rng) for _ in range(images // 4))):
                    pass
                steps.append(proc_memory(server.proc.pid)["VmRSS"])
        upload_s = time.monotonic() - t
        after = proc_memory(server.proc.pid)
    finally:
        server.stop()
    return {"images": images, "cache_mib": cache_mb, "before": before, "after": after, "quarters": steps,
            "upload_s": upload_s}


DECODED_MIB = SIDE * SIDE * 3 / 2**20  # one image decoded to RGB (Pillow holds 4 bytes a pixel: a third more)


def print_training(results: list[dict], steps: int) -> None:
    print(f"\nalign-train grpo --vllm-mode none, {steps} steps (MiB; decoding every image up front "
          f"would take {DECODED_MIB:.2f} MiB a row)")
    print(f"{'rows':>7} {'parquet':>8} {'arrow':>7} {'start-up s':>10} {'build s':>7} "
          f"{'RSS@1':>7} {'anon@1':>7} {'RSS@end':>8} {'anon@end':>8} {'peak':>7} {'eager would be':>15}")
    for r in results:
        print(f"{r['rows']:>7,} {r['parquet_mib']:>8.0f} {r['arrow_mib']:>7.0f} {r['startup_s']:>10.1f} "
              f"{r['load_s']:>7.1f} {r['start']['VmRSS']:>7.0f} {r['start']['RssAnon']:>7.0f} "
              f"{r['end']['VmRSS']:>8.0f} {r['end']['RssAnon']:>8.0f} {r['end']['VmHWM']:>7.0f} "
              f"{r['rows'] * DECODED_MIB:>15,.0f}")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"{b['rows'] / a['rows']:.0f}x the rows: peak RSS x{b['end']['VmHWM'] / a['end']['VmHWM']:.2f}, "
              f"anonymous RSS at the end x{b['end']['RssAnon'] / a['end']['RssAnon']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[2000, 20000], help="none: the server part only")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--server-images", type=int, default=10000)
    parser.add_argument("--image-cache-mb", type=int, default=256)
    parser.add_argument("--child", nargs=3, metavar=("DATASET", "MODEL", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return

    from examples.tiny_model import build

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build(work / "model", "qwen2_vl", seed=0)
        results = []
        for rows in args.rows:
            print(f"align-train, {rows:,} rows of {SIDE}x{SIDE} images:", flush=True)
            results.append(train_rows(model, rows, args.steps, work))
        if results:
            print_training(results, args.steps)
        if args.server_images:
            print(f"\nalign-serve (transformers), {args.server_images:,} distinct {SIDE}x{SIDE} images uploaded, "
                  f"--image-cache-bytes {args.image_cache_mb} MiB:", flush=True)
            s = server_rss(model, args.server_images, args.image_cache_mb, work)
            print(f"  RSS before {s['before']['VmRSS']:.0f} MiB; after each quarter "
                  f"{', '.join(f'{q:.0f}' for q in s['quarters'])} MiB (peak {s['after']['VmHWM']:.0f}); growth "
                  f"{s['after']['VmRSS'] - s['before']['VmRSS']:.0f} MiB against a {args.image_cache_mb} MiB cache "
                  f"(unbounded it would hold {args.server_images * DECODED_MIB * 4 / 3:,.0f} MiB of RGBX pixels); "
                  f"{s['upload_s']:.0f} s to upload")

if __name__ == "__main__":
    main()
