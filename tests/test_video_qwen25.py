"""Video on Qwen2.5-VL (tiny), whose M-RoPE spaces a video's frames by their timing: each video carries the
rate its frames were sampled at (`VideoRef.fps`), and the server's engines and the trainer's forward hand it
to the processor. Token-exact against transformers' own processor and model (positions the reference's:
runtime.mrope) on both engines, a wrong rate caught, a missing or bad one refused naming the field, and GRPO's
step-0 parity on video rows. One server per engine for the module."""

import json

import httpx
import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

from examples.tiny_model import build
from runtime import mrope
from tests.test_video import BUDGETS, CLIPS, Local, _frame, check_token_exact, serving
from tests.test_video_train import QUESTION, grpo, write_rows
from tests.utils import assert_rollouts_match, moving_dot
from trainer_client import AlignClient
from trainer_client.video import VideoBudget, VideoFrames, sample, write_video

# GRPO's rows, each video's rate another: (frames, the clip's own rate or None for a frame list, the rate its
# frames are sampled at under the run's 2 fps and 6 frames at most)
ROWS = ((8, 4.0, 2.0),  # every other frame
        (4, 1.0, 1.0),  # a slower clip: each of its frames, at its own rate
        (16, 4.0, 1.5),  # 8 frames at 2 fps thinned to 6: 1.5 fps (a fractional 1.33 s a temporal patch)
        (4, None, 2.0))  # frame images: read as sampled at the run's fps
RUN = ["--video_max_frames", "6", "--video_max_pixels", str(BUDGETS["videos_kwargs"]["max_pixels"])]


@pytest.fixture(scope="module")
def tiny_qwen25(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), "qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def local(tiny_qwen25) -> Local:
    return Local(tiny_qwen25)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen25-clips")
    out = []
    for i, (frames, rate, _) in enumerate(ROWS):
        clip = moving_dot(frames, ("left", "right", "up", "down")[i], size=(56, 56), seed=i)
        if rate is None:
            for k, frame in enumerate(clip):
                frame.save(root / f"clip{i}_{k}.png")
            video = [f"clip{i}_{k}.png" for k in range(frames)]
        else:
            write_video(root / f"clip{i}.mp4", clip, fps=rate)
            video = f"clip{i}.mp4"
        out.append({"problem": QUESTION, "video": video, "solution": "left"})
    return write_rows(root, out)


def test_each_video_carries_the_rate_it_was_sampled_at(rows):
    budget = VideoBudget(fps=2.0, max_frames=6)
    for (_, _, fps), row in zip(ROWS, [json.loads(line) for line in rows.read_text().splitlines()], strict=True):
        video = row["video"]
        video = [str(rows.parent / video)] if isinstance(video, str) else [str(rows.parent / f) for f in video]
        assert sample(video, budget).fps == pytest.approx(fps)


@pytest.fixture(scope="module")
def served(tiny_qwen25, log_dir):
    with serving(tiny_qwen25, "transformers", log_dir) as server:
        yield server


@pytest.fixture(scope="module")
def served_vllm(tiny_qwen25, log_dir):
    with serving(tiny_qwen25, "vllm", log_dir) as server:
        yield server


def _answer(server, local: Local, clip: list, fps: float) -> tuple[list[int], list[float]]:
    with AlignClient(server.url) as client:
        out = client.generate(prompt_ids=[local.ids()], videos=[[VideoFrames(clip, fps)]], temperature=0.0,
                              max_tokens=6)
    completion = out.results[0].completions[0]
    return completion.token_ids, completion.logprobs


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check_the_rate_is_read(server, local: Local) -> None:
    """The rate moves the positions, so the logprobs: the server's answer for a clip at 4 fps (0.5 s a temporal
    patch: a fractional interval) and at 1.5 fps is transformers' at that rate, and not at 2 fps (the tiny
    random model's logprobs move by 2e-4 to 3e-4 between them, 10x what the engines' own gap may be)."""
    clip = CLIPS[0]
    for fps in (4.0, 1.5):
        tokens, logprobs = _answer(server, local, clip, fps)
        right = _gap(logprobs, local.logprobs(local.inputs([clip], fps=fps), tokens))
        wrong = _gap(logprobs, local.logprobs(local.inputs([clip], fps=2.0), tokens))
        print(f"{fps} fps: max |logprob difference| {right:.2g} to transformers at that rate, {wrong:.2g} at 2 fps")
        assert right < 2e-5 and wrong > 1e-4, (fps, right, wrong)


