"""Adapter-only weight sync (`align-serve --enable-lora`) on the transformers engine; vLLM's in
test_lora_vllm.py. The trainer side is a real PEFT model in this process: after each adapter push
the server's greedy output must be exactly that model's own, and a refused or killed sync must
leave the previous adapter serving."""

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from examples.tiny_model import build
from server.engines import EnginePrompt
from server.lora import AdapterRefused, check_adapter, lora_targets
from tests.test_weights import KEY, MAX_TOKENS, Trainer, served, version
from tests.utils import ServerProcess, assert_rollouts_match, wait_for
from trainer_client import AlignClient, AlignServerError
from trainer_client.weights import adapter_weights, named_weights, plan_buckets

RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_BUCKET = 4 * 1024  # the tiny adapter then spans several buckets
LORA_SERVER = ["--enable-lora", "--max-lora-rank", str(RANK)]


class LoraTrainer(Trainer):
    """The training side: the base model with a PEFT LoRA adapter we set at random."""

    def __init__(self, model_dir, **lora):
        from peft import LoraConfig, get_peft_model

        super().__init__(model_dir)
        config = {"r": RANK, "lora_alpha": 16, "target_modules": TARGETS, **lora}
        self.model = get_peft_model(self.model, LoraConfig(**config)).eval()

    def perturb(self, seed: int) -> None:
        """New random adapter weights (B non-zero, so the adapter changes the output); base untouched."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def init_adapter(url: str, trainer: LoraTrainer, changes: dict | None = None, tensors=None) -> httpx.Response:
    """POST an adapter init built from the trainer's adapter, with `changes` to its config and
    `tensors` (a function of the TensorSpec dicts) to its manifest."""
    pairs, adapter = adapter_weights(trainer.model)
    specs, sizes = plan_buckets(pairs, ADAPTER_BUCKET)
    specs = [s.model_dump() for s in specs]
    body = {"transport": "http", "tensors": tensors(specs) if tensors else specs, "buckets": sizes,
            "adapter": {**adapter.model_dump(), **(changes or {})}}
    return httpx.post(f"{url}/v1/weights/init", json=body, headers={"Authorization": f"Bearer {KEY}"})


def refused(r: httpx.Response, status: int, field: str, words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert field == (err["detail"] or {}).get("field"), err
    assert words in err["message"], err


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    s = ServerProcess(tiny_vlm, "transformers", api_key=KEY, log_dir=log_dir, extra=LORA_SERVER)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def trainer(tiny_vlm):
    return LoraTrainer(tiny_vlm)


@pytest.fixture
def client(server):
    with AlignClient(server.url, api_key=KEY, max_retries=2, backoff=0.1) as c:
        yield c


def check_adapter_pushes_serve_the_peft_output(client, trainer) -> None:
    """Several adapter pushes, one per transport: each serves the trainer's PEFT greedy output,
    carries only the adapter's bytes, and is one new version."""
    base_bytes = sum(t.numel() * t.element_size() for _, t in trainer.model.get_base_model().named_parameters())
    for seed, transport in [(1, "http"), (2, "tcp"), (3, "shm"), (4, "http")]:
        before_tokens, before = served(client, trainer)
        expected = trainer.perturb_until_changed(seed, before_tokens)
        pairs, adapter = adapter_weights(trainer.model)
        assert sum(t.numel() * t.element_size() for _, t in pairs) < base_bytes / 4
        new = client.push_adapter(trainer.model, transport=transport, bucket_bytes=ADAPTER_BUCKET)
        assert new == before + 1 == version(client)
        assert served(client, trainer) == (expected, new), f"{transport}: served output is not the PEFT model's"


