"""Test helpers: real `align-serve` subprocesses on free loopback ports, tiny images."""

import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def wait_for(condition, what: str, timeout: float = 60.0, poll: float = 0.05):
    """Poll a condition (a status a server reports, a line a process printed) until it holds; return
    its value, or fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def prompts_served(server: "ServerProcess") -> float:
    """The server's `align_prompts_total`: prompts it generated for."""
    text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    return float(next(line for line in text.splitlines() if line.startswith("align_prompts_total ")).split()[-1])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ServerProcess:
    """`align-serve` as a subprocess; logs go to a file that failures print."""

    def __init__(self, model: Path, engine: str, api_key: str | None = None, extra: list[str] | None = None,
                 log_dir: Path | None = None, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = Path(log_dir or "/tmp") / f"align-serve-{engine}-{self.port}.log"
        # ALIGN_TEST_SERVE_ARGS: flags for every server the tests start, e.g. `--dtype float32` on a
        # GPU, where vLLM's auto dtype is bfloat16 and parity with the fp32 reference would not hold.
        cmd = [sys.executable, "-m", "server.cli", "--model", str(model), "--engine", engine,
               "--port", str(self.port), "--log-level", "warning", *(extra or []),
               *shlex.split(os.environ.get("ALIGN_TEST_SERVE_ARGS", ""))]
        if engine == "vllm":
            cmd.append("--enforce-eager")
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(self.log_path, "a")  # a restart on the same port keeps the first life's log
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        # One client for all polls: a new one per poll builds an SSL context (~50 ms of CPU) that a
        # starting server on 2 cores would pay for.
        with httpx.Client(headers=self.headers(), timeout=2) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"align-serve exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    if http.get(f"{self.url}/ready").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        raise TimeoutError(f"align-serve not ready after {timeout} s:\n{self.logs()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self, tail: int | None = 6000) -> str:
        """The server's log so far: its last `tail` characters (None: all of it)."""
        self._log.flush()
        text = self.log_path.read_text()
        return text if tail is None else text[-tail:]

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or an OOM kill would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The whole process group: vLLM's engine core and workers are children.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def cache_as_hub(src: Path, hf_home: Path, repo_id: str, repo_type: str = "model") -> Path:
    """Put directory `src` into a Hugging Face hub cache under `hf_home` as the hub client writes it:
    content-addressed blobs, a snapshot of relative symlinks, `refs/main` naming the commit.
    Returns the snapshot directory."""
    import hashlib

    repo = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(str(p.relative_to(src)).encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---- rollout health (docs/health.md) ----------------------------------------------------------------
# A healthy run here (float32, tiny random models, both engines and colocate) logs an IS ratio mean within
# 1 +- 0.01 and a K3 KL below 1e-4 at every step: measured 0.9955 to 1.0000 and at most 1.1e-05, the
# placeholder tokens the server never samples included (2 of the tiny vocabulary's 454 tokens). A server
# serving other weights measured K3 0.017.
IS_MEAN_TOLERANCE = 0.01
K3_HEALTHY = 1e-4


def assert_rollouts_match(log_history: list[dict]) -> list[dict]:
    """Every logged training step says the model that sampled is the trainer's: the rollout/* IS ratio mean
    within 1 +- IS_MEAN_TOLERANCE and K3 KL under K3_HEALTHY. An async run's numbers are split by staleness:
    its lag-0 samples are held to that (a stale sample's gap is the step's own update); the steps where
    every sample was stale are left out, and those that generated nothing (a generation batch spans
    steps_per_generation / gradient_accumulation_steps steps). Returns the steps checked (at least one)."""
    checked = []
    for entry in (e for e in log_history if "loss" in e):
        split = any(k.startswith(("rollout/lag_0/", "rollout/lag_ge1/")) for k in entry)
        prefix = "rollout/lag_0/" if split else "rollout/"
        if prefix + "k3_kl" not in entry:
            continue
        is_mean, k3 = entry[prefix + "is_ratio/mean"], entry[prefix + "k3_kl"]
        assert abs(is_mean - 1) <= IS_MEAN_TOLERANCE and 0 <= k3 < K3_HEALTHY, \
            f"step {entry['step']}: {prefix}is_ratio/mean {is_mean}, {prefix}k3_kl {k3}"
        checked.append(entry)
    assert checked, "no step held a lag-0 sample to check"
    return checked


def logged_rollouts(output: str) -> list[dict]:
    """The rollout/* metrics of each step a run printed (its log dicts, e.g. under accelerate launch)."""
    import re

    steps = []
    for line in output.splitlines():
        if "'rollout/k3_kl'" in line and "'loss'" in line:
            steps.append({"loss": 0.0, "step": len(steps) + 1, **{k: float(v) for k, v in re.findall(
                r"'(rollout/[a-z0-9_/]+)': '([-0-9.e+]+)'", line)}})
    return steps


def moving_dot(frames: int, direction: str, size: tuple[int, int] = (112, 84), seed: int = 0) -> list[Image.Image]:
    """A short clip as the trainer samples it: a dot moving `direction` (left, right, up, down) from a random
    start over a noisy background, one PIL frame per time step."""
    rng = np.random.RandomState(seed)
    width, height = size
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    x, y = rng.randint(width // 4, 3 * width // 4), rng.randint(height // 4, 3 * height // 4)
    background = (rng.rand(height, width, 3) * 60).astype("uint8")
    out = []
    for t in range(frames):
        frame = background.copy()
        cx, cy = x + step[0] * 6 * t, y + step[1] * 6 * t
        frame[max(cy - 4, 0):cy + 4, max(cx - 4, 0):cx + 4] = (250, 250, 250)
        out.append(Image.fromarray(frame))
    return out


def refusal(argv: list[str]) -> str:
    """The one line `align-train argv` ends with (a SystemExit's message is printed as it is, no traceback)."""
    import pytest

    from trainer_client.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(argv)
    message = str(exit_.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message
