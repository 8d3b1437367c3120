"""Tools and environments for GRPO/GSPO: TRL's `tools=` and `environment_factory=`, loaded from
`--tools module:function ...` and `--environment module:Factory`, and what the tool loop did, logged.

TRL runs the loop: it parses each completion's tool calls, calls the tools, appends the tool turn's
suffix ids to the sampled ids (never re-rendering earlier turns) and generates again, with `tool_mask`
0 on the tool tokens. We load the callables, refuse bad ones before any model loads, and log
per-trajectory counts TRL does not (`LogsToolTurns`).

With `--async_rollouts` the rollout worker runs the same loop in the background (`run_tool_loop`), on a
copy of the trainer whose turns ask the server directly (no collectives off the training thread,
`trl_seam.run_tool_loop_on_copy`); TRL's loop on the training thread then hands back what the worker
finished. With `--environment` a read-ahead batch gets its own instances (`reset_environments`, as TRL
draws and resets its pool for a batch), whose methods are its samples' tools.
"""

import functools
import inspect
from dataclasses import dataclass

from trl.chat_template_utils import parse_response

from trainer_client import trl_seam
from trainer_client.specs import load_callable


class ToolSetupError(ValueError):
    """A tool or environment that cannot be used: it does not load, is not callable, or lacks what TRL
    needs to describe it to the model (type hints and a docstring)."""


def _load(spec: str, flag: str):
    return load_callable(spec, f"{flag} {spec!r}", ToolSetupError)


def _check_described(func, where: str) -> None:
    """TRL turns each tool into a JSON schema from its signature and docstring (transformers'
    `get_json_schema`); without them it fails at the first batch, so say it now."""
    from transformers.utils.chat_template_utils import get_json_schema

    try:
        get_json_schema(func)
    except Exception as exc:
        raise ToolSetupError(f"{where}: {exc} (a tool needs type hints on every argument and a docstring "
                             "with an Args: section describing them)") from None


def load_tools(specs: list[str]) -> list:
    tools = [_load(spec, "--tools") for spec in specs]
    for spec, tool in zip(specs, tools, strict=True):
        _check_described(tool, f"--tools {spec!r}")
    return tools


def load_environment(spec: str | None):
    """The factory TRL calls once per rollout; its instance's public methods but `reset` and `get_reward`
    (the rollout's reward, when the environment owns it) are the tools."""
    if spec is None:
        return None
    factory = _load(spec, "--environment")
    if inspect.isclass(factory):
        if not callable(getattr(factory, "reset", None)):
            raise ToolSetupError(f"--environment {spec!r}: the class needs a reset(self, **row) method "
                                 "(TRL calls it at the start of every rollout)")
        for name in _tool_method_names(factory):
            _check_described(getattr(factory, name), f"--environment {spec!r}, method {name}")
    return factory


def _tool_method_names(cls) -> list[str]:
    """The methods of an environment class TRL offers as tools: public, but not reset or get_reward."""
    return [name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


def check_template(processor, source: str, family: str | None = None) -> None:
    """The model's chat template must render a tool call and a tool answer (of the families in
    runtime/families.py, only Qwen3-VL's stock template does). `family`: the model's, named in the refusal."""
    from trl.chat_template_utils import supports_tool_calling

    if not supports_tool_calling(processor):
        what = f"{source} (a {family} model)" if family else source
        raise ToolSetupError(f"the chat template of {what} cannot render tool calls and tool results (of the VLM "
                             "families here only Qwen3-VL's can): train a model whose template does "
                             "(align-tiny-model --arch qwen3_vl writes one)")


@dataclass
class Rollout:
    """One sample's trajectory as TRL's tool loop leaves it, run by the rollout worker."""

    first: object  # the first turn's Completion
    tool_mask: list[int]
    messages: list[dict]  # the model's turns and the tools' answers
    completion_ids: list[int]  # every turn as sampled, with the tool suffixes
    logprobs: list[float]  # per completion token; 0.0 on tool tokens
    calls: int
    failures: int
    images: list  # the images the tools returned
    versions: list[int]  # the weight version of each model turn that sampled tokens
    environment: object = None  # the instance whose methods were this sample's tools (--environment)


def environment_names(trainer, rows: list[dict]) -> list | None:
    """Each row's environment as TRL names it: None for a single factory."""
    if trainer.environment_factories is None:
        return None
    return [row.get("environment") if trl_seam.multi_environment(trainer) else None for row in rows]


def reset_environments(trainer, rows: list[dict]) -> tuple[list, list[list[dict]]]:
    """New instances for `rows` (one per row, from the factory, never TRL's pool), reset with the row as TRL
    resets them, and each row's prompt with the observation `reset` returned appended to its last message
    (as TRL does for a batch, leaving the row itself untouched)."""
    instances, prompts = [], []
    for row, name in zip(rows, environment_names(trainer, rows), strict=True):
        instance = trainer.environment_factories[name]()
        prompt = row.get("prompt", [{"role": "user", "content": ""}])
        observation = instance.reset(**({k: v for k, v in row.items() if k != "environment"}
                                        if trl_seam.multi_environment(trainer) else row))
        if observation is not None:
            content = prompt[-1]["content"]
            if isinstance(observation, list) and isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if isinstance(observation, str) and isinstance(content, list):
                observation = [{"type": "text", "text": observation}]
            prompt = prompt[:-1] + [{**prompt[-1], "content": content + observation}]
        instances.append(instance)
        prompts.append(prompt)
    return instances, prompts


def environment_tools(environment) -> list:
    """An instance's methods TRL offers as tools (bound to it)."""
    return [getattr(environment, name) for name in _tool_method_names(type(environment))]


def run_tool_loop(trainer, processor, prompts, prompt_ids, first, images, generate_turn, environments=None,
                  names=None) -> list[Rollout]:
    """TRL's tool loop for samples whose first turns (`first`, Completions) are sampled, off the training
    thread, with its own `processor` (a deep copy: tokenizers are not safe to share across threads) and
    per-sample tool tables, and `generate_turn` (TRL's `_generate_single_turn` parameters) for the later
    turns. `prompts`: per sample its chat messages (TRL appends to them), `prompt_ids` its ids with
    expanded image runs, `images` its images (None: none in the batch), `environments` its environment
    instance and `names` their names (`environment_names`)."""
    failures = [0] * len(prompt_ids)
    environments = environments or [None] * len(prompt_ids)
    tables = [_tool_tables(trl_seam.standalone_tools(trainer) + (environment_tools(env) if env is not None else []),
                           failures, i)
              for i, env in enumerate(environments)]
    completion_ids = [list(c.token_ids) for c in first]
    # each completion parsed with the tools its prompt was rendered with, as TRL parses a first turn
    tools = [trl_seam.tools_for_environment(trainer, name) for name in names] if names is not None \
        else [trainer.tools] * len(prompt_ids)
    tokenizer = getattr(processor, "tokenizer", processor)
    completions = [[_parse(tokenizer, ids, prefix, t)]
                   for ids, prefix, t in zip(completion_ids, prompt_ids, tools, strict=True)]
    out = trl_seam.run_tool_loop_on_copy(trainer, processor, tables, names, generate_turn, prompts, prompt_ids,
                                         completion_ids, completions, [list(c.logprobs) for c in first], images)
    rollouts = []
    for i, messages in enumerate(out.completions):
        # TRL counts per batch; a batch's samples go to several processes (and stale groups are generated
        # again), so count per sample: TRL executed the calls of the assistant turns its loop reached.
        turns = [m for m in messages if m.get("role") == "assistant"][: trainer.max_tool_calling_iterations]
        calls = [c for m in turns for c in m.get("tool_calls") or []]
        unknown = sum(c.get("type") != "function" or c["function"]["name"] not in {**tables[i][0], **tables[i][1]}
                      for c in calls)
        rollouts.append(Rollout(first[i], out.tool_mask[i], messages, out.completion_ids[i], out.logprobs[i],
                                len(calls), failures[i] + unknown, out.tool_images[i], [], environments[i]))
    return rollouts


def _parse(tokenizer, ids, prefix, tools) -> dict:
    """A first turn as TRL decodes it: with tool calls parsed where the tokenizer can."""
    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None) is not None:
        return parse_response(tokenizer, ids, prefix=prefix, tools=tools)
    return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}


