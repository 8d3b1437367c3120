"""The trainer's weight pushes to its servers, and what it remembers of them.

Per server the pusher records the instance its last push went to and the weight_version that push
made (`last_push`): the rule that keeps training on-policy refuses an answer from another instance or
version (`ServerMoved`). A push cut short by a server restart is made again on the new instance; one
refused because another sync is open there waits for that sync's idle timeout, up to --server_timeout.

A LoRA run (`--use_peft`) pushes its adapter alone when every server takes adapters (`--lora_sync
adapter`, the default then): the base weights once per server instance, as a full sync, then one
adapter sync per push. `--lora_sync merged` pushes the whole model, adapter folded in, every time.
"""

import contextlib
import logging
import time

import torch.distributed
from accelerate.utils import broadcast_object_list

from trainer_client.client import AlignClient, AlignServerError
from trainer_client.waiting import WaitReport
from trainer_client.weights import (
    adapter_weights,
    is_peft_model,
    is_sharded,
    named_weights,
    push_gathered,
    push_one,
)

log = logging.getLogger(__name__)

# Refusals in a row before the run stops: each one re-pushes, so more means another writer.
MAX_REFUSALS = 5


class ServerMoved(RuntimeError):
    """The server moved under this request: the answer comes from an instance this trainer has not pushed
    to (a restart), or from weights its last push there did not make."""

    def __init__(self, server: int, message: str):
        super().__init__(message)
        self.server = server


