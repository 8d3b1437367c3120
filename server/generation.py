"""From a request's prompts to the engine's completions, for /v1/generate and the OpenAI routes alike:
`prepare` refuses (4xx) whatever it can before any generation starts, `execute` runs the engine
under the server's deadline and counts what it did."""

import asyncio
import base64
import binascii

from PIL import Image
from starlette.datastructures import State

from protocol import API_PREFIX, ErrorCode, GeneratePrompt, SamplingParams
from server.config import ServeConfig
from server.engines import Engine, EngineCompletion, EnginePrompt
from server.errors import APIError
from server.images import ImageCache, ImageError

Inline = dict[str, Image.Image]  # field path (prompts[i].images[j], ...) -> an image or frame sent inline, decoded
LIMIT_FLAG = ServeConfig.max_images_why


def check_image_count(prompt: GeneratePrompt, i: int, limit: int, why: str = LIMIT_FLAG) -> None:
    if len(prompt.images) > limit:
        raise APIError(400, ErrorCode.invalid_request,
                       f"prompts[{i}].images has {len(prompt.images)} images; the server accepts up to "
                       f"{limit} per prompt ({why})",
                       {"field": f"prompts[{i}].images", "limit": limit})


def check_videos(prompt: GeneratePrompt, i: int, config: ServeConfig) -> None:
    """Prompt i's videos within what the served model takes: its video support, the videos per prompt, the
    frames per video. Before any frame is decoded."""
    if not prompt.videos:
        return
    field = f"prompts[{i}].videos"
    if config.video_refusal is not None:
        raise APIError(400, ErrorCode.invalid_request, f"{field}: {config.video_refusal}", {"field": field})
    if len(prompt.videos) > config.max_videos_per_prompt:
        raise APIError(400, ErrorCode.invalid_request,
                       f"{field} has {len(prompt.videos)} videos; the server accepts up to "
                       f"{config.max_videos_per_prompt} per prompt (see --max-videos-per-prompt)",
                       {"field": field, "limit": config.max_videos_per_prompt})
    for j, video in enumerate(prompt.videos):
        if len(video.frames) > config.max_frames_per_video:
            raise APIError(400, ErrorCode.invalid_request,
                           f"{field}[{j}].frames has {len(video.frames)} frames; the served model's video budget "
                           f"takes up to {config.max_frames_per_video} (max_frames, --mm-processor-kwargs): "
                           "sample fewer frames", {"field": f"{field}[{j}].frames", "limit": config.max_frames_per_video})
        if video.fps is None and config.video_fps_read_by is not None:
            raise APIError(400, ErrorCode.invalid_request,
                           f"{field}[{j}].fps is missing: {config.video_fps_read_by} places a video's frames by their "
                           "timing, so give the rate they were sampled at (frames per second)",
                           {"field": f"{field}[{j}].fps"})


def _refs(prompt: GeneratePrompt, i: int):
    """(field path, ImageRef) of prompt i's images, then of its videos' frames."""
    for j, ref in enumerate(prompt.images):
        yield f"prompts[{i}].images[{j}]", ref
    for j, video in enumerate(prompt.videos or []):
        for k, ref in enumerate(video.frames):
            yield f"prompts[{i}].videos[{j}].frames[{k}]", ref


def decode_inline(prompts: list[GeneratePrompt], cache: ImageCache, config: ServeConfig) -> Inline:
    """The images and frames sent inline (`data`), decoded into the cache. Run off the event loop: a batch
    of big images takes a while to decode, and health checks and other requests go on meanwhile."""
    out = {}
    for i, prompt in enumerate(prompts):
        check_image_count(prompt, i, config.max_images_per_prompt, config.max_images_why)
        check_videos(prompt, i, config)
        for what, ref in _refs(prompt, i):
            if ref.data is None:
                continue
            try:
                data = base64.b64decode(ref.data, validate=True)
                _, out[what] = cache.add_bytes(data, what, config.max_image_bytes, config.max_pixels)
            except binascii.Error:
                raise APIError(400, ErrorCode.invalid_image, f"{what}.data is not valid base64",
                               {"field": what}) from None
            except ImageError as exc:
                raise APIError(exc.status, exc.code, exc.message, {"field": what}) from None
    return out


