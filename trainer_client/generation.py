"""Server-mode rollouts for TRL's GRPOTrainer: generation through `AlignClient`, weights pushed back.

`ServerGeneration` stands where TRL keeps its `VLLMGeneration` (`trainer.vllm_generation`), with the
same two methods TRL calls: `generate(prompts, images, num_generations)` and `sync_weights()`. So
TRL's own code path for vLLM server mode runs unchanged around it, importance-sampling correction
with the server's (processed) logprobs included. Only the main process talks to the server; the
others hand it their prompts and get their slice of the completions back, as in TRL.

The rule that keeps training on-policy: no step trains on completions from weights this trainer
did not push. The trainer pushes its weights when `train()` starts (fresh or resumed: it cannot know
what the server holds) and after every optimizer step, and remembers per server which instance it
pushed to and which version that push made. An answer from another instance (the server restarted
from its start checkpoint) or another version is dropped: the weights are pushed again and the
batch is generated again.

The pushes and their records are the `WeightPusher`'s (LoRA runs push the adapter alone, see
weight_pusher.py), the sampling parameters and token budgets the `Sampler`'s; `AsyncRollouts` uses
the same two.
"""

import contextlib
import logging

from accelerate.utils import broadcast_object_list, gather_object

from trainer_client import trl_seam
from trainer_client.client import AlignClient
from trainer_client.sampler import Sampler, Trajectories
from trainer_client.weight_pusher import MAX_REFUSALS, ServerMoved, WeightPusher

log = logging.getLogger(__name__)


