"""No process align-serve starts outlives it, however it ends: SIGTERM or SIGINT to its pid alone (as
`kill PID`, supervisord and most process managers send it), SIGKILL of its pid (nothing of ours runs:
the engine core must notice its parent is gone), or vLLM's engine core dying under it."""

import os
import signal

import psutil
import pytest

from tests.utils import ServerProcess

pytestmark = pytest.mark.vllm


def _engine_processes(server: ServerProcess) -> list[psutil.Process]:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    # vLLM names its processes: without an engine core there would be nothing to outlive the server.
    assert any("EngineCor" in p.name() for p in children), [p.name() for p in children]
    return children


def _assert_all_end(server: ServerProcess, children: list[psutil.Process]) -> None:
    server.proc.wait(90)
    _, alive = psutil.wait_procs(children, timeout=90)
    survivors = [(p.pid, p.name()) for p in alive]
    for p in alive:  # the test fails; leave nothing running behind it
        p.kill()
    assert not survivors, f"outlived align-serve: {survivors}\n{server.logs()}"


@pytest.mark.parametrize(("sig", "start_method"), [
    (signal.SIGTERM, "fork"), (signal.SIGINT, "fork"), (signal.SIGKILL, "fork"),
    # vLLM starts its engine core by spawn on CUDA: nothing is inherited from the parent there
    (signal.SIGKILL, "spawn"),
], ids=["sigterm", "sigint", "sigkill", "sigkill-spawned-engine"])
def test_no_child_outlives_a_signal_to_the_server_pid_alone(tiny_vlm, log_dir, tmp_path, sig, start_method):
    # SIGTERM's server starts on an empty vLLM cache, as on a fresh machine: vLLM then inspects the model's
    # class anew, which must work with the CPU torch (runtime.torchvision_compat.inspect_vllm_models_here);
    # the others on the suite's cache (a start 7 s shorter)
    fresh = {"VLLM_CACHE_ROOT": str(tmp_path)} if sig == signal.SIGTERM else {}
    server = ServerProcess(tiny_vlm, "vllm", log_dir=log_dir, env={"VLLM_WORKER_MULTIPROC_METHOD": start_method, **fresh})
    try:
        server.wait_ready()
        children = _engine_processes(server)
        os.kill(server.proc.pid, sig)
        _assert_all_end(server, children)
        if sig != signal.SIGKILL:  # an orderly end, which says why it ended
            assert server.proc.returncode == 128 + sig, server.logs()
            assert f"{signal.Signals(sig).name} received: shutting down" in server.logs()
    finally:
        server.stop()


def test_a_dead_engine_core_ends_the_server_and_its_children(tiny_vlm, log_dir):
    server = ServerProcess(tiny_vlm, "vllm", log_dir=log_dir)
    try:
        server.wait_ready()
        children = _engine_processes(server)
        next(p for p in children if "EngineCor" in p.name()).kill()
        _assert_all_end(server, children)
        assert server.proc.returncode == 1
        assert "vLLM's engine core has stopped" in server.logs()
    finally:
        server.stop()


# A child tied to its server that ignores the death signal (as an engine core blocked in a native call, or
# whose shutdown hangs, cannot act on it): its own watch thread kills it once the grace has passed.
_DEAF_CHILD = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "from server.lifetime import tie_spawned_child; tie_spawned_child(); print('tied', flush=True); "
               "time.sleep(600)")
_PARENT = ("import os, subprocess, sys, time; "
           f"child = subprocess.Popen([sys.executable, '-c', {_DEAF_CHILD!r}], stdout=subprocess.PIPE, text=True, "
           "env={**os.environ, 'ALIGN_SERVE_PID': '1'}); "
           "assert child.stdout.readline().strip() == 'tied'; print(child.pid, flush=True); time.sleep(600)")


def test_a_child_deaf_to_its_servers_death_is_killed_after_the_grace():
    import subprocess
    import sys
    from pathlib import Path

    from server.lifetime import ORPHAN_GRACE_S

    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    child = psutil.Process(int(parent.stdout.readline()))  # printed once the child is tied
    try:
        parent.kill()
        parent.wait(30)
        _, alive = psutil.wait_procs([child], timeout=ORPHAN_GRACE_S + 60)
        assert not alive, "the deaf child outlived its parent"
    finally:
        if child.is_running():
            child.kill()
