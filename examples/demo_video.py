"""`make demo-video`: a tiny random VLM learns which way a dot moves in a short clip, by SFT then GRPO
through align-serve.

The task: clips of FRAMES frames where a white dot moves left, right, up or down over a noisy background;
the question asks which way. The dot's start and the background are drawn before the direction, from the
same range whichever way it goes, so the first frame is the same for all four directions: no single frame
tells the answer, only the motion between frames does (chance: one in four).

1. `align-tiny-model --arch qwen2_vl`, its video processor set to keep the clips' frames at their size.
2. Training clips written as H.264 mp4 files (`trainer_client.video.write_video`); the rows
   `{"problem", "video", "solution"}` serve both phases.
3. SFT warm-up: `align-train sft --vllm-mode none` on the rows (the solution is the assistant's answer).
4. `align-serve` starts on the warmed-up model; `align-train grpo --vllm-mode server` trains against it
   (in this process, so each step prints a line), pushing weights after every step.
5. Greedy accuracy on fresh clips (not in the training set, written and decoded as the training clips
   are) through the server, after the warm-up and as GRPO goes; a PNG of reward and accuracy per step
   (`grpo/reward_accuracy.png`). The last line reads `video accuracy: X% (chance 25%)`.
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from examples.common import BIN, StepLines, plot_steps, rollout_text, run, serving, start_demo, train_here

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FRAMES, WIDTH, HEIGHT = 4, 56, 56  # a 56x56 frame is 2x2 of the tiny Qwen2-VL's video tokens per frame pair
DOT, STEP = 14, 7  # the dot's side and how far it moves per frame, in pixels
FPS = 2.0  # the clips' frame rate, the rate the trainer samples files at: every frame is kept
PROMPT = "Which way does the dot move? Answer with one word."


def clip(direction: str, rng: random.Random) -> list[Image.Image]:
    """FRAMES frames of a dot moving `direction`. Start and background come from `rng` before the direction
    is read: the same `rng` state gives the same first frame whichever way the dot then goes."""
    margin = DOT // 2 + STEP * (FRAMES - 1)  # room to move the whole way in any direction
    x, y = rng.randint(margin, WIDTH - margin), rng.randint(margin, HEIGHT - margin)
    background = np.random.default_rng(rng.randrange(2**32)).integers(0, 60, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    dx, dy = DIRECTIONS[direction]
    frames = []
    for t in range(FRAMES):
        frame = background.copy()
        cx, cy = x + dx * STEP * t, y + dy * STEP * t
        frame[cy - DOT // 2:cy + DOT // 2, cx - DOT // 2:cx + DOT // 2] = 250
        frames.append(Image.fromarray(frame))
    return frames


def samples(n: int, seed: int) -> list[tuple[str, list[Image.Image]]]:
    """(direction, clip) x n."""
    rng = random.Random(seed)
    return [(d, clip(d, rng)) for d in (rng.choice(list(DIRECTIONS)) for _ in range(n))]


def make_dataset(out_dir: Path, n: int, seed: int) -> Path:
    """n rows as jsonl, each clip an mp4 beside it."""
    from trainer_client.video import write_video

    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    path = out_dir / "rows.jsonl"
    with open(path, "w") as f:
        for i, (direction, frames) in enumerate(samples(n, seed)):
            video = f"clips/{seed}_{i:04d}.mp4"
            write_video(out_dir / video, frames, FPS)
            f.write(json.dumps({"problem": PROMPT, "video": video, "solution": direction}) + "\n")
    return path


def video_budget():
    """What the processors (trainer's and server's, both read the model's) keep of a clip: every frame,
    at its size."""
    from trainer_client.video import VideoBudget

    return VideoBudget(fps=FPS, max_frames=FRAMES, min_pixels=WIDTH * HEIGHT, max_pixels=WIDTH * HEIGHT)


def size_videos(model_dir: Path) -> None:
    """The model's video processor keeps frames of WIDTHxHEIGHT as they are (its default scales every frame up
    to 100k pixels: 32 times the tokens for nothing the task needs)."""
    path = model_dir / "processor_config.json"
    config = json.loads(path.read_text())
    budget = video_budget()
    config["video_processor"]["size"] = {"shortest_edge": budget.min_pixels, "longest_edge": budget.max_pixels}
    path.write_text(json.dumps(config, indent=2))


class Evaluator:
    """Greedy accuracy on fresh clips through the server: each clip written as an mp4 and decoded as the
    trainer decodes its rows, the prompt's ids with one video marker."""

    def __init__(self, model_dir: Path, work: Path, n: int, seed: int):
        from runtime.torchvision_compat import load_processor
        from trainer_client.video import sample

        data = make_dataset(work, n, seed)
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        self.answers = [row["solution"] for row in rows]
        self.clips = [sample([str(work / row["video"])], video_budget()) for row in rows]
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
        tok = load_processor(model_dir).tokenizer
        self.prompt_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])

    def __call__(self, client) -> float:
        from trainer_client.rewards import accuracy_reward

        out = client.generate(prompt_ids=[self.prompt_ids] * len(self.clips), videos=[[c] for c in self.clips],
                              n=1, temperature=0.0, max_tokens=4)
        texts = [r.completions[0].text for r in out.results]
        return sum(accuracy_reward(texts, self.answers)) / len(texts)


