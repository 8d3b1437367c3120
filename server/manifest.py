"""What a full sync must carry, checked at init before a byte is staged: every parameter of the served
model, under its HF name, with its shape and a dtype that loads into it."""

import torch

from protocol import ErrorCode, TensorSpec
from server.errors import WeightSyncError


def served_manifest(model_path: str) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], set[str]]:
    """(every tensor a sync may name -> (dtype, shape), the names a full sync must carry).

    Names are the HF module's parameter names, as a trainer's `named_parameters()` gives them; built
    on the meta device, so this costs no memory. Tied weights (a text model's `lm_head`) are
    accepted under either name but required once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    accepted = {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}
    required = {n for n, _ in model.named_parameters()}
    return accepted, required


def check_manifest(tensors: list[TensorSpec], accepted: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   required: set[str]) -> None:
    """Raise a 422 naming the first tensor that would not load, or the parameters the sync misses."""
    names = set()
    for i, t in enumerate(tensors):
        if t.name not in accepted:
            raise WeightSyncError(422, ErrorCode.invalid_request,
                                  f"tensors[{i}].name {t.name!r} is not a parameter of the served model "
                                  "(names are the HF module's, as `named_parameters()` gives them)",
                                  f"tensors[{i}].name")
        dtype, shape = accepted[t.name]
        if tuple(t.shape) != shape:
            raise WeightSyncError(422, ErrorCode.invalid_request,
                                  f"tensors[{i}].shape {list(t.shape)} for {t.name} does not match the served "
                                  f"model's {list(shape)}", f"tensors[{i}].shape")
        if dtype.is_floating_point != getattr(torch, t.dtype).is_floating_point:
            raise WeightSyncError(422, ErrorCode.invalid_request,
                                  f"tensors[{i}].dtype {t.dtype} cannot load into {t.name} ({dtype})",
                                  f"tensors[{i}].dtype")
        names.add(t.name)
    missing = sorted(n for n in required if n not in names)
    if missing:
        raise WeightSyncError(422, ErrorCode.invalid_request,
                              f"the manifest misses {len(missing)} of the model's {len(required)} parameters "
                              f"(first: {missing[0]}); a sync carries the whole model", "tensors",
                              missing=missing[:20])
