"""`align-train sft` on video rows (mp4 files and frame lists, beside image rows): each video sampled with the
run's budget, expanded by the model's own processor, the loss on the assistant's tokens only."""

import json
import re
from pathlib import Path

import pytest
import torch

from examples.tiny_model import build
from runtime.torchvision_compat import load_processor
from tests.test_sft import FLAGS, losses
from tests.utils import moving_dot, refusal
from trainer_client.cli import run
from trainer_client.data import load_train_dataset
from trainer_client.sft import AssistantTurnsCollator
from trainer_client.video import resolve_budget, sample, write_video

MAX_PIXELS = 12544  # 112 x 112: a few video tokens per frame pair, so the tiny model trains in seconds
VIDEO_FLAGS = ["--video_max_pixels", str(MAX_PIXELS), "--video_fps", "4"]
ANSWERS = ["right", "down", "a dot", "left"]


def write_rows(root: Path, rows: list[dict]) -> Path:
    with open(root / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root / "rows.jsonl"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Two mp4 files (a dot moving right, left), the frames of a dot moving down, one image."""
    root = tmp_path_factory.mktemp("video-rows")
    write_video(root / "right.mp4", moving_dot(6, "right"), fps=4)
    write_video(root / "left.mp4", moving_dot(4, "left", seed=2), fps=4)
    for i, frame in enumerate(moving_dot(4, "down", seed=1)):
        frame.save(root / f"down{i}.png")
    moving_dot(1, "up", seed=3)[0].save(root / "dot.png")
    return root


@pytest.fixture(scope="module")
def rows(clips) -> Path:
    """Mixed rows: a text-only conversation with an mp4 (its video goes before the text), frames in a written
    video part, an image row, and an image and an mp4 in one message."""
    parts = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Which way does the dot move?"}]
    return write_rows(clips, [
        {"messages": [user("Which way does the dot move?"), {"role": "assistant", "content": ANSWERS[0]}],
         "images": [], "videos": ["right.mp4"]},
        {"messages": [{"role": "user", "content": parts[1:]}, answer(ANSWERS[1])],
         "images": [], "videos": [[f"down{i}.png" for i in range(4)]]},
        {"messages": [user("What is it?"), {"role": "assistant", "content": ANSWERS[2]}], "images": ["dot.png"],
         "videos": []},
        {"messages": [{"role": "user", "content": parts}, answer(ANSWERS[3])], "images": ["dot.png"],
         "videos": ["left.mp4"]},
    ])


def test_collated_videos_are_the_processors_and_carry_no_labels(tiny_vlm, clips, rows):
    from PIL import Image

    processor = load_processor(tiny_vlm)
    budget = resolve_budget(processor, fps=4, max_pixels=MAX_PIXELS)
    dataset = load_train_dataset(rows, "sft")
    batch = AssistantTurnsCollator(processor, [], video_budget=budget)([dataset[i] for i in range(len(dataset))])

    # the same frames, sampled alike, in the parts where the collator must put them
    right, left = (sample([str(clips / name)], budget) for name in ("right.mp4", "left.mp4"))
    down = sample([str(clips / f"down{i}.png") for i in range(4)], budget)
    assert [len(right), len(down), len(left)] == [6, 4, 4]  # 1.5 s and 1 s at 4 fps; frames as given
    image = Image.open(clips / "dot.png").convert("RGB")
    text = [{"type": "text", "text": "Which way does the dot move?"}]
    conversations = [
        [{"role": "user", "content": [{"type": "video"}, *text]}, answer(ANSWERS[0])],
        [{"role": "user", "content": [{"type": "video"}, *text]}, answer(ANSWERS[1])],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}, answer(ANSWERS[2])],
        [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, *text]}, answer(ANSWERS[3])],
    ]
    expected = processor(text=processor.apply_chat_template(conversations, tokenize=False), images=[image, image],
                         videos=[right, down, left], padding=True, padding_side="right", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(batch[key], expected[key]), key
    assert batch["video_grid_thw"][:, 0].tolist() == [3, 2, 2]  # frames / temporal patch of 2

    ids, labels = batch["input_ids"], batch["labels"]
    video_tokens = ids == processor.video_token_id
    per_video = [int(g.prod()) // processor.video_processor.merge_size ** 2 for g in batch["video_grid_thw"]]
    assert video_tokens.sum(1).tolist() == [per_video[0], per_video[1], 0, per_video[2]]
    assert (labels[video_tokens] == -100).all() and (labels[ids == processor.image_token_id] == -100).all()
    learnt = [processor.tokenizer.decode(ids[i][labels[i] != -100]) for i in range(len(ANSWERS))]
    assert learnt == [f"{a}<|im_end|>" for a in ANSWERS]


def test_a_qwen2_5_vl_batch_carries_each_videos_rate(rows, tmp_path):
    """Qwen2.5-VL's positions read each video's timing: the collator gives the processor the rate each video's
    frames were sampled at (thinned to 2 frames at 4 fps: 1.5 s of clip is 1.33 fps, 1 s is 2 fps), as the
    server gets it, where the processor's own default would be 24 fps (1/12 s a temporal patch of 2 frames)."""
    processor = load_processor(build(tmp_path / "qwen2_5_vl", "qwen2_5_vl", seed=0))
    budget = resolve_budget(processor, fps=4, max_frames=2, max_pixels=MAX_PIXELS)
    dataset = load_train_dataset(rows, "sft")
    batch = AssistantTurnsCollator(processor, [], video_budget=budget)([dataset[i] for i in range(len(dataset))])
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.5, 1.0, 1.0])


