"""The faster server-mode step: the IS ratio from the loss's own forward, dynamic sampling (DAPO) and
asynchronous rollouts, against a real `align-serve` (transformers engine; vLLM marked)."""

import re

import pytest
import torch
from trl import GRPOTrainer

from examples.demo import make_dataset
from tests.test_train import (
    SMALL,
    accelerate_grpo,
    changed,
    check_servers_answer_as_the_merged_adapter,
    server_version,
    train,
    weights,
)
from tests.utils import ServerProcess, assert_rollouts_match, logged_rollouts, prompts_served
from trainer_client.config import parse_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour-data")
    make_dataset(root, 32, seed=0, method="grpo")
    return root


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    """One server for the module: each run pushes its own start weights before its first rollout, and
    the tests count versions from where the server stood."""
    proc = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir).wait_ready()
    yield proc
    proc.stop()


def parity_reward(completion_ids, **kwargs) -> list[float]:
    return [float(ids[0] % 2) for ids in completion_ids]


def odd_rows_agree(completion_ids, dataset_row, **kwargs) -> list[float]:
    """Every group of an odd dataset row gets the same reward (zero advantage); even rows vary."""
    return [1.0 if row % 2 else float(ids[0] % 2) for ids, row in zip(completion_ids, dataset_row, strict=True)]


def logged(trainer, key: str) -> list[float]:
    return [e[key] for e in trainer.state.log_history if key in e]


def test_rollout_flags_are_checked():
    base = ["--model", "m", "--dataset", "d"]
    with pytest.raises(SystemExit, match="--async_rollouts needs --vllm-mode server"):
        parse_args(["grpo", *base, "--async_rollouts"])
    with pytest.raises(SystemExit, match="--max_staleness 1 is below the 4 optimizer steps"):
        parse_args(["gspo", *base, "--vllm-mode", "server", "--server-url", "http://a:1", "--async_rollouts"])
    _, _, config, _ = parse_args(["gspo", *base, "--vllm-mode", "server", "--server-url", "http://a:1",
                                  "--async_rollouts", "--max_staleness", "4", "--dynamic_sampling"])
    assert config.async_rollouts and config.max_staleness == 4 and config.dynamic_sampling
    assert config.max_resample_rounds == 4
    with pytest.raises(SystemExit, match="--server_timeout must be above 0 seconds"):
        parse_args(["grpo", *base, "--vllm-mode", "server", "--server-url", "http://a:1", "--server_timeout", "0"])


def test_ratio_from_the_loss_forward_equals_trls(tiny_vlm, data, tmp_path, server):
    """Same completions through TRL's path (extra no-grad forward) and ours: same ratio, same loss."""
    from trainer_client.config import parse_args as parse
    from trainer_client.trainers import build_trainer

    method, align, config, _ = parse(["grpo", "--model", str(tiny_vlm), "--dataset", str(data / "grpo.jsonl"),
                                      "--output_dir", str(tmp_path / "out"), *SMALL, "--num_generations", "4",
                                      "--max_completion_length", "6", "--vllm-mode", "server",
                                      "--server-url", server.url, "--reward_funcs", "tests.test_async:parity_reward",
                                      "--parity_check", "off"])
    trainer = build_trainer(method, align, config)
    assert trainer.ratio_from_loss_forward()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))

    backend, replies = trainer.vllm_generation, []

    def recorded(**kwargs):
        # A sampler a little off the trainer's weights (the server's own logprobs equal the trainer's forward
        # to rounding): the ratio both paths form is then not 1, and their agreement means something.
        prompts, completions, logprobs, extra = backend_generate(**kwargs)
        off = [[[lp[0] - 0.1 * (j % 3)] for j, lp in enumerate(row)] for row in logprobs]
        replies.append((prompts, completions, off, extra))
        return replies[-1]

    def replayed(**kwargs):
        return replies[0]

    backend_generate = backend.generate
    backend.generate = recorded
    ours = trainer._generate_and_score_completions(batch)
    backend.generate = replayed
    trls = GRPOTrainer._generate_and_score_completions(trainer, batch)

    assert "old_per_token_logps" in trls and "importance_sampling_ratio" in trls  # TRL paid the extra forward
    assert "old_per_token_logps" not in ours and "importance_sampling_ratio" not in ours
    torch.manual_seed(0)
    loss_trl = GRPOTrainer._compute_loss(trainer, trainer.model, trls)
    torch.manual_seed(0)
    loss_ours = trainer._compute_loss(trainer.model, ours)
    torch.testing.assert_close(ours["importance_sampling_ratio"], trls["importance_sampling_ratio"])
    torch.testing.assert_close(loss_ours, loss_trl)
    assert not torch.allclose(trls["importance_sampling_ratio"], torch.ones_like(trls["importance_sampling_ratio"]))


