"""Models by hub id on both commands, read from a real hub cache layout offline (HF_HUB_OFFLINE=1),
and a missing id stopped with one line that says where it was looked for."""

import json
import os
import subprocess
import sys

import pytest

from examples.demo import make_dataset
from tests.test_data import colour_parquet_folder
from tests.utils import ServerProcess, cache_as_hub, free_port, random_image
from trainer_client import AlignClient

REPO = "tiny-org/tiny-qwen2-vl"


@pytest.fixture(scope="module")
def hf_home(tiny_vlm, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    cache_as_hub(tiny_vlm, home, REPO)
    return home


def offline(hf_home) -> dict:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")}


def _generate(server: ServerProcess, name: str | None = REPO) -> list[int]:
    client = AlignClient([server.url], api_key=server.api_key)
    info = client.wait_ready(timeout=60)
    assert name is None or info.model == name  # served under the id, as vllm serve names it
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    out = client.generate(messages=[messages], images=[[random_image(1)]], max_tokens=6, temperature=0.0)
    return out.results[0].completions[0].token_ids


def _serve_by_id(hf_home, log_dir, engine: str) -> list[int]:
    by_id = ServerProcess(REPO, engine, log_dir=log_dir, env=offline(hf_home))
    try:
        return _generate(by_id.wait_ready())
    finally:
        by_id.stop()


def test_align_serve_by_hub_id_offline(tiny_vlm, hf_home, log_dir):
    by_path = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir, extra=["--served-model-name", REPO])
    try:
        expected = _generate(by_path.wait_ready())
    finally:
        by_path.stop()
    assert _serve_by_id(hf_home, log_dir, "transformers") == expected


@pytest.mark.vllm
def test_align_serve_vllm_by_hub_id_offline(hf_home, log_dir, vllm_vlm):
    # By path: the suite's shared vLLM server of the same model (conftest.py), at its own weights.
    # --served-model-name is the CLI's, whatever the engine: the test above checks it.
    expected = _generate(vllm_vlm, name=None)
    assert _serve_by_id(hf_home, log_dir, "vllm") == expected


def _cli(module: str, *args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_a_missing_id_is_one_line_on_both_commands(hf_home, tmp_path):
    env = offline(hf_home)
    serve = _cli("server.cli", "--model", "tiny-org/nope", "--engine", "transformers", "--port", str(free_port()),
                 env=env)
    make_dataset(tmp_path, 2)
    train = _cli("trainer_client.cli", "grpo", "--model_name_or_path", "tiny-org/nope", "--dataset",
                 str(tmp_path / "grpo.jsonl"), "--output_dir", str(tmp_path / "out"), env=env)
    for run in (serve, train):
        assert run.returncode != 0
        assert "Traceback" not in run.stderr, run.stderr
        line = run.stderr.strip().splitlines()[-1]
        assert "'tiny-org/nope'" in line and str(hf_home / "hub") in line and "HF_HUB_OFFLINE=1" in line
    # a revision the cache does not hold is named the same way
    serve = _cli("server.cli", "--model", REPO, "--revision", "v2", "--engine", "transformers", "--port",
                 str(free_port()), env=env)
    assert serve.returncode != 0 and "revision v2" in serve.stderr and "Traceback" not in serve.stderr


def test_align_serve_and_align_train_server_mode_with_eval_by_hub_id_offline(hf_home, tmp_path, log_dir):
    """The first command of docs/training.md, small: model and data by id from the offline cache,
    rollouts and greedy eval (the dataset's test split) through align-serve."""
    cache_as_hub(colour_parquet_folder(tmp_path / "colours", n=8), hf_home, "tiny-org/colours", "dataset")
    server = ServerProcess(REPO, "transformers", log_dir=log_dir, env=offline(hf_home))
    try:
        server.wait_ready()
        run = _cli("trainer_client.cli", "grpo", "--model_name_or_path", REPO, "--model_revision", "main",
                   "--dataset_name", "tiny-org/colours", "--system_prompt", "Answer with one word.",
                   "--vllm-mode", "server", "--server-url", server.url,
                   "--eval_strategy", "steps", "--eval_steps", "1", "--output_dir", str(tmp_path / "out"),
                   "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
                   "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true", env=offline(hf_home))
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 steps, model saved to" in run.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_reward" in e] == [1, 2]
    steps = [e for e in history if "weight_version" in e]
    assert len(steps) == 2 and all(e["weight_version"] == e["weight_version_pushed"] for e in steps)
