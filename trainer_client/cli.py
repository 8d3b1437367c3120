"""`align-train sft|grpo|gspo|mpo --model ID_OR_PATH (--dataset FILE | --dataset_name ID) [--config run.yaml] [flags]`."""

import logging
import sys

from model_hub import ModelNotFound, resolve_model
from trainer_client.config import parse_args
from trainer_client.data import DatasetError
from trainer_client.rewards import RewardSetupError
from trainer_client.tools import ToolSetupError


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
    trainer.train(resume_from_checkpoint=resume_arg(config))
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json: the metrics history (reward curve) beside the model
    if config.process_index == 0:
        print(f"align-train {method}: {trainer.state.global_step} steps, model saved to {config.output_dir}")
    return trainer


def main() -> None:
    run()


if __name__ == "__main__":
    main()
