"""Video prompts on the server (Qwen2-VL): token-exact against transformers' own processor and model, frames
sent once, every refusal a 4xx naming the field. One server per engine for the module, with a small video
budget in --mm-processor-kwargs (the processor's own names)."""

import base64
import contextlib
import json

import httpx
import pytest
import torch
from transformers import AutoModelForImageTextToText

from examples.tiny_model import build
from runtime import mrope
from runtime.image_tokens import ImageTokens, VideoShape, video_metadata
from runtime.torchvision_compat import load_processor
from server.engines.processing import ModelProcessing
from tests.utils import ServerProcess, moving_dot, png_bytes, random_image
from trainer_client import AlignClient
from trainer_client.video import VideoFrames

BUDGETS = {"videos_kwargs": {"min_pixels": 3136, "max_pixels": 12544, "max_frames": 8}}
SERVE = ["--mm-processor-kwargs", json.dumps(BUDGETS)]
QUESTION = "Which way does the dot move?"
FPS = 2.0  # the rate the test clips' frames were sampled at, as the trainer sends it (Qwen2-VL reads none)


class Local:
    """What the trainer holds: the model (its video positions the reference's, as the trainer's: runtime.mrope),
    its processor with the server's budgets, its token counts."""

    def __init__(self, path):
        mrope.install()
        self.processor = load_processor(path)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.tokens = ImageTokens(self.processor, self.model.config, BUDGETS)

    def text(self, videos: int = 1, images: int = 0) -> str:
        media = "<|vision_start|><|image_pad|><|vision_end|>" * images + "<|vision_start|><|video_pad|><|vision_end|>" * videos
        return f"<|im_start|>user\n{media}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"

    def ids(self, videos: int = 1, images: int = 0) -> list[int]:
        """A prompt as the client sends it: one marker per image and per video."""
        return self.tokenizer.encode(self.text(videos, images), add_special_tokens=False)

    def inputs(self, videos: list, images: list = (), fps: float = FPS) -> dict:
        """The processor's inputs for the same prompt: each video (its frames sampled at `fps`) expanded by the
        video processor."""
        return self.processor(text=[self.text(len(videos), len(images))], videos=videos or None,
                              video_metadata=[video_metadata(len(v), fps) for v in videos] or None,
                              images=list(images) or None, return_tensors="pt", add_special_tokens=False, **BUDGETS)

    def greedy(self, inputs: dict, n: int = 8) -> list[int]:
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False,
                                      suppress_tokens=self.tokens.never_sampled)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def logprobs(self, inputs: dict, completion: list[int]) -> list[float]:
        """The trainer's forward over prompt + completion: each completion token's logprob."""
        ids = torch.cat([inputs["input_ids"], torch.tensor([completion])], dim=1)
        kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        kwargs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(ids.tolist()))
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0].float()
            logits[:, self.tokens.never_sampled] = float("-inf")
            start = inputs["input_ids"].shape[1] - 1
            steps = logits[start:start + len(completion)].log_softmax(-1)
            return steps.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def local(tiny_vlm) -> Local:
    return Local(tiny_vlm)


@contextlib.contextmanager
def serving(path, engine: str, log_dir):
    server = ServerProcess(path, engine, log_dir=log_dir, extra=SERVE)
    try:
        yield server.wait_ready(600)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tiny_vlm, log_dir):
    with serving(tiny_vlm, "transformers", log_dir) as server:
        yield server


CLIPS = [moving_dot(8, "right", seed=0), moving_dot(5, "up", size=(84, 112), seed=1)]


