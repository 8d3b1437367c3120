"""A training run outlives its processes: the rollout server SIGKILLed and restarted mid-run (it comes
back with its start checkpoint, versions from 0), the trainer SIGKILLed and resumed from a checkpoint.
Every step trains on completions from the weights the trainer pushed for it; no step is lost."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.test_train import REWARDS, SMALL
from tests.utils import ServerProcess, wait_for
from trainer_client.cli import run

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.fault


# One client for every poll: `httpx.get` builds a client, and its SSL context costs ~50 ms of CPU,
# which polling every 50 ms would take from the server and the trainer on 2 cores.
_HTTP = httpx.Client(timeout=5)


def served_version(server: ServerProcess) -> int | None:
    """The server's weight_version; None while it is down."""
    try:
        return _HTTP.get(f"{server.url}/v1/weights/version", headers=server.headers()).json()["weight_version"]
    except httpx.TransportError:
        return None


def grpo_args(model, dataset, out, url, *flags) -> list[str]:
    return ["grpo", "--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), *SMALL,
            "--num_generations", "4", "--max_completion_length", "4", "--steps_per_generation", "1",
            "--vllm-mode", "server", "--server-url", url, "--server_timeout", "300", *REWARDS, *flags]


class Trainer:
    """`align-train` as a subprocess of its own group (SIGKILL reaches all of it); output to a file."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer_client.cli", *args], cwd=ROOT,
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"align-train exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
        return True

    def wait(self, timeout: float = 900.0) -> str:
        self.proc.wait(timeout)
        self._out.close()
        assert self.proc.returncode == 0, self.output()[-4000:]
        return self.output()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._out.close()

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text()


def step_logs(history: list[dict]) -> list[dict]:
    return [e for e in history if "loss" in e]


def run_through_a_restart(engine, model, data_dir, tmp_path, log_dir, *flags) -> tuple[list[dict], str, int | None]:
    """An 8-step server-mode run whose server is SIGKILLed once step 2's push landed and started again
    on the same port: (the steps' logs, the trainer's output, the new server's final version)."""
    server = ServerProcess(model, engine, log_dir=log_dir).wait_ready(600)
    out = tmp_path / "out"
    trainer = Trainer(grpo_args(model, data_dir / "grpo.jsonl", out, server.url, "--max_steps", "8", *flags),
                      tmp_path / "train.log")
    try:
        # Version 3 = the start push and those after steps 1 and 2: the run is under way.
        wait_for(lambda: trainer.check_alive() and (served_version(server) or 0) >= 3, "step 2's push", timeout=600)
        server.kill()
        server = ServerProcess(model, engine, log_dir=log_dir, port=server.port)
        output = trainer.wait()
        final = served_version(server)
    finally:
        if trainer.proc.poll() is None:
            trainer.kill()
        server.stop()
    steps = step_logs(json.loads((out / "trainer_state.json").read_text())["log_history"])
    assert [e["step"] for e in steps] == list(range(1, 9))  # every step ran
    return steps, output, final


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_server_killed_mid_run_and_restarted(engine, tiny_vlm, data, tmp_path, log_dir):  # noqa: F811
    steps, output, final = run_through_a_restart(engine, tiny_vlm, data, tmp_path, log_dir)
    served = [e["weight_version"] for e in steps]
    assert served == [e["weight_version_pushed"] for e in steps]  # each on the weights pushed for it
    # The restarted server counts from 0 again: the versions went back once, mid-run...
    assert sum(b < a for a, b in zip(served, served[1:], strict=False)) == 1, served
    assert "restarted" in output
    # ...and the new server holds the weights the trainer pushed after its last step.
    assert final == served[-1] + 1


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_trainer_killed_mid_step_resumes_from_its_checkpoint(engine, tiny_vlm, data, tmp_path, log_dir,  # noqa: F811
                                                           request):
    # vLLM: the suite's shared server (conftest.py), whose versions go on counting from v
    own = engine != "vllm"
    server = ServerProcess(tiny_vlm, engine, log_dir=log_dir).wait_ready() if own else request.getfixturevalue("vllm_vlm")
    out, v = tmp_path / "out", served_version(server)
    key = ["--api_key", server.api_key] if server.api_key else []
    try:
        trainer = Trainer(grpo_args(tiny_vlm, data / "grpo.jsonl", out, server.url, "--max_steps", "6",
                                    "--save_steps", "2", *key), tmp_path / "train.log")
        # Version v + 4 comes after step 3: checkpoint-2 was saved at the end of step 2, before it.
        wait_for(lambda: trainer.check_alive() and (served_version(server) or 0) >= v + 4, "step 3's push",
                 timeout=600)
        trainer.kill()
        before_resume = served_version(server)

        resumed = run(grpo_args(tiny_vlm, data / "grpo.jsonl", out, server.url, "--max_steps", "6",
                                "--save_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-2"), *key))
    finally:
        if own:
            server.stop()
    steps = step_logs(resumed.state.log_history)
    assert [e["step"] for e in steps] == list(range(1, 7))  # steps 1-2 from the checkpoint, 3-6 run again
    after = [e for e in steps if e["step"] > 2]
    assert all(e["weight_version"] == e["weight_version_pushed"] for e in after)
    # The first rollouts after the resume came from the resumed run's own first push (the weights
    # it restored), not from what the killed run left on the server.
    assert after[0]["weight_version"] > before_resume
    assert [int(e["weight_version"]) for e in after] == list(range(int(after[0]["weight_version"]),
                                                                      int(after[0]["weight_version"]) + 4))


def test_server_killed_mid_async_run_and_restarted(tiny_vlm, data, tmp_path, log_dir):  # noqa: F811
    """--async_rollouts waits a restart out as synchronous server mode does: the new instance gets the
    trainer's weights again, what it served before that is refused, and every step trains on
    completions from weights this trainer pushed, counted in its own version sequence."""
    steps, output, final = run_through_a_restart("transformers", tiny_vlm, data, tmp_path, log_dir,
                                                 "--async_rollouts", "--max_staleness", "1")
    assert "restarted" in output
    used, pushed = [e["weight_version"] for e in steps], [e["weight_version_pushed"] for e in steps]
    # The trainer's own sequence: one version per push, never back at the restart...
    assert pushed == list(range(int(pushed[0]), int(pushed[0]) + 8)), pushed
    assert used == sorted(used), used
    # ...and no step trained on anything but the weights pushed for it or the push before.
    assert all(p - 1 <= u <= p for u, p in zip(used, pushed, strict=True)), (used, pushed)
    assert max(e["async/staleness_max"] for e in steps) <= 1
    # The new instance holds the weights pushed after the last step: its own count since the restart.
    assert final is not None and 1 <= final < pushed[-1] + 1
