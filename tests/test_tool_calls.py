"""Tool calls parsed out of completion text (Qwen's `<tool_call>{json}</tool_call>` format)."""

import json

import pytest

from server.tool_calls import parse_tool_calls


def test_calls_are_parsed_with_ids_and_the_rest_is_content():
    text = ('Let me look.\n<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "crop", "arguments": {"box": [1, 2, 3, 4]}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["zoom", "crop"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"factor": 2}, {"box": [1, 2, 3, 4]}]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls('<tool_call>{"name": "zoom", "arguments": {}}</tool_call>')[0] is None


@pytest.mark.parametrize("text", [
    "no call here",
    '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}\n</tool_call>',  # broken JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "zoom", "arguments": "factor=2"}\n</tool_call>',  # arguments not an object
    '<tool_call>\n["zoom"]\n</tool_call>',
    '<tool_call>\n{"name": "zoom", "arguments": {}}\n</tool_call><tool_call>oops</tool_call>',  # one bad of two
    '<tool_call>\n{"name": "zoom", "arguments": {}}',  # never closed
])
def test_a_malformed_call_stays_in_content(text):
    assert parse_tool_calls(text) == (text, [])
