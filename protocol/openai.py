"""The OpenAI dialect align-serve speaks (`/v1/chat/completions`, `/v1/completions`), with vLLM's
extensions for RL and agent frameworks (token ids in and out, top logprobs, tools).

Nothing is dropped silently. Every field is one of:
- honoured: it changes what is rendered, sampled or returned, as OpenAI or vLLM define it;
- inert: accepted and without effect on what is sampled (`user`, `metadata`, `store`, ...);
- refused: it would change what is sampled and the server cannot honour it: a value other than
  its no-op value gets a 422 naming the field (`presence_penalty`, `logit_bias`, ...).
Any other field gets a 422 naming it (a typo must not fall back to a default).
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.schemas import (
    MAX_MESSAGES,
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS_PER_REQUEST,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    MaxTokens,
    MinP,
    N,
    RepetitionPenalty,
    Seed,
    StopString,
    Temperature,
    Text,
    TopK,
    TopP,
    _sampling_temperature,
)

# `image_url.url` naming an image the server already holds: `sha256:` + the hex sha256 of its encoded
# bytes (what PUT /v1/images/{sha256} stores, and what every data URL sent before was stored under).
IMAGE_REF_PREFIX = "sha256:"

# Fields that would change what is sampled, which no engine here applies -> their no-op value (None: none).
REFUSED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "min_tokens": 0,
           "ignore_eos": False, "structured_outputs": None, "guided_json": None, "guided_regex": None,
           "guided_choice": None, "prompt_logprobs": None, "response_format": {"type": "text"}, "echo": False,
           "suffix": None}

TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str = Field(description=f"`data:image/...;base64,...` or `{IMAGE_REF_PREFIX}<hex sha256>` of an image "
                                 "the server holds; network URLs are refused (the server fetches nothing)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="inert")


class OpenAITextPart(_Strict):
    type: Literal["text"]
    text: Text


class OpenAIImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, in a string (OpenAI's form)")


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[OpenAITextPart | OpenAIImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # What the openai package writes back when a response's message is sent as the next turn: only null.
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None


class _Sampling(_Strict):
    """What both routes share: the sampling fields, vLLM's extras, and the refused and inert fields."""

    model: str | None = None
    n: N = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    max_tokens: MaxTokens | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    # vLLM's extras many clients send through `extra_body`
    top_k: TopK = -1
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    return_token_ids: bool = Field(False, description="top-level or per-choice prompt_token_ids, per-choice "
                                                      "token_ids (one placeholder per image)")
    return_tokens_as_token_ids: bool = Field(False, description="logprob tokens as `token_id:N`")
    # Refused (see REFUSED): declared so /openapi.json lists them; a value other than the no-op gets a 422.
    presence_penalty: float | None = Field(None, description="refused unless 0")
    frequency_penalty: float | None = Field(None, description="refused unless 0")
    logit_bias: dict[str, float] | None = Field(None, description="refused unless empty")
    best_of: int | None = Field(None, description="refused unless 1")
    min_tokens: int | None = Field(None, description="refused unless 0")
    ignore_eos: bool | None = Field(None, description="refused unless false")
    structured_outputs: Any = Field(None, description="refused")
    guided_json: Any = Field(None, description="refused")
    guided_regex: Any = Field(None, description="refused")
    guided_choice: Any = Field(None, description="refused")
    prompt_logprobs: Any = Field(None, description="refused")
    # Inert: they change nothing that is sampled or returned.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    _temperature = field_validator("temperature")(_sampling_temperature)

    @field_validator(*REFUSED, check_fields=False)
    @classmethod
    def _refused(cls, v, info):
        noop = REFUSED[info.field_name]
        if v is not None and v != noop:
            raise ValueError(f"{info.field_name} is not honoured by align-serve (it would change what is sampled "
                             "and neither engine applies it): leave it out" + (f" or send {noop!r}" if noop is not None else ""))
        return v


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: Literal[False] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="OpenAI function schemas, rendered by the chat "
                                                                 "template as given")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="auto (the default with tools) parses "
                                                                          "tool calls; none only renders the tools")
    parallel_tool_calls: bool | None = Field(None, description="inert: every call the model makes is parsed")
    chat_template: str | None = Field(None, description="a Jinja chat template for this request")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra template variables, e.g. "
                                                                          "enable_thinking")
    response_format: dict[str, Any] | None = Field(None, description="refused unless {'type': 'text'}")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v):
        if isinstance(v, dict) or v == "required":
            raise ValueError(f"tool_choice {v!r} is not honoured: the engines here cannot constrain decoding to a "
                             "tool call; send 'auto' (parse calls the model makes) or 'none'")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        for i, tool in enumerate(v or []):
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                 "'parameters': ...}}")
        return v

    @model_validator(mode="after")
    def _logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


Prompt = Annotated[list[int], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]


class CompletionRequest(_Sampling):
    prompt: (Text | Prompt | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)]
             | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)])
    logprobs: TopLogprobs | None = Field(None, description="0: the sampled token's logprob; k: and k alternatives")
    echo: bool | None = Field(None, description="refused unless false")
    suffix: Any = Field(None, description="refused")
    stream: Literal[False] = False
