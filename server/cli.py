"""`align-serve`: the rollout server daemon."""

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from runtime import kv_cache
from runtime.model_hub import ModelNotFound, resolve_model
from server.lifetime import tie_children_to_this_process, tie_spawned_child

log = logging.getLogger("align-serve")
tie_spawned_child()  # a child spawned by align-serve (vLLM on CUDA) ends when its parent does


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align-serve", description="Serve a VLM for RL rollouts (protocol v1).")
    p.add_argument("--model", required=True,
                   help="hub id (ORG/NAME, through the Hugging Face cache; HF_HOME and HF_HUB_OFFLINE apply) "
                        "or a local model directory (HF format)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model (default: main)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model's repository run its own modelling code (needed by some hub models)")
    p.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: the model dir name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("ALIGN_API_KEY"),
                   help="bearer token required on every route but /health (default: $ALIGN_API_KEY)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-model-len", type=_positive(int), default=None,
                   help="default and most: the model's max_position_embeddings")
    p.add_argument("--max-pixels", type=_positive(int), default=4096 * 4096, help="largest image accepted, in pixels")
    p.add_argument("--max-image-bytes", type=_positive(int), default=16 * 1024 * 1024, help="largest encoded image accepted")
    p.add_argument("--max-images-per-prompt", type=_positive(int), default=8)
    p.add_argument("--max-videos-per-prompt", type=int, choices=range(0, 65), default=1, metavar="0..64",
                   help="videos one prompt may hold (each a list of frames, budgets from --mm-processor-kwargs); "
                        "0 takes none. A model family without video takes none")
    p.add_argument("--image-cache-bytes", type=int, default=2 * 1024**3, help="decoded-image cache bound (LRU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM on GPU: fraction of the GPU's memory to take (default 0.9). No effect on CPU, where "
                        "the KV cache has a fixed size (--kv-cache-memory-bytes)")
    p.add_argument("--kv-cache-memory-bytes", type=_size, default=None,
                   help="vLLM: the KV cache's size (bytes, or 512M, 2G), whatever the machine holds. Default on "
                        "CPU: 2 sequences of --max-model-len tokens, at least 32768 tokens; on GPU: vLLM's, "
                        "from --gpu-memory-utilization")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true", help="vLLM: no graph capture / compilation (faster start)")
    p.add_argument("--seed", type=int, default=0)
    lora = p.add_argument_group("LoRA", "adapter-only weight sync (docs/lora.md); vLLM's names")
    lora.add_argument("--enable-lora", action="store_true",
                      help="accept adapter syncs: a LoRA trainer then pushes its adapter, not the whole model")
    lora.add_argument("--max-lora-rank", type=int, default=16,
                      help="largest adapter rank accepted (vLLM takes 1, 8, 16, 32, 64, 128, 256, 320, 512)")
    lora.add_argument("--max-loras", type=_positive(int), default=1,
                      help="vLLM: adapters in one batch (the served version, plus the previous one while its "
                           "requests finish after a sync; 2 lets them share batches)")
    # `vllm serve`'s own flags for RL serving, handed to vLLM's engine args unchanged (vLLM checks them).
    vllm = p.add_argument_group("vLLM engine", "as `vllm serve` takes them; default: vLLM's")
    vllm.add_argument("--model-impl", choices=["auto", "vllm", "transformers", "terratorch"], default=None,
                      help="vLLM's implementation of the model, or transformers' modeling code run by vLLM")
    vllm.add_argument("--data-parallel-size", type=int, default=None, help="engine replicas behind this server")
    vllm.add_argument("--max-num-seqs", type=int, default=None, help="sequences one scheduler step batches")
    vllm.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                      help="reuse the KV cache of shared prompt prefixes (a GRPO group shares its prompt)")
    vllm.add_argument("--kv-cache-dtype", default=None, help="auto, fp8, fp8_e4m3, ... (vLLM's choices)")
    vllm.add_argument("--mm-processor-kwargs", type=_json_object, default=None,
                      help='JSON for the HF processor, e.g. \'{"max_pixels": 1003520}\' (the transformers '
                           "engine applies it too)")
    p.add_argument("--chat-template", type=_text_file, default=None, metavar="FILE",
                   help="a Jinja chat template used instead of the model's (as `vllm serve` takes it), e.g. a "
                        "tool-capable one for a model whose own template cannot render tools")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # Timeouts: no peer can hold the server by stalling.
    p.add_argument("--body-timeout", type=_positive(float), default=300.0,
                   help="seconds a request body (an image upload, a weight bucket) may take to arrive; then 408")
    p.add_argument("--generate-timeout", type=_positive(float), default=600.0,
                   help="seconds one generate or chat request may run; then 504 (the request is cancelled)")
    return p


VLLM_ONLY = ("model_impl", "data_parallel_size", "max_num_seqs", "enable_prefix_caching", "kv_cache_dtype")


