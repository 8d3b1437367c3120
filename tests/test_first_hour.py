"""A newcomer's first hour: each common mistake ends, before any model loads, in one line that names the
flag to change (never a traceback); every wait says what it waits for, why and for how long; starts
carry no library notice that asks nothing of the user."""

import json
import logging
import re
import subprocess
import sys

import httpx
import pytest

from examples.demo import make_dataset
from tests.utils import ServerProcess, free_port, refusal
from trainer_client import AlignClient, AlignConnectionError, AlignServerError
from trainer_client.waiting import not_ready

KEY = "first-hour-key"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-hour-data")
    grpo = make_dataset(root, 4, method="grpo")
    rows = [json.loads(line) for line in grpo.read_text().splitlines()]
    no_solution = root / "no_solution.jsonl"
    no_solution.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "solution"}) + "\n" for r in rows))
    return {"grpo": grpo, "no_solution": no_solution}


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    proc = ServerProcess(tiny_vlm, "transformers", api_key=KEY, log_dir=log_dir).wait_ready()
    yield proc
    proc.stop()


def _train_cli(*argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer_client.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def _args(tiny_vlm, dataset, tmp_path, *flags) -> list[str]:
    return ["grpo", "--model", str(tiny_vlm), "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"),
            "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_steps", "1", *flags]


# ---- one line for each mistake ----------------------------------------------------------------------

def test_a_reward_that_does_not_load(tiny_vlm, data, tmp_path):
    line = refusal(_args(tiny_vlm, data["grpo"], tmp_path, "--reward_funcs", "nosuch:fn"))
    assert line == "align-train: --reward_funcs: reward 'nosuch:fn' cannot be loaded: No module named 'nosuch'"
    line = refusal(_args(tiny_vlm, data["grpo"], tmp_path, "--reward_funcs", "accurracy"))
    assert line.startswith("align-train: --reward_funcs: unknown reward 'accurracy': use one of format, ")


def test_a_reward_needing_a_column_the_dataset_lacks_is_refused_at_start(tiny_vlm, data, tmp_path):
    """In a subprocess, as the user runs it: one line on stderr, nothing else (no vLLM Triton notices
    either, though TRL imports vLLM on the way), and no model saved."""
    run_ = _train_cli(*_args(tiny_vlm, data["no_solution"], tmp_path, "--reward_funcs", "accuracy", "format"))
    assert run_.returncode == 1
    assert run_.stdout == ""
    assert run_.stderr.splitlines() == [
        f"align-train: --reward_funcs: reward 'accuracy' needs the dataset column(s) `solution` (or `answer`), "
        f"which {data['no_solution']} lacks (its columns: image, prompt): add them to the data or pick other "
        "--reward_funcs"]
    assert not (tmp_path / "out").exists()


def test_the_cli_path_imports_vllm_so_the_quiet_start_above_means_something():
    import trainer_client.trainers  # noqa: F401

    assert "vllm.triton_utils.importing" in sys.modules


@pytest.mark.parametrize("flags,expected", [
    (["--vllm-mode", "server"], "--vllm-mode server needs at least one --server-url (an align-serve base URL)"),
    (["--vllm-mode", "server", "--server-url", "127.0.0.1:8000"],
     "--server-url 127.0.0.1:8000: give the base URL with its scheme, e.g. http://127.0.0.1:8000"),
    (["--vllm-mode", "server", "--server-url", "http://127.0.0.1:8000/v1"],
     "--server-url http://127.0.0.1:8000/v1: give the server's base URL, without a path: http://127.0.0.1:8000"),
    (["--num_generations", "3"], "align-train: generation_batch_size (4) must be divisible by num_generations (3)."),
    (["--config", "/nonexistent/run.yaml"], "align-train: --config /nonexistent/run.yaml: no such file"),
])
def test_flags_that_cannot_work_together(flags, expected, tiny_vlm, data, tmp_path):
    assert refusal(_args(tiny_vlm, data["grpo"], tmp_path, *flags)) == expected


def test_a_missing_model_or_dataset_is_named(tiny_vlm, data, tmp_path):
    line = refusal(_args(tmp_path / "no-model", data["grpo"], tmp_path))
    assert line == f"align-train: --model {tmp_path / 'no-model'} is neither a directory nor a hub id (ORG/NAME)"
    line = refusal(_args(tiny_vlm, tmp_path / "missing.jsonl", tmp_path))
    assert line == f"align-train: bad dataset, nothing trained: dataset {tmp_path / 'missing.jsonl'} does not exist"


