"""One error envelope for every failure: `{"error": {"code", "message", "detail"}}`."""

from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class ErrorCode(StrEnum):
    invalid_json = "invalid_json"
    invalid_request = "invalid_request"  # a field failed validation; detail names it
    unauthorized = "unauthorized"
    not_found = "not_found"
    unknown_image = "unknown_image"  # a prompt refers to an image hash the server does not hold
    invalid_image = "invalid_image"  # bytes that do not decode as an image, or a hash mismatch
    too_large = "too_large"  # image bytes or pixels over the server's limits
    context_length = "context_length"  # prompt (+ max_tokens) over max_model_len
    not_ready = "not_ready"  # model still loading or a weight commit in progress
    conflict = "conflict"  # e.g. a second trainer syncing weights while one already is
    timeout = "timeout"  # 408: the request body came too slowly; 504: generation ran past --generate-timeout
    internal = "internal"


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    detail: Any = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
