"""Videos on the trainer's side: decoded with PyAV, sampled once into frames, and sized by one set of budgets.

A dataset row's video is a file (mp4, webm, mkv, mov, avi: anything PyAV's FFmpeg opens) or a list of
frames (image paths), stored as one list of strings per video: `[path]` for a file, the frame paths in
order for frames. The trainer samples each video into PIL frames here, once per batch that reads its row,
and hands those frames to both sides: its own processor (the forward's `pixel_values_videos`) and the
server (each frame an image sent once and then named by hash). Both sides' video processors then see the
same frames; the budgets that size them (`VideoBudget`) are the server's or refused at start
(`check_against_server`).

- `fps`: frames per second of the clip taken from a video file (the first at t=0; never more often than
  the clip has frames: a clip of a lower rate gives each of its frames); frame lists are taken as given
  (they were sampled by whoever wrote them) and read as sampled at `fps`.
- `max_frames`: at most this many frames per video; more are thinned evenly over the clip.
- `max_pixels`: each frame scaled down (aspect kept) to at most this many pixels; also the video
  processor's own per-frame bound (its `size.longest_edge`), which must be the server's.
- `total_pixels`: all frames of a video together at most this many pixels (each frame scaled down further
  when frames x max_pixels would exceed it); None: no such bound. Applied here, before the frames leave,
  so the server sees the frames already sized and nothing of the server's has to match it.

Each sampled video keeps the rate its frames stand for (`VideoFrames.fps`: the rate sampled at, lowered by
thinning as HF's own sampling reports it), which travels with it (the wire's `VideoRef.fps`) and reaches
every processor that reads frame timing (Qwen2.5-VL's positions).
"""

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from runtime.image_tokens import VideoShape, video_metadata

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif")
DEFAULT_FPS = 2.0  # Qwen2-VL's own sampling rate (its processor's fps when it samples itself)


class VideoError(ValueError):
    """A video the trainer cannot use; the message names where it came from and the limit."""


class VideoFrames(list):
    """One video as the frames sampled from it (PIL images, all of one size), in order, and `fps`: the rate
    they were sampled at (frame k stands for k / fps seconds). A list, so that it travels wherever a prompt's
    images travel (gathered between processes, held by a read-ahead batch); its type tells it from an image
    at the edges that send it (`split_media`)."""

    def __init__(self, frames=(), fps: float | None = None):
        super().__init__(frames)
        self.fps = fps

    @property
    def shape(self) -> VideoShape:
        """What its expansion into video tokens depends on: its frame count and frame size."""
        return VideoShape(len(self), *self[0].size)

    @property
    def metadata(self) -> dict:
        """Its timing as a processor takes it (`video_metadata=`): what Qwen2.5-VL's positions read."""
        return video_metadata(len(self), self.fps)