def _tool_tables(tools, failures: list[int], sample: int) -> tuple[dict, dict]:
    """TRL's per-sample (sync, async) tool tables, each tool counting its sample's failures (TRL counts a
    raised exception as one, then answers the model with the error)."""
    def counted(tool):
        if inspect.iscoroutinefunction(tool):
            async def call(**kwargs):
                try:
                    return await tool(**kwargs)
                except Exception:
                    failures[sample] += 1
                    raise
        else:
            def call(**kwargs):
                try:
                    return tool(**kwargs)
                except Exception:
                    failures[sample] += 1
                    raise
        return functools.wraps(tool)(call)

    sync = {t.__name__: counted(t) for t in tools if not inspect.iscoroutinefunction(t)}
    coro = {t.__name__: counted(t) for t in tools if inspect.iscoroutinefunction(t)}
    return sync, coro


class LogsToolTurns(trl_seam.ToolLoopSeam):
    """GRPOTrainer mixin: TRL's tool loop, or the one the async rollout worker finished, and per batch the
    turns per trajectory, tool calls per sample and the tokens that came from tools (masked out of the
    loss) against those the model sampled. TRL logs `tools/call_frequency` and `tools/failure_frequency`
    itself."""

    def tool_loop(self, prompt_ids, completion_ids, run_trl_loop) -> trl_seam.ToolLoopResult:
        generation = getattr(self, "vllm_generation", None)
        finished = getattr(generation, "finished_tool_loop", None)
        out = finished() if finished is not None else None  # async rollouts: the worker ran this batch's loop
        if out is None:
            out = _tool_turns_here(generation, prompt_ids, completion_ids, run_trl_loop)
        n = max(1, len(out.tool_mask))
        turns = [sum(1 for m in c if m.get("role") == "assistant") for c in out.completions]
        calls = [sum(len(m.get("tool_calls") or []) for m in c if m.get("role") == "assistant")
                 for c in out.completions]
        metrics = {
            "tools/turns_per_trajectory": sum(turns) / n,
            "tools/max_turns": max(turns, default=0),
            "tools/calls_per_sample": sum(calls) / n,
            "tools/tool_tokens": sum(m.count(0) for m in out.tool_mask) / n,
            "tools/model_tokens": sum(m.count(1) for m in out.tool_mask) / n,
        }
        logged = trl_seam.metrics(self)
        for name, value in metrics.items():
            logged[name].append(float(value))
        return out


def _tool_turns_here(generation, prompt_ids, completion_ids, run_trl_loop) -> trl_seam.ToolLoopResult:
    """TRL's loop on the training thread, each turn through the generation backend (told when the loop
    starts and ends, when it keeps per-trajectory state)."""
    start = getattr(generation, "start_tool_turns", None)
    if start is not None:
        start(prompt_ids, completion_ids)
    try:
        out = run_trl_loop()
        if start is not None:
            generation.join_tool_turns()
    finally:
        if start is not None:
            generation.end_tool_turns()
    return out
