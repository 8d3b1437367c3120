"""Server-mode rollouts for TRL's GRPOTrainer: generation through `AlignClient`, weights pushed back.

`ServerGeneration` stands where TRL keeps its `VLLMGeneration` (`trainer.vllm_generation`), with the
same two methods TRL calls: `generate(prompts, images, num_generations)` and `sync_weights()`. So
TRL's own code path for vLLM server mode runs unchanged around it, importance-sampling correction
with the server's (processed) logprobs included. Only the main process talks to the server; the
others hand it their prompts and get their slice of the completions back, as in TRL.
"""

import logging
from collections import Counter

from accelerate.utils import broadcast_object_list, gather_object

from trainer_client.client import AlignClient

log = logging.getLogger(__name__)


class ServerGeneration:
    def __init__(self, trainer, client: AlignClient | None, weight_transport: str = "auto"):
        self.trainer = trainer
        self.client = client  # None on every process but the main one
        self.weight_transport = weight_transport
        # The server starts from the weights the trainer loaded: nothing to push before step 1.
        self.pushed_step = trainer.state.global_step
        self.weight_versions: Counter[int] = Counter()  # completions per weight_version, whole run

    @property
    def accelerator(self):
        return self.trainer.accelerator

    def sampling(self, num_generations: int) -> dict:
        t = self.trainer
        return dict(n=num_generations, temperature=t.temperature, top_p=t.top_p,
                    top_k=t.top_k if t.top_k is not None else -1, min_p=t.min_p or 0.0,
                    repetition_penalty=t.repetition_penalty, max_tokens=t.max_completion_length,
                    logprobs=True)

    def generate(self, prompts, images, num_generations, profiler=None):
        """TRL's `VLLMGeneration.generate` contract: per local prompt (already repeated
        `num_generations` times) its prompt ids, completion ids, per-token [logprob], and None."""
        all_prompts = gather_object(prompts)
        all_images = gather_object(images if images is not None else [None] * len(prompts))
        payload = None
        if self.accelerator.is_main_process:
            # The sampler repeats each prompt num_generations times in a row: ask once with n.
            unique = all_prompts[::num_generations]
            unique_images = [imgs or [] for imgs in all_images[::num_generations]]
            with profiler if profiler is not None else _null():
                out = self.client.generate(prompt_ids=unique, images=unique_images, **self.sampling(num_generations))
            completions = [c for r in out.results for c in r.completions]
            # The server never samples image/video placeholders (as TRL's local generation
            # suppresses them), so every completion can be trained on as it is.
            payload = ([c.token_ids for c in completions], [[[lp] for lp in c.logprobs] for c in completions],
                       [c.weight_version for c in completions])
        payload = broadcast_object_list([payload], from_process=0)[0]
        completion_ids, logprobs, versions = payload
        mine = slice(self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts))
        self._log_versions(versions[mine])
        return prompts, completion_ids[mine], logprobs[mine], None

    def _log_versions(self, versions: list[int]) -> None:
        self.weight_versions.update(versions)
        # One column per completion in TRL's completion table, and the mean as a metric.
        self.trainer._log_completion_extra("weight_version", versions)
        self.trainer._log_metric("weight_version", sum(versions) / len(versions))

    def sync_weights(self) -> int | None:
        """Push the trainer's weights if they changed since the last push; the new version or None."""
        step = self.trainer.state.global_step
        if step == self.pushed_step:
            return None
        version = None
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.trainer.model)
            version = self.client.push_weights(model, transport=self.weight_transport)
            log.info("step %d: pushed weights, server weight_version %d", step, version)
        self.pushed_step = step
        return version


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
