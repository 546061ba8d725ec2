"""CPU cost of the metrics scraper: 8 fake vLLM engines scraped every 50 ms.

    python benchmarks/bench_scraper.py [--seconds 10] [--endpoints 8] [--uvloop]

The engines run in a child process so that only the scraper's own CPU time is counted (the
process's user+system time over the run, divided by the number of scrapes). Each configuration
runs on a fresh event loop: the name[] filter honoured (prometheus_client engines), and the filter
turned off (the full ~34 KB exposition, as from a server that ignores it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from kvgate.fleet.endpoint import Endpoint, EndpointSet
from kvgate.fleet.metrics_scraper import MetricsScraper, ScraperConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fleet.utils import EngineState, MetricsServer  # noqa: E402

LIFETIME_S = 600  # the engine process exits after this even if the parent vanished


async def serve(count: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(MetricsServer(EngineState(waiting=[2], running=[5])))
            for _ in range(count)
        ]
        print(" ".join(s.address for s in servers), flush=True)
        loop = asyncio.get_running_loop()
        # Until the parent closes our stdin (or the lifetime runs out).
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), LIFETIME_S)


async def measure(addresses: list[str], config: ScraperConfig, seconds: float) -> dict[str, float]:
    endpoints = EndpointSet([Endpoint(a) for a in addresses])
    scraper = MetricsScraper(endpoints, config)
    durations: list[float] = []
    async with scraper:
        await asyncio.sleep(1.0)  # warm up: connections opened, caches filled
        ok0 = scraper.stats.scrapes_ok
        usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        deadline = wall0 + seconds
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
            durations.extend(
                s.last_duration_s for s in scraper.stats.endpoints.values() if s.last_duration_s
            )
        usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
        user, system = usage.ru_utime - usage0.ru_utime, usage.ru_stime - usage0.ru_stime
        cpu = user + system
        scrapes = scraper.stats.scrapes_ok - ok0
        failed = scraper.stats.scrapes_failed
    return {
        "scrapes_per_s": scrapes / wall,
        "cpu_us_per_scrape": cpu / scrapes * 1e6,
        "system_share": system / cpu * 100,
        "core_percent": cpu / wall * 100,
        "latency_p50_ms": statistics.median(durations) * 1e3,
        "failed": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--endpoints", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--uvloop", action="store_true", help="run the scraper on uvloop")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    engines = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(args.endpoints)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert engines.stdout is not None
        addresses = engines.stdout.readline().split()
        base = ScraperConfig(interval_s=args.interval)
        runs = {
            "name[] filter honoured": base,
            "full exposition": replace(base, name_filter=False),
        }
        print(
            f"{len(addresses)} endpoints, every {args.interval * 1e3:.0f} ms, {args.seconds} s, "
            f"{'uvloop' if args.uvloop else 'asyncio'} loop"
        )
        for label, config in runs.items():
            coro = measure(addresses, config, args.seconds)
            if args.uvloop:
                import uvloop

                result = uvloop.run(coro)
            else:
                result = asyncio.run(coro)
            print(
                f"{label:24s} {result['scrapes_per_s']:6.1f} scrapes/s  "
                f"{result['cpu_us_per_scrape']:6.0f} us CPU/scrape  "
                f"({result['system_share']:3.0f} % kernel)  "
                f"{result['core_percent']:5.1f} % of a core  "
                f"p50 {result['latency_p50_ms']:.2f} ms  failed {result['failed']:.0f}"
            )
    finally:
        if engines.stdin is not None:
            engines.stdin.close()
        engines.wait(timeout=10)


if __name__ == "__main__":
    main()