def prompt_images(prompt: GeneratePrompt, i: int, inline: Inline, cache: ImageCache, max_images: int,
                  text_only: bool, why: str = LIMIT_FLAG) -> list[Image.Image]:
    """Prompt i's images, in order: decoded inline ones, or the cache's for a `sha256` reference."""
    if prompt.images and text_only:
        raise APIError(400, ErrorCode.invalid_request, f"prompts[{i}].images: the served model is text-only",
                       {"field": f"prompts[{i}].images"})
    check_image_count(prompt, i, max_images, why)
    return [_image(ref, f"prompts[{i}].images[{j}]", inline, cache) for j, ref in enumerate(prompt.images)]


def prompt_videos(prompt: GeneratePrompt, i: int, inline: Inline, cache: ImageCache,
                  config: ServeConfig) -> list[list[Image.Image]]:
    """Prompt i's videos, in order, each its frames: refused beyond the server's video limits
    (`check_videos`), or when its frames differ in size (the processor stacks them into one tensor)."""
    check_videos(prompt, i, config)
    out = []
    for j, video in enumerate(prompt.videos or []):
        field = f"prompts[{i}].videos[{j}].frames"
        frames = [_image(ref, f"{field}[{k}]", inline, cache) for k, ref in enumerate(video.frames)]
        odd = next((k for k, f in enumerate(frames) if f.size != frames[0].size), None)
        if odd is not None:
            raise APIError(400, ErrorCode.invalid_image,
                           f"{field}[{odd}] is {frames[odd].width}x{frames[odd].height} but {field}[0] is "
                           f"{frames[0].width}x{frames[0].height}: the frames of one video are all of one size",
                           {"field": f"{field}[{odd}]"})
        out.append(frames)
    return out


def _image(ref, what: str, inline: Inline, cache: ImageCache) -> Image.Image:
    """An image or frame: decoded inline, or the cache's for a `sha256` reference."""
    if ref.sha256 is None:
        return inline[what]
    img = cache.get(ref.sha256)
    if img is None:
        raise APIError(400, ErrorCode.unknown_image,
                       f"{what}: the server holds no image {ref.sha256}; PUT it to "
                       f"{API_PREFIX}/images/{ref.sha256} first",
                       {"field": what, "sha256": ref.sha256})
    return img


