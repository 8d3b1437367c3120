"""`make demo-video`'s clips, without the training: real mp4 files that decode back to frames whose dot moves
the labelled way, and a first frame that says nothing about the way."""

import itertools
import json
import random

import numpy as np

from examples.demo_video import DIRECTIONS, FRAMES, HEIGHT, STEP, WIDTH, clip, make_dataset, video_budget
from trainer_client.video import sample


def dot_centre(frame) -> np.ndarray:
    """(x, y) of the bright pixels: the dot (the background stays below 60, after H.264 too)."""
    ys, xs = np.nonzero(np.asarray(frame.convert("L")) > 150)
    assert len(xs), "no dot in the frame"
    return np.array([xs.mean(), ys.mean()])


def test_clips_decode_to_a_dot_moving_the_labelled_way(tmp_path):
    rows = [json.loads(line) for line in make_dataset(tmp_path, 24, seed=5).read_text().splitlines()]
    assert {row["solution"] for row in rows} == set(DIRECTIONS)
    for row in rows:
        assert row["video"].endswith(".mp4") and row["problem"]
        frames = sample([str(tmp_path / row["video"])], video_budget(), where=row["video"])
        assert len(frames) == FRAMES and frames[0].size == (WIDTH, HEIGHT)  # every frame kept, at its size
        centres = [dot_centre(f) for f in frames]
        for a, b in itertools.pairwise(centres):
            moved = b - a
            # each frame STEP pixels the labelled way (within a pixel: the codec blurs the dot's edge)
            assert np.abs(moved - STEP * np.array(DIRECTIONS[row["solution"]])).max() <= 1, (row, moved)


def test_the_first_frame_is_the_same_whichever_way_the_dot_goes():
    for seed in range(20):
        first = {d: np.asarray(clip(d, random.Random(seed))[0]) for d in DIRECTIONS}
        assert all(np.array_equal(first["left"], f) for f in first.values())
        last = {d: np.asarray(clip(d, random.Random(seed))[-1]).tobytes() for d in DIRECTIONS}
        assert len(set(last.values())) == 4  # the motion alone tells them apart
