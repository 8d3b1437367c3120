"""The one small interface both engines implement; routes only ever talk to this."""

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from PIL import Image

from protocol import SamplingParams

if TYPE_CHECKING:
    from protocol import LoraAdapter
    from server.engines.processing import ModelProcessing
    from server.staging import StagedWeights


class TransferStep(StrEnum):
    """The steps of vLLM's weight transfer (nccl/ipc), in order; ABORT ends one half way. The values
    are the wire's: the trainer names init, start and update in `POST /v1/weights/engine/{step}`."""

    INIT = "init"
    START = "start"
    UPDATE = "update"
    FINISH = "finish"
    ABORT = "abort"


class EngineUnavailable(RuntimeError):
    """The engine could not finish a request for now (aborted, paused): the client should retry."""


class EngineStartError(RuntimeError):
    """A start the user's flags cannot make: the message says which flag to change, no traceback needed."""


@dataclass
class EnginePrompt:
    prompt_ids: list[int]  # one image marker per image, one video marker per video
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)  # each video's frames, all of one size
    video_fps: list[float | None] = field(default_factory=list)  # each video's sampling rate (VideoRef.fps)


@dataclass
class EngineCompletion:
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: Literal["stop", "length"] | None  # None: a streamed part with more to come
    weight_version: int
    # with sampling.top_logprobs k: per step the k most likely (token id, logprob), most likely first
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Engine(ABC):
    name: str
    model_path: str
    max_model_len: int
    image_token_id: int | None
    eos_token_ids: list[int]
    processing: "ModelProcessing"  # tokenizer, chat template, image token counts
    weight_version: int = 0

    @abstractmethod
    async def start(self) -> None:
        """Load the model; the server reports ready after this returns."""

    @abstractmethod
    async def generate(self, prompts: list[EnginePrompt], sampling: SamplingParams) -> list[list[EngineCompletion]]:
        """`sampling.n` completions for each prompt, in order."""

    async def stream(self, prompt: EnginePrompt, sampling: SamplingParams) -> AsyncIterator[tuple[int, EngineCompletion]]:
        """One prompt's `sampling.n` completions as they grow: (choice index, its newest part), the last
        part of each with its `finish_reason`. Here each completion comes whole, as one part, once
        generated; an engine that can do better streams token by token."""
        outs = await self.generate([prompt], sampling)
        for k, c in enumerate(outs[0]):
            yield k, c

    async def shutdown(self) -> None:
        return None

    async def died(self) -> str:
        """Returns, saying why, once the engine can serve no more (its process is gone): the server then
        shuts down rather than answer every request with an error. An in-process engine never does."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    # ---- weight sync: server/weights.py runs it, the engine swaps the staged bytes in -----------
    weight_transports: tuple[str, ...] = ("http", "tcp", "shm")
    weight_sync_refused: str | None = None  # why this engine takes no weight sync at all, if it takes none
    weight_workers: int = 1  # processes an nccl weight group spans on this side
    max_lora_rank: int | None = None  # `--enable-lora`: adapters up to this rank; None: no adapter sync

    async def commit_weights(self, staged: "StagedWeights", version: int) -> None:
        """Swap the staged tensors in at once: batches in flight finish on the old weights (and
        carry the old version); every request after runs on the new ones, tagged `version`."""
        raise NotImplementedError(f"the {self.name} engine cannot load weights")

    async def commit_adapter(self, staged: "StagedWeights", adapter: "LoraAdapter", version: int) -> None:
        """Serve the staged LoRA adapter (PEFT names) on top of the base weights from now on, all or
        nothing: if this raises, the previous version still serves. Batches in flight finish on the
        previous adapter and carry the previous version."""
        raise NotImplementedError(f"the {self.name} engine cannot serve adapters")

    async def transfer_weights(self, step: TransferStep, info) -> None:
        """nccl/ipc: one step of vLLM's weight transfer."""
        raise NotImplementedError(f"the {self.name} engine has no nccl/ipc weight transfer")

    @property
    @abstractmethod
    def dtype_name(self) -> str:
        """What the served model computes in (float32, bfloat16, ...), as loaded."""

    def prompt_len(self, prompt: EnginePrompt) -> int:
        """Positions the prompt takes, its images and videos expanded."""
        return len(self.processing.expanded_ids(prompt))


def create_engine(name: str, **kwargs) -> Engine:
    if name == "transformers":
        from server.engines.transformers import TransformersEngine

        return TransformersEngine(**kwargs)
    if name == "vllm":
        from server.engines.vllm import VLLMEngine

        return VLLMEngine(**kwargs)
    raise ValueError(f"unknown engine {name!r}; choose vllm or transformers")
