"""Request and response models of protocol v1.

Prompts carry token ids with ONE placeholder token per image (never the processor-expanded run):
the server expands placeholders itself, so a client can never make it expand them twice.
Images travel once, by sha256 (`PUT /v1/images/{sha256}`), or inline as base64.
"""

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = "v1"
API_PREFIX = "/v1"

MAX_N = 512
MAX_PROMPTS_PER_REQUEST = 8192
MAX_SEQUENCES_PER_REQUEST = 16384  # prompts x n: bigger batches go as several requests


def image_sha256(data: bytes) -> str:
    """The content address of an image: hex sha256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


class _Strict(BaseModel):
    # Unknown fields are a client bug (a typo such as `max_token` would silently use a default).
    model_config = ConfigDict(extra="forbid")


class SamplingParams(_Strict):
    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1, description="new tokens per completion")
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    logprobs: bool = Field(True, description="return each sampled token's logprob")


class ImageRef(_Strict):
    """An image by content hash (uploaded before) or inline base64 bytes."""

    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    data: str | None = Field(None, description="base64 of the encoded image (PNG, JPEG, ...)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        if (self.sha256 is None) == (self.data is None):
            raise ValueError("give exactly one of `sha256` or `data`")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    """A placeholder: the prompt's `images` fill image parts in order."""

    type: Literal["image"]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart]


class GeneratePrompt(_Strict):
    prompt_ids: list[int] | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    images: list[ImageRef] = Field(default_factory=list)

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
    text: str
    finish_reason: Literal["stop", "length"]
    weight_version: int


class PromptResult(BaseModel):
    prompt_ids: list[int]  # one placeholder per image, as the engine was given them
    completions: list[Completion]


class GenerateResponse(BaseModel):
    results: list[PromptResult]
    weight_version: int  # the version that produced every completion of this response
    # Random per server process start: a changed id means the server restarted (its weights are
    # its start checkpoint again, its versions count from 0). Several servers: their ids, comma-joined.
    instance_id: str


class Limits(BaseModel):
    max_model_len: int
    max_pixels: int
    max_image_bytes: int
    max_images_per_prompt: int
    max_n: int = MAX_N
    max_prompts_per_request: int = MAX_PROMPTS_PER_REQUEST
    max_sequences_per_request: int = MAX_SEQUENCES_PER_REQUEST


class ServerInfo(BaseModel):
    protocol_version: str = PROTOCOL_VERSION
    model: str
    engine: Literal["vllm", "transformers"]
    weight_version: int
    instance_id: str  # random per server process start (see GenerateResponse)
    image_token_id: int | None
    eos_token_ids: list[int]
    limits: Limits


# OpenAI-compatible subset: only what the server honours is accepted.


class ImageURL(BaseModel):
    url: str


class OpenAITextPart(BaseModel):
    type: Literal["text"]
    text: str


class OpenAIImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class OpenAIMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[OpenAITextPart | OpenAIImagePart]


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[OpenAIMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    # vLLM-style extras many clients send through `extra_body`
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
