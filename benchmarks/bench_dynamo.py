"""kvgate against Dynamo's own routers, on Dynamo's own frontend and mocker workers.

Four ways to route one trace over the same fleet (N mocker workers with identical settings,
started fresh for every run so that each begins with empty caches):

    kvgate            client -> Envoy -> kvgate EPP (kvgate's routing, the `kvgate up` default:
                      predicted latency) -> Dynamo frontend in direct mode -> the worker the EPP
                      named   (kvgate up --backend dynamo)
    kvgate-reference  the same path, the EPP on the reference cost function (Dynamo's, overlap
                      weight 1, temperature 0: kvgate up --routing dynamo)
    dynamo-kv         client -> Dynamo frontend, --router-mode kv (Dynamo's Rust KV router)
    dynamo-rr         client -> Dynamo frontend, --router-mode round-robin

The trace is replayed by `kvgate bench`'s client (`kvgate.bench.live.run_bench`): streamed,
open loop at the trace's timestamps, TTFT / hit rate measured at the client; ``--prompts chat``
(default) sends each prompt as text in one user message, ``--prompts tokens`` as token ids on
/v1/completions, which neither the EPP nor Dynamo's frontend has to tokenize. The
added latency of each path is measured separately, on one fleet with all three frontends: the
median latency of short sequential requests (a prompt under one KV block, one output token)
minus the same through a direct-mode frontend pinned to a worker (the shortest path into Dynamo).
With ``--rounds N`` every run is repeated, the runs' order rotated each round, and the samples
pooled; each round's TTFT p90 and the machine's load average as each run started are printed
too (the machine may be shared), and each round's TTFT p90 over Dynamo's KV router's.

    python benchmarks/bench_dynamo.py [--workers 4] [--groups 16] [--per-group 12] \
        [--rate 8] [--blocks 512] [--prompts chat|tokens] [--rounds 2] [--json out.json] \
        [--only kvgate,kvgate-reference,dynamo-kv,dynamo-rr]

Loopback only; every load is bounded (request count and --duration). Re-run it after changing
kvgate's default policy: the table in docs/benchmarks.md comes from this script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.bench.live import BenchSettings, run_bench
from kvgate.bench.report import PolicyMetrics, RunRecord, summarize, table
from kvgate.bench.traces import ideal_hit_rate, shared_prefix, write_mooncake
from kvgate.dynamo.processes import DynamoFleet, FleetSettings, RouterMode
from kvgate.gateway.local import (
    LocalGateway,
    LocalGatewayConfig,
    Routing,
    RunningGateway,
    default_tokenizer,
    free_port,
)

MODEL = "Qwen/Qwen3-0.6B"


@dataclass(frozen=True)
class Run:
    mode: RouterMode
    """The Dynamo frontend's router mode."""
    routing: Routing | None = None
    """kvgate's policy in front of a direct-mode frontend; None: the frontend routes alone."""


RUNS: dict[str, Run] = {
    "kvgate": Run("direct", "kvgate"),
    "kvgate-reference": Run("direct", "dynamo"),
    "dynamo-kv": Run("kv"),
    "dynamo-rr": Run("round-robin"),
}


PROMPTS: dict[str, dict[str, Any]] = {
    # What clients send: the EPP and Dynamo's frontend both tokenize the text.
    "chat": {"api": "chat", "prompt_format": "text"},
    # Token ids on /v1/completions: nobody tokenizes; the router's own cost alone.
    "tokens": {"api": "completions", "prompt_format": "tokens"},
}


