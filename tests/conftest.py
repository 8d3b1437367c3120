import os
from pathlib import Path

import pytest

import runtime  # noqa: F401  (as in every process of ours: torchvision importable on the CPU torch)
from examples.demo import make_dataset
from examples.tiny_model import build

# What TRL's colocate mode writes into this process's environment for vLLM (RANK, ..., MASTER_PORT, the
# port its store keeps listening on): a later align-train subprocess of the same pytest run would inherit
# it and fail to bind that port. Each test gets the environment back as it found it.
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _distributed_environment_restored():
    saved = {k: os.environ.get(k) for k in _DISTRIBUTED_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """Tiny random Qwen2-VL (seed 0) with its processor."""
    return build(tmp_path_factory.mktemp("tiny_qwen2_vl"), "qwen2_vl", seed=0)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The colour task's rows: 16 for GRPO (grpo.jsonl), 16 preference pairs (mpo.jsonl). A module with
    other rows defines its own `data`."""
    root = tmp_path_factory.mktemp("colour-data")
    make_dataset(root, 16, seed=0, method="grpo")
    make_dataset(root, 16, seed=1, method="mpo")
    return root


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """The text-only Qwen2 twin (same tokenizer)."""
    return build(tmp_path_factory.mktemp("tiny_text"), "qwen2_vl", text_only=True, seed=0)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def tool_vlm(tmp_path_factory) -> Path:
    """Tiny Qwen3-VL (tool-capable chat template) taught to call its `zoom` tool (tests/tool_model.py)."""
    from tests.tool_model import build_tool_model

    return build_tool_model(tmp_path_factory.mktemp("tool_qwen3_vl"))


# ---- one vLLM server per model for the suite -------------------------------------------------------
# A vLLM start costs about a minute on 2 cores. The modules whose assertions hold on any server of a
# model (they read the weight version before they act, and push what they check) share one per model,
# handed to each module reset: serving the model's own weights again with no adapter loaded (a full
# push replaces the model and drops the adapter: test_lora's check_full_sync_drops_the_adapter).
# Its weight_version goes on counting across modules. The API key is tests.test_weights.KEY.


def _shared_vllm(model_dir: Path, log_dir: Path, extra: list[str]):
    from tests.test_weights import KEY
    from tests.utils import ServerProcess

    server = ServerProcess(model_dir, "vllm", api_key=KEY, log_dir=log_dir, extra=extra)
    try:
        yield server.wait_ready(timeout=600)
    finally:
        server.stop()


def _reset(server, model_cls: str, model_dir: Path):
    import transformers

    from tests.test_weights import push_when_free
    from trainer_client import AlignClient

    model = getattr(transformers, model_cls).from_pretrained(model_dir).eval()
    with AlignClient(server.url, api_key=server.api_key) as client:
        # a module that failed mid-sync may leave a session open: it idles out within a minute
        push_when_free(client, model, "shm", 90)
    return server


@pytest.fixture(scope="session")
def _vllm_vlm(tiny_vlm, log_dir):
    from tests.test_lora import LORA_SERVER

    # LoRA for test_lora_vllm; the other modules push full weights, which a LoRA-enabled vLLM loads and
    # serves as one without does (test_lora_vllm's full-sync test checks that too).
    yield from _shared_vllm(tiny_vlm, log_dir, [*LORA_SERVER, "--max-loras", "2"])


@pytest.fixture(scope="session")
def _vllm_text(tiny_text, log_dir):
    yield from _shared_vllm(tiny_text, log_dir, [])


@pytest.fixture(scope="module")
def vllm_vlm(_vllm_vlm, tiny_vlm):
    """The suite's vLLM server of tiny_vlm (test_lora.LORA_SERVER, test_weights.KEY), reset."""
    return _reset(_vllm_vlm, "AutoModelForImageTextToText", tiny_vlm)


@pytest.fixture(scope="module")
def vllm_text(_vllm_text, tiny_text):
    """The suite's vLLM server of tiny_text (test_weights.KEY), reset."""
    return _reset(_vllm_text, "AutoModelForCausalLM", tiny_text)
