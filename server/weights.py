"""The weight receiver: `POST /v1/weights/init` -> buckets -> `POST /v1/weights/commit`.

Byte transports (http, tcp, shm) land every bucket in one staging file (in /dev/shm when there is
one), never in the live model: the engine swaps the staged tensors in only at commit, so an aborted
or half-streamed sync leaves the old weights serving. One sync at a time: a second init gets 409
until the first commits, aborts, fails (a dead tcp peer) or sits idle past its `session_timeout_s`,
after which a new sender simply replaces it; no restart is ever needed.

The GPU transports (nccl, ipc) are vLLM's own weight-transfer engines: the trainer drives them
through `/v1/weights/engine/{init,start,update}` and commit. They write into the live model, so
the server reports not ready from `start` until the commit lands (or until a later full sync
does, if the sender dies half way).

An adapter sync (`adapter` in the init, `--enable-lora`) is staged and committed the same way; at
commit the engine starts serving the new adapter on top of its base weights. A full sync drops
the adapter: it carries the whole model, and a merged model must not get the adapter twice.
"""

import asyncio
import datetime
import logging
import mmap
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from starlette.requests import ClientDisconnect

from protocol import (
    API_PREFIX,
    BYTE_TRANSPORTS,
    ENGINE_TRANSPORTS,
    SESSION_HEADER,
    ErrorCode,
    TensorSpec,
    WeightsCommitted,
    WeightsEngineCall,
    WeightsInit,
    WeightsSession,
    WeightsSessionRef,
    WeightsStatus,
)
from server.errors import APIError
from server.lora import AdapterRefused, check_adapter, lora_targets

log = logging.getLogger("align-serve.weights")
PREFIX = f"{API_PREFIX}/weights"


class WeightSyncError(APIError):
    def __init__(self, status: int, code: ErrorCode, message: str, field: str | None = None, **detail):
        super().__init__(status, code, message, {"field": field, **detail} if field else (detail or None))


