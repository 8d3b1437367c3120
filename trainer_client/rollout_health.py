"""Rollout health in the trainer: the `rollout/*` metrics every step and the step-0 parity check.

`RolloutHealth` is the mixin of the trainers whose rollouts another model samples (server mode: the
align-serve engine; colocate: TRL's vLLM). The metrics (`rollout_metrics`) come from the forward that forms
the importance-sampling ratio: the loss's own (`LossForwardImportanceSampling.sampling_ratio` calls
`record_mismatch`), or TRL's "old logprobs" forward, whose result the scored batch carries (`scored`).
Async rollouts hand each sample's weight lag over (`rollout_lag`, a per-sample tensor in the batch, so it
follows TRL's shuffle and split), and the metrics are split by it. The first batch's metrics, and before
it the servers' reading of the first prompt, go to the `ParityCheck`.

`RolloutLine` logs one line per logged step with the headline numbers (`summary`).
"""

import logging

import torch
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

from trainer_client import trl_seam
from trainer_client.parity import ParityCheck, Side, probe_servers
from trainer_client.rollout_metrics import mismatch

log = logging.getLogger(__name__)

LAG = "rollout_lag"  # the batch's per-sample weight lag (async rollouts)


def compute_dtype(trainer) -> str:
    """What the trainer's forward computes in: mixed precision's dtype when it is on, else the parameters'."""
    if trainer.args.bf16:
        return "bfloat16"
    if trainer.args.fp16:
        return "float16"
    return str(next(trainer.model.parameters()).dtype).removeprefix("torch.")


class RolloutHealth(trl_seam.GenerationBatchSeam):
    """Mixin for a GRPOTrainer whose rollouts carry the sampler's logprobs (use_vllm, its IS correction on).
    Call `watch_rollouts(sampler)` once the trainer is built."""

    parity: ParityCheck | None = None

    def watch_rollouts(self, sampler: Side) -> None:
        self.parity = ParityCheck(self.args.parity_check, compute_dtype(self), sampler)
        if not self.vllm_importance_sampling_correction:
            log.warning("--vllm_importance_sampling_correction false: no forward compares the sampler's logprobs "
                        "with the trainer's, so no rollout/* metrics and no step-0 logprob check (docs/health.md)")

    def rollout_lags(self) -> list[int] | None:
        """Per local sample of the batch just generated, its weight lag; None: every sample is on the newest
        weights (synchronous rollouts)."""
        return None

    def generating(self, inputs) -> None:
        parity = self.parity
        if not (self.model.training and parity is not None and parity.pending and parity.probe is None
                and parity.sampler.servers):
            return
        probe = None
        if self.accelerator.is_main_process:
            probe = probe_servers(self, self.vllm_generation.client, parity.sampler.servers, inputs[0])
        parity.probed(broadcast_object_list([probe], from_process=0)[0])

    def scored(self, batch: dict) -> None:
        if not self.model.training or self.parity is None:
            return
        lags = self.rollout_lags()
        if lags is not None:
            batch[LAG] = torch.tensor(lags, device=batch["completion_ids"].device)
        if "old_per_token_logps" in batch and "sampling_per_token_logps" in batch:
            self.record_mismatch(batch["old_per_token_logps"], batch)

    def record_mismatch(self, logps: torch.Tensor, inputs: dict) -> None:
        """The rollout/* metrics of a batch from the trainer's `logps` on its sampled tokens; the first batch's
        go to the parity check. Evaluation samples greedily: nothing to compare there."""
        if not self.model.training:
            return
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        values = mismatch(logps, inputs["sampling_per_token_logps"], mask,
                          sequence_level=self.vllm_importance_sampling_mode.startswith("sequence"),
                          clip=(self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max),
                          gather=self.accelerator.gather, lags=inputs.get(LAG))
        metrics = trl_seam.metrics(self, "train")
        for name, value in values.items():
            metrics[f"rollout/{name}"].append(value)
        if self.parity.pending:
            tokens = self.accelerator.gather(mask.sum()[None]).sum().item()
            self.parity.judge(values, int(tokens))


def summary(logs: dict) -> str:
    """The headline rollout numbers of a logged step, or "" when it has none."""
    if "rollout/k3_kl" not in logs:
        return ""
    text = (f"rollout |dlogp| {logs['rollout/logprob_diff/mean']:.2g} (max {logs['rollout/logprob_diff/max']:.2g}) "
            f"K3 {logs['rollout/k3_kl']:.2g} IS {logs['rollout/is_ratio/mean']:.3f} "
            f"[{logs['rollout/is_ratio/min']:.3g}, {logs['rollout/is_ratio/max']:.3g}] ESS {logs['rollout/ess']:.3f}")
    for name, label in (("lag_0", "lag 0"), ("lag_ge1", "lag>=1")):
        if f"rollout/{name}/k3_kl" in logs:
            text += f" | {label}: K3 {logs[f'rollout/{name}/k3_kl']:.2g} IS {logs[f'rollout/{name}/is_ratio/mean']:.3f}"
    return text


class RolloutLine(TrainerCallback):
    """One log line per logged training step: its rollout/* headline (`summary`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        text = summary(logs or {})
        if text and state.is_world_process_zero:
            log.info("step %d: %s", state.global_step, text)
