"""Every error answer in one envelope (server/errors.py), 4xx for the caller's mistakes: the
exception handlers `create_app` installs."""

import logging
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import ChatCompletionRequest, CompletionRequest, ErrorCode, SamplingParams
from server.engines import EngineUnavailable
from server.errors import APIError, envelope
from server.middleware import REQUEST_ID_HEADER, internal_error

log = logging.getLogger("align-serve")

_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def field_path(loc) -> str:
    """A pydantic error's location as the field path the envelope names: `prompts[0].images[1]`."""
    # Union members show up in pydantic's loc as `constrained-str`, `list[...]`, `TextPart`: not fields.
    parts = [str(p) for p in loc if p != "body" and (isinstance(p, int) or _FIELD_NAME.match(str(p)))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def ranges(*models) -> dict[str, str]:
    """Field name -> its allowed range as text, from the models' own JSON schema (what /openapi.json says)."""
    out = {}
    for model in models:
        for name, prop in model.model_json_schema()["properties"].items():
            for p in [prop, *prop.get("anyOf", [])]:  # anyOf: an optional field's bounds sit in one member
                if "maximum" in p:  # every bounded field has both ends
                    lo = f"[{p['minimum']}" if "minimum" in p else f"({p['exclusiveMinimum']}"
                    out[name] = f"{lo}, {p['maximum']}]"
    return out


_RANGES = ranges(SamplingParams, ChatCompletionRequest, CompletionRequest)
# Errors about the value's type (from each member of a union) say less than the one about its bounds.
_VAGUE = ("literal_error", "union_tag_invalid", "missing", "extra_forbidden")


async def api_error(_, exc: APIError):
    return envelope(exc.status, exc.code, exc.message, exc.detail)


async def validation_error(_, exc: RequestValidationError):
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return envelope(400, ErrorCode.invalid_json, "request body is not valid JSON", str(errors[0].get("ctx", "")))
    errors = sorted(errors, key=lambda e: e["type"].endswith("_type") or e["type"] in _VAGUE)
    detail = []
    for e in errors:
        d = {"field": field_path(e["loc"]), "message": e["msg"]}
        if e.get("ctx"):  # ctx can hold exceptions; keep the envelope JSON
            d["limit"] = {k: v if isinstance(v, int | float | str) else str(v) for k, v in e["ctx"].items()}
        name = next((str(p) for p in reversed(e["loc"]) if isinstance(p, str) and p in _RANGES), None)
        if name is not None and e["type"].startswith(("greater_than", "less_than")):
            d["range"] = _RANGES[name]
            d["message"] += f" (allowed range {_RANGES[name]})"
        detail.append(d)
    first = detail[0]
    return envelope(422, ErrorCode.invalid_request, f"{first['field']}: {first['message']}", detail)


async def unavailable(_, exc: EngineUnavailable):
    return envelope(503, ErrorCode.not_ready, f"{exc}; retry")


async def http_error(_, exc: StarletteHTTPException):
    code = ErrorCode.not_found if exc.status_code == 404 else ErrorCode.invalid_request
    return envelope(exc.status_code, code, str(exc.detail))


async def internal(request: Request, exc: Exception):
    # Route errors end in RequestLifecycle; this catches what fails around it.
    request_id = request.scope.get("state", {}).get("request_id", "-")
    log.error("request %s failed", request_id, exc_info=exc)
    response = internal_error(request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


HANDLERS = {
    APIError: api_error,
    RequestValidationError: validation_error,
    EngineUnavailable: unavailable,
    StarletteHTTPException: http_error,
    Exception: internal,
}
