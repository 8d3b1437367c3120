"""`align-serve`'s app (protocol v1): state, middleware, error handlers and routers wired together.
Routes stay thin: validation lives in `protocol`, work in the engine."""

import uuid

from fastapi import FastAPI

from server.config import ServeConfig
from server.engines import Engine
from server.exception_handlers import HANDLERS
from server.images import ImageCache
from server.metrics import Metrics
from server.middleware import RequestLifecycle
from server.routes import generate, health, images, openai, weights
from server.weights import WeightReceiver


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    # /openapi.json stays served: it states every bound the server enforces (tests/test_contract.py checks it)
    app = FastAPI(title="align-serve", version="1", docs_url=None, redoc_url=None, exception_handlers=HANDLERS)
    state = app.state
    state.engine, state.config = engine, config
    state.ready = False
    state.committing = False
    state.instance_id = uuid.uuid4().hex  # tells clients a restarted server from the one they pushed to
    state.metrics = Metrics()
    state.images = ImageCache(config.image_cache_bytes)
    state.weights = WeightReceiver(state, engine)
    app.router.on_shutdown.append(state.weights.close)

    app.add_middleware(RequestLifecycle, metrics=state.metrics, body_timeout_s=config.body_timeout_s)
    for module in (weights, health, images, generate, openai):
        app.include_router(module.router)
    return app
