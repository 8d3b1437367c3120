"""Built-in rewards, `module:function` rewards, and errors that name the function and the row."""

import sys
import types

import pytest

from trainer_client.rewards import RewardError, load_rewards


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def call(spec: str, completions, **columns):
    (reward,) = load_rewards([spec])
    return reward(prompts=[None] * len(completions), completions=completions, completion_ids=None, **columns)


def test_format_rewards_tags():
    good = chat("<think>it is red</think>\n<answer>red</answer>")
    assert call("format", [good, chat("red"), chat("<answer>red</answer>")]) == [1.0, 0.0, 0.0]
    assert call("think_format", [good, chat("<think>hmm</think> red"), chat("<think>never closed")]) == [1.0, 1.0, 0.0]


def test_accuracy_uses_math_verify_and_plain_text_answers():
    completions = [chat(r"<think>2+2</think><answer>$4$</answer>"), chat("The answer is $\\frac{1}{2}$"),
                   chat("$5$"), chat(" Red."), chat("blue")]
    solutions = ["$4$", "$0.5$", "$4$", "red", "red"]
    assert call("accuracy", completions, solution=solutions) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert call("accuracy", ["red"], solution=["red"]) == [1.0]  # plain (non-chat) completions too


def test_module_function_reward_keeps_its_name():
    module = types.ModuleType("my_rewards")
    module.length = lambda completions, **kw: [float(len(c[0]["content"])) for c in completions]
    module.length.__name__ = "length"
    sys.modules["my_rewards"] = module
    (reward,) = load_rewards(["my_rewards:length"])
    assert reward.__name__ == "length"  # TRL names the reward's metrics after it
    assert reward(completions=[chat("abc")]) == [3.0]


def test_a_raising_reward_names_function_and_row():
    module = types.ModuleType("bad_rewards")

    def picky(completions, solution, **kw):
        return [1.0 / len(s) for s in solution]  # ZeroDivisionError on an empty solution

    module.picky = picky
    sys.modules["bad_rewards"] = module
    with pytest.raises(RewardError, match=r"'bad_rewards:picky' raised on dataset row 7: ZeroDivisionError"):
        call("bad_rewards:picky", [chat("a"), chat("b")], solution=["x", ""], dataset_row=[3, 7])


def test_unknown_rewards_are_refused_up_front():
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        load_rewards(["acuracy"])
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_rewards(["no_such_module_xyz:f"])
