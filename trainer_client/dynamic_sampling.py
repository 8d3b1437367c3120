"""Dynamic sampling (DAPO) and the batch stream that async rollouts peek into.

`GenerationBatches` turns TRL's train dataloader into a stream of *generation* batches that can be
peeked ahead (async rollouts generate batch t+1 while step t trains) and drawn from outside the
Trainer's loop (dynamic sampling's extra rounds). TRL's RepeatSampler yields each generation batch
`steps_per_generation * num_iterations` times in a row and reads only the first; the stream keeps
that shape for the Trainer's loop and runs on across epochs by itself.

`DynamicSampling` (`--dynamic_sampling`): a group whose rewards all agree has zero advantage and
teaches nothing. Such groups are dropped and more prompts are drawn and generated, up to
`--max_resample_rounds` extra rounds, until the batch is full again; a batch still short after
that trains on the informative groups it has. Logged per generation step:
`dynamic_sampling/dropped_group_ratio`, `dynamic_sampling/resample_rounds`,
`dynamic_sampling/zero_advantage_groups_trained` (0 unless no round found a single informative group).
"""

import logging
from collections import deque

import torch
from trl.trainer.utils import split_pixel_values_by_grid

from trainer_client import trl_seam

log = logging.getLogger(__name__)

# Keys padded on the left (prompt side) or on the right (completion side), with their pad value.
_PROMPT_SIDE = {"prompt_ids": "pad", "prompt_mask": 0}
_COMPLETION_SIDE = {"completion_ids": "pad", "completion_mask": 0, "sampling_per_token_logps": 0.0,
                    "old_per_token_logps": 0.0, "ref_per_token_logps": 0.0, "importance_sampling_ratio": 0.0,
                    "tool_mask": 1}
_BOTH_SIDES = ("token_type_ids", "mm_token_type_ids")  # prompt part + completion part in one row


class GenerationBatches:
    """The train dataloader as a stream of generation batches: `peek(k)` the k-th one not yet
    handed out, `take()` the next one; iterating yields what TRL's loop expects, epoch after epoch."""

    def __init__(self, loader, repeats: int):
        self.loader, self.repeats = loader, repeats
        self._ahead: deque = deque()
        self._source = self._generation_batches()

    def _generation_batches(self):
        epoch = 0
        while True:
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)
            yielded = False
            for i, batch in enumerate(self.loader):
                if i % self.repeats == 0:
                    yielded = True
                    yield batch
            if not yielded:
                return
            epoch += 1

    def peek(self, k: int = 0):
        while len(self._ahead) <= k:
            self._ahead.append(next(self._source))
        return self._ahead[k]

    def take(self):
        self.peek()
        return self._ahead.popleft()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        def one_epoch():
            for i in range(len(self.loader)):
                if i % self.repeats == 0:
                    batch = self.take()
                yield batch

        return one_epoch()

    def set_epoch(self, epoch: int) -> None:
        """The stream moves on to the next epoch itself (it may already be reading it ahead)."""

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _pad_cat(tensors: list[torch.Tensor], left: bool, value) -> torch.Tensor:
    width = max(t.size(1) for t in tensors)
    padded = []
    for t in tensors:
        pad = (width - t.size(1), 0) if left else (0, width - t.size(1))
        padded.append(torch.nn.functional.pad(t, pad, value=value))
    return torch.cat(padded)


def _padded(tensors: list) -> list:
    """Tensors (image inputs of several rounds) zero-padded to one shape past their first dimension: Idefics3
    pads its tiles, LLaVA-OneVision its anyres patches, to the largest image of each batch, and the model
    skips an all-zero tile (Idefics3) or reads only the patches its `image_sizes` give (LLaVA-OneVision)."""
    if not all(isinstance(t, torch.Tensor) and t.ndim > 1 for t in tensors):
        return tensors
    shape = [max(t.size(d) for t in tensors) for d in range(1, tensors[0].ndim)]
    out = []
    for t in tensors:
        pad = [p for d in reversed(range(1, t.ndim)) for p in (0, shape[d - 1] - t.size(d))]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return out


