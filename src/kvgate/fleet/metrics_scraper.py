"""Poll every endpoint's Prometheus metrics into `Endpoint.metrics` (the EPP's data layer).

What is read, per engine (`ENGINE_METRICS`)
    queue length, running requests, KV-cache usage (0..1), the cache configuration (block size
    and number of blocks) and, for vLLM, the LoRA adapters. Several series of one metric (vLLM
    labels by ``model_name`` and ``engine``, the data-parallel engine index; SGLang by rank) are
    one endpoint behind one address, so counts are **summed** and the KV usage is **averaged**
    (the ranks of one endpoint have equal caches, and its internal balancer spreads over all of
    them). Info metrics whose value is a timestamp (``vllm:lora_requests_info``) take the sample
    with the greatest value; other info metrics take the first sample.

    A scrape that shows none of the engine's queue, running and usage metrics fails (wrong engine
    type or path). One that misses only some of them reads the missing ones as 0 and warns once per
    endpoint and metric: an engine may register a gauge only when it first has a value.

Cost
    Engines render every family they have (vLLM: tens of KB of histograms) unless asked for a
    few, so requests carry ``name[]=`` parameters, which prometheus_client's exposition apps
    (mounted by vLLM and SGLang) honour; servers that ignore them answer in full, which is only
    slower. An answer that lacks the wanted families altogether (prometheus_client 0.2x leaves
    collectors that describe nothing, such as vLLM's multiprocess one, out of filtered answers)
    switches that endpoint to unfiltered scrapes. The body is asked uncompressed: gzip would make
    the engine compress every answer to save bandwidth that does not matter inside a cluster. One
    `aiohttp.ClientSession` with keep-alive serves all endpoints. The parser looks only at the
    lines of the wanted names (``str.find``, C speed) and caches the parse of info labels, which
    repeat scrape after scrape. Measured (``python -m tests.fleet.bench_scraper``): about 0.5 ms
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
import functools
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from yarl import URL

from kvgate.fleet.endpoint import Endpoint, EndpointMetrics, EndpointSet, EngineType
from kvgate.service import Service

__all__ = [
    "ENGINE_METRICS",
    "EndpointScrapeStats",
    "EngineMetricNames",
    "MetricsParseError",
    "MetricsScraper",
    "NoEngineMetricsError",
    "ScraperConfig",
    "ScraperStats",
    "parse_labels",
    "read_metrics",
    "scan_samples",
]

logger = logging.getLogger(__name__)


# -- Prometheus text --------------------------------------------------------------------------


class MetricsParseError(ValueError):
    """A scrape that cannot be read: a malformed line of a wanted metric, a bad value."""


class NoEngineMetricsError(MetricsParseError):
    """The scrape has none of the engine's core metrics (wrong engine type, path, or filter)."""


RawSample = tuple[str, float]
"""(the text between a sample's braces, unparsed; its value)."""

# Possessive quantifiers (Python 3.11+): the alternatives cannot overlap, so giving back
# characters never helps, and without them sre backtracks per character (8x slower).
_LABEL: Final = re.compile(
    r'[ \t]*+([a-zA-Z_][a-zA-Z0-9_]*+)[ \t]*+=[ \t]*+"((?:[^"\\\n]++|\\.)*+)"'
)
_LABEL_SEP: Final = re.compile(r"[ \t]*+(?:,|\Z)")
_ESCAPE: Final = re.compile(r'\\[\\n"]')
_UNESCAPED: Final = {"\\\\": "\\", "\\n": "\n", '\\"': '"'}


def _line_starts(text: str, name: str) -> Iterator[int]:
    if text.startswith(name):
        yield 0
    needle = "\n" + name
    at = text.find(needle)
    while at != -1:
        yield at + 1
        at = text.find(needle, at + 1)


def scan_samples(text: str, names: Iterable[str]) -> dict[str, list[RawSample]]:
    """The samples of each of `names` in a Prometheus text exposition, in order.

    Only lines starting with a wanted name are looked at, and only with ``str`` methods (C speed):
    the closing brace of a sample's labels is the last ``}`` of its line, since neither the value
    nor the timestamp can hold one. Label text is returned unparsed, and so unchecked, because most
    readers need only values (see `parse_labels`). Quoted metric names (``{"name", ...}``, the
    UTF-8 extension) and indented lines are not recognised. Raises `MetricsParseError` for a
    wanted line whose value cannot be read.
    """
    found: dict[str, list[RawSample]] = {}
    for name in names:
        samples: list[RawSample] = []
        for start in _line_starts(text, name):
            after = start + len(name)
            end = text.find("\n", after)
            line = text[after:] if end == -1 else text[after:end]
            # The name must end here: vllm:num_requests_waiting is not ..._waiting_by_reason.
            if line[:1] not in ("{", " ", "\t"):
                continue
            labels = ""
            rest = line
            if line.lstrip(" \t").startswith("{"):
                close = line.rfind("}")
                if close == -1:
                    raise MetricsParseError(f"{name}: unclosed labels in {line[:200]!r}")
                labels = line[line.index("{") + 1 : close]
                rest = line[close + 1 :]
            fields = rest.split()
            if not 1 <= len(fields) <= 2 or "_" in fields[0]:
                # ("_": float() takes "1_0", the exposition format does not.)
                raise MetricsParseError(f"{name}: cannot read the sample {line[:200]!r}")
            try:
                value = float(fields[0])
            except ValueError:
                raise MetricsParseError(f"{name}: bad sample value {fields[0]!r}") from None
            samples.append((labels, value))
        if samples:
            found[name] = samples
    return found


