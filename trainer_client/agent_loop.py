"""Server mode's multi-turn rollouts: each trajectory of a batch on its own clock.

TRL 1.16's tool loop (`GRPOTrainer._tool_call_loop`) runs a batch in lockstep: it calls the tools of one
trajectory after another (an `async def` tool is gathered only with the other calls of its own turn), then
waits for them all before one batched generate of every trajectory's next turn. With real tools (a code
sandbox, a web search, a crop on a remote image store: 0.1-3 s each) a step waits for the sum of them.

`AgentLoop.run` samples a batch's first turns in one request, then runs each trajectory as a coroutine of
its own: generate a turn, parse its tool calls, run them, append the tool turn's tokens, ask the server for
the next turn as soon as they are there (align-serve batches requests as they arrive). Tools of different
trajectories run at the same time: sync ones on threads, at most `--tool_workers` at once; `async def` ones
on TRL's event loop (`trainer.async_loop`, where TRL runs them). A trajectory's own calls stay in TRL's
order: its sync calls one after another, then its async ones together; its results in that order.

What the loop keeps of TRL, exactly: the tool turn's ids from TRL's `_get_tool_suffix_ids` appended to the
ids as sampled (never re-rendered; tool_mask 0, logprob 0.0 on them), a tool's result as TRL formats it (a
list of content parts passes through, images included, anything else `str()`), `{"error": ...}` for a tool
that raises, is unknown or is not a function call (each one counted as failed), the rollback of a tool
turn that would pass max_completion_length (its messages and images dropped, the trajectory ends as it
was), `max_tool_calling_iterations`, the calls and failures TRL logs as `tools/call_frequency` and
`tools/failure_frequency`, and the result `_tool_call_loop` returns (`tool_loop_result`). The rollback's
other ceiling is the server's `max_model_len` (TRL checks the model's positions: a server started with a
smaller --max-model-len answered the next turn with nothing, which was trained on as an empty answer).

Beyond TRL: a call that does not return within `--tool_timeout` seconds answers with an error, counts as
failed, and is warned about by name. A sync tool's thread cannot be stopped: it runs on (a daemon thread,
which never holds up the process's exit) and its late result is dropped; its slot is freed at once.
"""

import asyncio
import copy
import functools
import inspect
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field

from trl.chat_template_utils import parse_response

from protocol.schemas import Completion
from trainer_client import trl_seam
from trainer_client.tools import environment_tools
from trainer_client.video import sample, size_frames_alike
from trainer_client.weight_pusher import ServerMoved

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One sample's trajectory: what TRL's tool loop leaves for it, and what produced it."""

    first: Completion  # the first turn as the server sampled it
    tool_mask: list[int]
    messages: list[dict]  # the model's turns, parsed, and the tools' answers
    completion_ids: list[int]  # every turn as sampled, with the tool turns' ids between them
    logprobs: list[float]  # per completion token; 0.0 on tool tokens
    calls: int = 0
    failures: int = 0
    images: list = field(default_factory=list)  # the images the tools returned
    versions: list[int] = field(default_factory=list)  # the weight version of each model turn that sampled tokens
    environment: object = None  # the instance whose methods were this sample's tools (--environment)


def tool_loop_result(rollouts: list[Rollout]) -> trl_seam.ToolLoopResult:
    """What TRL's `_tool_call_loop` returns for these samples."""
    return trl_seam.ToolLoopResult(
        [r.tool_mask for r in rollouts], [r.messages for r in rollouts], [r.completion_ids for r in rollouts],
        [r.logprobs for r in rollouts], sum(r.calls for r in rollouts), sum(r.failures for r in rollouts),
        [r.images for r in rollouts])


def tool_tables(tools: list) -> tuple[dict, dict]:
    """(sync, async) tools by name, as TRL builds them per sample."""
    sync = {t.__name__: t for t in tools if not inspect.iscoroutinefunction(t)}
    coro = {t.__name__: t for t in tools if inspect.iscoroutinefunction(t)}
    return sync, coro


@dataclass
class _Sample:
    """One trajectory's fixed parts: its prompt (expanded image runs), the prompt's images, its tools by name,
    the tools its prompt was rendered with (its completions are parsed with them), its environment."""

    prompt_ids: list[int]
    images: list
    sync_tools: dict
    async_tools: dict
    schema: list
    environment: object


