"""GRPO/GSPO on video rows (tiny Qwen2-VL): the trainer samples each clip once, the server gets its frames
once and then their hashes, and every step's rollouts are the trainer's own model token for token (the
IS ratio asserted, not only logged). Mixed batches (video files, frame lists, an image row, a text row),
server mode on both engines (sync and async) and none mode; the budgets' mismatch, a corrupt clip and a
model without video refused in one line."""

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from examples.tiny_model import build
from runtime.image_tokens import ImageTokens, VideoShape
from runtime.torchvision_compat import load_processor
from tests.test_train import changed, weights
from tests.utils import ServerProcess, assert_rollouts_match, moving_dot, random_image
from trainer_client.cli import run
from trainer_client.video import VideoBudget, VideoError, probe, sample, write_video
from trainer_client.video_training import video_frames_in

# The server's video budget (and so the trainer's): small frames keep the runs short.
BUDGETS = {"videos_kwargs": {"min_pixels": 784, "max_pixels": 3136}}
SERVE = ["--mm-processor-kwargs", json.dumps(BUDGETS)]
QUESTION = "Which way does the dot move?"
DIRECTIONS = ("left", "right", "up", "down")


def parity_reward(completion_ids, **kwargs) -> list[float]:
    return [float(ids[0] % 2) for ids in completion_ids]