def to_engine_prompt(engine: Engine, prompt: GeneratePrompt, i: int, sampling: SamplingParams,
                     images: list[Image.Image], chat_template: str | None,
                     videos: list[list[Image.Image]] = ()) -> EnginePrompt:
    """Prompt i with its `images` and `videos` as the engine takes it: token ids with one placeholder per
    image and per video (messages rendered by `chat_template`, or the model's own), refused unless the
    placeholders match the images and videos and the prompt leaves room for `sampling.max_tokens`."""
    if prompt.messages is not None and videos:
        raise APIError(400, ErrorCode.invalid_request,
                       f"prompts[{i}].videos go with prompt_ids (one video marker, id "
                       f"{engine.processing.video_token_id}, per video); messages take no video parts",
                       {"field": f"prompts[{i}].videos"})
    if prompt.messages is not None:
        msgs = [m.model_dump() for m in prompt.messages]
        n_parts = sum(1 for m in msgs if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
        if n_parts != len(images):
            raise APIError(400, ErrorCode.invalid_request,
                           f"prompts[{i}].messages has {n_parts} image parts but {len(images)} images",
                           {"field": f"prompts[{i}].images"})
        ids = engine.processing.chat_prompt_ids(msgs, chat_template=chat_template)
    else:
        ids = prompt.prompt_ids
        vocab = len(engine.processing.tokenizer)
        bad = next((t for t in ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise APIError(400, ErrorCode.invalid_request,
                           f"prompts[{i}].prompt_ids holds token id {bad}, outside the vocabulary [0, {vocab})",
                           {"field": f"prompts[{i}].prompt_ids"})
        marker, video_marker = engine.image_token_id, engine.processing.video_token_id
        expansion = next((t for t in ids if t not in (marker, video_marker)
                          and t in engine.processing.suppressed_token_ids), None)
        if expansion is not None:
            raise APIError(
                400, ErrorCode.invalid_request,
                f"prompts[{i}].prompt_ids holds token id {expansion} "
                f"({engine.processing.tokenizer.convert_ids_to_tokens(expansion)}), a token of an image's expansion "
                f"(or of a video): send each image as its one marker (id {marker}), as the chat template renders "
                "it, never the processor-expanded ids", {"field": f"prompts[{i}].prompt_ids"})
        placeholders = ids.count(marker) if marker is not None else 0
        if placeholders != len(images):
            raise APIError(
                400, ErrorCode.invalid_request,
                f"prompts[{i}].prompt_ids has {placeholders} image placeholder tokens "
                f"(id {marker}) but {len(images)} images; send exactly one placeholder per "
                "image, not the processor-expanded run (AlignClient collapses runs for you)",
                {"field": f"prompts[{i}].prompt_ids"})
        video_placeholders = ids.count(video_marker) if video_marker is not None else 0
        if video_placeholders != len(videos):
            raise APIError(
                400, ErrorCode.invalid_request,
                f"prompts[{i}].prompt_ids has {video_placeholders} video placeholder tokens (id {video_marker}) "
                f"but {len(videos)} videos; send exactly one placeholder per video, not the processor-expanded run",
                {"field": f"prompts[{i}].prompt_ids"})
    ep = EnginePrompt(prompt_ids=list(ids), images=images, videos=list(videos),
                      video_fps=[v.fps for v in prompt.videos or []])
    length = engine.prompt_len(ep)
    if length + sampling.max_tokens > engine.max_model_len:
        raise APIError(
            400, ErrorCode.context_length,
            f"prompts[{i}] takes {length} tokens (images and videos expanded) and sampling.max_tokens is "
            f"{sampling.max_tokens}: {length + sampling.max_tokens} is over max_model_len {engine.max_model_len}",
            {"field": f"prompts[{i}]", "prompt_tokens": length, "max_tokens": sampling.max_tokens,
             "max_model_len": engine.max_model_len})
    return ep


async def prepare(state: State, prompts: list[GeneratePrompt], sampling: SamplingParams) -> list[EnginePrompt]:
    """Everything that can refuse a request (a 4xx) before any generation starts."""
    engine, config, cache = state.engine, state.config, state.images
    inline = (await asyncio.to_thread(decode_inline, prompts, cache, config)
              if any(r.data for i, p in enumerate(prompts) for _, r in _refs(p, i)) else {})
    text_only = engine.image_token_id is None
    return [to_engine_prompt(engine, p, i, sampling,
                             prompt_images(p, i, inline, cache, config.max_images_per_prompt, text_only,
                                           config.max_images_why),
                             config.chat_template, prompt_videos(p, i, inline, cache, config))
            for i, p in enumerate(prompts)]


def count_generated(state: State, prompts: int, prompt_tokens: int, completion_tokens: int) -> None:
    """Into the server's metrics: what a request generated (prompt tokens with images expanded)."""
    metrics = state.metrics
    metrics.prompts.inc(prompts)
    metrics.prompt_tokens.inc(prompt_tokens)
    metrics.completion_tokens.inc(completion_tokens)


async def execute(state: State, eprompts: list[EnginePrompt], sampling: SamplingParams) -> list[list[EngineCompletion]]:
    """`sampling.n` completions per prompt, within the server's --generate-timeout (a 504 past it)."""
    engine, timeout_s = state.engine, state.config.generate_timeout_s
    try:
        outs = await asyncio.wait_for(engine.generate(eprompts, sampling), timeout_s)
    except TimeoutError:
        raise APIError(504, ErrorCode.timeout, f"generation took longer than {timeout_s:g} s "
                       "(the server's --generate-timeout); send fewer prompts, a smaller n or max_tokens, or "
                       "retry when the server is less busy", {"timeout_s": timeout_s}) from None
    count_generated(state, len(eprompts), sum(engine.prompt_len(p) for p in eprompts),
                    sum(len(c.token_ids) for cs in outs for c in cs))
    return outs
