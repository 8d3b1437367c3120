"""Portable engine: any HF VLM through `generate`, on any device. The reference vLLM is tested against.

Concurrent requests with the same sampling parameters are merged into one padded `generate` call
(a micro-batcher), which runs in a worker thread so the event loop keeps serving.
"""

import asyncio
import threading
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from protocol import SamplingParams
from runtime import mrope
from server.engines import Engine, EngineCompletion, EnginePrompt
from server.engines.processing import ModelProcessing

MAX_BATCH_SEQUENCES = 256


class _Abandoned(StoppingCriteria):
    """Ends a `generate` early once nobody waits for its answer."""

    def __init__(self, abandoned):
        self.abandoned = abandoned

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.abandoned(), dtype=torch.bool, device=input_ids.device)


@dataclass
class _Job:
    prompts: list[EnginePrompt]
    sampling: SamplingParams
    future: asyncio.Future


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int | None = None,
                 device: str | None = None, seed: int = 0, trust_remote_code: bool = False,
                 mm_processor_kwargs: dict | None = None, enable_lora: bool = False, max_lora_rank: int = 16,
                 **_ignored):
        self.model_path = model
        self.trust_remote_code = trust_remote_code
        self.dtype = dtype
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.seed = seed
        self.mm_processor_kwargs = mm_processor_kwargs
        self._max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank if enable_lora else None
        self.peft = None  # the PeftModel wrapping self.model while an adapter is served
        self._adapter: dict | None = None  # the LoraConfig fields self.peft was built with
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        # Held while the model runs or while weights are swapped: a sync never lands mid-batch.
        self.model_lock = threading.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._batch_loop())

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self.processing = ModelProcessing(self.model_path, trust_remote_code=self.trust_remote_code,
                                          mm_processor_kwargs=self.mm_processor_kwargs)
        torch.manual_seed(self.seed)
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[self.dtype]
        if self.device == "cpu" and dtype == "auto":
            dtype = torch.float32  # half precision on CPU is slow and diverges from fp32 references
        cls = AutoModelForImageTextToText if self.processing.is_vlm else AutoModelForCausalLM
        mrope.install()  # a video's positions as vLLM's (and the trainer's)
        self.model = cls.from_pretrained(self.model_path, dtype=dtype,
                                          trust_remote_code=self.trust_remote_code).to(self.device).eval()
        self.image_token_id = self.processing.image_token_id
        self.eos_token_ids = self.processing.eos_token_ids
        self.max_model_len = self._max_model_len or self.processing.max_position_embeddings

    @property
    def dtype_name(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    async def shutdown(self) -> None:
        if self._worker:
            self._worker.cancel()

    async def generate(self, prompts: list[EnginePrompt], sampling: SamplingParams) -> list[list[EngineCompletion]]:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(prompts, sampling, future))
        return await future

    async def _batch_loop(self) -> None:
        pending: list[_Job] = []
        while True:
            if not pending:
                pending.append(await self._queue.get())
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            # Take the first job plus every waiting job with identical sampling, up to the batch cap.
            head = pending[0]
            batch, rest, size = [], [], 0
            for job in pending:
                cost = len(job.prompts) * job.sampling.n
                if job.sampling == head.sampling and (not batch or size + cost <= MAX_BATCH_SEQUENCES):
                    batch.append(job)
                    size += cost
                else:
                    rest.append(job)
            pending = rest
            prompts = [p for job in batch for p in job.prompts]

            def abandoned(batch=batch) -> bool:  # every caller gave up (a --generate-timeout): stop computing
                return all(job.future.cancelled() for job in batch)

            try:
                out = await asyncio.to_thread(self._generate_locked, prompts, head.sampling, abandoned)
            except Exception as exc:  # a failed batch fails its requests, never the loop
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result(out[start : start + len(job.prompts)])
                start += len(job.prompts)

    async def commit_weights(self, staged, version: int) -> None:
        await asyncio.to_thread(self._swap_weights, staged, version)

    def _swap_weights(self, staged, version: int) -> None:
        # The batch loop holds model_lock for a whole generate: a running batch finishes on the old
        # weights with the old version, the next one starts on the new weights with the new version.
        with self.model_lock, torch.no_grad():
            self._drop_adapter()  # a full sync is the whole model: no adapter on top of it
            params = self.model.state_dict(keep_vars=True)
            for name, tensor in staged.tensors():
                params[name].copy_(tensor)
            self.weight_version = version

    async def commit_adapter(self, staged, adapter, version: int) -> None:
        await asyncio.to_thread(self._swap_adapter, staged, adapter, version)

    def _swap_adapter(self, staged, adapter, version: int) -> None:
        """Through PEFT, as the trainer computes it: the LoRA layers are injected into self.model
        (so its `generate` applies them) once per config, then each version copies its tensors in."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        tensors = {name: t.to(self.device) for name, t in staged.tensors()}
        modules = sorted({name.removeprefix("base_model.model.").rsplit(".", 2)[0] for name in tensors})
        fields = dict(r=adapter.r, lora_alpha=adapter.lora_alpha, target_modules=modules,
                      use_rslora=adapter.use_rslora, rank_pattern=adapter.rank_pattern,
                      alpha_pattern=adapter.alpha_pattern)
        with self.model_lock, torch.no_grad():
            if fields != self._adapter:
                self._drop_adapter()
                dtype = next(self.model.parameters()).dtype
                self.peft = get_peft_model(self.model, LoraConfig(**fields, lora_dropout=0.0))
                self.peft.to(dtype)  # PEFT makes the new layers float32; serve them as the base is served
                self._adapter = fields
            result = set_peft_model_state_dict(self.peft, tensors)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing:  # the init checks make this unreachable; never serve half an adapter silently
                raise RuntimeError(f"the adapter left {len(missing)} LoRA weights unset (first: {missing[0]})")
            self.weight_version = version

    def _drop_adapter(self) -> None:
        if self.peft is not None:
            self.model = self.peft.unload()  # the base modules back, unmerged
            self.peft, self._adapter = None, None

    def _generate_locked(self, prompts: list[EnginePrompt], sampling: SamplingParams,
                         abandoned=lambda: False) -> list[list[EngineCompletion]]:
        # A request bigger than one batch runs as several `generate` calls, never one huge one.
        per_call = max(1, MAX_BATCH_SEQUENCES // sampling.n)
        with self.model_lock, torch.inference_mode():
            version = self.weight_version
            rows = []
            for start in range(0, len(prompts), per_call):
                if abandoned():
                    return []
                rows += self._generate(prompts[start : start + per_call], sampling, abandoned)
        n = sampling.n
        return [
            [EngineCompletion(*row[:4], weight_version=version, top_logprobs=row[4]) for row in rows[i * n : (i + 1) * n]]
            for i in range(len(prompts))
        ]

    def _generate(self, prompts: list[EnginePrompt], sampling: SamplingParams, abandoned=lambda: False):
        n = sampling.n
        expanded = [p for p in prompts for _ in range(n)]
        inputs = self.processing.model_inputs(expanded, self.device)
        greedy = sampling.temperature == 0.0
        kwargs = dict(
            max_new_tokens=sampling.max_tokens,
            do_sample=not greedy,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.processing.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
            suppress_tokens=self.processing.suppressed_token_ids or None,
            stopping_criteria=StoppingCriteriaList([_Abandoned(abandoned)]),
        )
        if not greedy:
            kwargs.update(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else None,
                min_p=sampling.min_p or None,
            )
        else:  # the model's generation_config may carry sampling defaults; greedy ignores them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.processing.tokenizer)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(**inputs, **kwargs)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        # scores are the processed logits each token was sampled from (temperature, top-k/p, penalties)
        logprobs = top = None
        if sampling.logprobs:
            steps = torch.stack(out.scores, dim=1).float().log_softmax(-1)
            logprobs = steps.gather(-1, torch.tensor(new_tokens, device=steps.device).unsqueeze(-1)).squeeze(-1).tolist()
            if sampling.top_logprobs:  # the k most likely tokens of the same processed distribution
                values, ids = steps.topk(sampling.top_logprobs, dim=-1)
                top = [[list(zip(i, v, strict=True)) for i, v in zip(row_i, row_v, strict=True)]
                       for row_i, row_v in zip(ids.tolist(), values.tolist(), strict=True)]
        eos = set(self.eos_token_ids)
        rows = []
        for i, tokens in enumerate(new_tokens):
            length, reason = len(tokens), "length"
            for j, t in enumerate(tokens):
                if t in eos:
                    length, reason = j + 1, "stop"
                    break
            tokens = tokens[:length]
            if sampling.stop:
                # A row that met a stop string is padded after it, and pad may also be an EOS id:
                # keep only the tokens up to the one that completed the stop string.
                for k in range(1, len(tokens) + 1):
                    if any(s in self.processing.tokenizer.decode(tokens[:k], skip_special_tokens=True) for s in sampling.stop):
                        length, reason, tokens = k, "stop", tokens[:k]
                        break
            text = self.processing.tokenizer.decode(tokens, skip_special_tokens=True)
            cuts = [text.find(s) for s in sampling.stop if s in text]
            if cuts:
                text = text[: min(cuts)]
            rows.append((tokens, logprobs[i][:length] if logprobs else None, text, reason,
                         top[i][:length] if top else None))
        return rows
