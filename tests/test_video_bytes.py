"""bench/video_bytes.py's measure: a GRPO step's frames cross the wire once; the next step with the same clip
sends their hashes alone."""

from bench.video_bytes import SERVE, step_bytes, video_prompt_ids
from tests.utils import ServerProcess, moving_dot, png_bytes


def test_the_second_step_sends_under_one_percent_of_the_first(tiny_vlm, log_dir):
    clip = moving_dot(8, "right", seed=0)
    server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir, extra=SERVE).wait_ready(600)
    try:
        first, second = step_bytes(server.url, video_prompt_ids(tiny_vlm), clip, n=4)
    finally:
        server.stop()
    assert first > sum(len(png_bytes(f)) for f in clip)  # every frame's PNG went, base64 inline
    assert second < 0.01 * first, (first, second)
