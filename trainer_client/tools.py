"""Tools and environments for GRPO/GSPO: TRL's `tools=` and `environment_factory=`, loaded from
`--tools module:function ...` and `--environment module:Factory`, and what the tool loop did, logged.

The model calls tools in its completions; the tool loop parses the calls, runs the tools, appends the
tool turn's suffix ids to the sampled ids (never re-rendering earlier turns, `tool_mask` 0 on them) and
generates again. In server mode our loop runs it, each trajectory on its own (trainer_client/agent_loop.py);
in colocate and none modes TRL's. We load the callables, refuse bad ones before any model loads, and log
per-trajectory counts TRL does not (`LogsToolTurns`).

With `--environment` and `--async_rollouts`, a batch the rollout worker reads ahead gets its own instances
(`reset_environments`, one per sample, as TRL draws and resets its pool for a batch), whose methods are its
samples' tools; TRL then builds that batch's prompts from the observations those resets returned, without
resetting its pool for the same rows (`LogsToolTurns.reset_already`).
"""

import inspect

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


def environment_tools(environment) -> list:
    """An instance's methods TRL offers as tools (bound to it)."""
    return [getattr(environment, name) for name in _tool_method_names(type(environment))]


def environment_names(trainer, rows: list[dict]) -> list | None:
    """Each row's environment as TRL names it: None for a single factory."""
    if trainer.environment_factories is None:
        return None
    return [row.get("environment") if trl_seam.multi_environment(trainer) else None for row in rows]


def reset_environments(trainer, rows: list[dict]) -> tuple[list, list]:
    """New instances for `rows` (one per row, from the factory, never TRL's pool), each reset with its row as
    TRL resets them; and what each reset returned (the observation TRL joins to the prompt, `with_observation`)."""
    instances, observations = [], []
    for row, name in zip(rows, environment_names(trainer, rows), strict=True):
        instance = trainer.environment_factories[name]()
        observations.append(instance.reset(**({k: v for k, v in row.items() if k != "environment"}
                                              if trl_seam.multi_environment(trainer) else row)))
        instances.append(instance)
    return instances, observations


def with_observation(row: dict, observation) -> list[dict]:
    """The row's prompt with `observation` appended to its last message, as TRL joins them for a batch
    (leaving the row itself untouched)."""
    prompt = row.get("prompt", [{"role": "user", "content": ""}])
    if observation is None:
        return prompt
    content = prompt[-1]["content"]
    if isinstance(observation, list) and isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(observation, str) and isinstance(content, list):
        observation = [{"type": "text", "text": observation}]
    return prompt[:-1] + [{**prompt[-1], "content": content + observation}]


class LogsToolTurns(trl_seam.ToolLoopSeam, trl_seam.EnvironmentResetSeam):
    """GRPOTrainer mixin: the tool loop's result (the one our rollout backend finished in server mode, TRL's
    loop in colocate and none modes), and per batch the turns per trajectory, tool calls per sample and the
    tokens that came from tools (masked out of the loss) against those the model sampled. TRL logs
    `tools/call_frequency` and `tools/failure_frequency` itself. With --async_rollouts, the rows the rollout
    worker read ahead are not reset again by TRL (`reset_already`)."""

    def tool_loop(self, prompt_ids, completion_ids, run_trl_loop) -> trl_seam.ToolLoopResult:
        finished = getattr(getattr(self, "vllm_generation", None), "finished_tool_loop", None)
        out = finished() if finished is not None else run_trl_loop()
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

    def reset_already(self, inputs) -> list | None:
        """Per input, the observation its environment's reset returned when the rollout worker read the batch
        ahead; None: TRL resets its own pool for these rows."""
        reset = getattr(getattr(self, "vllm_generation", None), "reset_already", None)
        return reset(inputs) if reset is not None and self.environment_factories is not None else None
