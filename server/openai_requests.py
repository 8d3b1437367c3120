"""An OpenAI request (`/v1/chat/completions`, `/v1/completions`) as what the engine takes: sampling
parameters, and for a chat the HF-form messages, their images and the rendered prompt ids."""

import json
import re

from protocol import (
    API_PREFIX,
    IMAGE_REF_PREFIX,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorCode,
    SamplingParams,
)
from server.config import ServeConfig
from server.engines.processing import ModelProcessing
from server.errors import APIError
from server.images import ImageCache

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Arguments `apply_chat_template` takes itself: chat_template_kwargs may not override them.
TEMPLATE_ARGS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                 "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                 "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise APIError(404, ErrorCode.not_found, f"model {model!r} is not served here; "
                       f"this server serves {served!r}", {"field": "model"})


def sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: bool,
                    top_logprobs: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          min_p=req.min_p, max_tokens=max_tokens, repetition_penalty=req.repetition_penalty,
                          stop=stop, seed=req.seed, logprobs=logprobs, top_logprobs=top_logprobs)


def image_ref(url: str, field: str, cache: ImageCache) -> dict:
    """An `image_url` as a /v1/generate image reference: `{"data": base64}` for a data URL,
    `{"sha256": hex}` for an image the server holds; anything else is refused."""
    if url.startswith(IMAGE_REF_PREFIX):
        sha = url[len(IMAGE_REF_PREFIX):]
        if not _SHA256.match(sha):
            raise APIError(400, ErrorCode.invalid_image, f"{field}: {IMAGE_REF_PREFIX} must be followed by the "
                           "image's lowercase hex sha256 (64 characters)", {"field": field})
        if sha not in cache:
            raise APIError(400, ErrorCode.unknown_image,
                           f"{field}: the server holds no image {sha} (never sent, or evicted from its cache); "
                           f"send it once as a data URL, or PUT it to {API_PREFIX}/images/{sha}",
                           {"field": field, "sha256": sha})
        return {"sha256": sha}
    head, _, b64 = url.partition(",")
    if head.startswith("data:image/") and head.endswith(";base64"):
        return {"data": b64}
    raise APIError(400, ErrorCode.invalid_image,
                   f"{field}: only data:image/...;base64 URLs, or {IMAGE_REF_PREFIX}<hex> naming an image the "
                   "server holds, are accepted (the server fetches nothing from the network)", {"field": field})


def hf_messages(req: ChatCompletionRequest, cache: ImageCache) -> tuple[list[dict], list[dict]]:
    """OpenAI messages -> the form chat templates read (transformers' and vLLM's), and the images."""
    messages, refs = [], []
    for mi, m in enumerate(req.messages):
        content = m.content if m.content is not None else ""
        if isinstance(content, list):
            parts = []
            for pi, part in enumerate(content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                else:
                    refs.append(image_ref(part.image_url.url, f"messages[{mi}].content[{pi}].image_url.url", cache))
                    parts.append({"type": "image"})
            content = parts
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = []
            for ci, call in enumerate(m.tool_calls):
                try:  # templates write the arguments object themselves (as vLLM hands it to them)
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = None
                if not isinstance(arguments, dict):
                    field = f"messages[{mi}].tool_calls[{ci}].function.arguments"
                    raise APIError(400, ErrorCode.invalid_request, f"{field} must be a JSON object in a string",
                                   {"field": field})
                msg["tool_calls"].append({"id": call.id, "type": "function",
                                          "function": {"name": call.function.name, "arguments": arguments}})
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    return messages, refs


def render(processing: ModelProcessing, config: ServeConfig, req: ChatCompletionRequest, messages: list[dict],
           n_images: int) -> list[int]:
    """The chat's prompt ids, one placeholder per image, by the request's template, else the
    --chat-template file's, else the model's; refused (400, naming that template) when the template
    cannot render what the chat holds (tools, tool calls, its images) or fails on it."""
    template = req.chat_template or config.chat_template
    which = ("the request's chat_template" if req.chat_template else "the --chat-template file"
             if config.chat_template else f"the chat template of {config.model_name}")
    source = template or processing.tokenizer.chat_template or ""
    for needs, given in (("tools", req.tools), ("tool_calls", any("tool_calls" in m for m in messages))):
        if given and needs not in str(source):
            raise APIError(400, ErrorCode.invalid_request,
                           f"{which} cannot render {needs} (it never reads `{needs}`, as the stock Qwen2-VL and "
                           "Qwen2.5-VL templates do not): start align-serve with --chat-template FILE holding a "
                           "tool-capable template (Qwen3-VL's style), or send one as `chat_template`",
                           {"field": "tools" if needs == "tools" else "messages", "template": which})
    kwargs = req.chat_template_kwargs or {}
    if reserved := sorted(TEMPLATE_ARGS & kwargs.keys()):
        raise APIError(400, ErrorCode.invalid_request, f"chat_template_kwargs may not set {', '.join(reserved)}: "
                       "the request's own fields do", {"field": "chat_template_kwargs"})
    try:
        ids = processing.chat_prompt_ids(messages, tools=req.tools, chat_template=template,
                                                 template_kwargs=kwargs)
    except Exception as exc:  # the template runs on the caller's messages: its failure is a bad request
        raise APIError(400, ErrorCode.invalid_request, f"{which} failed on these messages: {exc}",
                       {"field": "messages", "template": which}) from None
    if n_images and processing.image_token_id is None:
        raise APIError(400, ErrorCode.invalid_request, "messages hold images but the served model is text-only",
                       {"field": "messages"})
    placeholders = ids.count(processing.image_token_id) if processing.image_token_id is not None else 0
    if placeholders != n_images:
        raise APIError(400, ErrorCode.invalid_request,
                       f"{which} rendered {placeholders} image placeholders for the {n_images} images of these "
                       "messages: it drops (or invents) images, e.g. in tool messages; fix the template",
                       {"field": "messages", "template": which})
    return ids