def logprob_gap(client, trainer) -> float:
    """Largest |server logprob - trainer's PEFT model logprob| over one sampled completion's tokens
    (what importance sampling compares)."""
    out = client.generate(prompt_ids=[trainer.prompt_ids], images=[trainer.images], temperature=1.0,
                          max_tokens=MAX_TOKENS, logprobs=True, seed=0)
    c = out.results[0].completions[0]
    inputs = trainer.processing.model_inputs([EnginePrompt(trainer.prompt_ids + c.token_ids, trainer.images)], "cpu")
    with torch.no_grad():
        logits = trainer.model(**inputs).logits[0, -len(c.token_ids) - 1 : -1].float()
    suppressed = trainer.processing.suppressed_token_ids  # never sampled by the server (image placeholders)
    if suppressed:
        logits[:, suppressed] = float("-inf")
    mine = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    return (mine - torch.tensor(c.logprobs)).abs().max().item()


def check_full_sync_drops_the_adapter(client, trainer) -> None:
    """A merged push serves the same answer as the adapter; a base push after it serves the base
    alone: a full sync replaces the model and the adapter with it (never applied twice). The
    adapter's logprobs are as close to the trainer's as the merged model's."""
    with trainer.model.disable_adapter():
        base = trainer.greedy()
    tokens = trainer.perturb_until_changed(41, base)  # an adapter that changes the answer
    v = client.push_adapter(trainer.model)
    assert served(client, trainer) == (tokens, v)
    adapter_gap = logprob_gap(client, trainer)
    assert client.push_weights(trainer.model, transport="shm") == v + 1  # merged
    assert served(client, trainer) == (tokens, v + 1)
    merged_gap = logprob_gap(client, trainer)
    assert adapter_gap <= max(2 * merged_gap, 1e-4), (adapter_gap, merged_gap)
    with named_weights(trainer.model, merge=False) as pairs:
        assert client.push_weights(pairs, transport="shm") == v + 2
    assert served(client, trainer) == (base, v + 2)
    assert client.push_adapter(trainer.model) == v + 3  # and an adapter goes on top of that base again
    assert served(client, trainer) == (tokens, v + 3)


def test_adapter_pushes_serve_the_trainers_peft_output(client, trainer):
    check_adapter_pushes_serve_the_peft_output(client, trainer)


def test_full_sync_drops_the_adapter(client, trainer):
    check_full_sync_drops_the_adapter(client, trainer)


def check_adapter_config_change_serves_the_new_config(client, model_dir) -> None:
    """Another rank, alpha, rsLoRA, target set and per-module patterns (a new run on the same
    server): served as PEFT computes it."""
    other = LoraTrainer(model_dir, r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 5})
    tokens, v = served(client, other)
    expected = other.perturb_until_changed(21, tokens)
    assert client.push_adapter(other.model) == v + 1
    assert served(client, other) == (expected, v + 1)


def test_adapter_config_change_serves_the_new_config(client, tiny_vlm):
    check_adapter_config_change_serves_the_new_config(client, tiny_vlm)


def check_adapter_traffic_during_syncs(client, trainer, loaded=None) -> None:
    """Generate traffic from three threads while three adapter versions land: no answer fails, and each is,
    token for token, the PEFT output of the version it is tagged with (a request admitted before a commit
    finishes on the adapter it started with). `loaded()`: the adapter versions the server holds; once the
    traffic is done, only the newest: every older one was retired when its last request finished."""
    expected = {}
    tokens, v = served(client, trainer)
    expected[v] = tokens
    stop = threading.Event()
    answers, errors = [], []

    def traffic():
        with AlignClient(client.base_urls[0], api_key=KEY, max_retries=0) as c:
            while not stop.is_set():
                try:
                    out = c.generate(prompt_ids=[trainer.prompt_ids] * 2, images=[trainer.images] * 2,
                                     temperature=0.0, max_tokens=MAX_TOKENS)
                except Exception as exc:  # noqa: BLE001 - every failure is a test failure, collected
                    errors.append(exc)
                    continue
                answers.append((out.weight_version, [r.completions[0].token_ids for r in out.results]))

    def seen(version: int) -> bool:
        return bool(errors) or sum(1 for tagged, _ in list(answers) if tagged == version) >= 2

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(traffic) for _ in range(3)]
        try:
            wait_for(lambda: seen(v), f"2 answers at version {v}", timeout=300)
            for seed in (51, 52, 53):
                new_tokens = trainer.perturb_until_changed(seed, expected[max(expected)])
                pushed = client.push_adapter(trainer.model, transport="shm")
                expected[pushed] = new_tokens
                wait_for(lambda pushed=pushed: seen(pushed), f"2 answers at version {pushed}", timeout=300)
        finally:
            stop.set()
            for f in futures:
                f.result()
    assert not errors, errors[:3]
    assert sorted(expected) == list(range(v, v + 4))
    for tagged, rows in answers:
        assert all(row == expected[tagged] for row in rows), f"version {tagged} answered with another adapter"
    assert {tagged for tagged, _ in answers} == set(expected)  # the traffic spanned every sync
    if loaded is not None:
        assert loaded() == [v + 3]


