"""server/generation.py on its own: a request's prompts into engine prompts (every 4xx before a
generation starts), and the engine call. A real transformers engine on the tiny VLM, in this process."""

import asyncio
import base64

import pytest
from starlette.datastructures import State

from protocol import ErrorCode, GeneratePrompt, SamplingParams, image_sha256
from server.config import ServeConfig
from server.engines.transformers import TransformersEngine
from server.errors import APIError
from server.generation import decode_inline, execute, prepare, prompt_images, to_engine_prompt
from server.images import ImageCache
from server.metrics import Metrics
from tests.utils import png_bytes, random_image

SAMPLING = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _engine(loop, model_dir) -> TransformersEngine:
    engine = TransformersEngine(model=str(model_dir))
    loop.run_until_complete(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine(loop, tiny_vlm):
    engine = _engine(loop, tiny_vlm)
    yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def text_engine(loop, tiny_text):
    engine = _engine(loop, tiny_text)
    yield engine
    loop.run_until_complete(engine.shutdown())


def _state(engine, **config) -> State:
    state = State()
    state.engine, state.config = engine, ServeConfig(model_name="tiny", **config)
    state.images, state.metrics = ImageCache(64 * 1024**2), Metrics()
    return state


def _refusal(call) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    return info.value


def _ids(engine, text: str = "What colour?", images: int = 1) -> list[int]:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return engine.processing.chat_prompt_ids([{"role": "user", "content": content}])


def test_prompt_ids_with_one_placeholder_per_image_become_the_engine_prompt(engine):
    img = random_image(1)
    ids = _ids(engine, images=1)
    ep = to_engine_prompt(engine, GeneratePrompt(prompt_ids=ids, images=[{"data": "eA=="}]), 0, SAMPLING, [img], None)
    assert ep.prompt_ids == ids and ep.images == [img]
    # the image's placeholder counts as the tokens it expands to: the processor's own expansion
    processor = engine.processing.processor
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What colour?"}]}],
                                         add_generation_prompt=True)
    assert engine.prompt_len(ep) == len(processor(text=[text], images=[img])["input_ids"][0]) > len(ids)


