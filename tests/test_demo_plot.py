"""The demo's plot (`grpo/reward_accuracy.png`), drawn by matplotlib from a small series."""

import numpy as np
from PIL import Image

from examples.demo import plot

BLUE, ORANGE, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)  # matplotlib's tab: colours of the 3 series


def _has(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((np.abs(pixels - np.array(colour)).sum(axis=-1) < 30).any())


def test_the_plot_is_a_png_with_reward_accuracy_and_chance(tmp_path):
    path = plot(tmp_path / "reward_accuracy.png", [0.1, 0.2, 0.4, 0.5, 0.7], {2: 0.3, 5: 0.8})
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (800, 450)
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert all(_has(pixels, c) for c in (BLUE, ORANGE, RED))
