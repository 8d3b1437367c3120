"""The HTTP tax: completion tokens/s through `align-serve` vs the same engine called in-process.

Same model, prompts, images and seeded sampling, both paths back to back in one run (two vLLM
engines at once would share the two cores); the ratio (served / in-process) is what to read. A
warm-up round of each path is not timed (the server's first round also uploads the images).

    python bench/http_tax.py --engine transformers    # or vllm, or both
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.tiny_model import build  # noqa: E402
from protocol import SamplingParams  # noqa: E402
from server.engines import EnginePrompt, create_engine  # noqa: E402
from tests.utils import ServerProcess, random_image  # noqa: E402
from trainer_client import AlignClient  # noqa: E402


def workload(model_dir: Path, n_prompts: int):
    from runtime.torchvision_compat import load_processor

    tok = load_processor(model_dir).tokenizer
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Shape {k}: what colour?"}]}]
                for k in range(n_prompts)]
    ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]) for m in messages]
    images = [[random_image(k, 224)] for k in range(n_prompts)]
    return ids, images


async def in_process_rounds(engine_name, model_dir, ids, images, sampling, rounds):
    engine = create_engine(engine_name, model=str(model_dir), enforce_eager=True)
    await engine.start()
    prompts = [EnginePrompt(i, im) for i, im in zip(ids, images, strict=True)]
    rates = []
    try:
        for r in range(rounds + 1):
            t = time.perf_counter()
            outs = await engine.generate(prompts, sampling)
            tokens = sum(len(c.token_ids) for cs in outs for c in cs)
            if r:
                rates.append(tokens / (time.perf_counter() - t))
    finally:
        await engine.shutdown()
    return rates


def served_rounds(engine_name, model_dir, ids, images, sampling, rounds, log_dir):
    server = ServerProcess(model_dir, engine_name, log_dir=log_dir).wait_ready(900)
    rates = []
    try:
        with AlignClient(server.url) as client:
            for r in range(rounds + 1):
                t = time.perf_counter()
                out = client.generate(prompt_ids=ids, images=images, sampling=sampling)
                tokens = sum(len(c.token_ids) for res in out.results for c in res.completions)
                if r:
                    rates.append(tokens / (time.perf_counter() - t))
    finally:
        server.stop()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["transformers", "vllm", "both"], default="both")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="http_tax_"))
    model_dir = build(work / "model", "qwen2_vl", seed=0)
    ids, images = workload(model_dir, args.prompts)
    # seeded: both paths sample the same completions, so they generate the same tokens
    sampling = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    engines = ["transformers", "vllm"] if args.engine == "both" else [args.engine]
    print(f"workload: {args.prompts} image prompts (224x224) x n={args.n} x up to {args.max_tokens} tokens, "
          f"{args.rounds} timed rounds per path")
    for name in engines:
        local = asyncio.run(in_process_rounds(name, model_dir, ids, images, sampling, args.rounds))
        served = served_rounds(name, model_dir, ids, images, sampling, args.rounds, work)
        lm, sm = statistics.median(local), statistics.median(served)
        print(f"{name:>12}: in-process {lm:8.0f} tok/s | served over HTTP {sm:8.0f} tok/s | "
              f"ratio served/in-process {sm / lm:.2f}  (rounds: {[round(x) for x in local]} vs "
              f"{[round(x) for x in served]})")


if __name__ == "__main__":
    main()
