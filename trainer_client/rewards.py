"""Reward functions for GRPO/GSPO, in TRL's signature: `f(completions, **columns) -> list[float]`.

Built-ins: `format` (`<think>...</think><answer>...</answer>`), `think_format` (a closed think block
followed by an answer), `accuracy` (math-verify against the `solution` column; answers that are not
maths, such as a colour, compare as normalised text). Anything else is `module:function`.
"""

import functools
import inspect
import re

from trainer_client.specs import load_callable

_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_THINK = re.compile(r"^\s*<think>.+?</think>\s*\S.*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class RewardError(RuntimeError):
    """A reward function raised; says which function and which dataset row."""


class RewardSetupError(ValueError):
    """A reward that cannot run on this dataset: it does not load, or it needs a column the data lacks."""


def _text(completion) -> str:
    """Conversational completions are `[{"role": "assistant", "content": ...}]`; plain ones are strings."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content)
    return content


def format_reward(completions, **kwargs) -> list[float]:
    return [1.0 if _FORMAT.match(_text(c)) else 0.0 for c in completions]


def think_format_reward(completions, **kwargs) -> list[float]:
    return [1.0 if _THINK.match(_text(c)) else 0.0 for c in completions]


def _answer(text: str) -> str:
    m = _ANSWER.search(text)
    return m.group(1) if m else text


def _normalise(text: str) -> str:
    return re.sub(r"[\s.!]+$", "", text.strip().lower())


def accuracy_reward(completions, solution, **kwargs) -> list[float]:
    from math_verify import LatexExtractionConfig, parse, verify

    rewards = []
    for completion, gold in zip(completions, solution, strict=True):
        answer = _answer(_text(completion))
        gold_parsed = parse(str(gold), extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
        if gold_parsed:
            answer_parsed = parse(answer, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
            rewards.append(float(verify(gold_parsed, answer_parsed)))
        else:
            rewards.append(float(_normalise(answer) == _normalise(str(gold))))
    return rewards


BUILTIN = {"format": format_reward, "think_format": think_format_reward, "accuracy": accuracy_reward}


def _resolve(spec: str):
    if spec in BUILTIN:
        return BUILTIN[spec]
    return load_callable(spec, f"reward {spec!r}", RewardSetupError,
                         malformed=f"unknown reward {spec!r}: use one of {', '.join(BUILTIN)} or module:function")


def _guarded(spec: str, func):
    """`func` with errors that name the reward and the dataset row that made it raise."""

    @functools.wraps(func)
    def reward(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            rows = kwargs.get("dataset_row")
            row = _failing_row(func, args, kwargs)
            where = f"dataset row {rows[row]}" if rows is not None and row is not None else "a batch"
            raise RewardError(f"reward function {spec!r} raised on {where}: {type(exc).__name__}: {exc}") from exc

    return reward


def _failing_row(func, args, kwargs) -> int | None:
    """Re-run `func` one sample at a time to find the first one it raises on."""
    n = len(kwargs.get("completions") or (args[1] if len(args) > 1 else []))
    for i in range(n):
        one = {k: v[i : i + 1] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
        try:
            func(*args, **one)
        except Exception:
            return i
    return None


def load_rewards(specs: list[str]) -> list:
    """Names or `module:function` specs -> callables for TRL's `reward_funcs` (metric names kept)."""
    if not specs:
        raise RewardSetupError("GRPO/GSPO need at least one reward: --reward_funcs accuracy format ...")
    return [_guarded(spec, _resolve(spec)) for spec in specs]


# What TRL's GRPOTrainer passes every reward besides the dataset's columns (`_calculate_rewards`);
# the dataset's `prompt` column arrives as `prompts`.
TRL_REWARD_KWARGS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                     "environments"}


def check_reward_columns(specs: list[str], rewards: list, columns: list[str], source: str) -> None:
    """Refuse, before any model loads, a reward whose required arguments neither TRL nor the dataset give
    (`accuracy` on data without a solution would otherwise fail at the first step)."""
    given = TRL_REWARD_KWARGS | (set(columns) - {"prompt"})
    for spec, reward in zip(specs, rewards, strict=True):
        params = inspect.signature(reward).parameters.values()
        missing = [p.name for p in params if p.default is p.empty and p.name not in given
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if missing:
            aliases = " (or `answer`)" if "solution" in missing else ""
            raise RewardSetupError(
                f"reward {spec!r} needs the dataset column(s) {', '.join(f'`{m}`' for m in missing)}{aliases}, "
                f"which {source} lacks (its columns: {', '.join(sorted(set(columns) - {'dataset_row'}))}): add "
                "them to the data or pick other --reward_funcs")
