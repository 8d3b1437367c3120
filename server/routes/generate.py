"""`POST /v1/generate`: token ids and images in, completions with their logprobs and weight version out."""

from fastapi import APIRouter, Depends, Request

from protocol import API_PREFIX, Completion, GenerateRequest, GenerateResponse, PromptResult
from server.generation import execute, prepare
from server.routes.deps import auth, require_ready

router = APIRouter(dependencies=[Depends(auth), Depends(require_ready)])


@router.post(API_PREFIX + "/generate")
async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:
    state = request.app.state
    eprompts = await prepare(state, req.prompts, req.sampling)
    outs = await execute(state, eprompts, req.sampling)
    results = [
        PromptResult(prompt_ids=p.prompt_ids, prompt_tokens=state.engine.prompt_len(p),
                     completions=[Completion(**c.__dict__) for c in cs])
        for p, cs in zip(eprompts, outs, strict=True)
    ]
    versions = {c.weight_version for cs in outs for c in cs}
    return GenerateResponse(results=results, weight_version=max(versions), instance_id=state.instance_id)
