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

# The bench extra (torch) for tests/test_transformers_equivalence.py, which fails under CI without it. On Linux from
# PyTorch's CPU index: PyPI's default Linux wheel brings ~3 GB of CUDA libraries the tests never use.
TORCH_INDEX := $(if $(filter Linux,$(shell uname -s)),--extra-index-url https://download.pytorch.org/whl/cpu)
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[bench]' $(TORCH_INDEX)
	touch $@

test: $(STAMP) $(BENCH_STAMP)
	@bash tests/system_deps.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

bench: $(STAMP) $(BENCH_STAMP)
	$(VENV)/bin/python -m bench
