"""Agent rollouts with slow tools: TRL's lockstep tool loop against ours, one batch, one align-serve.

Ours is trainer_client/agent_loop.py; both run the same batch through the same server.

The model: a tiny Qwen3-VL taught to call its `zoom` tool three times, seeing the tool's image each time,
then answer (tests/tool_model.py fits it; built once, cached under .cache/bench/). 32 trajectories (16
prompts x 2), greedy, so every run samples the same turns. The tool is an environment method that sleeps
a latency drawn per call from [0.05, 1.0] s (seeded by trajectory and call), as a code sandbox, a web
search or a crop on a remote image store would, then answers as the model learned.

It times, one after another on the same server:
  (a) TRL 1.16's `_tool_call_loop` (server mode's loop before ours): each turn, every trajectory's tools one
      after another, then one batched generate of every next turn;
  (b) `AgentLoop.run`: each trajectory on its own, tools of different trajectories at once;
  (c) a floor: generation alone (every ask of (b) again, each trajectory's turns one after another, all
      trajectories at once, no tool, no parsing) plus the longest trajectory's own tool time. (b) can
      beat it: other trajectories generate while the longest one waits on its tools.
Both (a) and (b) include the first turns. The last two lines are the ratios `new / TRL loop` and
`new / floor` (the loop's overhead above generation and the unavoidable tool wait).

    python bench/agent_rollouts.py [--engine vllm|transformers] [--seed 0] [--rounds 1]
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402, F401  (torchvision importable on the CPU torch, before transformers loads)
from tests.tool_model import IMAGE_SEED, QUESTION, ZOOMED_SEED, build_calling_model  # noqa: E402
from tests.utils import ServerProcess, random_image  # noqa: E402
from trainer_client import trl_seam  # noqa: E402
from trainer_client.agent_loop import tool_tables  # noqa: E402
from trainer_client.config import parse_args  # noqa: E402
from trainer_client.tools import environment_tools  # noqa: E402
from trainer_client.trainers import build_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALLS = 3
PROMPTS, GENERATIONS = 16, 2
LATENCY = (0.05, 1.0)


class LatencyZoom:
    """One trajectory's environment: `zoom` answers as tests/tool_model.py's does, after the latency drawn
    for this trajectory's call (`reset` with `trajectory` and `seed`)."""

    def reset(self, trajectory: int = 0, seed: int = 0, **row) -> None:
        self.trajectory, self.seed, self.calls, self.slept = trajectory, seed, 0, 0.0

    def zoom(self, factor: int) -> list:
        """Zoom into the image

        Args:
            factor: how many times to enlarge
        """
        latency = random.Random(f"{self.seed}-{self.trajectory}-{self.calls}").uniform(*LATENCY)
        self.calls += 1
        self.slept += latency
        time.sleep(latency)
        return [{"type": "image", "image": random_image(ZOOMED_SEED)}, {"type": "text", "text": f"zoomed x{factor}"}]


def tool_model() -> Path:
    """The three-call model, built on first use (a few minutes on 2 cores) and kept."""
    path = ROOT / ".cache" / "bench" / f"calling_qwen3_vl_{CALLS}"
    if not (path / "config.json").is_file():
        print(f"building the tool-calling model into {path} (once)", flush=True)
        build_calling_model(path, calls=CALLS, max_steps=1000)
    return path


def environments(trainer, seed: int) -> list:
    out = []
    for i in range(PROMPTS * GENERATIONS):
        env = trainer.environment_factories[None]()
        env.reset(trajectory=i, seed=seed)
        out.append(env)
    return out