def test_messages_are_rendered_by_the_given_template(engine):
    img = random_image(2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = GeneratePrompt(messages=messages, images=[{"data": "eA=="}])
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|image_pad|>{% endfor %}"
    ep = to_engine_prompt(engine, prompt, 0, SAMPLING, [img], template)
    assert ep.prompt_ids == engine.processing.tokenizer.encode("<|im_start|>user\n<|image_pad|>")
    assert to_engine_prompt(engine, prompt, 0, SAMPLING, [img], None).prompt_ids == _ids(engine, "hi")
    err = _refusal(lambda: to_engine_prompt(engine, prompt, 3, SAMPLING, [img, img], None))
    assert (err.status, err.detail) == (400, {"field": "prompts[3].images"})
    assert "1 image parts but 2 images" in err.message


def test_placeholders_must_match_the_images(engine):
    ids = _ids(engine, images=2)
    prompt = GeneratePrompt(prompt_ids=ids, images=[{"data": "eA=="}])
    err = _refusal(lambda: to_engine_prompt(engine, prompt, 1, SAMPLING, [random_image(3)], None))
    assert (err.status, err.code, err.detail) == (400, ErrorCode.invalid_request, {"field": "prompts[1].prompt_ids"})
    assert f"2 image placeholder tokens (id {engine.image_token_id}) but 1 images" in err.message


def test_a_video_marker_without_its_video_is_refused_naming_the_count(engine):
    # Qwen2-VL takes video: its <|video_pad|> is a video's marker (tests/test_video.py), not an expansion token
    video = engine.processing.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    prompt = GeneratePrompt(prompt_ids=[1, video, 2])
    err = _refusal(lambda: to_engine_prompt(engine, prompt, 4, SAMPLING, [], None))
    assert (err.status, err.detail) == (400, {"field": "prompts[4].prompt_ids"})
    assert f"1 video placeholder tokens (id {video}) but 0 videos" in err.message


def test_a_token_outside_the_vocabulary_is_named(engine):
    vocab = len(engine.processing.tokenizer)
    err = _refusal(lambda: to_engine_prompt(engine, GeneratePrompt(prompt_ids=[1, vocab]), 0, SAMPLING, [], None))
    assert err.message == f"prompts[0].prompt_ids holds token id {vocab}, outside the vocabulary [0, {vocab})"


def test_a_prompt_past_max_model_len_is_refused_with_its_numbers(engine):
    ids = [1] * (engine.max_model_len - 3)
    sampling = SamplingParams(max_tokens=4)
    err = _refusal(lambda: to_engine_prompt(engine, GeneratePrompt(prompt_ids=ids), 2, sampling, [], None))
    assert (err.status, err.code) == (400, ErrorCode.context_length)
    assert err.detail == {"field": "prompts[2]", "prompt_tokens": len(ids), "max_tokens": 4,
                          "max_model_len": engine.max_model_len}
    fits = to_engine_prompt(engine, GeneratePrompt(prompt_ids=ids), 2, SamplingParams(max_tokens=3), [], None)
    assert fits.prompt_ids == ids


def test_prompt_images_come_from_inline_data_or_the_cache(engine):
    cache = ImageCache(64 * 1024**2)
    cached, inline = random_image(4), random_image(5)
    sha = image_sha256(b"cached")
    cache.put(sha, cached)
    prompt = GeneratePrompt(prompt_ids=[1], images=[{"sha256": sha}, {"data": "eA=="}])
    assert prompt_images(prompt, 0, {"prompts[0].images[1]": inline}, cache, 8, text_only=False) == [cached, inline]

    missing = GeneratePrompt(prompt_ids=[1], images=[{"sha256": "0" * 64}])
    err = _refusal(lambda: prompt_images(missing, 2, {}, cache, 8, text_only=False))
    assert (err.status, err.code) == (400, ErrorCode.unknown_image)
    assert err.detail == {"field": "prompts[2].images[0]", "sha256": "0" * 64}
    assert f"PUT it to /v1/images/{'0' * 64} first" in err.message

    err = _refusal(lambda: prompt_images(prompt, 0, {}, cache, 1, text_only=False))
    assert err.detail == {"field": "prompts[0].images", "limit": 1}
    # a text-only model says so first, whatever the images are
    err = _refusal(lambda: prompt_images(missing, 0, {}, cache, 8, text_only=True))
    assert (err.code, err.message) == (ErrorCode.invalid_request, "prompts[0].images: the served model is text-only")


def test_inline_images_are_decoded_into_the_cache_and_bad_ones_named(engine):
    cache, config = ImageCache(64 * 1024**2), ServeConfig(model_name="tiny")
    data = png_bytes(random_image(6))
    good = GeneratePrompt(prompt_ids=[1], images=[{"data": base64.b64encode(data).decode()}])
    out = decode_inline([GeneratePrompt(prompt_ids=[1]), good], cache, config)
    assert list(out) == ["prompts[1].images[0]"] and out["prompts[1].images[0]"].size == (64, 64)
    assert image_sha256(data) in cache

    bad = GeneratePrompt(prompt_ids=[1], images=[{"sha256": "0" * 64}, {"data": "not base64!"}])
    err = _refusal(lambda: decode_inline([bad], cache, config))
    assert (err.code, err.message, err.detail) == (ErrorCode.invalid_image, "prompts[0].images[1].data is not "
                                                   "valid base64", {"field": "prompts[0].images[1]"})
    small = ServeConfig(model_name="tiny", max_image_bytes=len(data) - 1)
    err = _refusal(lambda: decode_inline([good], cache, small))
    assert (err.status, err.code, err.detail) == (413, ErrorCode.too_large, {"field": "prompts[0].images[0]"})


def test_prepare_and_execute_generate_and_count(loop, engine):
    state = _state(engine)
    data = png_bytes(random_image(7))
    prompts = [GeneratePrompt(prompt_ids=_ids(engine), images=[{"data": base64.b64encode(data).decode()}]),
               GeneratePrompt(prompt_ids=_ids(engine, images=0))]
    eprompts = loop.run_until_complete(prepare(state, prompts, SAMPLING))
    assert [len(p.images) for p in eprompts] == [1, 0]
    outs = loop.run_until_complete(execute(state, eprompts, SAMPLING))
    assert [len(cs) for cs in outs] == [1, 1] and all(len(cs[0].token_ids) <= 4 for cs in outs)
    counted = state.metrics.registry.get_sample_value
    assert counted("align_prompts_total") == 2
    assert counted("align_prompt_tokens_total") == sum(engine.prompt_len(p) for p in eprompts)
    assert counted("align_completion_tokens_total") == sum(len(cs[0].token_ids) for cs in outs)
    # the second prompt's refusal comes after the first prompt's images were decoded and cached
    bad = [prompts[0], GeneratePrompt(prompt_ids=[1], images=[{"sha256": "1" * 64}])]
    with pytest.raises(APIError, match="prompts\\[1\\].images\\[0\\]: the server holds no image"):
        loop.run_until_complete(prepare(_state(engine), bad, SAMPLING))


def test_a_text_only_engine_refuses_images(loop, text_engine):
    prompt = GeneratePrompt(prompt_ids=[1, 2], images=[{"sha256": "2" * 64}])
    with pytest.raises(APIError, match="the served model is text-only"):
        loop.run_until_complete(prepare(_state(text_engine), [prompt], SAMPLING))
