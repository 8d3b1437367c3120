"""Video bytes per GRPO step: the first step's generate request for a clip (8 frames, n=4) through
AlignClient, then the next step's for the same clip (the next epoch, or another pass over the batch), and
the request bytes each sends. The client sends a frame the first time and names it by hash afterwards, so
the second step should carry the prompt and sampling fields alone.

    python bench/video_bytes.py             # transformers engine, a tiny Qwen2-VL
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.tiny_model import build  # noqa: E402
from tests.utils import ServerProcess, moving_dot, png_bytes  # noqa: E402
from trainer_client import AlignClient  # noqa: E402

# The server's video budget (the processor's own names): frames of 112x84 kept at their size, up to 8 a clip.
SERVE = ["--mm-processor-kwargs", json.dumps({"videos_kwargs": {"min_pixels": 3136, "max_pixels": 12544,
                                                                "max_frames": 8}})]


def video_prompt_ids(model_dir: Path) -> list[int]:
    """A question about one video, as the trainer sends it: the chat template's ids, one video marker."""
    from runtime.torchvision_compat import load_processor

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way does the dot move?"}]}]
    tok = load_processor(model_dir).tokenizer
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def step_bytes(url: str, prompt_ids: list[int], clip: list, n: int = 4, steps: int = 2) -> list[int]:
    """The request bytes (bodies of every request: generate, and any frame upload) of `steps` GRPO-like
    steps through one AlignClient, each sampling `n` completions for the same prompt and clip."""
    sent: list[int] = []

    def count(request) -> None:
        sent[-1] += len(request.read())

    with AlignClient(url) as client:
        for http in client._http:  # the client's own connections: what it sends is what we count
            http.event_hooks["request"].append(count)
        for _ in range(steps):
            sent.append(0)
            client.generate(prompt_ids=[prompt_ids], videos=[[clip]], n=n, temperature=1.0, max_tokens=8)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    clip = moving_dot(args.frames, "right", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp) / "model", "qwen2_vl")
        server = ServerProcess(model, "transformers", log_dir=Path(tmp), extra=SERVE).wait_ready(900)
        try:
            first, second = step_bytes(server.url, video_prompt_ids(model), clip, args.n)
        finally:
            server.stop()
    frames = sum(len(png_bytes(f)) for f in clip)
    print(f"a clip of {args.frames} frames of {clip[0].width}x{clip[0].height} ({frames:,} bytes of PNG), n={args.n}")
    print(f"request bytes: first step {first:,}, second step {second:,}")
    print(f"ratio video bytes second step / first step: {second / first:.4f}")


if __name__ == "__main__":
    main()