def check_token_exact(server: ServerProcess, local: Local) -> None:
    """Greedy answers, prompt lengths and logprobs on video prompts equal transformers' own."""
    with AlignClient(server.url) as client:
        for clip in CLIPS:
            inputs = local.inputs([clip])
            expanded = inputs["input_ids"][0].tolist()
            shape = VideoShape(len(clip), *clip[0].size)
            assert local.tokens.expand(local.ids(), [], [shape]) == expanded
            out = client.generate(prompt_ids=[local.ids()], videos=[[VideoFrames(clip, FPS)]], temperature=0.0,
                                  max_tokens=8)
            result = out.results[0]
            assert result.prompt_ids == local.ids()
            assert result.prompt_tokens == len(expanded)
            completion = result.completions[0]
            assert completion.token_ids == local.greedy(inputs)
            assert completion.logprobs == pytest.approx(local.logprobs(inputs, completion.token_ids), abs=2e-4)
        # both clips (two shapes) in one request, batched by the engine: each answer still its own
        out = client.generate(prompt_ids=[local.ids()] * 2, videos=[[VideoFrames(clip, FPS)] for clip in CLIPS],
                              temperature=0.0, max_tokens=8)
        for clip, result in zip(CLIPS, out.results, strict=True):
            assert result.completions[0].token_ids == local.greedy(local.inputs([clip]))
        # an image and a video in one prompt: each expanded by its own processor
        image, clip = random_image(3), CLIPS[0]
        inputs = local.inputs([clip], [image])
        out = client.generate(prompt_ids=[local.ids(images=1)], images=[[image]], videos=[[VideoFrames(clip, FPS)]],
                              temperature=0.0, max_tokens=8)
        assert out.results[0].prompt_tokens == inputs["input_ids"].shape[1]
        assert out.results[0].completions[0].token_ids == local.greedy(inputs)


def test_video_tokens_are_the_video_processors(local):
    """Each temporal pair of frames (temporal_patch_size 2; an odd count repeats the last) at the budget's
    pixels: 8 frames of 112x84 are 4 x (112/28 * 84/28) = 48 tokens, 5 frames of 84x112 are 3 x 12 = 36."""
    video_pad = local.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for clip, tokens in zip(CLIPS, (48, 36), strict=True):
        expanded = local.inputs([clip])["input_ids"][0].tolist()
        assert expanded.count(video_pad) == tokens
        assert local.tokens.expand(local.ids(), [], [VideoShape(len(clip), *clip[0].size)]) == expanded


def test_budgets_are_the_processors_and_half_a_pixel_budget_is_completed(tiny_vlm, local):
    """What /v1/info reports is what the video processor applies: the flag's flat keys, then videos_kwargs."""
    flat = {"min_pixels": 3136, "max_pixels": 6272, "videos_kwargs": {"max_frames": 4}}
    processing = ModelProcessing(str(tiny_vlm), mm_processor_kwargs=flat)
    assert processing.video_refusal() is None
    budgets = processing.images.video_budgets()
    assert (budgets["min_pixels"], budgets["max_pixels"], budgets["max_frames"]) == (3136, 6272, 4)
    clip = CLIPS[0][:4]
    scoped = {"videos_kwargs": {"min_pixels": 3136, "max_pixels": 6272}}
    grid = local.processor(text=["<|video_pad|>"], videos=[clip], return_tensors="pt", **scoped)["video_grid_thw"]
    shape = VideoShape(len(clip), *clip[0].size)
    assert len(processing.images.video_span(shape).core) == int(grid.prod()) // 4
    # one of min_pixels/max_pixels alone (which the processor would ignore) gets the processor's own other
    own = local.processor.video_processor.size
    half = ModelProcessing(str(tiny_vlm), mm_processor_kwargs={"videos_kwargs": {"max_pixels": 6272}})
    assert half.video_refusal() is None
    assert half.mm_kwargs["videos_kwargs"] == {"min_pixels": own.shortest_edge, "max_pixels": 6272}
    grid = local.processor(text=["<|video_pad|>"], videos=[clip], return_tensors="pt",
                           **half.mm_kwargs)["video_grid_thw"]
    assert len(half.images.video_span(shape).core) == int(grid.prod()) // 4
    # a one-edge size is the user's own spelling: refused rather than guessed
    refusal = ModelProcessing(str(tiny_vlm), mm_processor_kwargs={"videos_kwargs": {"size": {"longest_edge": 12544}}}
                              ).video_refusal()
    assert refusal.startswith("--mm-processor-kwargs gives video frames size.longest_edge alone"), refusal


