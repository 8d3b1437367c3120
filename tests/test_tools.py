"""`align-train grpo --tools`: the tool loop with a tool that returns an image, on a tiny Qwen3-VL
taught to call it twice and then answer (tests/tool_model.py). Locally (`--vllm-mode none`, TRL's
loop) and through a real align-serve (each engine; our loop, each trajectory on its own), synchronous
and with --async_rollouts, where every trained sample is checked token for token against what the
server sampled plus the tool suffixes, recorded as the run went."""

import ast
import asyncio
import functools
import importlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from trl import GRPOTrainer

from runtime.torchvision_compat import load_processor
from tests.tool_model import ANSWER, IMAGE_SEED, QUESTION, ZOOMED_SEED, ZoomEnvironment, zoom
from tests.utils import ServerProcess, assert_rollouts_match, random_image
from trainer_client.cli import run
from trainer_client.client import AlignClient, collapse_image_runs
from trainer_client.config import parse_args
from trainer_client.generation import ServerGeneration
from trainer_client.sampler import Sampler
from trainer_client.trainers import build_trainer

TOOLS = ["--tools", "tests.tool_model:zoom"]
# One prompt, two samples, two steps; a low temperature keeps the tiny model on its trajectory
# (3 model turns: 64 + 64 + 2 tokens, 2 tool turns of 59 tokens each, an image in each).
FLAGS = ["--per_device_train_batch_size", "2", "--num_generations", "2", "--max_steps", "2",
         "--max_completion_length", "260", "--learning_rate", "1e-7", "--temperature", "0.1",
         "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
         "--logging_steps", "1"]
PROMPT_TOKENS = 546  # the question with its image expanded and the tool's schema
MAX_MODEL_LEN = 800  # the server's: the third turn's prompt (792 tokens) leaves 8 tokens


