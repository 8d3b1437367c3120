"""What `align-serve`'s flags set for the routes (the engine's flags go to the engine)."""

from dataclasses import dataclass


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_pixels: int = 4096 * 4096
    max_image_bytes: int = 16 * 1024 * 1024
    max_images_per_prompt: int = 8
    max_images_why: str = "see --max-images-per-prompt"  # or the model family's reason for a lower limit
    max_videos_per_prompt: int = 1
    video_refusal: str | None = None  # why the served model takes no video (then max_videos_per_prompt is 0)
    max_frames_per_video: int = 0  # the served model's video budget (its video processor's max_frames)
    video_fps_read_by: str | None = None  # the served family, where it reads each video's fps (Family.video_fps)
    image_cache_bytes: int = 2 * 1024**3
    body_timeout_s: float = 300.0
    generate_timeout_s: float = 600.0
    chat_template: str | None = None  # --chat-template: replaces the model's own for every chat