class ServerGeneration:
    def __init__(self, trainer, client: AlignClient | None, weight_transport: str = "auto",
                 server_timeout: float = 600.0, servers: int = 1, lora_sync: str = "auto"):
        self.trainer = trainer
        self.client = client  # None on every process but the main one
        self.pusher = WeightPusher(trainer, client, weight_transport, server_timeout, servers, lora_sync)
        self.sampler = Sampler(trainer, client)
        self.pushed_step: int | None = None  # None: nothing pushed by this train() yet
        self.first_turn_versions: list[int] = []  # per local sample, of the last first-turn generate
        self._turns: Trajectories | None = None  # while TRL's tool loop runs
        self.turn_versions: list[list[int]] = []  # per local sample of the last batch with tools: each turn's version

    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def in_tool_turns(self) -> bool:
        """TRL's tool loop runs on this thread: each generate is a tool turn of its trajectories."""
        return self._turns is not None

    def generate(self, prompts, images, num_generations, profiler=None, done: bool = False):
        """TRL's `VLLMGeneration.generate` contract: per local prompt (already repeated
        `num_generations` times) its prompt ids, completion ids, per-token [logprob], and None.

        TRL's tool loop calls it again per tool turn with `num_generations=1` and, per sample that
        called a tool, its prompt + sampled ids + tool suffix ids (expanded image runs, which the
        client collapses) and all its images so far; each process then holds its own count.
        `done`: this process has left the tool loop and only joins the others' turns (see
        `join_tool_turns`); None once every process has."""
        states = gather_object([(len(prompts), done)])
        if all(d for _, d in states):
            return None
        counts = [n for n, _ in states]
        used = self._turns.used(prompts) if self._turns is not None else [0] * len(prompts)
        all_prompts = gather_object(prompts)
        all_used = gather_object(used)
        all_images = gather_object(images if images is not None else [None] * len(prompts))
        # The sampler repeats each prompt num_generations times in a row: ask once with n.
        unique = all_prompts[::num_generations]
        unique_used = all_used[::num_generations]
        unique_images = [imgs or [] for imgs in all_images[::num_generations]]
        for refusals in range(MAX_REFUSALS + 1):
            self.pusher.push(self.pusher.unpushed())
            payload = None
            if self.accelerator.is_main_process:
                try:
                    with profiler if profiler is not None else contextlib.nullcontext():
                        completions = self.sampler.sample(unique, unique_images, unique_used,
                                                          self.sampler.params(num_generations), self._check,
                                                          self.pusher.last_push(0)[1])
                    # The server never samples image/video placeholders (as TRL's local generation
                    # suppresses them), so every completion can be trained on as it is.
                    pushed = [self.pusher.last_push(s)[1] for s in range(self.pusher.servers)]
                    payload = ([c.token_ids for c in completions], [[[lp] for lp in c.logprobs] for c in completions],
                               [c.weight_version for c in completions], sum(pushed) / len(pushed))
                except ServerMoved as exc:
                    if refusals == MAX_REFUSALS:
                        raise RuntimeError(f"{exc}; refused {MAX_REFUSALS + 1} answers in a row: is another "
                                           "trainer pushing weights to the same server?") from None
                    log.warning("%s: dropping these completions, pushing the weights again", exc)
                    payload = exc.server
            # Every process learns which server needs the weights again: a sharded model's push takes them all.
            payload = broadcast_object_list([payload], from_process=0)[0]
            if not isinstance(payload, int):
                break
            self.pusher.forget(payload)
        completion_ids, logprobs, versions, pushed_version = payload
        # Ranks may hold different counts (tool turns run per sample): each takes its own slice.
        start = sum(counts[: self.accelerator.process_index])
        mine = slice(start, start + len(prompts))
        if self._turns is not None:
            self._turns.sampled(prompts, completion_ids[mine], versions[mine])
        else:
            self.first_turn_versions = versions[mine]
            self.log_versions(versions[mine], pushed_version)
        return prompts, completion_ids[mine], logprobs[mine], None

    def start_tool_turns(self, prompt_ids, completion_ids) -> None:
        """TRL's tool loop starts: later calls are tool turns of these (local) trajectories."""
        self._turns = Trajectories(prompt_ids, completion_ids, self.first_turn_versions)

    def join_tool_turns(self) -> None:
        """Generation is collective (every process gathers its prompts to the main one), but each
        process runs its own number of tool turns: one whose samples stopped calling tools joins the
        others' turns with no prompts until every process has left the loop, instead of hanging them."""
        if self.accelerator.num_processes == 1:
            return
        while self.generate([], [], 1, done=True) is not None:
            pass

    def end_tool_turns(self) -> None:
        turns, self._turns = self._turns, None
        self.turn_versions = turns.versions
        log_oldest_turns(self.trainer, turns.versions)

    def _check(self, server: int, answer) -> None:
        instance, version = self.pusher.last_push(server)
        url = self.client.base_urls[server]
        if answer.instance_id != instance:
            raise ServerMoved(server, f"{url} restarted (instance {answer.instance_id[:8]}, was {instance[:8]}) and "
                                      f"serves its start checkpoint as version {answer.weight_version}")
        served = {c.weight_version for r in answer.results for c in r.completions}
        if served != {version}:
            raise ServerMoved(server, f"{url} answered with weight_version {sorted(served)}, "
                                      f"but this trainer's last push made version {version}")

    def log_versions(self, versions: list[int], pushed_version: float) -> None:
        """One column per completion in TRL's completion table, and the mean as a metric beside the
        version the trainer pushed for this step (they are equal in synchronous mode: other answers
        are refused)."""
        trl_seam.log_completion_column(self.trainer, "weight_version", versions)
        trl_seam.log_metric(self.trainer, "weight_version", sum(versions) / len(versions))
        trl_seam.log_metric(self.trainer, "weight_version_pushed", pushed_version)

    def sync_weights(self) -> None:
        """Push the trainer's weights to every server if they changed since this run's last push."""
        step = self.trainer.state.global_step
        if step == self.pushed_step:
            return
        self.pusher.push(range(self.pusher.servers))
        self.pushed_step = step


def log_oldest_turns(trainer, versions: list[list[int]]) -> None:
    """A trajectory is as stale as its oldest turn: the batch's mean of that, from each sample's turn versions."""
    oldest = [min(v) for v in versions]
    trl_seam.log_metric(trainer, "weight_version_oldest_turn", sum(oldest) / max(1, len(oldest)))