@pytest.fixture(scope="module")
def two_call_vlm(tmp_path_factory) -> Path:
    from tests.tool_model import build_calling_model

    return build_calling_model(tmp_path_factory.mktemp("two_call_qwen3_vl"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tool-data")
    random_image(IMAGE_SEED).save(root / "q.png")
    # (zoom_seed: the image tests.tool_model:ZoomEnvironment's zoom returns)
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
           "image": "q.png", "solution": ANSWER, "zoom_seed": ZOOMED_SEED}
    (root / "grpo.jsonl").write_text(json.dumps(row) + "\n")
    return root / "grpo.jsonl"


def train(model, dataset, out, *flags, tools=TOOLS, rewards=("accuracy",)):
    return run(["grpo", "--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), *FLAGS, *tools,
                "--reward_funcs", *rewards, *flags])


def undocumented(x):
    return x


class NoReset:
    def look(self, x: int) -> int:
        """Look.

        Args:
            x: where
        """
        return x


@pytest.mark.parametrize("flags, message", [
    (["--tools", "nowhere"], r"--tools 'nowhere': give it as module:name"),
    (["--tools", "tests.test_tools:missing"], r"--tools 'tests.test_tools:missing' cannot be loaded"),
    (["--tools", "tests.test_tools:undocumented"], r"--tools 'tests.test_tools:undocumented': .*type hints"),
    (["--environment", "tests.test_tools:NoReset"], r"--environment .*needs a reset\(self, \*\*row\) method"),
])
def test_bad_tools_fail_at_start_in_one_line(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=message) as exc:
        run(["grpo", "--model", str(tmp_path), "--dataset", str(tmp_path / "d.jsonl"), *flags])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("flags, message", [
    (["--max_tool_calling_iterations", "0", *TOOLS], r"--max_tool_calling_iterations must be >= 1 \(got 0\)"),
    (["--max_tool_calling_iterations", "2"], r"needs --tools or --environment"),
    (["--tool_workers", "0", *TOOLS], r"--tool_workers must be >= 1 \(got 0\)"),
    (["--tool-timeout", "0", *TOOLS], r"--tool_timeout must be above 0 seconds \(got 0\)"),
    (["--tool_timeout", "5"], r"--tool_timeout needs --tools or --environment"),
    (["--tool_workers", "8", *TOOLS], r"--tool_workers applies to --vllm-mode server \(got none\)"),
])
def test_tool_flag_values_refused(flags, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(["grpo", "--model", "m", "--dataset", "d", *flags])


def test_a_template_without_tools_is_refused_before_loading(tiny_vlm, data, tmp_path):
    with pytest.raises(SystemExit, match=r"chat template of .* cannot render tool calls"):
        train(tiny_vlm, data, tmp_path / "out")


@pytest.fixture()
def trained_batches(monkeypatch) -> list[dict]:
    """What TRL's `_generate` hands the loss, per batch: the ids, tool masks, logprobs and images."""
    batches = []
    generate = GRPOTrainer._generate

    def recorded(self, prompts):
        out = generate(self, prompts)
        prompt_ids, completion_ids, tool_mask, completions, logprobs, _, images, _ = out
        generation = getattr(self, "vllm_generation", None)
        batches.append(dict(prompt_ids=prompt_ids, completion_ids=completion_ids, tool_mask=tool_mask,
                            completions=completions, logprobs=logprobs, images=images,
                            image_token_id=self.processing_class.image_token_id,
                            # async rollouts: each sample's turn versions, and the trainer's own version
                            turn_versions=[list(v) for v in getattr(generation, "turn_versions", [])],
                            policy_version=getattr(generation, "policy_version", None)))
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate", recorded)
    return batches


def check_trajectories(batch: dict) -> None:
    """Three model turns, two tool turns with an image each, the answer last; as many image runs
    in each trained sequence as images reach its forward."""
    for i, completion in enumerate(batch["completions"]):
        roles = [m["role"] for m in completion]
        assert roles == ["assistant", "tool", "assistant", "tool", "assistant"], roles
        assert completion[-1]["content"] == ANSWER
        ids = batch["prompt_ids"][i] + batch["completion_ids"][i]
        runs = collapse_image_runs(ids, batch["image_token_id"]).count(batch["image_token_id"])
        assert runs == len(batch["images"][i]) == 3
        assert batch["tool_mask"][i].count(0) == 2 * 59


def metric(trainer, name: str) -> list[float]:
    return [h[name] for h in trainer.state.log_history if name in h]


def test_two_tool_turns_with_images_train_locally(two_call_vlm, data, tmp_path, trained_batches):
    trainer = train(two_call_vlm, data, tmp_path / "out")
    assert trainer.state.global_step == 2
    assert len(trained_batches) == 2
    for batch in trained_batches:
        check_trajectories(batch)
    assert metric(trainer, "tools/turns_per_trajectory") == [3.0, 3.0]
    assert metric(trainer, "tools/calls_per_sample") == [2.0, 2.0]
    assert metric(trainer, "tools/tool_tokens") == [118.0, 118.0]
    assert metric(trainer, "tools/model_tokens") == [130.0, 130.0]
    assert metric(trainer, "tools/failure_frequency") == [0.0, 0.0]


@pytest.fixture(scope="module")
def transformers_server(two_call_vlm, log_dir):
    """One transformers-engine server for the module; --enable-lora takes the LoRA test's adapter syncs
    (a full sync, which every other run starts with, drops the adapter again)."""
    proc = ServerProcess(two_call_vlm, "transformers", log_dir=log_dir,
                         extra=["--max-model-len", str(MAX_MODEL_LEN), "--enable-lora", "--max-lora-rank", "8"])
    yield proc.wait_ready(600)
    proc.stop()


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request, two_call_vlm, log_dir):
    if request.param == "transformers":
        yield request.getfixturevalue("transformers_server")
        return
    proc = ServerProcess(two_call_vlm, request.param, extra=["--max-model-len", str(MAX_MODEL_LEN)],
                         log_dir=log_dir).wait_ready(600)
    yield proc
    proc.stop()


def version(server) -> int:
    return AlignClient(server.url).info(refresh=True).weight_version


@pytest.fixture()
def server_trace(monkeypatch) -> dict:
    """What the server was asked and answered: per batch (a ServerGeneration.generate call: its first turns
    and every later turn of its trajectories, whichever thread asked) each ask's prompts (expanded, one
    per completion) and the sampled ids and logprobs; per request its max_tokens and prompts as sent."""
    trace = {"batches": [], "asked": []}
    generate, sample, client_generate = ServerGeneration.generate, Sampler.sample, AlignClient.generate

    def batch(self, *args, **kwargs):
        trace["batches"].append([])
        return generate(self, *args, **kwargs)

    def recorded(self, prompts, images, used, params, check, empty_version):
        out = sample(self, prompts, images, used, params, check, empty_version)
        trace["batches"][-1].append(dict(prompts=[list(p) for p in prompts for _ in range(params["n"])],
                                         sampled=[list(c.token_ids) for c in out],
                                         logprobs=[[[lp] for lp in c.logprobs] for c in out]))
        return out

    def client_recorded(self, *args, **kwargs):
        answer = client_generate(self, *args, **kwargs)
        trace["asked"].append((kwargs["max_tokens"], [r.prompt_ids for r in answer.results]))
        return answer

    monkeypatch.setattr(ServerGeneration, "generate", batch)
    monkeypatch.setattr(Sampler, "sample", recorded)
    monkeypatch.setattr(AlignClient, "generate", client_recorded)
    return trace


def check_two_batches_exactly(trained_batches, batches, asked) -> None:
    """Two trained batches of three-turn trajectories, each sample against its batch's sampled turns."""
    for batch, batch_turns in zip(trained_batches, batches, strict=True):
        check_trajectories(batch)
        for i in range(len(batch["completion_ids"])):
            check_sampled_exactly(batch["prompt_ids"][i], batch["completion_ids"][i], batch["tool_mask"][i],
                                  batch["logprobs"][i], batch_turns, batch["image_token_id"], asked)


def check_sampled_exactly(prompt_ids, completion_ids, tool_mask, logprobs, turns, image_token, asked) -> None:
    """One trained sample against the server's turns: its completion is, token for token, what the server
    sampled turn after turn plus the tool suffixes between (mask 0), with the server's logprobs.
    `asked`: the server's requests (None: vLLM in this process, which takes the expanded runs)."""
    trained = prompt_ids + completion_ids
    # This sample's turns: those whose prompt + sampled ids start its trained sequence.
    chain = [(p, s, lp) for t in turns for p, s, lp in zip(t["prompts"], t["sampled"], t["logprobs"], strict=True)
             if trained[: len(p) + len(s)] == p + s]
    # (the samples of a group, and of a batch generated again, may be identical: one copy of each turn)
    chain = sorted({tuple(p + s): (p, s, lp) for p, s, lp in chain}.values(), key=lambda c: len(c[0]))
    assert len(chain) == 3
    ids, mask, expected_logprobs = [], [], []
    for k, (prompt, sampled, lps) in enumerate(chain):
        assert prompt[: len(prompt_ids)] == prompt_ids
        suffix = chain[k + 1][0][len(prompt) + len(sampled):] if k + 1 < len(chain) else []
        ids += sampled + suffix
        mask += [1] * len(sampled) + [0] * len(suffix)
        expected_logprobs += [lp[0] for lp in lps] + [0.0] * len(suffix)
    assert completion_ids == ids  # token for token: sampled + tool suffixes, nothing re-rendered
    assert tool_mask == mask
    assert logprobs == pytest.approx(expected_logprobs)
    assert trained[-2:] == chain[-1][1] and len(chain[-1][1]) == 2  # the answer fit in the last 8 tokens
    if asked is None:
        return
    # The server was given one placeholder per image, our expanded runs collapsed; each turn asked for
    # what its trajectory had left (TURN_MAX_TOKENS).
    sent = [(max_tokens, ids) for max_tokens, prompts in asked for ids in prompts]
    for (prompt, _, _), max_tokens in zip(chain, TURN_MAX_TOKENS, strict=True):
        assert (max_tokens, collapse_image_runs(prompt, image_token)) in sent


# Each turn asks for the least of what is left of max_completion_length (260, then 260 - 123, then
# 260 - 246) and of the server's max_model_len (its prompts: 546, 669 and 792 tokens): never refused.
TURN_MAX_TOKENS = [MAX_MODEL_LEN - PROMPT_TOKENS, MAX_MODEL_LEN - 669, MAX_MODEL_LEN - 792]


def requests_per_batch(batches: int) -> dict[int, int]:
    """The requests of `batches` batches of 2 two-call trajectories by max_tokens: one for a batch's first
    turns (n=2), then one per trajectory and turn, each asked as soon as its tool answered."""
    return {TURN_MAX_TOKENS[0]: batches, TURN_MAX_TOKENS[1]: 2 * batches, TURN_MAX_TOKENS[2]: 2 * batches}


def test_server_mode_trains_on_exactly_what_the_server_sampled(two_call_vlm, data, tmp_path, server, server_trace,
                                                               trained_batches):
    v = version(server)
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url", server.url)
    assert trainer.state.global_step == 2 and len(trained_batches) == 2
    # (first the step-0 parity check's two one-token probes of the first prompt: as messages, as ids)
    assert Counter(a[0] for a in server_trace["asked"]) == {1: 2, **requests_per_batch(2)}

    check_two_batches_exactly(trained_batches, server_trace["batches"], server_trace["asked"])
    # The last batch: every turn from the weights pushed for step 1 (the start push made v + 1).
    assert trainer.vllm_generation.turn_versions == [[v + 2] * 3] * 2
    assert metric(trainer, "weight_version_oldest_turn") == [v + 1.0, v + 2.0]
    assert metric(trainer, "tools/turns_per_trajectory") == [3.0, 3.0]
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2  # over the model's turns, not the tools'


@pytest.fixture()
def sampled_turns(monkeypatch) -> list[tuple[str, list]]:
    """Every turn the server sampled, whichever thread asked: (thread name, [(prompt ids, sampled ids,
    logprobs) per completion])."""
    calls = []
    sample = Sampler.sample

    def recorded(self, prompts, images, used, params, check, empty_version):
        out = sample(self, prompts, images, used, params, check, empty_version)
        repeated = [p for p in prompts for _ in range(params["n"])]
        calls.append((threading.current_thread().name,
                      [(list(p), list(c.token_ids), list(c.logprobs)) for p, c in zip(repeated, out, strict=True)]))
        return out

    monkeypatch.setattr(Sampler, "sample", recorded)
    return calls


def check_token_exact(batch: dict, turns: list[tuple[list, list, list]], expected_turns: int = 3) -> None:
    """Each trained sample is its prompt, then model turns exactly as the server sampled them (with their
    logprobs) and between them the tool turns' suffix ids, each the next turn's prompt as asked (mask 0)."""
    for i, prompt in enumerate(batch["prompt_ids"]):
        trained, logprobs = prompt + batch["completion_ids"][i], batch["logprobs"][i]
        at, mask, model_turns = len(prompt), [], 0
        while at < len(trained):
            # The turn asked with the trajectory so far (plus a tool suffix) that sampled what follows.
            found = [(p, s, lp) for p, s, lp in turns
                     if s and len(p) >= at and (model_turns or len(p) == at) and trained[: len(p) + len(s)] == p + s]
            assert found, f"sample {i}: no turn the server sampled continues it at token {at}"
            start = min(len(p) for p, _, _ in found)
            found = [(p, s, lp) for p, s, lp in found if len(p) == start]
            p, s, _ = found[0]
            got = logprobs[len(p) - len(prompt): len(p) + len(s) - len(prompt)]
            assert any(got == pytest.approx(lp) for _, _, lp in found)  # the sampled logprobs feed the IS ratio
            assert logprobs[at - len(prompt): len(p) - len(prompt)] == [0.0] * (len(p) - at)
            mask += [0] * (len(p) - at) + [1] * len(s)
            at, model_turns = len(p) + len(s), model_turns + 1
        assert model_turns == expected_turns
        assert batch["tool_mask"][i] == mask


def test_async_rollouts_run_the_tool_turns_in_the_worker(two_call_vlm, data, tmp_path, server, trained_batches,
                                                         sampled_turns):
    """With --async_rollouts only the first batch's turns are asked for the training thread; later batches
    arrive with every turn done (in the rollout worker), token-exact, none older than --max_staleness."""
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url", server.url,
                    "--async_rollouts", "--max_staleness", "1", "--max_steps", "3")
    assert trainer.state.global_step == 3 and len(trained_batches) == 3
    threads = [name for name, _ in sampled_turns]
    # the first batch's first turns, then 2 more per trajectory; never a turn of a later batch
    assert sum(name.startswith("MainThread") for name in threads) == 5
    assert sum(name.startswith("align-rollouts") for name in threads) >= 10  # batches 2 and 3, every turn
    turns = [t for _, ts in sampled_turns for t in ts]
    for batch in trained_batches:
        check_trajectories(batch)
        check_token_exact(batch, turns)
    # Per trajectory, its oldest turn against the trainer's version when it was trained on: the first
    # batch is generated on the newest weights, the next ones while the step before them trained.
    lag = [[batch["policy_version"] - min(v) for v in batch["turn_versions"]] for batch in trained_batches]
    assert lag == [[0, 0], [1, 1], [1, 1]]
    assert all(len(v) == 3 for batch in trained_batches for v in batch["turn_versions"])
    assert metric(trainer, "async/prefetch_hits") == [0.0, 1.0, 1.0]
    assert metric(trainer, "async/staleness_max") == [0.0, 1.0, 1.0]
    assert metric(trainer, "tools/calls_per_sample") == [2.0, 2.0, 2.0]
    assert metric(trainer, "tools/call_frequency") == [2.0, 2.0, 2.0]
    assert metric(trainer, "tools/tool_tokens") == [118.0, 118.0, 118.0]
    assert [e["step"] for e in assert_rollouts_match(trainer.state.log_history)] == [1]


