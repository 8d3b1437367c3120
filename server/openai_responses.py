"""Engine completions as OpenAI's response bodies: logprobs in the chat and the legacy completions
form, tool calls parsed out of the text, usage, and a chat's SSE stream."""

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

from starlette.datastructures import State

from protocol import ChatCompletionRequest, ErrorCode, SamplingParams
from server.engines import Engine, EngineCompletion, EnginePrompt, EngineUnavailable
from server.errors import APIError
from server.generation import count_generated
from server.tool_calls import parse_tool_calls

MIN_LOGPROB = -9999.0  # what vLLM's OpenAI server sends for -inf (truncated alternatives): JSON has no -inf


def token_text(tokenizer, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else tokenizer.decode([token_id])


def chat_logprobs(tokenizer, c: EngineCompletion, as_ids: bool) -> list[dict]:
    """The chat form: per token its text, logprob, UTF-8 bytes and `top_logprobs` alternatives."""
    def entry(t: int, lp: float) -> dict:
        text = token_text(tokenizer, t, as_ids)
        return {"token": text, "logprob": max(lp, MIN_LOGPROB), "bytes": list(text.encode())}

    tops = c.top_logprobs or [[] for _ in c.token_ids]
    return [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
            for t, lp, top in zip(c.token_ids, c.logprobs, tops, strict=True)]


def legacy_logprobs(tokenizer, c: EngineCompletion, as_ids: bool) -> dict:
    """The completions route's form; each step's `top_logprobs` holds the sampled token and the k best (as vLLM)."""
    tokens = [token_text(tokenizer, t, as_ids) for t in c.token_ids]
    tops = c.top_logprobs or [[] for _ in c.token_ids]
    offsets, at = [], 0
    for t in c.token_ids:
        offsets.append(at)
        at += len(tokenizer.decode([t]))
    return {"tokens": tokens, "token_logprobs": [max(lp, MIN_LOGPROB) for lp in c.logprobs],
            "top_logprobs": [{tok: max(lp, MIN_LOGPROB), **{token_text(tokenizer, a, as_ids): max(alp, MIN_LOGPROB)
                                                           for a, alp in top}}
                             for tok, lp, top in zip(tokens, c.logprobs, tops, strict=True)],
            "text_offset": offsets}


def message_of(req: ChatCompletionRequest, c: EngineCompletion) -> tuple[str | None, list[dict], str]:
    """(content, tool calls, finish reason) of a whole completion: with tools (and tool_choice not
    none) the calls parsed out of its text, and "tool_calls" as the reason when there are any."""
    if req.tools and req.tool_choice != "none":
        content, calls = parse_tool_calls(c.text)
        if calls:
            return content, calls, "tool_calls"
    return c.text, [], c.finish_reason


def usage(engine: Engine, eprompts: list[EnginePrompt], outs: list[list[EngineCompletion]]) -> dict:
    prompt_tokens = sum(engine.prompt_len(p) for p in eprompts)
    completion_tokens = sum(len(c.token_ids) for cs in outs for c in cs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def joined(parts: list[EngineCompletion]) -> EngineCompletion:
    """A streamed completion's parts as one."""
    def cat(field: str):
        lists = [getattr(p, field) for p in parts]
        return None if lists[0] is None else [x for xs in lists for x in xs]

    return EngineCompletion(token_ids=cat("token_ids"), logprobs=cat("logprobs"), text="".join(p.text for p in parts),
                            finish_reason=parts[-1].finish_reason, weight_version=parts[0].weight_version,
                            top_logprobs=cat("top_logprobs"))


def text_pieces(tokenizer, c: EngineCompletion) -> list[str]:
    """Each token's share of the completion's text (a token that ends mid-character gets "", the
    next one the whole character); the pieces join to exactly `c.text`."""
    pieces, emitted = [], 0
    for j in range(len(c.token_ids)):
        text = tokenizer.decode(c.token_ids[: j + 1], skip_special_tokens=True)
        upto = emitted if text.endswith("\ufffd") else min(len(text), len(c.text))
        pieces.append(c.text[emitted:upto])
        emitted = max(emitted, upto)
    if pieces:
        pieces[-1] += c.text[emitted:]
    return pieces


class ChatStream:
    """OpenAI's SSE chunks of one chat completion request, each as soon as the engine has its tokens:
    token by token on vLLM, each whole completion at once on the transformers engine (Engine.stream).
    Tool calls are parsed from a whole completion, so with tools (and tool_choice not none) a choice's
    content waits for its end. A client that hangs up cancels the generation: Starlette cancels this
    generator, which cancels the engine's stream (vLLM aborts the request)."""

    def __init__(self, state: State, req: ChatCompletionRequest, head: dict, ids: list[int]):
        self.state, self.req, self.head, self.ids = state, req, head, ids
        self.tokenizer = state.engine.processing.tokenizer
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(self, choices: list[dict], **extra) -> str:
        body = {**self.head, "object": "chat.completion.chunk", "choices": choices, **extra}
        if self.include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    def token_events(self, k: int, c: EngineCompletion) -> Iterator[str]:
        """Choice k's tokens, one chunk each."""
        req = self.req
        entries = chat_logprobs(self.tokenizer, c, req.return_tokens_as_token_ids) if req.logprobs else None
        for j, (t, piece) in enumerate(zip(c.token_ids, text_pieces(self.tokenizer, c), strict=True)):
            choice = {"index": k, "delta": {"content": piece}, "finish_reason": None,
                      "logprobs": {"content": [entries[j]]} if entries else None}
            if req.return_token_ids:
                choice["token_ids"] = [t]
            yield self.event([choice])

    async def events(self, eprompt: EnginePrompt, params: SamplingParams) -> AsyncIterator[str]:
        req, engine, timeout_s = self.req, self.state.engine, self.state.config.generate_timeout_s
        parse_tools = bool(req.tools and req.tool_choice != "none")
        first = {"prompt_token_ids": self.ids} if req.return_token_ids else {}
        yield self.event([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None} for k in range(params.n)], **first)
        held: dict[int, list[EngineCompletion]] = {}
        completion_tokens = 0
        try:
            async with asyncio.timeout(timeout_s):
                async for k, part in engine.stream(eprompt, params):
                    completion_tokens += len(part.token_ids)
                    reason = part.finish_reason
                    if parse_tools:
                        held.setdefault(k, []).append(part)
                        if reason is None:
                            continue
                        whole = joined(held.pop(k))
                        content, calls, reason = message_of(req, whole)
                        if calls:
                            yield self.event([{"index": k, "logprobs": None, "finish_reason": None, "delta": {
                                "content": content, "tool_calls": [{"index": j, **call} for j, call in enumerate(calls)]}}])
                        else:
                            for chunk in self.token_events(k, whole):
                                yield chunk
                    else:
                        for chunk in self.token_events(k, part):
                            yield chunk
                    if reason is not None:
                        yield self.event([{"index": k, "delta": {}, "logprobs": None, "finish_reason": reason,
                                           "weight_version": part.weight_version}])
        except (TimeoutError, APIError, EngineUnavailable) as exc:
            if isinstance(exc, TimeoutError):
                status, code = 504, ErrorCode.timeout
                message = f"generation took longer than {timeout_s:g} s (the server's --generate-timeout)"
            elif isinstance(exc, APIError):
                status, code, message = exc.status, exc.code, exc.message
            else:
                status, code, message = 503, ErrorCode.not_ready, f"{exc}; retry"
            yield f"data: {json.dumps({'error': {'code': code, 'message': message, 'status': status}})}\n\n"
            return
        prompt_tokens = engine.prompt_len(eprompt)
        count_generated(self.state, 1, prompt_tokens, completion_tokens)
        if self.include_usage:
            yield self.event([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                        "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"
