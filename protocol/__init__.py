"""The wire contract between `align-serve` and the training process (protocol v1).

Pydantic models only: both sides import this package and nothing of each other.
"""

from protocol.errors import ErrorBody, ErrorCode, ErrorEnvelope
from protocol.schemas import (
    API_PREFIX,
    PROTOCOL_VERSION,
    ChatCompletionRequest,
    Completion,
    GeneratePrompt,
    GenerateRequest,
    GenerateResponse,
    ImageRef,
    Limits,
    PromptResult,
    SamplingParams,
    ServerInfo,
    image_sha256,
)
from protocol.weights import (
    BYTE_TRANSPORTS,
    DTYPE_BYTES,
    ENGINE_TRANSPORTS,
    SESSION_HEADER,
    TensorSpec,
    Transport,
    WeightsCommitted,
    WeightsEngineCall,
    WeightsInit,
    WeightsSession,
    WeightsSessionRef,
    WeightsStatus,
)

__all__ = [
    "API_PREFIX",
    "BYTE_TRANSPORTS",
    "DTYPE_BYTES",
    "ENGINE_TRANSPORTS",
    "SESSION_HEADER",
    "TensorSpec",
    "Transport",
    "WeightsCommitted",
    "WeightsEngineCall",
    "WeightsInit",
    "WeightsSession",
    "WeightsSessionRef",
    "WeightsStatus",
    "PROTOCOL_VERSION",
    "ChatCompletionRequest",
    "Completion",
    "ErrorBody",
    "ErrorCode",
    "ErrorEnvelope",
    "GeneratePrompt",
    "GenerateRequest",
    "GenerateResponse",
    "ImageRef",
    "Limits",
    "PromptResult",
    "SamplingParams",
    "ServerInfo",
    "image_sha256",
]