def test_a_tool_trajectory_older_than_max_staleness_is_generated_again(two_call_vlm, data, tmp_path, server):
    """A read-ahead batch whose trajectories sat while the server moved two versions on is dropped and
    generated again, every turn on the newest weights."""
    method, align, config, _ = parse_args(["grpo", "--model", str(two_call_vlm), "--dataset", str(data),
                                           "--output_dir", str(tmp_path / "out"), *FLAGS, *TOOLS, "--vllm-mode",
                                           "server", "--server-url", server.url, "--async_rollouts"])
    rollouts = build_trainer(method, align, config).vllm_generation
    rows = list(next(iter(rollouts.trainer.get_train_dataloader())))[::2]
    request = rollouts.prepare(rows, 2)
    rollouts.push_at_start()
    start = rollouts.policy_version
    rollouts.launch(request)
    assert [[r.versions for r in group] for group in request.future.result()] == [[[start] * 3] * 2]
    for _ in range(2):
        rollouts.client.push_weights(rollouts.trainer.model)
    rollouts.policy_version = start + 2
    _, _, versions, stats, trajectories = rollouts.collect(request.prompt_ids, request.images, 2)
    assert stats == {"staleness_max": 0.0, "stale_groups_dropped": 1.0, "prefetch_hits": 1.0, "prefetch_misses": 0.0,
                     "policy_version": float(start + 2)}
    assert versions == [start + 2] * 2 and [r.versions for r in trajectories] == [[start + 2] * 3] * 2
    assert [[m["role"] for m in r.messages] for r in trajectories] == [["assistant", "tool"] * 2 + ["assistant"]] * 2
    assert [r.calls for r in trajectories] == [2, 2] and [r.failures for r in trajectories] == [0, 0]
    rollouts.close()


