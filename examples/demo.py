"""`make demo`: teach a tiny random VLM to name the colour of a shape, by GRPO through align-serve.

1. `align-tiny-model` writes a tiny random VLM of `--arch` (default Qwen2-VL; any family of docs/models.md).
2. A generated dataset: grey 64x64 images with a square or circle in red, green, blue or yellow.
3. A short MPO warm-up (`align-train mpo`): GRPO alone on a random tiny VLM learns to say *a*
   colour, then collapses to one colour for every image (docs/training.md, The demo).
4. `align-serve` starts on the warmed-up model; `align-train grpo --vllm-mode server --async_rollouts
   --dynamic_sampling` trains against it (in this process, so each step prints a line), pushing weights
   after every step while the server already generates the next batch.
5. Accuracy on fresh images (greedy, through the server) against chance (25%) as it goes, and a PNG
   of reward and accuracy per step beside the run (`grpo/reward_accuracy.png`).
"""

import argparse
import json
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw

from examples.common import BIN, StepLines, plot_steps, rollout_text, run, serving, start_demo, train_here
from examples.tiny_model import ARCHS

# Where the default GRPO rate (1e-3) pulls a family's tiny model off the answers its warm-up already gives
# (measured with seed 0 on the merged main: LLaVA-OneVision 100% -> 69% at 1e-3, 100% -> 100% at 3e-4).
GRPO_LEARNING_RATE = {"llava_onevision": 3e-4}
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


def reward_curve(log_history: list[dict]) -> list[float]:
    return [e["reward"] for e in log_history if "reward" in e]


def print_curve(rewards: list[float]) -> None:
    k = max(1, len(rewards) // 5)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"mean reward, first 20% of steps: {first:.3f}; last 20%: {last:.3f}")


def plot(path: Path, rewards: list[float], accuracy: dict[int, float]) -> Path:
    """Reward per step and greedy accuracy at the steps it was measured, against chance, as a PNG."""
    steps = sorted(accuracy)
    return plot_steps(path, "GRPO on the colour task, through align-serve", "reward / accuracy", [
        (list(range(1, len(rewards) + 1)), rewards, "mean reward of the step's completions", {"color": "tab:blue"}),
        (steps, [accuracy[s] for s in steps], "greedy accuracy on fresh images", {"color": "tab:orange", "marker": "o"}),
    ])


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


class EveryStep:
    """Every `every` steps, greedy accuracy on fresh images through the server (the weights it serves then),
    shown in that step's line."""

    def __init__(self, client, every: int, started: float):
        from transformers import TrainerCallback

        self.accuracy: dict[int, float] = {}
        measure = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % every == 0:
                    measure.accuracy[state.global_step] = accuracy(client, n=32, seed=777)

        self.callback = Callback()
        self.lines = StepLines(self.line, started)

    def line(self, step: int, logs: dict, seconds: float) -> str:
        acc = f"accuracy {self.accuracy[step]:4.0%}" if step in self.accuracy else " " * 13
        return (f"step {step:3d}  reward {logs['reward']:.3f}  "
                f"dropped groups {logs.get('dynamic_sampling/dropped_group_ratio', 0):4.0%}  "
                f"staleness {logs.get('async/staleness_max', 0):.1f}  {rollout_text(logs)}{acc}  {seconds:4.0f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--arch", default="qwen2_vl", choices=ARCHS,
                        help="the tiny model's family (`align-tiny-model --arch`; docs/models.md)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--grpo-steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=10, help="greedy accuracy on fresh images every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpo-learning-rate", type=float, default=None,
                        help="GRPO's learning rate (default 1e-3; 3e-4 for llava_onevision, whose tiny model 1e-3 "
                             "pulled from 100%% to 69%% greedy accuracy while the slower rate kept 100%%)")
    args = parser.parse_args(argv)
    grpo_lr = args.grpo_learning_rate or GRPO_LEARNING_RATE.get(args.arch, 1e-3)

    from trainer_client.client import AlignClient

    work, started = start_demo("demo", args.work_dir, args.arch, args.seed)
    grpo_data = make_dataset(work / "data", 256, seed=args.seed, method="grpo")
    mpo_data = make_dataset(work / "data", 256, seed=args.seed + 1, method="mpo")

    common = ["--seed", str(args.seed), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "true"]
    run([str(BIN / "align-train"), "mpo", "--model", str(work / "tiny"), "--dataset", str(mpo_data),
         "--output_dir", str(work / "warmup"), "--max_steps", str(args.warmup_steps), "--learning_rate", "3e-3",
         "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "16", *common], work / "warmup.log")

    with serving(work / "warmup", args.engine, args.seed, work / "server.log") as url, AlignClient(url) as client:
        before = accuracy(client)
        print(f"accuracy on 64 fresh images after the MPO warm-up: {before:.0%} (chance 25%)")
        print(f"$ align-train grpo --vllm-mode server --async_rollouts --dynamic_sampling ... ({args.grpo_steps} steps)")
        steps = EveryStep(client, args.eval_every, started)
        trainer = train_here([
            "grpo", "--model", str(work / "warmup"), "--dataset", str(grpo_data), "--output_dir", str(work / "grpo"),
            "--vllm-mode", "server", "--server-url", url, "--async_rollouts", "--dynamic_sampling",
            "--max_resample_rounds", "2", "--reward_funcs", "accuracy", "--max_steps", str(args.grpo_steps),
            "--learning_rate", str(grpo_lr), "--per_device_train_batch_size", "64", "--num_generations", "8",
            "--max_completion_length", "4", "--temperature", "1.0", "--beta", "0.0", *common],
            steps.callback, steps.lines.callback)
        after = accuracy(client)
        version = client.info(refresh=True).weight_version

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