class EveryStep:
    """Every `every` steps, greedy accuracy on fresh clips through the server, shown in that step's line."""

    def __init__(self, client, evaluate: Evaluator, every: int, started: float):
        from transformers import TrainerCallback

        self.accuracy: dict[int, float] = {}
        measure = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % every == 0:
                    measure.accuracy[state.global_step] = evaluate(client)

        self.callback = Callback()
        self.lines = StepLines(self.line, started)

    def line(self, step: int, logs: dict, seconds: float) -> str:
        acc = f"accuracy {self.accuracy[step]:4.0%}" if step in self.accuracy else " " * 13
        return f"step {step:3d}  reward {logs['reward']:.3f}  {rollout_text(logs)}{acc}  {seconds:4.0f} s"


def plot(path: Path, rewards: list[float], accuracy: dict[int, float]) -> Path:
    """Reward per GRPO step and greedy accuracy where it was measured (step 0: after the warm-up)."""
    steps = sorted(accuracy)
    return plot_steps(path, "GRPO on the moving-dot clips, through align-serve", "reward / accuracy", [
        (list(range(1, len(rewards) + 1)), rewards, "mean reward of the step's completions", {"color": "tab:blue"}),
        (steps, [accuracy[s] for s in steps], "greedy accuracy on fresh clips", {"color": "tab:orange", "marker": "o"}),
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.demo_video", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help="where the model, clips and runs go (default: a temp dir)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--clips", type=int, default=1024, help="training clips")
    parser.add_argument("--eval-clips", type=int, default=64)
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10, help="greedy accuracy on fresh clips every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from trainer_client.client import AlignClient

    work, started = start_demo("demo-video", args.work_dir, "qwen2_vl", args.seed)
    size_videos(work / "tiny")
    data = make_dataset(work / "data", args.clips, args.seed)
    evaluate = Evaluator(work / "tiny", work / "eval", args.eval_clips, args.seed + 1000)
    print(f"{args.clips} training clips and {args.eval_clips} fresh ones (mp4, {FRAMES} frames of {WIDTH}x{HEIGHT}) "
          f"at {time.monotonic() - started:.0f} s")

    common = ["--seed", str(args.seed), "--video_fps", str(FPS), "--logging_steps", "1", "--save_strategy", "no",
              "--report_to", "none", "--disable_tqdm", "true"]
    run([str(BIN / "align-train"), "sft", "--model", str(work / "tiny"), "--dataset", str(data),
         "--vllm-mode", "none", "--output_dir", str(work / "sft"), "--max_steps", str(args.sft_steps),
         "--learning_rate", "2e-3", "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "16",
         "--gradient_checkpointing", "false", *common], work / "sft.log")

    with serving(work / "sft", args.engine, args.seed, work / "server.log") as url, AlignClient(url) as client:
        before = evaluate(client)
        print(f"accuracy on {args.eval_clips} fresh clips after the SFT warm-up: {before:.0%} (chance 25%), "
              f"{time.monotonic() - started:.0f} s")
        print(f"$ align-train grpo --vllm-mode server ... ({args.grpo_steps} steps)", flush=True)
        steps = EveryStep(client, evaluate, args.eval_every, started)
        trainer = train_here([
            "grpo", "--model", str(work / "sft"), "--dataset", str(data), "--output_dir", str(work / "grpo"),
            "--vllm-mode", "server", "--server-url", url, "--reward_funcs", "accuracy",
            "--max_steps", str(args.grpo_steps), "--learning_rate", "1e-3", "--per_device_train_batch_size", "64",
            "--num_generations", "8", "--max_completion_length", "4", "--temperature", "1.0", "--beta", "0.0",
            "--gradient_checkpointing", "false", *common],
            steps.callback, steps.lines.callback)
        after = evaluate(client)

    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    steps.accuracy[0] = before
    steps.accuracy[len(rewards)] = after
    png = plot(work / "grpo" / "reward_accuracy.png", rewards, steps.accuracy)
    print(f"plot: {png}")
    print(f"greedy on {args.eval_clips} fresh clips: after the SFT warm-up {before:.0%}, after GRPO {after:.0%}; "
          f"demo finished in {time.monotonic() - started:.0f} s")
    print(f"video accuracy: {after:.0%} (chance 25%)")
    return {"rewards": rewards, "accuracy_before": before, "accuracy_after": after,
            "accuracy": dict(steps.accuracy), "plot": png}


if __name__ == "__main__":
    main()