_RESTART: list = []  # (model, server, log_dir): the server `zoom_restarting` restarts at its next call
_RESTARTED: list = []  # the server it started again


@functools.wraps(zoom)  # the same name and schema: the tiny model calls it as it learned to
def zoom_restarting(factor: int) -> list:
    if _RESTART:
        model, server, log_dir = _RESTART.pop()
        server.kill()
        _RESTARTED.append(ServerProcess(model, "transformers", extra=["--max-model-len", str(MAX_MODEL_LEN)],
                                        log_dir=log_dir, port=server.port).wait_ready(600))
    return zoom(factor)


@pytest.mark.fault
def test_a_server_restart_mid_trajectory_drops_the_batch_and_generates_it_again(two_call_vlm, data, tmp_path,
                                                                                 log_dir):
    """The rollout worker's first tool call restarts the server (SIGKILL, then a new instance serving its
    start checkpoint): the next turn's answer is refused, the trainer's weights are pushed to the new
    instance, and the batch is generated again, every turn, from those weights."""
    server = ServerProcess(two_call_vlm, "transformers", extra=["--max-model-len", str(MAX_MODEL_LEN)],
                           log_dir=log_dir).wait_ready(600)
    try:
        method, align, config, _ = parse_args(["grpo", "--model", str(two_call_vlm), "--dataset", str(data),
                                               "--output_dir", str(tmp_path / "out"), *FLAGS, "--tools",
                                               "tests.test_tools:zoom_restarting", "--vllm-mode", "server",
                                               "--server-url", server.url, "--async_rollouts"])
        rollouts = build_trainer(method, align, config).vllm_generation
        request = rollouts.prepare(list(next(iter(rollouts.trainer.get_train_dataloader())))[::2], 2)
        rollouts.push_at_start()
        start = rollouts.policy_version
        tool = importlib.import_module("tests.test_tools")  # as --tools loaded it (pytest names this file apart)
        tool._RESTART.append((two_call_vlm, server, log_dir))
        rollouts.launch(request)
        _, _, versions, stats, trajectories = rollouts.collect(request.prompt_ids, request.images, 2)
        server = tool._RESTARTED.pop()
        assert rollouts.restarts == 1
        assert AlignClient(server.url).info(refresh=True).weight_version == 1  # the new instance got our weights
        # Counted in the trainer's sequence: the push to the new instance holds the same weights, version start.
        assert versions == [start] * 2 and [r.versions for r in trajectories] == [[start] * 3] * 2
        assert [r.calls for r in trajectories] == [2, 2] and stats["staleness_max"] == 0
        rollouts.close()
    finally:
        tool = importlib.import_module("tests.test_tools")
        tool._RESTART.clear()
        for proc in [server, *tool._RESTARTED]:
            proc.stop()
        tool._RESTARTED.clear()


@pytest.mark.fault
def test_a_server_restart_mid_trajectory_in_synchronous_mode_asks_the_refused_turns_again(two_call_vlm, data,
                                                                                      tmp_path, log_dir):
    """Synchronous server mode: the first tool call restarts the server; the turns its new instance answers
    before the trainer pushed to it are refused, the weights are pushed again (once), and each refused turn
    is asked again: every trajectory ends as taught, from the weights pushed for the step."""
    server = ServerProcess(two_call_vlm, "transformers", extra=["--max-model-len", str(MAX_MODEL_LEN)],
                           log_dir=log_dir).wait_ready(600)
    tool = importlib.import_module("tests.test_tools")  # as --tools loads it (pytest names this file apart)
    try:
        tool._RESTART.append((two_call_vlm, server, log_dir))
        trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url", server.url,
                        "--max_steps", "1", tools=["--tools", "tests.test_tools:zoom_restarting"])
        server = tool._RESTARTED.pop()
        # the new instance: the push after a refused turn, then the step's
        assert AlignClient(server.url).info(refresh=True).weight_version == 2
        assert metric(trainer, "tools/turns_per_trajectory") == [3.0]
        assert metric(trainer, "tools/failure_frequency") == [0.0]
        assert metric(trainer, "reward") == [1.0]  # both answered as taught
    finally:
        tool._RESTART.clear()
        for proc in [server, *tool._RESTARTED]:
            proc.stop()
        tool._RESTARTED.clear()


# ---- --environment, and tools with --dynamic_sampling -------------------------------------------------
ENVIRONMENT = ["--environment", "tests.tool_model:ZoomEnvironment"]


