"""`align-serve` routes (protocol v1). Routes stay thin: validation lives in `protocol`, work in the engine."""

import asyncio
import base64
import binascii
import logging
import re
import secrets
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import (
    API_PREFIX,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorCode,
    GeneratePrompt,
    GenerateRequest,
    GenerateResponse,
    Limits,
    PromptResult,
    SamplingParams,
    ServerInfo,
    image_sha256,
)
from server.engines import Engine, EnginePrompt, EngineUnavailable
from server.errors import APIError, envelope
from server.images import ImageCache, ImageError
from server.metrics import Metrics
from server.middleware import REQUEST_ID_HEADER, RequestLifecycle
from server.openai_routes import add_openai_routes
from server.weights import add_weight_routes

log = logging.getLogger("align-serve")


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_pixels: int = 4096 * 4096
    max_image_bytes: int = 16 * 1024 * 1024
    max_images_per_prompt: int = 8
    image_cache_bytes: int = 2 * 1024**3
    body_timeout_s: float = 300.0
    generate_timeout_s: float = 600.0
    chat_template: str | None = None  # --chat-template: replaces the model's own for every chat


_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _field(loc) -> str:
    # Union members show up in pydantic's loc as `constrained-str`, `list[...]`, `TextPart`: not fields.
    parts = [str(p) for p in loc if p != "body" and (isinstance(p, int) or _FIELD_NAME.match(str(p)))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _ranges(*models) -> dict[str, str]:
    """Field name -> its allowed range as text, from the models' own JSON schema (what /openapi.json says)."""
    out = {}
    for model in models:
        for name, prop in model.model_json_schema()["properties"].items():
            for p in [prop, *prop.get("anyOf", [])]:  # anyOf: an optional field's bounds sit in one member
                if "maximum" in p:  # every bounded field has both ends
                    lo = f"[{p['minimum']}" if "minimum" in p else f"({p['exclusiveMinimum']}"
                    out[name] = f"{lo}, {p['maximum']}]"
    return out


_RANGES = _ranges(SamplingParams, ChatCompletionRequest, CompletionRequest)
# Errors about the value's type (from each member of a union) say less than the one about its bounds.
_VAGUE = ("literal_error", "union_tag_invalid", "missing", "extra_forbidden")


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    # /openapi.json stays served: it states every bound the server enforces (tests/test_contract.py checks it)
    app = FastAPI(title="align-serve", version="1", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.ready = False
    app.state.committing = False
    app.state.instance_id = uuid.uuid4().hex  # tells clients a restarted server from the one they pushed to
    metrics = Metrics()
    images = ImageCache(config.image_cache_bytes)
    app.state.metrics, app.state.images = metrics, images

    # ---- errors: one envelope, 4xx for the caller's mistakes --------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return envelope(exc.status, exc.code, exc.message, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return envelope(400, ErrorCode.invalid_json, "request body is not valid JSON", str(errors[0].get("ctx", "")))
        errors = sorted(errors, key=lambda e: e["type"].endswith("_type") or e["type"] in _VAGUE)
        detail = []
        for e in errors:
            d = {"field": _field(e["loc"]), "message": e["msg"]}
            if e.get("ctx"):  # ctx can hold exceptions; keep the envelope JSON
                d["limit"] = {k: v if isinstance(v, int | float | str) else str(v) for k, v in e["ctx"].items()}
            name = next((str(p) for p in reversed(e["loc"]) if isinstance(p, str) and p in _RANGES), None)
            if name is not None and e["type"].startswith(("greater_than", "less_than")):
                d["range"] = _RANGES[name]
                d["message"] += f" (allowed range {_RANGES[name]})"
            detail.append(d)
        first = detail[0]
        return envelope(422, ErrorCode.invalid_request, f"{first['field']}: {first['message']}", detail)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(_, exc: EngineUnavailable):
        return envelope(503, ErrorCode.not_ready, f"{exc}; retry")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        code = ErrorCode.not_found if exc.status_code == 404 else ErrorCode.invalid_request
        return envelope(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # Route errors end in RequestLifecycle; this catches what fails around it.
        request_id = request.scope.get("state", {}).get("request_id", "-")
        log.error("request %s failed", request_id, exc_info=exc)
        response = envelope(500, ErrorCode.internal, f"internal error (request id {request_id}); the server log "
                            "has the traceback under this id", {"request_id": request_id})
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

    app.add_middleware(RequestLifecycle, metrics=metrics, body_timeout_s=config.body_timeout_s)

    async def auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, ErrorCode.unauthorized,
                           "missing or wrong API key: send `Authorization: Bearer <key>` (the server's --api-key)")

    def require_ready() -> None:
        if not app.state.ready:
            raise APIError(503, ErrorCode.not_ready, "the model is still loading; poll GET /ready")

    add_weight_routes(app, engine, auth)  # /v1/weights/*: init, buckets, commit, abort, version

    # ---- liveness, readiness, info, metrics ---------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", dependencies=[Depends(auth)])
    async def ready():
        if not app.state.ready:
            raise APIError(503, ErrorCode.not_ready, "the model is still loading")
        if app.state.committing:
            raise APIError(503, ErrorCode.not_ready, "a weight commit is in progress")
        return {"ready": True, "weight_version": engine.weight_version}

    def info() -> ServerInfo:
        return ServerInfo(
            model=config.model_name,
            engine=engine.name,
            weight_version=engine.weight_version,
            instance_id=app.state.instance_id,
            image_token_id=engine.image_token_id,
            eos_token_ids=engine.eos_token_ids,
            limits=Limits(max_model_len=engine.max_model_len, max_pixels=config.max_pixels,
                          max_image_bytes=config.max_image_bytes,
                          max_images_per_prompt=config.max_images_per_prompt,
                          max_lora_rank=engine.max_lora_rank),
        )

    @app.get(f"{API_PREFIX}/info", dependencies=[Depends(auth), Depends(require_ready)])
    async def get_info() -> ServerInfo:
        return info()

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def get_metrics():
        metrics.weight_version.set(engine.weight_version)
        metrics.cache_images.set(len(images))
        metrics.cache_bytes.set(images.bytes)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- images -------------------------------------------------------------------------------
    @app.put(API_PREFIX + "/images/{sha256}", dependencies=[Depends(auth)], status_code=201)
    async def put_image(sha256: str, request: Request):
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise APIError(400, ErrorCode.invalid_request, "the path must be the image's lowercase hex sha256")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_image_bytes:
            raise APIError(413, ErrorCode.too_large, f"image is {int(declared):,} bytes; the server accepts up to "
                           f"{config.max_image_bytes:,} (see --max-image-bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > config.max_image_bytes:
                raise APIError(413, ErrorCode.too_large,
                               f"image is over {config.max_image_bytes:,} bytes (see --max-image-bytes)")
        data = bytes(body)
        if image_sha256(data) != sha256:
            raise APIError(400, ErrorCode.invalid_image,
                           f"the body's sha256 is {image_sha256(data)}, not the {sha256} in the path")
        try:
            _, img = await asyncio.to_thread(images.add_bytes, data, f"image {sha256[:12]}",
                                             config.max_image_bytes, config.max_pixels)
        except ImageError as exc:
            raise APIError(exc.status, exc.code, exc.message) from None
        return {"sha256": sha256, "width": img.width, "height": img.height}

    @app.head(API_PREFIX + "/images/{sha256}", dependencies=[Depends(auth)])
    async def head_image(sha256: str):
        return Response(status_code=200 if sha256 in images else 404)

    # ---- generation ---------------------------------------------------------------------------
    def check_image_count(prompt: GeneratePrompt, i: int) -> None:
        if len(prompt.images) > config.max_images_per_prompt:
            raise APIError(400, ErrorCode.invalid_request,
                           f"prompts[{i}].images has {len(prompt.images)} images; the server accepts up to "
                           f"{config.max_images_per_prompt} per prompt (see --max-images-per-prompt)",
                           {"field": f"prompts[{i}].images", "limit": config.max_images_per_prompt})

    def decode_inline(prompts: list[GeneratePrompt]) -> dict[tuple[int, int], Image.Image]:
        """The images sent inline (`data`), decoded into the cache. Run off the event loop: a batch of
        big images takes a while to decode, and health checks and other requests go on meanwhile."""
        out = {}
        for i, prompt in enumerate(prompts):
            check_image_count(prompt, i)
            for j, ref in enumerate(prompt.images):
                if ref.data is None:
                    continue
                what = f"prompts[{i}].images[{j}]"
                try:
                    data = base64.b64decode(ref.data, validate=True)
                    _, out[i, j] = images.add_bytes(data, what, config.max_image_bytes, config.max_pixels)
                except binascii.Error:
                    raise APIError(400, ErrorCode.invalid_image, f"{what}.data is not valid base64",
                                   {"field": what}) from None
                except ImageError as exc:
                    raise APIError(exc.status, exc.code, exc.message, {"field": what}) from None
        return out

    def resolve_images(prompt: GeneratePrompt, i: int, inline: dict[tuple[int, int], Image.Image]) -> list:
        check_image_count(prompt, i)
        out = []
        for j, ref in enumerate(prompt.images):
            what = f"prompts[{i}].images[{j}]"
            if ref.sha256 is None:
                out.append(inline[i, j])
                continue
            img = images.get(ref.sha256)
            if img is None:
                raise APIError(400, ErrorCode.unknown_image,
                               f"{what}: the server holds no image {ref.sha256}; PUT it to "
                               f"{API_PREFIX}/images/{ref.sha256} first",
                               {"field": what, "sha256": ref.sha256})
            out.append(img)
        return out

    def to_engine_prompt(prompt: GeneratePrompt, i: int, sampling: SamplingParams,
                         inline: dict[tuple[int, int], Image.Image]) -> EnginePrompt:
        if prompt.images and engine.image_token_id is None:
            raise APIError(400, ErrorCode.invalid_request, f"prompts[{i}].images: the served model is text-only",
                           {"field": f"prompts[{i}].images"})
        imgs = resolve_images(prompt, i, inline)
        if prompt.messages is not None:
            msgs = [m.model_dump() for m in prompt.messages]
            n_parts = sum(1 for m in msgs if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
            if n_parts != len(imgs):
                raise APIError(400, ErrorCode.invalid_request,
                               f"prompts[{i}].messages has {n_parts} image parts but {len(imgs)} images",
                               {"field": f"prompts[{i}].images"})
            ids = engine.processing.chat_prompt_ids(msgs, chat_template=config.chat_template)
        else:
            ids = prompt.prompt_ids
            vocab = len(engine.processing.tokenizer)
            bad = next((t for t in ids if t < 0 or t >= vocab), None)
            if bad is not None:
                raise APIError(400, ErrorCode.invalid_request,
                               f"prompts[{i}].prompt_ids holds token id {bad}, outside the vocabulary [0, {vocab})",
                               {"field": f"prompts[{i}].prompt_ids"})
            placeholders = ids.count(engine.image_token_id) if engine.image_token_id is not None else 0
            if placeholders != len(imgs):
                raise APIError(
                    400, ErrorCode.invalid_request,
                    f"prompts[{i}].prompt_ids has {placeholders} image placeholder tokens "
                    f"(id {engine.image_token_id}) but {len(imgs)} images; send exactly one placeholder per "
                    "image, not the processor-expanded run (AlignClient collapses runs for you)",
                    {"field": f"prompts[{i}].prompt_ids"})
        ep = EnginePrompt(prompt_ids=list(ids), images=imgs)
        length = engine.prompt_len(ep)
        if length + sampling.max_tokens > engine.max_model_len:
            raise APIError(
                400, ErrorCode.context_length,
                f"prompts[{i}] takes {length} tokens (images expanded) and sampling.max_tokens is "
                f"{sampling.max_tokens}: {length + sampling.max_tokens} is over max_model_len {engine.max_model_len}",
                {"field": f"prompts[{i}]", "prompt_tokens": length, "max_tokens": sampling.max_tokens,
                 "max_model_len": engine.max_model_len})
        return ep

    async def prepare(prompts: list[GeneratePrompt], sampling: SamplingParams) -> list[EnginePrompt]:
        """Everything that can refuse a request (a 4xx) before any generation starts."""
        inline = await asyncio.to_thread(decode_inline, prompts) if any(r.data for p in prompts for r in p.images) else {}
        return [to_engine_prompt(p, i, sampling, inline) for i, p in enumerate(prompts)]

    async def execute(eprompts: list[EnginePrompt], sampling: SamplingParams):
        try:
            outs = await asyncio.wait_for(engine.generate(eprompts, sampling), config.generate_timeout_s)
        except TimeoutError:
            raise APIError(504, ErrorCode.timeout, f"generation took longer than {config.generate_timeout_s:g} s "
                           "(the server's --generate-timeout); send fewer prompts, a smaller n or max_tokens, or "
                           "retry when the server is less busy", {"timeout_s": config.generate_timeout_s}) from None
        metrics.prompts.inc(len(eprompts))
        metrics.prompt_tokens.inc(sum(engine.prompt_len(p) for p in eprompts))
        metrics.completion_tokens.inc(sum(len(c.token_ids) for cs in outs for c in cs))
        return outs

    @app.post(API_PREFIX + "/generate", dependencies=[Depends(auth), Depends(require_ready)])
    async def generate(req: GenerateRequest) -> GenerateResponse:
        eprompts = await prepare(req.prompts, req.sampling)
        outs = await execute(eprompts, req.sampling)
        results = [
            PromptResult(prompt_ids=p.prompt_ids, completions=[Completion(**c.__dict__) for c in cs])
            for p, cs in zip(eprompts, outs, strict=True)
        ]
        versions = {c.weight_version for cs in outs for c in cs}
        return GenerateResponse(results=results, weight_version=max(versions), instance_id=app.state.instance_id)

    # ---- OpenAI-compatible subset ---------------------------------------------------------------
    @app.get(API_PREFIX + "/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                              "owned_by": "align-serve"}]}

    add_openai_routes(app, engine, config, auth, require_ready, prepare, execute)  # chat, completions

    return app
