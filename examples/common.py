"""What every demo does the same way: a work directory and a tiny model, commands run with their logs
kept, an align-serve beside the run, an align-train run in this process with one printed line per step,
and a plot."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent  # align-serve, align-train, align-tiny-model beside this interpreter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log: Path) -> None:
    """One command of the demo, shown as typed; its output goes to `log`, shown when it fails."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}); last lines of {log}:\n{log.read_text()[-3000:]}")


def start_demo(name: str, work_dir: str | None, arch: str, seed: int) -> tuple[Path, float]:
    """A demo's start: its work directory (a temp one unless given) and the start time; a tiny random
    model of `arch` built in work/tiny."""
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"vlm-align-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"{name} work dir: {work}")
    run([str(BIN / "align-tiny-model"), str(work / "tiny"), "--arch", arch, "--seed", str(seed)], work / "tiny.log")
    return work, started


@contextlib.contextmanager
def serving(model: Path, engine: str, seed: int, log: Path) -> Iterator[str]:
    """An align-serve of `model` on a free loopback port, ready; its URL. Stopped (and its engine with it)
    on the way out."""
    from trainer_client.client import AlignClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen([str(BIN / "align-serve"), "--model", str(model), "--engine", engine, "--port",
                                   str(port), "--seed", str(seed), "--log-level", "warning"],
                                  stdout=out, stderr=subprocess.STDOUT)
        try:
            with AlignClient(url) as client:
                client.wait_ready(timeout=600)
            yield url
        finally:
            server.send_signal(signal.SIGTERM)  # align-serve shuts its engine down before it exits
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()


def rollout_text(logs: dict) -> str:
    """A step's rollout health in a few characters: K3 KL and the IS ratio's mean between the server's
    logprobs and the trainer's (docs/health.md), or nothing when the step logged none."""
    if "rollout/k3_kl" not in logs:
        return ""
    return f"K3 {logs['rollout/k3_kl']:.1e} IS {logs['rollout/is_ratio/mean']:.3f}  "


class StepLines:
    """One printed line per logged training step, `line(step, logs, seconds since start)` making it; the
    logs of every step are kept (`steps`)."""

    def __init__(self, line: Callable[[int, dict, float], str], started: float):
        from transformers import TrainerCallback

        printer = self
        self.steps: list[dict] = []

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "reward" in logs:
                    printer.steps.append(logs)
                    print(line(state.global_step, logs, time.monotonic() - started), flush=True)

        self.callback = Callback()


def train_here(argv: list[str], *callbacks):
    """`align-train ARGV` in this process, not a subprocess, so that each step prints its line as it ends
    (`callbacks`: a StepLines' callback and any other); the trained model is saved. Returns the trainer."""
    from transformers import PrinterCallback

    from trainer_client.config import parse_args
    from trainer_client.trainers import build_trainer

    method, align, config, _ = parse_args(argv)
    trainer = build_trainer(method, align, config)
    trainer.remove_callback(PrinterCallback)  # its dict per step would bury the demo's lines
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    trainer.save_model(config.output_dir)
    return trainer


def plot_steps(path: Path, title: str, ylabel: str, curves: list[tuple[list[int], list[float], str, dict]],
               chance: float = 0.25) -> Path:
    """Curves (steps, values, label, matplotlib style) against `chance`, as a PNG."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("the demo's plot needs matplotlib: pip install 'vlm-align[demo]'")

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for steps, values, label, style in curves:
        ax.plot(steps, values, label=label, **style)
    ax.axhline(chance, color="tab:red", linestyle="--", label=f"chance (one in {round(1 / chance)})")
    top = max([1.02, *(v for _, values, _, _ in curves for v in values)])
    ax.set(xlabel="GRPO step", ylabel=ylabel, ylim=(0, top), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