def check_environment_images(batch: dict) -> None:
    """The tool images that reach the forward are the environment's, the one its row named."""
    for images in batch["images"]:
        assert [im.tobytes() for im in images[1:]] == [random_image(ZOOMED_SEED).tobytes()] * 2


def test_an_environment_trains_locally(two_call_vlm, data, tmp_path, trained_batches):
    trainer = train(two_call_vlm, data, tmp_path / "out", tools=ENVIRONMENT)
    assert trainer.state.global_step == 2 and len(trained_batches) == 2
    for batch in trained_batches:
        check_trajectories(batch)
        check_environment_images(batch)
    # The environment's own reward (get_reward: its calls): one instance per rollout, reset each batch,
    # so 2 calls each (one shared instance would count 4, one never reset 4 then 8).
    assert metric(trainer, "rewards/ZoomEnvironment/mean") == [2.0, 2.0]
    assert metric(trainer, "tools/calls_per_sample") == [2.0, 2.0]


class ObservedZoom(ZoomEnvironment):
    """ZoomEnvironment whose reset returns an observation, which TRL appends to the prompt's last message."""

    def reset(self, **row) -> str:
        super().reset(**row)
        return f" Picture {row['zoom_seed']}."


def test_an_environment_with_async_rollouts(two_call_vlm, data, tmp_path, transformers_server, trained_batches,
                                            sampled_turns):
    """The worker runs later batches' tool turns on its own instances (reset with the rows read ahead), and
    the rewards score those: the environment's get_reward counts its own rollout's 2 calls. TRL's pool ran
    the first batch (not read ahead) and was reset for it alone: not again for the rows read ahead."""
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url",
                    transformers_server.url, "--async_rollouts", "--max_staleness", "1", "--max_steps", "3",
                    tools=ENVIRONMENT)
    assert trainer.state.global_step == 3 and len(trained_batches) == 3
    threads = [name for name, _ in sampled_turns]
    # the first batch's first turns and 2 more per trajectory; batches 2 and 3: the worker's
    assert sum(name.startswith("MainThread") for name in threads) == 5
    assert sum(name.startswith("align-rollouts") for name in threads) >= 10
    turns = [t for _, ts in sampled_turns for t in ts]
    for batch in trained_batches:
        check_trajectories(batch)
        check_environment_images(batch)
        check_token_exact(batch, turns)  # the prompt the trainer trains on is the one the worker generated from
    lag = [[batch["policy_version"] - min(v) for v in batch["turn_versions"]] for batch in trained_batches]
    assert lag == [[0, 0], [1, 1], [1, 1]]
    assert metric(trainer, "async/prefetch_hits") == [0.0, 1.0, 1.0]
    assert metric(trainer, "rewards/ZoomEnvironment/mean") == [2.0, 2.0, 2.0]
    assert metric(trainer, "tools/calls_per_sample") == [2.0, 2.0, 2.0]
    # The last batch was scored on the worker's instances, each spent by its own 2 calls; TRL's pool still
    # holds the first batch's state (its own 2 calls each): it was not reset for the batches read ahead.
    assert [e.calls for e in trainer.environments] == [2, 2]
    assert [e.calls for e in trainer._environment_pool[None]] == [2, 2]
    assert not {id(e) for e in trainer.environments} & {id(e) for e in trainer._environment_pool[None]}


class CountedZoom(ZoomEnvironment):
    """ZoomEnvironment keeping every reset it gets (the instance, and the thread that made it)."""

    resets: list = []

    def reset(self, **row) -> None:
        CountedZoom.resets.append((self, threading.current_thread().name))
        super().reset(**row)


def test_reset_runs_once_per_sample_with_async_rollouts(two_call_vlm, data, tmp_path, transformers_server,
                                                        trained_batches):
    """TRL resets its pool for the first batch only (it is generated on the training thread); each batch the
    worker reads ahead is reset once, on its own instances, and TRL's pool is not reset again for its rows."""
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url",
                    transformers_server.url, "--async_rollouts", "--max_staleness", "1", "--max_steps", "3",
                    tools=["--environment", "tests.test_tools:CountedZoom"])
    assert trainer.state.global_step == 3 and metric(trainer, "async/prefetch_hits") == [0.0, 1.0, 1.0]
    for batch in trained_batches:
        check_trajectories(batch)
    resets = importlib.import_module("tests.test_tools").CountedZoom.resets  # as --environment loaded it
    instances = [e for e, _ in resets]
    assert len({id(e) for e in instances}) == len(instances)  # no instance reset twice
    pool = trainer._environment_pool[None]
    assert {id(e) for e in pool} <= {id(e) for e in instances}  # TRL's, reset for the first batch
    # The batches read ahead: 2, 3 and the one after (read ahead when 3 was handed over), 2 samples each.
    assert len(instances) == len(pool) + 3 * 2
    assert metric(trainer, "rewards/CountedZoom/mean") == [2.0, 2.0, 2.0]  # each scored its own rollout


def test_an_environment_batch_generated_again_gets_new_instances(two_call_vlm, data, tmp_path, transformers_server):
    """A read-ahead batch left two versions behind is generated again on new instances, reset with the same
    rows: those the first generation spent (2 calls each) are not scored twice."""
    method, align, config, _ = parse_args(["grpo", "--model", str(two_call_vlm), "--dataset", str(data),
                                           "--output_dir", str(tmp_path / "out"), *FLAGS, *ENVIRONMENT, "--vllm-mode",
                                           "server", "--server-url", transformers_server.url, "--async_rollouts"])
    rollouts = build_trainer(method, align, config).vllm_generation
    request = rollouts.prepare(list(next(iter(rollouts.trainer.get_train_dataloader())))[::2], 2)
    first = [e for group in request.environments for e in group]
    rollouts.push_at_start()
    start = rollouts.policy_version
    rollouts.launch(request)
    request.future.result()
    assert [e.calls for e in first] == [2, 2]
    for _ in range(2):
        rollouts.client.push_weights(rollouts.trainer.model)
    rollouts.policy_version = start + 2
    _, _, _, stats, trajectories = rollouts.collect(request.prompt_ids, request.images, 2)
    assert stats["stale_groups_dropped"] == 1.0
    again = [r.environment for r in trajectories]
    assert not {id(e) for e in again} & {id(e) for e in first}
    assert [e.calls for e in again] == [2, 2] and [e.calls for e in first] == [2, 2]
    rollouts.close()