class Paths(AbstractContextManager["Paths"]):
    """A fleet (frontends in ``modes``) and a kvgate gateway per routing policy in ``routings``,
    each in front of the fleet's direct-mode frontend."""

    def __init__(
        self,
        args: argparse.Namespace,
        modes: tuple[RouterMode, ...],
        routings: tuple[Routing, ...] = (),
    ):
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
        self.gateways: dict[Routing, RunningGateway] = {}
        for routing in routings:
            config = LocalGatewayConfig(
                backend="dynamo",
                dynamo_fleet=self.fleet,
                dynamo_router_mode="direct",
                routing=routing,
                body_transformer="inline",
                port=free_port(),
                tokenizer=default_tokenizer(),
                run_dir=self.run_dir / f"gateway-{routing}",
            )
            self.gateways[routing] = self._stack.enter_context(LocalGateway(config))

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
    with Paths(args, ("direct", "kv", "round-robin"), ("kvgate", "dynamo")) as paths:
        fleet = paths.fleet
        ids = [w.instance_id for w in fleet.workers]

        def pinned(i: int) -> dict[str, str]:
            return {"x-worker-instance-id": str(ids[i % len(ids)])}

        runs = {
            "dynamo direct, pinned": (fleet.frontend("direct").url, pinned),
            "kvgate": (paths.gateways["kvgate"].url, lambda _i: {}),
            "kvgate-reference": (paths.gateways["dynamo"].url, lambda _i: {}),
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


def epp_stage_ms(metrics_url: str) -> dict[str, float]:
    """Mean time the EPP spent per request in each routing stage (``total``: parse to answer),
    from its ``kvgate_stage_duration_seconds`` histogram."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    pattern = r'^kvgate_stage_duration_seconds_(sum|count)\{stage="([^"]+)"\} (\S+)$'
    for kind, stage, value in re.findall(pattern, text, re.M):
        (sums if kind == "sum" else counts)[stage] = float(value)
    return {k: 1000.0 * sums[k] / n for k, n in counts.items() if n and k in sums}


def ttft_prediction_accuracy(metrics_url: str) -> dict[str, float]:
    """How far the EPP's TTFT predictions were from what it observed (its
    ``kvgate_ttft_prediction_error_ratio`` histogram, (observed − predicted) / predicted): the
    share within ±25% and the share more than 2× slower than predicted; empty without
    predictions (the reference cost function makes none)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    pattern = r'^kvgate_ttft_prediction_error_ratio_bucket\{le="([^"]+)"\} (\S+)$'
    buckets = {le: float(count) for le, count in re.findall(pattern, text, re.M)}
    total = buckets.get("+Inf", 0.0)
    if not total or not {"-0.25", "0.25", "1.0"} <= buckets.keys():
        return {}
    return {
        "ttft_predicted_within_25pct": (buckets["0.25"] - buckets["-0.25"]) / total,
        "ttft_over_2x_predicted": (total - buckets["1.0"]) / total,
    }


def replay(
    args: argparse.Namespace, name: str, trace: list[Any]
) -> tuple[RunRecord, dict[str, float]]:
    """One run on a fresh fleet: what the client measured, and the EPP's mean time per routing
    stage (empty without a gateway)."""
    run = RUNS[name]
    routings = () if run.routing is None else (run.routing,)
    with Paths(args, (run.mode,), routings) as paths:
        gateway = paths.gateways.get(run.routing) if run.routing else None
        url = gateway.url if gateway else paths.fleet.frontend(run.mode).url
        settings = BenchSettings(
            url=url,
            model=MODEL,
            max_concurrency=args.max_concurrency,
            duration_s=args.duration,
            request_timeout_s=60.0,
            **PROMPTS[args.prompts],
        )
        before = paths.fleet.requests_by_worker()
        record = asyncio.run(run_bench(trace, settings))
        after = paths.fleet.requests_by_worker()
        # The workers' own counters stand in for the client's per-worker tally (Dynamo's
        # responses do not name the worker).
        record.per_worker = {
            f"{i:x}": after[i] - before.get(i, 0) for i in after if after[i] > before.get(i, 0)
        }
        if gateway is None:
            return record, {}
        url = gateway.epp_metrics_url
        return record, {**epp_stage_ms(url), **ttft_prediction_accuracy(url)}