def test_sft_on_video_rows_lowers_the_loss(tiny_vlm, rows, tmp_path):
    trainer = run(["sft", "--model", str(tiny_vlm), "--dataset", str(rows), "--output_dir", str(tmp_path / "out"),
                   "--max_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                   *VIDEO_FLAGS, *FLAGS])
    curve = losses(trainer)
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0], curve
    # the batches the trainer builds carry every video of the batch's rows (TRL's column filter keeps them)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["video_grid_thw"][:, 0].tolist()) == [2, 2, 3]


def test_a_corrupt_video_stops_the_run_at_the_data_check_naming_the_row(tiny_vlm, clips, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    data = write_rows(tmp_path, [
        {"messages": [user("Which way?"), {"role": "assistant", "content": "right"}], "videos": [str(clips / "right.mp4")]},
        {"messages": [user("Which way?"), {"role": "assistant", "content": "left"}], "videos": ["broken.mp4"]},
    ])
    message = refusal(["sft", "--model", str(tiny_vlm), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                        *VIDEO_FLAGS, *FLAGS])
    assert message.startswith(f"align-train: bad dataset, nothing trained: {data} row 2: video file "
                              f"{tmp_path / 'broken.mp4'} cannot be read"), message


@pytest.mark.parametrize("arch, why", [
    ("qwen3_vl", r"Qwen3-VL trains without video here \(video is trained and served for Qwen2-VL, Qwen2.5-VL\)"),
    ("gemma3", r"its processor takes no video"),
])
def test_video_rows_for_a_model_without_video_are_refused(arch, why, clips, tmp_path):
    model = build(tmp_path / arch, arch, seed=0)
    data = write_rows(tmp_path, [
        {"messages": [user("Which way?"), {"role": "assistant", "content": "right"}], "videos": [str(clips / "right.mp4")]},
        {"messages": [user("What is it?"), {"role": "assistant", "content": "a dot"}], "videos": []},
        {"messages": [user("Which way?"), {"role": "assistant", "content": "left"}], "videos": [str(clips / "left.mp4")]},
    ])
    message = refusal(["sft", "--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                        *FLAGS])
    assert message.startswith(f"align-train: the dataset has 2 video row(s) but --model {model} takes none: "), message
    assert re.search(why, message), message


def test_a_bad_video_budget_is_refused_in_one_line(tiny_vlm, rows, tmp_path):
    message = refusal(["sft", "--model", str(tiny_vlm), "--dataset", str(rows), "--output_dir", str(tmp_path / "out"),
                        "--video_fps", "0", *FLAGS])
    assert message == "align-train: video budget fps must be positive, got 0.0", message