@dataclass(frozen=True)
class VideoBudget:
    fps: float = DEFAULT_FPS
    max_frames: int = 768
    min_pixels: int = 3136
    max_pixels: int = 602112
    total_pixels: int | None = None

    def __post_init__(self):
        for name in ("fps", "max_frames", "min_pixels", "max_pixels"):
            if not getattr(self, name) > 0:
                raise VideoError(f"video budget {name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise VideoError(f"video min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        if self.total_pixels is not None and self.total_pixels < self.min_pixels:
            raise VideoError(f"video total_pixels {self.total_pixels} is below one frame's min_pixels {self.min_pixels}")


def resolve_budget(processor, fps: float | None = None, max_frames: int | None = None,
                   max_pixels: int | None = None, total_pixels: int | None = None, server=None,
                   server_name: str = "the server") -> VideoBudget:
    """The run's video budget: the flags given (align-train --video_*), else the server's (`server`: its
    /v1/info video_budgets), else the model's video processor's own. A flag that would make the server count
    other tokens than the trainer is refused in one line naming both values (VideoError). The trainer's
    video processor is set to the same per-frame pixel bounds."""
    vp = processor.video_processor
    own = dict(fps=vp.fps or DEFAULT_FPS, max_frames=vp.max_frames, min_pixels=vp.size.shortest_edge,
               max_pixels=vp.size.longest_edge)
    if server is not None:
        theirs = dict(max_frames=server.max_frames, min_pixels=server.min_pixels, max_pixels=server.max_pixels)
        if server.fps is not None:
            theirs["fps"] = server.fps
        if max_pixels is not None and max_pixels != server.max_pixels:
            raise VideoError(f"--video_max_pixels {max_pixels} but {server_name} sizes video frames to max_pixels "
                             f"{server.max_pixels}: the two would count other video tokens; give the same on both "
                             "(align-serve --mm-processor-kwargs '{\"videos_kwargs\": {\"min_pixels\": ..., "
                             "\"max_pixels\": ...}}')")
        if max_frames is not None and max_frames > server.max_frames:
            raise VideoError(f"--video_max_frames {max_frames} but {server_name} takes up to max_frames "
                             f"{server.max_frames} per video: give at most that")
        if fps is not None and server.fps is not None and fps != server.fps:
            raise VideoError(f"--video_fps {fps:g} but {server_name}'s video processor samples at fps "
                             f"{server.fps:g}: give the same on both")
        own.update(theirs)
    given = {k: v for k, v in dict(fps=fps, max_frames=max_frames, max_pixels=max_pixels).items() if v is not None}
    budget = VideoBudget(**{**own, **given, "min_pixels": min(own["min_pixels"], given.get("max_pixels", own["max_pixels"]))},
                         total_pixels=total_pixels)
    size_frames_alike(processor, budget)
    return budget


def size_frames_alike(processor, budget: VideoBudget) -> None:
    """The processor's video frames sized within the budget's per-frame pixels, as the server's are."""
    vp = processor.video_processor
    vp.size = type(vp.size)(shortest_edge=budget.min_pixels, longest_edge=budget.max_pixels)


def is_video_file(entries: Sequence[str]) -> bool:
    return len(entries) == 1 and Path(entries[0]).suffix.lower() in VIDEO_SUFFIXES


def probe(entries: Sequence[str], budget: VideoBudget, where: str) -> int:
    """The frames the video at `entries` gives under `budget`, checked without decoding a picture: a file's
    container and stream opened and its duration read, each frame path's image header verified. Raises
    VideoError naming `where`, the file and the limit."""
    if not entries:
        raise VideoError(f"{where}: a video with no frames")
    if is_video_file(entries):
        import av

        path = entries[0]
        if not Path(path).is_file():
            raise VideoError(f"{where}: video file {path} does not exist")
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoError(f"{where}: video file {path} has no video stream")
                stream = container.streams.video[0]
                duration = _duration(container, stream)
                rate = float(stream.average_rate or stream.guessed_rate or 0) or None
                frames = stream.frames or (round(duration * rate) if duration and rate else 0)
        except VideoError:
            raise
        except Exception as exc:  # PyAV raises InvalidDataError and friends, all FFmpegError/OSError subclasses
            raise VideoError(f"{where}: video file {path} cannot be read ({type(exc).__name__}: {exc})") from exc
        if not frames and not duration:
            raise VideoError(f"{where}: video file {path} holds no frames")
        count = len(_times(duration, budget.fps, rate)) if duration else frames
        return min(count, budget.max_frames)
    for frame in entries:
        if not Path(frame).is_file():
            raise VideoError(f"{where}: video frame {frame} does not exist")
        try:
            with Image.open(frame) as img:
                img.verify()
        except Exception as exc:
            raise VideoError(f"{where}: video frame {frame} cannot be read ({type(exc).__name__}: {exc})") from exc
    return min(len(entries), budget.max_frames)


def sample(entries: Sequence[str] | Sequence[Image.Image], budget: VideoBudget, where: str = "video") -> VideoFrames:
    """The frames the trainer trains and generates on: decoded (a file: at `budget.fps`), thinned to
    `max_frames`, scaled to `max_pixels` and `total_pixels`, all of the first frame's size."""
    fps = budget.fps  # a frame list's rate: the budget's, as if sampled by it
    if entries and all(isinstance(e, Image.Image) for e in entries):
        frames = [e.convert("RGB") for e in entries]
    elif is_video_file(entries):
        frames, fps = _decode(entries[0], budget, where)
    else:
        frames = []
        for frame in entries:
            try:
                if isinstance(frame, dict):  # a datasets Image cell
                    frame = io.BytesIO(frame["bytes"]) if frame.get("bytes") else frame["path"]
                with Image.open(frame) as img:
                    frames.append(img.convert("RGB"))
            except Exception as exc:
                raise VideoError(f"{where}: video frame {frame} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise VideoError(f"{where}: the video gave no frames")
    kept = thin(frames, budget.max_frames)
    return VideoFrames(resize(kept, budget), fps * len(kept) / len(frames))


def thin(frames: list, limit: int) -> list:
    """At most `limit` of `frames`, evenly spaced, the first kept."""
    if len(frames) <= limit:
        return frames
    step = len(frames) / limit
    return [frames[int(i * step)] for i in range(limit)]


def resize(frames: list[Image.Image], budget: VideoBudget) -> list[Image.Image]:
    """Every frame at the first frame's size scaled down (aspect kept) to within max_pixels per frame and
    total_pixels per video; never scaled up."""
    width, height = frames[0].size
    cap = budget.max_pixels
    if budget.total_pixels is not None:
        cap = min(cap, budget.total_pixels // len(frames))
    scale = min(1.0, math.sqrt(cap / (width * height)))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return [f if f.size == size else f.resize(size, Image.BICUBIC) for f in frames]


def split_media(media: Sequence) -> tuple[list, list[VideoFrames]]:
    """A prompt's images and its videos, from the one list they travel in."""
    return [m for m in media if not isinstance(m, VideoFrames)], [m for m in media if isinstance(m, VideoFrames)]


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return None


def _rate(fps: float, rate: float | None) -> float:
    """The rate a clip of frame rate `rate` is sampled at for `fps`: never more often than it has frames."""
    return min(fps, rate) if rate else fps


def _times(duration: float, fps: float, rate: float | None) -> list[float]:
    """The instants sampled from a clip of `duration` seconds at `fps`: 0, 1/fps, ... (at least one)."""
    fps = _rate(fps, rate)
    return [i / fps for i in range(max(1, math.floor(duration * fps + 1e-6)))]


def _decode(path: str, budget: VideoBudget, where: str) -> tuple[list[Image.Image], float]:
    """The frames sampled from the clip at `path`, and the rate they were sampled at."""
    import av

    decoded = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            duration = _duration(container, stream)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            for f in container.decode(stream):
                decoded.append((float(f.pts * stream.time_base) if f.pts is not None else None, f.to_image()))
    except Exception as exc:
        if not decoded:
            raise VideoError(f"{where}: video file {path} cannot be decoded ({type(exc).__name__}: {exc})") from exc
        # a clip damaged past its start (a truncated upload): the frames before the damage are the clip
        log.warning("%s: video file %s is damaged after %d frames (%s: %s); sampling those", where, path,
                    len(decoded), type(exc).__name__, exc)
        duration = decoded[-1][0] - decoded[0][0] + 1 / (rate or budget.fps) if decoded[0][0] is not None else None
    if not decoded:
        raise VideoError(f"{where}: video file {path} holds no frames")
    if decoded[0][0] is None or not duration:  # no timing to sample by: every frame, at the clip's rate
        return [img for _, img in decoded], rate or budget.fps
    start = decoded[0][0]
    out, k = [], 0
    for t in _times(duration, budget.fps, rate):
        # the last frame shown at instant t
        while k + 1 < len(decoded) and decoded[k + 1][0] - start <= t + 1e-6:
            k += 1
        out.append(decoded[k][1])
    return out, _rate(budget.fps, rate)


def write_video(path: str | Path, frames: Sequence[Image.Image], fps: float = 4.0) -> None:
    """`frames` as an H.264 mp4 (yuv420p: even sizes) at `fps`: how tests and demos make real video files."""
    from fractions import Fraction

    import av

    width, height = frames[0].size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for img in frames:
            frame = av.VideoFrame.from_image(img.convert("RGB").crop((0, 0, stream.width, stream.height)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
