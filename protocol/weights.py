"""Weight sync (protocol v1): one sync = init (manifest + bucket layout) -> buckets -> commit.

The manifest names every tensor (the training model's HF parameter names), its dtype and shape and,
for the byte transports (http, tcp, shm), where its bytes sit: bucket `bucket`, byte `offset`. A
bucket is a packed run of tensors, hundreds of MB, never one call per tensor. The GPU transports
(nccl, ipc) carry no layout: vLLM's own weight-transfer engines pack the bytes themselves.

A sync carries either the whole model or, with `adapter`, one LoRA adapter: its PEFT config and
its `lora_A` / `lora_B` tensors under PEFT's saved names (`get_peft_model_state_dict`:
`base_model.model.<module>.lora_A.weight`), raw, with alpha/r not folded in. The server applies
the adapter on top of the base weights it serves; a later full sync replaces the base and drops
the adapter.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Transport = Literal["http", "tcp", "shm", "nccl", "ipc"]
BYTE_TRANSPORTS = ("http", "tcp", "shm")  # the server stages these bytes itself before a commit
ENGINE_TRANSPORTS = ("nccl", "ipc")  # driven by vLLM's weight-transfer engines (GPU)

# Element sizes of the dtypes a sync may carry (torch names without the `torch.` prefix).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
               "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
WeightDType = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]

SESSION_HEADER = "X-Weights-Session"  # names the sync a `PUT /v1/weights/buckets/{i}` belongs to


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str = Field(min_length=1)
    dtype: WeightDType
    shape: list[int] = Field(description="full shape; each dimension >= 0")
    bucket: int | None = Field(None, ge=0, description="byte transports: the bucket holding this tensor")
    offset: int | None = Field(None, ge=0, description="byte transports: byte offset inside that bucket")

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


class LoraAdapter(_Strict):
    """PEFT's `LoraConfig` fields that decide what the adapter computes. The last three describe
    features no engine here applies; they are part of the contract so the server can refuse them
    by name instead of serving something else than the trainer trains."""

    r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    target_modules: list[str] | str = Field(description="PEFT's: module names, or one regex")
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None


class WeightsInit(_Strict):
    transport: Transport
    tensors: list[TensorSpec] = Field(min_length=1)
    buckets: list[int] = Field(default_factory=list, description="byte transports: each bucket's size in bytes")
    target_version: int | None = Field(None, ge=1, description="the version this sync makes; default current + 1")
    session_timeout_s: float = Field(60.0, gt=0, le=3600,
                                     description="idle seconds after which the server drops this sync")
    engine_init_info: dict[str, Any] | None = Field(
        None, description="nccl/ipc: vLLM's `init_weight_transfer_engine` payload, to (re)open the transfer group")
    adapter: LoraAdapter | None = Field(None, description="a LoRA adapter sync (PEFT names), not the whole model")

    @model_validator(mode="after")
    def _layout(self) -> "WeightsInit":
        seen: set[str] = set()
        for i, t in enumerate(self.tensors):
            if t.name in seen:
                raise ValueError(f"tensors[{i}].name {t.name!r} appears twice")
            seen.add(t.name)
            if any(d < 0 for d in t.shape):
                raise ValueError(f"tensors[{i}].shape {t.shape} has a negative dimension")
        if self.transport in ENGINE_TRANSPORTS:
            return self
        if not self.buckets:
            raise ValueError(f"buckets: the {self.transport} transport needs a bucket layout")
        if any(b <= 0 for b in self.buckets):
            raise ValueError("buckets: every bucket size must be > 0 bytes")
        spans: list[list[tuple[int, int, int]]] = [[] for _ in self.buckets]
        for i, t in enumerate(self.tensors):
            if t.bucket is None or t.offset is None:
                raise ValueError(f"tensors[{i}] ({t.name}): the {self.transport} transport needs `bucket` and `offset`")
            if t.bucket >= len(self.buckets):
                raise ValueError(f"tensors[{i}].bucket {t.bucket} is out of range: there are {len(self.buckets)} buckets")
            if t.offset % DTYPE_BYTES[t.dtype]:
                raise ValueError(f"tensors[{i}].offset {t.offset} is not a multiple of the {t.dtype} element size")
            if t.offset + t.nbytes > self.buckets[t.bucket]:
                raise ValueError(f"tensors[{i}] ({t.name}) ends at byte {t.offset + t.nbytes}, past the end of "
                                 f"bucket {t.bucket} ({self.buckets[t.bucket]} bytes)")
            spans[t.bucket].append((t.offset, t.offset + t.nbytes, i))
        for b, rows in enumerate(spans):
            rows.sort()
            for (_, end, i), (start, _, j) in zip(rows, rows[1:], strict=False):
                if start < end:
                    raise ValueError(f"tensors[{j}] overlaps tensors[{i}] in bucket {b}")
        return self


class WeightsSession(BaseModel):
    """The server's answer to an init: what the sender needs to stream the buckets."""

    session_id: str
    transport: Transport
    weight_version: int  # being served now
    target_version: int  # what a commit of this sync makes
    buckets: int
    session_timeout_s: float
    shm_path: str | None = None  # shm: the staging file to write the buckets into (bucket i at sum(buckets[:i]))
    tcp_port: int | None = None  # tcp: the TCPStore port of the gloo group (server is rank 1, sender rank 0)


class WeightsSessionRef(_Strict):
    session_id: str


class WeightsEngineCall(_Strict):
    """nccl/ipc: one of vLLM's weight-transfer calls, forwarded to the inference workers."""

    session_id: str
    info: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=dict)


class WeightsCommitted(BaseModel):
    weight_version: int
    previous_version: int
    bytes: int
    seconds: float  # server-side time from init to the swap being done


class WeightsStatus(BaseModel):
    weight_version: int
    syncing: bool  # a sync session is open
    transports: list[Transport]  # what this server's engine accepts
    workers: int = 1  # inference workers that join an nccl group (tensor x pipeline parallel)
    max_lora_rank: int | None = None  # the largest adapter rank it serves; None: it takes no adapter sync
    received_buckets: int | None = None
    total_buckets: int | None = None
