"""How far the trainer's model is from the one that sampled its rollouts: the `rollout/*` metrics.

From the forward that forms the importance-sampling (IS) ratio (the loss's own, or TRL's "old logprobs"
forward), over the completion tokens the loss trains on (tool-output tokens and tokens the sampler gave
no logprob excluded), with d = log pi_trainer(y) - log pi_sampler(y) per sampled token y:

- `logprob_diff/mean`, `logprob_diff/max`: mean and largest |d| (nats/token).
- `k3_kl`: the mean of exp(d) - 1 - d, Schulman's low-variance, never-negative estimator of
  KL(pi_sampler || pi_trainer) from the sampler's own tokens.
- `ppl_ratio`: per sequence PPL_trainer / PPL_sampler = exp(-mean_t d), averaged over sequences.
- `is_ratio/mean`, `/min`, `/max`: the raw per-token IS ratio exp(d), before the correction clips it.
- `is_ratio/clipped_frac`: the share of the ratios the correction forms (per token, or exp(sum_t d) per
  sequence under TRL's sequence_* modes) outside [vllm_importance_sampling_clip_min, _max], which it
  masks (*_mask modes) or truncates (*_truncate modes).
- `ess`: the normalised effective sample size of those same ratios, (sum w)^2 / (n sum w^2), in (0, 1]
  (1 / (1 + chi^2) of the ratios: verl's chi-squared says the same).

With per-sample weight lags (async rollouts: versions between the trainer's weights and the oldest that
sampled the sample), the three headline ones again over lag-0 samples (`lag_0/...`) and over staler ones
(`lag_ge1/...`): what staleness costs. Every value is over the batch of all processes.
"""

import math

import torch

HEADLINE = ("logprob_diff/mean", "k3_kl", "is_ratio/mean")
_SUMS = ("tokens", "abs", "k3", "ppl", "sequences", "token_ratio", "w", "w2", "ratios", "clipped")


def _local(d: torch.Tensor, valid: torch.Tensor, sequence_level: bool, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's sums (`_SUMS`) and extremes (max |d|, max token ratio, -min token ratio) over `valid`
    tokens."""
    d = torch.where(valid, d, 0.0)
    per_seq = valid.sum(-1)
    seq = per_seq > 0
    ratio = torch.exp(d.sum(-1))[seq] if sequence_level else torch.exp(d)[valid]
    lo, hi = clip
    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if lo is not None:
        clipped |= ratio < lo
    if hi is not None:
        clipped |= ratio > hi
    ppl = torch.exp(-d.sum(-1)[seq] / per_seq[seq])
    sums = torch.stack([x.to(torch.float64) for x in (
        valid.sum(), d.abs().sum(), (torch.expm1(d) - d).sum(), ppl.sum(), seq.sum(), torch.exp(d)[valid].sum(),
        ratio.sum(), (ratio * ratio).sum(), ratio.new_tensor(ratio.numel()), clipped.sum())])
    none = torch.tensor(-math.inf, dtype=torch.float64, device=d.device)
    if not valid.any():
        return sums, torch.stack([none, none, none])
    return sums, torch.stack([d.abs()[valid].max(), d[valid].max().exp(), -d[valid].min().exp()])


def mismatch(logps: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor, *, sequence_level: bool,
             clip: tuple[float | None, float | None], gather, lags: torch.Tensor | None = None) -> dict[str, float]:
    """The metrics above for a (B, T) batch: the trainer's `logps`, the sampler's `sampling` logprobs, the
    loss's `mask`; `gather` is the accelerator's (every process calls this together); `lags` (B,) or None.
    A subset with no token anywhere is left out."""
    logps, sampling = logps.detach().to(torch.float64), sampling.detach().to(torch.float64)
    valid = mask.bool() & ~torch.isnan(sampling) & ~torch.isnan(logps)
    d = torch.nan_to_num(logps - sampling, nan=0.0)
    subsets = {"": valid}
    if lags is not None:
        lags = lags.to(valid.device)[:, None]
        subsets.update({"lag_0/": valid & (lags == 0), "lag_ge1/": valid & (lags >= 1)})
    parts = [_local(d, v, sequence_level, clip) for v in subsets.values()]
    sums = gather(torch.stack([s for s, _ in parts])[None]).sum(0)
    extremes = gather(torch.stack([e for _, e in parts])[None]).amax(0)
    out = {}
    for prefix, total, top in zip(subsets, sums.tolist(), extremes.tolist(), strict=True):
        s = dict(zip(_SUMS, total, strict=True))
        if not s["tokens"]:
            continue
        values = {"logprob_diff/mean": s["abs"] / s["tokens"], "logprob_diff/max": top[0],
                  "k3_kl": s["k3"] / s["tokens"], "ppl_ratio": s["ppl"] / s["sequences"],
                  "is_ratio/mean": s["token_ratio"] / s["tokens"], "is_ratio/min": -top[2], "is_ratio/max": top[1],
                  "is_ratio/clipped_frac": s["clipped"] / s["ratios"],
                  "ess": s["w"] ** 2 / (s["ratios"] * s["w2"]) if s["w2"] else 1.0}
        out.update({prefix + k: v for k, v in values.items() if not prefix or k in HEADLINE})
    return out