# ---- refusals: a 4xx naming the tensor or feature, and the old adapter still serving ----------------

def _rename(specs, i, name):
    return [*specs[:i], dict(specs[i], name=name), *specs[i + 1:]]


def test_each_unsupported_adapter_gets_a_4xx_and_the_old_adapter_keeps_serving(server, client, trainer):
    check_unsupported_adapters_refused(server.url, client, trainer)


def check_unsupported_adapters_refused(url: str, client, trainer) -> None:
    """Each adapter the server cannot serve as PEFT does gets a 4xx naming the field; the old adapter serves on."""
    tokens, v = served(client, trainer)
    a_name = adapter_weights(trainer.model)[0][0][0]  # base_model.model.<module>.lora_A.weight
    refused(init_adapter(url, trainer, {"use_dora": True}), 422, "adapter.use_dora", "DoRA")
    refused(init_adapter(url, trainer, {"bias": "lora_only"}), 422, "adapter.bias", "LoRA bias")
    refused(init_adapter(url, trainer, {"modules_to_save": ["lm_head"]}), 422, "adapter.modules_to_save",
            "modules_to_save")
    refused(init_adapter(url, trainer, {"r": 32}, tensors=lambda s: s), 422, "adapter.r", "--max-lora-rank 8")
    refused(init_adapter(url, trainer, tensors=lambda s: _rename(s, 0, a_name.replace("lora_A", "lora_magnitude_vector")
                                                                 .removesuffix(".weight"))),
            422, "tensors[0].name", "DoRA")
    refused(init_adapter(url, trainer, tensors=lambda s: _rename(s, 1, a_name.replace("lora_A.weight", "lora_B.bias"))),
            422, "tensors[1].name", "LoRA bias")
    refused(init_adapter(url, trainer, tensors=lambda s: _rename(s, 0, "base_model.model.lm_head.modules_to_save.weight")),
            422, "tensors[0].name", "modules_to_save")
    # The raw parameter names (with the adapter name) are not PEFT's saved names.
    refused(init_adapter(url, trainer, tensors=lambda s: _rename(s, 0, a_name.replace("lora_A.", "lora_A.default."))),
            422, "tensors[0].name", "get_peft_model_state_dict")
    # A module the served model lacks (vLLM would drop it without a word), the vision tower, lm_head.
    refused(init_adapter(url, trainer, tensors=lambda s: _rename(s, 0, a_name.replace("layers.0.", "layers.99."))),
            422, "tensors[0].name", "not a linear layer of the served model")
    vision = "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight"
    refused(init_adapter(url, trainer, tensors=lambda s: _rename(s, 0, vision)), 422, "tensors[0].name",
            "vision tower")
    refused(init_adapter(url, trainer, tensors=lambda s: _rename(s, 0, "base_model.model.lm_head.lora_A.weight")),
            422, "tensors[0].name", "not a linear layer of the language model")
    refused(init_adapter(url, trainer, tensors=lambda s: [dict(s[0], shape=s[0]["shape"][::-1]), *s[1:]]),
            422, "tensors[0].shape", "needs")
    refused(init_adapter(url, trainer, tensors=lambda s: s[1:]), 422, "tensors", "no lora_A tensor")
    assert served(client, trainer) == (tokens, v)
    assert version(client) == v


