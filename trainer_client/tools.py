"""Tools and environments for GRPO/GSPO: TRL's `tools=` and `environment_factory=`, loaded from
`--tools module:function ...` and `--environment module:Factory`, and what the tool loop did, logged.

TRL runs the loop (`GRPOTrainer._tool_call_loop`): it parses each completion's tool calls, calls the
tools, appends the tool turn's suffix ids to the sampled ids (never re-rendering earlier turns) and
generates again, with `tool_mask` 0 on the tool tokens. We only load the callables, refuse bad ones
before any model loads, and log per-trajectory counts TRL does not.
"""

import inspect

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
        for name, method in inspect.getmembers(factory, inspect.isfunction):
            if not name.startswith("_") and name not in ("reset", "get_reward"):
                _check_described(method, f"--environment {spec!r}, method {name}")
    return factory


def check_template(processor, source: str) -> None:
    """The model's chat template must render a tool call and a tool answer (Qwen2-VL's cannot)."""
    from trl.chat_template_utils import supports_tool_calling

    if not supports_tool_calling(processor):
        raise ToolSetupError(f"the chat template of {source} cannot render tool calls and tool results (Qwen2-VL's "
                             "and Qwen2.5-VL's cannot; Qwen3-VL's can): train a model whose template does "
                             "(align-tiny-model --arch qwen3_vl writes one)")


class LogsToolTurns:
    """GRPOTrainer mixin: per batch, turns per trajectory, tool calls per sample and the tokens that came
    from tools (masked out of the loss) against those the model sampled. TRL logs `tools/call_frequency`
    and `tools/failure_frequency` itself."""

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields):
        generation = getattr(self, "vllm_generation", None)
        start = getattr(generation, "start_tool_turns", None)
        if start is not None:
            start(prompt_ids, completion_ids)
        try:
            out = super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, logprobs, images,
                                          multimodal_fields)
            if start is not None:
                generation.join_tool_turns()
        finally:
            if start is not None:
                generation.end_tool_turns()
        tool_mask, completions = out[0], out[1]
        mode = "train" if self.model.training else "eval"
        n = max(1, len(tool_mask))
        turns = [sum(1 for m in c if m.get("role") == "assistant") for c in completions]
        calls = [sum(len(m.get("tool_calls") or []) for m in c if m.get("role") == "assistant") for c in completions]
        metrics = {
            "tools/turns_per_trajectory": sum(turns) / n,
            "tools/max_turns": max(turns, default=0),
            "tools/calls_per_sample": sum(calls) / n,
            "tools/tool_tokens": sum(m.count(0) for m in tool_mask) / n,
            "tools/model_tokens": sum(m.count(1) for m in tool_mask) / n,
        }
        for name, value in metrics.items():
            self._metrics[mode][name].append(float(value))
        return out
