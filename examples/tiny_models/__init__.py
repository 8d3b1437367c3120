"""The tiny models `align-tiny-model` writes, one module per family (`write(out, max_len)`), and
the byte-level BPE their tokenizers share (`tokenizer`)."""
