"""Poll every endpoint's Prometheus metrics into `Endpoint.metrics` (the EPP's data layer).

What is read
    See `kvgate.fleet.engine_metrics` (names per engine, how series add up) and
    `kvgate.fleet.prometheus_text` (the parser). A partial exposition warns once per endpoint and
    missing metric.

Cost
    Engines render every family they have unless asked for a few, so requests carry ``name[]=``
    parameters, which prometheus_client's exposition apps (mounted by vLLM and SGLang) honour;
    servers that ignore them answer in full, which is only slower. An answer that lacks the
    wanted families altogether (prometheus_client 0.2x leaves collectors that describe nothing,
    such as vLLM's multiprocess one, out of filtered answers) switches that endpoint to unfiltered
    scrapes. Pages are fetched through a `MetricsTransport` (production: one keep-alive aiohttp
    session for all endpoints). Measured (``python benchmarks/bench_scraper.py``): about 0.5 ms
    of CPU per scrape, nearly all of it in aiohttp and the event loop.

Timing and staleness
    One task per endpoint scrapes every ``interval_s`` (missed ticks are skipped, not bunched) with
    a ``timeout_s`` budget; at most ``max_concurrency`` scrapes run at once. After each attempt,
    ``metrics.stale`` is set when the last success is older than ``stale_after_s``, so staleness is
    noticed at most ``timeout_s + interval_s`` late. An endpoint that leaves the set has its task
    cancelled at once; nothing is written to it afterwards.

Block size
    When an engine reports a block size other than the configured one, an ERROR naming the setting
    and the engine flag to change is logged once per endpoint and reported size, and the endpoint
    is listed in ``stats.block_size_mismatch``. It stays routable: a wrong size degrades prefix
    scores, and refusing the whole fleet over it would be worse.

Everything runs on the caller's event loop; the endpoint set must be changed from that loop too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from yarl import URL

from kvgate.errors import ConfigError
from kvgate.fleet.endpoint import Endpoint, EndpointMetrics, EndpointSet
from kvgate.fleet.engine_metrics import ENGINE_METRICS, NoEngineMetricsError, read_metrics
from kvgate.fleet.scrape_transport import AiohttpTransport, MetricsTransport
from kvgate.service import Service
from kvgate.settings import Range, check_ranges

__all__ = [
    "EndpointScrapeStats",
    "MetricsScraper",
    "ScraperConfig",
    "ScraperStats",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScraperConfig:
    interval_s: Annotated[float, Range(gt=0)] = 0.05
    """Time between two scrapes of one endpoint (the reference EPP polls every 50 ms)."""
    timeout_s: Annotated[float, Range(gt=0)] = 0.5
    """Budget of one scrape (connect, request, body). Ten intervals: a slower answer is useless
    for 50 ms-fresh data, yet one slow answer stays well clear of `stale_after_s`."""
    stale_after_s: Annotated[float, Range(gt=0)] = 2.0
    """An endpoint whose last successful scrape is older than this is marked stale."""
    max_concurrency: Annotated[int, Range(ge=1)] = 64
    """Scrapes in flight at once, across all endpoints (one per endpoint at most anyway)."""
    block_size: Annotated[int | None, Range(ge=1)] = None
    """kvgate's KV block size, checked against what engines report; None: no check."""
    block_size_setting: str = "DYNAMO_KV_BLOCK_SIZE"
    """Name of kvgate's block-size setting, quoted in the mismatch error."""
    name_filter: bool = True
    """Ask engines for only the wanted families (``name[]=``); off for servers that reject it."""
    warn_interval_s: Annotated[float, Range(ge=0)] = 10.0
    """Minimum time between two failure warnings about one endpoint."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.timeout_s >= self.stale_after_s:
            raise ConfigError(
                "timeout_s",
                f"got {self.timeout_s}; must be below stale_after_s ({self.stale_after_s}): "
                "one slow scrape would make the endpoint stale",
            )


@dataclass(slots=True)
class EndpointScrapeStats:
    ok: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_duration_s: float | None = None
    """Wall time of the last attempt, successful or not."""
    last_error: str | None = None


@dataclass(slots=True)
class ScraperStats:
    endpoints: dict[str, EndpointScrapeStats] = field(default_factory=dict)
    """Per current endpoint; an endpoint's entry goes when it leaves (the totals keep counting)."""
    scrapes_ok: int = 0
    scrapes_failed: int = 0
    block_size_mismatch: set[str] = field(default_factory=set)
    """Endpoints whose last reported block size differs from the configured one."""
    block_size_mismatches: int = 0
    """Mismatches detected (each endpoint and reported size counted once)."""


