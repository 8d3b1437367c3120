"""`make demo-agent`: a tiny VLM learns to answer with a tool it has to call, `zoom(region)`.

The task: a 256x256 light image with a small striped patch at the centre of each of its four quadrants;
the question asks for the stripes' colour in one quadrant. The stripes pair a colour with its
complement (red/cyan, green/magenta, blue/yellow, white/black) two pixels each, so any four pixels
average to the same grey. The model's processor sees at most 64x64 pixels (a 4x downscale): there
every patch is a plain grey square, whatever its colour. `zoom(region)` returns the patch of that
quadrant 16x enlarged, where the stripes are wide bands. So the colour can be read with the tool,
called on the quadrant asked about, and only by chance (one in four) without it.

1. `align-tiny-model --arch qwen3_vl` (a chat template that renders tools), limited to 64x64 images.
2. Warm-up: `align-train sft` on traces (question + image -> zoom on the quadrant asked about -> the
   tool's image -> the colour).
3. Async GRPO with the tool through `align-serve` (`--environment`: a ZoomEnv per rollout holds the row's
   image), reward = the right colour; reward, tool-call rate and accuracy printed per step, a plot saved.
4. Greedy accuracy on fresh images: the model with the tool, and the same model with the tool
   disabled (it then returns the image as it is, no detail added). The last line reads
   `accuracy with tool: X%, without: Y%`.
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from examples.common import BIN, StepLines, plot_steps, rollout_text, run, serving, start_demo, train_here

SIZE = 256
MAX_PIXELS = 64 * 64  # what the model's processor keeps of any image: a 4x downscale of the task image
PATCH = 16  # the striped patch at each quadrant's centre (multiples of 4: stripes aligned to the downscale), 16x
PAIRS = {"red": ((255, 0, 0), (0, 255, 255)), "green": ((0, 255, 0), (255, 0, 255)),
         "blue": ((0, 0, 255), (255, 255, 0)), "white": ((255, 255, 255), (0, 0, 0))}
QUADRANTS = {"top-left": (0, 0), "top-right": (1, 0), "bottom-left": (0, 1), "bottom-right": (1, 1)}
QUESTION = "What colour are the stripes in the {region} quadrant? Answer with one word."
# The GRPO phase's rollouts: the server samples the next batch's trajectories, tool turns included, while
# the trainer trains on this one (one weight version behind at most).
ROLLOUTS = ["--async_rollouts", "--max_staleness", "1"]


def _centre(region: str) -> tuple[int, int]:
    qx, qy = QUADRANTS[region]
    return qx * SIZE // 2 + SIZE // 4, qy * SIZE // 2 + SIZE // 4


def task_image(colours: dict[str, str], rng: random.Random) -> Image.Image:
    """A patch of stripes in each quadrant, `colours[region]` the colour of each."""
    level = rng.randint(190, 235)
    pixels = np.clip(np.random.default_rng(rng.randrange(2**32)).normal(level, 6, (SIZE, SIZE, 3)), 0, 255)
    for region, colour in colours.items():
        cx, cy = _centre(region)
        x0, y0 = cx - PATCH // 2, cy - PATCH // 2
        first, second = PAIRS[colour]
        for i in range(PATCH):  # vertical stripes, two pixels each
            pixels[y0:y0 + PATCH, x0 + i] = first if i % 4 < 2 else second
    return Image.fromarray(pixels.astype(np.uint8))


def zoom_image(image: Image.Image, region: str) -> Image.Image:
    cx, cy = _centre(region)
    box = (cx - PATCH // 2, cy - PATCH // 2, cx + PATCH // 2, cy + PATCH // 2)
    return image.crop(box).resize((SIZE, SIZE), Image.NEAREST)


class ZoomEnv:
    """One rollout's environment (TRL's `environment_factory`): it holds the row's image; `zoom` is the tool."""

    def __init__(self, enlarge: bool = True):
        self.image, self.enlarge = None, enlarge

    def reset(self, image=None, **row) -> None:
        self.image = image

    def zoom(self, region: str) -> list:
        """Zoom into one quadrant of the image: the patch at its centre, enlarged 16 times.

        Args:
            region: the quadrant, one of top-left, top-right, bottom-left, bottom-right
        """
        if region not in QUADRANTS:
            return f"unknown region {region!r}: use one of {', '.join(QUADRANTS)}"
        # Disabled (the demo's comparison): the image as it is, the same turns but no detail added.
        seen = zoom_image(self.image, region) if self.enlarge else self.image
        return [{"type": "image", "image": seen}, {"type": "text", "text": f"the {region} quadrant, enlarged"}]


