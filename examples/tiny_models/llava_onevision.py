"""LLaVA-OneVision: a SigLIP tower on a base view plus an "anyres" grid of crops, a Qwen2 language model.

The chat template renders `<image>` per image (all images of a turn before its text); the processor
picks the grid in `image_grid_pinpoints` that fits the image best, and expands the marker to the
base view's 16 tokens plus the grid's tokens with padding rows/columns removed, one
`image_newline` per row, scaled down past 9 crops' worth ("anyres_max_9").
"""

import json
from pathlib import Path

from examples.tiny_models.checkpoint import save_with_nested_siglip_tower
from examples.tiny_models.qwen import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS
from examples.tiny_models.tokenizer import train_bpe

SPECIAL_TOKENS = [*QWEN_SPECIAL_TOKENS, "<image>", "<video>"]
CROP = 32  # the vision tower's input: the base view and every crop
PATCH = 8  # (32 / 8)^2 = 16 tokens per crop
GRID_PINPOINTS = [[CROP * i, CROP * j] for i in range(1, 5) for j in range(1, 5)]  # up to 4x4 crops

# LLaVA-OneVision's own chat template (llava-hf/llava-onevision-qwen2-*-ov-hf): `<|im_start|>role `,
# images, videos, then each text part after a newline; `<|im_end|>` with no newline after it;
# content must be a list of parts; no tools.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )


def write(out: Path, max_len: int) -> None:
    import transformers as T

    from runtime.torchvision_compat import torchvision_importable

    tok = build_tokenizer()
    ids = tok.get_vocab()
    text = dict(
        model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=1, image_size=CROP, patch_size=PATCH, vision_use_head=False)
    config = T.LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_grid_pinpoints=GRID_PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    model = T.LlavaOnevisionForConditionalGeneration(config)
    size = {"height": CROP, "width": CROP}
    image_processor = T.LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=GRID_PINPOINTS)
    processor_kwargs = dict(num_image_tokens=(CROP // PATCH) ** 2, vision_feature_select_strategy="full",
                            vision_aspect_ratio="anyres_max_9")
    if torchvision_importable():
        video = T.LlavaOnevisionVideoProcessor(size=size)
        T.LlavaOnevisionProcessor(image_processor, tok, video, chat_template=CHAT_TEMPLATE,
                                  **processor_kwargs).save_pretrained(out)
    else:  # transformers cannot save a processor without its video part: save the others
        image_processor.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaOnevisionProcessor",
                                                               **processor_kwargs}))
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    save_with_nested_siglip_tower(model, out)