def test_vision_tower_targets_are_refused_even_under_language_model_names(tmp_path):
    """Qwen2.5-VL's vision MLP is gate_proj/up_proj/down_proj too: a PEFT config targeting
    `gate_proj` adapts it, and those tensors must be refused, the language model's accepted."""
    from protocol import LoraAdapter, TensorSpec

    targets, others = lora_targets(str(build(tmp_path / "qwen2_5_vl", "qwen2_5_vl", seed=0)))
    lm = next(m for m in targets if m.endswith("mlp.gate_proj"))
    vision = next(m for m in others if m.endswith("mlp.gate_proj"))
    assert ".visual." in f".{vision}" and ".visual." not in f".{lm}"
    adapter = LoraAdapter(r=4, lora_alpha=8, target_modules=["gate_proj"])

    def specs(module):
        out, inp = targets.get(module) or (8, 8)
        return [TensorSpec(name=f"base_model.model.{module}.lora_A.weight", dtype="float32", shape=[4, inp]),
                TensorSpec(name=f"base_model.model.{module}.lora_B.weight", dtype="float32", shape=[out, 4])]

    check_adapter(adapter, specs(lm), targets, others, max_rank=8)
    with pytest.raises(AdapterRefused, match="vision tower") as info:
        check_adapter(adapter, specs(vision), targets, others, max_rank=8)
    assert info.value.field == "tensors[0].name"


# ---- a killed sender ---------------------------------------------------------------------------------

ADAPTER_SENDER = """
import sys, time, torch
from tests.test_lora import LoraTrainer
from trainer_client import AlignClient
url, key, model_dir, transport, bucket_bytes = sys.argv[1:6]
trainer = LoraTrainer(model_dir)
trainer.perturb(999)
def stall(sent, total):
    print("SENT", sent, total, flush=True)
    time.sleep(3600)
AlignClient(url, api_key=key).push_adapter(trainer.model, transport=transport, bucket_bytes=int(bucket_bytes),
                                           session_timeout_s=3.0, progress=stall)
"""


