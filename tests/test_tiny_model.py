"""`align-tiny-model`: every architecture builds offline, loads with the Auto classes, and is seeded."""

import hashlib
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from examples.tiny_model import ARCHS, build
from runtime.torchvision_compat import load_processor
from tests.utils import random_image


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_builds_loads_and_sees_images(tmp_path, arch):
    out = build(tmp_path / arch, arch, seed=0)
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = load_processor(out)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert AutoConfig.from_pretrained(out).model_type == arch
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 1  # one placeholder before the processor expands it
    inputs = processor(text=[text], images=[random_image(0)], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4
    out_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] == inputs["input_ids"].shape[1] + 4


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a, b, c = (build(tmp_path / n, "qwen2_vl", seed=s) for n, s in [("a", 3), ("b", 3), ("c", 4)])
    assert _digest(a) == _digest(b) != _digest(c)


def test_text_only_twin_ties_embeddings_and_shares_the_tokenizer(tmp_path, tiny_vlm):
    out = build(tmp_path / "text", "qwen2_vl", text_only=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    vl_tok = load_processor(tiny_vlm).tokenizer
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).get_vocab() == vl_tok.get_vocab()
    assert vl_tok.decode(vl_tok.encode(" red green blue yellow")) == " red green blue yellow"
    for colour in (" red", " green", " blue", " yellow"):
        assert len(vl_tok.encode(colour)) == 1


def test_cli_writes_a_model(tmp_path):
    subprocess.run([sys.executable, "-m", "examples.tiny_model", str(tmp_path / "m"), "--arch", "qwen3_vl",
                    "--seed", "1"], check=True, capture_output=True)
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "qwen3_vl"


def test_builds_and_processes_images_where_torchvision_is_absent(tmp_path):
    # A fresh interpreter in which torchvision cannot be found at all.
    script = textwrap.dedent(f"""
        import importlib.machinery, sys
        find = importlib.machinery.PathFinder.find_spec
        def hidden(name, path=None, target=None):
            return None if name.split(".")[0] == "torchvision" else find(name, path, target)
        importlib.machinery.PathFinder.find_spec = staticmethod(hidden)
        from examples.tiny_model import build
        from runtime.torchvision_compat import load_processor
        import numpy as np
        from PIL import Image
        out = build({str(tmp_path / "m")!r}, "qwen2_vl")
        p = load_processor(out)
        text = p.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}}]}}], add_generation_prompt=True)
        batch = p(text=[text], images=[Image.new("RGB", (64, 64))], return_tensors="pt")
        assert "torchvision" not in sys.modules
        print(batch["image_grid_thw"].tolist())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("[[1, 4, 4]]")
