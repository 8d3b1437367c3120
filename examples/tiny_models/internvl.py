"""InternVL 2.5/3 in transformers' own layout (`InternVLForConditionalGeneration`, as the
OpenGVLab/InternVL3-*-hf checkpoints): an InternViT tower, a Qwen2 language model.

The chat template renders `<IMG_CONTEXT>\\n` per image; the processor cuts the image into 32x32
tiles on the grid (1 to 12 tiles) closest to its aspect ratio, adds a thumbnail tile when there is
more than one, and replaces the marker with `<img>` + `<IMG_CONTEXT>` * 16 per tile + `</img>`.
"""

import json
from pathlib import Path

from examples.tiny_models.qwen import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS
from examples.tiny_models.tokenizer import train_bpe

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
SPECIAL_TOKENS = [*QWEN_SPECIAL_TOKENS, "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                  "<box>", "</box>", "<video>"]
TILE = 32
PATCH = 4
DOWNSAMPLE = 0.5  # pixel shuffle: (32 / 4)^2 = 64 patches -> 16 tokens per tile
IMAGE_SEQ_LEN = int((TILE // PATCH) ** 2 * DOWNSAMPLE**2)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# The template transformers' InternVL conversion writes (ChatML turns, no default system prompt,
# no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens=IMAGE_TOKENS,
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
        # tied like InternVL3-1B's Qwen2.5-0.5B; said in both configs, since vLLM reads the text one
        tie_word_embeddings=True,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                  image_size=[TILE, TILE], patch_size=[PATCH, PATCH])
    config = T.InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
                              image_seq_length=IMAGE_SEQ_LEN, downsample_ratio=DOWNSAMPLE,
                              tie_word_embeddings=True)
    model = T.InternVLForConditionalGeneration(config)
    size = {"height": TILE, "width": TILE}
    image_processor = T.GotOcr2ImageProcessorPil(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                                 crop_to_patches=True, min_patches=1, max_patches=12)
    if torchvision_importable():
        video = T.InternVLVideoProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        T.InternVLProcessor(image_processor, tok, video, image_seq_length=IMAGE_SEQ_LEN,
                            chat_template=CHAT_TEMPLATE).save_pretrained(out)
    else:  # transformers cannot save a processor without its video part: save the others
        image_processor.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                               "image_seq_length": IMAGE_SEQ_LEN}))
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
