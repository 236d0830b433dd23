# Thin veneer over the project's commands (STYLE §18). `make help` lists the targets.
PY      ?= .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: help setup test bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup:  ## create .venv/ and install the pinned runtime and test dependencies
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt

test:  ## run the CPU test suite (Triton kernels run in the interpreter)
	$(PY) -m pytest tests

bench:  ## benchmarks: model vs HF transformers (CPU, tiny preset)
	$(PY) bench/bench_model.py
