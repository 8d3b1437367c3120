"""The tiny models `align-tiny-model` writes, one module per family (each with a `write(out, ...)`),
the byte-level BPE their tokenizers share (`tokenizer`), and the hub's weight names for SigLIP
towers (`checkpoint`)."""
