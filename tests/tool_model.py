"""A tiny Qwen3-VL that makes a tool call: random weights cannot, so this one is taught to answer
one question (with the `zoom` tool offered) by calling `zoom`. Greedy decoding then gives the call
on both engines, and the tests see real tool-call parsing, not a mock."""

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from examples.tiny_model import build
from runtime.torchvision_compat import load_processor
from tests.utils import random_image

TOOLS = [{"type": "function", "function": {
    "name": "zoom", "description": "Zoom into the image",
    "parameters": {"type": "object", "properties": {"factor": {"type": "integer"}}, "required": ["factor"]}}}]
QUESTION = "What colour is the shape?"
IMAGE_SEED = 1
CALL = '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>'


def question() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def fit(model, inputs, labels, max_steps: int, stop_below: float) -> float:
    """Adam on the one example until its loss is below `stop_below` (or `max_steps`); the last loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(max_steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < stop_below:
            break
    return loss.item()


def build_tool_model(out: Path, max_steps: int = 400) -> Path:
    build(out, "qwen3_vl", seed=0)
    processor = load_processor(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    prompt = processor.apply_chat_template(question(), tools=TOOLS, add_generation_prompt=True)
    inputs = processor(text=[prompt + CALL + "<|im_end|>"], images=[random_image(IMAGE_SEED)], return_tensors="pt")
    n_prompt = processor(text=[prompt], images=[random_image(IMAGE_SEED)], return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    loss = fit(model, inputs, labels, max_steps, stop_below=0.01)  # the call is then each step's clear argmax (checked below)
    model.eval()
    with torch.inference_mode():
        prompt_inputs = processor(text=[prompt], images=[random_image(IMAGE_SEED)], return_tensors="pt")
        out_ids = model.generate(**prompt_inputs, max_new_tokens=80, do_sample=False)[0, n_prompt:]
    text = processor.tokenizer.decode(out_ids, skip_special_tokens=True)
    assert text == CALL, f"the tiny model did not learn its tool call (loss {loss:.4f}): {text!r}"
    model.save_pretrained(out)
    return out


# ---- a model that calls its tool twice, seeing the tool's image in between ------------------------
ZOOMED_SEED = 7  # the image `zoom` returns
ANSWER = "red"


def zoom(factor: int) -> list:
    """Zoom into the image

    Args:
        factor: how many times to enlarge
    """
    return [{"type": "image", "image": random_image(ZOOMED_SEED)}, {"type": "text", "text": f"zoomed x{factor}"}]


def calling_trajectory(calls: int = 2) -> list[dict]:
    """The conversation the model learns: call, look at the tool's image, `calls` times, then answer."""
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "zoom", "arguments": {"factor": 2}}}]}
    tool = {"role": "tool", "name": "zoom", "content": zoom(2)}
    question_msgs = [{"role": "user", "content": [{"type": "image", "image": random_image(IMAGE_SEED)},
                                                  {"type": "text", "text": QUESTION}]}]
    return [*question_msgs, *[call, tool] * calls, {"role": "assistant", "content": ANSWER}]


def build_calling_model(out: Path, calls: int = 2, max_steps: int = 600) -> Path:
    """A tiny Qwen3-VL taught the whole of `calling_trajectory(calls)` with `zoom` as its tool, rendered as
    TRL renders it (the tool's schema from its docstring), loss on the assistant turns only."""
    build(out, "qwen3_vl", seed=0)
    processor = load_processor(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    conversation = calling_trajectory(calls)

    def ids(messages, generation_prompt: bool) -> dict:
        return processor.apply_chat_template(messages, tools=[zoom], add_generation_prompt=generation_prompt,
                                             tokenize=True, return_dict=True, return_tensors="pt")

    inputs = ids(conversation, False)
    labels = torch.full_like(inputs["input_ids"], -100)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, m in enumerate(conversation):
        if m["role"] == "assistant":
            start = ids(conversation[:i], True)["input_ids"].shape[1]
            stop = start + inputs["input_ids"][0, start:].tolist().index(end) + 1
            labels[0, start:stop] = inputs["input_ids"][0, start:stop]
    loss = fit(model, inputs, labels, max_steps, stop_below=0.005)
    assert loss < 0.05, f"the tiny model did not learn its {calls} tool calls (loss {loss:.4f})"
    model.save_pretrained(out)
    return out


class ZoomEnvironment:
    """`zoom` as TRL's `environment_factory`: one instance per rollout, reset with the row. Its `zoom` is
    the tool above (same name, schema and image, so the model's trajectory is the same), counting its
    calls and enlarging the image the row names; `get_reward` scores the rollout from that state."""

    def reset(self, **row) -> None:
        self.calls = 0
        self.seed = row["zoom_seed"]

    def zoom(self, factor: int) -> list:
        """Zoom into the image

        Args:
            factor: how many times to enlarge
        """
        self.calls += 1
        return [{"type": "image", "image": random_image(self.seed)}, {"type": "text", "text": f"zoomed x{factor}"}]

    def get_reward(self) -> float:
        return float(self.calls)
