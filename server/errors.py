"""The one error type routes raise, and the envelope every error answer has."""

from fastapi.responses import JSONResponse

from protocol import ErrorBody, ErrorCode, ErrorEnvelope


class APIError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str, detail=None):
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def envelope(status: int, code: ErrorCode, message: str, detail=None) -> JSONResponse:
    body = ErrorEnvelope(error=ErrorBody(code=code, message=message, detail=detail))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


class WeightSyncError(APIError):
    """A refused weight-sync call; `field` (and any more detail) lands in the envelope's detail."""

    def __init__(self, status: int, code: ErrorCode, message: str, field: str | None = None, **detail):
        super().__init__(status, code, message, {"field": field, **detail} if field else (detail or None))
