"""`kvgate epp`: the endpoint picker process.

It serves ext_proc on ``--grpc-port`` (9002), gRPC health on ``--grpc-health-port`` (9003) and
Prometheus metrics on ``--metrics-port`` (9090). It starts with zero endpoints if need be and
answers 503 until one appears; it never waits for workers before serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from kvgate.dynamo.epp import (
    DynamoEppSettings,
    add_dynamo_arguments,
    dynamo_settings_from_args,
    start_dynamo_discovery,
)
from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.events.types import KvEvent
from kvgate.extproc.epp import Director, EppOptions, process_stream
from kvgate.extproc.metrics import EppMetrics
from kvgate.extproc.running import run_until_signalled
from kvgate.extproc.serving import EXT_PROC_SERVICE, serve_ext_proc, serve_health, serve_http
from kvgate.fleet.endpoint import EndpointSet
from kvgate.fleet.follower import FleetFollower
from kvgate.fleet.kubernetes import (
    INSTANCE_ID_ANNOTATION,
    KubeConfig,
    KubeConfigError,
    PoolDiscovery,
)
from kvgate.fleet.metrics_scraper import MetricsScraper, ScraperConfig
from kvgate.fleet.sources import (
    EndpointDefaults,
    EndpointsFileWatcher,
    EndpointSpecError,
    parse_endpoints_flag,
)
from kvgate.index.prefix_index import PrefixIndex
from kvgate.scheduling.config import ConfigError
from kvgate.scheduling.epp_config import EppPlugins, load_epp_config
from kvgate.scheduling.plugins.kv_aware_scorer import (
    KV_SCORERS_EXTRA,
    METRICS_EXTRA,
    TOKENIZER_EXTRA,
    KvAwareScorer,
)
from kvgate.scheduling.registry import PluginContext
from kvgate.scheduling.scheduler import PluginTimings
from kvgate.service import StackedService
from kvgate.sync.replica import (
    DEFAULT_NATS_URL,
    ReplicaSync,
    ReplicaSyncConfig,
    SyncMetrics,
    default_subject,
    new_router_id,
)

log = logging.getLogger("kvgate.epp")


@dataclass
class EppSettings:
    bind: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090
    secure: bool = True
    cert_path: Path | None = None
    config_text: str | None = None
    endpoints: str = ""
    endpoints_file: Path | None = None
    engine: str = "vllm"
    events_port: int | None = None
    events_bind: str | None = None
    """Bind one central SUB socket here that engines connect to (topic ``kv@<ip:port>@...``)."""
    pool_name: str | None = None
    pool_namespace: str = "default"
    kubeconfig: Path | None = None
    instance_id_annotation: str = INSTANCE_ID_ANNOTATION
    model: str | None = None
    tokenizer: str | None = None
    lora_adapters: frozenset[str] = frozenset()
    scrape_interval_s: float = 0.05
    options: EppOptions = field(default_factory=EppOptions)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    seed: int | None = None
    replica_sync: bool | None = None
    """Share in-flight load with other replicas; None: as DYNAMO_ROUTER_REPLICA_SYNC says."""
    nats_url: str | None = None
    """Default: $NATS_SERVER, else nats://127.0.0.1:4222."""
    sync_subject: str | None = None
    """Default: one subject per pool (pool name, else Dynamo namespace, else model)."""
    router_id: str | None = None
    sync_heartbeat_s: float = 1.0
    sync_lease_s: float = 3.0
    dynamo: DynamoEppSettings | None = None
    """Endpoints are Dynamo workers learned from Dynamo; requests go to its frontends."""


class _FanOutSink:
    """KV events go to the index of every KV scorer that uses events (usually one)."""

    def __init__(self, indexes: list[PrefixIndex]) -> None:
        self._indexes = indexes

    def apply_event(self, worker: str, event: KvEvent) -> None:
        for index in self._indexes:
            index.apply_event(worker, event)

    def clear_worker(self, worker: str) -> None:
        for index in self._indexes:
            index.clear_worker(worker)


class _ExtProc(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, director: Director) -> None:
        self._director = director

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for response in process_stream(self._director, request_iterator):
            yield response