def _positive(kind: type):
    """An argparse type: a number above 0 (a zero or negative timeout or limit would refuse everything)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def _size(text: str) -> int:
    try:
        return kv_cache.parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _text_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None


def _check_max_model_len(args: argparse.Namespace) -> None:
    """A --max-model-len above the model's positions, refused in one line before anything loads (vLLM's own
    refusal comes after its imports, as a pydantic error that speaks of CUDA even on CPU)."""
    try:
        config = json.loads((Path(args.model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return  # not a model directory: the engine says so
    text = config.get("text_config") or config
    limit = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    # A RoPE scaling factor stretches the positions (vLLM multiplies by it): leave that case to the engine.
    if not limit or args.max_model_len <= limit or (isinstance(rope, dict) and "factor" in rope):
        return
    if args.engine == "vllm" and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == "1":
        return  # vLLM's own override, at the user's risk
    sys.exit(f"align-serve: --max-model-len {args.max_model_len} is above the {limit} positions of {args.model} "
             f"(its max_position_embeddings): give at most {limit}, or leave the flag out to get {limit}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, e.g. '{{\"max_pixels\": 1003520}}', not {text!r}")
    return value


def _report_load_failure(args: argparse.Namespace, exc: Exception) -> None:
    from server.engines import EngineStartError

    if isinstance(exc, EngineStartError):  # ours: the message names the flag to change
        log.error("align-serve: %s", exc)
        return
    what = f"failed to load {args.model} with the {args.engine} engine"
    if not isinstance(exc, ValueError):
        log.error(what, exc_info=exc)
        return
    # vLLM refuses engine arguments (a flag's value, the model's config) with a ValueError or a pydantic
    # ValidationError: its message is the news, the traceback noise (kept for --log-level debug).
    messages = ([": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in exc.errors()]
                if isinstance(exc, ValidationError) else [str(exc)])
    log.error("%s: %s", what, "; ".join(messages))
    log.debug("the engine's traceback", exc_info=exc)


async def serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.config import ServeConfig
    from server.engines import create_engine

    started = time.perf_counter()
    # Named as vLLM names it: what the user typed for a hub id, the directory's name for a path.
    model_name = args.served_model_name or (Path(args.model).resolve().name if Path(args.model).is_dir()
                                            else args.model)
    engine = create_engine(
        args.engine, model=str(args.model_dir), trust_remote_code=args.trust_remote_code, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager, max_images_per_prompt=args.max_images_per_prompt,
        max_videos_per_prompt=args.max_videos_per_prompt,
        mm_processor_kwargs=args.mm_processor_kwargs, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enable_lora=args.enable_lora, max_lora_rank=args.max_lora_rank, max_loras=args.max_loras,
        vllm_args={k: getattr(args, k) for k in VLLM_ONLY if getattr(args, k) is not None},
    )
    app = create_app(engine, ServeConfig(model_name=model_name, api_key=args.api_key, max_pixels=args.max_pixels,
                                         max_image_bytes=args.max_image_bytes,
                                         max_images_per_prompt=args.max_images_per_prompt,
                                         max_videos_per_prompt=args.max_videos_per_prompt,
                                         image_cache_bytes=args.image_cache_bytes,
                                         body_timeout_s=args.body_timeout, generate_timeout_s=args.generate_timeout,
                                         chat_template=args.chat_template))
    server = _uvicorn_server(app, args)
    # Bind before loading (minutes on vLLM): a taken port fails at once, and /health answers
    # while the model loads.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        log.error("cannot bind %s:%d (%s); pick another --port", args.host, args.port, exc.strerror)
        return 2
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    starting = asyncio.create_task(engine.start())
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        if signals and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C: stop waiting for open connections
        signals.append(sig)
        log.warning("%s received: shutting down", signal.Signals(sig).name)
        server.should_exit = True
        starting.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    # Every way out passes the `finally`: the engine (vLLM's engine core, its workers) ends with us.
    try:
        try:
            await starting
        except asyncio.CancelledError:
            return 128 + signals[0]
        except Exception as exc:
            _report_load_failure(args, exc)
            return 1
        _family_limits(engine, app.state.config)
        app.state.ready = True
        log.info("ready: %s on the %s engine at http://%s:%d (%.1f s to load)", model_name, args.engine,
                 args.host, args.port, time.perf_counter() - started)
        died = asyncio.create_task(engine.died())
        await asyncio.wait({serving, died}, return_when=asyncio.FIRST_COMPLETED)
        if died.done():
            log.error("align-serve: %s; shutting down", died.result())
            return 1
        died.cancel()
        return 128 + signals[0] if signals else 0
    finally:
        server.should_exit = True
        await serving
        await engine.shutdown()


def _family_limits(engine, config) -> None:
    """The served family's own limits on what a request holds, where lower than the flags'."""
    config.video_refusal = engine.processing.video_refusal()
    family = engine.processing.family
    if config.video_refusal is not None:
        config.max_videos_per_prompt = 0
        if family is not None and family.video:
            log.warning("no video served: %s", config.video_refusal)
    else:
        config.max_frames_per_video = engine.processing.images.video_budgets()["max_frames"]
        config.video_fps_read_by = family.name if family.video_fps else None
    if family is None:
        return
    config.max_images_per_prompt, why = family.images_limit(config.max_images_per_prompt)
    if why:
        config.max_images_why = why
        log.info("at most %d image(s) per prompt: %s", config.max_images_per_prompt, why)


def _uvicorn_server(app, args: argparse.Namespace):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling, which `serve` owns: uvicorn re-raises a caught
        SIGTERM once it is done serving, and the process would end before the engine is shut down."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                 timeout_graceful_shutdown=5))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # vLLM logs through its own handler at its own level (INFO): --log-level sets it too, before vLLM is
    # imported, in this process and the engine processes it starts (they inherit the environment).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", args.log_level.upper())
    given = [f"--{k.replace('_', '-')}" for k in (*VLLM_ONLY, "kv_cache_memory_bytes") if getattr(args, k) is not None]
    if args.engine == "transformers" and given:
        sys.exit(f"align-serve: {', '.join(given)} configure the vLLM engine; the transformers engine cannot "
                 "honour them (drop them, or serve with --engine vllm)")
    try:
        args.model_dir = resolve_model(args.model, args.revision)
    except ModelNotFound as exc:
        sys.exit(f"align-serve: --model {exc}")
    if args.max_model_len is not None:
        _check_max_model_len(args)
    tie_children_to_this_process()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("binding %s without --api-key: anyone who reaches this port can change the served weights",
                    args.host)
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()