def check_killed_adapter_sender_leaves_the_old_adapter_serving(server, client, trainer, model_dir) -> None:
    tokens, v = served(client, trainer)
    proc = subprocess.Popen([sys.executable, "-c", ADAPTER_SENDER, server.url, KEY, str(model_dir), "http",
                             str(ADAPTER_BUCKET)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        output = []
        while not (output and output[-1].startswith("SENT")):
            output.append(proc.stdout.readline())
            assert output[-1], "the sender exited before its first bucket:\n" + "".join(output)
        sent, total = map(int, output[-1].split()[1:])
        assert 0 < sent < total  # killed with buckets still to come
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert served(client, trainer) == (tokens, v)  # the old adapter, never a mixed one
    # Once the dead sender's session idles out (3 s), the next adapter push gets through.
    expected = trainer.perturb_until_changed(31, tokens)

    def pushed():
        try:
            return client.push_adapter(trainer.model, transport="http", bucket_bytes=ADAPTER_BUCKET)
        except AlignServerError as exc:
            assert exc.status == 409, exc
            return None

    assert wait_for(pushed, "the dead sender's sync to idle out", timeout=60, poll=0.3) == v + 1
    assert served(client, trainer) == (expected, v + 1)


@pytest.mark.fault
def test_killed_adapter_sender_leaves_the_old_adapter_serving(server, client, trainer, tiny_vlm):
    check_killed_adapter_sender_leaves_the_old_adapter_serving(server, client, trainer, tiny_vlm)


# ---- align-train: a GRPO run that pushes its adapter ------------------------------------------------

def run_grpo_with_adapter_sync(server, client, model_dir, data, out, *flags):
    """Two GRPO steps with `--use_peft --lora_sync adapter`: the base weights and the adapter at
    the start, then one adapter per step; the server ends up answering as the trained PEFT model, and
    its logprobs are the PEFT model's (without LoRA dropout, which the trainer's forward would apply and
    the server never does: it would show as mismatch from the second step)."""
    from tests.test_train import REWARDS, check_servers_answer_as_the_merged_adapter, train

    v = version(client)
    trainer = train("grpo", model_dir, data / "grpo.jsonl", out, "--max_steps", "2", "--learning_rate", "0.5",
                    "--vllm-mode", "server", "--server-url", server.url, "--api_key", KEY,
                    "--steps_per_generation", "1", "--use_peft", "--lora_r", "4", "--lora_target_modules", *TARGETS,
                    "--lora_dropout", "0", "--lora_sync", "adapter", *flags, *REWARDS)
    assert trainer.state.global_step == 2
    assert version(client) == v + 4  # base, adapter, then one adapter per step (merged would be v + 3)
    assert_rollouts_match(trainer.state.log_history)
    check_servers_answer_as_the_merged_adapter(trainer, server, api_key=KEY)
    return trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from examples.demo import make_dataset

    root = tmp_path_factory.mktemp("colour-data")
    make_dataset(root, 16, seed=0, method="grpo")
    return root


@pytest.mark.parametrize("flags", [[], ["--async_rollouts"]], ids=["sync", "async"])
def test_grpo_run_pushes_its_adapter(flags, server, client, tiny_vlm, data, tmp_path):
    run_grpo_with_adapter_sync(server, client, tiny_vlm, data, tmp_path / "out", *flags)


def test_lora_dropout_is_said_once_since_the_server_applies_none(server, tiny_vlm, data, tmp_path, caplog):
    from tests.test_train import REWARDS, SMALL
    from trainer_client.config import parse_args
    from trainer_client.trainers import build_trainer

    caplog.set_level("WARNING", logger="trainer_client.weight_pusher")
    method, align, config, model_args = parse_args([
        "grpo", "--model", str(tiny_vlm), "--dataset", str(data / "grpo.jsonl"), "--output_dir", str(tmp_path),
        *SMALL, "--num_generations", "4", "--vllm-mode", "server", "--server-url", server.url, "--api_key", KEY,
        "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--lora_sync", "adapter", *REWARDS])
    from trl import get_peft_config

    build_trainer(method, align, config, peft_config=get_peft_config(model_args))
    # TRL's default lora_dropout is 0.05: said once, since the server applies none.
    assert sum("the server applies none" in r.getMessage() for r in caplog.records) == 1


def test_lora_sync_adapter_needs_a_server_with_enable_lora(tiny_vlm, data, tmp_path, log_dir):
    from tests.test_train import REWARDS, train

    plain = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir).wait_ready()
    try:
        with pytest.raises(SystemExit, match="--enable-lora"):
            train("grpo", tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--max_steps", "1", "--vllm-mode",
                  "server", "--server-url", plain.url, "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
                  "--lora_sync", "adapter", *REWARDS)
        # and the adapter init itself is refused, naming the flag
        r = httpx.post(f"{plain.url}/v1/weights/init", json={
            "transport": "http", "buckets": [64], "adapter": {"r": 4, "lora_alpha": 8, "target_modules": "q_proj"},
            "tensors": [{"name": "base_model.model.x.lora_A.weight", "dtype": "float32", "shape": [4, 4],
                         "bucket": 0, "offset": 0}]})
        refused(r, 400, "adapter", "--enable-lora")
    finally:
        plain.stop()


def test_lora_sync_flag_takes_auto_adapter_or_merged():
    from trainer_client.config import parse_args

    base = ["grpo", "--model", "m", "--dataset", "d.jsonl", "--use_peft"]
    assert parse_args(base)[1].lora_sync == "auto"
    assert parse_args([*base, "--lora_sync", "merged"])[1].lora_sync == "merged"
    with pytest.raises(SystemExit):
        parse_args([*base, "--lora_sync", "adaptor"])
