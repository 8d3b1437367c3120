"""What an adapter sync may carry, checked at init before a byte is staged.

vLLM ignores an adapter tensor whose module it does not know with only a debug log, and applies
LoRA only to the language model's linear layers (not the vision tower, whose Qwen2.5-VL MLP shares
the names gate_proj/up_proj/down_proj with the language model's). A sync that the server would
apply only in part is refused here, naming the tensor or the PEFT feature, on both engines: the
transformers engine serves exactly what vLLM would, so the two stay comparable.
"""

import os
import re

import torch

from protocol import LoraAdapter, TensorSpec

PEFT_PREFIX = "base_model.model."
LORA_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B"}


class AdapterRefused(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def lora_targets(model_path: str) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """(every linear layer of the language model -> (out_features, in_features), every other
    linear layer: vision tower, projector, lm_head). HF module names, built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    decoder = model.get_decoder()
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = {name: (m.out_features, m.in_features) for name, m in linears.items()
               if name.startswith(prefix + ".")}
    return targets, set(linears) - set(targets)


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule (`get_pattern_key`): a key applies to a module whose name ends with it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_adapter(adapter: LoraAdapter, tensors: list[TensorSpec], targets: dict[str, tuple[int, int]],
                  others: set[str], max_rank: int) -> None:
    """Raise AdapterRefused unless the server would apply every tensor exactly as PEFT does."""
    if adapter.use_dora:
        raise AdapterRefused("adapter.use_dora", "DoRA (use_dora=True) is not supported: vLLM cannot serve it; "
                                                 "train a plain LoRA or sync merged weights (--lora_sync merged)")
    if adapter.bias != "none":
        raise AdapterRefused("adapter.bias", f"a LoRA bias (bias={adapter.bias!r}) is not supported: vLLM cannot "
                                             "serve it; train with bias='none' or sync merged weights")
    if adapter.modules_to_save:
        raise AdapterRefused("adapter.modules_to_save",
                             f"modules_to_save {adapter.modules_to_save} is not supported: those modules are "
                             "trained in full; sync merged weights (--lora_sync merged)")
    top = max([adapter.r, *adapter.rank_pattern.values()])
    if top > max_rank:
        raise AdapterRefused("adapter.r", f"adapter rank {top} exceeds this server's --max-lora-rank {max_rank}; "
                                          f"restart align-serve with --max-lora-rank {top} or more")
    halves: dict[str, dict[str, int]] = {}
    for i, t in enumerate(tensors):
        field = f"tensors[{i}].name"
        part = next((p for p in LORA_PARTS if t.name.endswith(p)), None)
        if "lora_magnitude_vector" in t.name:
            raise AdapterRefused(field, f"{t.name} is a DoRA magnitude: DoRA is not supported")
        if ".modules_to_save." in t.name:
            raise AdapterRefused(field, f"{t.name} is a modules_to_save copy: modules_to_save is not supported")
        if "lora_embedding_" in t.name:
            raise AdapterRefused(field, f"{t.name} adapts an embedding: only linear layers of the language "
                                        "model take LoRA here")
        if t.name.endswith(".lora_B.bias"):
            raise AdapterRefused(field, f"{t.name} is a LoRA bias: LoRA bias is not supported")
        if not t.name.startswith(PEFT_PREFIX) or part is None:
            raise AdapterRefused(field, f"{t.name!r} is not a LoRA tensor under PEFT's saved names "
                                        f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight, as "
                                        "get_peft_model_state_dict gives them)")
        module = t.name[len(PEFT_PREFIX):-len(part)]
        if module in others:
            within = os.path.commonprefix(sorted(targets)).rpartition(".")[0]
            raise AdapterRefused(field, f"{t.name} targets {module}, which is not a linear layer of the language "
                                        "model (vision tower, projector or lm_head): vLLM does not apply LoRA "
                                        "there; leave it out of target_modules (where the vision tower names its "
                                        "layers as the language model does, give one regular expression, e.g. "
                                        f"'{re.escape(within)}\\..*\\.(q_proj|v_proj)')")
        if module not in targets:
            raise AdapterRefused(field, f"{t.name} targets {module}, which is not a linear layer of the served "
                                        "model (is this the adapter of another model?)")
        if not getattr(torch, t.dtype).is_floating_point:
            raise AdapterRefused(f"tensors[{i}].dtype", f"{t.name} is {t.dtype}; LoRA weights are floating point")
        out_features, in_features = targets[module]
        rank = _pattern_value(adapter.rank_pattern, module, adapter.r)
        expected = [rank, in_features] if LORA_PARTS[part] == "A" else [out_features, rank]
        if t.shape != expected:
            raise AdapterRefused(f"tensors[{i}].shape", f"{t.name} has shape {t.shape}, but {module} with rank "
                                                        f"{rank} needs {expected}")
        halves.setdefault(module, {})[LORA_PARTS[part]] = i
    for module, parts in halves.items():
        if len(parts) != 2:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise AdapterRefused("tensors", f"{module} has no {missing} tensor: each module needs both halves")
