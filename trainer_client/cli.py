"""`align-train sft|grpo|gspo|mpo --model ID_OR_PATH (--dataset FILE | --dataset_name ID) [--config run.yaml] [flags]`;
`align-train check [grpo|gspo] FLAGS` validates a setup without training (check.py)."""

import atexit
import logging
import os
import sys

from runtime.model_hub import ModelNotFound, resolve_model
from trainer_client.config import parse_args
from trainer_client.data import DatasetError
from trainer_client.rewards import RewardSetupError
from trainer_client.tools import ToolSetupError
from trainer_client.video import VideoError
from trainer_client.weights import TransportError


def run(argv: list[str] | None = None):
    """Parse, check the data, train, save; returns the trainer (its `state` holds the metrics)."""
    method, align, config, model_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if config.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress bar
    from trl import get_peft_config

    from trainer_client.trainers import build_trainer, resume_arg

    try:
        # Once, to the snapshot directory: the processor, the trainer and the saved run all see the same files.
        align.model = str(resolve_model(align.model, model_args.model_revision))
    except ModelNotFound as exc:
        sys.exit(f"align-train: --model {exc}")
    try:
        trainer = build_trainer(method, align, config, peft_config=get_peft_config(model_args))
    except DatasetError as exc:
        sys.exit(f"align-train: bad dataset, nothing trained: {exc}")
    except RewardSetupError as exc:
        sys.exit(f"align-train: --reward_funcs: {exc}")
    except ToolSetupError as exc:
        sys.exit(f"align-train: {exc}")
    try:
        trainer.train(resume_from_checkpoint=resume_arg(config))
    except TransportError as exc:
        sys.exit(f"align-train: --weight-transport: {exc}")
    except VideoError as exc:  # SFT, MPO: a clip the data check opened, whose frames cannot be decoded (GRPO skips its row)
        sys.exit(f"align-train: {exc}")
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json: the metrics history (reward curve) beside the model
    if config.process_index == 0:
        print(f"align-train {method}: {trainer.state.global_step} steps, model saved to {config.output_dir}")
    return trainer


def end_distributed_process() -> None:
    """End a process of a multi-process run after its last collective, skipping the interpreter's
    finalization (a no-op in a single-process run). torch 2.13's gloo worker threads release a
    finished collective's tensors only after it has reported done; when a release lands while the
    interpreter is finalizing, the thread cannot take the GIL and the process aborts (`terminate called
    without an active exception`, exit -6) although its work finished (pytorch/pytorch#190489).
    So: run the exit handlers a normal exit runs (vLLM's, in colocate mode, still need the process group),
    leave the process group, flush, and exit."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    atexit._run_exitfuncs()  # logging, tensorboard/wandb writers, multiprocessing children, vLLM
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    if sys.argv[1:2] == ["check"]:
        from trainer_client.check import main as check

        sys.exit(check(sys.argv[2:]))
    run()
    end_distributed_process()


if __name__ == "__main__":
    main()
