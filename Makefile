# kvgate developer entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install kvgate with its test dependencies, and run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvgate-installed
# vLLM's own KV-event publisher is exercised by the event tests; only its wheel is needed (no import
# of vLLM as a whole), so it is downloaded, never installed.
VLLM_WHEEL_DIR := .cache/wheels
VLLM_VERSION := 0.33.0
VLLM_STAMP := $(VLLM_WHEEL_DIR)/.vllm-$(VLLM_VERSION)
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit install clean

$(STAMP): pyproject.toml setup.py src/kvgate/tokens/_blockhash.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvgate microbench --json microbench.json

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

$(VLLM_STAMP): | $(STAMP)
	mkdir -p $(VLLM_WHEEL_DIR)
	$(BIN)/python -m pip download --quiet --no-deps --dest $(VLLM_WHEEL_DIR) vllm==$(VLLM_VERSION)
	touch $(VLLM_STAMP)

unit: $(STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 KVGATE_VLLM_WHEEL=$(VLLM_WHEEL_DIR) $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

clean:
	rm -rf $(VENV) .cache build *.egg-info src/*.egg-info src/kvgate/tokens/*.so microbench.json
