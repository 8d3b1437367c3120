"""One model's image tokens, as its own processor writes them.

On the wire a prompt holds each image as one marker, the token the chat template renders for an image
part (the processor's `image_token`). The HF processor replaces each marker by the image's expansion:
its feature tokens, wrapped in the family's tokens, and for some families with text on either side that
joins the neighbouring text (Gemma 3 writes "\\n\\n" around each image, which merges with the template's
newlines into one token). `ImageTokens` learns the expansion for each image size from the processor
itself, expanding a lone marker for a blank image of that size, and splices it in (`expand`: the
transformers engine's input ids, every engine's prompt length) or takes it out (`unexpand`: the trainer's
processor-expanded ids as the server takes them), leaving every other token as it is (the sampled tokens
of earlier turns included), but for the text an expansion joins, which is tokenized again with it.

Videos, for a family that takes them (`Family.video`), go the same way: one marker per video (the
processor's `video_token`), whose expansion the video processor gives for the video's shape (frames,
width, height), learnt from a blank video of that shape, spliced in and taken out alike.
"""

import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from runtime.families import family_of

MAX_SIZES = 4096  # image sizes whose expansion is kept


class Span(NamedTuple):
    """One image's expansion: `core` runs from its first special token to its last; `prefix` and `suffix` are
    the text the processor writes before and after it, tokenized with the text next to it."""

    prefix: str
    core: tuple[int, ...]
    suffix: str


class VideoShape(NamedTuple):
    """What a video's expansion depends on: its frame count and its frames' size (all alike)."""

    frames: int
    width: int
    height: int


def video_metadata(frames: int, fps: float | None) -> dict:
    """A video's metadata as HF's processors and vLLM take it, for `frames` sampled at `fps` (frame k at k / fps
    seconds) and none resampled: what a family's positions read of a video's timing (`Family.video_fps`)."""
    return {"total_num_frames": frames, "fps": fps, "frames_indices": list(range(frames)),
            "duration": frames / fps if fps else None}


def vllm_video(frames: Sequence[Image.Image], fps: float | None) -> tuple:
    """A video as vLLM's multimodal data takes it: one (frames, height, width, 3) array and its metadata. vLLM
    hands both to the same HF video processor, the frames unsampled, so its features, token count and temporal
    positions are those of transformers given the same frames and `video_metadata`."""
    return np.stack([np.asarray(f) for f in frames]), {**video_metadata(len(frames), fps), "do_sample_frames": False}


