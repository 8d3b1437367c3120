"""GRPO/GSPO on video rows, behind `trl_seam.VideoSeam` (TRL 1.16 trains on images only).

A row's videos (the dataset's `videos` column: per video a file or its frame paths) are sampled into
frames once per generation batch (trainer_client/video.py, the run's `VideoBudget`) and put in the
prompt's video parts, so the prompt carries them wherever TRL and our rollout backends take it. TRL
renders and tokenizes the prompt as usual (each video part one `<|video_pad|>`-like marker, left
unexpanded, since the processor gets no frames); `tokenize_with_videos` expands each marker as the
model's processor does for that video's frame count and size, and hands the rollout backend each
prompt's frames (`prompt_videos`), which the server receives once and names by hash afterwards. The
trainer's forward gets the processor's `pixel_values_videos` and `video_grid_thw` for each sequence's
videos, and `mm_token_type_ids` from the very ids it scores (TRL's come from the image-only processor
call, which left the video markers unexpanded).
"""

import logging
from collections import deque

import torch

from trainer_client import trl_seam
from trainer_client.sampler import image_tokens
from trainer_client.video import VideoBudget, VideoError, VideoFrames, resolve_budget, sample

log = logging.getLogger(__name__)
READ_AHEAD_BATCHES = 4  # more than async rollouts read ahead at their default staleness

VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")  # what a forward reads of a video


def video_frames_in(prompt: list[dict]) -> list[VideoFrames]:
    """The frames in a prompt's video parts, in order."""
    return [p["video"] for m in prompt if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "video" and p.get("video") is not None]


def with_frames(prompt: list[dict], videos: list[VideoFrames]) -> list[dict]:
    """`prompt` with `videos` in its video parts, in order."""
    pending = iter(videos)
    return [{**m, "content": [{**p, "video": next(pending)} if isinstance(p, dict) and p.get("type") == "video" else p
                              for p in m["content"]]} if isinstance(m.get("content"), list) else m for m in prompt]


def without_frames(prompt: list[dict]) -> list[dict]:
    return [{**m, "content": [{k: v for k, v in p.items() if k != "video"} if isinstance(p, dict) else p
                              for p in m["content"]]} if isinstance(m.get("content"), list) else m for m in prompt]


def without_video_parts(prompt: list[dict]) -> list[dict]:
    return [{**m, "content": [p for p in m["content"] if not (isinstance(p, dict) and p.get("type") == "video")]}
            if isinstance(m.get("content"), list) else m for m in prompt]


def _groups(rows: list[dict]) -> list[tuple[int, int]]:
    """(start, stop) of each run of copies of one row (TRL repeats a prompt num_generations times in a row)."""
    out, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] is not rows[start] and rows[i] != rows[start]:
            out.append((start, i))
            start = i
    return out


