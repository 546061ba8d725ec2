"""The endpoint picker's runtime (behind `kvgate epp`): `EppSettings` says what to run and
`EppRuntime` runs it — the plugins from the EndpointPickerConfig, the KV-event subscriber, metrics
scraping, endpoint discovery, replica sync, and the ext_proc, gRPC health and metrics listeners.

By default it serves ext_proc on 9002, gRPC health on 9003 and Prometheus metrics on 9090. It
starts with zero endpoints if need be and answers 503 until one appears; it never waits for workers
before serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from kvgate.dynamo.epp import DynamoEppSettings, start_dynamo_discovery
from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.extproc.epp import Director, EppOptions, process_stream
from kvgate.extproc.listeners import EXT_PROC_SERVICE, serve_ext_proc, serve_health, serve_http
from kvgate.extproc.metrics import EppMetrics
from kvgate.fleet.endpoint import EndpointSet
from kvgate.fleet.follower import FleetFollower
from kvgate.fleet.kube_api import KubeConfig
from kvgate.fleet.metrics_scraper import MetricsScraper, ScraperConfig
from kvgate.fleet.objectives import ObjectiveWatch
from kvgate.fleet.pool_discovery import INSTANCE_ID_ANNOTATION, PoolDiscovery
from kvgate.fleet.sources import (
    EndpointDefaults,
    EndpointsFileWatcher,
    parse_endpoints_flag,
)
from kvgate.scheduling.active import LoadColumns
from kvgate.scheduling.framework import PluginContext
from kvgate.scheduling.picker_config import EppPlugins, load_epp_config
from kvgate.scheduling.scheduler import PluginTimings, Scheduler
from kvgate.scheduling.services import KvEventTargets, SharedLoad
from kvgate.service import StackedService
from kvgate.sync import (
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
    replay_port: int | None = None
    """With ``events_port``: every engine's replay socket (``tcp://<endpoint ip>:<port>``)."""
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
        self.scheduler: Scheduler | None = None
        self.kv_events = KvEventTargets()
        self.shared_load = SharedLoad()
        self.subscriber: KvEventSubscriber | None = None
        self.sync: ReplicaSync | None = None
        self.director: Director | None = None
        self._health: Any = None

    async def _start(self) -> None:
        s = self.settings
        defaults = EndpointDefaults(
            engine=s.engine,  # type: ignore[arg-type]
            events_port=s.events_port,
            replay_port=s.replay_port,
        )
        tokenizer = None
        if s.tokenizer:
            from kvgate.tokens import ModelTokenizer

            tokenizer = await asyncio.to_thread(ModelTokenizer.load, s.tokenizer)
        context = PluginContext(
            env=s.env,
            rng_seed=s.seed,
            tokenizer=tokenizer,
            metrics=self.metrics,
            kv_events=self.kv_events,
            shared_load=self.shared_load,
        )
        self.plugins = load_epp_config(s.config_text, context=context)
        scheduler = self.scheduler = self.plugins.scheduler(observer=self._observe)
        self._stack.callback(scheduler.close)
        self.endpoints.subscribe(scheduler.endpoints_changed)
        await self._start_replica_sync()

        if self.kv_events:
            assert self.kv_events.block_size is not None
            self.subscriber = KvEventSubscriber(
                self.kv_events, SubscriberConfig(block_size=self.kv_events.block_size)
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
                block_size=next(
                    (owner.router.block_size for owner in self.shared_load.owners.values()), None
                ),
            ),
            booked_prefilling=self.shared_load.prefilling if self.shared_load else None,
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
        if s.pool_name:
            # The pool's InferenceObjectives, live, over the --objectives flag's priorities.
            objectives = ObjectiveWatch(
                s.options.priorities, KubeConfig.load(s.kubeconfig), s.pool_name, s.pool_namespace
            )
            await objectives.start()
            self._stack.push_async_callback(objectives.aclose)

        director = self.director = Director(
            self.endpoints,
            scheduler,
            s.options,
            self.metrics,
            saturation=self.plugins.saturation_detector.is_saturated,
        )
        self.metrics.watch(
            self.endpoints, s.pool_name or "kvgate", self._gauges(), self._booked_load
        )
        self.metrics.watch_process()
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
        shared = self.shared_load
        enabled = s.replica_sync
        if enabled is None:
            enabled = shared.wants_sync
        if not enabled:
            return
        if not shared:
            log.warning("replica sync is on but no kv-aware-scorer is configured: nothing to share")
            return
        namespace = shared.namespace
        config = ReplicaSyncConfig(
            nats_url=s.nats_url or s.env.get("NATS_SERVER") or DEFAULT_NATS_URL,
            subject=s.sync_subject or default_subject(s.pool_name or namespace or s.model),
            heartbeat_s=s.sync_heartbeat_s,
            lease_s=s.sync_lease_s,
            router_id=s.router_id or new_router_id(),
        )
        self.sync = ReplicaSync(
            {name: owner.router for name, owner in shared.owners.items()},
            config,
            metrics=SyncMetrics(self.metrics.registry),
        )
        shared.attach(self.sync)
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
        subscriber = self.subscriber
        events = subscriber.stats.total() if subscriber is not None else None
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
                "replays_ok": events.replays_ok,
                "replays_failed": events.replays_failed,
                "resets": events.resets,
                "reconnects": events.reconnects,
                "block_size_mismatches": events.block_size_mismatch,
                "sink_errors": events.sink_errors,
                "internal_errors": subscriber.stats.internal_errors if subscriber else 0,
            },
            "replica_sync": self.sync.status() if self.sync is not None else {"state": "off"},
            "bookkeeping": self.bookkeeping(),
        }

    def bookkeeping(self) -> dict[str, int]:
        """What the picker holds per request in flight; all 0 when no request is."""
        director = self.director
        return {
            "open_streams": 0 if director is None else director.open_streams,
            "buffered_request_bytes": 0 if director is None else director.buffered_bytes,
            "awaiting_observer": 0 if director is None else director.awaiting_observer,
            "inflight_bookings": self._inflight_bookings(),
            "own_inflight_bookings": sum(
                sum(1 for _ in owner.router.active.own())
                for owner in self.shared_load.owners.values()
            ),
        }

    def _inflight_bookings(self) -> int:
        """Requests booked in the KV scorers' active-sequence trackers, own and other replicas'."""
        return sum(len(owner.router.active) for owner in self.shared_load.owners.values())

    async def _watch_liveness(self, interval_s: float = 0.5) -> None:
        """Drop the cached-block and load state of workers whose metrics went stale after having
        answered: a dead worker's cache is gone, and its in-flight requests will never complete.
        It is routed to again, with state rebuilt from its events, once it answers again."""
        assert self.scheduler is not None
        scheduler = self.scheduler
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
                        scheduler.endpoints_changed([], [endpoint])
                elif not metrics.stale and endpoint.address in down:
                    down.discard(endpoint.address)
                    log.info("worker %s answers again", endpoint.address)
                    scheduler.endpoints_changed([endpoint], [])
            down &= {ep.address for ep in self.endpoints}

    def _booked_load(self, workers: list[str]) -> LoadColumns:
        """The load the KV scorers booked per worker, summed over them (usually one)."""
        n = len(workers)
        columns: LoadColumns = ([0] * n, [0] * n, [0] * n, [0] * n, [0] * n)
        for owner in self.shared_load.owners.values():
            for total, part in zip(columns, owner.router.active.loads(workers), strict=True):
                for i, value in enumerate(part):
                    total[i] += value
        return columns

    def _gauges(self) -> dict[str, tuple[str, Any]]:
        def index_blocks() -> float:
            return float(sum(o.router.index.entries for o in self.shared_load.owners.values()))

        def events(attr: str) -> Any:
            def read() -> float:
                if self.subscriber is None:
                    return 0.0
                return float(getattr(self.subscriber.stats.total(), attr))

            return read

        def director_value(attr: str) -> Any:
            def read() -> float:
                return 0.0 if self.director is None else float(getattr(self.director, attr))

            return read

        loop = asyncio.get_running_loop()
        return {
            "kvgate_open_streams": ("ext_proc streams open now", director_value("open_streams")),
            "kvgate_buffered_request_bytes": (
                "request body bytes buffered by streams waiting for the end of their body",
                director_value("buffered_bytes"),
            ),
            "kvgate_awaiting_response_observer": (
                "routed requests whose response an observe-only ext_proc stream has not yet "
                "completed",
                director_value("awaiting_observer"),
            ),
            "kvgate_inflight_bookings": (
                "requests booked as in flight by the KV scorers (own and other replicas')",
                lambda: float(self._inflight_bookings()),
            ),
            "kvgate_asyncio_tasks": (
                "asyncio tasks alive in the picker's event loop",
                lambda: float(len(asyncio.all_tasks(loop))),
            ),
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
            "kvgate_kv_event_reconnects": (
                "KV event endpoints connected again after their session ended without a retry",
                events("reconnects"),
            ),
        }

    def _observe(self, point: str, plugin: Any, seconds: float) -> None:
        self.timings(point, plugin, seconds)
        self.metrics.plugin_timed(point, plugin, seconds)

    async def _serve_grpc(self, director: Director) -> None:
        s = self.settings
        self.bound_ports["grpc"] = await serve_ext_proc(
            self._stack,
            functools.partial(process_stream, director),
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
