"""`align-train check [grpo|gspo] FLAGS`: validate a setup in a minute, before a long run.

The same flags as the training run. It checks the data (every row, as training does), connects to the
servers, pushes the trainer's weights, then runs the step-0 parity check (parity.py) on the first
batch: the servers' reading of its first prompt, and the sampled logprobs against the trainer's forward.
Nothing is trained or saved. It prints a short report of the data, the first batch's tokens and images,
the servers' settings and the mismatch, and exits 0 when the setup is healthy, 1 when it is not.
"""

import logging
import sys

import torch

from runtime.model_hub import ModelNotFound, resolve_model
from trainer_client import trl_seam
from trainer_client.config import parse_args
from trainer_client.data import DatasetError
from trainer_client.rewards import RewardSetupError
from trainer_client.tools import ToolSetupError

log = logging.getLogger(__name__)


def _method(argv: list[str]) -> list[str]:
    return argv if argv and argv[0] in ("grpo", "gspo") else ["grpo", *argv]


def first_batch(trainer) -> dict:
    """The first batch generated and scored as training would (weights pushed first), then the trainer's
    forward on it where the loss's own forward would form the IS ratio; the parity check sees both."""
    trainer.model.train()
    batch = trl_seam.generate_and_score(trainer, next(iter(trainer.get_train_dataloader())))
    if "old_per_token_logps" not in batch:  # the loss's own forward forms the ratio: run it, without a step
        trainer.current_gradient_accumulation_steps = 1
        with torch.no_grad():
            trl_seam.compute_loss(trainer, batch)
    return batch


def report(trainer, batch: dict, model: str) -> tuple[bool, str]:
    """(healthy, the report's lines) after `first_batch`."""
    parity = trainer.parity
    failed = bool(parity.probe and parity.probe.differs) or (
        parity.values is not None and parity.values["logprob_diff/mean"] > parity.tolerance)
    prompts = int(batch["prompt_mask"].shape[0])
    lines = [f"align-train check: {'healthy' if not failed else 'NOT healthy'}"]
    images = batch.get("image_grid_thw")
    lines.append(f"  data: {len(trainer.train_dataset)} rows checked; first batch: {prompts} completions "
                 f"({prompts // trainer.num_generations} prompts x {trainer.num_generations}), "
                 f"{int(batch['prompt_mask'].sum())} prompt tokens (images expanded), "
                 f"{int(batch['completion_mask'].sum())} completion tokens"
                 + (f", {images.shape[0]} images across the completions" if images is not None else ""))
    client = getattr(trainer.vllm_generation, "client", None)
    if client is not None:
        for i, url in enumerate(client.base_urls):
            info = client.info(refresh=True, server=i)
            lora = f"LoRA up to rank {info.limits.max_lora_rank}" if info.limits.max_lora_rank else "no LoRA"
            lines.append(f"  server {url}: {info.model}, {info.engine} engine, {info.dtype or 'dtype unknown'}, "
                         f"weight_version {info.weight_version}, max_model_len {info.limits.max_model_len}, "
                         f"max_pixels {info.limits.max_pixels}, {info.limits.max_images_per_prompt} images per "
                         f"prompt, {lora}")
    else:
        lines.append(f"  sampler: {parity.sampler.what}")
    lines.append(f"  trainer: {model}, {parity.trainer_dtype}")
    lines += [f"  {c}" for c in parity.causes()]
    if parity.values is not None:
        lines.append(f"  mismatch: {parity.gap_line()}")
    return not failed, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = _method(list(sys.argv[2:] if argv is None else argv))
    method, align, config, model_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if config.vllm_mode not in ("server", "colocate"):
        sys.exit("align-train check: give --vllm-mode server (with --server-url) or colocate: "
                 "it checks what samples the rollouts against the trainer")
    # One batch, as step 0 sees it: read ahead or not, the rollouts are the same.
    config.async_rollouts = False
    config.parity_check = "warn"  # the report says it all; a refusal would cut it short
    from trl import get_peft_config

    from trainer_client.trainers import build_trainer

    try:
        align.model = str(resolve_model(align.model, model_args.model_revision))
        trainer = build_trainer(method, align, config, peft_config=get_peft_config(model_args))
    except ModelNotFound as exc:
        sys.exit(f"align-train check: --model {exc}")
    except DatasetError as exc:
        sys.exit(f"align-train check: bad dataset: {exc}")
    except (RewardSetupError, ToolSetupError) as exc:
        sys.exit(f"align-train check: {exc}")
    healthy, text = report(trainer, first_batch(trainer), align.model)
    print(text, flush=True)
    return 0 if healthy else 1
