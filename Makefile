# kvgate developer entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install kvgate with its test dependencies, and run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvgate-installed
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

unit: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/kvgate/tokens/*.so microbench.json
