"""The wire contract between `align-serve` and the training process (protocol v1).

Pydantic models only: both sides import this package and nothing of each other.
"""

from protocol.errors import ErrorBody, ErrorCode, ErrorEnvelope
from protocol.openai import IMAGE_REF_PREFIX, ChatCompletionRequest, CompletionRequest
from protocol.schemas import (
    API_PREFIX,
    MAX_PROMPTS_PER_REQUEST,
    MAX_SEQUENCES_PER_REQUEST,
    PROTOCOL_VERSION,
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
    LoraAdapter,
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
    "MAX_PROMPTS_PER_REQUEST",
    "MAX_SEQUENCES_PER_REQUEST",
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
    "CompletionRequest",
    "IMAGE_REF_PREFIX",
    "Completion",
    "ErrorBody",
    "ErrorCode",
    "ErrorEnvelope",
    "GeneratePrompt",
    "GenerateRequest",
    "GenerateResponse",
    "ImageRef",
    "Limits",
    "LoraAdapter",
    "PromptResult",
    "SamplingParams",
    "ServerInfo",
    "image_sha256",
]
