"""Request and response models of protocol v1.

Prompts carry token ids with ONE placeholder token per image (never the processor-expanded run):
the server expands placeholders itself, so a client can never make it expand them twice.
Images travel once, by sha256 (`PUT /v1/images/{sha256}`), or inline as base64.
A video is the list of frames the client sampled, each frame an image that travels the same way, and
one placeholder per video in `prompt_ids`.
"""

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROTOCOL_VERSION = "v1"
API_PREFIX = "/v1"

MAX_N = 512
MAX_PROMPTS_PER_REQUEST = 8192
MAX_SEQUENCES_PER_REQUEST = 16384  # prompts x n: bigger batches go as several requests

# Sampling bounds both engines run without overflow (vLLM's `SamplingParams._verify_args` is the
# reference): outside them transformers' logits processors divide into inf/NaN.
MAX_TEMPERATURE = 2.0  # vLLM refuses more
MIN_SAMPLING_TEMPERATURE = 0.01  # vLLM clamps (0, 0.01) up; transformers overflows near 0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_INT32 = 2**31 - 1  # vLLM keeps top_k and max_tokens in int32 buffers
# torch.Generator and vLLM (int64 over msgpack) take more, but 2**53 - 1 is the largest integer a JSON
# number carries exactly everywhere, and what /openapi.json (float bounds) can state exactly.
MAX_SEED = 2**53 - 1
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_PROMPT_TOKENS = 1 << 20
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1 << 22
MAX_FRAMES_PER_VIDEO = 4096  # the wire's bound; the served model's video budget (/v1/info) is lower
MAX_VIDEO_FPS = 1000.0  # above any camera's rate: a larger value is a unit mistake (frames per millisecond?)
SHA256_PATTERN = r"^[0-9a-f]{64}$"

N = Annotated[int, Field(ge=1, le=MAX_N, description="completions per prompt")]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE, description=(
    f"0 means greedy; otherwise between {MIN_SAMPLING_TEMPERATURE} and {MAX_TEMPERATURE}"))]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1, le=MAX_INT32, description="-1 or 0 disables top-k")]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_INT32, description="new tokens per completion")]
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                           description="1 disables it")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


def _sampling_temperature(t: float) -> float:
    if 0.0 < t < MIN_SAMPLING_TEMPERATURE:
        raise ValueError(f"temperature {t:g} is below {MIN_SAMPLING_TEMPERATURE}: send 0 for greedy decoding or "
                         f"a value in [{MIN_SAMPLING_TEMPERATURE}, {MAX_TEMPERATURE}]")
    return t


def image_sha256(data: bytes) -> str:
    """The content address of an image: hex sha256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


class _Strict(BaseModel):
    # Unknown fields are a client bug (a typo such as `max_token` would silently use a default).
    model_config = ConfigDict(extra="forbid")


class SamplingParams(_Strict):
    n: N = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    max_tokens: MaxTokens = 16
    repetition_penalty: RepetitionPenalty = 1.0
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: Seed | None = None
    logprobs: bool = Field(True, description="return each sampled token's logprob")
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: also the k most likely tokens of each "
                                                          "step, under the same (processed) distribution")

    _temperature = field_validator("temperature")(_sampling_temperature)


class ImageRef(_Strict):
    """An image by content hash (uploaded before) or inline base64 bytes."""

    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    data: str | None = Field(None, description="base64 of the encoded image (PNG, JPEG, ...)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        if (self.sha256 is None) == (self.data is None):
            raise ValueError("give exactly one of `sha256` or `data`")
        return self


class VideoRef(_Strict):
    """A video as the frames the client sampled from it, in order, all of one size: each frame an image
    (by hash once the server holds it, or inline), so a video's frames cross the wire once."""

    frames: list[ImageRef] = Field(min_length=1, max_length=MAX_FRAMES_PER_VIDEO)
    # The frames' timing: frame k was taken at k / fps seconds. Qwen2.5-VL's positions and Qwen3-VL's
    # timestamps depend on it: the server refuses a video without it for a family that reads it.
    fps: float | None = Field(None, gt=0, le=MAX_VIDEO_FPS, allow_inf_nan=False,
                              description="the rate the frames were sampled at, frames per second")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImagePart(_Strict):
    """A placeholder: the prompt's `images` fill image parts in order."""

    type: Literal["image"]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart | ImagePart]