class EppRuntime(StackedService):
    """Everything `kvgate epp` runs, started and stopped as one unit."""

    def __init__(self, settings: EppSettings) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = EppMetrics()
        self.endpoints = EndpointSet()
        self.timings = PluginTimings()
        self.bound_ports: dict[str, int] = {}
        self.plugins: EppPlugins | None = None
        self.kv_scorers: list[KvAwareScorer] = []
        self.subscriber: KvEventSubscriber | None = None
        self.sync: ReplicaSync | None = None
        self._health: Any = None

    async def _start(self) -> None:
        s = self.settings
        defaults = EndpointDefaults(engine=s.engine, events_port=s.events_port)  # type: ignore[arg-type]
        tokenizer = None
        if s.tokenizer:
            from kvgate.tokens import ModelTokenizer

            tokenizer = await asyncio.to_thread(ModelTokenizer.load, s.tokenizer)
        extras: dict[str, Any] = {TOKENIZER_EXTRA: tokenizer, METRICS_EXTRA: self.metrics}
        context = PluginContext(env=s.env, rng_seed=s.seed, extras=extras)
        self.plugins = load_epp_config(s.config_text, context=context)
        self.kv_scorers = list(extras.get(KV_SCORERS_EXTRA, []))
        for scorer in self.kv_scorers:
            self._stack.callback(scorer.close)
        scheduler = self.plugins.scheduler(observer=self._observe)
        self.endpoints.subscribe(scheduler.endpoints_changed)
        await self._start_replica_sync()

        event_indexes = [
            sc.router.index for sc in self.kv_scorers if isinstance(sc.router.index, PrefixIndex)
        ]
        if event_indexes:
            block_size = self.kv_scorers[0].config.block_size
            self.subscriber = KvEventSubscriber(
                _FanOutSink(event_indexes), SubscriberConfig(block_size=block_size)
            )
            await self.subscriber.start()
            self._stack.push_async_callback(self.subscriber.aclose)
            if s.events_bind:
                real = self.subscriber.bind(s.events_bind, subscribe=b"kv@")
                log.info("KV events: engines publish to %s", real)
            FleetFollower(self.endpoints, self.subscriber, central=s.events_bind is not None)

        scraper = MetricsScraper(
            self.endpoints,
            ScraperConfig(
                interval_s=s.scrape_interval_s,
                block_size=self.kv_scorers[0].config.block_size if self.kv_scorers else None,
            ),
        )
        await scraper.start()
        self._stack.push_async_callback(scraper.aclose)

        if s.dynamo is not None:
            await start_dynamo_discovery(
                self._stack,
                self.endpoints,
                s.dynamo,
                frontend_pool=self._pool_discovery if s.pool_name else None,
            )
        elif s.pool_name:
            discovery = PoolDiscovery(
                self.endpoints,
                KubeConfig.load(s.kubeconfig),
                s.pool_name,
                s.pool_namespace,
                defaults,
                instance_id_annotation=s.instance_id_annotation,
            )
            await discovery.start()
            self._stack.push_async_callback(discovery.aclose)
        elif s.endpoints_file is not None:
            watcher = EndpointsFileWatcher(s.endpoints_file, self.endpoints, defaults)
            await watcher.start()
            self._stack.push_async_callback(watcher.aclose)
        else:
            self.endpoints.replace(parse_endpoints_flag(s.endpoints, defaults))

        director = Director(
            self.endpoints,
            scheduler,
            s.options,
            self.metrics,
            saturation=self.plugins.saturation_detector.is_saturated,
        )
        self.metrics.watch(self.endpoints, s.pool_name or "kvgate", self._gauges())
        await self._serve_grpc(director)
        await self._serve_health()
        await self._serve_metrics()
        self.endpoints.subscribe(lambda _j, _l: self._update_readiness())
        self._update_readiness()
        liveness = asyncio.get_running_loop().create_task(self._watch_liveness())
        self._stack.push_async_callback(_cancel, liveness)

    def _pool_discovery(self, endpoints: EndpointSet) -> PoolDiscovery:
        """The InferencePool's pods; with a Dynamo backend, its frontends."""
        s = self.settings
        assert s.pool_name is not None
        return PoolDiscovery(
            endpoints,
            KubeConfig.load(s.kubeconfig),
            s.pool_name,
            s.pool_namespace,
            EndpointDefaults(engine=s.engine),  # type: ignore[arg-type]
            instance_id_annotation=s.instance_id_annotation,
        )

    async def _start_replica_sync(self) -> None:
        s = self.settings
        enabled = s.replica_sync
        if enabled is None:
            enabled = any(sc.config.replica_sync for sc in self.kv_scorers)
        if not enabled:
            return
        if not self.kv_scorers:
            log.warning("replica sync is on but no kv-aware-scorer is configured: nothing to share")
            return
        namespace = next(
            (sc.config.namespace for sc in self.kv_scorers if sc.config.namespace), None
        )
        config = ReplicaSyncConfig(
            nats_url=s.nats_url or s.env.get("NATS_SERVER") or DEFAULT_NATS_URL,
            subject=s.sync_subject or default_subject(s.pool_name or namespace or s.model),
            heartbeat_s=s.sync_heartbeat_s,
            lease_s=s.sync_lease_s,
            router_id=s.router_id or new_router_id(),
        )
        self.sync = ReplicaSync(
            {sc.name: sc.router for sc in self.kv_scorers},
            config,
            metrics=SyncMetrics(self.metrics.registry),
        )
        for scorer in self.kv_scorers:
            scorer.journal = self.sync
        await self.sync.start()
        self._stack.push_async_callback(self.sync.aclose)
        log.info(
            "replica sync on: router id %s, NATS %s, subject %s",
            config.router_id,
            config.safe_url,
            config.subject,
        )

    def health_details(self) -> dict[str, Any]:
        """What /healthz on the metrics port shows: readiness and the state of replica sync."""
        events = self.subscriber.stats.total() if self.subscriber is not None else None
        return {
            "ready": bool(self.endpoints.known),
            "endpoints": len(self.endpoints),
            "fresh_endpoints": sum(1 for ep in self.endpoints if not ep.metrics.stale),
            "kv_events": None
            if events is None
            else {
                "events": events.events,
                "gaps": events.gaps,
                "malformed": events.malformed,
                "backfills": events.backfills,
                "cold_starts": events.cold_starts,
            },
            "replica_sync": self.sync.status() if self.sync is not None else {"state": "off"},
        }

    async def _watch_liveness(self, interval_s: float = 0.5) -> None:
        """Drop the cached-block and load state of workers whose metrics went stale after having
        answered: a dead worker's cache is gone, and its in-flight requests will never complete.
        It is routed to again, with state rebuilt from its events, once it answers again."""
        down: set[str] = set()
        while True:
            await asyncio.sleep(interval_s)
            for endpoint in self.endpoints:
                metrics = endpoint.metrics
                if metrics.stale and metrics.updated_at is not None:
                    if endpoint.address not in down:
                        down.add(endpoint.address)
                        log.warning(
                            "worker %s stopped answering; dropping its state", endpoint.address
                        )
                        for scorer in self.kv_scorers:
                            scorer.router.remove_worker(endpoint.address)
                elif not metrics.stale and endpoint.address in down:
                    down.discard(endpoint.address)
                    log.info("worker %s answers again", endpoint.address)
            down &= {ep.address for ep in self.endpoints}

    def _gauges(self) -> dict[str, tuple[str, Any]]:
        def index_blocks() -> float:
            return float(sum(sc.router.index.entries for sc in self.kv_scorers))

        def events(attr: str) -> Any:
            def read() -> float:
                if self.subscriber is None:
                    return 0.0
                return float(getattr(self.subscriber.stats.total(), attr))

            return read

        return {
            "inference_extension_prefix_indexer_size": ("(block, worker) entries", index_blocks),
            "kvgate_kv_events_ingested": ("KV events applied", events("events")),
            "kvgate_kv_event_batches_malformed": ("KV event batches dropped", events("malformed")),
            "kvgate_kv_event_gaps": ("sequence gaps in KV event streams", events("gaps")),
            "kvgate_kv_event_backfills": (
                "workers whose earlier KV events were replayed when first heard (index rebuilt)",
                events("backfills"),
            ),
            "kvgate_kv_event_cold_starts": (
                "workers first heard past seq 0 without a usable replay (earlier blocks unknown)",
                events("cold_starts"),
            ),
            "kvgate_kv_event_block_size_mismatches": (
                "KV events refused for a block size different from kvgate's",
                events("block_size_mismatch"),
            ),
        }

    def _observe(self, point: str, plugin: Any, seconds: float) -> None:
        self.timings(point, plugin, seconds)
        self.metrics.plugin_duration.labels(point, plugin.type_name, plugin.name).observe(seconds)

    async def _serve_grpc(self, director: Director) -> None:
        s = self.settings
        self.bound_ports["grpc"] = await serve_ext_proc(
            self._stack,
            _ExtProc(director),
            f"{s.bind}:{s.grpc_port}",
            secure=s.secure,
            cert_path=s.cert_path,
            max_message_bytes=s.options.max_body_bytes + (1 << 20),
        )

    async def _serve_health(self) -> None:
        s = self.settings
        self._health, self.bound_ports["health"] = await serve_health(
            self._stack, f"{s.bind}:{s.health_port}"
        )

    def _update_readiness(self) -> None:
        if self._health is None:
            return
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ready = serving if self.endpoints.known else not_serving
        statuses = {"": serving, "liveness": serving, "readiness": ready, EXT_PROC_SERVICE: serving}
        for service, status in statuses.items():
            asyncio.get_running_loop().create_task(self._health.set(service, status))

    async def _serve_metrics(self) -> None:
        s = self.settings
        port = await serve_http(
            self._stack,
            self.metrics.registry,
            s.bind,
            s.metrics_port,
            {"/healthz": self.health_details},
        )
        if port is not None:
            self.bound_ports["metrics"] = port


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvgate epp",
        description="KV-cache-aware endpoint picker: an Envoy ext_proc server (GAIE protocol).",
    )
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc port (default 9002)")
    p.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument(
        "--secure-serving",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TLS on the ext_proc port (self-signed unless --cert-path); default on",
    )
    p.add_argument("--cert-path", type=Path, help="directory with tls.crt and tls.key")
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--config-file", type=Path, help="EndpointPickerConfig YAML file")
    cfg.add_argument("--config-text", help="EndpointPickerConfig YAML text")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--endpoints", default="", help="ip:port[=instance_id],... (static)")
    src.add_argument("--endpoints-file", type=Path, help="YAML/JSON endpoint list, watched")
    p.add_argument("--engine", default="vllm", choices=["vllm", "sglang", "trtllm"])
    p.add_argument("--events-port", type=int, help="engines' KV-event port (tcp://<ip>:<port>)")
    p.add_argument(
        "--events-bind", help="bind one SUB socket that engines connect to (e.g. tcp://*:5557)"
    )
    p.add_argument("--pool-name", help="InferencePool to discover endpoints from (Kubernetes)")
    p.add_argument("--pool-namespace", default="default", help="namespace of the InferencePool")
    p.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig for --pool-name outside a cluster (default: in-cluster service "
        "account, else $KUBECONFIG, else ~/.kube/config)",
    )
    p.add_argument(
        "--instance-id-annotation",
        default=INSTANCE_ID_ANNOTATION,
        help="pod annotation with the worker's Dynamo instance id (default %(default)s)",
    )
    p.add_argument("--model", help="served model name; other model names get 404")
    p.add_argument("--lora-adapters", default="", help="comma-separated adapter names served")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (needed for KV routing)")
    p.add_argument("--max-body-bytes", type=int, default=EppOptions.max_body_bytes)
    p.add_argument("--scrape-interval", type=float, default=0.05, help="seconds between scrapes")
    p.add_argument(
        "--body-mode",
        choices=["full-duplex", "buffered"],
        default="full-duplex",
        help="request body mode assumed when Envoy does not announce it",
    )
    p.add_argument(
        "--objectives",
        default="",
        help="InferenceObjective priorities, name=priority,... (chosen per request by the "
        "x-gateway-inference-objective header; priority < 0 is shed when the pool is saturated)",
    )
    p.add_argument("--decision-header", action="store_true", help="add x-kvgate-decision")
    p.add_argument(
        "--inline-nvext",
        action="store_true",
        help="merge Dynamo nvext routing fields into the body here (no body transformer)",
    )
    sync = p.add_argument_group("replica sync (several EPP replicas sharing in-flight load)")
    sync.add_argument(
        "--replica-sync",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share in-flight load with other replicas over NATS "
        "(default: $DYNAMO_ROUTER_REPLICA_SYNC, else off)",
    )
    sync.add_argument(
        "--nats-url", help=f"NATS server (default $NATS_SERVER or {DEFAULT_NATS_URL})"
    )
    sync.add_argument(
        "--replica-sync-subject",
        help="NATS subject shared by the replicas of one pool (default "
        "kvgate.<pool, namespace or model>.active_sequences)",
    )
    sync.add_argument("--replica-id", help="this replica's id (default host-pid-random)")
    sync.add_argument(
        "--replica-lease",
        type=float,
        default=3.0,
        help="seconds without a heartbeat (sent every lease/3) before a replica's load is "
        "dropped (default 3)",
    )
    add_dynamo_arguments(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(args: argparse.Namespace) -> EppSettings:
    if args.pool_name and (args.endpoints or args.endpoints_file is not None):
        raise ConfigError("--pool-name", "give either --pool-name or --endpoints[-file], not both")
    config_text = None
    if args.config_file is not None:
        try:
            config_text = args.config_file.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError("--config-file", f"cannot read {args.config_file}: {err}") from None
    elif args.config_text:
        config_text = args.config_text
    for flag, value in (
        ("--grpc-port", args.grpc_port),
        ("--grpc-health-port", args.grpc_health_port),
        ("--metrics-port", args.metrics_port),
    ):
        if not 0 <= value < 65536:
            raise ConfigError(flag, f"got {value}; must be a port in 0..65535")
    if args.max_body_bytes <= 0:
        raise ConfigError("--max-body-bytes", "must be positive")
    if not args.replica_lease > 0:
        raise ConfigError("--replica-lease", f"got {args.replica_lease}; must be > 0")
    adapters = frozenset(a.strip() for a in args.lora_adapters.split(",") if a.strip())
    priorities: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in args.objectives.split(","))):
        name, sep, value = item.partition("=")
        try:
            priorities[name.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError("--objectives", f"{item!r}: expected name=integer priority")
    options = EppOptions(
        max_body_bytes=args.max_body_bytes,
        default_full_duplex=args.body_mode == "full-duplex",
        served_model=args.model,
        lora_adapters=adapters,
        decision_header=args.decision_header,
        inline_nvext=args.inline_nvext,
        priorities=priorities,
    )
    return EppSettings(
        bind=args.bind,
        grpc_port=args.grpc_port,
        health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        secure=args.secure_serving,
        cert_path=args.cert_path,
        config_text=config_text,
        endpoints=args.endpoints,
        endpoints_file=args.endpoints_file,
        engine=args.engine,
        events_port=args.events_port,
        events_bind=args.events_bind,
        pool_name=args.pool_name,
        pool_namespace=args.pool_namespace,
        kubeconfig=args.kubeconfig,
        instance_id_annotation=args.instance_id_annotation,
        model=args.model,
        tokenizer=args.tokenizer,
        lora_adapters=adapters,
        scrape_interval_s=args.scrape_interval,
        options=options,
        replica_sync=args.replica_sync,
        nats_url=args.nats_url,
        sync_subject=args.replica_sync_subject,
        router_id=args.replica_id,
        sync_heartbeat_s=args.replica_lease / 3,
        sync_lease_s=args.replica_lease,
        dynamo=dynamo_settings_from_args(args),
    )


async def serve(settings: EppSettings, stop: asyncio.Event) -> None:
    async with EppRuntime(settings) as runtime:
        # The tokenizer, vocabularies and protobuf classes loaded at start-up are long-lived:
        # moving them out of the collector's view keeps full collections (pauses of tens of ms on
        # the request path) short; a higher gen-0 threshold makes them rarer.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        log.info(
            "kvgate epp serving ext_proc on %s:%d (%s), health on %d, metrics on %d",
            settings.bind,
            runtime.bound_ports["grpc"],
            "TLS" if settings.secure else "plaintext",
            runtime.bound_ports["health"],
            runtime.bound_ports.get("metrics", settings.metrics_port),
        )
        await stop.wait()


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from_args(args)
    except ConfigError as err:
        print(f"kvgate epp: {err}", file=sys.stderr)
        return 2

    try:
        run_until_signalled(lambda stop: serve(settings, stop))
    except (ConfigError, EndpointSpecError, KubeConfigError) as err:
        print(f"kvgate epp: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"kvgate epp: {err}", file=sys.stderr)
        return 1
    return 0
