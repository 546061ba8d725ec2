"""The metrics scraper against real HTTP servers on 127.0.0.1, and over a mock transport."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from kvgate.fleet import metrics_scraper
from kvgate.fleet.endpoint import Endpoint, EndpointSet, EngineType
from kvgate.fleet.engine_metrics import ENGINE_METRICS, EngineMetricNames
from kvgate.fleet.metrics_scraper import MetricsScraper, ScraperConfig
from kvgate.fleet.scrape_transport import MockTransport, TransportError
from tests.fleet.utils import EngineState, InFlight, MetricsServer, render, wait_until

LOGGER = "kvgate.fleet.metrics_scraper"
FAST = ScraperConfig(interval_s=0.02, timeout_s=0.2, stale_after_s=0.3, warn_interval_s=3600)


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


async def serve(
    stack: contextlib.AsyncExitStack, state: EngineState | None = None
) -> MetricsServer:
    return await stack.enter_async_context(MetricsServer(state))


def endpoint_of(server: MetricsServer) -> Endpoint:
    return Endpoint(server.address, engine=server.state.engine)


async def scraper(
    stack: contextlib.AsyncExitStack,
    endpoints: EndpointSet,
    config: ScraperConfig = FAST,
    *,
    start: bool = True,
    booked_prefilling: Callable[[str], int] | None = None,
) -> MetricsScraper:
    scraper = MetricsScraper(endpoints, config, booked_prefilling=booked_prefilling)
    stack.push_async_callback(scraper.aclose)
    if start:
        await scraper.start()
    return scraper


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and text in r.getMessage()
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- reading each engine -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "path", "series", "expected"),
    [
        ("vllm", "/metrics", 2, (5, 5, 0.5, 16, 4096)),
        ("sglang", "/metrics", 2, (5, 5, 0.5, 16, 4096)),
        ("trtllm", "/prometheus/metrics", 1, (3, 4, 0.25, None, None)),
    ],
    ids=["vllm, two data-parallel engines", "sglang, two ranks", "trtllm"],
)
async def test_scrape_once_reads_each_engine(
    stack: contextlib.AsyncExitStack,
    engine: EngineType,
    path: str,
    series: int,
    expected: tuple[object, ...],
) -> None:
    state = EngineState(
        engine=engine, waiting=[3, 2][:series], running=[4, 1][:series], usage=[0.25, 0.75][:series]
    )
    server = await serve(stack, state)
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    before = time.monotonic()
    await scr.scrape_once()
    m = endpoint.metrics
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == expected
    assert m.updated_at is not None and m.updated_at >= before
    assert not m.stale
    stats = scr.stats.endpoints[endpoint.address]
    assert (stats.ok, stats.failed) == (1, 0)
    assert stats.last_duration_s is not None and stats.last_duration_s > 0
    [request] = server.requests
    assert request["path"] == path
    assert request["encoding"] == "identity"  # no gzip on either side
    assert set(request["names"]) == set(ENGINE_METRICS[engine].names)


async def test_a_capacity_stated_by_discovery_stays_when_the_scrape_has_none(
    stack: contextlib.AsyncExitStack,
) -> None:
    # TensorRT-LLM (like a Dynamo worker's system server) serves no cache configuration.
    server = await serve(stack, EngineState(engine="trtllm"))
    endpoint = Endpoint(server.address, engine="trtllm", kv_blocks=1024)
    assert endpoint.metrics.num_gpu_blocks == 1024
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    await scr.scrape_once()
    assert not endpoint.metrics.stale
    assert endpoint.metrics.num_gpu_blocks == 1024


async def test_each_scrape_records_what_the_gateway_had_booked_as_it_landed(
    stack: contextlib.AsyncExitStack,
) -> None:
    server = await serve(stack, EngineState(waiting=[3]))
    endpoint = endpoint_of(server)
    booked = {endpoint.address: 2}
    scr = await scraper(
        stack, EndpointSet([endpoint]), start=False, booked_prefilling=booked.__getitem__
    )
    assert endpoint.metrics.booked_prefilling is None
    await scr.scrape_once()
    assert (endpoint.metrics.waiting, endpoint.metrics.booked_prefilling) == (3, 2)
    # Later bookings do not move a scrape already taken; the next scrape takes them.
    booked[endpoint.address] = 0
    assert endpoint.metrics.booked_prefilling == 2
    await scr.scrape_once()
    assert endpoint.metrics.booked_prefilling == 0


async def test_an_unfiltered_server_works_the_same(stack: contextlib.AsyncExitStack) -> None:
    server = await serve(stack, EngineState(waiting=[9]))
    server.filter_mode = "ignore"
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    await scr.scrape_once()
    assert endpoint.metrics.waiting == 9


async def test_a_server_dropping_filtered_families_is_scraped_in_full(
    stack: contextlib.AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(stack, EngineState(waiting=[4]))
    server.filter_mode = "drop-unnamed"
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    await scr.scrape_once()
    await scr.scrape_once()
    assert endpoint.metrics.waiting == 4
    assert scr.stats.endpoints[endpoint.address].failed == 0
    assert [bool(r["names"]) for r in server.requests] == [True, False, False]
    assert messages(caplog, logging.INFO, "scraping its full exposition instead")


async def test_name_filter_can_be_turned_off(stack: contextlib.AsyncExitStack) -> None:
    server = await serve(stack)
    scr = await scraper(
        stack, EndpointSet([endpoint_of(server)]), ScraperConfig(name_filter=False), start=False
    )
    await scr.scrape_once()
    assert server.requests[0]["names"] == []


async def test_the_loop_follows_the_engine(stack: contextlib.AsyncExitStack) -> None:
    server = await serve(stack)
    endpoint = endpoint_of(server)
    await scraper(stack, EndpointSet([endpoint]))
    await wait_until(lambda: len(server.requests) >= 1)
    server.state.waiting = [7]
    server.state.usage = [0.9]
    await wait_until(lambda: endpoint.metrics.waiting == 7)
    assert endpoint.metrics.kv_usage == pytest.approx(0.9)


async def test_the_loop_keeps_its_interval(stack: contextlib.AsyncExitStack) -> None:
    server = await serve(stack, EngineState(full=False))
    config = ScraperConfig(interval_s=0.05, timeout_s=0.2, stale_after_s=1.0)
    await scraper(stack, EndpointSet([endpoint_of(server)]), config)
    await wait_until(lambda: len(server.requests) >= 11)
    times = [r["at"] for r in server.requests[:11]]
    mean_gap = (times[-1] - times[0]) / 10
    assert 0.045 <= mean_gap <= 0.1, mean_gap


async def test_the_session_is_reused_across_scrapes(stack: contextlib.AsyncExitStack) -> None:
    server = await serve(stack)
    scr = await scraper(stack, EndpointSet([endpoint_of(server)]), start=False)
    for _ in range(5):
        await scr.scrape_once()
    assert len({r["peer"] for r in server.requests}) == 1  # one keep-alive connection


# -- failures and staleness ----------------------------------------------------------------------


async def test_failures_make_an_endpoint_stale_and_recovery_fresh(
    stack: contextlib.AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(stack)
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]))
    await wait_until(lambda: endpoint.metrics.updated_at is not None)
    assert not endpoint.metrics.stale

    server.status = 503
    failed_at = time.monotonic()
    await wait_until(lambda: endpoint.metrics.stale)
    # Stale only once the last success is older than stale_after_s (0.3 s), and not much later.
    assert 0.25 <= time.monotonic() - failed_at <= 0.3 + FAST.timeout_s + FAST.interval_s + 0.2
    stats = scr.stats.endpoints[endpoint.address]
    assert stats.failed >= 5
    assert stats.last_error == "HTTP 503 from /metrics"
    # Rate-limited: one warning for the whole run of failures.
    assert len(messages(caplog, logging.WARNING, "scraping the metrics of")) == 1

    server.status = 200
    await wait_until(lambda: not endpoint.metrics.stale)
    assert stats.consecutive_failures == 0
    assert messages(caplog, logging.INFO, "are back after")
    assert scr.stats.scrapes_failed == stats.failed


async def test_a_slow_endpoint_times_out(stack: contextlib.AsyncExitStack) -> None:
    server = await serve(stack)
    server.delay_s = 0.6
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)  # 0.2 s timeout
    started = time.monotonic()
    await scr.scrape_once()
    assert time.monotonic() - started < 0.55
    stats = scr.stats.endpoints[endpoint.address]
    assert stats.failed == 1
    assert endpoint.metrics.stale  # never succeeded


async def test_an_unreachable_endpoint_fails_and_stays_stale(
    stack: contextlib.AsyncExitStack,
) -> None:
    endpoint = Endpoint(f"127.0.0.1:{free_port()}")
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    await scr.scrape_once()
    assert scr.stats.endpoints[endpoint.address].failed == 1
    assert endpoint.metrics.stale and endpoint.metrics.updated_at is None


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("vllm:num_requests_waiting abc\n", "bad sample value"),
        ("# nothing here\n", "none of vllm:num_requests_waiting"),
        ("vllm:num_requests_waiting NaN\n", "is nan"),
    ],
    ids=["malformed", "not an engine", "nan count"],
)
async def test_unreadable_bodies_are_failures(
    stack: contextlib.AsyncExitStack, body: str, error: str
) -> None:
    server = await serve(stack)
    server.body = body
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    await scr.scrape_once()
    stats = scr.stats.endpoints[endpoint.address]
    assert stats.failed == 1
    assert stats.last_error is not None and error in stats.last_error


async def test_a_wrong_engine_type_fails_with_the_names_it_looked_for(
    stack: contextlib.AsyncExitStack,
) -> None:
    server = await serve(stack, EngineState(engine="sglang"))
    endpoint = Endpoint(server.address, engine="vllm")  # misconfigured
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    await scr.scrape_once()
    error = scr.stats.endpoints[endpoint.address].last_error
    assert error is not None and "none of vllm:num_requests_waiting" in error


async def test_a_partial_exposition_reads_zero_and_warns_once(
    stack: contextlib.AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(stack)
    server.body = "vllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n"
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]), start=False)
    for _ in range(3):
        await scr.scrape_once()
    assert (endpoint.metrics.waiting, endpoint.metrics.running) == (0, 2)
    assert not endpoint.metrics.stale
    assert messages(caplog, logging.WARNING, "exposes no vllm:num_requests_waiting") == [
        f"endpoint {endpoint.address} (vllm) exposes no vllm:num_requests_waiting; reading it as 0"
    ]


async def test_an_unexpected_error_is_logged_and_the_loop_goes_on(
    stack: contextlib.AsyncExitStack,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = metrics_scraper.read_metrics
    calls = 0

    def buggy(text: str, names: EngineMetricNames) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError("bug")
        return read(text, names)

    monkeypatch.setattr(metrics_scraper, "read_metrics", buggy)
    server = await serve(stack, EngineState(waiting=[2]))
    endpoint = endpoint_of(server)
    scr = await scraper(stack, EndpointSet([endpoint]))
    await wait_until(lambda: endpoint.metrics.waiting == 2)
    assert scr.stats.endpoints[endpoint.address].failed == 3
    assert len(messages(caplog, logging.ERROR, "unexpected error scraping")) == 1


# -- endpoints coming and going ------------------------------------------------------------------


async def test_a_leaving_endpoint_is_no_longer_scraped(stack: contextlib.AsyncExitStack) -> None:
    a, b = await serve(stack), await serve(stack)
    endpoints = EndpointSet([endpoint_of(a), endpoint_of(b)])
    scr = await scraper(stack, endpoints)
    await wait_until(lambda: len(a.requests) >= 2 and len(b.requests) >= 2)
    endpoints.replace([endpoints.get(b.address)])  # type: ignore[list-item]
    assert a.address not in scr.stats.endpoints
    count = len(a.requests)
    seen_b = len(b.requests)
    await asyncio.sleep(10 * FAST.interval_s)
    assert len(a.requests) == count
    assert len(b.requests) > seen_b


async def test_a_scrape_in_flight_when_its_endpoint_leaves_writes_nothing(
    stack: contextlib.AsyncExitStack,
) -> None:
    server = await serve(stack, EngineState(waiting=[5]))
    server.delay_s = 0.1
    endpoint = endpoint_of(server)
    endpoints = EndpointSet([endpoint])
    scr = await scraper(stack, endpoints, start=False)
    scrape = asyncio.create_task(scr.scrape_once())
    await wait_until(lambda: len(server.requests) == 1)
    endpoints.replace([])
    await scrape
    assert endpoint.metrics.updated_at is None
    assert scr.stats.scrapes_ok == 0


async def test_joining_endpoints_are_scraped_at_once(stack: contextlib.AsyncExitStack) -> None:
    endpoints = EndpointSet()
    await scraper(stack, endpoints)
    server = await serve(stack, EngineState(running=[3]))
    endpoint = endpoint_of(server)
    endpoints.replace([endpoint])
    await wait_until(lambda: endpoint.metrics.running == 3)


async def test_a_changed_endpoint_is_scraped_under_its_new_spec(
    stack: contextlib.AsyncExitStack,
) -> None:
    server = await serve(stack, EngineState(engine="trtllm", waiting=[6]))
    endpoints = EndpointSet([Endpoint(server.address, engine="vllm")])  # wrong at first
    scr = await scraper(stack, endpoints)
    await wait_until(lambda: scr.stats.scrapes_failed >= 1)
    fixed = Endpoint(server.address, engine="trtllm")
    endpoints.replace([fixed])
    await wait_until(lambda: fixed.metrics.waiting == 6)
    assert scr.stats.endpoints[server.address].failed == 0  # fresh stats for the new spec


async def test_concurrency_is_bounded(stack: contextlib.AsyncExitStack) -> None:
    in_flight = InFlight()
    servers = [await stack.enter_async_context(MetricsServer(None, in_flight)) for _ in range(6)]
    for server in servers:
        server.delay_s = 0.05
    config = ScraperConfig(max_concurrency=2, timeout_s=1.0)
    scr = await scraper(stack, EndpointSet([endpoint_of(s) for s in servers]), config, start=False)
    await scr.scrape_once()
    assert scr.stats.scrapes_ok == 6
    assert in_flight.peak == 2


# -- block size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "label", "flag"),
    [("vllm", "block_size", "--block-size"), ("sglang", "page_size", "--page-size")],
)
async def test_a_block_size_mismatch_is_explained_once_and_counted(
    stack: contextlib.AsyncExitStack,
    caplog: pytest.LogCaptureFixture,
    engine: EngineType,
    label: str,
    flag: str,
) -> None:
    state = EngineState(engine=engine, waiting=[1])
    state.block_size = 32
    server = await serve(stack, state)
    endpoint = endpoint_of(server)
    config = ScraperConfig(block_size=16, block_size_setting="--block-size (kvgate)")
    scr = await scraper(stack, EndpointSet([endpoint]), config, start=False)
    for _ in range(3):
        await scr.scrape_once()
    [error] = messages(caplog, logging.ERROR, "reports")
    assert error == (
        f"endpoint {endpoint.address} ({engine}) reports {label}=32 in {engine}:cache_config_info "
        f"but kvgate is configured with block size 16: set --block-size (kvgate)=32, or restart "
        f"the engine with {flag} 16. Until then its prefix matches are computed on the wrong "
        "block boundaries (it stays routable)"
    )
    assert scr.stats.block_size_mismatch == {endpoint.address}
    assert scr.stats.block_size_mismatches == 1
    assert not endpoint.metrics.stale and endpoint.metrics.waiting == 1  # still routable

    state.block_size = 64  # another wrong size: explained again
    await scr.scrape_once()
    assert len(messages(caplog, logging.ERROR, "reports")) == 2
    assert scr.stats.block_size_mismatches == 2

    state.block_size = 16
    await scr.scrape_once()
    assert scr.stats.block_size_mismatch == set()


async def test_no_block_size_check_without_a_configured_size(
    stack: contextlib.AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    state = EngineState()
    state.block_size = 32
    server = await serve(stack, state)
    scr = await scraper(stack, EndpointSet([endpoint_of(server)]), ScraperConfig(), start=False)
    await scr.scrape_once()
    assert scr.stats.block_size_mismatch == set()
    assert not messages(caplog, logging.ERROR, "reports")


async def test_a_leaving_endpoint_leaves_the_mismatch_set(
    stack: contextlib.AsyncExitStack,
) -> None:
    state = EngineState()
    state.block_size = 32
    server = await serve(stack, state)
    endpoints = EndpointSet([endpoint_of(server)])
    scr = await scraper(stack, endpoints, ScraperConfig(block_size=16), start=False)
    await scr.scrape_once()
    assert scr.stats.block_size_mismatch == {server.address}
    endpoints.replace([])
    assert scr.stats.block_size_mismatch == set()


# -- lifecycle and config ------------------------------------------------------------------------


async def test_lifecycle(stack: contextlib.AsyncExitStack) -> None:
    server = await serve(stack)
    endpoints = EndpointSet([endpoint_of(server)])
    async with MetricsScraper(endpoints, FAST) as scr:
        await scr.start()  # idempotent
        await wait_until(lambda: scr.stats.scrapes_ok >= 1)
    await scr.aclose()  # idempotent
    count = len(server.requests)
    endpoints.replace([])  # ignored once closed
    await asyncio.sleep(5 * FAST.interval_s)
    assert len(server.requests) == count
    with pytest.raises(RuntimeError, match="closed"):
        await scr.scrape_once()
    with pytest.raises(RuntimeError, match="closed"):
        await scr.start()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval_s": 0}, "interval_s: got 0; must be > 0"),
        ({"timeout_s": -1}, "timeout_s: got -1; must be > 0"),
        ({"stale_after_s": 0}, "stale_after_s: got 0; must be > 0"),
        ({"timeout_s": 2.0, "stale_after_s": 2.0}, "must be below stale_after_s"),
        ({"max_concurrency": 0}, "max_concurrency: got 0; must be >= 1"),
        ({"block_size": 0}, "block_size: got 0; must be >= 1"),
        ({"warn_interval_s": -1}, "warn_interval_s: got -1; must be >= 0"),
    ],
    ids=[
        "interval",
        "timeout",
        "staleness",
        "timeout vs staleness",
        "concurrency",
        "block",
        "warn",
    ],
)
def test_config_is_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScraperConfig(**kwargs)


# -- against the simulated engine ----------------------------------------------------------------


@pytest.mark.slow
async def test_scraping_the_simulated_engine(
    stack: contextlib.AsyncExitStack, qwen3_dir: Path
) -> None:
    engine_mod = pytest.importorskip("kvgate.sim.engine")
    http_mod = pytest.importorskip("kvgate.sim.http")
    prompts_mod = pytest.importorskip("kvgate.sim.prompts")
    codec = prompts_mod.TokensCodec.load(str(qwen3_dir))
    engine = engine_mod.Engine(
        engine_mod.EngineConfig(block_size=32, num_gpu_blocks=256, max_model_len=4096)
    )
    worker = http_mod.SimWorker(engine, codec, http_mod.WorkerConfig(host="127.0.0.1"))
    await stack.enter_async_context(worker)
    endpoint = Endpoint(worker.address)
    scr = await scraper(stack, EndpointSet([endpoint]), ScraperConfig(block_size=16), start=False)
    await scr.scrape_once()
    m = endpoint.metrics
    assert scr.stats.endpoints[endpoint.address].failed == 0
    assert (m.waiting, m.running, m.kv_usage) == (0, 0, 0.0)
    assert (m.block_size, m.num_gpu_blocks) == (32, 256)
    assert not m.stale
    assert scr.stats.block_size_mismatch == {endpoint.address}


# -- over a mock transport (no sockets) ----------------------------------------------------------


class Pages:
    """Answers per address: a state to render (filtered as asked), or an error to raise."""

    def __init__(self) -> None:
        self.states: dict[str, EngineState] = {}
        self.errors: dict[str, Exception] = {}

    def __call__(self, url: URL) -> str:
        address = f"{url.host}:{url.port}"
        if address in self.errors:
            raise self.errors[address]
        names = url.query.getall("name[]", []) or None
        return render(self.states[address], names)


async def test_mock_transport_scrapes_read_each_endpoint_and_close_the_transport() -> None:
    pages = Pages()
    pages.states["10.0.0.1:8000"] = EngineState(waiting=[2, 3], running=[1])
    pages.states["10.0.0.2:8000"] = EngineState(engine="sglang", usage=[0.25], block_size=32)
    transport = MockTransport(pages)
    endpoints = EndpointSet([Endpoint("10.0.0.1:8000"), Endpoint("10.0.0.2:8000", engine="sglang")])
    scr = MetricsScraper(endpoints, ScraperConfig(block_size=16), transport=transport)
    await scr.scrape_once()
    first, second = endpoints.get("10.0.0.1:8000"), endpoints.get("10.0.0.2:8000")
    assert first is not None and second is not None
    assert (first.metrics.waiting, first.metrics.running) == (5, 1)
    assert (second.metrics.kv_usage, second.metrics.block_size) == (0.25, 32)
    assert scr.stats.block_size_mismatch == {"10.0.0.2:8000"}
    assert transport.requests[0].query.getall("name[]") == list(ENGINE_METRICS["vllm"].names)
    await scr.aclose()
    assert transport.closed


async def test_mock_transport_failures_count_and_keep_the_last_metrics() -> None:
    pages = Pages()
    pages.states["10.0.0.1:8000"] = EngineState(waiting=[4])
    endpoint = Endpoint("10.0.0.1:8000")
    scr = MetricsScraper(EndpointSet([endpoint]), FAST, transport=MockTransport(pages))
    await scr.scrape_once()
    pages.errors["10.0.0.1:8000"] = TransportError("connection reset")
    await scr.scrape_once()
    stats = scr.stats.endpoints["10.0.0.1:8000"]
    assert (stats.ok, stats.failed, stats.last_error) == (1, 1, "connection reset")
    assert endpoint.metrics.waiting == 4 and not endpoint.metrics.stale
    await scr.aclose()


async def test_mock_transport_filtered_answer_without_the_metrics_falls_back_to_full() -> None:
    state = EngineState(waiting=[6])

    def drops_filtered(url: URL) -> str:
        return render(state, url.query.getall("name[]", None), "drop-unnamed")

    transport = MockTransport(drops_filtered)
    endpoint = Endpoint("10.0.0.1:8000")
    scr = MetricsScraper(EndpointSet([endpoint]), FAST, transport=transport)
    await scr.scrape_once()
    await scr.scrape_once()
    assert endpoint.metrics.waiting == 6
    assert [bool(url.query) for url in transport.requests] == [True, False, False]
    await scr.aclose()