def trl_loop(trainer, prompt_ids, images, envs, max_tokens: int) -> list[list[int]]:
    """(a): the first turns, then TRL's own loop; each trajectory's completion ids."""
    from trl.chat_template_utils import parse_response  # after `runtime` (transformers image utils)

    client = trainer.vllm_generation.client
    tokenizer = trl_seam.tokenizer(trainer)
    params = dict(temperature=0.0, logprobs=True, max_tokens=max_tokens)
    first = client.generate(prompt_ids=prompt_ids, images=images, n=GENERATIONS, **params)
    rows = [i for i in range(PROMPTS) for _ in range(GENERATIONS)]
    completion_ids = [list(c.token_ids) for r in first.results for c in r.completions]
    logprobs = [list(c.logprobs) for r in first.results for c in r.completions]
    schema = trl_seam.tools_for_environment(trainer, None)
    completions = [[parse_response(tokenizer, ids, prefix=prompt_ids[rows[i]], tools=schema)]
                   for i, ids in enumerate(completion_ids)]

    def generate_turn(turn_ids, turn_images, multimodal_fields, num_generations, has_tool_images=False):
        out = client.generate(prompt_ids=turn_ids, images=[imgs or [] for imgs in turn_images], n=1, **params)
        return [list(r.completions[0].token_ids) for r in out.results], [list(r.completions[0].logprobs)
                                                                           for r in out.results]

    messages = [[{"role": "user", "content": QUESTION}] for _ in rows]
    out = trl_seam.run_tool_loop_on_copy(
        trainer, trainer.processing_class, [tool_tables(environment_tools(e)) for e in envs], [None] * len(rows),
        generate_turn, messages, [list(prompt_ids[r]) for r in rows], completion_ids, completions, logprobs,
        [list(images[r]) for r in rows])
    return out.completion_ids


def our_loop(trainer, prompt_ids, images, envs, max_tokens: int, asked: list | None = None) -> list[list[int]]:
    """(b): `AgentLoop.run`; each trajectory's completion ids. `asked`: each ask's (prompt ids, images, used)."""
    generation = trainer.vllm_generation
    params = dict(temperature=0.0, logprobs=True, max_tokens=max_tokens)

    def sample(turn_ids, turn_images, used, n):
        if asked is not None:
            asked.append((turn_ids, turn_images, used))
        return generation.sampler.sample(turn_ids, turn_images, used, {**params, "n": n}, None, 0)

    rollouts = generation.agent.run(prompt_ids, images, GENERATIONS, envs, [None] * len(envs), sample,
                                    generation.sampler.max_model_len())
    return [r.completion_ids for r in rollouts]


def generate_only(trainer, asked: list, max_tokens: int) -> float:
    """(c)'s generation: every ask of (b) again, without tools or parsing: the first turns in one request, then
    each trajectory's later turns one after another, every trajectory at once. Seconds."""
    sampler = trainer.vllm_generation.sampler
    params = dict(temperature=0.0, logprobs=True, max_tokens=max_tokens)
    chains: list[list[tuple]] = []  # per trajectory its later turns: each prompt continues the one before
    for ids, imgs, used in sorted(asked[1:], key=lambda a: len(a[0][0])):
        prompt = ids[0]
        continued = [c for c in chains if len(c[-1][0]) < len(prompt) and prompt[:len(c[-1][0])] == c[-1][0]]
        if continued:
            min(continued, key=len).append((prompt, imgs[0], used[0]))
        else:
            chains.append([(prompt, imgs[0], used[0])])

    def replay(chain):
        for prompt, imgs, used in chain:
            sampler.sample([prompt], [imgs], [used], {**params, "n": 1}, None, 0)

    start = time.perf_counter()
    sampler.sample(*asked[0], {**params, "n": GENERATIONS}, None, 0)
    with ThreadPoolExecutor(len(chains)) as pool:
        list(pool.map(replay, chains))
    return time.perf_counter() - start


