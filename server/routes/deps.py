"""What routes depend on: the API key, and a model ready to serve."""

import secrets

from fastapi import Request

from protocol import ErrorCode
from server.errors import APIError


async def auth(request: Request) -> None:
    api_key = request.app.state.config.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, ErrorCode.unauthorized,
                       "missing or wrong API key: send `Authorization: Bearer <key>` (the server's --api-key)")


def require_ready(request: Request) -> None:
    if not request.app.state.ready:
        raise APIError(503, ErrorCode.not_ready, "the model is still loading; poll GET /ready")
