"""Server mode without TRL's extra "old logprobs" forward pass.

With vLLM-style generation TRL 1.16 runs one more no-grad forward over every generation batch
(`old_per_token_logps`) only to form the importance-sampling ratio exp(old - sampling) against the
server's logprobs. When each generation batch is used within a single optimizer step
(`gradient_accumulation_steps % (steps_per_generation * num_iterations) == 0`, TRL's own test for
"old == current"), those old logprobs are exactly the detached logprobs of the loss's own forward:
TRL already uses `per_token_logps.detach()` as `old_per_token_logps` there when it does not use vLLM.
`LossForwardImportanceSampling` forms the same ratio from that forward instead, so a server-mode step
costs one forward + backward, as TRL's local step does. Same loss, same metrics; other settings
(steps_per_generation > gradient_accumulation_steps, GSPO's preset, VESPO) keep TRL's path.

The overrides of TRL's scoring and loss are `trl_seam.LossForwardRatioSeam`'s; this mixin decides when
they apply and forms the ratio.
"""

import math

import torch

from trainer_client import trl_seam


class LossForwardImportanceSampling(trl_seam.LossForwardRatioSeam):
    """Mixin for a GRPOTrainer that generates through `vllm_generation` (use_vllm and its IS correction),
    with `record_mismatch` (rollout_health.RolloutHealth's), which gets the forward's logprobs too."""

    def ratio_from_loss_forward(self) -> bool:
        """Whether the ratio comes from the loss's own forward: each generation batch is trained within one
        optimizer step (TRL's own test for old logprobs == the current ones), and neither VESPO's loss nor
        a correction that is off needs TRL's path."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo"
                and self.args.gradient_accumulation_steps % generate_every == 0)

    def sampling_ratio(self, logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """TRL's vLLM importance-sampling ratio and its metrics (grpo_trainer.py, same modes and clips)."""
        sampling = inputs["sampling_per_token_logps"]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        diff = torch.nan_to_num((logps - sampling) * mask, nan=0.0)
        mode = self.vllm_importance_sampling_mode
        sequence_level = mode in ("sequence_mask", "sequence_truncate")
        ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence_level else diff)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if mode in ("sequence_truncate", "token_truncate"):
            ratio = torch.clamp(ratio, min=lo, max=hi)
        elif mode in ("sequence_mask", "token_mask"):
            lo = -math.inf if lo is None else lo
            hi = math.inf if hi is None else hi
            ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        else:
            raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}")

        metrics = trl_seam.metrics(self)
        bool_mask = mask.bool()
        delta = torch.abs(logps - sampling)[bool_mask]
        delta = delta[~torch.isnan(delta)]
        zero = torch.tensor(0.0, device=logps.device)
        gather = self.accelerator.gather
        metrics["sampling/sampling_logp_difference/mean"].append(
            gather(delta.mean() if delta.numel() else zero).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(
            gather(delta.max() if delta.numel() else zero).max().item())
        flat = ratio.flatten() if sequence_level else ratio[bool_mask]
        for name, reduce in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
            value = gather(reduce(flat) if flat.numel() else zero)
            metrics[f"sampling/importance_sampling_ratio/{name}"].append(
                getattr(value, "nanmean" if name == "mean" else name)().item())
        self.record_mismatch(logps, inputs)
        return ratio