def test_dynamic_sampling_never_trains_on_a_zero_advantage_group(tiny_vlm, data, tmp_path):
    trainer = train("grpo", tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--max_steps", "4",
                    "--dynamic_sampling", "--max_resample_rounds", "8",
                    "--reward_funcs", "tests.test_async:odd_rows_agree")
    assert trainer.state.global_step == 4
    dropped = logged(trainer, "dynamic_sampling/dropped_group_ratio")
    assert len(dropped) == 4 and sum(dropped) > 0  # odd rows came up and were dropped
    assert logged(trainer, "dynamic_sampling/zero_advantage_groups_trained") == [0.0] * 4
    assert sum(logged(trainer, "dynamic_sampling/resample_rounds")) > 0  # short batches were refilled


def run_async(model, data, out, url, *flags):
    return train("grpo", model, data / "grpo.jsonl", out, "--vllm-mode", "server", "--server-url", url,
                 "--async_rollouts", "--reward_funcs", "tests.test_async:parity_reward", *flags)


def test_async_rollouts_one_step_off(tiny_vlm, data, tmp_path, server):
    v = server_version(server)
    trainer = run_async(tiny_vlm, data, tmp_path / "out", server.url, "--max_steps", "4")
    assert trainer.state.global_step == 4
    assert server_version(server) == v + 5  # the start push and one per step, the last one before the run ended
    # Step 1 waits for its rollouts; every later step trains on rollouts made while the step
    # before it trained, by the weights one version behind.
    assert logged(trainer, "weight_version") == [v + 1, v + 1, v + 2, v + 3]
    assert logged(trainer, "weight_version_pushed") == [v + 1, v + 2, v + 3, v + 4]
    assert logged(trainer, "async/staleness_max") == [0, 1, 1, 1]
    assert logged(trainer, "async/prefetch_hits") == [0, 1, 1, 1]
    assert logged(trainer, "async/stale_groups_dropped") == [0] * 4
    assert logged(trainer, "async/prefetch_misses") == [0] * 4
    assert all("sampling/importance_sampling_ratio/mean" in e for e in trainer.state.log_history if "loss" in e)
    # The rollout/* metrics split by staleness: step 1's samples are on the trainer's weights and match
    # them; the later steps' are one version behind (what staleness costs shows as their gap).
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert [("rollout/lag_0/k3_kl" in e, "rollout/lag_ge1/k3_kl" in e) for e in steps] == \
        [(True, False)] + [(False, True)] * 3
    assert [e["step"] for e in assert_rollouts_match(trainer.state.log_history)] == [1]
    assert all(e["rollout/lag_ge1/k3_kl"] > 0 for e in steps[1:])


def test_async_rollouts_with_dynamic_sampling_and_two_versions_of_staleness(tiny_vlm, data, tmp_path, server):
    v = server_version(server)
    trainer = run_async(tiny_vlm, data, tmp_path / "out", server.url, "--max_steps", "4", "--max_staleness", "2",
                        "--dynamic_sampling", "--max_resample_rounds", "8",
                        "--reward_funcs", "tests.test_async:odd_rows_agree")
    assert trainer.state.global_step == 4 and server_version(server) == v + 5
    staleness = logged(trainer, "async/staleness_max")
    assert max(staleness) <= 2 and max(staleness) >= 1
    assert logged(trainer, "dynamic_sampling/zero_advantage_groups_trained") == [0.0] * 4
    assert sum(logged(trainer, "dynamic_sampling/dropped_group_ratio")) > 0