def served_manifest(model_path: str) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], set[str]]:
    """(every tensor a sync may name -> (dtype, shape), the names a full sync must carry).

    Names are the HF module's parameter names, as a trainer's `named_parameters()` gives them; built
    on the meta device, so this costs no memory. Tied weights (a text model's `lm_head`) are
    accepted under either name but required once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    accepted = {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}
    required = {n for n, _ in model.named_parameters()}
    return accepted, required


STAGING_PREFIX = "align-weights-"


def staging_root() -> Path:
    return Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


def remove_dead_servers_files(root: Path, prefix: str) -> None:
    """/dev/shm is memory: what a server killed before it could clean up (SIGKILL, OOM) left there
    (`<prefix><pid>...`) goes when the next server on this host starts."""
    for path in root.glob(f"{prefix}*"):
        pid = path.name.removeprefix(prefix).split("-", 1)[0].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


class StagedWeights:
    """Every bucket of one sync, back to back in one file-backed buffer (bucket i at sum(sizes[:i]))."""

    def __init__(self, specs: list[TensorSpec], bucket_sizes: list[int]):
        self.specs, self.bucket_sizes = specs, bucket_sizes
        self.bucket_offsets = [sum(bucket_sizes[:i]) for i in range(len(bucket_sizes))]
        self.nbytes = sum(bucket_sizes)
        # The pid in the name: a server killed before it could clean up is known by it (below).
        fd, path = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", suffix=".bin", dir=staging_root())
        self.path = Path(path)
        try:
            os.ftruncate(fd, self.nbytes)
            self._mmap = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8, count=self.nbytes)

    def bucket(self, i: int) -> torch.Tensor:
        start = self.bucket_offsets[i]
        return self.buffer[start : start + self.bucket_sizes[i]]

    def tensors(self):
        """(name, tensor) views into the staging buffer, in manifest order."""
        for t in self.specs:
            start = self.bucket_offsets[t.bucket] + t.offset
            raw = self.buffer[start : start + t.nbytes]
            yield t.name, raw.view(getattr(torch, t.dtype)).view(t.shape)

    def layout(self) -> dict:
        """What a process that maps the file itself (a vLLM worker) needs: path and absolute offsets."""
        return {"path": str(self.path), "tensors": [
            [t.name, t.dtype, t.shape, self.bucket_offsets[t.bucket] + t.offset] for t in self.specs]}

    def close(self) -> None:
        # No explicit munmap: a receive still writing into a view (a tcp thread, an http upload) keeps
        # the mapping alive; it goes with its last user. The file goes now.
        self.buffer = self._mmap = None
        self.path.unlink(missing_ok=True)


@dataclass
class _Session:
    id: str
    spec: WeightsInit
    target_version: int
    started: float
    staged: StagedWeights | None = None
    received: set[int] = field(default_factory=set)
    state: str = "receiving"  # receiving -> committing -> (closed); or failed
    error: str | None = None
    last_activity: float = field(default_factory=time.monotonic)
    receiver: threading.Thread | None = None  # tcp: the gloo receive loop
    engine_started: bool = False  # nccl/ipc: the live model is being written

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_activity

    def expired(self) -> bool:
        return self.state == "failed" or (self.state == "receiving" and self.idle_for() > self.spec.session_timeout_s)


class WeightReceiver:
    """One sync at a time, from init to commit or abort."""

    def __init__(self, app: FastAPI, engine):
        self.app, self.engine = app, engine
        self.metrics = app.state.metrics
        self.session: _Session | None = None
        # The staging file of the last committed sync, kept for the next one with the same bucket
        # layout (every RL step): a fresh /dev/shm file pays a page fault per 4 KB on first touch,
        # which cut streaming from ~1.4 to ~0.33 GB/s here. Only a committed sync's file is kept:
        # no writer of an aborted or failed sync can still be filling it.
        self._spare: StagedWeights | None = None
        remove_dead_servers_files(staging_root(), STAGING_PREFIX)
        self.lock = asyncio.Lock()
        self._manifest: tuple[dict, set] | None = None
        self._lora_targets: tuple[dict, set] | None = None

    # ---- init ------------------------------------------------------------------------------------
    async def init(self, spec: WeightsInit, local_host: str) -> WeightsSession:
        if self.engine.weight_sync_refused:
            raise WeightSyncError(400, ErrorCode.invalid_request, self.engine.weight_sync_refused, "transport")
        if spec.transport not in self.engine.weight_transports:
            raise WeightSyncError(400, ErrorCode.invalid_request,
                                  f"the {self.engine.name} engine does not take the {spec.transport} transport; it "
                                  f"takes {', '.join(self.engine.weight_transports)}", "transport")
        if spec.adapter is not None:
            await self._check_adapter(spec)
        else:
            if self._manifest is None:
                self._manifest = await asyncio.to_thread(served_manifest, self.engine.model_path)
            self._check_manifest(spec)
        async with self.lock:
            current = self.session
            if current is not None:
                if not current.expired():
                    raise WeightSyncError(
                        409, ErrorCode.conflict,
                        "another weight sync is in progress; it must commit or abort first (or stay idle "
                        f"{current.spec.session_timeout_s:g} s, after which a new init replaces it)",
                        expires_in_s=round(max(0.0, current.spec.session_timeout_s - current.idle_for()), 1))
                self._close(current, "expired" if current.state == "receiving" else "failed")
                if current.engine_started:
                    # nccl/ipc sender gone after `start`: end vLLM's update as /abort does, or the
                    # worker refuses this sync's `start` ("a weight update is already active").
                    await self.engine.transfer_weights("abort", {})
            version = self.engine.weight_version
            target = spec.target_version if spec.target_version is not None else version + 1
            if target <= version:
                raise WeightSyncError(409, ErrorCode.conflict, f"target_version {target} is not above the served "
                                      f"version {version}", "target_version")
            session = _Session(id=secrets.token_hex(16), spec=spec, target_version=target, started=time.perf_counter())
            out = WeightsSession(session_id=session.id, transport=spec.transport, weight_version=version,
                                 target_version=target, buckets=len(spec.buckets),
                                 session_timeout_s=spec.session_timeout_s)
            if spec.transport in BYTE_TRANSPORTS:
                session.staged = await asyncio.to_thread(self._staging, spec)
                if spec.transport == "shm":
                    out.shm_path = str(session.staged.path)
                if spec.transport == "tcp":
                    out.tcp_port = self._start_tcp(session, local_host)
            elif spec.engine_init_info is not None:
                # vLLM's nccl rendezvous blocks until the trainer joins; the trainer calls us from a
                # side thread while it opens its end, exactly as vLLM's own trainer engines do.
                await self.engine.transfer_weights("init", {"transport": spec.transport,
                                                            "info": spec.engine_init_info})
            self.session = session
            log.info("weight sync %s: %s, %d tensors, %d buckets, %.1f MB -> version %d", session.id[:8],
                     spec.transport, len(spec.tensors), len(spec.buckets), sum(spec.buckets) / 1e6, target)
            return out

    def _staging(self, spec: WeightsInit) -> StagedWeights:
        spare, self._spare = self._spare, None
        if spare is not None and spare.bucket_sizes == spec.buckets:
            spare.specs = spec.tensors
            return spare
        if spare is not None:
            spare.close()
        return StagedWeights(spec.tensors, spec.buckets)

    async def _check_adapter(self, spec: WeightsInit) -> None:
        if self.engine.max_lora_rank is None:
            raise WeightSyncError(400, ErrorCode.invalid_request, "this server takes no adapter sync: start "
                                  "align-serve with --enable-lora (and --max-lora-rank), or sync merged weights",
                                  "adapter")
        if spec.transport not in BYTE_TRANSPORTS:
            raise WeightSyncError(400, ErrorCode.invalid_request, f"an adapter sync travels over http, tcp or "
                                  f"shm, not {spec.transport} (an adapter is small)", "transport")
        if self._lora_targets is None:
            self._lora_targets = await asyncio.to_thread(lora_targets, self.engine.model_path)
        try:
            check_adapter(spec.adapter, spec.tensors, *self._lora_targets, self.engine.max_lora_rank)
        except AdapterRefused as exc:
            raise WeightSyncError(422, ErrorCode.invalid_request, str(exc), exc.field) from None

    def _check_manifest(self, spec: WeightsInit) -> None:
        accepted, required = self._manifest
        names = set()
        for i, t in enumerate(spec.tensors):
            if t.name not in accepted:
                raise WeightSyncError(422, ErrorCode.invalid_request,
                                      f"tensors[{i}].name {t.name!r} is not a parameter of the served model "
                                      "(names are the HF module's, as `named_parameters()` gives them)",
                                      f"tensors[{i}].name")
            dtype, shape = accepted[t.name]
            if tuple(t.shape) != shape:
                raise WeightSyncError(422, ErrorCode.invalid_request,
                                      f"tensors[{i}].shape {list(t.shape)} for {t.name} does not match the served "
                                      f"model's {list(shape)}", f"tensors[{i}].shape")
            if dtype.is_floating_point != getattr(torch, t.dtype).is_floating_point:
                raise WeightSyncError(422, ErrorCode.invalid_request,
                                      f"tensors[{i}].dtype {t.dtype} cannot load into {t.name} ({dtype})",
                                      f"tensors[{i}].dtype")
            names.add(t.name)
        missing = sorted(n for n in required if n not in names)
        if missing:
            raise WeightSyncError(422, ErrorCode.invalid_request,
                                  f"the manifest misses {len(missing)} of the model's {len(required)} parameters "
                                  f"(first: {missing[0]}); a sync carries the whole model", "tensors",
                                  missing=missing[:20])

    def _start_tcp(self, session: _Session, host: str) -> int:
        """Open a gloo group (TCPStore here, the sender is rank 0) and receive every bucket in order.

        Everything listens on `host`, the address the API answered this init on (loopback by default),
        never on all interfaces as TCPStore and gloo do by themselves: whoever reaches that address
        can reach the API anyway, where the API key guards init."""
        from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

        timeout = datetime.timedelta(seconds=session.spec.session_timeout_s)
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.bind((host, 0))
        listener.listen()
        store = TCPStore(host, listener.getsockname()[1], 2, True, timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())  # the store owns and closes it
        options = ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=host)]

        def receive() -> None:
            try:
                # The session id prefixes the store: only the sender that got it from init can join.
                group = ProcessGroupGloo(PrefixStore(session.id, store), 1, 2, options)
                session.touch()
                for i in range(len(session.spec.buckets)):
                    if session.state != "receiving":
                        return
                    group.recv([session.staged.bucket(i)], 0, i).wait()
                    session.received.add(i)
                    session.touch()
            except Exception as exc:  # the sender died or hung past the timeout
                session.error = f"tcp stream broke after {len(session.received)} buckets: {exc}"
                session.state = "failed"
                log.warning("weight sync %s: %s", session.id[:8], session.error)

        session.receiver = threading.Thread(target=receive, name=f"weights-tcp-{session.id[:8]}", daemon=True)
        session.receiver.start()
        return store.port

    # ---- buckets (http) ----------------------------------------------------------------------------
    async def put_bucket(self, index: int, session_id: str | None, request: Request) -> dict:
        session = self._get(session_id)
        if session.spec.transport != "http":
            raise WeightSyncError(409, ErrorCode.conflict, f"this sync uses the {session.spec.transport} transport; "
                                  "buckets come over http only with transport=http", "transport")
        n = len(session.spec.buckets)
        if not 0 <= index < n:
            raise WeightSyncError(404, ErrorCode.not_found, f"bucket {index} is out of range: this sync has "
                                  f"{n} buckets (0..{n - 1})", "index")
        size = session.spec.buckets[index]
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit() or int(declared) != size:
            raise WeightSyncError(400, ErrorCode.invalid_request, f"bucket {index} is {size} bytes per the manifest "
                                  f"but the request declares Content-Length {declared}", "content-length",
                                  expected=size)
        staged = session.staged
        view = memoryview(staged._mmap)[staged.bucket_offsets[index] :][:size]
        got = 0
        try:
            async for chunk in request.stream():
                if got + len(chunk) > size:
                    raise WeightSyncError(400, ErrorCode.invalid_request,
                                          f"bucket {index} body is longer than its {size} bytes", "body")
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
        except ClientDisconnect:
            got = -1
        finally:
            view.release()
        session.touch()
        if got != size:
            session.received.discard(index)
            raise WeightSyncError(400, ErrorCode.invalid_request,
                                  f"bucket {index} body ended after {max(got, 0)} of {size} bytes", "body")
        session.received.add(index)
        return {"bucket": index, "bytes": size, "received": len(session.received), "total": n}

    # ---- nccl / ipc: vLLM's own weight-transfer calls --------------------------------------------------
    async def engine_call(self, step: str, call: WeightsEngineCall) -> dict:
        session = self._get(call.session_id)
        if session.spec.transport not in ENGINE_TRANSPORTS:
            raise WeightSyncError(409, ErrorCode.conflict, f"this sync uses the {session.spec.transport} transport; "
                                  "the engine routes serve nccl and ipc", "transport")
        session.touch()
        if step == "init":
            await self.engine.transfer_weights("init", {"transport": session.spec.transport, "info": call.info})
        elif step == "start":
            # The live model is written from here on: nothing is served until the commit lands.
            self.app.state.ready, self.app.state.committing = False, True
            session.engine_started = True
            await self.engine.transfer_weights("start", call.info)
        else:
            if not session.engine_started:
                raise WeightSyncError(409, ErrorCode.conflict, "call engine/start before engine/update")
            await self.engine.transfer_weights("update", call.info)
        session.touch()
        return {"ok": True}

    # ---- commit / abort ----------------------------------------------------------------------------------
    async def commit(self, session_id: str) -> WeightsCommitted:
        session = self._get(session_id, allow_failed=True)
        if session.receiver is not None:  # tcp: the last buckets may still be on the wire
            await asyncio.to_thread(session.receiver.join, session.spec.session_timeout_s)
        async with self.lock:
            session = self._get(session_id, allow_failed=True)
            if session.state == "failed":
                raise WeightSyncError(409, ErrorCode.conflict, f"{session.error}; the old weights still serve: "
                                      "start a new sync")
            if session.staged is not None:
                missing = [i for i in range(len(session.spec.buckets)) if i not in session.received]
                if missing and session.spec.transport != "shm":  # shm buckets are written straight into the file
                    raise WeightSyncError(409, ErrorCode.conflict, f"{len(missing)} buckets not received yet "
                                          f"(first: {missing[0]}); send them, then commit", "buckets", missing=missing[:20])
            elif not session.engine_started:
                raise WeightSyncError(409, ErrorCode.conflict, "no weights were transferred: call engine/start "
                                      "and engine/update first")
            session.state = "committing"
        previous = self.engine.weight_version
        self.app.state.committing = True
        try:
            if session.spec.adapter is not None:
                await self.engine.commit_adapter(session.staged, session.spec.adapter, session.target_version)
            elif session.staged is not None:
                await self.engine.commit_weights(session.staged, session.target_version)
            else:
                await self.engine.transfer_weights("finish", {"weight_version": session.target_version})
        except Exception:
            # An adapter commit is all or nothing in both engines: the old adapter still serves. A
            # full one may have touched the live model: refuse traffic until a full sync lands.
            self.app.state.committing = False
            if session.spec.adapter is not None:
                self.metrics.weight_syncs.labels("failed").inc()
                async with self.lock:
                    self._close(session, None)
                log.exception("weight sync %s: adapter commit failed; the previous version still serves",
                              session.id[:8])
                raise
            self.app.state.ready = False
            self.metrics.weight_syncs.labels("failed").inc()
            async with self.lock:
                self._close(session, None)
            log.exception("weight sync %s: commit failed; serving nothing until a full sync lands", session.id[:8])
            raise
        self.app.state.committing = False
        self.app.state.ready = True
        seconds = time.perf_counter() - session.started
        nbytes = sum(t.nbytes for t in session.spec.tensors)
        async with self.lock:
            self._close(session, "committed")
        self.metrics.weight_version.set(self.engine.weight_version)
        log.info("weight sync %s: version %d -> %d (%.1f MB in %.2f s)", session.id[:8], previous,
                 self.engine.weight_version, nbytes / 1e6, seconds)
        return WeightsCommitted(weight_version=self.engine.weight_version, previous_version=previous,
                                bytes=nbytes, seconds=seconds)

    async def abort(self, session_id: str) -> dict:
        async with self.lock:
            session = self._get(session_id, allow_failed=True)
            self._close(session, "aborted")
        if session.engine_started:
            await self.engine.transfer_weights("abort", {})
        return {"aborted": True, "weight_version": self.engine.weight_version}

    def status(self) -> WeightsStatus:
        s = self.session
        live = s is not None and not s.expired()
        return WeightsStatus(weight_version=self.engine.weight_version, syncing=live,
                             transports=list(self.engine.weight_transports),
                             workers=self.engine.weight_workers, max_lora_rank=self.engine.max_lora_rank,
                             received_buckets=len(s.received) if live else None,
                             total_buckets=len(s.spec.buckets) if live else None)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _get(self, session_id: str | None, allow_failed: bool = False) -> _Session:
        s = self.session
        if not session_id or s is None or not secrets.compare_digest(session_id, s.id):
            raise WeightSyncError(404, ErrorCode.not_found, "no such weight sync (it committed, was aborted, "
                                  "expired or was replaced); start one with POST /v1/weights/init", "session_id")
        if s.state == "failed" and not allow_failed:
            raise WeightSyncError(409, ErrorCode.conflict, f"{s.error}; abort it and start a new sync")
        if s.state == "committing":
            raise WeightSyncError(409, ErrorCode.conflict, "this sync is committing")
        return s

    def _close(self, session: _Session, outcome: str | None) -> None:
        if session.engine_started and outcome != "committed":
            # nccl/ipc wrote part of the live model: /ready stays 503 until a full sync lands.
            self.app.state.committing = False
        if session.state != "failed":
            session.state = "closed"
        if session.staged is not None:
            if outcome == "committed":
                if self._spare is not None:
                    self._spare.close()
                self._spare = session.staged
            else:
                session.staged.close()
        if outcome is not None:
            self.metrics.weight_syncs.labels(outcome).inc()
        if self.session is session:
            self.session = None


def _close_all(receiver: "WeightReceiver") -> None:
    """Server shutdown (SIGTERM included: uvicorn runs this before it exits): no staging file stays."""
    for staged in (receiver._spare, receiver.session.staged if receiver.session else None):
        if staged is not None:
            staged.close()


def add_weight_routes(app: FastAPI, engine, auth) -> WeightReceiver:
    """Mount the weight-sync routes; all of them require the API key when one is set."""
    receiver = WeightReceiver(app, engine)
    app.router.on_shutdown.append(lambda: _close_all(receiver))
    app.state.weights = receiver
    guarded = [Depends(auth)]

    def require_loaded() -> None:  # not `ready`: after a failed commit a new sync is how to recover
        if not hasattr(engine, "max_model_len"):
            raise WeightSyncError(503, ErrorCode.not_ready, "the model is still loading; poll GET /ready")

    @app.post(f"{PREFIX}/init", dependencies=[*guarded, Depends(require_loaded)])
    async def weights_init(spec: WeightsInit, request: Request) -> WeightsSession:
        return await receiver.init(spec, request.scope["server"][0])

    @app.put(PREFIX + "/buckets/{index}", dependencies=guarded)
    async def weights_bucket(index: int, request: Request):
        return await receiver.put_bucket(index, request.headers.get(SESSION_HEADER), request)

    @app.post(PREFIX + "/engine/{step}", dependencies=guarded)
    async def weights_engine(step: str, call: WeightsEngineCall):
        if step not in ("init", "start", "update"):
            raise WeightSyncError(404, ErrorCode.not_found, f"no engine step {step!r}: use init, start or update",
                                  "step")
        return await receiver.engine_call(step, call)

    @app.post(f"{PREFIX}/commit", dependencies=guarded)
    async def weights_commit(ref: WeightsSessionRef) -> WeightsCommitted:
        return await receiver.commit(ref.session_id)

    @app.post(f"{PREFIX}/abort", dependencies=guarded)
    async def weights_abort(ref: WeightsSessionRef):
        return await receiver.abort(ref.session_id)

    @app.get(f"{PREFIX}/version", dependencies=guarded)
    async def weights_version() -> WeightsStatus:
        return receiver.status()

    return receiver
