"""Save a model under the weight names its family's hub checkpoints carry.

transformers 5 keeps SigLIP towers flat in memory (`vision_tower.encoder...`) and saves them flat,
while the hub's Gemma 3 and LLaVA-OneVision checkpoints (and vLLM, which loads them) name them
`vision_tower.vision_model.encoder...`. transformers still loads that older layout, so writing it
gives a checkpoint both engines read.
"""

from pathlib import Path

SIGLIP_TOWER = "vision_tower."


def nest_siglip_tower(name: str) -> str:
    return name.replace(SIGLIP_TOWER, SIGLIP_TOWER + "vision_model.", 1) if name.startswith(SIGLIP_TOWER) else name


def save_with_nested_siglip_tower(model, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    path = out / "model.safetensors"
    tensors = load_file(path)
    save_file({nest_siglip_tower(name): t for name, t in tensors.items()}, path, metadata={"format": "pt"})
