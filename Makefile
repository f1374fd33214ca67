# Two commands on a fresh machine: `make demo` (the daemon over the sample photos, offline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean-demo python-check

# Mondrian needs Python 3.11 or newer (tomllib), and a stock macOS python3 is 3.9: check it before installing
# anything, and say what to install.
PY_TOO_OLD := import sys; sys.exit(sys.version_info < (3, 11))
PY_VERSION := import platform; print(platform.python_version())
AGAIN = make PYTHON=python3.12 $(or $(MAKECMDGOALS),demo)

python-check:
	@if ! $(PYTHON) -c '$(PY_TOO_OLD)' 2>/dev/null; then \
	  echo "Mondrian needs Python 3.11 or newer; '$(PYTHON)' is $$($(PYTHON) -c '$(PY_VERSION)' 2>/dev/null || echo 'not found')." >&2; \
	  echo "  macOS:         brew install python@3.12, then: $(AGAIN)" >&2; \
	  echo "  Debian/Ubuntu: sudo apt-get install python3.12-venv (or python3.11-venv), then: $(AGAIN)" >&2; \
	  echo "  any Python 3.11 or newer will do: make PYTHON=/path/to/python3 ..." >&2; \
	  exit 1; \
	elif [ -x $(VENV)/bin/python ] && ! $(VENV)/bin/python -c '$(PY_TOO_OLD)' 2>/dev/null; then \
	  echo "$(VENV) was made with Python $$($(VENV)/bin/python -c '$(PY_VERSION)'), too old for Mondrian (3.11 or newer): remove it (rm -rf $(VENV)) and run make again" >&2; \
	  exit 1; \
	fi

$(STAMP): pyproject.toml | python-check
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mondrian demo

test: $(STAMP)
	@bash tests/system_deps.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

# Benchmarks get their own venv with the bench extra (torch, matplotlib): with torch installed, transformers'
# processors import it in every daemon, so the test venv stays without it. On Linux torch comes from PyTorch's CPU
# index: PyPI's default Linux wheel brings ~3 GB of CUDA libraries. Where that index cannot be reached (a machine
# behind a package mirror), pip would retry it for every package; then the mirror's torch is used. The transformers
# comparison is only fair if both sides compute the same logits: that test runs first.
BENCH_VENV ?= .venv-bench
TORCH_INDEX_URL := https://download.pytorch.org/whl/cpu
TORCH_INDEX = $(if $(filter Linux,$(shell uname -s)),$(if $(shell $(PYTHON) -c "import socket; socket.setdefaulttimeout(3); socket.create_connection(('download.pytorch.org', 443)).close(); print(1)" 2>/dev/null),--extra-index-url $(TORCH_INDEX_URL)))

$(BENCH_VENV)/.installed: pyproject.toml | python-check
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -e '.[test,bench]' $(TORCH_INDEX)
	touch $@

bench: $(BENCH_VENV)/.installed
	HF_HUB_OFFLINE=1 MONDRIAN_REQUIRE_TORCH=1 $(BENCH_VENV)/bin/python -m pytest -q tests/test_transformers_equivalence.py
	$(BENCH_VENV)/bin/python -m bench