def write_rows(root: Path, rows: list[dict], name: str = "grpo.jsonl") -> Path:
    path = root / name
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Four rows: two mp4 clips, one clip as frame images, one image row with no video; and the frames each
    video gives at the run's budget (2 fps: 4 of the mp4s' 8 frames at 4 fps, all 4 of the frame list)."""
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i, direction in enumerate(DIRECTIONS[:3]):
        frames = moving_dot(8 if i < 2 else 4, direction, size=(56, 56), seed=i)
        if i < 2:
            write_video(root / f"clip{i}.mp4", frames, fps=4)
            video = f"clip{i}.mp4"
        else:
            for k, frame in enumerate(frames):
                frame.save(root / f"clip{i}_{k}.png")
            video = [f"clip{i}_{k}.png" for k in range(len(frames))]
        rows.append({"problem": QUESTION, "video": video, "solution": direction})
    random_image(5, 56).save(root / "still.png")
    rows.append({"problem": "What colour is it?", "video": None, "image": "still.png", "solution": "red"})
    for row in rows[:3]:
        row["image"] = None
    write_rows(root, rows)
    return root


def damaged_clip(path: Path) -> Path:
    """An mp4 whose container opens (the start-up check passes it) but whose coded frames are zeroed."""
    write_video(path, moving_dot(8, "down", size=(56, 56), seed=9), fps=4)
    data = bytearray(path.read_bytes())
    mdat = data.find(b"mdat") + 4
    data[mdat:mdat + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    return path


def grpo(model, dataset, out, *flags, method="grpo"):
    return run([method, "--model", str(model), "--dataset", str(dataset), "--output_dir", str(out),
                "--per_device_train_batch_size", "8", "--num_generations", "2", "--max_completion_length", "4",
                "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
                "--seed", "0", "--reward_funcs", "tests.test_video_train:parity_reward", *flags])


def received(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("align_images_received ", "align_image_bytes_received "))}


@pytest.fixture(scope="module")
def served(tiny_vlm, log_dir):
    server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir, extra=SERVE)
    try:
        yield server.wait_ready(600)
    finally:
        server.stop()


# ---- the trainer's frames --------------------------------------------------------------------------

def test_a_clip_is_sampled_at_the_budgets_fps_and_sized_within_its_pixels(tmp_path):
    frames = moving_dot(8, "right", size=(176, 84), seed=3)  # 6 pixels a frame
    write_video(tmp_path / "c.mp4", frames, fps=4)  # 2 s
    two_fps = sample([str(tmp_path / "c.mp4")], VideoBudget(fps=2))
    assert len(two_fps) == 4 and two_fps[0].size == (176, 84)
    # every other frame of the clip (t = 0, 0.5, 1, 1.5 s), each nearest its original
    def nearest(frame) -> int:
        pixels = np.asarray(frame, dtype=np.float32)
        return int(np.argmin([np.abs(pixels - np.asarray(f, dtype=np.float32)).mean() for f in frames]))

    assert [nearest(f) for f in two_fps] == [0, 2, 4, 6]
    thinned = sample([str(tmp_path / "c.mp4")], VideoBudget(fps=4, max_frames=5))
    assert len(thinned) == 5
    capped = sample([str(tmp_path / "c.mp4")], VideoBudget(fps=4, max_pixels=2000, min_pixels=100, total_pixels=8 * 1000))
    assert len(capped) == 8 and capped[0].width * capped[0].height <= 1000
    assert probe([str(tmp_path / "c.mp4")], VideoBudget(fps=2), "row 1") == 4


def test_an_unreadable_clip_is_named_with_its_row(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    with pytest.raises(VideoError, match=r"row 7: video file .*bad.mp4 cannot be read"):
        probe([str(bad)], VideoBudget(), "row 7")


def test_video_markers_unexpand_to_one_per_video(tiny_vlm):
    processor = load_processor(tiny_vlm)
    tokens = ImageTokens(processor, __import__("transformers").AutoConfig.from_pretrained(tiny_vlm), BUDGETS)
    clip, image = moving_dot(4, "up", size=(56, 56)), random_image(1, 56)
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
            f"{QUESTION}<|im_end|>\n")
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    expanded = processor(text=[text], images=[image], videos=[clip], add_special_tokens=False, **BUDGETS)["input_ids"][0]
    shape = VideoShape(len(clip), *clip[0].size)
    assert tokens.expand(ids, [image.size], [shape]) == list(expanded)
    assert tokens.unexpand(list(expanded), [image.size], [shape]) == ids


# ---- training on video rows ------------------------------------------------------------------------

@pytest.mark.parametrize("rollouts", ["sync", "async"])
def test_server_grpo_on_video_rows_is_token_exact_and_sends_each_frame_once(rollouts, tiny_vlm, clips, tmp_path,
                                                                            served):
    before = received(served)
    flags = ["--async_rollouts", "true"] if rollouts == "async" else []
    trainer = grpo(tiny_vlm, clips / "grpo.jsonl", tmp_path / "out", "--max_steps", "3", "--vllm-mode", "server",
                   "--server-url", served.url, *flags)
    checked = assert_rollouts_match(trainer.state.log_history)
    assert len(checked) >= (1 if rollouts == "async" else 3)  # async: steps whose samples were all stale are left out
    # every row in every step (4 prompts a step), so each clip was asked for three times: its frames
    # crossed the wire the first time only (4 sampled frames per clip, and the image row's image)
    after = received(served)
    assert after["align_images_received"] - before["align_images_received"] == 3 * 4 + 1
    logged = [e for e in trainer.state.log_history if "video/skipped_rows" in e]
    assert logged and all(e["video/skipped_rows"] == 0 for e in logged)
    if rollouts == "async":
        assert sum(e.get("async/prefetch_hits", 0) for e in trainer.state.log_history) >= 1


def test_gspo_in_none_mode_trains_the_vision_tower_on_video_rows(tiny_vlm, clips, tmp_path):
    """Only the clips show the vision tower anything (the image row is dropped): its weights move only if
    the forward saw them."""
    rows = [json.loads(line) for line in (clips / "grpo.jsonl").read_text().splitlines()][:3]
    for row in rows:
        row.pop("image")
        video = row["video"]
        row["video"] = str(clips / video) if isinstance(video, str) else [str(clips / f) for f in video]
    dataset = write_rows(tmp_path, rows)
    trainer = grpo(tiny_vlm, dataset, tmp_path / "out", "--max_steps", "1", "--per_device_train_batch_size", "12",
                   "--num_generations", "4", "--steps_per_generation", "1", "--vllm-mode", "none", method="gspo")
    assert trainer.state.global_step == 1
    moved = changed(weights(tiny_vlm), weights(tmp_path / "out"))
    assert any(name.startswith(("visual.", "model.visual.")) for name in moved), moved[:5]


def test_a_budget_unlike_the_servers_is_refused_naming_both(tiny_vlm, clips, tmp_path, served):
    with pytest.raises(SystemExit, match=r"--video_max_pixels 12544 but http://127\.0\.0\.1:\d+ sizes video frames "
                                         r"to max_pixels 3136"):
        grpo(tiny_vlm, clips / "grpo.jsonl", tmp_path / "out", "--max_steps", "1", "--vllm-mode", "server",
             "--server-url", served.url, "--video_max_pixels", "12544")
    with pytest.raises(SystemExit, match=r"--video_max_frames 100000 but .* takes up to max_frames 768"):
        grpo(tiny_vlm, clips / "grpo.jsonl", tmp_path / "out", "--max_steps", "1", "--vllm-mode", "server",
             "--server-url", served.url, "--video_max_frames", "100000")


def test_a_corrupt_clip_stops_the_run_at_the_data_check(tiny_vlm, clips, tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    rows = [{"problem": QUESTION, "video": str(clips / "clip0.mp4"), "solution": "left"},
            {"problem": QUESTION, "video": "broken.mp4", "solution": "up"}]
    with pytest.raises(SystemExit, match=r"bad dataset, nothing trained: .*grpo.jsonl row 2: video file "
                                         r".*broken.mp4 cannot be read"):
        grpo(tiny_vlm, write_rows(tmp_path, rows), tmp_path / "out", "--max_steps", "1", "--vllm-mode", "none")


def test_a_clip_unreadable_mid_run_skips_its_row(tiny_vlm, clips, tmp_path):
    """Opened by the start-up check, but its frames cannot be decoded: the row is skipped and counted, the
    run goes on."""
    damaged_clip(tmp_path / "damaged.mp4")
    rows = [{"problem": QUESTION, "video": str(clips / "clip0.mp4"), "solution": "left"},
            {"problem": QUESTION, "video": str(tmp_path / "damaged.mp4"), "solution": "down"}]
    trainer = grpo(tiny_vlm, write_rows(tmp_path, rows), tmp_path / "out", "--max_steps", "1",
                   "--per_device_train_batch_size", "4", "--vllm-mode", "none")
    skipped = [e["video/skipped_rows"] for e in trainer.state.log_history if "video/skipped_rows" in e]
    assert skipped == [1.0]
    # a batch of that row alone (one prompt a step, as with per_device_train_batch_size == num_generations)
    # trains its prompt without the video: skipped and counted, the run goes on
    trainer = grpo(tiny_vlm, write_rows(tmp_path, rows[1:], "damaged.jsonl"), tmp_path / "alone", "--max_steps", "1",
                   "--per_device_train_batch_size", "2", "--vllm-mode", "none")
    assert [e["video/skipped_rows"] for e in trainer.state.log_history if "video/skipped_rows" in e] == [1.0]


def test_a_batch_read_ahead_is_decoded_once_and_its_skips_counted_once(clips, tmp_path, monkeypatch, caplog):
    """Async rollouts read a batch ahead (its frames go to the server then) and TRL builds the same batch again
    later: its clips are decoded the first time only, and a row skipped for a damaged clip is warned about and
    counted once, for the batch TRL trains on."""
    from trainer_client import video_training

    damaged = damaged_clip(tmp_path / "damaged.mp4")
    decoded = []
    monkeypatch.setattr(video_training, "sample", lambda v, *a: decoded.append(v[0]) or sample(v, *a))

    class Trainer(video_training.VideoTraining):  # TRL's metric store, as GRPOTrainer keeps it
        model, metrics = type("Model", (), {"training": True})(), []
        video_budget = VideoBudget(fps=2.0, max_frames=8, min_pixels=784, max_pixels=3136)

        def _log_metric(self, name, value):
            self.metrics.append((name, value))

    prompt = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    rows = [{"prompt": prompt, "videos": [[str(path)]], "dataset_row": i}
            for i, path in enumerate([clips / "clip0.mp4", clips / "clip1.mp4", damaged])]
    trainer = Trainer()
    with caplog.at_level("WARNING", logger="trainer_client.video_training"):
        ahead, _ = trainer.rows_with_frames(rows, read_ahead=True)
        assert not trainer.metrics and "skipped" not in caplog.text
        built, videos = trainer.rows_with_frames([r for r in rows for _ in range(2)])  # TRL's, num_generations 2
    assert sorted(decoded) == sorted(map(str, [clips / "clip0.mp4", clips / "clip1.mp4", damaged]))
    assert [v[0] for v in videos] == [v for row in ahead for v in [video_frames_in(row["prompt"])[0]] * 2]
    assert trainer.metrics == [("video/skipped_rows", 1.0)] and caplog.text.count("row skipped") == 1
    trainer.rows_with_frames(rows[:1])  # a later batch with the same clip decodes it anew (nothing kept)
    assert decoded.count(str(clips / "clip0.mp4")) == 2


def test_video_rows_for_a_model_without_video_are_refused(tmp_path_factory, clips, tmp_path):
    qwen3 = build(tmp_path_factory.mktemp("qwen3_vl"), "qwen3_vl", seed=0)
    with pytest.raises(SystemExit, match=r"the dataset has 3 video row\(s\) but --model .* takes none: Qwen3-VL "
                                         r"trains without video here"):
        grpo(qwen3, clips / "grpo.jsonl", tmp_path / "out", "--max_steps", "1", "--vllm-mode", "none")


@pytest.mark.vllm
def test_vllm_server_grpo_on_video_rows_is_token_exact(tiny_vlm, clips, tmp_path, vllm_vlm):
    """The suite's vLLM server (the model's own video budget: each 56x56 frame scaled up to min_pixels)."""
    from tests.test_weights import KEY

    trainer = grpo(tiny_vlm, clips / "grpo.jsonl", tmp_path / "out", "--max_steps", "2", "--vllm-mode", "server",
                   "--server-url", vllm_vlm.url, "--api_key", KEY)
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2


@pytest.mark.vllm
def test_colocate_grpo_on_video_rows_is_token_exact(tiny_vlm, clips, tmp_path):
    """TRL's colocated vLLM gets each prompt's frames and the run's frame budget (3136 pixels, as the server's
    above: 56x56 frames stay as they are)."""
    trainer = grpo(tiny_vlm, clips / "grpo.jsonl", tmp_path / "out", "--max_steps", "2", "--vllm-mode", "colocate",
                   "--video_max_pixels", "3136", "--vllm_max_model_length", "512", "--vllm_enable_sleep_mode", "false")
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2
    llm = trainer.vllm_generation.llm
    assert llm.llm_engine.vllm_config.model_config.multimodal_config.mm_processor_kwargs == {
        "videos_kwargs": {"min_pixels": 3136, "max_pixels": 3136}}


# ---- a tool that returns a video -------------------------------------------------------------------
REPLAY_QUESTION = "Replay the clip: which way does the dot move?"
REPLAY_CALL = '<tool_call>\n{"name": "replay", "arguments": {"start": 0, "end": 1}}\n</tool_call>'


def replay(start: float, end: float) -> list:
    """Replay the clip between two times

    Args:
        start: the first second
        end: the last second
    """
    return [{"type": "video", "video": moving_dot(6, "left", size=(56, 56), seed=11)},
            {"type": "text", "text": f"replayed {start}-{end} s"}]


def build_replay_model(out: Path) -> Path:
    """A tiny Qwen2-VL with a tool-calling chat template (Qwen3-VL's, which renders video parts as Qwen2-VL's
    own) taught to answer REPLAY_QUESTION by calling `replay`, with the test's small frame budget."""
    from transformers import AutoModelForImageTextToText

    from examples.tiny_models.qwen import TOOLS_CHAT_TEMPLATE, TOOLS_RESPONSE_TEMPLATE
    from tests.tool_model import fit

    build(out, "qwen2_vl", seed=0)
    processor = load_processor(out)
    processor.chat_template = processor.tokenizer.chat_template = TOOLS_CHAT_TEMPLATE
    processor.tokenizer.response_template = TOOLS_RESPONSE_TEMPLATE
    vp = processor.video_processor
    vp.size = type(vp.size)(shortest_edge=784, longest_edge=3136)
    processor.save_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    question = [{"role": "user", "content": [{"type": "text", "text": REPLAY_QUESTION}]}]
    prompt = processor.apply_chat_template(question, tools=[replay], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    inputs = processor.apply_chat_template([*question, {"role": "assistant", "content": REPLAY_CALL}], tools=[replay],
                                           tokenize=True, return_dict=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :prompt["input_ids"].shape[1]] = -100
    loss = fit(model, inputs, labels, 400, stop_below=0.01)
    assert loss < 0.05, loss
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def replay_model(tmp_path_factory) -> Path:
    return build_replay_model(tmp_path_factory.mktemp("replay_qwen2_vl"))


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_a_tool_that_returns_a_video_is_seen_by_the_next_turn_token_exact(engine, replay_model, tmp_path, log_dir):
    model = replay_model
    # a text row: the only video is the one the tool returns (the run's budget comes from the server)
    dataset = write_rows(tmp_path, [{"problem": REPLAY_QUESTION, "solution": "left"}])
    server = ServerProcess(model, engine, log_dir=log_dir, extra=SERVE).wait_ready(600)
    try:
        trainer = grpo(model, dataset, tmp_path / "out", "--max_steps", "1", "--per_device_train_batch_size", "2",
                       "--max_completion_length", "160", "--temperature", "0.1", "--tools",
                       "tests.test_video_train:replay",
                       "--vllm-mode", "server", "--server-url", server.url)
        sent = received(server)["align_images_received"]
    finally:
        server.stop()
    step = next(e for e in trainer.state.log_history if "loss" in e)
    assert step["tools/calls_per_sample"] >= 1 and step["tools/failure_frequency"] == 0
    assert_rollouts_match(trainer.state.log_history)  # the turn after the tool's video: the trainer's logprobs
    # the tool's 6 frames: once per trajectory at most (the group's two run at once, so each may inline them
    # before the other's answer says the server holds them); any later turn names them by hash
    assert sent in (6, 12)


def test_a_hub_video_dataset_trains_by_id_from_the_offline_cache(tiny_vlm, tmp_path):
    """A video dataset as the hub holds one (docs/video.md): parquet rows under data/ naming clips under
    videos/ by paths relative to the repo, read from the Hugging Face cache offline by its id."""
    from datasets import Dataset

    from tests.test_hub import REPO, _cli, offline
    from tests.utils import cache_as_hub

    repo = tmp_path / "dots"
    (repo / "videos").mkdir(parents=True)
    (repo / "data").mkdir()
    rows = []
    for i, direction in enumerate(DIRECTIONS):
        write_video(repo / "videos" / f"{i:04d}.mp4", moving_dot(8, direction, size=(56, 56), seed=i), fps=4)
        rows.append({"video": f"videos/{i:04d}.mp4", "problem": QUESTION, "solution": direction})
    Dataset.from_list(rows).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    home = tmp_path / "hf_home"
    cache_as_hub(tiny_vlm, home, REPO)
    cache_as_hub(repo, home, "tiny-org/dots", "dataset")
    run = _cli("trainer_client.cli", "grpo", "--model_name_or_path", REPO, "--dataset_name", "tiny-org/dots",
               "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--num_generations", "2",
               "--max_completion_length", "4", "--max_steps", "1", "--video_max_pixels", "3136", "--report_to", "none",
               "--disable_tqdm", "true", "--vllm-mode", "none", env=offline(home))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 steps, model saved to" in run.stdout or "1 step, model saved to" in run.stdout, run.stdout[-2000:]