class ImageTokens:
    def __init__(self, processor, config, mm_kwargs: dict | None = None):
        """`processor`: the model's HF processor; `config`: its transformers config; `mm_kwargs`: call-time
        overrides of its image processor (align-serve's --mm-processor-kwargs, as vLLM applies them)."""
        self.family = family_of(config)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.mm_kwargs = dict(mm_kwargs or {})
        self.marker = processor.image_token
        self.marker_id = self.tokenizer.convert_tokens_to_ids(self.marker)
        feature = getattr(config, "image_token_id", None)
        self.feature_id = feature if feature is not None else config.image_token_index
        self._special = frozenset(i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special)
        video = getattr(processor, "video_token", None)
        # None where the server takes no video: the family's (`Family.video_refusal`), or a processor built
        # without its video part (transformers' video processors need torchvision).
        served = self.family.video and getattr(processor, "video_processor", None) is not None
        self.video_marker = video if served else None
        self.video_marker_id = self.tokenizer.convert_tokens_to_ids(video) if served else None
        media = {self.marker_id, self.feature_id, *processor.image_token_ids, *processor.video_token_ids,
                 getattr(config, "video_token_id", None), self.tokenizer.convert_tokens_to_ids(video) if video else None}
        # Never sampled (TRL's local generation suppresses the feature token too): see runtime/families.py.
        self.never_sampled = sorted({t for t in media if t is not None}
                                    | self.family.wrapper_tokens(self.tokenizer.get_vocab()))
        self._spans: dict[tuple, Span] = {}
        # The trainer un-expands on its rollout thread and its training thread; a tokenizer is not thread-safe.
        self._lock = threading.RLock()

    def video_budgets(self) -> dict | None:
        """The video processor's budgets as it names them, as the server applies them: its own config, then
        --mm-processor-kwargs' flat keys, then its `videos_kwargs`. None where no video is taken. (Its
        `min_pixels`/`max_pixels` given at call time take effect together only, as `size` edges.)"""
        if self.video_marker is None:
            return None
        vp = self.processor.video_processor
        out = {"fps": vp.fps, "max_frames": vp.max_frames, "min_pixels": vp.size.shortest_edge,
               "max_pixels": vp.size.longest_edge, "max_video_tokens": getattr(vp, "max_video_tokens", None),
               "cap_pixels_per_frame": getattr(vp, "cap_pixels_per_frame", None)}
        for given in (self.mm_kwargs, self.mm_kwargs.get("videos_kwargs") or {}):
            size = dict(given.get("size") or {})
            if given.get("min_pixels") is not None and given.get("max_pixels") is not None:
                size = {"shortest_edge": given["min_pixels"], "longest_edge": given["max_pixels"]}
            out.update({k: size[edge] for k, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge"))
                        if size.get(edge) is not None})
            out.update({k: given[k] for k in ("fps", "max_frames", "max_video_tokens", "cap_pixels_per_frame")
                        if k in given})
        return out

    def video_kwargs_problem(self) -> str | None:
        """Why the call-time kwargs cannot size video frames alike on both engines, in one line; None when they
        can. The HF video processor takes `size`'s two edges together only: one alone it ignores, while vLLM
        passes it on as a one-edge `size` that the processor refuses (a pixel budget given by one of
        min_pixels/max_pixels is completed at start: `complete_pixel_budgets`)."""
        flat, scoped = self.mm_kwargs, self.mm_kwargs.get("videos_kwargs") or {}
        given = {k: scoped.get(k, flat.get(k)) for k in ("min_pixels", "max_pixels", "size")}
        size = given.pop("size") or {}
        pixels = [k for k, v in given.items() if v is not None]
        edges = [e for e in ("shortest_edge", "longest_edge") if size.get(e) is not None]
        if len(pixels) == 1 or len(edges) == 1:
            alone = pixels[0] if len(pixels) == 1 else f"size.{edges[0]}"
            return (f"--mm-processor-kwargs gives video frames {alone} alone: the HF video processor applies "
                    "the two together only (vLLM would fail each video); give both, e.g. in "
                    "videos_kwargs, to serve video")
        return None

    def span(self, size: tuple[int, int]) -> Span:
        """The processor's expansion of one marker for an image of `size` (width, height): it depends on the
        size alone, never on the pixels."""
        with self._lock:
            return self._cached(size, lambda: self.processor(text=[self.marker], images=[Image.new("RGB", size)],
                                                             add_special_tokens=False, **self.mm_kwargs))

    def video_span(self, shape: VideoShape) -> Span:
        """The video processor's expansion of one video marker for a video of `shape`: it depends on the shape
        alone (the frames the client sampled are all the processor sees), never on the pixels."""
        frames = [Image.new("RGB", (shape.width, shape.height))] * shape.frames
        with self._lock:
            return self._cached(shape, lambda: self.processor(text=[self.video_marker], videos=[frames],
                                                              add_special_tokens=False, **self.mm_kwargs))

    def _cached(self, key: tuple, process) -> Span:
        span = self._spans.get(key)
        if span is None:
            ids = list(process()["input_ids"][0])
            first = next(i for i, t in enumerate(ids) if t in self._special)
            last = max(i for i, t in enumerate(ids) if t in self._special)
            span = Span(self._decode(ids[:first]), tuple(ids[first:last + 1]), self._decode(ids[last + 1:]))
            if len(self._spans) >= MAX_SIZES:
                self._spans.pop(next(iter(self._spans)))
            self._spans[key] = span
        return span

    def expand(self, ids: Sequence[int], sizes: Sequence[tuple[int, int]],
               videos: Sequence[VideoShape] = ()) -> list[int]:
        """`ids` with each marker replaced by the expansion of its image (`sizes`, one per marker, in order)
        and each video marker by its video's (`videos`, one per video marker, in order): the ids the processor
        gives for the same text."""
        markers = sum(1 for t in ids if t == self.marker_id)
        if markers != len(sizes):
            raise ValueError(f"{markers} image markers ({self.marker}) for {len(sizes)} images")
        video_markers = sum(1 for t in ids if t == self.video_marker_id) if self.video_marker_id is not None else 0
        if video_markers != len(videos):
            raise ValueError(f"{video_markers} video markers ({self.video_marker}) for {len(videos)} videos")
        with self._lock:
            return self._expand(ids, {self.marker_id: iter([self.span(tuple(s)) for s in sizes]),
                                      self.video_marker_id: iter([self.video_span(VideoShape(*v)) for v in videos])})

    def expand_videos(self, ids: Sequence[int], videos: Sequence[VideoShape]) -> list[int]:
        """`ids` with each video marker replaced by its video's expansion, images left as they are (ids the
        processor expanded images in, rendered from video parts it was given no frames for)."""
        if self.video_marker_id is None:
            raise ValueError(f"{self.family.name} is served without video here")
        found = sum(1 for t in ids if t == self.video_marker_id)
        if found != len(videos):
            raise ValueError(f"{found} video markers ({self.video_marker}) for {len(videos)} videos")
        with self._lock:
            return self._expand(ids, {self.video_marker_id: iter([self.video_span(VideoShape(*v)) for v in videos])})

    def _expand(self, ids: Sequence[int], spans: dict[int, Iterator[Span]]) -> list[int]:
        pieces: list[int | str] = []  # ids as they are, or text tokenized with the text next to it
        for t in ids:
            if t not in spans:
                pieces.append(t)
                continue
            span = next(spans[t])
            pieces += [p for p in (span.prefix, *span.core, span.suffix) if p != ""]
        out: list[int] = []
        run: list[int | str] = []  # non-special pieces in a row
        for piece in [*pieces, None]:
            if piece is not None and (isinstance(piece, str) or piece not in self._special):
                run.append(piece)
                continue
            out += self._join(run)
            run = []
            if piece is not None:
                out.append(piece)
        return out

    def unexpand(self, ids: Sequence[int], sizes: Sequence[tuple[int, int]],
                 videos: Sequence[VideoShape] = ()) -> list[int]:
        """The processor's ids (each image expanded, `sizes`: each image's, in order; each video expanded,
        `videos`: each one's shape, in order) with one marker per image and per video, as the chat template
        renders them: the inverse of `expand`."""
        if videos and self.video_marker_id is None:
            raise ValueError(f"{self.family.name} is served without video here")
        with self._lock:
            out = self._unexpand(ids, [(self.span(tuple(s)), f"a {s[0]}x{s[1]} image") for s in sizes], self.marker_id)
            return self._unexpand(out, [(self.video_span(VideoShape(*v)), f"a {v[0]}-frame {v[1]}x{v[2]} video")
                                        for v in videos], self.video_marker_id)

    def _unexpand(self, ids: Sequence[int], spans: Sequence[tuple[Span, str]], marker: int) -> list[int]:
        # Images and videos expand to runs of their own tokens: each kind is found apart, in order.
        out, cursor = list(ids), 0
        for span, what in spans:
            start = _find(out, span.core, cursor)
            if start is None:
                raise ValueError(f"the processor's expansion of {what} is not in these ids "
                                 f"(from position {cursor}): were they expanded by this model's processor?")
            left, right = start, start + len(span.core)
            before, after = [], []
            if span.prefix:
                while left > 0 and out[left - 1] not in self._special:
                    left -= 1
                before = self._encode(_without(self._decode(out[left:start]), span.prefix, str.endswith))
            if span.suffix:
                end = right
                while right < len(out) and out[right] not in self._special:
                    right += 1
                after = self._encode(_without(self._decode(out[end:right]), span.suffix, str.startswith))
            out[left:right] = [*before, marker, *after]
            cursor = left + len(before) + 1
        return out

    def _join(self, run: list[int | str]) -> list[int]:
        if not any(isinstance(p, str) for p in run):
            return list(run)
        text, ids = "", []
        for piece in [*run, ""]:
            if isinstance(piece, int):
                ids.append(piece)
                continue
            text += self._decode(ids) + piece
            ids = []
        return self._encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []


def _find(ids: list[int], pattern: tuple[int, ...], start: int) -> int | None:
    first, n = pattern[0], len(pattern)
    for i in range(start, len(ids) - n + 1):
        if ids[i] == first and tuple(ids[i:i + n]) == pattern:
            return i
    return None


def _without(text: str, part: str, has) -> str:
    if not has(text, part):
        raise ValueError(f"expected {part!r} beside an image's tokens, found {text!r}")
    return text[:-len(part)] if has is str.endswith else text[len(part):]


def complete_pixel_budgets(processor, mm_kwargs: dict) -> tuple[dict, list[str]]:
    """`mm_kwargs` (call-time overrides, as align-serve's --mm-processor-kwargs) with a pixel budget given by
    one of `min_pixels`/`max_pixels` completed by the processor's own other edge, and what was completed.
    HF's Qwen-VL processors apply the two at call time together only (one alone is silently ignored) while
    vLLM passes one on as a one-edge `size`: completed, both engines size images and frames alike, as the
    user meant. Flat keys are the image processor's; `videos_kwargs` the video processor's."""
    out, said = dict(mm_kwargs), []
    scopes = [(out, getattr(processor, "image_processor", None), "")]
    if isinstance(out.get("videos_kwargs"), dict):
        out["videos_kwargs"] = dict(out["videos_kwargs"])
        scopes.append((out["videos_kwargs"], getattr(processor, "video_processor", None), "videos_kwargs."))
    for given, own, prefix in scopes:
        size = getattr(own, "size", None)
        defaults = {"min_pixels": getattr(size, "shortest_edge", None), "max_pixels": getattr(size, "longest_edge", None)}
        present = [k for k in defaults if given.get(k) is not None]
        if len(present) == 1 and all(v is not None for v in defaults.values()):
            missing = next(k for k in defaults if k not in present)
            given[missing] = defaults[missing]
            said.append(f"{prefix}{present[0]} alone: {prefix}{missing} {defaults[missing]} (the processor's own) "
                        "added, since the processor applies the two together only")
    return out, said
