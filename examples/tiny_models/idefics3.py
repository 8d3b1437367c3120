"""Idefics3 (the SmolVLM layout): a SigLIP-style tower on square tiles, pixel-shuffled to fewer tokens.

The chat template renders one `<image>` per image; the processor resizes the image so its longest
edge is 64, cuts it into 32x32 tiles and writes, per tile row,
`<fake_token_around_image><row_i_col_j>` + `<image>` * 16 for each tile and a newline, then
`\\n<fake_token_around_image><global-img>` + `<image>` * 16 + `<fake_token_around_image>` for the
whole image shrunk to one tile. Idefics3Processor is used rather than SmolVLMProcessor, which needs
the `num2words` package and otherwise expands images the same way.
"""

from pathlib import Path

from examples.tiny_models.tokenizer import prepend_bos, train_bpe

ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<fake_token_around_image>", "<image>",
                  "<end_of_utterance>", "<global-img>", *ROW_COL_TOKENS]
TILE = 32  # the vision tower's input: one tile
PATCH = 4
SCALE_FACTOR = 2  # pixel shuffle: (32 / 4)^2 = 64 patches -> 16 tokens per tile
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2

# Idefics3's own chat template (HuggingFaceM4/Idefics3-8B-Llama3, as TRL keeps it): `Role:` turns
# ended by `<end_of_utterance>`; content must be a list of parts; no tools.
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(SPECIAL_TOKENS)
    prepend_bos(tok, "<|begin_of_text|>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|end_of_text|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )


def write(out: Path, max_len: int) -> None:
    import transformers as T

    tok = build_tokenizer()
    ids = tok.get_vocab()
    text = dict(
        model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len, rms_norm_eps=1e-5,
        bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<end_of_utterance>"],
        pad_token_id=ids["<|end_of_text|>"],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                  image_size=TILE, patch_size=PATCH)
    config = T.Idefics3Config(text_config=text, vision_config=vision, scale_factor=SCALE_FACTOR,
                              image_token_id=ids["<image>"], pad_token_id=ids["<|end_of_text|>"])
    model = T.Idefics3ForConditionalGeneration(config)
    image_processor = T.Idefics3ImageProcessorPil(size={"longest_edge": 2 * TILE},
                                                  max_image_size={"longest_edge": TILE})
    T.Idefics3Processor(image_processor, tok, image_seq_len=IMAGE_SEQ_LEN,
                        chat_template=CHAT_TEMPLATE).save_pretrained(out)
    model.generation_config.eos_token_id = [ids["<end_of_utterance>"], ids["<|end_of_text|>"]]
    model.generation_config.pad_token_id = ids["<|end_of_text|>"]
    model.save_pretrained(out)