class WeightPusher:
    def __init__(self, trainer, client: AlignClient | None, weight_transport: str = "auto",
                 server_timeout: float = 600.0, servers: int = 1, lora_sync: str = "auto"):
        self.trainer = trainer
        self.client = client  # None on every process but the main one
        self.weight_transport = weight_transport
        self.server_timeout = server_timeout
        self.servers = servers
        # per server: (instance_id, weight_version) our last push made there (on the main process; the
        # others keep ("", -1)); None: push before using it
        self._pushed: list[tuple[str, int] | None] = [None] * servers
        # adapter sync: per server, the instance our base weights went to (None: push them first)
        self._base_pushed: list[str | None] = [None] * servers
        # decided by the main process (it asks the servers), known to all: a sharded model's processes
        # all take part in each push, and must push the same tensors
        self.adapter_sync = broadcast_object_list([client is not None and self._adapter_sync(lora_sync)],
                                                  from_process=0)[0]

    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def sharded(self) -> bool:
        """FSDP2 or ZeRO-3 (known once the Trainer has prepared the model): the parameters are shards,
        and every process takes part in each push (weights.Gathered)."""
        return is_sharded(self.trainer.model.named_parameters())

    def last_push(self, server: int) -> tuple[str, int] | None:
        """(instance_id, weight_version) of this trainer's last push to `server`; None: push before using it."""
        return self._pushed[server]

    def unpushed(self) -> list[int]:
        """The servers to push to before using them."""
        return [i for i, p in enumerate(self._pushed) if p is None]

    def forget(self, server: int) -> None:
        """`server` no longer holds what this trainer pushed there: push to it before using it again."""
        self._pushed[server] = None

    def _adapter_sync(self, lora_sync: str) -> bool:
        """Whether each push carries the LoRA adapter alone (docs/lora.md)."""
        model = self.accelerator.unwrap_model(self.trainer.model)
        if lora_sync == "merged" or not is_peft_model(model):
            return False
        ranks = [self.client.info(refresh=True, server=i).limits.max_lora_rank for i in range(self.servers)]
        if lora_sync == "auto" and None in ranks:
            log.info("LoRA run: pushing merged weights (not every server runs with --enable-lora)")
            return False
        without = [url for url, rank in zip(self.client.base_urls, ranks, strict=True) if rank is None]
        if without:
            raise SystemExit(f"--lora_sync adapter: {', '.join(without)} takes no adapter sync; start align-serve "
                             "with --enable-lora, or use --lora_sync merged")
        config = model.peft_config[model.active_adapter]
        if config.lora_dropout:
            log.warning("LoRA run: lora_dropout=%g trains with dropout, the server applies none (as vLLM never "
                        "does); the rollouts are the model without dropout", config.lora_dropout)
        log.info("LoRA run: pushing the adapter alone after each step (the base weights once per server)")
        return True

    @contextlib.contextmanager
    def weights(self):
        """(pairs, adapter) a push of the trainer's model carries now: its adapter alone, or the whole
        (merged) model and None."""
        model = self.accelerator.unwrap_model(self.trainer.model)
        if self.adapter_sync:
            yield adapter_weights(model)
        else:
            with named_weights(model) as pairs:
                yield pairs, None

    def push(self, servers) -> None:
        """Push the trainer's weights to `servers` now: from the main process, or from every process of a
        sharded model (the other processes record ("", -1))."""
        servers = list(servers)
        main = self.accelerator.is_main_process
        if not servers or not (main or self.sharded):
            for server in servers:
                self._pushed[server] = ("", -1)
            return
        with self.weights() as (pairs, adapter):
            for server in servers:
                _, version = self.push_one(server, pairs, adapter)
                if main:
                    log.info("step %d: pushed %s, %s weight_version %d", self.trainer.state.global_step,
                             "the adapter" if adapter else "weights", self.client.base_urls[server], version)

    def push_one(self, server: int, pairs, adapter=None) -> tuple[str, int]:
        """One sync of `pairs` (after the base weights, for an adapter the instance has not had them); a sync
        cut short by a server restart is made again on the new instance. Records and returns (instance_id,
        weight_version). With sharded `pairs` every process runs this, and follows the main one's decisions
        (push the base? push again?)."""
        sharded, main = is_sharded(pairs), self.client is not None
        deadline = time.monotonic() + self.server_timeout
        held = WaitReport(f"{self.client.base_urls[server]} to take this trainer's weights", self.server_timeout,
                          "if another trainer pushes to this server, stop it or give each run its own server "
                          "(this run waits up to --server_timeout)") if main else None
        while True:
            instance = self.client.info(refresh=True, server=server).instance_id if main else ""
            before = self._pushed[server]
            if main and before is not None and before[0] not in ("", instance):
                # Said whenever it is seen, however the restart fell between this trainer's calls.
                log.warning("%s restarted (instance %s, was %s): pushing this trainer's weights to the new instance",
                            self.client.base_urls[server], instance[:8], before[0][:8])
            try:
                if adapter is not None:
                    base_needed = [self._base_pushed[server] != instance if main else None]
                    if sharded:
                        torch.distributed.broadcast_object_list(base_needed, src=0)
                    if base_needed[0]:
                        # LoRA never trains the base: reading it while the optimizer steps is safe.
                        model = self.accelerator.unwrap_model(self.trainer.model)
                        with named_weights(model, merge=False) as base:
                            self._send(server, base, self.weight_transport)
                        self._base_pushed[server] = instance
                # An adapter travels over a byte transport (http, tcp, shm): auto picks one when
                # the base goes over nccl/ipc.
                transport = "auto" if adapter is not None and self.weight_transport in ("nccl", "ipc") \
                    else self.weight_transport
                self._pushed[server] = (instance, self._send(server, pairs, transport, adapter).weight_version)
                return self._pushed[server]
            except Exception as exc:
                again = [self._again(exc, server, instance, deadline, held) if main else None]
                if sharded:
                    torch.distributed.broadcast_object_list(again, src=0)
                if not again[0]:
                    raise

    def _send(self, server: int, pairs, transport: str, adapter=None):
        """One sync of `pairs`: from every process when they are shards, else from the main one."""
        if is_sharded(pairs):
            return push_gathered(self.client, server, pairs, transport, adapter=adapter)
        return push_one(self.client, server, pairs, transport, adapter=adapter)

    def _again(self, exc: Exception, server: int, instance: str, deadline: float, held: WaitReport) -> bool:
        """Whether a failed push is worth making again, after waiting for what made it fail."""
        wait = _open_sync_expiry(exc)
        if wait is not None and time.monotonic() + wait < deadline:
            # A sync left open by a trainer that died mid-push (this run's previous life) is
            # dropped after the server's idle timeout; one held by a live trainer is not.
            held.say(f"409: another weight sync is open there, dropped if idle for {wait:.0f} s more")
            time.sleep(min(wait + 0.5, held.every))
            return True
        self.client.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        if self.client.info(refresh=True, server=server).instance_id == instance:
            return False
        log.warning("%s restarted during a weight push; pushing again", self.client.base_urls[server])
        return True


def _open_sync_expiry(exc: Exception) -> float | None:
    """Seconds until the server drops the weight sync that made it refuse ours, if that was why."""
    if isinstance(exc, AlignServerError) and exc.code == "conflict" and isinstance(exc.detail, dict):
        return exc.detail.get("expires_in_s")
    return None