def test_positions_are_the_references_and_transformers_own_still_differ(local):
    """8 frames of 112x84 at 2 fps: 4 temporal patches 4 positions apart (tokens_per_second 4, 1 s a patch)
    on a 3x4 grid, the text after at the highest position + 1. transformers 5.17's own places that text at
    the video's start + 4, inside the video's positions: when it no longer does, runtime.mrope goes."""
    inputs = local.inputs([CLIPS[0]])
    kwargs = {k: inputs[k] for k in ("mm_token_type_ids", "video_grid_thw", "second_per_grid_ts", "attention_mask")}
    assert inputs["second_per_grid_ts"].tolist() == [1.0]
    positions, _ = local.model.model.get_rope_index(inputs["input_ids"], **kwargs)
    video = (inputs["mm_token_type_ids"][0] == 2).nonzero()[:, 0]
    start, end = int(video[0]), int(video[-1]) + 1
    temporal = positions[0, 0, start:end].view(4, 12)
    assert (temporal - temporal[0, 0]).tolist() == [[4 * t] * 12 for t in range(4)]
    assert positions[0, 0, end] == positions[:, 0, start:end].max() + 1
    assert modeling_qwen2_5_vl.Qwen2_5_VLModel.get_rope_index is mrope.qwen2_5_vl_rope_index
    theirs, _ = mrope.REPLACED[modeling_qwen2_5_vl.Qwen2_5_VLModel](local.model.model, inputs["input_ids"], **kwargs)
    assert theirs[0, 0, end] == theirs[0, 0, start] + 4
    assert not torch.equal(theirs, positions)


def test_greedy_and_logprobs_on_video_equal_transformers(served, local):
    check_token_exact(served, local)
    check_the_rate_is_read(served, local)


def test_a_video_without_its_rate_is_refused_naming_the_field(served, local):
    video = {"frames": [_frame(f) for f in moving_dot(2, "left")]}
    r = httpx.post(f"{served.url}/v1/generate", json={"prompts": [{"prompt_ids": local.ids(), "videos": [video]}],
                                                       "sampling": {"max_tokens": 2}}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["detail"]["field"] == "prompts[0].videos[0].fps"
    assert "Qwen2.5-VL" in error["message"] and "frames per second" in error["message"], error["message"]
    for bad in (0, -2, 1e6):
        r = httpx.post(f"{served.url}/v1/generate", json={"prompts": [
            {"prompt_ids": local.ids(), "videos": [{**video, "fps": bad}]}], "sampling": {"max_tokens": 2}}, timeout=60)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"].startswith("prompts[0].videos[0].fps: "), r.json()


def check_parity(trainer) -> None:
    """The step-0 parity check passed, far inside the tolerance (measured: 1.8e-7 nats/token on the transformers
    engine), and every step's rollouts are the trainer's. A trainer's forward without the videos' rates
    (Qwen2.5-VL's default of 1 s a temporal patch) measured 1.5e-4 off: the tiny random model's near-uniform
    logits keep that under the check's own 0.02 tolerance and the IS ratio and K3 bounds, not under this."""
    print(trainer.parity.gap_line())
    assert trainer.parity.values["logprob_diff/mean"] < 1e-5, trainer.parity.gap_line()
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2


def test_server_grpo_on_video_rows_passes_the_step0_parity(tiny_qwen25, rows, tmp_path, served):
    trainer = grpo(tiny_qwen25, rows, tmp_path / "out", "--max_steps", "2", "--vllm-mode", "server",
                   "--server-url", served.url, *RUN)
    check_parity(trainer)


@pytest.mark.vllm
def test_vllm_greedy_and_logprobs_on_video_equal_transformers(served_vllm, local):
    check_token_exact(served_vllm, local)
    check_the_rate_is_read(served_vllm, local)


@pytest.mark.vllm
def test_vllm_server_grpo_on_video_rows_passes_the_step0_parity(tiny_qwen25, rows, tmp_path, served_vllm):
    trainer = grpo(tiny_qwen25, rows, tmp_path / "out", "--max_steps", "2", "--vllm-mode", "server",
                   "--server-url", served_vllm.url, *RUN)
    check_parity(trainer)
