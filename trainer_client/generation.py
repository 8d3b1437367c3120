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

A LoRA run (`--use_peft`) pushes its adapter alone when every server takes adapters
(`--lora_sync adapter`, the default then): the base weights once per server instance, as a full
sync, then one adapter sync per step. `--lora_sync merged` pushes the whole model, adapter folded
in, every step.
"""

import contextlib
import logging
import time
from collections import Counter

import torch.distributed
from accelerate.utils import broadcast_object_list, gather_object

from protocol.schemas import Completion
from trainer_client.client import AlignClient, AlignServerError
from trainer_client.waiting import WaitReport
from trainer_client.weights import (
    adapter_weights,
    is_peft_model,
    is_sharded,
    named_weights,
    push_gathered,
    push_one,
)

log = logging.getLogger(__name__)

# Refusals in a row before the run stops: each one re-pushes, so more means another writer.
MAX_REFUSALS = 5


class StaleAnswer(RuntimeError):
    def __init__(self, server: int, message: str):
        super().__init__(message)
        self.server = server


class ServerGeneration:
    def __init__(self, trainer, client: AlignClient | None, weight_transport: str = "auto",
                 server_timeout: float = 600.0, servers: int = 1, lora_sync: str = "auto"):
        self.trainer = trainer
        self.client = client  # None on every process but the main one
        self.weight_transport = weight_transport
        self.server_timeout = server_timeout
        self.pushed_step: int | None = None  # None: nothing pushed by this train() yet
        # per server: (instance_id, weight_version) our last push made there (on the main process; the
        # others keep ("", -1)); None: push before using it
        self.pushed: list[tuple[str, int] | None] = [None] * servers
        # adapter sync: per server, the instance our base weights went to (None: push them first)
        self.base_pushed: list[str | None] = [None] * servers
        # decided by the main process (it asks the servers), known to all: a sharded model's processes
        # all take part in each push, and must push the same tensors
        self.adapter_sync = broadcast_object_list([client is not None and self._adapter_sync(lora_sync)],
                                                  from_process=0)[0]
        self.weight_versions: Counter[int] = Counter()  # completions per weight_version, whole run
        self.restarts = 0  # answers refused since the run started (server restarts, foreign pushes)
        self.first_turn_versions: list[int] = []  # per local sample, of the last first-turn generate
        self.turns: Trajectories | None = None  # while TRL's tool loop runs
        self.turn_versions: list[list[int]] = []  # per local sample of the last batch with tools: each turn's version

    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def sharded(self) -> bool:
        """FSDP2 or ZeRO-3 (known once the Trainer has prepared the model): the parameters are shards,
        and every process takes part in each push (weights.Gathered)."""
        return is_sharded(self.trainer.model.named_parameters())

    def _adapter_sync(self, lora_sync: str) -> bool:
        """Whether each push carries the LoRA adapter alone (docs/lora.md)."""
        model = self.accelerator.unwrap_model(self.trainer.model)
        if lora_sync == "merged" or not is_peft_model(model):
            return False
        ranks = [self.client.info(refresh=True, server=i).limits.max_lora_rank for i in range(len(self.pushed))]
        if lora_sync == "auto" and None in ranks:
            log.info("LoRA run: pushing merged weights (not every server runs with --enable-lora)")
            return False
        without = [url for url, rank in zip(self.client.base_urls, ranks, strict=True) if rank is None]
        if without:
            raise SystemExit(f"--lora_sync adapter: {', '.join(without)} takes no adapter sync; start align-serve "
                             "with --enable-lora, or use --lora_sync merged")
        config = model.peft_config[model.active_adapter]
        if config.lora_dropout:
            log.warning("LoRA run: lora_dropout=%g trains with dropout, the server applies none (as vLLM never "
                        "does); the rollouts are the model without dropout", config.lora_dropout)
        log.info("LoRA run: pushing the adapter alone after each step (the base weights once per server)")
        return True

    @contextlib.contextmanager
    def weights(self, model):
        """(pairs, adapter) one push carries: the adapter alone, or the whole (merged) model and None."""
        if self.adapter_sync:
            yield adapter_weights(model)
        else:
            with named_weights(model) as pairs:
                yield pairs, None

    def sampling(self, num_generations: int) -> dict:
        """The sampling parameters as the trainer's mode sets them now, for a whole first turn (`_sample`
        lowers `max_tokens` per turn to what each trajectory has left)."""
        t = self.trainer
        max_tokens = t.max_completion_length
        if not t.model.training:
            # Evaluation is greedy (TRL samples there too): two evals of the same weights score the same.
            return dict(n=num_generations, temperature=0.0, max_tokens=max_tokens, logprobs=True)
        return dict(n=num_generations, temperature=t.temperature, top_p=t.top_p,
                    top_k=t.top_k if t.top_k is not None else -1, min_p=t.min_p or 0.0,
                    repetition_penalty=t.repetition_penalty, max_tokens=max_tokens, logprobs=True)

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
        used = self.turns.used(prompts) if self.turns is not None else [0] * len(prompts)
        all_prompts = gather_object(prompts)
        all_used = gather_object(used)
        all_images = gather_object(images if images is not None else [None] * len(prompts))
        # The sampler repeats each prompt num_generations times in a row: ask once with n.
        unique = all_prompts[::num_generations]
        unique_used = all_used[::num_generations]
        unique_images = [imgs or [] for imgs in all_images[::num_generations]]
        for refusals in range(MAX_REFUSALS + 1):
            self._push([i for i, p in enumerate(self.pushed) if p is None])
            payload = None
            if self.accelerator.is_main_process:
                try:
                    with profiler if profiler is not None else _null():
                        completions = self._sample(unique, unique_images, unique_used, self.sampling(num_generations),
                                                   self._check)
                    # The server never samples image/video placeholders (as TRL's local generation
                    # suppresses them), so every completion can be trained on as it is.
                    pushed = [p[1] for p in self.pushed if p is not None]
                    payload = ([c.token_ids for c in completions], [[[lp] for lp in c.logprobs] for c in completions],
                               [c.weight_version for c in completions], sum(pushed) / len(pushed))
                except StaleAnswer as exc:
                    self.restarts += 1
                    if refusals == MAX_REFUSALS:
                        raise RuntimeError(f"{exc}; refused {MAX_REFUSALS + 1} answers in a row: is another "
                                           "trainer pushing weights to the same server?") from None
                    log.warning("%s: dropping these completions, pushing the weights again", exc)
                    payload = exc.server
            # Every process learns which server needs the weights again: a sharded model's push takes them all.
            payload = broadcast_object_list([payload], from_process=0)[0]
            if not isinstance(payload, int):
                break
            self.pushed[payload] = None
        completion_ids, logprobs, versions, pushed_version = payload
        # Ranks may hold different counts (tool turns run per sample): each takes its own slice.
        start = sum(counts[: self.accelerator.process_index])
        mine = slice(start, start + len(prompts))
        if self.turns is not None:
            self.turns.sampled(prompts, completion_ids[mine], versions[mine])
        else:
            self.first_turn_versions = versions[mine]
            self._log_versions(versions[mine], pushed_version)
        return prompts, completion_ids[mine], logprobs[mine], None

    def _sample(self, prompts, images, used, sampling: dict, check) -> list[Completion]:
        """`sampling["n"]` completions per prompt (expanded image runs), each asked for no more tokens than its
        trajectory has left of max_completion_length and than fit in the server's max_model_len (later tool
        turns would otherwise be refused for length); `check` sees each answer (it may refuse it). A tool
        turn with nothing left gets an empty completion; a first turn whose prompt alone fills max_model_len
        is asked as it is, for the server's 400."""
        n = sampling["n"]
        max_model_len = self.client.info().limits.max_model_len
        limit = self.trainer.max_completion_length
        budgets = [max(0, min(limit - u, max_model_len - len(p))) for p, u in zip(prompts, used, strict=True)]
        budgets = [limit if b == 0 and u == 0 else b for b, u in zip(budgets, used, strict=True)]
        out: list[list[Completion] | None] = [None] * len(prompts)
        for budget in sorted(set(budgets)):
            rows = [i for i, b in enumerate(budgets) if b == budget]
            if budget == 0:
                empty = Completion(token_ids=[], logprobs=[], text="", finish_reason="length",
                                   weight_version=self.pushed[0][1])
                for i in rows:
                    out[i] = [empty] * n
                continue
            answer = self.client.generate(prompt_ids=[prompts[i] for i in rows], images=[images[i] for i in rows],
                                          check=check, **{**sampling, "max_tokens": budget})
            for i, result in zip(rows, answer.results, strict=True):
                out[i] = result.completions
        return [c for cs in out for c in cs]

    def start_tool_turns(self, prompt_ids, completion_ids) -> None:
        """TRL's tool loop starts: later calls are tool turns of these (local) trajectories."""
        self.turns = Trajectories(prompt_ids, completion_ids, self.first_turn_versions)

    def join_tool_turns(self) -> None:
        """Generation is collective (every process gathers its prompts to the main one), but each
        process runs its own number of tool turns: one whose samples stopped calling tools joins the
        others' turns with no prompts until every process has left the loop, instead of hanging them."""
        if self.accelerator.num_processes == 1:
            return
        while self.generate([], [], 1, done=True) is not None:
            pass

    def end_tool_turns(self) -> None:
        turns, self.turns = self.turns, None
        self.turn_versions = turns.versions
        # A trajectory is as stale as its oldest turn.
        oldest = [min(v) for v in turns.versions]
        self.trainer._log_metric("weight_version_oldest_turn", sum(oldest) / max(1, len(oldest)))

    def _check(self, server: int, answer) -> None:
        instance, version = self.pushed[server]
        url = self.client.base_urls[server]
        if answer.instance_id != instance:
            raise StaleAnswer(server, f"{url} restarted (instance {answer.instance_id[:8]}, was {instance[:8]}) and "
                                      f"serves its start checkpoint as version {answer.weight_version}")
        served = {c.weight_version for r in answer.results for c in r.completions}
        if served != {version}:
            raise StaleAnswer(server, f"{url} answered with weight_version {sorted(served)}, "
                                      f"but this trainer's last push made version {version}")

    def _log_versions(self, versions: list[int], pushed_version: float) -> None:
        self.weight_versions.update(versions)
        # One column per completion in TRL's completion table, and the mean as a metric beside the
        # version the trainer pushed for this step (they are equal: other answers are refused).
        self.trainer._log_completion_extra("weight_version", versions)
        self.trainer._log_metric("weight_version", sum(versions) / len(versions))
        self.trainer._log_metric("weight_version_pushed", pushed_version)

    def sync_weights(self) -> None:
        """Push the trainer's weights to every server if they changed since this run's last push."""
        step = self.trainer.state.global_step
        if step == self.pushed_step:
            return
        self._push(range(len(self.pushed)))
        self.pushed_step = step

    def _push(self, servers) -> None:
        """Push to `servers`: from the main process, or from every process of a sharded model."""
        servers = list(servers)
        main = self.accelerator.is_main_process
        if not servers or not (main or self.sharded):
            for server in servers:
                self.pushed[server] = ("", -1)
            return
        model = self.accelerator.unwrap_model(self.trainer.model)
        with self.weights(model) as (pairs, adapter):
            for server in servers:
                self.pushed[server] = self._push_one(server, pairs, adapter)
                if main:
                    log.info("step %d: pushed %s, %s weight_version %d", self.trainer.state.global_step,
                             "the adapter" if adapter else "weights", self.client.base_urls[server],
                             self.pushed[server][1])

    def _push_one(self, server: int, pairs, adapter=None) -> tuple[str, int]:
        """One sync (after the base weights, for an adapter the instance has not had them); a sync cut
        short by a server restart is made again on the new instance. With sharded `pairs` every process
        runs this, and follows the main one's decisions (push the base? push again?)."""
        sharded, main = is_sharded(pairs), self.client is not None
        deadline = time.monotonic() + self.server_timeout
        held = WaitReport(f"{self.client.base_urls[server]} to take this trainer's weights", self.server_timeout,
                          "if another trainer pushes to this server, stop it or give each run its own server "
                          "(this run waits up to --server_timeout)") if main else None
        while True:
            instance = self.client.info(refresh=True, server=server).instance_id if main else ""
            try:
                if adapter is not None:
                    base_needed = [self.base_pushed[server] != instance if main else None]
                    if sharded:
                        torch.distributed.broadcast_object_list(base_needed, src=0)
                    if base_needed[0]:
                        # LoRA never trains the base: reading it while the optimizer steps is safe.
                        model = self.accelerator.unwrap_model(self.trainer.model)
                        with named_weights(model, merge=False) as base:
                            self._send(server, base, self.weight_transport)
                        self.base_pushed[server] = instance
                # An adapter travels over a byte transport (http, tcp, shm): auto picks one when
                # the base goes over nccl/ipc.
                transport = "auto" if adapter is not None and self.weight_transport in ("nccl", "ipc") \
                    else self.weight_transport
                return instance, self._send(server, pairs, transport, adapter).weight_version
            except Exception as exc:
                again = [self._again(exc, server, instance, deadline, held) if main else None]
                if sharded:
                    torch.distributed.broadcast_object_list(again, src=0)
                if not again[0]:
                    raise

    def _send(self, server: int, pairs, transport: str, adapter=None):
        """One sync of `pairs`: from every process when they are shards, else from the main one."""
        if is_sharded(pairs):
            return push_gathered(self.client, server, pairs, transport, adapter=adapter)
        return push_one(self.client, server, pairs, transport, adapter=adapter)

    def _again(self, exc: Exception, server: int, instance: str, deadline: float, held: WaitReport) -> bool:
        """Whether a failed push is worth making again, after waiting for what made it fail."""
        wait = _open_sync_expiry(exc)
        if wait is not None and time.monotonic() + wait < deadline:
            # A sync left open by a trainer that died mid-push (this run's previous life) is
            # dropped after the server's idle timeout; one held by a live trainer is not.
            held.say(f"409: another weight sync is open there, dropped if idle for {wait:.0f} s more")
            time.sleep(min(wait + 0.5, held.every))
            return True
        self.client.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        if self.client.info(refresh=True, server=server).instance_id == instance:
            return False
        log.warning("%s restarted during a weight push; pushing again", self.client.base_urls[server])
        return True


