"""Send weights to `align-serve`: pack tensors into buckets, stream them, commit.

One sync = `POST /v1/weights/init` (manifest + bucket layout) -> the buckets -> `POST /v1/weights/commit`,
which returns the new `weight_version`. Buckets are hundreds of MB of packed tensors, never one call
per tensor. Transports:

- `shm`: same host, no GPU: the tensors are copied straight into the server's staging file in
  /dev/shm (one memory copy, the floor).
- `tcp`: a gloo group with the server (CPU, any host that can reach an extra port).
- `http`: raw bucket bytes over the API port: works through anything that passes HTTP.
- `nccl` / `ipc` (vLLM engine on GPU): vLLM's own trainer-side weight-transfer engines, driven
  through the server's routes; the transfer group is opened once and reused.
- `auto`: nccl for CUDA weights, shm for a server on this host, http otherwise.
"""

import base64
import contextlib
import datetime
import ipaddress
import logging
import math
import mmap
import os
import pickle
import socket
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlparse

import torch

from protocol import (
    API_PREFIX,
    DTYPE_BYTES,
    SESSION_HEADER,
    LoraAdapter,
    TensorSpec,
    WeightsCommitted,
    WeightsInit,
    WeightsSession,
    WeightsStatus,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 * 1024**2
_ALIGN = 64  # every tensor starts on a 64-byte boundary inside its bucket
_HTTP_CHUNK = 16 * 1024**2
PREFIX = f"{API_PREFIX}/weights"

class TransportError(ValueError):
    """A weight transport that cannot work between this trainer and that server: one line to show."""


Weights = torch.nn.Module | dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
Progress = Callable[[int, int], None]  # (bytes sent so far, total bytes)


# ---- what to send --------------------------------------------------------------------------------
def _peft_base_name(name: str) -> str | None:
    """A PEFT parameter name -> the base model's, or None for adapter-only tensors."""
    if "lora_" in name or ".original_module." in name:
        return None
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def is_peft_model(weights) -> bool:
    return isinstance(weights, torch.nn.Module) and hasattr(weights, "merge_adapter") and hasattr(weights, "peft_config")


@contextlib.contextmanager
def named_weights(weights: Weights, name_map: Callable[[str], str] | None = None, merge: bool = True):
    """The (name, tensor) pairs to send. A PEFT model is merged for the duration (base names,
    adapters folded in) and unmerged after, so training continues on the unmerged adapters; with
    `merge=False` it gives the base weights alone (what an adapter sync goes on top of)."""
    is_peft = is_peft_model(weights)
    merge = merge and is_peft
    if merge:
        weights.merge_adapter()
    try:
        if isinstance(weights, torch.nn.Module):
            pairs = list(weights.named_parameters())
            if is_peft:
                pairs = [(n, t) for n, t in ((_peft_base_name(n), t) for n, t in pairs) if n is not None]
        elif isinstance(weights, dict):
            pairs = list(weights.items())
        else:
            pairs = list(weights)
        if name_map is not None:
            pairs = [(name_map(n), t) for n, t in pairs]
        # A ZeRO-3 parameter stays itself: its gather (weights.Gathered) needs the Parameter.
        yield [(n, t if hasattr(t, "ds_id") else t.detach()) for n, t in pairs]
    finally:
        if merge:
            weights.unmerge_adapter()


def adapter_weights(model) -> tuple[list[tuple[str, torch.Tensor]], LoraAdapter]:
    """A PEFT model's active LoRA adapter as an adapter sync carries it: the tensors under PEFT's
    saved names (`get_peft_model_state_dict`, raw A and B) and the config fields that shape them."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter
    config = model.peft_config[name]
    targets = config.target_modules
    adapter = LoraAdapter(
        r=config.r, lora_alpha=config.lora_alpha,
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        use_rslora=config.use_rslora, rank_pattern=dict(config.rank_pattern or {}),
        alpha_pattern=dict(config.alpha_pattern or {}), use_dora=bool(config.use_dora), bias=config.bias,
        modules_to_save=sorted(config.modules_to_save) if config.modules_to_save else None)
    # PEFT's names, picked from the parameters themselves rather than `state_dict()`, whose detached copies
    # drop ZeRO-3's partition metadata: a sharded adapter would read as whole, and the main process alone
    # would gather it while the others skip the collective. A ZeRO-3 parameter stays itself (its gather
    # needs the Parameter); an FSDP2 DTensor stays a DTensor when detached.
    state = get_peft_model_state_dict(model, state_dict=dict(model.named_parameters()), adapter_name=name)
    return [(n, t if hasattr(t, "ds_id") else t.detach()) for n, t in state.items()], adapter


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"cannot send a {t.dtype} tensor; supported: {', '.join(DTYPE_BYTES)}")
    return name


def full_shape(t: torch.Tensor) -> list[int]:
    """The whole tensor's shape: a DTensor reports it, a ZeRO-3 placeholder (shape [0]) keeps it aside."""
    return list(getattr(t, "ds_shape", t.shape))


def plan_buckets(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> tuple[list[TensorSpec], list[int]]:
    """Greedy packing in order: a bucket closes when the next tensor would overflow it; a tensor
    bigger than `bucket_bytes` gets a bucket of its own."""
    specs, sizes, used = [], [], 0
    for name, t in pairs:
        nbytes = math.prod(full_shape(t)) * t.element_size()
        offset = -(-used // _ALIGN) * _ALIGN
        if not sizes or (used > 0 and offset + nbytes > bucket_bytes):
            sizes.append(0)
            offset = 0
        specs.append(TensorSpec(name=name, dtype=_dtype_name(t), shape=full_shape(t), bucket=len(sizes) - 1,
                                offset=offset))
        used = offset + nbytes
        sizes[-1] = max(used, 1)
    return specs, sizes


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu").contiguous().reshape(-1).view(torch.uint8)


def is_sharded(pairs) -> bool:
    """FSDP2 parameters are DTensors, DeepSpeed ZeRO-3's are placeholders with a `ds_id`: each rank
    holds a shard, and the full tensor is a collective."""
    return any(hasattr(t, "full_tensor") or hasattr(t, "ds_id") for _, t in pairs)


def _full(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # FSDP2
        return t.full_tensor()
    if hasattr(t, "ds_id"):  # ZeRO-3: whole inside the context only, so keep a copy
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.data.detach().clone()
    return t


class Gathered:
    """The full tensors of `pairs`, in order, one at a time. A sharded one (FSDP2, ZeRO-3) is gathered
    when it is reached, a collective every rank runs in this same order: so a rank holds its shard
    plus the tensor in hand, and the bucket being sent, never the whole model. `finish()` runs the
    gathers a failed send did not reach (the other ranks are waiting in them)."""

    def __init__(self, pairs):
        self._tensors = (_full(t) for _, t in pairs)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._tensors

    def finish(self) -> None:
        for _ in self._tensors:
            pass


def host_copy(pairs, keep: bool) -> list[tuple[str, torch.Tensor]] | None:
    """A full copy of `pairs` in host memory, to send while training goes on. A sharded model's
    tensors are gathered one at a time by every process together; those with `keep=False` drop them."""
    copy = []
    for (name, _), t in zip(pairs, Gathered(pairs), strict=True):
        if keep:
            copy.append((name, t.to("cpu", copy=True)))
    return copy if keep else None


def _pack(tensors: Iterator[torch.Tensor], specs, bucket: int, out: torch.Tensor) -> None:
    """Bucket `bucket`'s tensors, the next ones of `tensors` (buckets hold runs of the plan)."""
    for s in specs:
        if s.bucket == bucket:
            out[s.offset : s.offset + s.nbytes].copy_(_as_bytes(next(tensors)))


class _Chunks:
    """A bucket as an HTTP body: memoryview chunks (no copy to `bytes`), re-iterable for retries."""

    def __init__(self, buf: torch.Tensor):
        self.view = memoryview(buf.numpy())

    def __iter__(self) -> Iterator[memoryview]:
        for start in range(0, len(self.view), _HTTP_CHUNK):
            yield self.view[start : start + _HTTP_CHUNK]


# ---- transports ------------------------------------------------------------------------------------
def _send_http(client, server: int, session: WeightsSession, tensors, specs, sizes, progress: Progress | None):
    buf = torch.empty(max(sizes), dtype=torch.uint8)
    sent, total = 0, sum(sizes)
    for i, size in enumerate(sizes):
        body = buf[:size]
        _pack(tensors, specs, i, body)
        client._request(server, "PUT", f"{PREFIX}/buckets/{i}", content=_Chunks(body),
                        headers={SESSION_HEADER: session.session_id, "Content-Type": "application/octet-stream",
                                 "Content-Length": str(size)})
        sent += size
        if progress:
            progress(sent, total)


def _send_tcp(client, server: int, session: WeightsSession, tensors, specs, sizes, progress: Progress | None):
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

    host = urlparse(client.base_urls[server]).hostname
    timeout = datetime.timedelta(seconds=session.session_timeout_s)
    store = TCPStore(host, session.tcp_port, 2, False, timeout)
    # gloo listens too: on the address the server reaches us at, not on every interface.
    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [ProcessGroupGloo.create_device(hostname=_local_address_towards(host))]
    group = ProcessGroupGloo(PrefixStore(session.session_id, store), 0, 2, options)
    # Two buffers: pack bucket i+1 while bucket i is on the wire.
    bufs = [torch.empty(max(sizes), dtype=torch.uint8) for _ in range(min(2, len(sizes)))]
    pending, sent, total = None, 0, sum(sizes)
    for i, size in enumerate(sizes):
        body = bufs[i % 2][:size]
        _pack(tensors, specs, i, body)
        if pending is not None:
            pending.wait()
            sent += sizes[i - 1]
            if progress:
                progress(sent, total)
        pending = group.send([body], 1, i)
    pending.wait()
    if progress:
        progress(total, total)


def _send_shm(session: WeightsSession, tensors, specs, sizes, progress: Progress | None):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    fd = os.open(session.shm_path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, sum(sizes))
    finally:
        os.close(fd)
    dest = torch.frombuffer(mapped, dtype=torch.uint8)
    sent, total = 0, sum(sizes)
    for t, s in zip(tensors, specs, strict=True):
        start = starts[s.bucket] + s.offset
        dest[start : start + s.nbytes].copy_(_as_bytes(t))
        sent += s.nbytes
        if progress:
            progress(sent, total)
    del dest
    mapped.close()


class _ServerSyncClient:
    """vLLM's `VLLMWeightSyncClient` over our routes, so vLLM's own trainer engines (nccl, ipc) drive
    the transfer while the server keeps its versioning and not-ready-until-commit guarantees."""

    def __init__(self, client, server: int):
        self.client, self.server = client, server
        self.session_id: str | None = None
        self.committed: WeightsCommitted | None = None

    def _call(self, step: str, info) -> None:
        self.client._request(self.server, "POST", f"{PREFIX}/engine/{step}",
                             json={"session_id": self.session_id, "info": info})

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._call("init", init_info)

    def start_weight_update(self) -> None:
        self._call("start", {})

    def update_weights(self, update_info) -> None:
        if isinstance(update_info, dict) and update_info.get("ipc_handles") is not None:
            # CUDA IPC handles are not JSON: vLLM's own HTTP route takes them pickled (the server
            # needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 to accept that; keep ipc on loopback).
            handles = update_info.pop("ipc_handles")
            update_info["ipc_handles_pickled"] = base64.b64encode(pickle.dumps(handles)).decode()
        self._call("update", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        r = self.client._request(self.server, "POST", f"{PREFIX}/commit", json={"session_id": self.session_id})
        self.committed = WeightsCommitted.model_validate(r.json())


def _local_address_towards(host: str) -> str:
    """The address of this machine that `host` can reach us at (the nccl rendezvous, gloo's listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _send_engine(client, server: int, transport: str, session: WeightsSession, pairs, tensors,
                 status: WeightsStatus) -> WeightsCommitted:
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    class Source(WeightSource):
        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(full_shape(t))) for n, t in pairs]

        def __iter__(self):
            return zip((n for n, _ in pairs), tensors, strict=True)

    engines = client.__dict__.setdefault("_weight_engines", {})
    key = (server, transport)
    if key not in engines:  # open the transfer group once; later syncs reuse it
        sync_client = _ServerSyncClient(client, server)
        sync_client.session_id = session.session_id
        if transport == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            host = urlparse(client.base_urls[server]).hostname
            info = NCCLTrainerInitInfo(master_address=_local_address_towards(host), master_port=_free_port(),
                                       world_size=1 + status.workers, rank=0)
        else:
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(packed=True, rank=0)
        engines[key] = WeightTransferTrainerFactory.trainer_init(info, client=sync_client, source=Source())
    engine = engines[key]
    engine.client.session_id = session.session_id
    engine.source = Source()
    engine.send_weights()  # start -> update(s) -> finish (our commit)
    return engine.client.committed


# ---- one sync ----------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pick_transport(client, server: int, pairs, status: WeightsStatus) -> str:
    on_gpu = any(t.is_cuda for _, t in pairs)
    if on_gpu and "nccl" in status.transports:
        return "nccl"
    host = urlparse(client.base_urls[server]).hostname or ""
    if _is_loopback(host) and "shm" in status.transports and os.path.isdir("/dev/shm"):
        return "shm"
    return "http"


def push_one(client, server: int, pairs: list[tuple[str, torch.Tensor]], transport: str = "auto",
             bucket_bytes: int = DEFAULT_BUCKET_BYTES, target_version: int | None = None,
             session_timeout_s: float = 60.0, progress: Progress | None = None,
             adapter: LoraAdapter | None = None, tensors: Gathered | None = None) -> WeightsCommitted:
    """One sync of `pairs` to server number `server` of `client`: the whole model or, with
    `adapter`, that LoRA adapter's tensors (PEFT names, see `adapter_weights`). The bytes come from
    `tensors` (default: `Gathered(pairs)`), read once, in order."""
    tensors = iter(tensors if tensors is not None else Gathered(pairs))
    status = WeightsStatus.model_validate(client._request(server, "GET", f"{PREFIX}/version").json())
    chosen = _pick_transport(client, server, pairs, status) if transport == "auto" else transport
    if adapter is not None and transport == "auto" and chosen in ("nccl", "ipc"):  # byte transports only
        chosen = "shm" if "shm" in status.transports and _is_loopback(
            urlparse(client.base_urls[server]).hostname or "") else "http"
    if chosen not in status.transports:
        raise TransportError(f"{client.base_urls[server]} does not take the {chosen} transport; it takes "
                         f"{', '.join(status.transports)}")
    if chosen in ("nccl", "ipc"):
        init = WeightsInit(transport=chosen, target_version=target_version, session_timeout_s=session_timeout_s,
                           tensors=[TensorSpec(name=n, dtype=_dtype_name(t), shape=full_shape(t)) for n, t in pairs])
    else:
        specs, sizes = plan_buckets(pairs, bucket_bytes)
        init = WeightsInit(transport=chosen, tensors=specs, buckets=sizes, target_version=target_version,
                           session_timeout_s=session_timeout_s, adapter=adapter)
    r = client._request(server, "POST", f"{PREFIX}/init", json=init.model_dump(mode="json", exclude_none=True))
    session = WeightsSession.model_validate(r.json())
    try:
        if chosen in ("nccl", "ipc"):
            return _send_engine(client, server, chosen, session, pairs, tensors, status)
        if chosen == "shm":
            try:
                _send_shm(session, tensors, init.tensors, init.buckets, progress)
            except (FileNotFoundError, PermissionError) as exc:
                if transport != "auto":  # (the session is aborted below, as for any failure)
                    raise TransportError(
                        f"shm: the server's staging file {session.shm_path} is not reachable from here ({exc.strerror}): "
                        "the server sees another /dev/shm (another container or host). Use --weight-transport http "
                        "or tcp, or share the server's IPC namespace (compose: ipc: service:SERVER)") from None
                # The server sees another /dev/shm (a container): fall back to bytes over the API port.
                log.info("shm staging file not reachable from here (%s); using http", exc)
                client._request(server, "POST", f"{PREFIX}/abort", json={"session_id": session.session_id})
                return push_one(client, server, pairs, "http", bucket_bytes, target_version, session_timeout_s,
                                progress, adapter, tensors)
        elif chosen == "tcp":
            _send_tcp(client, server, session, tensors, init.tensors, init.buckets, progress)
        else:
            _send_http(client, server, session, tensors, init.tensors, init.buckets, progress)
        r = client._request(server, "POST", f"{PREFIX}/commit", json={"session_id": session.session_id})
        return WeightsCommitted.model_validate(r.json())
    except BaseException:
        # Leave the server free for the next sync at once rather than after the session timeout.
        with contextlib.suppress(Exception):
            client._request(server, "POST", f"{PREFIX}/abort", json={"session_id": session.session_id})
        raise


def push_gathered(client, server: int, pairs, transport: str = "auto", **kwargs) -> WeightsCommitted:
    """`push_one` for a sharded model: every rank calls it with the same `pairs` (its shards), the
    main one (rank 0) with the `client`. Each tensor is gathered once, in plan order, and the main
    rank streams every bucket as soon as it is packed. Every rank returns the main rank's commit, or
    raises its error."""
    import torch.distributed as dist

    tensors = Gathered(pairs)
    outcome = [None]
    if client is not None:
        try:
            outcome[0] = push_one(client, server, pairs, transport, tensors=tensors, **kwargs)
        except Exception as exc:
            failure = exc
            outcome[0] = f"{type(exc).__name__}: {exc}"
    tensors.finish()
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        if client is not None:
            raise failure
        raise RuntimeError(f"the main process's weight push failed: {outcome[0]}")
    return outcome[0]


def push_weights(client, weights: Weights, transport: str = "auto", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 name_map: Callable[[str], str] | None = None, target_version: int | None = None,
                 session_timeout_s: float = 60.0, progress: Progress | None = None) -> int:
    """Sync `weights` (a module, PEFT included, a state dict or (name, tensor) pairs) to every server
    of `client`; returns the new `weight_version`."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be > 0")
    with named_weights(weights, name_map) as pairs:
        versions = [push_one(client, i, pairs, transport, bucket_bytes, target_version, session_timeout_s,
                             progress).weight_version for i in range(len(client.base_urls))]
    if len(set(versions)) > 1:
        log.warning("servers now serve different weight versions: %s", versions)
    return max(versions)


def push_adapter(client, model, transport: str = "auto", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 target_version: int | None = None, session_timeout_s: float = 60.0,
                 progress: Progress | None = None) -> int:
    """Sync a PEFT model's active adapter (not its base weights) to every server of `client`, which
    must run with `--enable-lora`; returns the new `weight_version`."""
    pairs, adapter = adapter_weights(model)
    versions = [push_one(client, i, pairs, transport, bucket_bytes, target_version, session_timeout_s, progress,
                         adapter).weight_version for i in range(len(client.base_urls))]
    if len(set(versions)) > 1:
        log.warning("servers now serve different weight versions: %s", versions)
    return max(versions)