def test_an_environment_observation_joins_the_read_ahead_prompt(two_call_vlm, data, tmp_path, transformers_server,
                                                                trained_batches, sampled_turns):
    """The observation reset returns joins the prompt in the worker as TRL joins it on the training thread:
    the batches read ahead are the ones TRL asks for (a prompt without it would not match, and the batch be
    generated again there), and the trainer trains on the prompt the worker generated from."""
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url",
                    transformers_server.url, "--async_rollouts", "--max_staleness", "1", "--max_steps", "3",
                    tools=["--environment", "tests.test_tools:ObservedZoom"])
    assert trainer.state.global_step == 3 and len(trained_batches) == 3
    assert metric(trainer, "async/prefetch_hits") == [0.0, 1.0, 1.0]
    threads = [name for name, _ in sampled_turns]
    # the first batch's one turn for the training thread; later batches: the worker's
    assert sum(name.startswith("MainThread") for name in threads) == 1 and threads[0].startswith("MainThread")
    turns = [t for _, ts in sampled_turns for t in ts]
    for batch in trained_batches:
        assert [f"{QUESTION} Picture {ZOOMED_SEED}." in trainer.processing_class.decode(p)
                for p in batch["prompt_ids"]] == [True, True]
        check_token_exact(batch, turns, expected_turns=1)  # (the tiny model, taught without it, answers at once)


def informative(completions, informative, **kwargs) -> list[float]:
    """Rewards that differ within a group only for the rows marked informative."""
    return [float(flag and i % 2 == 0) for i, flag in enumerate(informative)]


@pytest.fixture(scope="module")
def two_rows(data) -> Path:
    """The question twice, only the second row informative (dynamic sampling drops the first's group)."""
    row = json.loads(data.read_text())
    path = data.with_name("two_rows.jsonl")
    path.write_text("".join(json.dumps({**row, "informative": flag}) + "\n" for flag in (False, True)))
    return path


def trained_rows(batch: dict) -> list[dict]:
    """The rows of a generation batch as the loss gets them (padded tensors), unpadded."""
    rows = []
    for i in range(batch["prompt_ids"].size(0)):
        n = int(batch["completion_mask"][i].sum())
        rows.append(dict(prompt_ids=batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist(),
                         completion_ids=batch["completion_ids"][i][:n].tolist(),
                         tool_mask=batch["tool_mask"][i][:n].tolist(),
                         logprobs=batch["sampling_per_token_logps"][i][:n].tolist()))
    return rows


def test_an_environment_with_dynamic_sampling_in_server_mode(two_call_vlm, two_rows, tmp_path, transformers_server,
                                                               server_trace, trained_batches, monkeypatch):
    """Each step generates the uninformative row's group (dropped), then the informative one's, each a
    whole 3-turn trajectory through the environment's tool; the loss gets exactly what the server sampled."""
    from trainer_client.dynamic_sampling import DynamicSampling

    trained = []
    informative_batch = DynamicSampling.training_batch

    def recorded(self, generation_batch):
        batch = informative_batch(self, generation_batch)
        trained.append(batch)
        return batch

    monkeypatch.setattr(DynamicSampling, "training_batch", recorded)
    server = transformers_server
    v = version(server)
    trainer = train(two_call_vlm, two_rows, tmp_path / "out", "--vllm-mode", "server", "--server-url", server.url,
                    "--dynamic_sampling", "--shuffle_dataset", "false", tools=ENVIRONMENT,
                    rewards=["tests.test_tools:informative"])
    assert trainer.state.global_step == 2
    assert metric(trainer, "dynamic_sampling/dropped_group_ratio") == [0.5, 0.5]
    assert metric(trainer, "dynamic_sampling/resample_rounds") == [1.0, 1.0]
    assert len(trained_batches) == 4  # two rounds per step, every one a whole trajectory per sample
    for batch in trained_batches:
        check_trajectories(batch)
        check_environment_images(batch)
    # Every turn asked for what its own trajectory had left, round after round (after the step-0 parity
    # check's two one-token probes of the first prompt).
    assert Counter(a[0] for a in server_trace["asked"]) == {1: 2, **requests_per_batch(4)}
    image_token = trained_batches[0]["image_token_id"]
    batches = server_trace["batches"]
    assert len(batches) == 4
    for batch, step_turns in zip(trained, [batches[1], batches[3]], strict=True):  # the kept (second) rounds
        # (pixel values split per sample: the batch is assembled from several rounds)
        assert batch["num_images"] == [3, 3]
        assert [len(g) for g in batch["image_grid_thw"]] == [3, 3]
        assert [len(p) for p in batch["pixel_values"]] == [g.prod(-1).sum() for g in batch["image_grid_thw"]]
        for row in trained_rows(batch):
            check_sampled_exactly(**row, turns=step_turns, image_token=image_token, asked=server_trace["asked"])
            ids = row["prompt_ids"] + row["completion_ids"]
            assert collapse_image_runs(ids, image_token).count(image_token) == 3
    assert metric(trainer, "rewards/informative/mean") == [0.25, 0.25]  # per step: the dropped round's 0, then 0.5
    assert metric(trainer, "rewards/ZoomEnvironment/mean") == [2.0, 2.0]
    # The kept round's turns all come from the step's weights: the start push made v + 1.
    assert trainer.vllm_generation.turn_versions == [[v + 2] * 3] * 2
    assert metric(trainer, "weight_version_oldest_turn") == [v + 1.0, v + 2.0]


def turns_as_planned(completions, tool_turns, **kwargs) -> list[float]:
    """1 where a trajectory has the tool turns its row plans: a sample handed another prompt's
    completion (a process taking another's slice) scores 0."""
    return [float(sum(m["role"] == "tool" for m in c) == t) for c, t in zip(completions, tool_turns, strict=True)]


