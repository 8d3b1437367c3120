"""`align-tiny-model`: every architecture builds offline, loads with the Auto classes, and is seeded;
the non-Qwen families keep their processor's own image expansion and their own chat template."""

import hashlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import trl
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from examples.tiny_model import ARCHS, build
from examples.tiny_models import qwen
from runtime.torchvision_compat import load_processor
from tests.utils import random_image

FAMILY_ARCHS = [a for a in ARCHS if a not in qwen.ARCHS]
# Per family: its processor, the one marker its template writes per image, what the assistant's
# turn starts with, and the name TRL keeps its stock template under (where TRL has it).
FAMILIES = {
    "gemma3": dict(processor="Gemma3Processor", marker="<start_of_image>", answer="<start_of_turn>model\n",
                   trl_template="gemma3"),
    "idefics3": dict(processor="Idefics3Processor", marker="<image>", answer="Assistant:", trl_template="idefics3"),
    "internvl": dict(processor="InternVLProcessor", marker="<IMG_CONTEXT>", answer="<|im_start|>assistant\n",
                     trl_template=None),
    "llava_onevision": dict(processor="LlavaOnevisionProcessor", marker="<image>", answer="<|im_start|>assistant\n",
                            trl_template=None),
}


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", qwen.ARCHS)
def test_each_qwen_arch_builds_loads_and_sees_images(tmp_path, arch):
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


@pytest.mark.parametrize("arch", ["qwen2_vl", *FAMILY_ARCHS])
def test_same_seed_same_files_other_seed_other_weights(tmp_path, arch):
    a, b, c = (build(tmp_path / n, arch, seed=s) for n, s in [("a", 3), ("b", 3), ("c", 4)])
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _digest(a) != _digest(c)


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


@pytest.mark.parametrize("arch", ["qwen3_vl", "gemma3"])
def test_cli_writes_a_model(tmp_path, arch):
    subprocess.run([sys.executable, "-m", "examples.tiny_model", str(tmp_path / "m"), "--arch", arch,
                    "--seed", "1"], check=True, capture_output=True)
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == arch


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


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _image_features(model, inputs) -> int:
    """Rows of image features the model computes from these processor outputs."""
    get = model.model.get_image_features
    params = inspect.signature(get).parameters
    with torch.no_grad():
        feats = get(**{k: v for k, v in inputs.items() if k in params and k not in ("input_ids", "attention_mask")})
    feats = feats.pooler_output if getattr(feats, "pooler_output", None) is not None else feats
    return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in ([feats] if torch.is_tensor(feats) else feats))


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    built = {}

    def get(arch):
        if arch not in built:
            out = build(tmp_path_factory.mktemp(arch), arch, seed=0)
            built[arch] = (out, AutoModelForImageTextToText.from_pretrained(out).eval(), load_processor(out))
        return built[arch]

    return get


def _ask(processor, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "What colour is the shape?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_builds_small_and_reloads_with_its_own_classes(family_model, arch):
    out, model, processor = family_model(arch)
    assert AutoConfig.from_pretrained(out).model_type == arch
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert type(processor).__name__ == FAMILIES[arch]["processor"]
    text = model.config.get_text_config()
    assert text.hidden_size == 64 and text.num_hidden_layers == 2
    assert text.hidden_size // text.num_attention_heads >= 32 or getattr(text, "head_dim", 0) >= 32
    # the saved processor is the one built: a second save and load changes nothing
    again = out.parent / f"{arch}-again"
    processor.save_pretrained(again)
    assert load_processor(again).to_dict() == processor.to_dict()


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_expands_each_image_marker_to_its_features(family_model, arch):
    _, model, processor = family_model(arch)
    marker = FAMILIES[arch]["marker"]
    counts = {}
    for w, h in [(64, 64), (96, 48)]:
        text = _ask(processor)
        assert text.count(marker) == 1
        inputs = processor(text=[text], images=[_image(w, h, 0)], return_tensors="pt", add_special_tokens=False)
        tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert tokens == _image_features(model, inputs) > 1
        counts[w, h] = tokens
    if arch == "gemma3":  # a fixed number of soft tokens, whatever the image's shape
        assert set(counts.values()) == {16}
    else:  # tiles / anyres crops follow the image's shape
        assert counts[64, 64] != counts[96, 48]


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_expansion_keeps_the_family_layout(family_model, arch):
    _, model, processor = family_model(arch)
    tok = processor.tokenizer
    inputs = processor(text=[_ask(processor)], images=[_image(64, 64, 0)], add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(inputs["input_ids"][0])
    image = tok.convert_ids_to_tokens(model.config.image_token_id)
    first, last = pieces.index(image), len(pieces) - 1 - pieces[::-1].index(image)
    if arch == "gemma3":
        assert pieces[first - 1] == "<start_of_image>" and pieces[last + 1] == "<end_of_image>"
        assert "token_type_ids" in inputs and sum(inputs["token_type_ids"][0]) == 16
    elif arch == "idefics3":
        assert {"<row_1_col_1>", "<row_2_col_2>", "<global-img>"} <= set(pieces)
        assert "pixel_attention_mask" in inputs
    elif arch == "internvl":
        assert pieces[first - 1] == "<img>" and pieces[last + 1] == "</img>"
    else:
        assert "image_sizes" in inputs and last - first + 1 > 16  # the base view's 16 and the anyres grid's


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_generates_from_images_that_matter(family_model, arch):
    _, model, processor = family_model(arch)
    text = _ask(processor, n_images=2)
    logits = []
    for seed in (0, 1):
        images = [_image(64, 64, seed), _image(48, 80, seed + 2)]
        inputs = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert ids.shape[1] == inputs["input_ids"].shape[1] + 4
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_template_renders_a_conversation(family_model, arch):
    _, _, processor = family_model(arch)
    turns = ["You are a helpful assistant.", "What colour is the star?", "The star is red.", "And the circle?"]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": turns[0]}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[1]}]},
        {"role": "assistant", "content": [{"type": "text", "text": turns[2]}]},
        {"role": "user", "content": [{"type": "text", "text": turns[3]}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    positions = [text.index(t) for t in turns]
    assert positions == sorted(positions)
    assert text.count(FAMILIES[arch]["marker"]) == 1
    assert text.endswith(FAMILIES[arch]["answer"])
    # none of these families' own templates reads `tools`: they render as if none were given
    tools = [{"type": "function", "function": {"name": "zoom", "description": "Zoom in.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    assert processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True) == text


@pytest.mark.parametrize("arch", [a for a in FAMILY_ARCHS if FAMILIES[a]["trl_template"]])
def test_family_template_is_the_one_trl_recognises(family_model, arch):
    # TRL picks response parsing and training templates by comparing chat templates byte for byte
    _, _, processor = family_model(arch)
    stock = Path(trl.__file__).parent / "chat_templates" / f"{FAMILIES[arch]['trl_template']}.jinja"
    assert processor.tokenizer.chat_template == stock.read_text()


def test_qwen_only_options_are_refused_for_other_families(tmp_path):
    run = subprocess.run([sys.executable, "-m", "examples.tiny_model", str(tmp_path / "m"), "--arch", "gemma3",
                          "--text-only"], capture_output=True, text=True)
    assert run.returncode == 2 and "--text-only" in run.stderr and "gemma3" in run.stderr
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="qwen arches only"):
        build(tmp_path / "m", "internvl", tokenizer="qwen2")