def parse_labels(text: str) -> dict[str, str]:
    """Labels of a sample from the text between its braces (escapes resolved)."""
    labels: dict[str, str] = {}
    at = 0
    end = len(text.rstrip(" \t"))
    while at < end:
        match = _LABEL.match(text, at)
        sep = None if match is None else _LABEL_SEP.match(text, match.end())
        if match is None or sep is None:
            raise MetricsParseError(f"bad labels {{{text[:200]}}}")
        value = match[2]
        labels[match[1]] = (
            _ESCAPE.sub(lambda m: _UNESCAPED[m[0]], value) if "\\" in value else value
        )
        at = sep.end()
    return labels


# -- per-engine names -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineMetricNames:
    path: str
    waiting: str
    running: str
    kv_usage: tuple[str, ...]
    """Candidates in order of preference (newer name first)."""
    cache_info: str | None = None
    block_size_label: str = ""
    num_blocks_label: str = ""
    block_size_flag: str = ""
    """The engine's command-line flag for its block size, quoted in the mismatch error."""
    lora_info: str | None = None
    alive: str | None = None
    """A metric served from start-up by a server whose load gauges appear only with its first
    request (a Dynamo worker's system server): with it and none of them, the scrape reads as an
    idle engine instead of failing."""

    @property
    def names(self) -> tuple[str, ...]:
        extra = (self.cache_info, self.lora_info, self.alive)
        return (self.waiting, self.running, *self.kv_usage, *(n for n in extra if n is not None))


ENGINE_METRICS: Final[dict[EngineType, EngineMetricNames]] = {
    "vllm": EngineMetricNames(
        path="/metrics",
        waiting="vllm:num_requests_waiting",
        running="vllm:num_requests_running",
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        cache_info="vllm:cache_config_info",
        block_size_label="block_size",
        num_blocks_label="num_gpu_blocks",
        block_size_flag="--block-size",
        lora_info="vllm:lora_requests_info",
        alive="dynamo_component_uptime_seconds",
    ),
    "sglang": EngineMetricNames(
        path="/metrics",
        waiting="sglang:num_queue_reqs",
        running="sglang:num_running_reqs",
        kv_usage=("sglang:token_usage",),
        cache_info="sglang:cache_config_info",
        block_size_label="page_size",
        num_blocks_label="num_pages",
        block_size_flag="--page-size",
    ),
    "trtllm": EngineMetricNames(
        path="/prometheus/metrics",
        waiting="trtllm_num_requests_waiting",
        running="trtllm_num_requests_running",
        kv_usage=("trtllm_kv_cache_utilization",),
    ),
}


def _int_label(labels: dict[str, str], key: str) -> int | None:
    value = labels.get(key, "")
    # vLLM renders unset config fields as "None".
    return int(value) if value.isascii() and value.isdigit() else None


def _adapters(labels: dict[str, str], key: str) -> frozenset[str]:
    return frozenset(name for name in labels.get(key, "").split(",") if name)


# The label text of info metrics is the same scrape after scrape, and parsing it would be most of
# a scrape's parsing cost. An entry is a few hundred bytes: the caches stay well under 1 MB.
@functools.lru_cache(maxsize=1024)
def _cache_config(text: str, names: EngineMetricNames) -> tuple[int | None, int | None]:
    labels = parse_labels(text)
    return _int_label(labels, names.block_size_label), _int_label(labels, names.num_blocks_label)


@functools.lru_cache(maxsize=1024)
def _lora_config(text: str) -> tuple[int | None, frozenset[str], frozenset[str]]:
    labels = parse_labels(text)
    return (
        _int_label(labels, "max_lora"),
        _adapters(labels, "running_lora_adapters"),
        _adapters(labels, "waiting_lora_adapters"),
    )


