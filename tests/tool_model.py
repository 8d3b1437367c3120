"""A tiny Qwen3-VL that makes a tool call: random weights cannot, so this one is taught to answer
one question (with the `zoom` tool offered) by calling `zoom`. Greedy decoding then gives the call
on both engines, and the tests see real tool-call parsing, not a mock."""

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from server.tiny_model import build
from tests.utils import random_image
from torchvision_compat import load_processor

TOOLS = [{"type": "function", "function": {
    "name": "zoom", "description": "Zoom into the image",
    "parameters": {"type": "object", "properties": {"factor": {"type": "integer"}}, "required": ["factor"]}}}]
QUESTION = "What colour is the shape?"
IMAGE_SEED = 1
CALL = '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>'


def question() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def build_tool_model(out: Path, max_steps: int = 400) -> Path:
    build(out, "qwen3_vl", seed=0)
    processor = load_processor(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    prompt = processor.apply_chat_template(question(), tools=TOOLS, add_generation_prompt=True)
    inputs = processor(text=[prompt + CALL + "<|im_end|>"], images=[random_image(IMAGE_SEED)], return_tensors="pt")
    n_prompt = processor(text=[prompt], images=[random_image(IMAGE_SEED)], return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(max_steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:  # the call is then each step's clear argmax (checked below)
            break
    model.eval()
    with torch.inference_mode():
        prompt_inputs = processor(text=[prompt], images=[random_image(IMAGE_SEED)], return_tensors="pt")
        out_ids = model.generate(**prompt_inputs, max_new_tokens=80, do_sample=False)[0, n_prompt:]
    text = processor.tokenizer.decode(out_ids, skip_special_tokens=True)
    assert text == CALL, f"the tiny model did not learn its tool call (loss {loss.item():.4f}): {text!r}"
    model.save_pretrained(out)
    return out