def question(region: str, image=None) -> list[dict]:
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": QUESTION.format(region=region)}]}]


def samples(n: int, seed: int) -> list[tuple[str, str, Image.Image]]:
    """(colour asked about, its quadrant, image) x n; the other quadrants' colours drawn independently."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colours = {region: rng.choice(list(PAIRS)) for region in QUADRANTS}
        region = rng.choice(list(QUADRANTS))
        out.append((colours[region], region, task_image(colours, rng)))
    return out


def make_datasets(out_dir: Path, n_sft: int, n_grpo: int, seed: int) -> tuple[Path, Path]:
    """SFT traces (`messages` + `images`: the question's image, then the tool's) and GRPO rows (prompt,
    image, solution), as jsonl with the images beside them."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    sft, grpo = out_dir / "sft.jsonl", out_dir / "grpo.jsonl"
    with open(sft, "w") as f:
        for i, (colour, region, image) in enumerate(samples(n_sft, seed)):
            paths = [f"images/sft_{i}.png", f"images/sft_{i}_zoom.png"]
            image.save(out_dir / paths[0])
            zoom_image(image, region).save(out_dir / paths[1])
            call = {"type": "function", "function": {"name": "zoom", "arguments": {"region": region}}}
            messages = [*question(region), {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "name": "zoom", "content": [
                            {"type": "image"}, {"type": "text", "text": f"the {region} quadrant, enlarged"}]},
                        {"role": "assistant", "content": colour}]
            f.write(json.dumps({"messages": messages, "images": paths}) + "\n")
    with open(grpo, "w") as f:
        for i, (colour, region, image) in enumerate(samples(n_grpo, seed + 1)):
            image.save(out_dir / f"images/grpo_{i}.png")
            f.write(json.dumps({"prompt": question(region), "image": f"images/grpo_{i}.png", "solution": colour}) + "\n")
    return sft, grpo


def limit_pixels(model_dir: Path, max_pixels: int) -> None:
    """The processor of `model_dir` (server's and trainer's alike) downscales every image to `max_pixels`."""
    path = model_dir / "processor_config.json"
    config = json.loads(path.read_text())
    if "image_processor" not in config:  # saved without a video processor (torchvision absent): its own file
        path = model_dir / "preprocessor_config.json"
        config = {"image_processor": json.loads(path.read_text())}
    config["image_processor"]["size"]["longest_edge"] = max_pixels
    path.write_text(json.dumps(config if path.name == "processor_config.json" else config["image_processor"], indent=2))


def _tool_call(text: str) -> dict | None:
    start, end = text.find("<tool_call>"), text.find("</tool_call>")
    try:
        return json.loads(text[start + len("<tool_call>"):end]) if 0 <= start < end else None
    except json.JSONDecodeError:
        return None


def _greedy(model, processor, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    import torch

    inputs = processor.apply_chat_template(conversations, tools=[ZoomEnv().zoom], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt",
                                           processor_kwargs={"padding": True, "padding_side": "left"})
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, processor, n: int, seed: int, enlarge: bool) -> float:
    """Greedy accuracy on `n` fresh images, the tool offered: the model's first turn, the tool's answer
    to a zoom call (`enlarge` False: the image as it is), the model's second turn."""
    fresh = samples(n, seed)
    conversations = [question(region, image) for _, region, image in fresh]
    answers = _greedy(model, processor, conversations, max_new_tokens=96)
    called = []
    for i, (text, (_, _, image)) in enumerate(zip(answers, fresh, strict=True)):
        call = _tool_call(text)
        if call is not None and call.get("name") == "zoom":
            env = ZoomEnv(enlarge)
            env.reset(image=image)
            region = str((call.get("arguments") or {}).get("region"))
            conversations[i] += [
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "name": "zoom", "content": env.zoom(region)}]
            called.append(i)
    if called:
        for i, text in zip(called, _greedy(model, processor, [conversations[i] for i in called], 8), strict=True):
            answers[i] = text
    return sum(text.strip().lower() == colour for text, (colour, _, _) in zip(answers, fresh, strict=True)) / n


