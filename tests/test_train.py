"""`align-train` end to end on a tiny Qwen2-VL: each method in each mode it has, server mode against
a real `align-serve` subprocess. Small batches and a few steps: these check behaviour, not learning
(the seeded demo test checks learning)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from examples.demo import make_dataset
from tests.utils import ServerProcess, assert_rollouts_match, logged_rollouts, random_image
from trainer_client import AlignClient
from trainer_client.cli import run
from trainer_client.config import parse_args

SMALL = ["--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
         "--seed", "0"]


def parity_reward(completion_ids, **kwargs) -> list[float]:
    """Varies within every group, so GRPO's advantages, hence its gradients, are non-zero on a random
    model too (accuracy is 0 everywhere there): 0 or 1 by the completion's place (a group's completions
    are contiguous, at least two), plus 0.5 for an odd first token. The first token's parity alone left
    whole runs at zero advantage when the tiny model's first token was peaked (a CI run sampled one
    parity for every completion of both steps, and its adapter never moved)."""
    return [float(i % 2) + 0.5 * (ids[0] % 2) for i, ids in enumerate(completion_ids)]


REWARDS = ["--reward_funcs", "tests.test_train:parity_reward", "accuracy", "format"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def train(method, model, dataset, out, *flags):
    rollouts = [] if method == "mpo" else ["--num_generations", "4", "--max_completion_length", "4"]
    return run([method, "--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), *SMALL,
                *rollouts, *flags])


# ---- configuration --------------------------------------------------------------------------------

def test_presets_yaml_and_flags(tmp_path):
    base = ["--model", "m", "--dataset", "d"]
    _, _, gspo, _ = parse_args(["gspo", *base, "--gradient_accumulation_steps", "2"])
    assert (gspo.importance_sampling_level, gspo.epsilon, gspo.epsilon_high, gspo.beta, gspo.loss_type) == \
        ("sequence", 3e-4, 4e-4, 0.0, "grpo")
    assert gspo.steps_per_generation == 8  # 4 x gradient_accumulation_steps
    _, _, mpo, _ = parse_args(["mpo", *base])
    assert mpo.loss_type == ["sigmoid", "bco_pair", "sft"] and mpo.loss_weights == [0.8, 0.2, 1.0]

    # YAML overrides the preset, flags override YAML; TRL's names with _ or -.
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"epsilon": 0.1, "learning_rate": 5e-4, "steps_per_generation": 2,
                                   "reward_funcs": ["format", "accuracy"]}))
    _, align, gspo, _ = parse_args(["gspo", *base, "--config", str(cfg), "--learning-rate", "7e-4",
                                 "--vllm-mode", "server", "--server-url", "http://a:1", "--server-url", "http://b:2"])
    assert (gspo.epsilon, gspo.learning_rate, gspo.steps_per_generation) == (0.1, 7e-4, 2)
    assert align.reward_funcs == ["format", "accuracy"] and align.server_url == ["http://a:1", "http://b:2"]
    assert gspo.vllm_mode == "server"
    with pytest.raises(SystemExit, match="needs at least one --server-url"):
        parse_args(["grpo", *base, "--vllm-mode", "server"])
    with pytest.raises(SystemExit):
        parse_args(["mpo", *base, "--vllm-mode", "server"])  # MPO has nothing to generate


def test_colocate_kv_cache_size_flag():
    base = ["grpo", "--model", "m", "--dataset", "d", "--vllm-mode", "colocate"]
    assert parse_args([*base, "--vllm_kv_cache_memory_bytes", "2G"])[2].vllm_kv_cache_memory_bytes == 2 * 2**30
    assert parse_args(base)[2].vllm_kv_cache_memory_bytes is None  # the default is the model's (runtime/kv_cache.py)
    with pytest.raises(SystemExit, match="--vllm_kv_cache_memory_bytes: not a size: 'lots'"):
        parse_args([*base, "--vllm_kv_cache_memory_bytes", "lots"])


def test_bad_dataset_stops_before_training(tiny_vlm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "image": "missing.png"}) + "\n")
    with pytest.raises(SystemExit, match=r"nothing trained: .*bad.jsonl row 1: image file .*missing.png does not exist"):
        train("grpo", tiny_vlm, bad, tmp_path / "out", "--max_steps", "1")
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---- local generation (none) ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["grpo", "gspo"])
def test_grpo_family_none_mode(method, tiny_vlm, data, tmp_path):
    trainer = train(method, tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--max_steps", "2",
                    "--vllm-mode", "none", *REWARDS,
                    "--log_completions", "true", "--num_completions_to_print", "1")
    assert trainer.state.global_step == 2
    assert changed(weights(tiny_vlm), weights(tmp_path / "out"))
    logged = trainer.state.log_history[0]
    assert "rewards/accuracy_reward/mean" in logged and "rewards/format_reward/mean" in logged
    if method == "gspo":
        assert trainer.args.importance_sampling_level == "sequence"


def test_metrics_reach_tensorboard_offline(tiny_vlm, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train("grpo", tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--max_steps", "2", *REWARDS,
          "--report_to", "tensorboard")
    events = EventAccumulator(str(next((tmp_path / "out").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/reward", "train/loss"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/reward")) == 2


def test_mpo(tiny_vlm, data, tmp_path):
    trainer = train("mpo", tiny_vlm, data / "mpo.jsonl", tmp_path / "out", "--max_steps", "2")
    assert trainer.args.loss_type == ["sigmoid", "bco_pair", "sft"]
    assert trainer.state.global_step == 2
    assert changed(weights(tiny_vlm), weights(tmp_path / "out"))


def test_resume_continues_from_the_saved_step(tiny_vlm, data, tmp_path):
    out = tmp_path / "out"
    train("grpo", tiny_vlm, data / "grpo.jsonl", out, "--max_steps", "2", "--save_steps", "2", *REWARDS)
    assert (out / "checkpoint-2").is_dir()
    # Resumed with nothing left to train, the model is the checkpoint's, tensor for tensor (Qwen2-VL
    # saves under legacy names that transformers' own resume does not map back: trainers.py).
    train("grpo", tiny_vlm, data / "grpo.jsonl", tmp_path / "same", "--max_steps", "2",
          "--resume_from_checkpoint", str(out / "checkpoint-2"), *REWARDS)
    assert not changed(weights(out / "checkpoint-2"), weights(tmp_path / "same"))
    assert changed(weights(tiny_vlm), weights(tmp_path / "same"))
    trainer = train("grpo", tiny_vlm, data / "grpo.jsonl", out, "--max_steps", "4",
                    "--resume_from_checkpoint", str(out / "checkpoint-2"), *REWARDS)
    steps = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert steps == [1, 2, 3, 4]  # the history of steps 1-2 came back with the checkpoint; 3-4 are new
    assert trainer.state.global_step == 4


# ---- server mode: a real align-serve ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    """One server for the module: each run pushes its own start weights before its first rollout, and
    the tests count versions from where the server stood."""
    proc = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir).wait_ready()
    yield proc
    proc.stop()


def server_version(server) -> int:
    return AlignClient(server.url, api_key=server.api_key).info(refresh=True).weight_version


@pytest.mark.parametrize("method,transport", [("grpo", "tcp"), ("gspo", "http")])
def test_server_mode_pushes_weights_every_step(method, transport, tiny_vlm, data, tmp_path, server, capsys,
                                              monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich's table then keeps every header on one line
    v = server_version(server)
    trainer = train(method, tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--max_steps", "3",
                    "--vllm-mode", "server", "--server-url", server.url, "--steps_per_generation", "1",
                    "--weight-transport", transport, "--log_completions", "true", *REWARDS)
    # TRL's completion table (--log_completions), with the version that made each completion as a column
    header = next(line for line in capsys.readouterr().out.splitlines() if "Advantage" in line)
    assert "Completion" in header and "weight_version" in header
    assert trainer.state.global_step == 3
    # The start weights are pushed before the first rollout, then one new version per optimizer step.
    assert server_version(server) == v + 4
    assert changed(weights(tiny_vlm), weights(tmp_path / "out"))
    # Each step's completions came from the weights the trainer pushed for it (those of the step before).
    versions = [(e["weight_version"], e["weight_version_pushed"]) for e in trainer.state.log_history
                if "weight_version" in e]
    assert versions == [(v + 1, v + 1), (v + 2, v + 2), (v + 3, v + 3)]
    # TRL's importance-sampling correction ran on the server's logprobs, which are the trainer's model's.
    assert all("sampling/importance_sampling_ratio/mean" in e for e in trainer.state.log_history if "loss" in e)
    assert len(assert_rollouts_match(trainer.state.log_history)) == 3


def check_servers_answer_as_the_merged_adapter(trainer, *servers, api_key: str | None = None) -> None:
    """Every server gives the greedy answer of the model with the trained adapter merged, with that
    model's logprobs, which the adapter moved away from the base model's (so a server still holding the
    base weights fails even where the greedy tokens happen to agree)."""
    model, processor = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
    assert hasattr(model, "peft_config")  # an adapter was trained, not the full model
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    image = random_image(4)
    inputs = processor(text=[processor.apply_chat_template(question, add_generation_prompt=True)], images=[image],
                       return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    model.eval()

    def token_logprobs(ids: torch.Tensor) -> torch.Tensor:
        # the per-token inputs (attention mask, mm_token_type_ids) extended over the completion with ones/zeros
        extra = {k: torch.cat([v, (torch.ones_like if k == "attention_mask" else torch.zeros_like)(ids[:, n:])], 1)
                 for k, v in inputs.items() if k in ("attention_mask", "mm_token_type_ids")}
        logits = model(**{**inputs, **extra, "input_ids": ids}).logits.float()
        return logits[0, n - 1:-1].log_softmax(-1).gather(-1, ids[0, n:, None])[:, 0]

    with torch.inference_mode():
        full = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        lora, lora_lp = full[0, n:].tolist(), token_logprobs(full)
        with model.disable_adapter():
            base_lp = token_logprobs(full)
    moved = (lora_lp - base_lp).abs().max().item()
    assert moved > 1e-2, f"the adapter must move the model's logprobs for this check to mean anything ({moved:.2g})"
    for server in servers:
        with AlignClient(server.url, api_key=api_key) as client:
            out = client.generate(prompt_ids=[inputs["input_ids"][0].tolist()], images=[[image]], temperature=0.0,
                                  max_tokens=8).results[0].completions[0]
        got = out.token_ids
        assert got == lora[: len(got)] and got, server.url
        diff = (torch.tensor(out.logprobs) - lora_lp[: len(got)]).abs().max().item()
        assert diff < 1e-3, f"{server.url}: logprobs {diff:.2g} away from the merged adapter's (it moved them {moved:.2g})"


def test_server_mode_with_lora_serves_the_merged_weights(tiny_vlm, data, tmp_path, server):
    v = server_version(server)
    # (no LoRA dropout: the trainer's forward would apply it and the server never does, a gap from step 2)
    trainer = train("grpo", tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--max_steps", "2", "--learning_rate",
                    "0.5", "--vllm-mode", "server", "--server-url", server.url, "--steps_per_generation", "1",
                    "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "o_proj", "up_proj",
                    "down_proj", "--lora_dropout", "0", *REWARDS)
    assert server_version(server) == v + 3  # the start push, then one per step
    assert len(assert_rollouts_match(trainer.state.log_history)) == 2
    check_servers_answer_as_the_merged_adapter(trainer, server)


def test_server_mode_resume_pushes_the_restored_weights(tiny_vlm, data, tmp_path, server):
    out, v = tmp_path / "out", server_version(server)
    train("grpo", tiny_vlm, data / "grpo.jsonl", out, "--max_steps", "1", "--save_steps", "1",
          "--vllm-mode", "server", "--server-url", server.url, *REWARDS)
    assert server_version(server) == v + 2  # the start push, then step 1's
    trainer = train("grpo", tiny_vlm, data / "grpo.jsonl", out, "--max_steps", "2", "--vllm-mode", "server",
                    "--server-url", server.url, "--resume_from_checkpoint", "last", *REWARDS)
    assert trainer.state.global_step == 2
    # The restored weights are pushed before the first rollout (the trainer cannot know what the
    # server holds), then step 2's: two new versions, and step 2 trained on the first of them.
    assert server_version(server) == v + 4
    assert [e["weight_version"] for e in trainer.state.log_history if "weight_version" in e] == [v + 1, v + 3]
    assert [e["step"] for e in assert_rollouts_match(trainer.state.log_history)] == [1, 2]


@pytest.mark.parametrize("mode", ["server", "none"])
def test_eval_during_training_is_greedy(mode, tiny_vlm, data, tmp_path, request):
    eval_file = make_dataset(tmp_path / "eval", 8, seed=2, method="grpo")
    server = request.getfixturevalue("server") if mode == "server" else None
    v = server_version(server) if server else None
    url = ["--server-url", server.url] if server else []
    trainer = train("grpo", tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--max_steps", "4",
                    "--steps_per_generation", "1", "--vllm-mode", mode, *url, "--eval_dataset", str(eval_file),
                    "--eval_strategy", "steps", "--eval_steps", "2", *REWARDS)
    evals = [e for e in trainer.state.log_history if "eval_reward" in e]
    assert [e["step"] for e in evals] == [2, 4]
    assert all("eval_rewards/parity_reward/mean" in e and "eval_rewards/accuracy_reward/mean" in e for e in evals)
    # Greedy: the same weights score the same, again and again (step 4's eval ran on the final weights).
    again = [trainer.evaluate() for _ in range(2)]
    keys = [k for k in evals[-1] if k.startswith("eval_reward")]
    assert [{k: e[k] for k in keys} for e in again] == [{k: evals[-1][k] for k in keys}] * 2
    if mode == "server":
        assert server_version(server) == v + 5  # evaluating pushed nothing new


@pytest.mark.vllm
def test_a_colocate_run_ends_cleanly_as_the_user_runs_it(tiny_vlm, data, tmp_path):
    """align-train's own exit in colocate mode: the exit handlers (vLLM's shutdown among them) run while TRL's
    process group still stands (left first, vLLM's finalizer raised `Invalid process group specified` with a
    traceback after the model was saved)."""
    done = subprocess.run(
        [sys.executable, "-m", "trainer_client.cli", "grpo", "--model", str(tiny_vlm), "--dataset",
         str(data / "grpo.jsonl"), "--output_dir", str(tmp_path / "out"), *SMALL, "--num_generations", "4",
         "--max_completion_length", "4", "--max_steps", "1", *REWARDS, "--vllm-mode", "colocate",
         "--vllm_gpu_memory_utilization", "0.001", "--vllm_max_model_length", "512",
         "--vllm_enable_sleep_mode", "false"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]


# ---- the demo learns ------------------------------------------------------------------------------

def test_demo_reward_rises(tmp_path, capsys):
    """`make demo` on its default seed: MPO warm-up, then GRPO through align-serve with async
    rollouts and dynamic sampling."""
    from examples.demo import main as demo

    result = demo(["--work-dir", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines and all(" K3 " in line and " IS " in line for line in lines)  # each step says its rollout health
    rewards = result["rewards"]
    k = len(rewards) // 5
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last > first + 0.15, (first, last)
    assert result["weight_version"] == len(rewards) + 1  # the start push, then one per GRPO step
    assert result["accuracy_after"] >= 0.9  # greedy, on fresh images; chance is 0.25
    assert result["plot"].is_file()


def accelerate_grpo(model, dataset, out, url, *flags) -> subprocess.CompletedProcess:
    """`align-train grpo` in server mode as two CPU processes under `accelerate launch`; fails the
    test with the tail of its output if it exits non-zero."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer_client.cli", "grpo",
           "--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), *SMALL,
           "--num_generations", "4", "--max_completion_length", "4", "--vllm-mode", "server", "--server-url", url, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_accelerate_two_processes_server_mode(tiny_vlm, data, tmp_path, server):
    """Two CPU processes (DDP over gloo): only the main one talks to the server and pushes."""
    v = server_version(server)
    proc = accelerate_grpo(tiny_vlm, data / "grpo.jsonl", tmp_path / "out", server.url, "--max_steps", "2", *REWARDS)
    assert server_version(server) == v + 3  # the start push, then one per step
    # the rollout/* metrics are over both processes' samples (gathered), and healthy
    assert len(assert_rollouts_match(logged_rollouts(proc.stdout + proc.stderr))) == 2
    assert changed(weights(tiny_vlm), weights(tmp_path / "out"))
