"""`make demo`: teach a tiny random VLM to name the colour of a shape, by GRPO through align-serve.

1. `align-tiny-model` writes a tiny random Qwen2-VL (a subprocess: trainer code never imports the server).
2. A generated dataset: grey 64x64 images with a square or circle in red, green, blue or yellow.
3. A short MPO warm-up (`align-train mpo`): FACTS.md measured that GRPO alone on a random tiny VLM
   learns to say *a* colour, then collapses to one colour for every image.
4. `align-serve` starts on the warmed-up model; `align-train grpo --vllm-mode server --async_rollouts
   --dynamic_sampling` trains against it (in this process, so each step prints a line), pushing weights
   after every step while the server already generates the next batch.
5. Accuracy on fresh images (greedy, through the server) against chance (25%) as it goes, and a PNG
   of reward and accuracy per step beside the run (`grpo/reward_accuracy.png`).
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
PROMPT = "What colour is the shape? Answer with one word."


def shape_image(colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    grey = rng.randint(100, 160)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    r = rng.randint(10, 20)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=jitter)
    return img


def make_dataset(out_dir: str | Path, n: int, seed: int = 0, method: str = "grpo") -> Path:
    """n rows of the colour task as jsonl with images beside it; MPO rows pair the right colour
    (chosen) with a wrong one (rejected)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path = out / f"{method}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            colour = rng.choice(list(COLOURS))
            image = f"images/{seed}_{i}.png"
            shape_image(colour, rng).save(out / image)
            row = {"prompt": PROMPT, "image": image}
            if method == "mpo":
                wrong = rng.choice([c for c in COLOURS if c != colour])
                # A leading space: " red" is one token of the tiny tokenizer, "red" is several.
                row.update(chosen=f" {colour}", rejected=f" {wrong}")
            else:
                row["solution"] = colour
            f.write(json.dumps(row) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}); last lines of {log}:\n{log.read_text()[-3000:]}")


def start_demo(name: str, work_dir: str | None, arch: str, seed: int) -> tuple[Path, Path, float]:
    """A demo's start: its work directory (a temp one unless given), the folder of our commands, the start
    time; a tiny random model of `arch` built in work/tiny."""
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"vlm-align-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    started = time.monotonic()
    print(f"{name} work dir: {work}")
    _run([str(bin_dir / "align-tiny-model"), str(work / "tiny"), "--arch", arch, "--seed", str(seed)], work / "tiny.log")
    return work, bin_dir, started


def reward_curve(log_history: list[dict]) -> list[float]:
    return [e["reward"] for e in log_history if "reward" in e]