def long_question(processor, length: int) -> str:
    """The question padded to a prompt of about `length` tokens (with its image and the tool schema)."""
    def tokens(n: int) -> int:
        messages = [{"role": "user", "content": [{"type": "image", "image": random_image(3)},
                                                 {"type": "text", "text": "so " * n + QUESTION}]}]
        return len(processor.apply_chat_template(messages, tools=[zoom], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"][0])
    lo, hi = 0, length
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if tokens(mid) < length else (lo, mid)
    return "so " * lo + QUESTION


def test_two_processes_with_unequal_tool_turns(two_call_vlm, tmp_path, log_dir):
    """Under `accelerate launch` one process's prompt runs two tool turns, the other's none (its first
    tool answer would pass the server's 2048 positions, so it is rolled back): the main process runs
    every trajectory, and each process trains on its own samples. With --async_rollouts, so both paths
    run: the first batch on the training threads (as in synchronous mode), the second batch in the main
    process's rollout worker, each handed to its process by slice."""
    root = tmp_path / "data"
    root.mkdir()
    random_image(IMAGE_SEED).save(root / "q.png")
    random_image(3).save(root / "long.png")
    text = long_question(load_processor(two_call_vlm), 1960)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "image": image, "tool_turns": turns}
            for q, image, turns in ((QUESTION, "q.png", 2), (text, "long.png", 0))]
    (root / "grpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = ServerProcess(two_call_vlm, "transformers", log_dir=log_dir).wait_ready()
    try:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer_client.cli",
               "grpo", "--model", str(two_call_vlm), "--dataset", str(root / "grpo.jsonl"),
               "--output_dir", str(tmp_path / "out"), *FLAGS, *TOOLS, "--reward_funcs",
               "tests.test_tools:turns_as_planned", "--vllm-mode", "server", "--server-url", server.url,
               "--async_rollouts"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert AlignClient(server.url).info(refresh=True).weight_version == 3  # the start push, one per step
    finally:
        server.stop()
    logged = [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("{'loss'")]
    assert [float(log["reward"]) for log in logged] == [1.0, 1.0]
    assert [float(log["async/prefetch_hits"]) for log in logged] == [0.0, 1.0]  # the second batch: the worker's


# ---- our loop: each trajectory on its own clock, tools of different trajectories at once ----------------
class TogetherZoom(ZoomEnvironment):
    """ZoomEnvironment whose calls record when they start and end, each call ending only once another
    instance's call of the same turn has started (or a minute later): run at the same time, the calls of two
    trajectories overlap; one after another, the first waits the minute out and the second starts after it."""

    started: list = []  # (instance, turn) of each call begun
    spans: list = []  # (instance id, turn, start, end) of each call, from the tool's own clock
    changed = threading.Condition()

    def zoom(self, factor: int) -> list:
        """Zoom into the image

        Args:
            factor: how many times to enlarge
        """
        turn, start = self.calls, time.monotonic()
        with TogetherZoom.changed:
            TogetherZoom.started.append((self, turn))
            TogetherZoom.changed.notify_all()
            TogetherZoom.changed.wait_for(lambda: any(e is not self and t == turn for e, t in TogetherZoom.started),
                                          timeout=60)
        TogetherZoom.spans.append((id(self), turn, start, time.monotonic()))
        return super().zoom(factor)


def test_the_tools_of_two_trajectories_run_at_the_same_time(two_call_vlm, data, tmp_path, transformers_server,
                                                            trained_batches):
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url",
                    transformers_server.url, "--max_steps", "1", tools=["--environment", "tests.test_tools:TogetherZoom"])
    assert trainer.state.global_step == 1
    check_trajectories(trained_batches[0])
    spans = importlib.import_module("tests.test_tools").TogetherZoom.spans  # as --environment loaded it
    assert len(spans) == 4
    for turn in (0, 1):
        (a, _, a_start, a_end), (b, _, b_start, b_end) = [s for s in spans if s[1] == turn]
        assert a != b  # two trajectories' calls of the same turn...
        assert a_start < b_end and b_start < a_end  # ...each begun before the other ended


_HUNG = threading.Event()  # set when a test ends: the sync tool's hung threads then return


@functools.wraps(zoom)
def zoom_hanging(factor: int) -> list:
    _HUNG.wait()
    return zoom(factor)


@functools.wraps(zoom)
async def zoom_hanging_async(factor: int) -> list:
    await asyncio.sleep(3600)  # cancelled at the timeout
    return zoom(factor)


@functools.wraps(zoom)
def zoom_raising(factor: int) -> list:
    raise ValueError(f"no zoom x{factor} today")


@pytest.mark.parametrize("tool, answer", [
    ("zoom_raising", "{'error': 'no zoom x2 today'}"),
    ("zoom_hanging", "{'error': 'zoom did not return within 1 s'}"),
    ("zoom_hanging_async", "{'error': 'zoom did not return within 1 s'}"),
])
def test_a_tool_that_raises_or_hangs_answers_with_an_error(tool, answer, two_call_vlm, data, tmp_path,
                                                          transformers_server, trained_batches, caplog):
    """A tool that raises answers the model with TRL's error result; one that hangs (a sync one on its
    thread, an async one on TRL's event loop) is cut at --tool_timeout with an error result and a warning
    naming it. Either counts as a failed call, and the trajectory goes on."""
    module = importlib.import_module("tests.test_tools")  # as --tools loads it
    module._HUNG = threading.Event()
    try:
        with caplog.at_level(logging.WARNING, logger="trainer_client.agent_loop"):
            trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url",
                            transformers_server.url, "--max_steps", "1", "--tool_timeout", "1",
                            tools=["--tools", f"tests.test_tools:{tool}"])
        hung = [t for t in threading.enumerate() if t.name == "align-tool" and t.is_alive()]
    finally:
        module._HUNG.set()
    answers = [m["content"] for c in trained_batches[0]["completions"] for m in c if m["role"] == "tool"]
    assert answers and set(answers) == {answer}
    assert metric(trainer, "tools/failure_frequency") == [1.0]
    warned = [r.getMessage() for r in caplog.records if "--tool_timeout" in r.getMessage()]
    if tool == "zoom_raising":
        assert not warned
    else:
        assert warned and all(w.startswith("tool zoom did not return within --tool_timeout 1 s") for w in warned)
    if tool == "zoom_hanging":  # cut, not waited for: the calls still hang on their threads
        assert len(hung) == len(answers)


