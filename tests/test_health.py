"""Is the run healthy? The rollout/* metrics' formulas, the step-0 parity check refusing each broken setup
with its cause (a server's processor pixel budget, its chat template, weights that never reached it),
`--parity_check warn`, and `align-train check`, against real align-serve subprocesses (the transformers
engine; `align-train check` on the vLLM engine too).
The modes' own tests (test_train, test_async, test_tools, test_lora, test_families) assert the healthy numbers."""

import json
import logging
import math
import sys

import pytest
import torch

from examples.demo import make_dataset
from examples.tiny_model import build
from tests.test_train import REWARDS, SMALL, server_version
from tests.utils import ServerProcess
from trainer_client.check import main as check
from trainer_client.cli import run
from trainer_client.parity import coarser, tolerance
from trainer_client.rollout_metrics import mismatch
from trainer_client.weight_pusher import WeightPusher

IDENTITY = lambda t: t  # noqa: E731 (one process: gathering changes nothing)


# ---- the metrics --------------------------------------------------------------------------------------

def test_rollout_metrics_follow_their_formulas():
    trainer = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-0.5, -1.5, -7.0, 0.0]])
    sampler = torch.tensor([[-1.2, -2.0, -2.5, -1.0], [-0.5, float("nan"), -6.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])  # the padding and a token without a sampler logprob drop out
    d = [[0.2, 0.0, -0.5], [0.0, -1.0]]
    flat = [x for row in d for x in row]
    out = mismatch(trainer, sampler, mask, sequence_level=False, clip=(None, 1.1), gather=IDENTITY)
    assert out["logprob_diff/mean"] == pytest.approx(sum(map(abs, flat)) / 5)
    assert out["logprob_diff/max"] == pytest.approx(1.0)
    assert out["k3_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in flat) / 5)
    assert out["ppl_ratio"] == pytest.approx(sum(math.exp(-sum(r) / len(r)) for r in d) / 2)
    assert out["is_ratio/mean"] == pytest.approx(sum(math.exp(x) for x in flat) / 5)
    assert (out["is_ratio/min"], out["is_ratio/max"]) == pytest.approx((math.exp(-1.0), math.exp(0.2)))
    assert out["is_ratio/clipped_frac"] == pytest.approx(1 / 5)  # exp(0.2) > 1.1
    w = [math.exp(x) for x in flat]
    assert out["ess"] == pytest.approx(sum(w) ** 2 / (5 * sum(x * x for x in w)))

    # Sequence-level correction (TRL's sequence_* modes): one ratio per sequence for the clip and the ESS.
    seq = mismatch(trainer, sampler, mask, sequence_level=True, clip=(0.5, None), gather=IDENTITY)
    w = [math.exp(sum(r)) for r in d]
    assert seq["is_ratio/clipped_frac"] == pytest.approx(1 / 2)  # exp(-1.0) < 0.5
    assert seq["ess"] == pytest.approx(sum(w) ** 2 / (2 * sum(x * x for x in w)))
    assert seq["k3_kl"] == out["k3_kl"]

    # Split by staleness: each subset over its own samples, one with no sample left out.
    lagged = mismatch(trainer, sampler, mask, sequence_level=False, clip=(None, None), gather=IDENTITY,
                      lags=torch.tensor([0, 2]))
    assert lagged["lag_0/k3_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d[0]) / 3)
    assert lagged["lag_ge1/logprob_diff/mean"] == pytest.approx(0.5)
    fresh = mismatch(trainer, sampler, mask, sequence_level=False, clip=(None, None), gather=IDENTITY,
                     lags=torch.tensor([0, 0]))
    assert "lag_0/k3_kl" in fresh and not any(k.startswith("lag_ge1/") for k in fresh)


def test_tolerance_follows_the_coarser_dtype():
    assert tolerance("float32", "float32") == 0.02
    assert coarser("float32", "bfloat16") == coarser("float16", "bfloat16") == "bfloat16"
    assert coarser("float16", "float32") == "float16"
    assert tolerance("float32", "bfloat16") == tolerance("bfloat16", "float32") == 0.1
    assert coarser("float32", None) == "bfloat16"  # a sampler that does not say counts as the coarse one


# ---- broken setups: refused before the first optimizer step, each naming its cause --------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour-data")
    make_dataset(root, 8, seed=0, method="grpo")
    return root / "grpo.jsonl"


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    proc = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir).wait_ready()
    yield proc
    proc.stop()


def grpo(model, dataset, out, url, *flags):
    return run(["grpo", "--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), *SMALL,
                "--num_generations", "4", "--max_completion_length", "8", "--max_steps", "1", "--vllm-mode", "server",
                "--server-url", url, *REWARDS, *flags])


def broken_server(model, log_dir, *flags):
    return ServerProcess(model, "transformers", log_dir=log_dir, extra=list(flags)).wait_ready()


def test_a_server_with_another_pixel_budget_is_refused_before_any_push(tiny_vlm, data, tmp_path, log_dir):
    """The server's processor cuts each image into fewer patches than the trainer's (here 1 token, not 4 of
    the 64x64 demo image): the model would read other image tokens than the trainer scores."""
    proc = broken_server(tiny_vlm, log_dir, "--mm-processor-kwargs", json.dumps({"max_pixels": 784}))
    try:
        with pytest.raises(SystemExit) as refused:
            grpo(tiny_vlm, data, tmp_path / "out", proc.url)
        message = str(refused.value)
        assert "the prompts differ between the trainer and the server (processor pixel budget)" in message
        assert "2. processor pixel budget: DIFFERS" in message and "to 42 positions, the trainer's processor to 45" in message
        assert "1. chat template: alike" in message and "--parity_check warn" in message
        assert server_version(proc) == 0  # refused before the start push, nothing trained
        assert not (tmp_path / "out" / "model.safetensors").exists()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def template_server(tiny_vlm, log_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "terse.jinja"
    template.write_text((tiny_vlm / "chat_template.jinja").read_text().replace("a helpful", "a terse"))
    proc = broken_server(tiny_vlm, log_dir, "--chat-template", str(template))
    yield proc
    proc.stop()


def test_a_server_with_another_chat_template_is_refused(tiny_vlm, data, tmp_path, template_server):
    with pytest.raises(SystemExit) as refused:
        grpo(tiny_vlm, data, tmp_path / "out", template_server.url)
    message = str(refused.value)
    assert "the prompts differ between the trainer and the server (chat template)" in message
    assert "1. chat template: DIFFERS" in message and "'You are a terse assistant" in message
    assert "the trainer 'You are a helpful assistant" in message
    assert "2. processor pixel budget: alike (1 image(s): 45 positions on both sides)" in message


def test_weights_that_never_reached_the_server_are_refused(data, tmp_path, server, monkeypatch):
    """The trainer resumes other weights (another seed here) and its pushes go nowhere: the prompts match
    token for token, the logprobs do not."""
    other = build(tmp_path / "other", "qwen2_vl", seed=1)

    def lost(self, server, pairs, adapter=None):  # a push that "succeeds" and changes nothing
        info = self.client.info(refresh=True, server=server)
        self._pushed[server] = (info.instance_id, info.weight_version)
        return self._pushed[server]

    monkeypatch.setattr(WeightPusher, "push_one", lost)
    with pytest.raises(SystemExit) as refused:
        grpo(other, data, tmp_path / "out", server.url)
    message = str(refused.value)
    assert "the sampler's logprobs are not the trainer's model's" in message
    gap = float(message.split("mean |logprob difference| ")[1].split(" ")[0])
    assert gap > 5 * tolerance("float32")  # measured 0.14 nats/token
    assert "tolerance 0.02 (float32: trainer float32, sampler float32)" in message
    assert "1. chat template: alike" in message and "2. processor pixel budget: alike" in message
    assert "3. weights not pushed: LIKELY" in message and "4. adapter mismatch: no LoRA adapter in this run" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_warn_says_the_same_and_trains_on(tiny_vlm, data, tmp_path, template_server, caplog):
    caplog.set_level(logging.INFO, logger="trainer_client")
    trainer = grpo(tiny_vlm, data, tmp_path / "out", template_server.url, "--parity_check", "warn")
    assert trainer.state.global_step == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "parity check" in r.getMessage()]
    assert len(warned) == 1 and "1. chat template: DIFFERS" in warned[0] and "training on" in warned[0]
    # then the logprob check, which passes (ids go as ids), and a rollout line per step
    assert any("step-0 parity check: mean |logprob difference|" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("step 1: rollout |dlogp|") for r in caplog.records)


# ---- align-train check ----------------------------------------------------------------------------------

def check_args(model, dataset, out, url):
    return ["--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), "--num_generations", "4",
            "--per_device_train_batch_size", "4", "--max_completion_length", "8", "--vllm-mode", "server",
            "--server-url", url, *REWARDS]


def check_is_healthy(model, dataset, out, server, engine, capsys, monkeypatch, *flags):
    """`align-train check` as a user runs it (the console script's entry point) says a healthy setup is
    healthy, and how far apart the two sides are; it pushes the weights once and trains nothing."""
    from trainer_client.cli import main

    v = server_version(server)
    monkeypatch.setattr(sys, "argv", ["align-train", "check", *check_args(model, dataset, out, server.url), *flags])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    report = capsys.readouterr().out
    assert "align-train check: healthy" in report
    assert "data: 8 rows checked; first batch: 4 completions (1 prompts x 4)" in report
    assert f"server {server.url}: " in report and f"{engine} engine, float32" in report
    assert "1. chat template: alike" in report and "2. processor pixel budget: alike" in report
    assert "3. weights not pushed: not seen (the logprobs match)" in report
    gap = float(report.split("mismatch: mean |logprob difference| ")[1].split(" ")[0])
    assert 0 < gap < tolerance("float32")  # measured 0.0045 on both engines: the placeholders never sampled
    assert server_version(server) == v + 1  # the start push, which the check checks; nothing trained
    assert not (out / "model.safetensors").exists()


def test_align_train_check_reports_a_healthy_setup(tiny_vlm, data, tmp_path, server, capsys, monkeypatch):
    check_is_healthy(tiny_vlm, data, tmp_path / "out", server, "transformers", capsys, monkeypatch)


@pytest.mark.vllm
def test_align_train_check_reports_a_healthy_setup_on_the_vllm_engine(tiny_vlm, data, tmp_path, vllm_vlm, capsys,
                                                                      monkeypatch):
    # the suite's shared vLLM server (conftest.py): its versions go on counting
    check_is_healthy(tiny_vlm, data, tmp_path / "out", vllm_vlm, "vllm", capsys, monkeypatch,
                     "--api_key", vllm_vlm.api_key)


def test_align_train_check_names_what_is_broken(tiny_vlm, data, tmp_path, template_server, capsys):
    assert check(check_args(tiny_vlm, data, tmp_path / "out", template_server.url)) == 1
    report = capsys.readouterr().out
    assert "align-train check: NOT healthy" in report and "1. chat template: DIFFERS" in report
