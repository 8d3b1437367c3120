"""Liveness, readiness, what the server serves (`/v1/info`), Prometheus metrics."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol import API_PREFIX, ErrorCode, Limits, ServerInfo
from server.errors import APIError
from server.routes.deps import auth, require_ready

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready", dependencies=[Depends(auth)])
async def ready(request: Request):
    state = request.app.state
    if not state.ready:
        raise APIError(503, ErrorCode.not_ready, "the model is still loading")
    if state.committing:
        raise APIError(503, ErrorCode.not_ready, "a weight commit is in progress")
    return {"ready": True, "weight_version": state.engine.weight_version}


@router.get(f"{API_PREFIX}/info", dependencies=[Depends(auth), Depends(require_ready)])
async def get_info(request: Request) -> ServerInfo:
    state = request.app.state
    engine, config = state.engine, state.config
    return ServerInfo(
        model=config.model_name,
        engine=engine.name,
        weight_version=engine.weight_version,
        instance_id=state.instance_id,
        image_token_id=engine.image_token_id,
        eos_token_ids=engine.eos_token_ids,
        limits=Limits(max_model_len=engine.max_model_len, max_pixels=config.max_pixels,
                      max_image_bytes=config.max_image_bytes,
                      max_images_per_prompt=config.max_images_per_prompt,
                      max_videos_per_prompt=config.max_videos_per_prompt,
                      max_lora_rank=engine.max_lora_rank),
        dtype=engine.dtype_name,
        video_token_id=engine.processing.video_token_id if config.max_videos_per_prompt else None,
        video_budgets=engine.processing.images.video_budgets() if config.max_videos_per_prompt else None,
    )


@router.get("/metrics", dependencies=[Depends(auth)])
async def get_metrics(request: Request):
    state = request.app.state
    metrics, images = state.metrics, state.images
    metrics.weight_version.set(state.engine.weight_version)
    metrics.cache_images.set(len(images))
    metrics.cache_bytes.set(images.bytes)
    metrics.images_received.set(images.received)
    metrics.image_bytes_received.set(images.received_bytes)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
