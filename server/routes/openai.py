"""OpenAI's `/v1/models`, `/v1/chat/completions` and `/v1/completions` with vLLM's extensions (token
ids, top logprobs, tools, streaming). What each field does: protocol/openai.py and docs/openai.md.

Token ids in and out follow /v1/generate's rule: one image placeholder per image, never the
processor-expanded run, so a client continues a conversation from exactly the ids it trains on.
"""

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from protocol import API_PREFIX, ChatCompletionRequest, CompletionRequest, ErrorCode, GeneratePrompt
from server.errors import APIError
from server.generation import execute, prepare
from server.openai_requests import check_model, hf_messages, render, sampling_params
from server.openai_responses import ChatStream, chat_logprobs, legacy_logprobs, message_of, usage
from server.routes.deps import auth, require_ready

router = APIRouter(dependencies=[Depends(auth)])
_ready = [Depends(require_ready)]


def _refused(exc: ValueError) -> APIError:
    return APIError(422, ErrorCode.invalid_request, str(exc))


@router.get(API_PREFIX + "/models")
async def models(request: Request):
    return {"object": "list", "data": [{"id": request.app.state.config.model_name, "object": "model", "created": 0,
                                        "owned_by": "align-serve"}]}


@router.post(API_PREFIX + "/chat/completions", dependencies=_ready)
async def chat(req: ChatCompletionRequest, request: Request):
    state = request.app.state
    engine, config = state.engine, state.config
    check_model(req.model, config.model_name)
    messages, refs = hf_messages(req, state.images)
    ids = render(engine.processing, config, req, messages, len(refs))
    try:
        params = sampling_params(req, req.max_completion_tokens or req.max_tokens or 256, req.logprobs,
                                 req.top_logprobs or 0)
        prompt = GeneratePrompt(prompt_ids=ids, images=refs)
    except ValueError as exc:
        raise _refused(exc) from None
    eprompts = await prepare(state, [prompt], params)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
    if req.stream:
        return StreamingResponse(ChatStream(state, req, head, ids).events(eprompts[0], params),
                                 media_type="text/event-stream")
    outs = await execute(state, eprompts, params)
    tokenizer = engine.processing.tokenizer
    choices = []
    for k, c in enumerate(outs[0]):
        content, calls, reason = message_of(req, c)
        choice = {"index": k, "message": {"role": "assistant", "content": content, "tool_calls": calls},
                  "finish_reason": reason, "weight_version": c.weight_version,
                  "logprobs": ({"content": chat_logprobs(tokenizer, c, req.return_tokens_as_token_ids)}
                               if req.logprobs else None)}
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        choices.append(choice)
    out = {**head, "object": "chat.completion", "choices": choices, "usage": usage(engine, eprompts, outs),
           "system_fingerprint": f"weight_version-{outs[0][0].weight_version}"}
    if req.return_token_ids:
        out["prompt_token_ids"] = ids
    return out


@router.post(API_PREFIX + "/completions", dependencies=_ready)
async def completions(req: CompletionRequest, request: Request):
    state = request.app.state
    engine, config = state.engine, state.config
    check_model(req.model, config.model_name)
    prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
    tokenizer = engine.processing.tokenizer
    try:
        params = sampling_params(req, req.max_tokens or 16, req.logprobs is not None, req.logprobs or 0)
        gps = [GeneratePrompt(prompt_ids=p if isinstance(p, list) else tokenizer.encode(p)) for p in prompts]
    except ValueError as exc:
        raise _refused(exc) from None
    eprompts = await prepare(state, gps, params)
    outs = await execute(state, eprompts, params)
    choices = []
    for i, cs in enumerate(outs):
        for k, c in enumerate(cs):
            choice = {"index": i * params.n + k, "text": c.text, "finish_reason": c.finish_reason,
                      "weight_version": c.weight_version, "logprobs": None}
            if req.logprobs is not None:
                choice["logprobs"] = legacy_logprobs(tokenizer, c, req.return_tokens_as_token_ids)
            if req.return_token_ids:
                choice["prompt_token_ids"] = eprompts[i].prompt_ids
                choice["token_ids"] = c.token_ids
            choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": config.model_name, "choices": choices, "usage": usage(engine, eprompts, outs),
            "system_fingerprint": f"weight_version-{outs[0][0].weight_version}"}
