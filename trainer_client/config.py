"""`align-train` configuration: TRL's own `GRPOConfig` / `DPOConfig` / `SFTConfig` fields plus ours, from YAML
and flags.

Every TRL field keeps its name (`--learning_rate` or `--learning-rate`, `learning_rate:` in YAML), so a
TRL recipe carries over. Precedence: method preset < YAML (`--config`) < flags.
"""

import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from trl import DPOConfig, GRPOConfig, ModelConfig, SFTConfig, TrlParser

from runtime import kv_cache

METHODS = ("sft", "grpo", "gspo", "mpo")

# Values from the papers, as TRL documents them (GSPO: Zheng et al. 2025; MPO: Wang et al. 2024); each one stays overridable.
PRESETS: dict[str, dict] = {
    # Loss on the assistant's tokens only (trainer_client/sft.py masks them; TRL's own masking refuses
    # vision datasets before transformers 5.18).
    "sft": {"assistant_only_loss": True},
    "grpo": {},
    # GSPO also sets steps_per_generation = 4 x gradient_accumulation_steps (see parse_args).
    "gspo": {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.0,
             "loss_type": "grpo"},
    "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
}


@dataclass
class AlignArguments:
    """Ours: what TRL's configs do not name (model and data paths, the rollout server, rewards)."""

    dataset: str | None = field(default=None, metadata={
        "help": "A .jsonl/.json/.parquet file (image paths relative to it) or a `datasets` dataset saved with "
                "save_to_disk; or give --dataset_name."})
    # TRL's ScriptArguments names, so a TRL script's data flags carry over.
    dataset_name: str | None = field(default=None, metadata={
        "help": "A dataset hub id (ORG/NAME, through the Hugging Face cache; HF_HUB_OFFLINE applies) or a local "
                "dataset folder (data/train-*.parquet ...), loaded with datasets.load_dataset."})
    dataset_config: str | None = field(default=None, metadata={
        "help": "The configuration (subset) of --dataset_name, datasets.load_dataset's `name`."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    dataset_test_split: str = field(default="test", metadata={
        "help": "Split of --dataset_name to evaluate on, when it exists (evaluation runs per --eval_strategy)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "A system message put before every prompt that has none."})
    model: str | None = field(default=None, metadata={
        "help": "The policy: a hub id (ORG/NAME, through the Hugging Face cache; HF_HOME, HF_HUB_OFFLINE and "
                "--model_revision apply) or a local HF model directory with its processor; TRL's "
                "--model_name_or_path is accepted too."})
    server_url: list[str] = field(default_factory=list, metadata={
        "help": "align-serve base URL for --vllm-mode server; repeat the flag for several servers.",
        "action": "extend"})
    api_key: str | None = field(default=None, metadata={"help": "Bearer token of align-serve (or ALIGN_API_KEY)."})
    weight_transport: str = field(default="auto", metadata={
        "help": "How weights reach the server after each optimizer step: auto, nccl, ipc, tcp, shm or http."})
    lora_sync: str = field(default="auto", metadata={
        "help": "With --use_peft in server mode, what each push carries: adapter (the LoRA tensors alone, after "
                "one push of the base weights; needs align-serve --enable-lora), merged (the whole model with "
                "the adapter folded in) or auto (adapter when every server takes adapters). docs/lora.md",
        "choices": ["auto", "adapter", "merged"]})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"], metadata={
        "help": "Rewards for GRPO/GSPO: built-in format, think_format, accuracy, or any module:function."})
    server_timeout: float = field(default=600.0, metadata={
        "help": "Seconds to wait for the server to be ready, at start and whenever it restarts mid-run."})
    tools: list[str] = field(default_factory=list, metadata={
        "help": "GRPO/GSPO: tools the model may call, as module:function (type hints and a docstring describe "
                "each one to the model). SFT: the tools described in the prompt. Repeat or "
                "list several.", "action": "extend"})
    environment: str | None = field(default=None, metadata={
        "help": "GRPO/GSPO: TRL's environment_factory as module:Factory; one instance per rollout, its public "
                "methods (but reset and get_reward) are tools, reset(**row) starts a rollout, get_reward() (if "
                "defined) scores it. SFT: its methods are the tools described in the prompt."})
    video_fps: float | None = field(default=None, metadata={
        "help": "Frames per second sampled from each video file (default: the server's, else the model's video "
                "processor's, else 2). docs/video.md"})
    video_max_frames: int | None = field(default=None, metadata={
        "help": "Frames per video at most (more are thinned evenly); at most the server's max_frames (its default)."})
    video_max_pixels: int | None = field(default=None, metadata={
        "help": "Pixels per video frame at most: the video processor's max_pixels, which must be the server's "
                "(align-serve --mm-processor-kwargs '{\"videos_kwargs\": {...}}'); default: the server's."})
    video_total_pixels: int | None = field(default=None, metadata={
        "help": "Pixels of all of a video's frames together at most (frames scaled down to fit, before they are "
                "sent); default: no bound beyond max_frames x max_pixels."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "A second dataset file (same formats as --dataset) for --eval_strategy steps: greedy completions "
                "scored by the reward functions (eval_reward, eval_rewards/<name>/mean)."})


def _vllm_mode_field(choices: list[str], default: str):
    return field(default=default, metadata={
        "help": "Where rollouts are generated: server (align-serve through AlignClient), colocate (vLLM in "
                "this process) or none (transformers generate in this process).",
        "choices": choices})


@dataclass
class GRPORunConfig(GRPOConfig):
    # TRL's `vllm_mode` plus `none`, which stands for TRL's `use_vllm=False`.
    vllm_mode: str = _vllm_mode_field(["server", "colocate", "none"], "none")
    async_rollouts: bool = field(default=False, metadata={
        "help": "Server mode: the server generates the next batches while the trainer trains on this one "
                "(trainer_client/async_rollouts.py)."})
    max_staleness: int = field(default=1, metadata={
        "help": "With --async_rollouts: how many batches are generated ahead, and the most weight versions a "
                "trained completion may lag the trainer's weights (older groups are dropped and generated again)."})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "DAPO's dynamic sampling: drop groups whose rewards all agree (zero advantage) and generate "
                "for more prompts until the batch is full (trainer_client/dynamic_sampling.py)."})
    vllm_kv_cache_memory_bytes: str | None = field(default=None, metadata={
        "help": "Colocate: vLLM's KV cache size (bytes, or 512M, 2G), whatever the machine holds. Default on CPU: "
                "2 sequences of --vllm_max_model_length tokens, at least 32768 tokens (vLLM-CPU would otherwise "
                "take a share of the NUMA node minus this process's memory); on GPU: vLLM's."})
    parity_check: str = field(default="refuse", metadata={
        "help": "Server and colocate modes: before the first optimizer step, check that the servers read the first "
                "prompt as the trainer does (chat template, image expansion) and that the first batch's sampled "
                "logprobs match the trainer's within a tolerance set by the dtype; refuse stops the run naming the "
                "cause, warn logs it and trains on, off skips it (docs/health.md).",
        "choices": ["refuse", "warn", "off"]})
    max_resample_rounds: int = field(default=4, metadata={
        "help": "With --dynamic_sampling: at most this many extra generation rounds per batch; a batch still "
                "short after them trains on the informative groups it has."})
    tool_workers: int = field(default=64, metadata={
        "help": "Server mode with tools: how many sync tool calls of a batch run at once, each trajectory on "
                "its own (trainer_client/agent_loop.py); async def tools run on one event loop."})
    tool_timeout: float = field(default=120.0, metadata={
        "help": "Server mode with tools: seconds a tool call may take; one that takes longer answers the model "
                "with an error, counts as failed and is warned about by name."})