def print_curve(rewards: list[float]) -> None:
    k = max(1, len(rewards) // 5)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"mean reward, first 20% of steps: {first:.3f}; last 20%: {last:.3f}")


def plot(path: Path, rewards: list[float], accuracy: dict[int, float]) -> Path:
    """Reward per step and greedy accuracy at the steps it was measured, against chance, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(range(1, len(rewards) + 1), rewards, color="tab:blue", label="mean reward of the step's completions")
    steps = sorted(accuracy)
    ax.plot(steps, [accuracy[s] for s in steps], color="tab:orange", marker="o",
            label="greedy accuracy on fresh images")
    ax.axhline(0.25, color="tab:red", linestyle="--", label="chance (one colour in four)")
    ax.set(xlabel="GRPO step", ylabel="reward / accuracy", ylim=(0, 1.02),
           title="GRPO on the colour task, through align-serve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def accuracy(client, n: int = 64, seed: int = 12345) -> float:
    """Greedy answers on fresh images (not in any training set), through the server."""
    from trainer_client.rewards import accuracy_reward

    rng = random.Random(seed)
    colours = [rng.choice(list(COLOURS)) for _ in range(n)]
    images = [[shape_image(c, rng)] for c in colours]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]] * n
    out = client.generate(messages=messages, images=images, n=1, temperature=0.0, max_tokens=4)
    texts = [r.completions[0].text for r in out.results]
    return sum(accuracy_reward(texts, colours)) / n


class StepPrinter:
    """One line per GRPO step: reward, groups dynamic sampling dropped, rollout staleness, and every
    `every` steps greedy accuracy on fresh images through the server (the weights it serves then)."""

    def __init__(self, client, every: int, started: float):
        from transformers import TrainerCallback

        printer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % every == 0:
                    printer.accuracy[state.global_step] = accuracy(client, n=32, seed=777)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "reward" in logs:
                    printer.line(state.global_step, logs)

        self.callback = Callback()
        self.accuracy: dict[int, float] = {}
        self.started = started

    def line(self, step: int, logs: dict) -> None:
        acc = f"accuracy {self.accuracy[step]:4.0%}" if step in self.accuracy else " " * 13
        print(f"step {step:3d}  reward {logs['reward']:.3f}  "
              f"dropped groups {logs.get('dynamic_sampling/dropped_group_ratio', 0):4.0%}  "
              f"staleness {logs.get('async/staleness_max', 0):.1f}  {acc}  "
              f"{time.monotonic() - self.started:4.0f} s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trainer_client.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--grpo-steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=10, help="greedy accuracy on fresh images every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import PrinterCallback

    from trainer_client.client import AlignClient
    from trainer_client.config import parse_args
    from trainer_client.trainers import build_trainer

    work, bin_dir, started = start_demo("demo", args.work_dir, "qwen2_vl", args.seed)
    grpo_data = make_dataset(work / "data", 256, seed=args.seed, method="grpo")
    mpo_data = make_dataset(work / "data", 256, seed=args.seed + 1, method="mpo")

    common = ["--seed", str(args.seed), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "true"]
    _run([str(bin_dir / "align-train"), "mpo", "--model", str(work / "tiny"), "--dataset", str(mpo_data),
          "--output_dir", str(work / "warmup"), "--max_steps", str(args.warmup_steps), "--learning_rate", "3e-3",
          "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "16", *common], work / "warmup.log")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = open(work / "server.log", "w")
    server = subprocess.Popen([str(bin_dir / "align-serve"), "--model", str(work / "warmup"), "--engine", args.engine,
                               "--port", str(port), "--seed", str(args.seed), "--log-level", "warning"],
                              stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = AlignClient(url)
        client.wait_ready(timeout=600)
        before = accuracy(client)
        print(f"accuracy on 64 fresh images after the MPO warm-up: {before:.0%} (chance 25%)")
        print(f"$ align-train grpo --vllm-mode server --async_rollouts --dynamic_sampling ... ({args.grpo_steps} steps)")
        # In this process (not a subprocess) so that every step prints a line as it ends.
        method, align, config, _ = parse_args([
            "grpo", "--model", str(work / "warmup"), "--dataset", str(grpo_data), "--output_dir", str(work / "grpo"),
            "--vllm-mode", "server", "--server-url", url, "--async_rollouts", "--dynamic_sampling",
            "--max_resample_rounds", "2", "--reward_funcs", "accuracy", "--max_steps", str(args.grpo_steps),
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "64", "--num_generations", "8",
            "--max_completion_length", "4", "--temperature", "1.0", "--beta", "0.0", *common])
        trainer = build_trainer(method, align, config)
        trainer.remove_callback(PrinterCallback)  # its dict per step would bury the lines below
        steps = StepPrinter(client, args.eval_every, started)
        trainer.add_callback(steps.callback)
        trainer.train()
        trainer.save_model(config.output_dir)
        after = accuracy(client)
        version = client.info(refresh=True).weight_version
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        server_log.close()

    rewards = reward_curve(trainer.state.log_history)
    print_curve(rewards)
    steps.accuracy[len(rewards)] = after
    png = plot(work / "grpo" / "reward_accuracy.png", rewards, steps.accuracy)
    print(f"server weight_version after training: {version}")
    print(f"accuracy on 64 fresh images (greedy): after warm-up {before:.0%}, after GRPO {after:.0%}; chance 25%")
    print(f"plot: {png}")
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return {"rewards": rewards, "accuracy_before": before, "accuracy_after": after, "weight_version": version,
            "accuracy": dict(steps.accuracy), "plot": png}


if __name__ == "__main__":
    main()