def test_a_server_that_wants_an_api_key_stops_the_run_at_once(tiny_vlm, data, tmp_path, server, monkeypatch):
    monkeypatch.delenv("ALIGN_API_KEY", raising=False)
    flags = ["--vllm-mode", "server", "--server-url", server.url]
    line = refusal(_args(tiny_vlm, data["grpo"], tmp_path, *flags))
    assert line == (f"align-train: {server.url}/ready wants an API key and none was given: pass the server's "
                    "--api-key to align-train as --api-key KEY (or set ALIGN_API_KEY)")
    line = refusal(_args(tiny_vlm, data["grpo"], tmp_path, *flags, "--api-key", "wrong"))
    assert "the key given is not the server's" in line


# ---- waits say why and for how long -------------------------------------------------------------------

def test_a_url_that_answers_404_to_ready_is_not_waited_on(server):
    """Something answers there, but has no /ready (a path too many, another kind of server): waiting
    would not change that."""
    with AlignClient(f"{server.url}/v1", api_key=KEY) as client, pytest.raises(AlignServerError) as err:
        client.wait_ready(timeout=600)
    assert err.value.status == 404 and err.value.url == f"{server.url}/v1/ready"


def test_waiting_for_a_server_that_is_not_there_says_so_then_gives_up_in_one_line(tiny_vlm, data, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run_ = _train_cli(*_args(tiny_vlm, data["grpo"], tmp_path, "--vllm-mode", "server", "--server-url", url,
                             "--server_timeout", "3"))
    hint = f"start one with: align-serve --model {tiny_vlm} --port {url.rsplit(':', 1)[1]}"
    lines = run_.stderr.splitlines()
    assert run_.returncode == 1 and "Traceback" not in run_.stderr and "Triton" not in run_.stderr
    waiting = [line for line in lines if "waiting for" in line]
    assert waiting[0].endswith(f"waiting for {url} to be ready: connection refused (no server listens there "
                               f"yet) (0 s of 3 s); {hint}, or allow more time with --server_timeout")
    assert lines[-1] == (f"align-train: {url} not ready after 3 s: connection refused (no server listens there "
                         f"yet); {hint}, or allow more time with --server_timeout (--server_timeout 3)")


def test_wait_ready_reports_at_once_then_every_report_every_seconds(caplog):
    url = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="trainer_client.waiting"):
        with AlignClient(url, start_hint="start one with: align-serve") as client, pytest.raises(TimeoutError):
            client.wait_ready(timeout=1.6, poll=0.05, report_every=0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 3
    assert all(line.startswith(f"waiting for {url} to be ready: connection refused") for line in lines)
    assert lines[0].endswith("(0 s of 2 s); start one with: align-serve")


def test_a_call_retried_through_a_server_restart_says_so_after_a_second(caplog):
    url = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="trainer_client.waiting"):
        with AlignClient(url, max_retries=0, backoff=0.1, retry_for=3) as client, pytest.raises(AlignConnectionError):
            client.info()
    lines = [r.getMessage() for r in caplog.records]
    # The first line comes once the call has failed for a second (a blip passes unsaid).
    assert lines and re.fullmatch(rf"waiting for {re.escape(url)}/v1/info: connection refused \(no server listens there yet\) "
                                  r"\([12] s of 3 s\)", lines[0])


def test_a_503_says_what_the_server_said():
    envelope = {"error": {"code": "not_ready", "message": "the model is still loading", "detail": None}}
    assert not_ready(httpx.Response(503, json=envelope)) == "503 the model is still loading"
    assert not_ready(httpx.Response(502, text="Bad Gateway")) == "502 Bad Gateway"


def test_a_push_waits_out_a_sync_another_trainer_left_open_and_says_so(tiny_vlm, server, caplog):
    from types import SimpleNamespace

    from accelerate import Accelerator
    from transformers import AutoModelForImageTextToText

    from protocol.weights import WeightsInit
    from trainer_client.weight_pusher import WeightPusher
    from trainer_client.weights import named_weights, plan_buckets

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    with AlignClient(server.url, api_key=KEY) as client, named_weights(model) as pairs:
        # A trainer that died after opening its sync: the server drops it once it idles 2 s.
        specs, sizes = plan_buckets(pairs, 2**30)
        init = WeightsInit(transport="http", tensors=specs, buckets=sizes, session_timeout_s=2)
        client._request(0, "POST", "/v1/weights/init", json=init.model_dump(mode="json", exclude_none=True))
        with caplog.at_level(logging.WARNING, logger="trainer_client.waiting"):
            # TRL's trainer, as far as WeightPusher reads it before a push (not a LoRA run)
            trainer = SimpleNamespace(accelerator=Accelerator(cpu=True), model=model)
            _, version = WeightPusher(trainer, client, "http", server_timeout=60).push_one(0, pairs)
        assert version == client.info(refresh=True).weight_version == 1
    said = [r.getMessage() for r in caplog.records]
    assert said and said[0].startswith(f"waiting for {server.url} to take this trainer's weights: 409: another "
                                       "weight sync is open there, dropped if idle for ")
    assert "(this run waits up to --server_timeout)" in said[0]
