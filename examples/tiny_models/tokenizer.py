"""The byte-level BPE every tiny model's tokenizer is trained from, with its family's special tokens."""

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
SHAPES = ["square", "circle", "triangle", "star"]

# Small corpus: the colour task of the demo, think/answer tags, digits and plain English, so the
# words the tests and demo use are single tokens.
CORPUS = (
    [f"What colour is the {s}? The {s} is {c}." for s in SHAPES for c in COLOURS]
    + [f"<think>The shape looks {c}.</think><answer>{c}</answer>" for c in COLOURS]
    + [f"The answer is {a} + {b} = {a + b}." for a in range(10) for b in range(10)]
    + [
        "You are a helpful assistant.",
        "Describe the image. Answer with one word.",
        "What is in the picture? There is a shape in the middle of a grey image.",
        "Hello, how are you? I am fine, thank you. Yes no maybe.",
    ]
)


def train_bpe(special_tokens: list[str], vocab_size: int = 512):
    """A `tokenizers.Tokenizer` trained on CORPUS; `special_tokens` take the first ids, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def prepend_bos(tok, bos: str) -> None:
    """Make `tok` start every encoding with `bos`, as Gemma's and Llama 3's tokenizers do (their
    chat templates write it too, so a processor call that adds special tokens doubles it)."""
    from tokenizers import processors

    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
