"""The weight-sync routes (`/v1/weights/*`), all behind the API key when one is set; the sync itself
is server/weights.py's `WeightReceiver`, at `app.state.weights`."""

from fastapi import APIRouter, Depends, Request

from protocol import (
    API_PREFIX,
    SESSION_HEADER,
    ErrorCode,
    WeightsCommitted,
    WeightsEngineCall,
    WeightsInit,
    WeightsSession,
    WeightsSessionRef,
    WeightsStatus,
)
from server.engines import TransferStep
from server.errors import WeightSyncError
from server.routes.deps import auth

PREFIX = f"{API_PREFIX}/weights"
# The steps a trainer drives; finish and abort come with commit and abort.
ROUTE_STEPS = (TransferStep.INIT, TransferStep.START, TransferStep.UPDATE)

router = APIRouter(dependencies=[Depends(auth)])


def require_loaded(request: Request) -> None:  # not `ready`: after a failed commit a new sync is how to recover
    if not hasattr(request.app.state.engine, "max_model_len"):
        raise WeightSyncError(503, ErrorCode.not_ready, "the model is still loading; poll GET /ready")


@router.post(f"{PREFIX}/init", dependencies=[Depends(require_loaded)])
async def weights_init(spec: WeightsInit, request: Request) -> WeightsSession:
    return await request.app.state.weights.init(spec, request.scope["server"][0])


@router.put(PREFIX + "/buckets/{index}")
async def weights_bucket(index: int, request: Request):
    return await request.app.state.weights.put_bucket(index, request.headers.get(SESSION_HEADER),
                                                      request.headers.get("content-length"), request.stream())


@router.post(PREFIX + "/engine/{step}")
async def weights_engine(step: str, call: WeightsEngineCall, request: Request):
    if step not in ROUTE_STEPS:
        raise WeightSyncError(404, ErrorCode.not_found, f"no engine step {step!r}: use init, start or update", "step")
    return await request.app.state.weights.engine_call(TransferStep(step), call)


@router.post(f"{PREFIX}/commit")
async def weights_commit(ref: WeightsSessionRef, request: Request) -> WeightsCommitted:
    return await request.app.state.weights.commit(ref.session_id)


@router.post(f"{PREFIX}/abort")
async def weights_abort(ref: WeightsSessionRef, request: Request):
    return await request.app.state.weights.abort(ref.session_id)


@router.get(f"{PREFIX}/version")
async def weights_version(request: Request) -> WeightsStatus:
    return request.app.state.weights.status()