@pytest.mark.vllm
def test_async_rollouts_on_the_vllm_engine(tiny_vlm, data, tmp_path, vllm_vlm):
    v = server_version(vllm_vlm)  # the suite's shared vLLM server (conftest.py): its versions go on counting
    trainer = run_async(tiny_vlm, data, tmp_path / "out", vllm_vlm.url, "--api_key", vllm_vlm.api_key,
                        "--max_steps", "3")
    assert server_version(vllm_vlm) == v + 4
    assert logged(trainer, "weight_version") == [v + 1, v + 1, v + 2]
    assert max(logged(trainer, "async/staleness_max")) == 1
    assert [e["step"] for e in assert_rollouts_match(trainer.state.log_history)] == [1]


def test_groups_older_than_max_staleness_are_generated_again(tiny_vlm, data, tmp_path, server):
    """A prefetched batch that sat while the server moved two versions on is not trained on as is."""
    from trainer_client.config import parse_args as parse
    from trainer_client.trainers import build_trainer

    method, align, config, _ = parse(["grpo", "--model", str(tiny_vlm), "--dataset", str(data / "grpo.jsonl"),
                                      "--output_dir", str(tmp_path / "out"), *SMALL, "--num_generations", "4",
                                      "--max_completion_length", "4", "--vllm-mode", "server", "--async_rollouts",
                                      "--server-url", server.url])
    rollouts = build_trainer(method, align, config).vllm_generation
    rows = list(next(iter(rollouts.trainer.get_train_dataloader())))[::4]
    request = rollouts.prepare(rows, 4)
    rollouts.push_at_start()
    start = rollouts.policy_version
    rollouts.launch(request)
    assert {c.weight_version for g in request.future.result() for c in g} == {start}
    for _ in range(2):
        rollouts.client.push_weights(rollouts.trainer.model)
    rollouts.policy_version = start + 2
    _, _, versions, stats, trajectories = rollouts.collect(request.prompt_ids, request.images, 4)
    assert stats["prefetch_hits"] == 1 and stats["stale_groups_dropped"] == len(rows)
    assert set(versions) == {start + 2} and stats["staleness_max"] == 0 and trajectories is None

    # A server that stays behind (it lost pushes) stops the run with the reason.
    rollouts.policy_version = start + 5
    with pytest.raises(RuntimeError, match="3 versions behind the trainer"):
        rollouts.collect(request.prompt_ids, request.images, 4)
    rollouts.close()


def test_a_batch_read_ahead_for_other_rows_is_a_miss_however_alike_they_look(tiny_vlm, data, tmp_path, server):
    """The demo's data, as many real datasets: one fixed question over same-size images, so two rows' prompt
    ids and image sizes agree. A batch read ahead for other rows (a resumed run, another sampler order) is
    not this one: it is counted as a miss and this batch generated now, never trained on against the wrong
    rows' rewards. Telling them apart takes the images' content, or the rows' identity."""
    from trainer_client.config import parse_args as parse
    from trainer_client.trainers import build_trainer

    method, align, config, _ = parse(["grpo", "--model", str(tiny_vlm), "--dataset", str(data / "grpo.jsonl"),
                                      "--output_dir", str(tmp_path / "out"), *SMALL, "--num_generations", "4",
                                      "--max_completion_length", "4", "--vllm-mode", "server", "--async_rollouts",
                                      "--server-url", server.url])
    rollouts = build_trainer(method, align, config).vllm_generation
    batches = iter(rollouts.trainer.get_train_dataloader())
    rows, other_rows = list(next(batches))[::4], list(next(batches))[::4]
    ahead, asked = rollouts.prepare(rows, 4), rollouts.prepare(other_rows, 4)
    assert ahead.prompt_ids == asked.prompt_ids  # the same question...
    assert [[i.size for i in imgs] for imgs in ahead.images] == [[i.size for i in imgs] for imgs in asked.images]
    assert ahead.row_ids != asked.row_ids  # ...over other rows
    rollouts.push_at_start()

    def read_ahead_then_ask(request, row_ids) -> dict:
        rollouts.launch(rollouts.prepare(rows, 4))
        return rollouts.collect(request.prompt_ids, request.images, 4, row_ids=row_ids)[3]

    stats = read_ahead_then_ask(asked, asked.row_ids)
    assert (stats["prefetch_hits"], stats["prefetch_misses"]) == (0, 1)
    stats = read_ahead_then_ask(asked, None)  # the rows unknown: the images' content alone tells them apart
    assert (stats["prefetch_hits"], stats["prefetch_misses"]) == (0, 1)
    stats = read_ahead_then_ask(ahead, ahead.row_ids)  # the batch it was read ahead for
    assert (stats["prefetch_hits"], stats["prefetch_misses"]) == (1, 0)
    rollouts.close()