def _total(found: dict[str, list[RawSample]], name: str) -> float:
    total = sum(value for _, value in found.get(name, ()))
    if not math.isfinite(total):
        raise MetricsParseError(f"{name} is {total}")
    return total


def read_metrics(text: str, names: EngineMetricNames) -> tuple[EndpointMetrics, list[str]]:
    """The endpoint metrics in a scrape, and the core metrics it lacked (read as 0).

    Raises `MetricsParseError` when a wanted line is malformed or none of the core metrics
    (waiting, running, usage) is there. ``updated_at`` and ``stale`` are left for the caller.
    """
    found = scan_samples(text, names.names)
    usage_name = next((n for n in names.kv_usage if n in found), None)
    missing = [n for n in (names.waiting, names.running) if n not in found]
    if usage_name is None:
        missing.append(" or ".join(names.kv_usage))
    if len(missing) == 3:
        if names.alive is None or names.alive not in found:
            raise NoEngineMetricsError(f"none of {', '.join(missing)} is exposed")
        return EndpointMetrics(), []
    metrics = EndpointMetrics(
        waiting=round(_total(found, names.waiting)), running=round(_total(found, names.running))
    )
    if usage_name is not None:
        metrics.kv_usage = _total(found, usage_name) / len(found[usage_name])
    cache = found.get(names.cache_info or "")
    if cache:
        metrics.block_size, metrics.num_gpu_blocks = _cache_config(cache[0][0], names)
    lora = found.get(names.lora_info or "")
    if lora:
        latest = max(lora, key=lambda sample: sample[1])[0]
        metrics.max_loras, metrics.active_loras, metrics.waiting_loras = _lora_config(latest)
    return metrics, missing


# -- the scraper ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScraperConfig:
    interval_s: float = 0.05
    """Time between two scrapes of one endpoint (the reference EPP polls every 50 ms)."""
    timeout_s: float = 0.5
    """Budget of one scrape (connect, request, body). Ten intervals: a slower answer is useless
    for 50 ms-fresh data, yet one slow answer stays well clear of `stale_after_s`."""
    stale_after_s: float = 2.0
    """An endpoint whose last successful scrape is older than this is marked stale."""
    max_concurrency: int = 64
    """Scrapes in flight at once, across all endpoints (one per endpoint at most anyway)."""
    block_size: int | None = None
    """kvgate's KV block size, checked against what engines report; None: no check."""
    block_size_setting: str = "DYNAMO_KV_BLOCK_SIZE"
    """Name of kvgate's block-size setting, quoted in the mismatch error."""
    name_filter: bool = True
    """Ask engines for only the wanted families (``name[]=``); off for servers that reject it."""
    warn_interval_s: float = 10.0
    """Minimum time between two failure warnings about one endpoint."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s", "stale_after_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.timeout_s >= self.stale_after_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s}) must be below stale_after_s "
                f"({self.stale_after_s}): one slow scrape would make the endpoint stale"
            )
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.warn_interval_s < 0:
            raise ValueError(f"warn_interval_s must be >= 0, got {self.warn_interval_s}")


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


_HEADERS: Final = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}


class MetricsScraper(Service):
    """Scrape the metrics of every endpoint of an `EndpointSet` (see the module docstring).

    Use as ``async with MetricsScraper(endpoints, config):`` or `start` / `aclose`.
    `scrape_once` scrapes every endpoint once, with or without the loops running.
    """

    def __init__(self, endpoints: EndpointSet, config: ScraperConfig = ScraperConfig()) -> None:
        self._config = config
        self.stats = ScraperStats()
        self._targets: dict[str, _Target] = {}
        self._session: aiohttp.ClientSession | None = None
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
        self._open_session()
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
        if self._session is not None:
            await self._session.close()

    async def scrape_once(self) -> None:
        """Scrape every current endpoint once, concurrently (within ``max_concurrency``)."""
        self._check_open()
        self._open_session()
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

    def _open_session(self) -> None:
        if self._session is not None:
            return
        config = self._config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_concurrency),
            timeout=aiohttp.ClientTimeout(total=config.timeout_s),
            headers=_HEADERS,
            # Engines set no cookies worth keeping; the dummy jar skips cookie handling per call.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

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
        assert self._session is not None
        async with self._semaphore, self._session.get(target.url) as response:
            if response.status != 200:
                raise MetricsParseError(f"HTTP {response.status} from {target.url.path}")
            body = await response.read()
        return body.decode("utf-8")

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
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # TimeoutError is an OSError; UnicodeDecodeError and MetricsParseError ValueErrors.
            self._failed(target, exc, time.perf_counter() - started)
        except Exception as exc:
            # A bug here or in aiohttp: say so, but keep the endpoint's loop alive.
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