def pooled(records: Sequence[RunRecord]) -> PolicyMetrics:
    """One run's rounds as one: every request's samples together, token counts summed (the hit
    rate is over all rounds); load balance is per fleet, so averaged."""
    if len(records) == 1:
        return summarize(records[0])
    record = RunRecord()
    for r in records:
        record.ttft_s += r.ttft_s
        record.e2e_s += r.e2e_s
        record.itl_s += r.itl_s
        record.prompt_tokens += r.prompt_tokens
        record.cached_tokens += r.cached_tokens
        record.output_tokens += r.output_tokens
        record.errors += r.errors
        for kind, n in r.error_kinds.items():
            record.error_kinds[kind] = record.error_kinds.get(kind, 0) + n
        record.wall_s += r.wall_s
    balance = statistics.mean(summarize(r).load_max_over_mean for r in records)
    return replace(summarize(record), load_max_over_mean=balance)


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
    p.add_argument(
        "--only",
        default=",".join(RUNS),
        help="comma-separated runs: kvgate (kvgate's routing), kvgate-reference (kvgate's EPP on "
        "the reference cost function), dynamo-kv, dynamo-rr",
    )
    p.add_argument(
        "--prompts",
        choices=list(PROMPTS),
        default="chat",
        help="chat: text in one user message (what clients send); tokens: token ids on "
        "/v1/completions (no tokenizing on the way)",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat every run, order rotated, pooled")
    p.add_argument("--run-dir", type=Path, default=None, help="where fleets keep their logs")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.run_dir is not None:
        args.run_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(RUNS)
    if unknown:
        p.error(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

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

    began = time.monotonic()
    overhead = added_latency(args)
    records: dict[str, list[RunRecord]] = {n: [] for n in names}
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        shift = r % len(names)
        this_round: dict[str, dict[str, float]] = {}
        # A rotated order so that no run always goes first (or last) on a drifting machine.
        for name in names[shift:] + names[:shift]:
            load = os.getloadavg()[0]
            started = time.monotonic()
            record, stages = replay(args, name, trace)
            records[name].append(record)
            m = summarize(record)
            this_round[name] = {
                "ttft_p50_ms": m.ttft_ms["p50"],
                "ttft_p90_ms": m.ttft_ms["p90"],
                "hit_rate": m.hit_rate,
                "max_over_mean": m.load_max_over_mean,
                "load_average_1m": load,
                "wall_s": time.monotonic() - started,
                **{(k if k.startswith("ttft_") else f"epp_{k}_ms"): v for k, v in stages.items()},
            }
            epp = f", EPP {stages['total']:.1f} ms/decision" if "total" in stages else ""
            if "ttft_predicted_within_25pct" in stages:
                epp += (
                    f", TTFT predicted within ±25% for {stages['ttft_predicted_within_25pct']:.0%}"
                    f", >2x slower for {stages['ttft_over_2x_predicted']:.0%}"
                )
            print(f"round {r + 1} {name}: TTFT p90 {m.ttft_ms['p90']:.1f} ms, hit "
                  f"{m.hit_rate:.3f}, max/mean {m.load_max_over_mean:.2f}{epp}, load "
                  f"{load:.1f}, {time.monotonic() - started:.0f} s", file=sys.stderr)  # fmt: skip
        rounds.append(this_round)
    results = {name: pooled(rs) for name, rs in records.items()}
    minutes = (time.monotonic() - began) / 60

    print(table(results, ideal_hit_rate(trace)))
    print(f"\n{args.rounds} round(s) pooled, {minutes:.1f} min in all.\n")
    print("| run | TTFT p50 | p90 | p99 | hit rate | max/mean | errors | added latency p50 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in results.items():
        added = overhead.get(name, {}).get("added_p50_ms")
        added_text = "–" if added is None else f"{added:+.1f} ms"
        print(f"| {name} | {m.ttft_ms['p50']:.1f} | {m.ttft_ms['p90']:.1f} | "
              f"{m.ttft_ms['p99']:.1f} | {m.hit_rate:.3f} | {m.load_max_over_mean:.2f} | "
              f"{m.errors} | {added_text} |")  # fmt: skip
    print()
    for name in names:
        p90s = " / ".join(f"{rd[name]['ttft_p90_ms']:.0f}" for rd in rounds)
        loads = " / ".join(f"{rd[name]['load_average_1m']:.1f}" for rd in rounds)
        line = f"{name}: TTFT p90 per round {p90s} ms; 1-min load average at start {loads}"
        if "epp_total_ms" in rounds[0][name]:
            epp = " / ".join(f"{rd[name]['epp_total_ms']:.1f}" for rd in rounds)
            line += f"; EPP ms per decision {epp}"
        if "ttft_predicted_within_25pct" in rounds[0][name]:
            near = " / ".join(f"{rd[name]['ttft_predicted_within_25pct']:.0%}" for rd in rounds)
            far = " / ".join(f"{rd[name]['ttft_over_2x_predicted']:.0%}" for rd in rounds)
            line += f"; TTFT predicted within ±25% {near}, >2x slower {far}"
        print(line)
    if "dynamo-kv" in names:
        for name in names:
            if name == "dynamo-kv":
                continue
            ratios = " / ".join(
                f"{rd[name]['ttft_p90_ms'] / rd['dynamo-kv']['ttft_p90_ms']:.2f}" for rd in rounds
            )
            print(f"{name} / dynamo-kv TTFT p90, per round: {ratios}")
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
                    "minutes": minutes,
                    "runs": {n: m.to_json() for n, m in results.items()},
                    "rounds": rounds,
                    "added_latency": overhead,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
