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
request asked again (with tools: that turn of that trajectory; the turns before it came from the same
weights, pushed for this step).

With tools, the main process runs each trajectory of the gathered batch to its end, tool turns
included (trainer_client/agent_loop.py), and hands each process its slice.

The pushes and their records are the `WeightPusher`'s (LoRA runs push the adapter alone, see
weight_pusher.py), the sampling parameters and token budgets the `Sampler`'s; `AsyncRollouts` uses
the same two.
"""

import contextlib
import itertools
import logging
from dataclasses import dataclass

from accelerate.utils import broadcast_object_list, gather_object

from trainer_client import trl_seam
from trainer_client.agent_loop import AgentLoop, tool_loop_result
from trainer_client.client import AlignClient
from trainer_client.sampler import Sampler
from trainer_client.weight_pusher import MAX_REFUSALS, ServerMoved, WeightPusher

log = logging.getLogger(__name__)


@dataclass
class _PushAgain:
    """The main process to the others while it generates: the server `server` restarted, push to it again
    (a sharded model's push takes every process)."""

    server: int


class ServerGeneration:
    def __init__(self, trainer, client: AlignClient | None, weight_transport: str = "auto",
                 server_timeout: float = 600.0, servers: int = 1, lora_sync: str = "auto"):
        self.trainer = trainer
        self.client = client  # None on every process but the main one
        self.pusher = WeightPusher(trainer, client, weight_transport, server_timeout, servers, lora_sync)
        self.sampler = Sampler(trainer, client)
        self.pushed_step: int | None = None  # None: nothing pushed by this train() yet
        # With tools, the main process runs every trajectory of a batch (the async rollout worker too)
        args = trainer.args
        self.agent = AgentLoop(trainer, args.tool_workers, args.tool_timeout) if trainer.tools and client else None
        self._finished: trl_seam.ToolLoopResult | None = None  # the tool loop of this process's last batch
        self.turn_versions: list[list[int]] = []  # per local sample of the last batch with tools: each turn's version

    @property
    def accelerator(self):
        return self.trainer.accelerator

    def generate(self, prompts, images, num_generations, profiler=None):
        """TRL's `VLLMGeneration.generate` contract: per local prompt (already repeated `num_generations`
        times) its prompt ids, completion ids, per-token [logprob], and None. The main process asks the
        server for every process's prompts; each process takes its slice.

        With tools, these are the first turns of whole trajectories the main process ran to their end
        (`AgentLoop`: each trajectory on its own, tool turns included, so no process waits on another's
        turns); TRL's tool loop then gets the rest (`finished_tool_loop`). With --environment, each sample's
        instance (TRL's, reset for this batch) goes to the main process and comes back with the state its
        rollout left, which the rewards read."""
        images = with_videos(self.trainer, images, len(prompts))
        counts = gather_object([len(prompts)])
        all_prompts = gather_object(prompts)
        all_images = gather_object(images if images is not None else [None] * len(prompts))
        tools = bool(self.trainer.tools)
        if tools and self.trainer.environment_factories is not None:
            environments = gather_object(list(self.trainer.environments))
            names = gather_object(list(trl_seam.batch_environments(self.trainer)))
        else:
            environments = names = None
        # The sampler repeats each prompt num_generations times in a row: ask once with n.
        unique = all_prompts[::num_generations]
        unique_images = [imgs or [] for imgs in all_images[::num_generations]]
        self.pusher.push(self.pusher.unpushed())
        payload = None
        if self.accelerator.is_main_process:
            params = self.sampler.params(num_generations)
            with profiler if profiler is not None else contextlib.nullcontext():
                if tools:
                    samples = self.agent.run(unique, unique_images, num_generations, environments, names,
                                             lambda p, i, u, n: self._sample(p, i, u, {**params, "n": n}),
                                             self.sampler.max_model_len(), self._moved)
                else:
                    samples = self._asking(lambda: self._sample(unique, unique_images, [0] * len(unique), params))
            # The server never samples image/video placeholders (as TRL's local generation
            # suppresses them), so every completion can be trained on as it is.
            pushed = [self.pusher.last_push(s)[1] for s in range(self.pusher.servers)]
            payload = (samples, sum(pushed) / len(pushed))
        samples, pushed_version = self._hand_out(payload)
        start = sum(counts[: self.accelerator.process_index])
        mine = samples[start: start + len(prompts)]
        if tools:
            self._finished = tool_loop_result(mine)
            self.turn_versions = [r.versions for r in mine]
            log_oldest_turns(self.trainer, self.turn_versions)
            if environments is not None:  # the state each rollout left (a copy, on the other processes)
                self.trainer.environments = [r.environment for r in mine]
            mine = [r.first for r in mine]
        self.log_versions([c.weight_version for c in mine], pushed_version)
        return prompts, [c.token_ids for c in mine], [[[lp] for lp in c.logprobs] for c in mine], None

    def finished_tool_loop(self) -> trl_seam.ToolLoopResult:
        """The tool loop's result for this process's samples of the batch just generated."""
        out, self._finished = self._finished, None
        if out is None:
            raise RuntimeError("TRL's tool loop asked for a batch this backend did not generate with tools")
        return out

    def _sample(self, prompts, images, used, params) -> list:
        """One ask of the server (`Sampler.sample`); a refused answer's `ServerMoved` says what this trainer had
        pushed to that server when it asked (`_moved`)."""
        pushed = [self.pusher.last_push(s) for s in range(self.pusher.servers)]
        try:
            return self.sampler.sample(prompts, images, used, params, self._check, pushed[0][1])
        except ServerMoved as exc:
            exc.pushed = pushed[exc.server]
            raise

    def _asking(self, ask):
        """`ask()`, asked again after each refused answer, once the weights are pushed again (`_moved`)."""
        for refusals in itertools.count():
            try:
                return ask()
            except ServerMoved as exc:
                self._moved(exc, refusals)

    def _moved(self, exc: ServerMoved, refusals: int) -> None:
        """An answer was refused (main process, while it generates): push the weights to that server again,
        unless another refused turn did since this one asked, with every process (`_hand_out`)."""
        if refusals == MAX_REFUSALS:
            raise RuntimeError(f"{exc}; refused {MAX_REFUSALS + 1} answers in a row: is another trainer pushing "
                               "weights to the same server?") from None
        if self.pusher.last_push(exc.server) != exc.pushed:
            return
        log.warning("%s: dropping that answer, pushing the weights again", exc)
        if self.accelerator.num_processes > 1:
            broadcast_object_list([_PushAgain(exc.server)], from_process=0)
        self.pusher.push([exc.server])

    def _hand_out(self, payload):
        """The main process's `payload` on every process; the others meanwhile push when it tells them to."""
        while True:
            payload = broadcast_object_list([payload], from_process=0)[0]
            if not isinstance(payload, _PushAgain):
                return payload
            self.pusher.push([payload.server])
            payload = None

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


def with_videos(trainer, images: list | None, count: int) -> list | None:
    """Per prompt of the batch TRL is generating, its images and then its videos' frames (`VideoFrames`, which
    the sampler sends as videos): TRL hands the backend images only; the videos are the ones its tokenization
    of these prompts found (`VideoTraining.prompt_videos`)."""
    videos = getattr(trainer, "prompt_videos", None)
    if not videos or not any(videos):
        return images
    return [(imgs or []) + vids for imgs, vids in zip(images or [None] * count, videos, strict=True)]


def log_oldest_turns(trainer, versions: list[list[int]]) -> None:
    """A trajectory is as stale as its oldest turn: the batch's mean of that, from each sample's turn versions."""
    oldest = [min(v) for v in versions]
    trl_seam.log_metric(trainer, "weight_version_oldest_turn", sum(oldest) / max(1, len(oldest)))