class GeneratePrompt(_Strict):
    prompt_ids: list[int] | None = Field(None, min_length=1, max_length=MAX_PROMPT_TOKENS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    images: list[ImageRef] = Field(default_factory=list)
    # One video marker per video in prompt_ids (the processor's `video_token`, /v1/info's video_token_id).
    # None rather than empty: a request without videos is the same bytes an older server accepts.
    videos: list[VideoRef] | None = None

    @model_validator(mode="after")
    def _ids_or_messages(self) -> "GeneratePrompt":
        if (self.prompt_ids is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt_ids` or `messages`")
        return self


class GenerateRequest(_Strict):
    prompts: list[GeneratePrompt] = Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)
    sampling: SamplingParams = Field(default_factory=SamplingParams)

    @model_validator(mode="after")
    def _bounded(self) -> "GenerateRequest":
        total = len(self.prompts) * self.sampling.n
        if total > MAX_SEQUENCES_PER_REQUEST:
            raise ValueError(f"{len(self.prompts)} prompts x n={self.sampling.n} = {total} sequences; one request "
                             f"takes up to {MAX_SEQUENCES_PER_REQUEST} (split the batch)")
        return self


class Completion(BaseModel):
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per step: (token id, logprob), most likely first
    text: str
    finish_reason: Literal["stop", "length"]
    weight_version: int


class PromptResult(BaseModel):
    prompt_ids: list[int]  # one placeholder per image, as the engine was given them
    # The positions the model reads for this prompt, each image expanded by the server's processor: a
    # client holding the expanded ids can tell whether both sides expand its images alike.
    prompt_tokens: int | None = None
    completions: list[Completion]


class GenerateResponse(BaseModel):
    results: list[PromptResult]
    weight_version: int  # the version that produced every completion of this response
    # Random per server process start: a changed id means the server restarted (its weights are
    # its start checkpoint again, its versions count from 0). Several servers: their ids, comma-joined.
    instance_id: str


class VideoBudgets(BaseModel):
    """The served model's video processor budgets, named as the HF video processor names them: what the
    server expands each video with. A trainer that samples and counts frames by other budgets would
    count other tokens than the server's."""

    fps: float | None  # frames per second the client samples at (no effect on Qwen2-VL's tokens)
    max_frames: int  # frames one video may hold (the server refuses more)
    min_pixels: int  # each frame is resized to between min_pixels and max_pixels
    max_pixels: int
    max_video_tokens: int | None = None  # with cap_pixels_per_frame: the whole video's budget
    cap_pixels_per_frame: bool | None = None


class Limits(BaseModel):
    max_model_len: int
    max_pixels: int
    max_image_bytes: int
    max_images_per_prompt: int
    max_videos_per_prompt: int = 0  # 0: the served model takes no video
    max_n: int = MAX_N
    max_prompts_per_request: int = MAX_PROMPTS_PER_REQUEST
    max_sequences_per_request: int = MAX_SEQUENCES_PER_REQUEST
    max_lora_rank: int | None = None  # `--enable-lora`: the largest adapter rank a sync may carry; None: no adapters


class ServerInfo(BaseModel):
    protocol_version: str = PROTOCOL_VERSION
    model: str
    engine: Literal["vllm", "transformers"]
    weight_version: int
    instance_id: str  # random per server process start (see GenerateResponse)
    # the marker a prompt holds once per image, as the chat template renders it (not always the feature
    # token the processor expands it to: Gemma 3's is <start_of_image>); None for a text-only model
    image_token_id: int | None
    eos_token_ids: list[int]
    limits: Limits
    dtype: str | None = None  # what the served model computes in (float32, bfloat16, ...)
    # the marker a prompt holds once per video (the processor's video_token); None: no video served
    video_token_id: int | None = None
    video_budgets: VideoBudgets | None = None