def _concat(parts: list[dict], pad_id: int, sequence_ratio: bool) -> dict:
    """Row-wise concatenation of TRL generation outputs (pixel values split per sample) with
    different prompt/completion widths. `sequence_ratio`: the IS ratio is one column per sequence."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if first is None:
            out[key] = None
        elif isinstance(first, list):
            out[key] = _padded([v for vs in values for v in vs])
        elif first.ndim == 0:
            out[key] = first  # num_items_in_batch: recomputed by the caller
        elif key in _PROMPT_SIDE:
            out[key] = _pad_cat(values, True, pad_id if _PROMPT_SIDE[key] == "pad" else _PROMPT_SIDE[key])
        elif key in _COMPLETION_SIDE and not (key == "importance_sampling_ratio" and sequence_ratio):
            out[key] = _pad_cat(values, False, pad_id if _COMPLETION_SIDE[key] == "pad" else _COMPLETION_SIDE[key])
        elif key in _BOTH_SIDES:
            widths = [p["prompt_ids"].size(1) for p in parts]
            out[key] = torch.cat([_pad_cat([v[:, :w] for v, w in zip(values, widths, strict=True)], True, 0),
                                  _pad_cat([v[:, w:] for v, w in zip(values, widths, strict=True)], False, 0)], dim=1)
        else:
            out[key] = torch.cat(_padded(values))
    return out


def _select(batch: dict, rows: list[int]) -> dict:
    index = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, value in batch.items():
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            out[key] = value
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value[index.to(value.device)]
    return out


class DynamicSampling(trl_seam.PrepareInputsSeam):
    """Mixin for a GRPOTrainer: the stream of generation batches (`generation_batches`, with dynamic
    sampling or async rollouts), and DAPO's dynamic sampling: TRL buffers and hands out a generation batch
    with no zero-advantage group (`training_batch`) in place of the one it would generate and score."""

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if not (self.args.dynamic_sampling or getattr(self.args, "async_rollouts", False)):
            return loader
        self.generation_batches = GenerationBatches(loader, self.args.steps_per_generation * self.num_iterations)
        return self.generation_batches

    def owns_training_batches(self) -> bool:
        return self.args.dynamic_sampling

    def training_batch(self, generation_batch) -> dict:
        """The groups of `generation_batch` whose rewards differ, topped up from the next generation batches
        (scored, pixel values split per sample), or the last round's batch if none had any."""
        n, target = self.num_generations, len(generation_batch)
        if target % n:
            raise ValueError(f"--dynamic_sampling needs whole groups on each process: the local generation batch "
                             f"({target} rows) is not a multiple of num_generations ({n})")
        gather = self.accelerator.gather
        kept_parts, kept_rows, generated, dropped, last, rounds = [], 0, 0, 0, None, 0
        while True:
            out = split_pixel_values_by_grid(trl_seam.generate_and_score(self, generation_batch))
            adv = out["advantages"].view(-1, n)
            informative = (adv.abs() > 1e-6).any(dim=1).tolist()
            groups = [g for g, keep in enumerate(informative) if keep][: (target - kept_rows) // n]
            generated += len(informative)
            dropped += informative.count(False)
            if groups:
                kept_parts.append(_select(out, [g * n + i for g in groups for i in range(n)]))
                kept_rows += len(groups) * n
            last = out
            # Every process runs the same number of rounds: generation gathers across them.
            short = gather(torch.tensor([float(kept_rows < target)], device=self.accelerator.device)).sum().item()
            if not short or rounds == self.args.max_resample_rounds:
                break
            rounds += 1
            generation_batch = self.generation_batches.take()

        zero_groups = 0
        steps = self.args.steps_per_generation
        usable = kept_rows - kept_rows % (steps * n) if steps > 1 else kept_rows
        if usable == 0:
            log.warning("dynamic sampling: no group with distinct rewards in %d round(s); training on the last "
                        "batch (zero advantage everywhere, no policy gradient)", rounds + 1)
            batch, zero_groups = last, len(last["advantages"]) // n
        else:
            batch = _select(_concat(kept_parts, trl_seam.tokenizer(self).pad_token_id,
                                    self.vllm_importance_sampling_mode.startswith("sequence")), list(range(usable)))
        mask = batch["completion_mask"] if batch.get("tool_mask") is None else batch["completion_mask"] * batch["tool_mask"]
        batch["num_items_in_batch"] = gather(mask.sum()).sum()

        totals = gather(torch.tensor([generated, dropped, zero_groups], dtype=torch.float32,
                                     device=self.accelerator.device)).view(-1, 3).sum(0).tolist()
        metrics = trl_seam.metrics(self, "train")
        metrics["dynamic_sampling/dropped_group_ratio"].append(totals[1] / totals[0])
        metrics["dynamic_sampling/resample_rounds"].append(float(rounds))
        metrics["dynamic_sampling/zero_advantage_groups_trained"].append(totals[2])
        return batch
