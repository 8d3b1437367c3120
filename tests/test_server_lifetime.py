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
    # An empty vLLM cache, as on a fresh machine: vLLM then inspects the model's class anew, which must
    # work with the CPU torch (runtime.torchvision_compat.inspect_vllm_models_here).
    server = ServerProcess(tiny_vlm, "vllm", log_dir=log_dir,
                           env={"VLLM_WORKER_MULTIPROC_METHOD": start_method, "VLLM_CACHE_ROOT": str(tmp_path)})
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