# ---- async with several servers, LoRA, GSPO and accelerate --------------------------------------

def test_async_rollouts_across_two_servers_with_lora(tiny_vlm, data, tmp_path, log_dir):
    """The batch is split over two servers; each gets every push (the merged adapter), each
    completion's version is checked, and both end serving the trainer's merged weights."""
    # Two new servers, not the module's: --async_rollouts needs every server at one version.
    server, second = (ServerProcess(tiny_vlm, "transformers", log_dir=log_dir) for _ in range(2))
    try:
        for s in (server, second):
            s.wait_ready()
        # 2 prompts x 4 generations a step: one prompt to each server
        trainer = run_async(tiny_vlm, data, tmp_path / "out", server.url, "--server-url", second.url,
                            "--max_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "0.5",
                            "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "o_proj",
                            "up_proj", "down_proj")
        assert trainer.state.global_step == 3
        assert server_version(server) == server_version(second) == 4  # the start push and one per step
        assert logged(trainer, "weight_version") == [1, 1, 2]
        assert logged(trainer, "async/staleness_max") == [0, 1, 1]
        assert logged(trainer, "async/stale_groups_dropped") == [0] * 3
        assert prompts_served(server) == prompts_served(second) > 0  # the batches were split between them
        assert [e["step"] for e in assert_rollouts_match(trainer.state.log_history)] == [1]

        check_servers_answer_as_the_merged_adapter(trainer, server, second)
    finally:
        for s in (server, second):
            s.stop()


def test_async_gspo_stays_within_its_staleness(tiny_vlm, data, tmp_path, server):
    """GSPO's preset spans 4 optimizer steps per generation batch, so it needs --max_staleness 4; no
    completion trained on is older than that."""
    v = server_version(server)
    trainer = train("gspo", tiny_vlm, data / "grpo.jsonl", tmp_path / "out", "--vllm-mode", "server",
                    "--server-url", server.url, "--async_rollouts", "--max_staleness", "4", "--max_steps", "8",
                    "--reward_funcs", "tests.test_async:parity_reward")
    assert trainer.state.global_step == 8 and server_version(server) == v + 9
    staleness = logged(trainer, "async/staleness_max")
    assert staleness and max(staleness) <= 4
    pushed, used = logged(trainer, "weight_version_pushed"), logged(trainer, "weight_version")
    assert all(p - u <= 4 for p, u in zip(pushed, used, strict=True))
    # TRL's own "old logprobs" pass forms the ratio here (a generation batch spans 4 steps): the first
    # generation batch's samples, on the trainer's weights when it was scored, match them
    assert assert_rollouts_match(trainer.state.log_history)[0]["step"] == 1


def test_async_rollouts_under_accelerate_two_processes(tiny_vlm, data, tmp_path, server):
    """Two CPU processes (DDP over gloo): the main one generates ahead and pushes; both train."""
    v = server_version(server)
    proc = accelerate_grpo(tiny_vlm, data / "grpo.jsonl", tmp_path / "out", server.url, "--max_steps", "3",
                           "--async_rollouts", "--reward_funcs", "tests.test_async:parity_reward")
    assert server_version(server) == v + 4  # the start push, then one per step: from the main process only
    assert changed(weights(tiny_vlm), weights(tmp_path / "out"))
    used = [float(v) for v in re.findall(r"'weight_version': '([0-9.]+)'", proc.stdout + proc.stderr)]
    assert used == [v + 1, v + 1, v + 2], proc.stdout[-3000:]
    assert [e["step"] for e in assert_rollouts_match(logged_rollouts(proc.stdout + proc.stderr))] == [1]
