"""Gemma 3: a SigLIP tower pooled to a fixed number of soft tokens per image.

The chat template renders one `<start_of_image>` per image; the processor replaces it with
`\\n\\n<start_of_image>` + `<image_soft_token>` * 16 + `<end_of_image>\\n\\n` whatever the image's
size (pan-and-scan off, as in Gemma 3's own processor config).
"""

from pathlib import Path

from examples.tiny_models.checkpoint import save_with_nested_siglip_tower
from examples.tiny_models.tokenizer import prepend_bos, train_bpe

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Gemma's vocabulary holds runs of newlines as single tokens, and vLLM's Gemma 3 processor looks
# them up by these strings to re-merge the newlines around an expanded image.
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
IMAGE_SIZE = 64  # the SigLIP tower's input: every image is resized to it
SOFT_TOKENS = 16  # per image: the 8x8 patches average-pooled to 4x4

# Gemma 3's own chat template (google/gemma-3-*-it, as TRL keeps it): no system turn (a system
# message is folded into the first user turn), roles must alternate, no tools.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""


def build_tokenizer():
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(n, normalized=False) for n in NEWLINES])
    prepend_bos(tok, "<bos>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )


def write(out: Path, max_len: int) -> None:
    import torch
    import transformers as T

    tok = build_tokenizer()
    ids = tok.get_vocab()
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        # one local (sliding) and one global layer, as Gemma 3 alternates them (5:1 there)
        layer_types=["sliding_attention", "full_attention"], sliding_window=512,
        max_position_embeddings=max_len, rms_norm_eps=1e-6,
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                  image_size=IMAGE_SIZE, patch_size=8, vision_use_head=False)
    config = T.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=SOFT_TOKENS,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    model = T.Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection to zeros: every image would look the same
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    image_processor = T.Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    T.Gemma3Processor(image_processor, tok, chat_template=CHAT_TEMPLATE,
                      image_seq_length=SOFT_TOKENS).save_pretrained(out)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    save_with_nested_siglip_tower(model, out)
