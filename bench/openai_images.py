"""Images once per conversation: a 10-turn chat over 4 images of 512x512 through `/v1/chat/completions`,
re-sending every image as a data URL on every turn vs sending them once and naming them by
`sha256:<hex>` afterwards. Prints the request bytes and seconds of each turn, both side by side in
one run against one server (the reference run uses fresh images, so no image is held before it).

    python bench/openai_images.py --engine transformers    # or vllm
"""

import argparse
import base64
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.tiny_model import build  # noqa: E402
from protocol import image_sha256  # noqa: E402
from tests.utils import ServerProcess, png_bytes, random_image  # noqa: E402

TURNS, IMAGES, SIZE = 10, 4, 512


def conversation(http: httpx.Client, url: str, seed: int, by_reference: bool) -> list[tuple[int, float]]:
    """(request bytes, seconds) per turn. Each turn adds the answer and a new user question."""
    pngs = [png_bytes(random_image(seed + k, SIZE)) for k in range(IMAGES)]
    messages, out = [], []
    for turn in range(TURNS):
        held = by_reference and turn > 0
        urls = [f"sha256:{image_sha256(png)}" if held else "data:image/png;base64," + base64.b64encode(png).decode()
                for png in pngs]
        first = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        if messages:
            messages[0]["content"][:IMAGES] = first
        else:
            messages.append({"role": "user", "content": [*first, {"type": "text", "text": "What colours?"}]})
        body = {"messages": messages, "max_tokens": 4, "temperature": 0}
        request = http.build_request("POST", f"{url}/v1/chat/completions", json=body)
        t = time.perf_counter()
        r = http.send(request)
        seconds = time.perf_counter() - t
        r.raise_for_status()
        out.append((len(request.content), seconds))
        messages += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"And in turn {turn + 1}?"}]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp) / "model", "qwen2_vl", max_len=4096)
        server = ServerProcess(model, args.engine, log_dir=Path(tmp), extra=["--max-model-len", "4096"]).wait_ready(900)
        try:
            with httpx.Client(timeout=600) as http:
                conversation(http, server.url, 1000, by_reference=False)  # warm-up, not shown
                data = conversation(http, server.url, 0, by_reference=False)
                ref = conversation(http, server.url, 100, by_reference=True)
        finally:
            server.stop()
    print(f"{args.engine} engine, {TURNS} turns, {IMAGES} images of {SIZE}x{SIZE} (PNG)")
    print(f"{'turn':>4} {'data URL bytes':>15} {'s':>7} {'by-ref bytes':>13} {'s':>7}")
    for turn, ((db, ds), (rb, rs)) in enumerate(zip(data, ref, strict=True), 1):
        print(f"{turn:>4} {db:>15,} {ds:>7.3f} {rb:>13,} {rs:>7.3f}")
    (db, rb), (ds, rs) = ([sum(x[i] for x in run) for run in (data, ref)] for i in (0, 1))
    print(f"{'all':>4} {db:>15,} {ds:>7.3f} {rb:>13,} {rs:>7.3f}")
    print(f"by reference / data URLs: bytes {rb / db:.3f}, seconds {rs / ds:.3f}")


if __name__ == "__main__":
    main()
