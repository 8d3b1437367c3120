"""Tool calls out of a completion's text, in the Qwen family's format (Qwen2.5, Qwen3, Qwen3-VL):
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call."""

import json
import re
import uuid

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) in OpenAI's message form. A block that is not a JSON object with a string
    `name` and an object `arguments` leaves the whole text as content and no calls: the caller sees
    what the model wrote, never a half-parsed call."""
    blocks = _CALL.findall(text)
    if not blocks:
        return text, []
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            return text, []
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
    return _CALL.sub("", text).strip() or None, calls
