"""`align-train mpo` on video rows (an mp4 file and a frame list, beside image and text rows): each row's videos
sampled with the run's budget when a batch reads it, expanded by the model's own processor with the prompt, and
read by the forward of both answers (chosen and rejected) and of the reference model."""

import json
import re
from pathlib import Path

import pytest
import torch

from examples.tiny_model import build
from runtime.torchvision_compat import load_processor
from tests.test_sft import FLAGS, losses
from tests.utils import moving_dot, refusal
from trainer_client.config import parse_args
from trainer_client.trainers import build_trainer
from trainer_client.video import resolve_budget, sample, write_video

MAX_PIXELS = 12544  # 112 x 112: a few video tokens per frame pair, so the tiny model trains in seconds
VIDEO_FLAGS = ["--video_max_pixels", str(MAX_PIXELS), "--video_fps", "4"]
QUESTION = "Which way does the dot move?"


def write_rows(root: Path, rows: list[dict], name: str = "rows.jsonl") -> Path:
    with open(root / name, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root / name


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """mp4 files of a dot moving right and left (the same background, frame count and size), the frames of a dot
    moving down, one image."""
    root = tmp_path_factory.mktemp("video-mpo")
    write_video(root / "right.mp4", moving_dot(6, "right"), fps=4)
    write_video(root / "left.mp4", moving_dot(6, "left"), fps=4)
    for i, frame in enumerate(moving_dot(4, "down", seed=1)):
        frame.save(root / f"down{i}.png")
    moving_dot(1, "up", seed=3)[0].save(root / "dot.png")
    return root


@pytest.fixture(scope="module")
def rows(clips) -> Path:
    """Mixed preference rows: an mp4, a frame list (each video's part goes before the prompt's text), an image row
    and a text row."""
    return write_rows(clips, [
        {"prompt": QUESTION, "video": "right.mp4", "chosen": "right", "rejected": "left"},
        {"prompt": QUESTION, "video": [f"down{i}.png" for i in range(4)], "chosen": "down", "rejected": "up"},
        {"prompt": "What is it?", "image": "dot.png", "chosen": "a dot", "rejected": "a cat"},
        {"prompt": "Say hello.", "chosen": "hello", "rejected": "no"},
    ])


def mpo_trainer(model: Path, data: Path, out: Path, *flags: str):
    method, align, config, _ = parse_args(["mpo", "--model", str(model), "--dataset", str(data), "--output_dir",
                                           str(out), *VIDEO_FLAGS, *FLAGS, *flags])
    return build_trainer(method, align, config)


def chunks(pixels: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor]:
    """`pixel_values_videos` split into each video's patches."""
    return list(pixels.split([int(g.prod()) for g in grids]))


def test_mpo_trains_on_video_rows_and_its_forwards_read_the_processors_videos(tiny_vlm, clips, rows, tmp_path):
    trainer = mpo_trainer(tiny_vlm, rows, tmp_path / "out", "--max_steps", "2", "--per_device_train_batch_size", "4",
                          "--learning_rate", "1e-3")
    # the frames each video gives under the run's budget, sampled once here, and the processor's tensors for them
    processor = load_processor(tiny_vlm)
    budget = resolve_budget(processor, fps=4, max_pixels=MAX_PIXELS)
    frames = [sample([str(clips / "right.mp4")], budget), sample([str(clips / f"down{i}.png") for i in range(4)], budget)]
    assert [len(f) for f in frames] == [6, 4]  # 1.5 s at 4 fps; frames as given
    expected = [processor.video_processor(videos=[f], return_tensors="pt") for f in frames]

    seen = []

    def record(module, args, kwargs):
        seen.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in (trainer.model, trainer.ref_model)]
    visual = {k: v.detach().clone() for k, v in trainer.model.model.visual.named_parameters()}
    trainer.train()
    for hook in hooks:
        hook.remove()

    curve = losses(trainer)
    assert len(curve) == 2 and all(torch.isfinite(torch.tensor(curve))), curve
    assert [k for k, v in trainer.model.model.visual.named_parameters() if not torch.equal(v, visual[k])]
    assert len(seen) == 4  # per step the policy's forward and the reference's, over the chosen and rejected halves
    video_token = processor.video_token_id
    for forward in seen:
        # each video twice (its row's chosen and rejected sequences), as the processor makes it for those frames
        got = chunks(forward["pixel_values_videos"], forward["video_grid_thw"])
        assert len(got) == 4
        for want in expected:
            assert sum(torch.equal(g, want["pixel_values_videos"]) for g in got) == 2
        assert sorted(forward["video_grid_thw"].tolist()) == sorted(
            [e["video_grid_thw"][0].tolist() for e in expected] * 2)
        # every video's tokens expanded in its sequence, and typed as video for the model's positions
        per_video = {int(e["video_grid_thw"][0].prod()) // processor.video_processor.merge_size ** 2 for e in expected}
        counts = (forward["input_ids"] == video_token).sum(1).tolist()
        assert sorted(counts) == sorted([0, 0, *per_video] * 2), counts
        assert torch.equal(forward["mm_token_type_ids"],
                           torch.as_tensor(processor.create_mm_token_type_ids(forward["input_ids"].tolist())))


def test_a_rows_video_changes_its_chosen_logprob_and_trains_the_vision_tower(tiny_vlm, clips, tmp_path):
    """Two rows alike but for their clip (a dot moving right, left: the same frame count and size, so the same
    tokens): the chosen answer's logprob differs, and a video-only batch reaches the vision tower's weights."""
    row = {"prompt": QUESTION, "chosen": "right", "rejected": "left"}
    data = write_rows(tmp_path, [{**row, "video": str(clips / "right.mp4")}, {**row, "video": str(clips / "left.mp4")}])
    trainer = mpo_trainer(tiny_vlm, data, tmp_path / "out")
    model, collate = trainer.model, trainer.data_collator

    def chosen_logprob(example: dict) -> torch.Tensor:
        batch = collate([dict(example)])
        logits = model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits
        logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return (logps * batch["completion_mask"][:, 1:]).sum(1)[0]  # the batch is [chosen, rejected]

    right, left = trainer.train_dataset[0], trainer.train_dataset[1]
    with torch.no_grad():
        twice = chosen_logprob(right), chosen_logprob(right)
        other = chosen_logprob(left)
    assert torch.equal(*twice)  # so any difference is the video's
    assert abs(float(twice[0] - other)) > 1e-4, (float(twice[0]), float(other))

    model.zero_grad()
    chosen_logprob(right).backward()
    moved = [n for n, p in model.model.visual.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert moved, "no gradient reached the vision tower"


def test_a_corrupt_video_stops_the_run_at_the_data_check_naming_the_row(tiny_vlm, clips, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    data = write_rows(tmp_path, [
        {"prompt": QUESTION, "video": str(clips / "right.mp4"), "chosen": "right", "rejected": "left"},
        {"prompt": QUESTION, "video": "broken.mp4", "chosen": "left", "rejected": "right"},
    ])
    message = refusal(["mpo", "--model", str(tiny_vlm), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                       *VIDEO_FLAGS, *FLAGS])
    assert message.startswith(f"align-train: bad dataset, nothing trained: {data} row 2: video file "
                              f"{tmp_path / 'broken.mp4'} cannot be read"), message


@pytest.mark.parametrize("arch, why", [
    ("llava_onevision", r"LLaVA-OneVision trains without video here \(video is trained and served for .*Qwen2-VL"),
    ("gemma3", r"its processor takes no video"),
])
def test_video_rows_for_a_model_without_video_are_refused(arch, why, clips, tmp_path):
    model = build(tmp_path / arch, arch, seed=0)
    data = write_rows(tmp_path, [
        {"prompt": QUESTION, "video": str(clips / "right.mp4"), "chosen": "right", "rejected": "left"},
        {"prompt": "Say hello.", "chosen": "hello", "rejected": "no"},
    ])
    message = refusal(["mpo", "--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                       *FLAGS])
    assert message.startswith(f"align-train: the dataset has 1 video row(s) but --model {model} takes none: "), message
    assert re.search(why, message), message


def test_a_clip_unreadable_mid_run_stops_it_in_one_line_naming_the_clip(tiny_vlm, clips, tmp_path):
    """Opened by the start-up check, but its frames cannot be decoded when a batch reads it."""
    write_video(tmp_path / "damaged.mp4", moving_dot(8, "down", size=(56, 56), seed=9), fps=4)
    data = bytearray((tmp_path / "damaged.mp4").read_bytes())
    mdat = data.find(b"mdat") + 4
    data[mdat:mdat + 2000] = bytes(2000)  # the coded frames zeroed, the container intact
    (tmp_path / "damaged.mp4").write_bytes(bytes(data))
    rows = write_rows(tmp_path, [{"prompt": QUESTION, "video": str(tmp_path / "damaged.mp4"), "chosen": "down",
                                  "rejected": "up"}])
    message = refusal(["mpo", "--model", str(tiny_vlm), "--dataset", str(rows), "--output_dir", str(tmp_path / "out"),
                       "--max_steps", "1", *VIDEO_FLAGS, *FLAGS])
    assert message.startswith(f"align-train: MPO batch: video file {tmp_path / 'damaged.mp4'} cannot be decoded"), message


def test_a_max_length_that_cuts_video_tokens_stops_the_run_in_one_line(tiny_vlm, rows, tmp_path):
    """TRL cuts each sequence at --max_length (1024 by default), video tokens too: the model would refuse the
    batch in a traceback (fewer video tokens than features)."""
    message = refusal(["mpo", "--model", str(tiny_vlm), "--dataset", str(rows), "--output_dir", str(tmp_path / "out"),
                       "--max_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "40",
                       *VIDEO_FLAGS, *FLAGS])
    assert re.fullmatch(r"align-train: MPO batch: --max_length 40 cuts its prompts' video tokens \(\d+ of 200 left\): "
                        r"give a --max_length that holds them, or fewer video tokens \(--video_max_frames, "
                        r"--video_max_pixels, --video_total_pixels\)", message), message


def test_a_qwen2_5_vl_batch_carries_each_videos_rate(clips, tmp_path):
    """Qwen2.5-VL's positions read each video's timing: the preference collator gives the processor the rate each
    video's frames were sampled at (the 4 fps clip at the budget's 4 fps, the frame list read as 4 fps), as SFT
    and the server get it; the processor's own default would be 24 fps (1/12 s a temporal patch of 2 frames)."""
    model = build(tmp_path / "qwen2_5_vl", "qwen2_5_vl", seed=0)
    data = write_rows(tmp_path, [{"prompt": QUESTION, "video": str(clips / "right.mp4"), "chosen": "right",
                                  "rejected": "left"},
                                 {"prompt": QUESTION, "video": [str(clips / f"down{i}.png") for i in range(4)],
                                  "chosen": "down", "rejected": "up"}])
    trainer = mpo_trainer(model, data, tmp_path / "out")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    # chosen then rejected, each row's video once per copy: 2 frames a temporal patch at 4 fps, 0.5 s each
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([0.5] * 4)