def test_info_reports_the_video_budgets(served, local):
    with AlignClient(served.url) as client:
        info = client.info()
    assert info.video_token_id == local.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert info.limits.max_videos_per_prompt == 1
    budgets = info.video_budgets
    assert (budgets.max_frames, budgets.min_pixels, budgets.max_pixels) == (8, 3136, 12544)
    # the rest as the processor's own config has them
    video_processor = local.processor.video_processor
    assert budgets.fps == video_processor.fps
    assert budgets.max_video_tokens == video_processor.max_video_tokens


def test_greedy_and_logprobs_on_video_equal_transformers(served, local):
    check_token_exact(served, local)


def _generate_bodies(client: AlignClient) -> list[bytes]:
    """The bodies of every generate request the client sends from now on."""
    bodies = []

    def record(request: httpx.Request) -> None:
        if request.url.path.endswith("/generate"):
            bodies.append(request.read())

    client._http[0].event_hooks["request"].append(record)
    return bodies


def _cached_images(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    return float(next(line for line in text.splitlines() if line.startswith("align_image_cache_images ")).split()[-1])


def test_frames_cross_the_wire_once(served, local):
    clip = moving_dot(8, "down", seed=7)
    frame_bytes = sum(len(png_bytes(frame)) for frame in clip)
    before = _cached_images(served)
    with AlignClient(served.url) as client:
        bodies = _generate_bodies(client)
        first = client.generate(prompt_ids=[local.ids()], videos=[[clip]], temperature=0.0, max_tokens=4)
        after_first = _cached_images(served)
        second = client.generate(prompt_ids=[local.ids()], videos=[[clip]], temperature=0.0, max_tokens=4)
    assert after_first - before == len(clip)  # each frame decoded into the cache once
    assert _cached_images(served) == after_first  # the second request sent none
    assert len(bodies[0]) > frame_bytes  # base64 of every frame's PNG
    assert b'"data"' not in bodies[1] and len(bodies[1]) < 2000  # the 8 frames by hash alone
    assert second.results[0].completions[0].token_ids == first.results[0].completions[0].token_ids
    print(f"video bytes: first request {len(bodies[0])}, second {len(bodies[1])} ({len(clip)} frames, "
          f"{frame_bytes} bytes of PNG)")


def test_the_benchs_second_step_sends_under_one_percent_of_the_first(served, tiny_vlm):
    """bench/video_bytes.py's measure: a GRPO step's frames cross the wire once; the next step with the same
    clip sends their hashes alone."""
    from bench.video_bytes import step_bytes, video_prompt_ids

    clip = moving_dot(8, "right", seed=0)
    first, second = step_bytes(served.url, video_prompt_ids(tiny_vlm), clip, n=4)
    assert first > sum(len(png_bytes(f)) for f in clip)  # every frame's PNG went, base64 inline
    assert second < 0.01 * first, (first, second)


def _post(server: ServerProcess, prompt: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generate", json={"prompts": [prompt], "sampling": {"max_tokens": 2}},
                      timeout=60)


def _frame(image) -> dict:
    return {"data": base64.b64encode(png_bytes(image)).decode()}


def _refused(response: httpx.Response, field: str, *words: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["detail"]["field"] == field
    for word in words:
        assert word in error["message"], error["message"]
    return error["message"]


def test_too_many_frames_are_refused_naming_the_budget(served, local):
    clip = moving_dot(9, "left")
    r = _post(served, {"prompt_ids": local.ids(), "videos": [{"frames": [_frame(f) for f in clip]}]})
    _refused(r, "prompts[0].videos[0].frames", "9 frames", "up to 8", "max_frames")
    assert r.json()["error"]["detail"]["limit"] == 8


def test_too_many_videos_are_refused_naming_the_flag(served, local):
    video = {"frames": [_frame(f) for f in moving_dot(2, "left")]}
    r = _post(served, {"prompt_ids": local.ids(videos=2), "videos": [video, video]})
    _refused(r, "prompts[0].videos", "2 videos", "up to 1", "--max-videos-per-prompt")


def test_bad_frames_are_refused_naming_the_frame(served, local):
    clip = moving_dot(4, "left")
    frames = [_frame(f) for f in clip]
    junk = {"data": "bm90IGFuIGltYWdl"}  # base64 of "not an image"
    r = _post(served, {"prompt_ids": local.ids(), "videos": [{"frames": [*frames[:2], junk, frames[3]]}]})
    _refused(r, "prompts[0].videos[0].frames[2]", "not a decodable image")
    odd = _frame(clip[3].resize((56, 56)))
    r = _post(served, {"prompt_ids": local.ids(), "videos": [{"frames": [*frames[:3], odd]}]})
    _refused(r, "prompts[0].videos[0].frames[3]", "56x56", "112x84", "one size")
    unknown = {"sha256": "0" * 64}
    r = _post(served, {"prompt_ids": local.ids(), "videos": [{"frames": [frames[0], unknown]}]})
    _refused(r, "prompts[0].videos[0].frames[1]", "holds no image")
    r = _post(served, {"prompt_ids": local.ids(), "videos": [{"frames": []}]})
    assert r.status_code == 422, r.text  # the wire's own bounds: pydantic's refusal, named
    assert r.json()["error"]["message"].startswith("prompts[0].videos[0].frames: ")


def test_video_markers_must_match_the_videos(served, local):
    video = {"frames": [_frame(f) for f in moving_dot(2, "left")]}
    r = _post(served, {"prompt_ids": local.ids(videos=0), "videos": [video]})
    _refused(r, "prompts[0].prompt_ids", "0 video placeholder", "1 videos")
    r = _post(served, {"prompt_ids": local.ids(videos=1)})
    _refused(r, "prompts[0].prompt_ids", "1 video placeholder", "0 videos")
    r = _post(served, {"messages": [{"role": "user", "content": QUESTION}], "videos": [video]})
    _refused(r, "prompts[0].videos", "prompt_ids", "messages take no video")


def test_a_family_without_video_refuses_it_in_one_line(tmp_path_factory, log_dir):
    path = build(tmp_path_factory.mktemp("tiny_qwen3_vl"), "qwen3_vl", seed=0)
    local = Local(path)
    with serving(path, "transformers", log_dir) as server:
        with AlignClient(server.url) as client:
            info = client.info()
        assert info.video_token_id is None and info.video_budgets is None
        assert info.limits.max_videos_per_prompt == 0
        video = {"frames": [_frame(f) for f in moving_dot(2, "left")]}
        r = _post(server, {"prompt_ids": local.ids(), "videos": [video]})
        _refused(r, "prompts[0].videos", "Qwen3-VL is served without video", "Qwen2-VL, Qwen2.5-VL")


def test_a_text_only_model_refuses_video(tiny_text, log_dir, local):
    with serving(tiny_text, "transformers", log_dir) as server:
        video = {"frames": [_frame(f) for f in moving_dot(2, "left")]}
        r = _post(server, {"prompt_ids": local.ids(), "videos": [video]})
        _refused(r, "prompts[0].videos", "text-only")


@pytest.mark.vllm
def test_vllm_greedy_and_logprobs_on_video_equal_transformers(tiny_vlm, log_dir, local):
    with serving(tiny_vlm, "vllm", log_dir) as server:
        with AlignClient(server.url) as client:
            info = client.info()
        assert info.limits.max_videos_per_prompt == 1 and info.video_budgets.max_frames == 8
        check_token_exact(server, local)
