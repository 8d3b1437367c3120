"""align-serve's processes end together: no engine process outlives the server, however it ends.

Two halves:
- An orderly end (SIGTERM, SIGINT, a failed start, a dead engine) shuts the engine down before the
  process exits: `serve` in cli.py owns those signals (uvicorn's own handling re-raises a caught
  signal once uvicorn is done, which ends the process before anything after it runs).
- An abrupt end (SIGKILL, an OOM kill) runs no code of ours, so every process the server starts
  asks the kernel to signal it when its parent dies (Linux's PR_SET_PDEATHSIG). vLLM's engine core
  handles that SIGTERM by shutting down its own workers; one still there ORPHAN_GRACE_S later is killed
  by its own watch thread.
"""

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
# Set by `tie_children_to_this_process`; a process that finds it set but is not that server is one of
# its children started by spawn (vLLM's choice on CUDA), which runs no fork hook.
_SERVER_PID_ENV = "ALIGN_SERVE_PID"
ORPHAN_GRACE_S = 10.0  # how long a child whose server died may take to end on its own
_WATCH_EVERY_S = 0.5
_forked_by_main_thread = False
_forking_pid = 0


def _ask_for_parent_death_signal(parent: int | None) -> None:
    if not sys.platform.startswith("linux"):
        return  # no such call elsewhere (and no vLLM engine there either)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if parent is not None and os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_end_if_orphaned, args=(os.getppid(),), name="align-serve-orphan-watch",
                     daemon=True).start()


def _end_if_orphaned(parent: int) -> None:
    """SIGKILL for this process once ORPHAN_GRACE_S have passed since its parent died. The SIGTERM asked for
    lets vLLM's engine core shut down in order; one whose handler cannot run (blocked in a native call)
    or whose shutdown hangs outlived a killed server (seen in a CI run, engine core started by spawn)."""
    while os.getppid() == parent:
        time.sleep(_WATCH_EVERY_S)
    time.sleep(ORPHAN_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _before_fork() -> None:
    global _forked_by_main_thread, _forking_pid
    _forked_by_main_thread = threading.current_thread() is threading.main_thread()
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    # The kernel sends the signal when the *thread* that forked exits: tie only children of the main
    # thread, which lives as long as the process (vLLM starts its engine core from it).
    if _forked_by_main_thread:
        _ask_for_parent_death_signal(_forking_pid)


def tie_children_to_this_process() -> None:
    """From now on every child of this process (and of its children) gets SIGTERM when its parent dies."""
    os.environ[_SERVER_PID_ENV] = str(os.getpid())
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def tie_spawned_child() -> None:
    """Called at import of the server's entry module, which a spawned child re-imports first thing."""
    server = os.environ.get(_SERVER_PID_ENV)
    if server and server != str(os.getpid()):
        _ask_for_parent_death_signal(None)
