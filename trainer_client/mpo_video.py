"""MPO on rows with videos: TRL's preference collator (`trl_seam.PreferenceVideoSeam`) with each row's videos
sampled into frames by the run's budget when a batch reads the row, as SFT's collator samples them; the
processor expands them with the prompt, and the forward of both answers reads them."""

from dataclasses import dataclass, fields

from trainer_client import trl_seam
from trainer_client.video import VideoBudget, VideoError, VideoFrames, sample


@dataclass
class VideoPreferenceCollator(trl_seam.PreferenceVideoSeam):
    video_budget: VideoBudget | None = None

    @classmethod
    def like(cls, collator, video_budget: VideoBudget) -> "VideoPreferenceCollator":
        """TRL's own collator (`collator`, as DPOTrainer built it) with the run's video budget."""
        return cls(**{f.name: getattr(collator, f.name) for f in fields(collator)}, video_budget=video_budget)

    def videos_of(self, row: dict) -> list[VideoFrames]:
        return [sample(video, self.video_budget, "MPO batch") for video in row.get("videos") or []]

    def videos_cut(self, kept: int, expanded: int):
        raise VideoError(f"MPO batch: --max_length {self.max_length} cuts its prompts' video tokens ({kept} of "
                         f"{expanded} left): give a --max_length that holds them, or fewer video tokens "
                         "(--video_max_frames, --video_max_pixels, --video_total_pixels)")
