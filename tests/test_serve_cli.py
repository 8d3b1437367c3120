"""`align-serve` start-up failures end the process with a clear message, never a hang."""

import socket
import subprocess
import sys

from tests.utils import free_port


def _serve(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "server.cli", "--engine", "transformers", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_taken_port_fails_at_once_and_says_so(tiny_vlm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        run = _serve("--model", str(tiny_vlm), "--port", str(s.getsockname()[1]))
    assert run.returncode == 2
    assert "cannot bind" in run.stderr and "--port" in run.stderr


def test_a_directory_that_is_not_a_model_exits_non_zero(tmp_path):
    run = _serve("--model", str(tmp_path), "--port", str(free_port()))
    assert run.returncode == 1
    assert f"failed to load {tmp_path}" in run.stderr


def test_a_missing_model_directory_is_named(tmp_path):
    run = _serve("--model", str(tmp_path / "nope"), "--port", str(free_port()))
    assert run.returncode != 0 and "is neither a directory nor a hub id" in run.stderr