def test_max_tool_calling_iterations_ends_the_trajectory(two_call_vlm, data, tmp_path, transformers_server,
                                                         trained_batches):
    """One tool turn, then the model's second call is the trajectory's last turn, its call not made."""
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url",
                    transformers_server.url, "--max_steps", "1", "--max_tool_calling_iterations", "1")
    for completion, mask in zip(trained_batches[0]["completions"], trained_batches[0]["tool_mask"], strict=True):
        assert [m["role"] for m in completion] == ["assistant", "tool", "assistant"]
        assert completion[-1]["tool_calls"] and mask.count(0) == 59
    assert metric(trainer, "tools/call_frequency") == [1.0]  # TRL's: the calls made


def test_a_tool_turn_past_the_servers_max_model_len_is_rolled_back(two_call_vlm, data, tmp_path, log_dir,
                                                                   server_trace, trained_batches):
    """A server started with a smaller --max-model-len than the model's positions: the second tool answer
    would take the trajectory to 792 tokens, past its 760. The answer is rolled back whole (as TRL rolls
    back one past the model's positions): the trajectory ends with the model's second turn, no third turn
    is asked, and nothing empty is trained on as an answer."""
    server = ServerProcess(two_call_vlm, "transformers", extra=["--max-model-len", "760"], log_dir=log_dir)
    try:
        trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "server", "--server-url",
                        server.wait_ready(600).url, "--max_steps", "1")
    finally:
        server.stop()
    batch = trained_batches[0]
    for i, completion in enumerate(batch["completions"]):
        assert [m["role"] for m in completion] == ["assistant", "tool", "assistant"]
        assert completion[-1]["tool_calls"]  # the call whose answer did not fit
        assert batch["tool_mask"][i] == [1] * 64 + [0] * 59 + [1] * 64
        assert len(batch["images"][i]) == 2  # the question's and the first answer's: none of the rolled-back one
    # the step-0 parity check's two one-token probes, the first turns, then one second turn per trajectory
    # (760 - 669 tokens left); never a third
    assert sorted(a[0] for a in server_trace["asked"]) == [1, 1, 91, 91, 760 - PROMPT_TOKENS]
    assert metric(trainer, "tools/call_frequency") == [2.0]  # both calls were made, the second one's answer dropped


# ---- tools with LoRA: the adapter pushed after each step samples every turn -----------------------------
LORA = ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--lora_target_modules",
        "q_proj", "k_proj", "v_proj", "o_proj", "--lora_sync", "adapter"]


def test_tools_with_a_lora_adapter_in_server_mode(two_call_vlm, two_rows, tmp_path, transformers_server, server_trace,
                                                 trained_batches):
    server = transformers_server
    one_row = two_rows.with_name("informative_row.jsonl")
    one_row.write_text(two_rows.read_text().splitlines()[1] + "\n")
    v = version(server)
    trainer = train(two_call_vlm, one_row, tmp_path / "out", "--vllm-mode", "server", "--server-url", server.url,
                    *LORA, rewards=["tests.test_tools:informative"])
    assert trainer.state.global_step == 2 and len(trained_batches) == 2
    assert version(server) == v + 4  # the base, the adapter, then one adapter per step (merged: v + 3)
    check_two_batches_exactly(trained_batches, server_trace["batches"], server_trace["asked"])
    # Every turn, the tool turns too, from the adapter pushed for its step (the first one at v + 2).
    assert trainer.vllm_generation.turn_versions == [[v + 3] * 3] * 2
    assert metric(trainer, "weight_version_oldest_turn") == [v + 2.0, v + 3.0]
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2


# ---- colocate: TRL's own loop with its vLLM in this process ---------------------------------------------

@pytest.mark.vllm
def test_two_tool_turns_with_images_train_in_colocate_mode(two_call_vlm, data, tmp_path, monkeypatch, trained_batches):
    from trl.generation.vllm_generation import VLLMGeneration

    turns, sent = [], []  # per turn: what TRL asked and got back; per prompt vLLM got: (image tokens, images)
    single_turn, vllm_generate = GRPOTrainer._generate_single_turn, VLLMGeneration.generate

    def recorded(self, prompt_ids, images, *args, **kwargs):
        completion_ids, logprobs = single_turn(self, prompt_ids, images, *args, **kwargs)
        turns.append(dict(prompts=[list(p) for p in prompt_ids], sampled=[list(c) for c in completion_ids],
                          logprobs=[[[lp] for lp in lps] for lps in logprobs]))
        return completion_ids, logprobs

    def vllm_recorded(self, prompts, images, *args, **kwargs):
        token = self.model.config.image_token_id
        sent.extend((p.count(token), len(imgs)) for p, imgs in zip(prompts, images, strict=True))
        return vllm_generate(self, prompts, images, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", recorded)
    monkeypatch.setattr(VLLMGeneration, "generate", vllm_recorded)
    # (a 1280-token vLLM: TRL asks each turn for max_completion_length, 792 + 260 tokens on the third)
    trainer = train(two_call_vlm, data, tmp_path / "out", "--vllm-mode", "colocate",
                    "--vllm_gpu_memory_utilization", "0.001", "--vllm_max_model_length", "1280",
                    "--vllm_enable_sleep_mode", "false")
    assert trainer.state.global_step == 2 and len(trained_batches) == 2 and len(turns) == 6
    assert sent == [(1, 1)] * 2 + [(2, 2)] * 2 + [(3, 3)] * 2 + [(1, 1)] * 2 + [(2, 2)] * 2 + [(3, 3)] * 2
    check_two_batches_exactly(trained_batches, [turns[0:3], turns[3:6]], None)
    assert metric(trainer, "tools/turns_per_trajectory") == [3.0, 3.0]
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2