def one_round(trainer, prompt_ids, images, seed: int, max_tokens: int) -> dict:
    """(a), (b) and (c)'s generation once, with what the tools did."""
    envs = environments(trainer, seed)
    start = time.perf_counter()
    trl_ids = trl_loop(trainer, prompt_ids, images, envs, max_tokens)
    out = dict(trl=time.perf_counter() - start, trl_calls=[e.calls for e in envs])
    envs, asked = environments(trainer, seed), []
    start = time.perf_counter()
    our_ids = our_loop(trainer, prompt_ids, images, envs, max_tokens, asked)
    out.update(ours=time.perf_counter() - start, our_calls=[e.calls for e in envs], same=our_ids == trl_ids,
               tools_longest=max(e.slept for e in envs), tools_total=sum(e.slept for e in envs))
    out["generate"] = generate_only(trainer, asked, max_tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--seed", type=int, default=0, help="seeds the tool latencies")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat (a), (b), (c) this many times and take the medians (a machine shared with other jobs)")
    args = parser.parse_args()

    model = tool_model()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-rollouts-"))
    random_image(IMAGE_SEED).save(work / "q.png")
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
           "image": "q.png", "solution": "red"}
    (work / "rows.jsonl").write_text(json.dumps(row) + "\n")
    server = ServerProcess(model, args.engine, log_dir=work)
    try:
        server.wait_ready(600)
        max_tokens = 96  # a call is 64 tokens, the answer 2
        method, align, config, _ = parse_args([
            "grpo", "--model", str(model), "--dataset", str(work / "rows.jsonl"), "--output_dir", str(work / "out"),
            "--vllm-mode", "server", "--server-url", server.url, "--environment", "__main__:LatencyZoom",
            "--per_device_train_batch_size", str(PROMPTS * GENERATIONS), "--num_generations", str(GENERATIONS),
            "--max_completion_length", "1024", "--report_to", "none", "--disable_tqdm", "true"])
        trainer = build_trainer(method, align, config)
        prompt = [{"role": "user", "content": [{"type": "image", "image": random_image(IMAGE_SEED)},
                                               {"type": "text", "text": QUESTION}]}]
        prompt_ids = trl_seam.tokenize_prompts(trainer, [prompt] * PROMPTS, [None] * PROMPTS)
        images = [[random_image(IMAGE_SEED)] for _ in range(PROMPTS)]
        our_loop(trainer, prompt_ids, images, environments(trainer, args.seed + 1), max_tokens)  # warm-up
        rounds = [one_round(trainer, prompt_ids, images, args.seed, max_tokens) for _ in range(args.rounds)]
    finally:
        server.stop()
    for r in rounds:
        if r["trl_calls"] != [CALLS] * len(r["trl_calls"]) or r["our_calls"] != r["trl_calls"]:
            sys.exit(f"tool calls per trajectory: TRL's loop {r['trl_calls']}, ours {r['our_calls']}: the model did "
                     f"not make its {CALLS} calls every time, nothing to compare")
    trl_s, ours_s, generate_s = (statistics.median(r[k] for r in rounds) for k in ("trl", "ours", "generate"))
    tools_longest, tools_total = rounds[0]["tools_longest"], rounds[0]["tools_total"]
    floor = generate_s + tools_longest
    print(f"{PROMPTS * GENERATIONS} trajectories x {CALLS} tool calls, latencies {LATENCY[0]}-{LATENCY[1]} s "
          f"(seed {args.seed}: {tools_total:.1f} s in all, {tools_longest:.2f} s on the longest trajectory), "
          f"{args.engine} engine, median of {args.rounds}")
    print(f"(a) TRL's loop through align-serve: {trl_s:.2f} s")
    print(f"(b) our loop:                       {ours_s:.2f} s (the same trajectories, token for token: "
          f"{'yes' if all(r['same'] for r in rounds) else 'no'})")
    print(f"(c) floor: generation only {generate_s:.2f} s + the longest trajectory's tools {tools_longest:.2f} s "
          f"= {floor:.2f} s")
    print(f"ratio agent rollout new / TRL loop: {ours_s / trl_s:.3f}")
    print(f"ratio agent rollout new / floor: {ours_s / floor:.3f}")


if __name__ == "__main__":
    main()