def step_line(step: int, logs: dict, seconds: float) -> str:
    return (f"step {step:3d}  reward {logs['reward']:.3f}  "
            f"tool calls per sample {logs.get('tools/call_frequency', 0):.2f}  "
            f"accuracy {logs.get('rewards/accuracy_reward/mean', 0):4.0%}  {rollout_text(logs)}{seconds:4.0f} s")


def plot(path: Path, steps: list[dict]) -> Path:
    x = list(range(1, len(steps) + 1))
    return plot_steps(path, "GRPO with a zoom tool, through align-serve", "per sample", [
        (x, [s["reward"] for s in steps], "mean reward (right colour)", {"color": "tab:blue"}),
        (x, [s.get("tools/call_frequency", 0) for s in steps], "tool calls per sample", {"color": "tab:green"}),
    ])


def grpo(model: Path, data: Path, out: Path, steps: int, seed: int, engine: str, started: float) -> list[dict]:
    """GRPO with the zoom tool against an align-serve started on `model`; the logged steps."""
    with serving(model, engine, seed, out.parent / "server.log") as url:
        print(f"$ align-train grpo --vllm-mode server --environment examples.demo_agent:ZoomEnv "
              f"{' '.join(ROLLOUTS)} ... ({steps} steps)", flush=True)
        lines = StepLines(step_line, started)
        train_here([
            "grpo", "--model", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--vllm-mode", "server", "--server-url", url, *ROLLOUTS,
            "--environment", "examples.demo_agent:ZoomEnv", "--max_tool_calling_iterations", "2",
            "--reward_funcs", "accuracy", "--max_steps", str(steps), "--learning_rate", "2e-4",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "192",
            "--temperature", "0.8", "--beta", "0.0", "--gradient_checkpointing", "false", "--seed", str(seed),
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"],
            lines.callback)
    return lines.steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.demo_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--grpo-steps", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText

    from runtime.torchvision_compat import load_processor

    work, started = start_demo("demo-agent", args.work_dir, "qwen3_vl", args.seed)
    limit_pixels(work / "tiny", MAX_PIXELS)
    sft_data, grpo_data = make_datasets(work / "data", 256, 256, args.seed)
    run([str(BIN / "align-train"), "sft", "--model", str(work / "tiny"), "--dataset", str(sft_data),
          "--environment", "examples.demo_agent:ZoomEnv", "--output_dir", str(work / "sft"),
          "--max_steps", str(args.sft_steps), "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
          "--lr_scheduler_type", "constant", "--gradient_checkpointing", "false", "--seed", str(args.seed),
          "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"],
         work / "sft.log")
    print(f"sft warm-up, {args.sft_steps} steps on tool-use traces: done at {time.monotonic() - started:.0f} s")

    steps = grpo(work / "sft", grpo_data, work / "grpo", args.grpo_steps, args.seed, args.engine, started)
    png = plot(work / "grpo" / "reward_tool_calls.png", steps)
    print(f"plot: {png}")
    model = AutoModelForImageTextToText.from_pretrained(work / "grpo", dtype=torch.float32).eval()
    processor = load_processor(work / "grpo")
    with_tool = evaluate(model, processor, args.eval_images, args.seed + 1000, enlarge=True)
    without = evaluate(model, processor, args.eval_images, args.seed + 1000, enlarge=False)
    print(f"greedy on {args.eval_images} fresh images; without = the zoom tool disabled (it returns the image as "
          f"it is); demo finished in {time.monotonic() - started:.0f} s")
    print(f"accuracy with tool: {with_tool:.0%}, without: {without:.0%}")
    return {"with_tool": with_tool, "without": without, "steps": steps, "plot": png}


if __name__ == "__main__":
    main()