class Trajectories:
    """The local samples of one batch across TRL's tool turns. A tool turn's prompt is a trajectory's
    ids so far (prompt + every turn as sampled) followed by the tool suffix: that prefix says which
    trajectory it continues, hence how much of max_completion_length it has used."""

    def __init__(self, prompt_ids, completion_ids, first_versions: list[int]):
        self.ids = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        self.prompt_lens = [len(p) for p in prompt_ids]
        self.versions = [[v] for v in first_versions]
        self._current: list[int] = []

    def used(self, prompts) -> list[int]:
        """Completion tokens (sampled and from tools) each of these turn prompts already holds."""
        self._current, taken = [], set()
        for prompt in prompts:
            # The longest: a trajectory identical so far to a shorter one's continuation is the one continued.
            matches = [i for i, ids in enumerate(self.ids)
                       if i not in taken and len(ids) <= len(prompt) and prompt[: len(ids)] == ids]
            match = max(matches, key=lambda i: len(self.ids[i]), default=None)
            if match is None:
                raise RuntimeError("a tool turn's prompt does not continue any trajectory of this batch as sampled: "
                                   "the earlier turns were re-rendered")
            taken.add(match)
            self._current.append(match)
        return [len(p) - self.prompt_lens[i] for p, i in zip(prompts, self._current, strict=True)]

    def sampled(self, prompts, completion_ids, versions) -> None:
        for i, prompt, ids, version in zip(self._current, prompts, completion_ids, versions, strict=True):
            self.ids[i] = list(prompt) + list(ids)
            if ids:  # a turn with no tokens left sampled nothing: no weights made it
                self.versions[i].append(version)


def _open_sync_expiry(exc: Exception) -> float | None:
    """Seconds until the server drops the weight sync that made it refuse ours, if that was why."""
    if isinstance(exc, AlignServerError) and exc.code == "conflict" and isinstance(exc.detail, dict):
        return exc.detail.get("expires_in_s")
    return None

class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
