"""A model named by local directory or by Hugging Face hub id, resolved as `vllm serve` and TRL do.

Both `align-serve` and `align-train` take `--model ORG/NAME` (or a path). An id goes through the
hub cache (`HF_HOME`, `HF_HUB_CACHE`; `HF_HUB_OFFLINE=1` reads the cache only) once, and everything
after that (processor, engine, trainer) loads the one snapshot directory it resolved to, so the two
sides and every loader in a process see the same files.
"""

from pathlib import Path

# Weight formats nobody here loads: a repo that ships safetensors and .bin would otherwise download both.
_IGNORED = ["*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.gguf", "original/*"]


class ModelNotFound(Exception):
    """One line saying what was looked up and where."""


def resolve_model(name: str, revision: str | None = None) -> Path:
    """The directory holding `name`: a local directory as given, or the hub snapshot of id `name`
    (downloaded unless offline). Raises ModelNotFound with a one-line reason."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    if path.exists():
        raise ModelNotFound(f"{name} is a file; give a model directory or a hub id (ORG/NAME)")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFound(f"{name} is neither a directory nor a hub id (ORG/NAME)") from None
    where = f"hub id {name!r} (revision {revision or 'main'})"
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(name, revision=revision, ignore_patterns=_IGNORED))
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelNotFound(f"{where} is not a directory and not in the Hugging Face cache {cache}, and {how}; "
                            f"download it first (hf download {name}) or point HF_HOME at a cache holding it") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelNotFound(f"{where} is not a directory and the hub has no such "
                            f"{'revision' if isinstance(exc, RevisionNotFoundError) else 'repository'} "
                            "(or it is gated: log in with `hf auth login`)") from None