class VideoTraining(trl_seam.VideoSeam):
    """Our side of `trl_seam.VideoSeam`, mixed into the GRPO trainers. `video_budget` is set when the run's
    data has videos (`set_video_budget`); `prompt_videos`: per prompt of the batch TRL last tokenized, its frames."""

    video_budget: VideoBudget | None = None
    prompt_videos: list[list[VideoFrames]] | None = None
    _video_tokens = None
    # the clips of batches read ahead (async rollouts), by their paths: TRL builds those batches again later,
    # and takes their frames from here instead of decoding them twice; the newest READ_AHEAD_BATCHES only
    _read_ahead: deque[dict[tuple, "VideoFrames | VideoError"]] | None = None

    def set_video_budget(self, flags: dict, info=None, server_name: str = "the server") -> None:
        """The run's video budget from align-train's --video_* `flags` (and `rows`: the data's video rows; 0 when
        only tools may return videos), checked against the server's /v1/info (`info`; None without a server).
        Refusals end the run in one line."""
        flags = dict(flags)
        rows = flags.pop("rows")
        if info is not None and not info.limits.max_videos_per_prompt:
            if not rows:
                log.info("%s serves no video: a tool that returns one stops the run", server_name)
                return
            raise SystemExit(f"align-train: the dataset has {rows} video row(s) but {server_name} serves {info.model} "
                             "without video (limits.max_videos_per_prompt 0; its start log says why)")
        try:
            self.video_budget = resolve_budget(self.processing_class, **flags, server=info and info.video_budgets,
                                               server_name=server_name)
        except VideoError as exc:
            raise SystemExit(f"align-train: {exc}") from None
        log.info("videos sampled at %g fps, at most %d frames of %d-%d pixels%s", self.video_budget.fps,
                 self.video_budget.max_frames, self.video_budget.min_pixels, self.video_budget.max_pixels,
                 f", {self.video_budget.total_pixels} pixels a video" if self.video_budget.total_pixels else "")

    def rows_with_frames(self, inputs: list[dict], read_ahead: bool = False
                         ) -> tuple[list[dict], list[list[VideoFrames]]] | None:
        """`inputs` with each row's videos sampled into its prompt's video parts, and per row its frames; None
        when the run takes no video. A video file is decoded once per batch however many rows repeat it, and
        once for a batch `read_ahead` (async rollouts) that TRL builds again later; a row whose video cannot be
        decoded is skipped and counted (`video/skipped_rows`, by the batch TRL trains on)."""
        if self.video_budget is None:
            return None
        if not any(row.get("videos") for row in inputs):
            return inputs, [[] for _ in inputs]  # tools may still return videos (`tool_loop`)
        decoded: dict[tuple, VideoFrames | VideoError] = {}
        if self._read_ahead is None:
            self._read_ahead = deque(maxlen=READ_AHEAD_BATCHES)
        earlier = self._read_ahead

        def frames_of(row) -> list[VideoFrames]:
            where = f"dataset row {row['dataset_row']}" if row.get("dataset_row") is not None else "a dataset row"
            out = []
            for video in row.get("videos") or []:
                key = tuple(video)
                if key not in decoded:
                    batch = next((b for b in earlier if key in b), None)
                    if batch is not None:
                        decoded[key] = batch.pop(key)
                    else:
                        try:
                            decoded[key] = sample(video, self.video_budget, where)
                        except VideoError as exc:
                            decoded[key] = exc
                if isinstance(decoded[key], VideoError):
                    raise decoded[key]
                out.append(decoded[key])
            return out

        groups = _groups(inputs)  # a row's num_generations copies stand together
        good, skipped = {}, []
        for start, _ in groups:
            try:
                good[start] = frames_of(inputs[start])
            except VideoError as exc:  # the start-up check opened it; its frames are damaged past reading
                skipped.append(str(exc))
        rows, videos = [], []
        for k, (start, stop) in enumerate(groups):
            # a skipped row's group takes the next readable group's row: the batch keeps its size; with none
            # (a batch of one prompt), the row's prompt without its videos
            source = start if start in good else next((s for s, _ in groups[k:] + groups[:k] if s in good), None)
            if source is None:
                row, frames = {**inputs[start], "prompt": without_video_parts(inputs[start]["prompt"])}, []
            else:
                row, frames = inputs[source], good[source]
            for _ in range(stop - start):
                rows.append({**row, "prompt": with_frames(row["prompt"], frames)} if frames else row)
                videos.append(frames)
        if read_ahead:
            earlier.append(decoded)
            return rows, videos  # warned and counted when TRL builds the batch
        for problem in skipped:
            log.warning("%s: row skipped (counted in video/skipped_rows)", problem)
        if self.model.training or skipped:
            trl_seam.log_metric(self, "video/skipped_rows", float(len(skipped)))
        return rows, videos

    def tool_loop(self, prompt_ids, completion_ids, run_trl_loop) -> trl_seam.ToolLoopResult:
        """The tool loop's result with the videos tools returned (server mode's agent loop samples them) moved
        from its tool images to each sample's videos, which the forward reads after the row's own."""
        out = super().tool_loop(prompt_ids, completion_ids, run_trl_loop)
        returned = [[m for m in media if isinstance(m, VideoFrames)] for media in out.tool_images]
        if not any(returned):
            return out
        if self.forward_videos is None:
            raise RuntimeError("a tool returned a video, which this run does not train on (a model with video, "
                               "--vllm-mode server)")
        for i, videos in enumerate(returned):
            self.forward_videos[i] = self.forward_videos[i] + videos  # a new list: copies of a row share theirs
        return out._replace(tool_images=[[m for m in media if not isinstance(m, VideoFrames)]
                                         for media in out.tool_images])

    def tokenize_with_videos(self, tokenize, prompts: list) -> tuple:
        """TRL's `_tokenize_prompts` result for `prompts` (`tokenize`, given the prompts without frames) with
        each video marker expanded and the videos' processor inputs among the multimodal fields (TRL's local
        generation passes them to generate); `prompt_videos` set."""
        videos = [video_frames_in(p) for p in prompts]
        ids, images, fields = tokenize([without_frames(p) for p in prompts])
        self.prompt_videos = videos
        if not any(videos):
            return ids, images, fields
        if self._video_tokens is None:
            self._video_tokens = image_tokens(self)
        tokens = self._video_tokens
        ids = [tokens.expand_videos(p, [v.shape for v in vids])
               for p, vids in zip(ids, videos, strict=True)]
        fields = dict(fields)
        fields.update(self._processed([v for vids in videos for v in vids]))
        if "mm_token_type_ids" in fields:
            fields["mm_token_type_ids"] = [[int(t) for t in self.processing_class.create_mm_token_type_ids([p])[0]]
                                           for p in ids]
        return ids, images, fields

    def video_forward_inputs(self, input_ids: torch.Tensor, row_videos: list[list[VideoFrames]]) -> dict:
        """What the model's forward over `input_ids` (rows in order, each with its videos) adds for the videos."""
        types = torch.as_tensor(self.processing_class.create_mm_token_type_ids(input_ids.tolist()),
                                device=input_ids.device)
        out = {"mm_token_type_ids": types}
        flat = [v for vids in row_videos for v in vids]
        if flat:
            out.update({k: v.to(input_ids.device) for k, v in self._processed(flat).items()})
        return out

    def _processed(self, videos: list[VideoFrames]) -> dict:
        """The processor's video inputs for `videos` (Qwen2.5-VL's `second_per_grid_ts` from each one's fps, as
        the server's processor reads it), each video processed once (kept on its frames)."""
        processor = self.processing_class
        for video in videos:
            if getattr(video, "processed", None) is None:
                out = processor(text=[processor.video_token], videos=[list(video)],
                                video_metadata=[video.metadata], return_tensors="pt")
                video.processed = {k: v for k, v in out.items() if k in VIDEO_INPUTS}
        return {key: torch.cat([v.processed[key] for v in videos]) for key in videos[0].processed}
