from pathlib import Path

import pytest

from server.tiny_model import build


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """Tiny random Qwen2-VL (seed 0) with its processor."""
    return build(tmp_path_factory.mktemp("tiny_qwen2_vl"), "qwen2_vl", seed=0)


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
