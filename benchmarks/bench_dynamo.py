"""kvgate against Dynamo's own routers, on Dynamo's own frontend and mocker workers.

Three ways to route one trace over the same fleet (N mocker workers with identical settings,
started fresh for every run so that each begins with empty caches):

    kvgate        client -> Envoy -> kvgate EPP (its default EndpointPickerConfig) -> Dynamo
                  frontend in direct mode -> the worker the EPP named   (kvgate up --backend dynamo)
    dynamo-kv     client -> Dynamo frontend, --router-mode kv (Dynamo's Rust KV router)
    dynamo-rr     client -> Dynamo frontend, --router-mode round-robin

The trace is replayed by `kvgate bench`'s client (`kvgate.bench.live.run_bench`): streamed
completions, open loop at the trace's timestamps, TTFT / hit rate measured at the client. The
added latency of each path is measured separately, on one fleet with all three frontends: the
median latency of short sequential requests (a prompt under one KV block, one output token)
minus the same through a direct-mode frontend pinned to a worker (the shortest path into Dynamo).

    python benchmarks/bench_dynamo.py [--workers 4] [--groups 16] [--per-group 12] \
        [--rate 8] [--blocks 512] [--json out.json] [--only kvgate,dynamo-kv,dynamo-rr]

Loopback only; every load is bounded (request count and --duration). Re-run it after changing
kvgate's default policy: the table in docs/benchmarks.md comes from this script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.bench.live import BenchSettings, run_bench
from kvgate.bench.report import PolicyMetrics, summarize, table
from kvgate.bench.traces import ideal_hit_rate, shared_prefix, write_mooncake
from kvgate.dynamo.processes import DynamoFleet, FleetSettings, RouterMode
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, default_tokenizer, free_port

MODEL = "Qwen/Qwen3-0.6B"
CONFIGS: dict[str, RouterMode] = {"kvgate": "direct", "dynamo-kv": "kv", "dynamo-rr": "round-robin"}


class Paths(AbstractContextManager["Paths"]):
    """A fleet (frontends in ``modes``) and, for kvgate, the gateway in front of its direct one."""

    def __init__(self, args: argparse.Namespace, modes: tuple[RouterMode, ...], gateway: bool):
        self._stack = ExitStack()
        self.run_dir = Path(tempfile.mkdtemp(prefix="bench-dynamo-", dir=args.run_dir))
        settings = FleetSettings(
            workers=args.workers,
            router_modes=modes,
            num_gpu_blocks=args.blocks,
            speedup=args.speedup,
            log_level="warn",
        )
        self.fleet = self._stack.enter_context(DynamoFleet(settings, self.run_dir / "fleet"))
        self.gateway_url: str | None = None
        if gateway:
            config = LocalGatewayConfig(
                backend="dynamo",
                dynamo_fleet=self.fleet,
                dynamo_router_mode="direct",
                body_transformer="inline",
                port=free_port(),
                tokenizer=default_tokenizer(),
                run_dir=self.run_dir / "gateway",
            )
            self.gateway_url = self._stack.enter_context(LocalGateway(config)).url

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


async def _latencies(url: str, count: int, headers: Callable[[int], dict[str, str]]) -> list[float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    out: list[float] = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i in range(count + 5):
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/chat/completions", json=body, headers=headers(i)
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            if i >= 5:  # the first few warm connections and caches up
                out.append(time.perf_counter() - started)
    return out


def added_latency(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with Paths(args, ("direct", "kv", "round-robin"), gateway=True) as paths:
        fleet = paths.fleet
        ids = [w.instance_id for w in fleet.workers]

        def pinned(i: int) -> dict[str, str]:
            return {"x-worker-instance-id": str(ids[i % len(ids)])}

        assert paths.gateway_url is not None
        runs = {
            "dynamo direct, pinned": (fleet.frontend("direct").url, pinned),
            "kvgate": (paths.gateway_url, lambda _i: {}),
            "dynamo-kv": (fleet.frontend("kv").url, lambda _i: {}),
            "dynamo-rr": (fleet.frontend("round-robin").url, lambda _i: {}),
        }
        result: dict[str, dict[str, float]] = {}
        for name, (url, headers) in runs.items():
            samples = asyncio.run(_latencies(url, args.latency_requests, headers))
            qs = statistics.quantiles(samples, n=100)
            result[name] = {"p50_ms": qs[49] * 1e3, "p90_ms": qs[89] * 1e3}
        base = result["dynamo direct, pinned"]["p50_ms"]
        for values in result.values():
            values["added_p50_ms"] = values["p50_ms"] - base
        return result


def replay(args: argparse.Namespace, name: str, trace: list[Any]) -> PolicyMetrics:
    mode = CONFIGS[name]
    with Paths(args, (mode,), gateway=name == "kvgate") as paths:
        url = paths.gateway_url or paths.fleet.frontend(mode).url
        settings = BenchSettings(
            url=url,
            model=MODEL,
            max_concurrency=args.max_concurrency,
            duration_s=args.duration,
            request_timeout_s=60.0,
        )
        before = paths.fleet.requests_by_worker()
        record = asyncio.run(run_bench(trace, settings))
        after = paths.fleet.requests_by_worker()
        # The workers' own counters stand in for the client's per-worker tally (Dynamo's
        # responses do not name the worker).
        record.per_worker = {
            f"{i:x}": after[i] - before.get(i, 0) for i in after if after[i] > before.get(i, 0)
        }
        return summarize(record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--blocks", type=int, default=512, help="KV blocks (of 16 tokens) per worker")
    p.add_argument("--speedup", type=float, default=1.0, help="the mockers' --speedup-ratio")
    p.add_argument("--groups", type=int, default=16, help="shared system prompts")
    p.add_argument("--per-group", type=int, default=12, help="requests per system prompt")
    p.add_argument("--system-blocks", type=int, default=2, help="512-token blocks per prompt")
    p.add_argument("--question-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--rate", type=float, default=8.0, help="arrivals per second (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0, help="seconds per run at most")
    p.add_argument("--latency-requests", type=int, default=100)
    p.add_argument("--only", default=",".join(CONFIGS), help="comma-separated runs")
    p.add_argument("--run-dir", type=Path, default=None, help="where fleets keep their logs")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.run_dir is not None:
        args.run_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        p.error(f"unknown runs {sorted(unknown)}; choose from {list(CONFIGS)}")

    workload = shared_prefix(
        groups=args.groups,
        prompts_per_group=args.per_group,
        system_blocks=args.system_blocks,
        question_tokens=args.question_tokens,
        output_tokens=args.output_tokens,
        rate_per_s=args.rate,
    )
    trace = workload.requests
    trace_file = Path(tempfile.mkdtemp(prefix="bench-dynamo-trace-")) / "shared_prefix.jsonl"
    write_mooncake(trace_file, trace)
    print(f"trace: {len(trace)} requests, ideal hit rate {ideal_hit_rate(trace):.3f} "
          f"({trace_file})", file=sys.stderr)  # fmt: skip

    overhead = added_latency(args)
    results = {}
    for name in names:
        started = time.monotonic()
        results[name] = replay(args, name, trace)
        print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr)

    print(table(results, ideal_hit_rate(trace)))
    print("\nlatency of a one-token request (sequential), and what each path adds to the")
    print("shortest way into Dynamo (a direct-mode frontend pinned to a worker):")
    print("| path | p50 ms | p90 ms | added p50 ms |\n| --- | --- | --- | --- |")
    for name, v in overhead.items():
        print(f"| {name} | {v['p50_ms']:.2f} | {v['p90_ms']:.2f} | {v['added_p50_ms']:+.2f} |")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "ideal_hit_rate": ideal_hit_rate(trace),
                    "runs": {n: m.to_json() for n, m in results.items()},
                    "added_latency": overhead,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