class AgentLoop:
    def __init__(self, trainer, tool_workers: int, tool_timeout: float):
        """`tool_workers`: sync tool calls of a batch that run at once; `tool_timeout`: seconds a call may take."""
        self.trainer = trainer
        self.tool_workers, self.tool_timeout = tool_workers, tool_timeout
        # Its own processor: the async rollout worker runs the loop while the training thread uses the
        # trainer's, and tokenizers are not safe to share across threads; the lock covers two batches at once.
        self.processor = copy.deepcopy(trainer.processing_class)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._processing = threading.Lock()
        self._threads = _Threads("align-agent")  # the server requests and the sync tool calls

    def run(self, prompt_ids: list[list[int]], images: list[list], n: int, environments: list | None,
            names: list | None, sample, max_model_len: int, on_moved=None) -> list[Rollout]:
        """Every trajectory of a batch, `n` per prompt (`prompt_ids`: expanded image runs, `images`: each
        prompt's). `environments`, `names`: per sample its environment instance and name (None: no
        --environment). `sample(prompt_ids, images, used, n)` asks the server, n completions per prompt,
        `used` completion tokens already held per prompt (it runs on one of the loop's threads). `max_model_len`:
        the server's. A `ServerMoved` from a turn goes to `on_moved(exc, refusals)`, which makes the server
        fit to ask again (or raises), and the turn is asked again; without it the batch is dropped and the
        exception raised."""
        samples = []
        for i in range(len(prompt_ids) * n):
            environment = environments[i] if environments is not None else None
            sync, coro = tool_tables(trl_seam.standalone_tools(self.trainer)
                                     + (environment_tools(environment) if environment is not None else []))
            schema = trl_seam.tools_for_environment(self.trainer, names[i]) if names is not None else self.trainer.tools
            samples.append(_Sample(list(prompt_ids[i // n]), list(images[i // n]), sync, coro, schema, environment))
        caller = threading.current_thread().name
        return asyncio.run(self._batch(samples, n, sample, max_model_len, on_moved, caller))

    async def _batch(self, samples: list[_Sample], n: int, sample, max_model_len: int, on_moved, caller: str):
        unique = samples[::n]
        ask = functools.partial(self._ask, sample, on_moved, f"{caller}-turn")  # (a turn's thread says whose)
        first = await ask([s.prompt_ids for s in unique], [s.images for s in unique], [0] * len(unique), n)
        slots = asyncio.Semaphore(self.tool_workers)
        tasks = [asyncio.create_task(self._trajectory(s, c, ask, slots, max_model_len))
                 for s, c in zip(samples, first, strict=True)]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # a failed trajectory drops the batch: its turns and tools are not waited for
                task.cancel()

    async def _ask(self, sample, on_moved, thread: str, prompt_ids, images, used, n) -> list[Completion]:
        for refusals in itertools.count():
            try:
                return await self._threads.run(functools.partial(sample, prompt_ids, images, used, n), thread)
            except ServerMoved as exc:
                if on_moved is None:
                    raise
                on_moved(exc, refusals)

    async def _trajectory(self, s: _Sample, first: Completion, ask, slots, max_model_len: int) -> Rollout:
        limit = self.trainer.max_completion_length
        r = Rollout(first, [1] * len(first.token_ids), [self._parse_first(first.token_ids, s)],
                    list(first.token_ids), list(first.logprobs), versions=[first.weight_version],
                    environment=s.environment)
        tool_calls, turn = r.messages[0].get("tool_calls"), 0
        while tool_calls and turn < self.trainer.max_tool_calling_iterations:
            results, failures = await self._call_tools(tool_calls, s, slots)
            r.calls, r.failures = r.calls + len(tool_calls), r.failures + failures
            messages, images = [], []
            for name, result in results:
                content = result if isinstance(result, list) else str(result)
                if isinstance(content, list):
                    content = [self._tool_video(name, p) if isinstance(p, dict) and p.get("type") == "video" else p
                               for p in content]
                    images += [p[p["type"]] for p in content if isinstance(p, dict) and p.get("type") in ("image", "video")]
                messages.append({"role": "tool", "name": name, "content": content})
            with self._processing:
                suffix = trl_seam.tool_suffix_ids(self.trainer, self.processor, messages)
            ids = s.prompt_ids + r.completion_ids + suffix
            if len(ids) - len(s.prompt_ids) > limit or len(ids) >= max_model_len:
                break  # TRL's rollback: this tool turn never joins the trajectory, which ends as it was
            r.messages += messages
            r.images += images
            out = (await ask([ids], [s.images + r.images], [len(ids) - len(s.prompt_ids)], 1))[0]
            # (the server was asked for no more than the trajectory has left; TRL's cut, should it pass)
            keep = max(0, limit - (len(ids) - len(s.prompt_ids)))
            post, post_logprobs = list(out.token_ids)[:keep], list(out.logprobs)[:keep]
            r.tool_mask += [0] * len(suffix) + [1] * len(post)
            r.logprobs += [0.0] * len(suffix) + post_logprobs
            r.completion_ids = ids[len(s.prompt_ids):] + post
            if out.token_ids:
                r.versions.append(out.weight_version)
            parsed = {}
            if post:
                with self._processing:
                    parsed = parse_response(self.tokenizer, post, prefix=ids, tools=s.schema)
                r.messages.append(parsed)
            tool_calls, turn = parsed.get("tool_calls"), turn + 1
        return r

    def _tool_video(self, name: str, part: dict) -> dict:
        """A tool result's video part (its `video`: a file path or a list of frames) with the frames the run's
        video budget samples from it, the processor that renders the tool turn sized alike."""
        budget = getattr(self.trainer, "video_budget", None)
        if budget is None:
            raise RuntimeError(f"tool {name} returned a video, but this run samples none: the model takes no video "
                               "here (docs/video.md)")
        video = part.get("video")
        with self._processing:
            size_frames_alike(self.processor, budget)
        return {**part, "video": sample([video] if isinstance(video, str) else list(video), budget, f"tool {name}")}

    def _parse_first(self, ids, s: _Sample) -> dict:
        """A first turn as TRL decodes it: with tool calls parsed where the tokenizer can."""
        with self._processing:
            if getattr(self.tokenizer, "response_template", None) is not None \
                    or getattr(self.tokenizer, "response_schema", None) is not None:
                return parse_response(self.tokenizer, list(ids), prefix=s.prompt_ids, tools=s.schema)
            return {"role": "assistant", "content": self.tokenizer.decode(list(ids), skip_special_tokens=True)}

    async def _call_tools(self, tool_calls: list[dict], s: _Sample, slots) -> tuple[list[tuple[str, object]], int]:
        """One turn's calls as TRL makes them: (name, result) each, sync calls first, and the failures."""
        results, pending, failures = [], [], 0
        for call in tool_calls:
            if call.get("type") != "function":
                failures += 1
                results.append((call.get("name", "unknown"), {"error": f"Unsupported tool call type: {call.get('type')}"}))
                continue
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            if name in s.sync_tools:
                result, failed = await self._call_sync(name, s.sync_tools[name], arguments, slots)
                results.append((name, result))
                failures += failed
            elif name in s.async_tools:
                try:
                    pending.append((name, s.async_tools[name](**arguments)))
                except Exception as exc:
                    failures += 1
                    results.append((name, {"error": str(exc)}))
            else:
                failures += 1
                results.append((name, {"error": f"Tool {name} not found."}))
        for (name, _), (result, failed) in zip(pending, await asyncio.gather(
                *(self._call_async(name, coro) for name, coro in pending)), strict=True):
            results.append((name, result))
            failures += failed
        return results, failures

    async def _call_sync(self, name: str, tool, arguments, slots) -> tuple[object, bool]:
        async with slots:  # leaving it on a timeout frees the slot: a hung thread holds none
            return await self._settle(name, self._threads.run(lambda: tool(**arguments), "align-tool"))

    async def _call_async(self, name: str, coro) -> tuple[object, bool]:
        future = asyncio.run_coroutine_threadsafe(coro, trl_seam.async_loop(self.trainer))
        return await self._settle(name, asyncio.wrap_future(future))

    async def _settle(self, name: str, future) -> tuple[object, bool]:
        """A call's result and whether it failed: TRL's error result for an exception, ours for a timeout."""
        try:
            return await asyncio.wait_for(future, self.tool_timeout), False
        except TimeoutError as exc:
            if not future.cancelled():  # the tool's own TimeoutError, not our limit
                return {"error": str(exc)}, True
            log.warning("tool %s did not return within --tool_timeout %g s: the model gets an error result and the "
                        "call counts as failed", name, self.tool_timeout)
            return {"error": f"{name} did not return within {self.tool_timeout:g} s"}, True
        except Exception as exc:
            return {"error": str(exc)}, True


class _Threads:
    """Daemon threads that run the calls handed to them, a new one only when none is idle (a thread that
    starts makes its starter wait for it, which under load held the loop up for every turn). Daemons never
    hold up the process's exit, which a tool hung past its timeout would; a result that comes after nobody
    waits (a timed-out tool, a dropped batch) is dropped."""

    def __init__(self, name: str):
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)

    def run(self, fn, label: str) -> asyncio.Future:
        """`fn()` on one of the threads, named `label` meanwhile, as a future of the running loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, fn, label))
        if not self._idle.acquire(blocking=False):
            threading.Thread(target=self._work, name=self.name, daemon=True).start()
        return future

    def _work(self) -> None:
        thread = threading.current_thread()
        while True:
            loop, future, fn, thread.name = self._calls.get()
            try:
                outcome = functools.partial(future.set_result, fn())
            except BaseException as exc:  # handed to whoever waits, whatever it is
                outcome = functools.partial(future.set_exception, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, outcome)
            except RuntimeError:  # the batch's loop is closed: nobody waits for this result
                pass
            thread.name = self.name
            self._idle.release()


def _settle(future: asyncio.Future, outcome) -> None:
    if not future.done():
        outcome()
