"""Seconds per GRPO step: server mode (align-serve + weight push every step) vs TRL's own GRPOTrainer
generating locally with transformers. Same tiny VLM, data, batch and seed, measured side by side.

    python bench/train_step.py [--steps 12] [--engine transformers|vllm]
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.tiny_model import build  # noqa: E402
from tests.utils import ServerProcess  # noqa: E402
from trainer_client.cli import run  # noqa: E402
from trainer_client.demo import make_dataset  # noqa: E402


def parity_reward(completion_ids, **kwargs):
    """Varies inside every group, so every step has gradients and so a weight push."""
    return [float(ids[0] % 2) for ids in completion_ids]


def step_seconds(trainer, skip: int) -> float:
    times = [e["step_time"] for e in trainer.state.log_history if "step_time" in e][skip:]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    model = build(work / "tiny", "qwen2_vl", seed=0)
    data = make_dataset(work / "data", 128, seed=0)
    flags = ["--model", str(model), "--dataset", str(data), "--max_steps", str(args.steps),
             "--per_device_train_batch_size", str(args.prompts * args.generations),
             "--num_generations", str(args.generations), "--max_completion_length", str(args.tokens),
             "--learning_rate", "1e-3", "--reward_funcs", "__main__:parity_reward", "--save_strategy", "no",
             "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]

    local = run(["grpo", *flags, "--output_dir", str(work / "local"), "--vllm-mode", "none"])
    server = ServerProcess(model, args.engine, log_dir=work).wait_ready()
    try:
        remote = run(["grpo", *flags, "--output_dir", str(work / "server"), "--vllm-mode", "server",
                      "--server-url", server.url])
    finally:
        server.stop()

    t_local, t_server = step_seconds(local, args.skip), step_seconds(remote, args.skip)
    batch = f"{args.prompts} prompts x {args.generations} generations x {args.tokens} tokens"
    print(f"\nGRPO step, tiny Qwen2-VL, {batch}, median of steps {args.skip + 1}-{args.steps}:")
    print(f"  TRL GRPOTrainer, local transformers generation: {t_local:.3f} s")
    print(f"  server mode ({args.engine} engine, weights pushed every step): {t_server:.3f} s")
    print(f"  ratio server / local: {t_server / t_local:.2f}")


if __name__ == "__main__":
    main()
