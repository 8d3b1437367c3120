"""Seconds per GRPO step, side by side in one run on the same tiny VLM, data, batch and seed:
TRL's GRPOTrainer generating locally (transformers), server mode synchronous, and server mode with
async rollouts (one step off), each server mode with the server pinned to core 0 and the trainer to
core 1 (one torch thread each), then with both unpinned. Local generation gets the whole machine.

A step is timed wall clock from one optimizer step's end to the next, so the weight push (a
callback after the step) counts. Medians of steps `--skip`+1..N. The last two lines are the pinned ratios.
`--colocate` adds TRL's colocate mode (vLLM inside the trainer, unpinned) and the server / colocate
ratio, the comparison that matters on a GPU (docs/gpu.md).

    python bench/train_step.py [--steps 12] [--engine transformers|vllm] [--colocate]
"""

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402
import trl.extras.profiling as trl_profiling  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from examples.demo import make_dataset  # noqa: E402
from examples.tiny_model import build  # noqa: E402
from tests.utils import ServerProcess  # noqa: E402
from trainer_client import client as client_module  # noqa: E402
from trainer_client.config import parse_args  # noqa: E402
from trainer_client.trainers import build_trainer  # noqa: E402

# Where a step's time goes: TRL's own profiling spans plus our push, in seconds per call.
SPANS: dict[str, list[float]] = collections.defaultdict(list)
_exit = trl_profiling.ProfilingContext.__exit__


def _record(self, *exc):
    SPANS[self.name.split(".", 1)[-1]].append(time.perf_counter() - self._start_time)
    return _exit(self, *exc)


trl_profiling.ProfilingContext.__exit__ = _record
_push = client_module.AlignClient.push_weights


def _timed_push(self, *args, **kwargs):
    start = time.perf_counter()
    try:
        return _push(self, *args, **kwargs)
    finally:
        SPANS["push_weights"].append(time.perf_counter() - start)


client_module.AlignClient.push_weights = _timed_push


def parity_reward(completion_ids, **kwargs):
    """Varies inside every group, so every step has gradients and so a weight push."""
    return [float(ids[0] % 2) for ids in completion_ids]


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def pin(pid: int, cores: set[int], children: bool = True) -> None:
    """Every thread of `pid` (and of its children) onto `cores`. The trainer is pinned without its
    children: the server it started is one of them and has a core of its own."""
    procs = [psutil.Process(pid)]
    if children:
        procs += procs[0].children(recursive=True)
    for proc in procs:
        for thread in proc.threads():
            try:
                os.sched_setaffinity(thread.id, cores)
            except (ProcessLookupError, PermissionError):
                pass


def check_pinned(server_pid: int, server_cores: set[int], trainer_pid: int, trainer_cores: set[int]) -> None:
    """Fail rather than report "pinned" numbers from processes sharing a core."""
    for pid, cores in ((server_pid, server_cores), (trainer_pid, trainer_cores)):
        for thread in psutil.Process(pid).threads():
            got = os.sched_getaffinity(thread.id)
            if got != cores:
                sys.exit(f"thread {thread.id} of pid {pid} runs on cores {sorted(got)}, not {sorted(cores)}")


def train(flags: list[str], skip: int, into: dict[str, list[float]]) -> None:
    """Train; append the step times (after `skip`) under "step" and each span's times under its name."""
    SPANS.clear()
    method, align, config, _ = parse_args(flags)
    trainer = build_trainer(method, align, config)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    into["step"] += [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][skip:]
    for name, times in SPANS.items():
        into[name] += times[skip:] or times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the five runs this many times, interleaved (for a machine shared with other jobs)")
    parser.add_argument("--colocate", action="store_true", help="also time TRL's colocate mode (vLLM in the trainer)")
    args = parser.parse_args()
    all_cores = os.sched_getaffinity(0)
    if len(all_cores) < 2:
        sys.exit("bench/train_step.py pins the server and the trainer to different cores: it needs 2 or more")
    server_core, trainer_core = sorted(all_cores)[:2]

    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    model = build(work / "tiny", "qwen2_vl", seed=0)
    data = make_dataset(work / "data", 128, seed=0)
    flags = ["grpo", "--model", str(model), "--dataset", str(data), "--max_steps", str(args.steps),
             "--per_device_train_batch_size", str(args.prompts * args.generations),
             "--num_generations", str(args.generations), "--max_completion_length", str(args.tokens),
             "--learning_rate", "1e-3", "--reward_funcs", "__main__:parity_reward", "--save_strategy", "no",
             "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--logging_steps", "1"]

    results: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    threads = torch.get_num_threads()
    for _ in range(args.rounds):
        train([*flags, "--output_dir", str(work / "local"), "--vllm-mode", "none"], args.skip, results["local"])
        for pinned in (True, False):
            env = {"OMP_NUM_THREADS": "1"} if pinned else {}
            server = ServerProcess(model, args.engine, log_dir=work, env=env).wait_ready(600)
            try:
                if pinned:
                    pin(server.proc.pid, {server_core})
                    pin(os.getpid(), {trainer_core}, children=False)
                    torch.set_num_threads(1)
                    check_pinned(server.proc.pid, {server_core}, os.getpid(), {trainer_core})
                for mode, extra in (("sync", []), ("async", ["--async_rollouts"])):
                    tag = f"{mode} {'pinned' if pinned else 'unpinned'}"
                    train([*flags, "--output_dir", str(work / tag.replace(" ", "-")), "--vllm-mode", "server",
                           "--server-url", server.url, *extra], args.skip, results[tag])
            finally:
                server.stop()
                pin(os.getpid(), all_cores, children=False)
                torch.set_num_threads(threads)
        if args.colocate:  # last: the trainer's vLLM engine is not released until this process ends
            train([*flags, "--output_dir", str(work / "colocate"), "--vllm-mode", "colocate"], args.skip,
                  results["colocate"])

    batch = f"{args.prompts} prompts x {args.generations} generations x {args.tokens} tokens"
    print(f"\nGRPO step, tiny Qwen2-VL, {batch}, {args.engine} engine, median of steps {args.skip + 1}-{args.steps}"
          f" over {args.rounds} round(s)")
    print(f"(pinned: server on core {server_core}, trainer on core {trainer_core}; local always unpinned)")
    shown = ("_prepare_inputs", "vLLM.generate", "transformers.generate", "_get_per_token_logps_and_entropies",
             "compute_loss", "_calculate_rewards", "sync_weights", "push_weights")
    print(f"{'':18s} {'step s':>7s}  " + "  ".join(f"{s[:14]:>14s}" for s in shown))
    step = {tag: statistics.median(parts["step"]) for tag, parts in results.items()}
    for tag, parts in results.items():
        print(f"{tag:18s} {step[tag]:7.3f}  " + "  ".join(
            f"{statistics.median(parts[s]) * 1000:11.1f} ms" if s in parts else f"{'-':>14s}" for s in shown))
    for pinned in ("unpinned", "pinned"):
        print(f"ratio sync / local ({pinned}): {step['sync ' + pinned] / step['local']:.2f}; "
              f"async / local ({pinned}): {step['async ' + pinned] / step['local']:.2f}")
    if args.colocate:
        print(f"ratio sync / colocate (unpinned): {step['sync unpinned'] / step['colocate']:.2f}; "
              f"async / colocate (unpinned): {step['async unpinned'] / step['colocate']:.2f}")
    print(f"ratio sync / local: {step['sync pinned'] / step['local']:.2f}")
    print(f"ratio async / local: {step['async pinned'] / step['local']:.2f}")


if __name__ == "__main__":
    main()
