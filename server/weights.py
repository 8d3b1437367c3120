"""The weight receiver: `POST /v1/weights/init` -> buckets -> `POST /v1/weights/commit`, one sync
at a time (its routes: server/routes/weights.py; where the bytes land: server/staging.py).

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
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protocol import (
    BYTE_TRANSPORTS,
    ENGINE_TRANSPORTS,
    ErrorCode,
    WeightsCommitted,
    WeightsEngineCall,
    WeightsInit,
    WeightsSession,
    WeightsStatus,
)
from server.engines import TransferStep
from server.errors import WeightSyncError
from server.lora import AdapterRefused, check_adapter, lora_targets
from server.manifest import check_manifest, served_manifest
from server.staging import StagedWeights, StagingArea, tcp_rendezvous

log = logging.getLogger("align-serve.weights")


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

    def __init__(self, state, engine):
        """`state`: the app's state, whose `ready` and `committing` a sync moves, and its `metrics`."""
        self.state, self.engine = state, engine
        self.metrics = state.metrics
        self.session: _Session | None = None
        self.staging = StagingArea()
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
            check_manifest(spec.tensors, *self._manifest)
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
                    await self.engine.transfer_weights(TransferStep.ABORT, {})
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
                session.staged = await asyncio.to_thread(self.staging.stage, spec.tensors, spec.buckets)
                if spec.transport == "shm":
                    out.shm_path = str(session.staged.path)
                if spec.transport == "tcp":
                    out.tcp_port = self._start_tcp(session, local_host)
            elif spec.engine_init_info is not None:
                # vLLM's nccl rendezvous blocks until the trainer joins; the trainer calls us from a
                # side thread while it opens its end, exactly as vLLM's own trainer engines do.
                await self.engine.transfer_weights(TransferStep.INIT, {"transport": spec.transport,
                                                                       "info": spec.engine_init_info})
            self.session = session
            log.info("weight sync %s: %s, %d tensors, %d buckets, %.1f MB -> version %d", session.id[:8],
                     spec.transport, len(spec.tensors), len(spec.buckets), sum(spec.buckets) / 1e6, target)
            return out

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

    def _start_tcp(self, session: _Session, host: str) -> int:
        """Receive every bucket in order on a side thread; a broken stream fails the session."""
        port, join = tcp_rendezvous(host, session.spec.session_timeout_s, session.id)

        def receive() -> None:
            try:
                group = join()
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
        return port

    # ---- buckets (http) ----------------------------------------------------------------------------
    async def put_bucket(self, index: int, session_id: str | None, declared: str | None,
                         body: AsyncIterator[bytes]) -> dict:
        """`declared`: the request's Content-Length."""
        session = self._get(session_id)
        if session.spec.transport != "http":
            raise WeightSyncError(409, ErrorCode.conflict, f"this sync uses the {session.spec.transport} transport; "
                                  "buckets come over http only with transport=http", "transport")
        n = len(session.spec.buckets)
        if not 0 <= index < n:
            raise WeightSyncError(404, ErrorCode.not_found, f"bucket {index} is out of range: this sync has "
                                  f"{n} buckets (0..{n - 1})", "index")
        size = session.spec.buckets[index]
        if declared is None or not declared.isdigit() or int(declared) != size:
            raise WeightSyncError(400, ErrorCode.invalid_request, f"bucket {index} is {size} bytes per the manifest "
                                  f"but the request declares Content-Length {declared}", "content-length",
                                  expected=size)
        got = await session.staged.write_bucket(index, body)
        if got > size:
            raise WeightSyncError(400, ErrorCode.invalid_request,
                                  f"bucket {index} body is longer than its {size} bytes", "body")
        session.touch()
        if got != size:
            session.received.discard(index)
            raise WeightSyncError(400, ErrorCode.invalid_request,
                                  f"bucket {index} body ended after {got} of {size} bytes", "body")
        session.received.add(index)
        return {"bucket": index, "bytes": size, "received": len(session.received), "total": n}

    # ---- nccl / ipc: vLLM's own weight-transfer calls --------------------------------------------------
    async def engine_call(self, step: TransferStep, call: WeightsEngineCall) -> dict:
        session = self._get(call.session_id)
        if session.spec.transport not in ENGINE_TRANSPORTS:
            raise WeightSyncError(409, ErrorCode.conflict, f"this sync uses the {session.spec.transport} transport; "
                                  "the engine routes serve nccl and ipc", "transport")
        session.touch()
        if step == TransferStep.INIT:
            await self.engine.transfer_weights(step, {"transport": session.spec.transport, "info": call.info})
        elif step == TransferStep.START:
            # The live model is written from here on: nothing is served until the commit lands.
            self.state.ready, self.state.committing = False, True
            session.engine_started = True
            await self.engine.transfer_weights(step, call.info)
        else:
            if not session.engine_started:
                raise WeightSyncError(409, ErrorCode.conflict, "call engine/start before engine/update")
            await self.engine.transfer_weights(step, call.info)
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
        self.state.committing = True
        try:
            if session.spec.adapter is not None:
                await self.engine.commit_adapter(session.staged, session.spec.adapter, session.target_version)
            elif session.staged is not None:
                await self.engine.commit_weights(session.staged, session.target_version)
            else:
                await self.engine.transfer_weights(TransferStep.FINISH, {"weight_version": session.target_version})
        except Exception:
            # An adapter commit is all or nothing in both engines: the old adapter still serves. A
            # full one may have touched the live model: refuse traffic until a full sync lands.
            self.state.committing = False
            adapter = session.spec.adapter is not None
            if not adapter:
                self.state.ready = False
            self.metrics.weight_syncs.labels("failed").inc()
            async with self.lock:
                self._close(session, None)
            log.exception("weight sync %s: %s", session.id[:8],
                          "adapter commit failed; the previous version still serves" if adapter
                          else "commit failed; serving nothing until a full sync lands")
            raise
        self.state.committing = False
        self.state.ready = True
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
            await self.engine.transfer_weights(TransferStep.ABORT, {})
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
            self.state.committing = False
        if session.state != "failed":
            session.state = "closed"
        if session.staged is not None:
            self.staging.release(session.staged, reuse=outcome == "committed")
        if outcome is not None:
            self.metrics.weight_syncs.labels(outcome).inc()
        if self.session is session:
            self.session = None

    def close(self) -> None:
        """Server shutdown (SIGTERM included: uvicorn runs this before it exits): no staging file stays."""
        self.staging.close()
        if self.session is not None and self.session.staged is not None:
            self.session.staged.close()