class _Target:
    """One endpoint being scraped."""

    __slots__ = (
        "active",
        "endpoint",
        "full_url",
        "mismatch_reported",
        "missing_reported",
        "names",
        "next_warning",
        "stats",
        "task",
        "url",
    )

    def __init__(self, endpoint: Endpoint, name_filter: bool, stats: EndpointScrapeStats) -> None:
        self.endpoint = endpoint
        self.names = names = ENGINE_METRICS[endpoint.engine]
        self.full_url = URL(f"http://{endpoint.address}{names.path}", encoded=True)
        self.url = self.full_url
        if name_filter:
            self.url = self.full_url.with_query([("name[]", n) for n in names.names])
        self.stats = stats
        self.task: asyncio.Task[None] | None = None
        # Cleared when the endpoint leaves; a scrape finishing afterwards writes nothing.
        self.active = True
        self.next_warning = 0.0
        self.mismatch_reported: int | None = None
        self.missing_reported: set[str] = set()


class MetricsScraper(Service):
    """Scrape the metrics of every endpoint of an `EndpointSet` (see the module docstring).

    Use as ``async with MetricsScraper(endpoints, config):`` or `start` / `aclose`.
    `scrape_once` scrapes every endpoint once, with or without the loops running. The scraper
    closes its ``transport`` (default: aiohttp, with the config's timeout) when it closes.
    """

    def __init__(
        self,
        endpoints: EndpointSet,
        config: ScraperConfig = ScraperConfig(),
        *,
        transport: MetricsTransport | None = None,
        booked_prefilling: Callable[[str], int] | None = None,
    ) -> None:
        """``booked_prefilling``: the gateway's count of requests routed to an endpoint (by
        address) and still in prefill, taken into each scrape's `EndpointMetrics` as it lands."""
        self._config = config
        self._booked_prefilling = booked_prefilling
        self.stats = ScraperStats()
        self._targets: dict[str, _Target] = {}
        self._transport = transport or AiohttpTransport(
            timeout_s=config.timeout_s, max_connections=config.max_concurrency
        )
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._running = False
        self._closed = False
        for endpoint in endpoints:
            self._add(endpoint)
        endpoints.subscribe(self._on_change)

    async def start(self) -> None:
        """Start one scrape loop per endpoint (endpoints joining later get theirs at once)."""
        self._check_open()
        if self._running:
            return
        self._running = True
        for target in self._targets.values():
            self._spawn(target)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._transport.aclose()

    async def scrape_once(self) -> None:
        """Scrape every current endpoint once, concurrently (within ``max_concurrency``)."""
        self._check_open()
        await asyncio.gather(*(self._scrape(t) for t in list(self._targets.values())))

    # -- endpoints coming and going ------------------------------------------------------------

    def _on_change(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        if self._closed:
            return
        # Left first: an endpoint whose spec changed is in both lists under one address.
        for endpoint in left:
            self._remove(endpoint.address)
        for endpoint in joined:
            self._add(endpoint)

    def _add(self, endpoint: Endpoint) -> None:
        stats = EndpointScrapeStats()
        target = _Target(endpoint, self._config.name_filter, stats)
        self._targets[endpoint.address] = target
        self.stats.endpoints[endpoint.address] = stats
        if self._running:
            self._spawn(target)

    def _remove(self, address: str) -> None:
        target = self._targets.pop(address, None)
        if target is None:
            return
        target.active = False
        if target.task is not None:
            target.task.cancel()
        del self.stats.endpoints[address]
        self.stats.block_size_mismatch.discard(address)

    # -- scraping --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the metrics scraper is closed")

    def _spawn(self, target: _Target) -> None:
        target.task = asyncio.get_running_loop().create_task(
            self._loop(target), name=f"metrics {target.endpoint.address}"
        )

    async def _loop(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.interval_s
        due = loop.time()
        while True:
            await self._scrape(target)
            due += interval
            now = loop.time()
            # Fallen behind: skip the missed ticks rather than scrape in a burst.
            due = max(due, now)
            await asyncio.sleep(due - now)

    async def _fetch(self, target: _Target) -> str:
        async with self._semaphore:
            return await self._transport.get(target.url)

    async def _scrape(self, target: _Target) -> None:
        started = time.perf_counter()
        try:
            text = await self._fetch(target)
            try:
                metrics, missing = read_metrics(text, target.names)
            except NoEngineMetricsError:
                if target.url is target.full_url:
                    raise
                # prometheus_client 0.2x leaves collectors that describe nothing (vLLM's
                # multiprocess mode) out of filtered answers: ask this one for everything.
                logger.info(
                    "%s answers a name[] filter without the wanted metrics; scraping its full "
                    "exposition instead",
                    target.endpoint.address,
                )
                target.url = target.full_url
                metrics, missing = read_metrics(await self._fetch(target), target.names)
        except (OSError, ValueError) as exc:
            # The transport's failures: TimeoutError and TransportError are OSErrors,
            # UnicodeDecodeError and MetricsParseError ValueErrors.
            self._failed(target, exc, time.perf_counter() - started)
        except Exception as exc:
            # A bug here or in the transport: say so, but keep the endpoint's loop alive.
            if not target.stats.consecutive_failures:
                logger.exception("unexpected error scraping %s", target.endpoint.address)
            self._failed(target, exc, time.perf_counter() - started)
        else:
            self._succeeded(target, metrics, missing, time.perf_counter() - started)

    def _succeeded(
        self, target: _Target, metrics: EndpointMetrics, missing: list[str], duration: float
    ) -> None:
        if not target.active:
            return
        stats = target.stats
        stats.last_duration_s = duration
        stats.ok += 1
        self.stats.scrapes_ok += 1
        if stats.consecutive_failures:
            logger.info(
                "metrics of %s are back after %d failed scrapes",
                target.endpoint.address,
                stats.consecutive_failures,
            )
            stats.consecutive_failures = 0
        metrics.updated_at = time.monotonic()
        metrics.stale = False
        if self._booked_prefilling is not None:
            metrics.booked_prefilling = self._booked_prefilling(target.endpoint.address)
        if metrics.num_gpu_blocks is None:
            metrics.num_gpu_blocks = target.endpoint.kv_blocks
        target.endpoint.metrics = metrics
        for name in missing:
            if name not in target.missing_reported:
                target.missing_reported.add(name)
                logger.warning(
                    "endpoint %s (%s) exposes no %s; reading it as 0",
                    target.endpoint.address,
                    target.endpoint.engine,
                    name,
                )
        self._check_block_size(target, metrics.block_size)

    def _failed(self, target: _Target, exc: BaseException, duration: float) -> None:
        if not target.active:
            return
        stats = target.stats
        stats.last_duration_s = duration
        stats.failed += 1
        stats.consecutive_failures += 1
        stats.last_error = str(exc) or type(exc).__name__
        self.stats.scrapes_failed += 1
        now = time.monotonic()
        metrics = target.endpoint.metrics
        metrics.stale = (
            metrics.updated_at is None or now - metrics.updated_at > self._config.stale_after_s
        )
        if stats.consecutive_failures == 1 or now >= target.next_warning:
            target.next_warning = now + self._config.warn_interval_s
            logger.warning(
                "scraping the metrics of %s failed (%d in a row, %s): %s",
                target.endpoint.address,
                stats.consecutive_failures,
                "stale" if metrics.stale else "not stale yet",
                stats.last_error,
            )

    def _check_block_size(self, target: _Target, reported: int | None) -> None:
        expected = self._config.block_size
        address = target.endpoint.address
        if expected is None or reported is None or reported == expected:
            self.stats.block_size_mismatch.discard(address)
            return
        self.stats.block_size_mismatch.add(address)
        if target.mismatch_reported == reported:
            return
        target.mismatch_reported = reported
        self.stats.block_size_mismatches += 1
        names = target.names
        logger.error(
            "endpoint %s (%s) reports %s=%d in %s but kvgate is configured with block size %d: "
            "set %s=%d, or restart the engine with %s %d. Until then its prefix matches are "
            "computed on the wrong block boundaries (it stays routable)",
            address,
            target.endpoint.engine,
            names.block_size_label,
            reported,
            names.cache_info,
            expected,
            self._config.block_size_setting,
            reported,
            names.block_size_flag,
            expected,
        )