@dataclass
class SFTRunConfig(SFTConfig):
    # SFT learns from fixed conversations: nothing to generate.
    vllm_mode: str = _vllm_mode_field(["none"], "none")


@dataclass
class MPORunConfig(DPOConfig):
    # MPO learns from a fixed preference dataset: nothing to generate.
    vllm_mode: str = _vllm_mode_field(["none"], "none")


def _bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


def _given(name: str, argv: list[str], yaml_keys: set[str]) -> bool:
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return name in yaml_keys or any(a.split("=", 1)[0] in flags for a in argv)


def _yaml_keys(argv: list[str]) -> set[str]:
    import yaml

    if "--config" not in argv:
        return set()
    with open(argv[argv.index("--config") + 1]) as f:
        return set((yaml.safe_load(f) or {}).keys())


def _check_rollout_flags(config: GRPORunConfig) -> None:
    if config.async_rollouts and config.vllm_mode != "server":
        raise SystemExit(f"--async_rollouts needs --vllm-mode server (got {config.vllm_mode}): only align-serve "
                         "generates while the trainer trains")
    if config.async_rollouts and config.max_staleness < 1:
        raise SystemExit(f"--max_staleness must be >= 1 (got {config.max_staleness})")
    if config.dynamic_sampling and config.vllm_mode == "colocate":
        raise SystemExit("--dynamic_sampling works with --vllm-mode server or none, not colocate")
    if config.vllm_kv_cache_memory_bytes is not None:
        try:
            config.vllm_kv_cache_memory_bytes = kv_cache.parse_bytes(config.vllm_kv_cache_memory_bytes)
        except ValueError as exc:
            raise SystemExit(f"--vllm_kv_cache_memory_bytes: {exc}") from None
    if config.max_resample_rounds < 0:
        raise SystemExit(f"--max_resample_rounds must be >= 0 (got {config.max_resample_rounds})")
    # One generation batch spans steps_per_generation / gradient_accumulation_steps optimizer steps:
    # that many weight versions pass while it is trained on, so async rollouts lag at least as much.
    spans = -(-config.steps_per_generation // config.gradient_accumulation_steps)
    if config.async_rollouts and config.max_staleness < spans:
        raise SystemExit(f"--max_staleness {config.max_staleness} is below the {spans} optimizer steps one generation "
                         f"batch spans (steps_per_generation {config.steps_per_generation} / "
                         f"gradient_accumulation_steps {config.gradient_accumulation_steps}): raise it to {spans}")


def _check_tool_flags(align: AlignArguments, config: GRPORunConfig, given: set[str]) -> None:
    """`given`: the flags set on the command line or in --config."""
    tools = bool(align.tools or align.environment)
    if config.max_tool_calling_iterations is not None and config.max_tool_calling_iterations < 1:
        raise SystemExit(f"--max_tool_calling_iterations must be >= 1 (got {config.max_tool_calling_iterations})")
    if config.max_tool_calling_iterations is not None and not tools:
        raise SystemExit("--max_tool_calling_iterations needs --tools or --environment: without them nothing calls a tool")
    if config.tool_workers < 1:
        raise SystemExit(f"--tool_workers must be >= 1 (got {config.tool_workers})")
    if not config.tool_timeout > 0:
        raise SystemExit(f"--tool_timeout must be above 0 seconds (got {config.tool_timeout:g})")
    for name in ("tool_workers", "tool_timeout"):
        if name in given and not tools:
            raise SystemExit(f"--{name} needs --tools or --environment: without them nothing calls a tool")
        if name in given and config.vllm_mode != "server":
            raise SystemExit(f"--{name} applies to --vllm-mode server (got {config.vllm_mode}), where our loop runs "
                             "the tools; colocate and none run TRL's, which calls them one after another")


def _parse(parser: TrlParser, argv: list[str]):
    """TRL's parse, with its refusals of bad values (TRL configs' checks, a missing --config) as one line."""
    try:
        return parser.parse_args_and_config(argv)
    except FileNotFoundError as exc:
        raise SystemExit(f"align-train: --config {exc.filename}: no such file") from None
    except ValueError as exc:
        raise SystemExit(f"align-train: {exc}") from None


RunConfig = GRPORunConfig | MPORunConfig | SFTRunConfig


def parse_args(argv: list[str] | None = None) -> tuple[str, AlignArguments, RunConfig, ModelConfig]:
    """`[method, ...flags]` -> (method, our arguments, the TRL config, TRL's model arguments).

    TRL's `ModelConfig` is parsed as TRL's own scripts do: `--use_peft --lora_r 16 ...` trains a
    LoRA adapter, `--dtype` and `--attn_implementation` reach the model's `from_pretrained`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in METHODS:
        raise SystemExit(f"usage: align-train {{{','.join(METHODS)}}} --model ID_OR_PATH "
                         "(--dataset FILE | --dataset_name ID_OR_FOLDER) "
                         "[--config run.yaml] [flags]   (align-train METHOD --help lists every flag; "
                         "align-train check [grpo|gspo] FLAGS checks a setup without training)")
    method, argv = argv[0], argv[1:]
    config_cls = {"mpo": MPORunConfig, "sft": SFTRunConfig}.get(method, GRPORunConfig)
    parser = TrlParser((AlignArguments, config_cls, ModelConfig), prog=f"align-train {method}")
    # TRL defaults to bf16, which fails on machines without a bf16 GPU: default to what this machine has.
    # Evaluation is greedy (trainers.py): one completion per prompt says all there is to say.
    greedy_eval = {"num_generations_eval": 1} if config_cls is GRPORunConfig else {}
    # Pinned memory needs an accelerator; without one torch warns at every epoch that it ignores it.
    parser.set_defaults(output_dir=f"runs/{method}", report_to="none", logging_steps=1, bf16=_bf16_gpu(),
                        dataloader_pin_memory=_accelerator(),
                        **greedy_eval, **PRESETS[method])
    align, config, model_args = _parse(parser, argv)
    if method == "gspo" and not _given("steps_per_generation", argv, _yaml_keys(argv)):
        parser.set_defaults(steps_per_generation=4 * config.gradient_accumulation_steps)
        align, config, model_args = _parse(parser, argv)
    align.model = align.model or model_args.model_name_or_path
    if not align.model:
        raise SystemExit("align-train: give the policy with --model PATH (or TRL's --model_name_or_path)")
    if bool(align.dataset) == bool(align.dataset_name):
        raise SystemExit("align-train: give the data with --dataset FILE or --dataset_name ID_OR_FOLDER (one of them)")
    if config.vllm_mode == "server" and not align.server_url:
        raise SystemExit("--vllm-mode server needs at least one --server-url (an align-serve base URL)")
    for url in align.server_url:
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"--server-url {url}: give the base URL with its scheme, e.g. http://{url}")
        parts = urlsplit(url)
        if parts.path.strip("/"):
            raise SystemExit(f"--server-url {url}: give the server's base URL, without a path: "
                             f"{parts.scheme}://{parts.netloc}")
    if not align.server_timeout > 0:
        raise SystemExit(f"--server_timeout must be above 0 seconds (got {align.server_timeout:g})")
    if config_cls is GRPORunConfig:
        _check_rollout_flags(config)
        yaml_keys = _yaml_keys(argv)
        _check_tool_flags(align, config, {n for n in ("tool_workers", "tool_timeout") if _given(n, argv, yaml_keys)})
    elif method == "mpo" and (align.tools or align.environment):
        raise SystemExit("align-train mpo: --tools and --environment are for grpo and gspo, which generate")
    init = {k: v for k, v in (("dtype", model_args.dtype), ("attn_implementation", model_args.attn_implementation))
            if v is not None}
    if init:
        config.model_init_kwargs = {**(config.model_init_kwargs or {}), **init}
    return method, align, config, model_args
