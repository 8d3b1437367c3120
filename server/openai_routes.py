"""OpenAI's `/v1/chat/completions` and `/v1/completions` with vLLM's extensions (token ids, top
logprobs, tools, streaming). What each field does: protocol/openai.py and docs/openai.md.

Token ids in and out follow /v1/generate's rule: one image placeholder per image, never the
processor-expanded run, so a client continues a conversation from exactly the ids it trains on.
"""

import asyncio
import json
import re
import time
import uuid

from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse

from protocol import (
    API_PREFIX,
    IMAGE_REF_PREFIX,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorCode,
    GeneratePrompt,
    SamplingParams,
)
from server.engines import Engine, EngineCompletion, EngineUnavailable
from server.errors import APIError
from server.tool_calls import parse_tool_calls

MIN_LOGPROB = -9999.0  # what vLLM's OpenAI server sends for -inf (truncated alternatives): JSON has no -inf
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Arguments `apply_chat_template` takes itself: chat_template_kwargs may not override them.
_TEMPLATE_ARGS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                  "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                  "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def add_openai_routes(app: FastAPI, engine: Engine, config, auth, require_ready, prepare, execute) -> None:
    images, metrics = app.state.images, app.state.metrics
    deps = [Depends(auth), Depends(require_ready)]

    def check_model(model: str | None) -> None:
        if model is not None and model != config.model_name:
            raise APIError(404, ErrorCode.not_found, f"model {model!r} is not served here; "
                           f"this server serves {config.model_name!r}", {"field": "model"})

    def sampling(req, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              min_p=req.min_p, max_tokens=max_tokens, repetition_penalty=req.repetition_penalty,
                              stop=stop, seed=req.seed, logprobs=logprobs, top_logprobs=top_logprobs)

    def image_ref(url: str, field: str) -> dict:
        if url.startswith(IMAGE_REF_PREFIX):
            sha = url[len(IMAGE_REF_PREFIX):]
            if not _SHA256.match(sha):
                raise APIError(400, ErrorCode.invalid_image, f"{field}: {IMAGE_REF_PREFIX} must be followed by the "
                               "image's lowercase hex sha256 (64 characters)", {"field": field})
            if sha not in images:
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

    def hf_messages(req: ChatCompletionRequest) -> tuple[list[dict], list[dict]]:
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
                        refs.append(image_ref(part.image_url.url, f"messages[{mi}].content[{pi}].image_url.url"))
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

    def render(req: ChatCompletionRequest, messages: list[dict], n_images: int) -> list[int]:
        template = req.chat_template or config.chat_template
        which = ("the request's chat_template" if req.chat_template else "the --chat-template file"
                 if config.chat_template else f"the chat template of {config.model_name}")
        source = template or engine.processing.tokenizer.chat_template or ""
        for needs, given in (("tools", req.tools), ("tool_calls", any("tool_calls" in m for m in messages))):
            if given and needs not in str(source):
                raise APIError(400, ErrorCode.invalid_request,
                               f"{which} cannot render {needs} (it never reads `{needs}`, as the stock Qwen2-VL and "
                               "Qwen2.5-VL templates do not): start align-serve with --chat-template FILE holding a "
                               "tool-capable template (Qwen3-VL's style), or send one as `chat_template`",
                               {"field": "tools" if needs == "tools" else "messages", "template": which})
        kwargs = req.chat_template_kwargs or {}
        if reserved := sorted(_TEMPLATE_ARGS & kwargs.keys()):
            raise APIError(400, ErrorCode.invalid_request, f"chat_template_kwargs may not set {', '.join(reserved)}: "
                           "the request's own fields do", {"field": "chat_template_kwargs"})
        try:
            ids = engine.processing.chat_prompt_ids(messages, tools=req.tools, chat_template=template,
                                                     template_kwargs=kwargs)
        except Exception as exc:  # the template runs on the caller's messages: its failure is a bad request
            raise APIError(400, ErrorCode.invalid_request, f"{which} failed on these messages: {exc}",
                           {"field": "messages", "template": which}) from None
        if n_images and engine.image_token_id is None:
            raise APIError(400, ErrorCode.invalid_request, "messages hold images but the served model is text-only",
                           {"field": "messages"})
        placeholders = ids.count(engine.image_token_id) if engine.image_token_id is not None else 0
        if placeholders != n_images:
            raise APIError(400, ErrorCode.invalid_request,
                           f"{which} rendered {placeholders} image placeholders for the {n_images} images of these "
                           "messages: it drops (or invents) images, e.g. in tool messages; fix the template",
                           {"field": "messages", "template": which})
        return ids

    def token_text(token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else engine.processing.tokenizer.decode([token_id])

    def chat_logprobs(c: EngineCompletion, as_ids: bool) -> list[dict]:
        def entry(t: int, lp: float) -> dict:
            text = token_text(t, as_ids)
            return {"token": text, "logprob": max(lp, MIN_LOGPROB), "bytes": list(text.encode())}

        tops = c.top_logprobs or [[] for _ in c.token_ids]
        return [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                for t, lp, top in zip(c.token_ids, c.logprobs, tops, strict=True)]

    def message_of(req: ChatCompletionRequest, c: EngineCompletion) -> tuple[str | None, list[dict], str]:
        if req.tools and req.tool_choice != "none":
            content, calls = parse_tool_calls(c.text)
            if calls:
                return content, calls, "tool_calls"
        return c.text, [], c.finish_reason

    def usage(eprompts, outs) -> dict:
        prompt_tokens = sum(engine.prompt_len(p) for p in eprompts)
        completion_tokens = sum(len(c.token_ids) for cs in outs for c in cs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def refused(exc: ValueError):
        return APIError(422, ErrorCode.invalid_request, str(exc))

    @app.post(API_PREFIX + "/chat/completions", dependencies=deps)
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        messages, refs = hf_messages(req)
        ids = render(req, messages, len(refs))
        try:
            params = sampling(req, req.max_completion_tokens or req.max_tokens or 256, req.logprobs,
                              req.top_logprobs or 0)
            prompt = GeneratePrompt(prompt_ids=ids, images=refs)
        except ValueError as exc:
            raise refused(exc) from None
        eprompts = await prepare([prompt], params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        if req.stream:
            return StreamingResponse(chat_events(req, head, ids, eprompts, params), media_type="text/event-stream")
        outs = await execute(eprompts, params)
        choices = []
        for k, c in enumerate(outs[0]):
            content, calls, reason = message_of(req, c)
            choice = {"index": k, "message": {"role": "assistant", "content": content, "tool_calls": calls},
                      "finish_reason": reason, "weight_version": c.weight_version,
                      "logprobs": {"content": chat_logprobs(c, req.return_tokens_as_token_ids)} if req.logprobs else None}
            if req.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        out = {**head, "object": "chat.completion", "choices": choices, "usage": usage(eprompts, outs),
               "system_fingerprint": f"weight_version-{outs[0][0].weight_version}"}
        if req.return_token_ids:
            out["prompt_token_ids"] = ids
        return out

    async def chat_events(req: ChatCompletionRequest, head: dict, ids: list[int], eprompts, params):
        """OpenAI's SSE chunks, each as soon as the engine has its tokens: token by token on vLLM, each
        whole completion at once on the transformers engine (Engine.stream). Tool calls are parsed from a
        whole completion, so with tools (and tool_choice not none) a choice's content waits for its end.
        A client that hangs up cancels the generation: Starlette cancels this generator, which cancels
        the engine's stream (vLLM aborts the request)."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        parse_tools = bool(req.tools and req.tool_choice != "none")

        def event(choices: list[dict], **extra) -> str:
            body = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            if include_usage:
                body.setdefault("usage", None)
            return f"data: {json.dumps(body)}\n\n"

        def token_events(k: int, c: EngineCompletion):
            entries = chat_logprobs(c, req.return_tokens_as_token_ids) if req.logprobs else None
            for j, (t, piece) in enumerate(zip(c.token_ids, text_pieces(c), strict=True)):
                choice = {"index": k, "delta": {"content": piece}, "finish_reason": None,
                          "logprobs": {"content": [entries[j]]} if entries else None}
                if req.return_token_ids:
                    choice["token_ids"] = [t]
                yield event([choice])

        first = {"prompt_token_ids": ids} if req.return_token_ids else {}
        yield event([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for k in range(params.n)], **first)
        held: dict[int, list[EngineCompletion]] = {}
        completion_tokens = 0
        try:
            async with asyncio.timeout(config.generate_timeout_s):
                async for k, part in engine.stream(eprompts[0], params):
                    completion_tokens += len(part.token_ids)
                    reason = part.finish_reason
                    if parse_tools:
                        held.setdefault(k, []).append(part)
                        if reason is None:
                            continue
                        whole = joined(held.pop(k))
                        content, calls, reason = message_of(req, whole)
                        if calls:
                            yield event([{"index": k, "logprobs": None, "finish_reason": None, "delta": {
                                "content": content, "tool_calls": [{"index": j, **call} for j, call in enumerate(calls)]}}])
                        else:
                            for chunk in token_events(k, whole):
                                yield chunk
                    else:
                        for chunk in token_events(k, part):
                            yield chunk
                    if reason is not None:
                        yield event([{"index": k, "delta": {}, "logprobs": None, "finish_reason": reason,
                                      "weight_version": part.weight_version}])
        except (TimeoutError, APIError, EngineUnavailable) as exc:
            if isinstance(exc, TimeoutError):
                status, code = 504, ErrorCode.timeout
                message = f"generation took longer than {config.generate_timeout_s:g} s (the server's --generate-timeout)"
            elif isinstance(exc, APIError):
                status, code, message = exc.status, exc.code, exc.message
            else:
                status, code, message = 503, ErrorCode.not_ready, f"{exc}; retry"
            yield f"data: {json.dumps({'error': {'code': code, 'message': message, 'status': status}})}\n\n"
            return
        metrics.prompts.inc()
        metrics.prompt_tokens.inc(engine.prompt_len(eprompts[0]))
        metrics.completion_tokens.inc(completion_tokens)
        if include_usage:
            prompt_tokens = engine.prompt_len(eprompts[0])
            yield event([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"

    def joined(parts: list[EngineCompletion]) -> EngineCompletion:
        """A streamed completion's parts as one."""
        def cat(field: str):
            lists = [getattr(p, field) for p in parts]
            return None if lists[0] is None else [x for xs in lists for x in xs]

        return EngineCompletion(token_ids=cat("token_ids"), logprobs=cat("logprobs"), text="".join(p.text for p in parts),
                                finish_reason=parts[-1].finish_reason, weight_version=parts[0].weight_version,
                                top_logprobs=cat("top_logprobs"))

    def text_pieces(c: EngineCompletion) -> list[str]:
        """Each token's share of the completion's text (a token that ends mid-character gets "", the
        next one the whole character); the pieces join to exactly `c.text`."""
        pieces, emitted = [], 0
        for j in range(len(c.token_ids)):
            text = engine.processing.tokenizer.decode(c.token_ids[: j + 1], skip_special_tokens=True)
            upto = emitted if text.endswith("\ufffd") else min(len(text), len(c.text))
            pieces.append(c.text[emitted:upto])
            emitted = max(emitted, upto)
        if pieces:
            pieces[-1] += c.text[emitted:]
        return pieces

    @app.post(API_PREFIX + "/completions", dependencies=deps)
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        tokenizer = engine.processing.tokenizer
        try:
            params = sampling(req, req.max_tokens or 16, req.logprobs is not None, req.logprobs or 0)
            gps = [GeneratePrompt(prompt_ids=p if isinstance(p, list) else tokenizer.encode(p)) for p in prompts]
        except ValueError as exc:
            raise refused(exc) from None
        eprompts = await prepare(gps, params)
        outs = await execute(eprompts, params)
        choices = []
        for i, cs in enumerate(outs):
            for k, c in enumerate(cs):
                choice = {"index": i * params.n + k, "text": c.text, "finish_reason": c.finish_reason,
                          "weight_version": c.weight_version, "logprobs": None}
                if req.logprobs is not None:
                    choice["logprobs"] = legacy_logprobs(c, req.return_tokens_as_token_ids)
                if req.return_token_ids:
                    choice["prompt_token_ids"] = eprompts[i].prompt_ids
                    choice["token_ids"] = c.token_ids
                choices.append(choice)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": config.model_name, "choices": choices, "usage": usage(eprompts, outs),
                "system_fingerprint": f"weight_version-{outs[0][0].weight_version}"}

    def legacy_logprobs(c: EngineCompletion, as_ids: bool) -> dict:
        """The completions route's form; each step's `top_logprobs` holds the sampled token and the k best (as vLLM)."""
        tokens = [token_text(t, as_ids) for t in c.token_ids]
        tops = c.top_logprobs or [[] for _ in c.token_ids]
        offsets, at = [], 0
        for t in c.token_ids:
            offsets.append(at)
            at += len(engine.processing.tokenizer.decode([t]))
        return {"tokens": tokens, "token_logprobs": [max(lp, MIN_LOGPROB) for lp in c.logprobs],
                "top_logprobs": [{tok: max(lp, MIN_LOGPROB), **{token_text(a, as_ids): max(alp, MIN_LOGPROB)
                                                               for a, alp in top}}
                                 for tok, lp, top in zip(tokens, c.logprobs, tops, strict=True)],
                "text_offset": offsets}
