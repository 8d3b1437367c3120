"""Where the bytes of a weight sync land before the commit: one staging file (in /dev/shm when there
is one), and the receives that fill it, one per byte transport:

- shm: the sender writes into the file itself (its path goes back in the init's answer);
- http: each `PUT /v1/weights/buckets/{i}` body streams into its bucket (`StagedWeights.write_bucket`);
- tcp: a gloo group the sender joins sends bucket after bucket (`tcp_rendezvous`).

Nothing here touches the live model: the engine reads the staged tensors only at commit.
"""

import datetime
import fcntl
import mmap
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from starlette.requests import ClientDisconnect

from protocol import TensorSpec

if TYPE_CHECKING:
    from torch.distributed import ProcessGroupGloo

STAGING_PREFIX = "align-weights-"


def staging_root() -> Path:
    return Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


def claim(path: Path) -> int:
    """Hold `path` (a file or a directory) as this live server's: a shared lock, kept while the returned
    descriptor stays open; the kernel drops it when the process dies, however it dies."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def remove_dead_servers_files(root: Path, prefix: str) -> None:
    """/dev/shm is memory: what a server killed before it could clean up (SIGKILL, OOM) left there goes
    when the next server on this host starts. A live server holds each of its files (`claim`); one nobody
    holds is a dead server's. Locks, not the pid in the name: containers sharing one /dev/shm (`ipc: host`)
    each number their processes anew, so a pid says nothing about another container's files."""
    for path in root.glob(f"{prefix}*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # held: its server lives
        finally:
            os.close(fd)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class StagedWeights:
    """Every bucket of one sync, back to back in one file-backed buffer (bucket i at sum(sizes[:i]))."""

    def __init__(self, specs: list[TensorSpec], bucket_sizes: list[int]):
        self.specs, self.bucket_sizes = specs, bucket_sizes
        self.bucket_offsets = [sum(bucket_sizes[:i]) for i in range(len(bucket_sizes))]
        self.nbytes = sum(bucket_sizes)
        # Held for its whole life (`claim`'s lock, on the descriptor kept open): a server killed before it
        # could clean up leaves a file nobody holds, which the next one removes. The pid is for people.
        fd, path = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", suffix=".bin", dir=staging_root())
        fcntl.flock(fd, fcntl.LOCK_SH)
        self.path, self._fd = Path(path), fd
        os.ftruncate(fd, self.nbytes)
        self._mmap = mmap.mmap(fd, self.nbytes)
        self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8, count=self.nbytes)

    def bucket(self, i: int) -> torch.Tensor:
        start = self.bucket_offsets[i]
        return self.buffer[start : start + self.bucket_sizes[i]]

    async def write_bucket(self, i: int, chunks: AsyncIterator[bytes]) -> int:
        """Stream an http body into bucket i. Returns the bytes that arrived: fewer than the bucket's
        size when the sender hung up, one chunk past it (and no more read) when the body is too long."""
        size = self.bucket_sizes[i]
        view = memoryview(self._mmap)[self.bucket_offsets[i] :][:size]
        got = 0
        try:
            async for chunk in chunks:
                if got + len(chunk) > size:
                    return got + len(chunk)
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
        except ClientDisconnect:
            pass
        finally:
            view.release()
        return got

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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StagingArea:
    """The staging files of one server: a fresh one per sync, or the last committed sync's again."""

    def __init__(self):
        remove_dead_servers_files(staging_root(), STAGING_PREFIX)
        # The staging file of the last committed sync, kept for the next one with the same bucket
        # layout (every RL step): a fresh /dev/shm file pays a page fault per 4 KB on first touch,
        # which cut streaming from ~1.4 to ~0.33 GB/s here. Only a committed sync's file is kept:
        # no writer of an aborted or failed sync can still be filling it.
        self._spare: StagedWeights | None = None

    def stage(self, specs: list[TensorSpec], bucket_sizes: list[int]) -> StagedWeights:
        spare, self._spare = self._spare, None
        if spare is not None and spare.bucket_sizes == bucket_sizes:
            spare.specs = specs
            return spare
        if spare is not None:
            spare.close()
        return StagedWeights(specs, bucket_sizes)

    def release(self, staged: StagedWeights, reuse: bool) -> None:
        """A sync is over: keep its file for the next one (`reuse`: it committed) or remove it."""
        if reuse:
            self.close()
            self._spare = staged
        else:
            staged.close()

    def close(self) -> None:
        if self._spare is not None:
            self._spare.close()
            self._spare = None


def tcp_rendezvous(host: str, timeout_s: float, key: str) -> tuple[int, Callable[[], "ProcessGroupGloo"]]:
    """(the port a tcp sender connects to, a call that joins its gloo group): a TCPStore here, the
    sender rank 0, this side rank 1, receiving bucket i as tag i.

    Everything listens on `host`, the address the API answered this init on (loopback by default),
    never on all interfaces as TCPStore and gloo do by themselves: whoever reaches that address
    can reach the API anyway, where the API key guards init. `key` (the session id) prefixes the
    store: only the sender that got it from init can join."""
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.bind((host, 0))
    listener.listen()
    store = TCPStore(host, listener.getsockname()[1], 2, True, timeout, wait_for_workers=False,
                     master_listen_fd=listener.detach())  # the store owns and closes it
    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [ProcessGroupGloo.create_device(hostname=host)]
    return store.port, lambda: ProcessGroupGloo(PrefixStore(key, store), 1, 2, options)
