"""`kvgate demo`: the whole gateway on this machine, one real request, a short shared-prefix load,
per-worker results — with kvgate's routing, then with the reference router's cost function and
with the standard round-robin EPP for contrast.

The load and its report are in :mod:`kvgate.gateway.demo`.
"""

from __future__ import annotations

import argparse
import asyncio

from kvgate.commands.support import RUNTIME_ERROR, fail
from kvgate.errors import StartupError
from kvgate.gateway.demo import LoadReport, first_request, print_report, run_load, workload
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, Mode, Routing

PROG = "kvgate demo"


RUNS: tuple[tuple[str, Mode, Routing], ...] = (
    ("kvgate", "kv", "kvgate"),
    ("dynamo", "kv", "dynamo"),
    ("round-robin", "standard", "kvgate"),
)
"""What the demo compares: label, `kvgate up` mode, KV routing policy."""


def run_mode(label: str, mode: Mode, routing: Routing, args: argparse.Namespace) -> LoadReport:
    config = LocalGatewayConfig(
        workers=args.workers,
        port=args.port,
        mode=mode,
        routing=routing,
        tokenizer=args.tokenizer,
        speedup=args.speedup,
        num_gpu_blocks=args.num_gpu_blocks,
        body_transformer="inline" if args.backend == "dynamo" else "off",
        backend=args.backend,
    )
    gateway = LocalGateway(config)
    engines = "Dynamo mocker workers" if args.backend == "dynamo" else "simulated engines"
    print(f"\n== {label} routing: starting Envoy, EPP and {args.workers} {engines} "
          f"(logs in {gateway.run_dir})")  # fmt: skip
    with gateway as running:
        first = asyncio.run(first_request(running.url))
        if first.status != 200:
            raise StartupError(f"first request through Envoy failed: {first.status} {first.error}")
        by = f" from worker {first.worker}" if first.worker else ""
        print(f"POST {running.url}/v1/chat/completions -> {first.status}{by} in "
              f"{first.latency_s * 1e3:.0f} ms: {first.text[:60]!r}")  # fmt: skip
        bodies = workload(args.groups, args.per_group, args.prompt_words)
        fleet = running.dynamo.fleet if running.dynamo is not None else None
        before = fleet.requests_by_worker() if fleet is not None else {}
        results = asyncio.run(run_load(running.url, bodies, args.concurrency))
        report = LoadReport(label, results)
        print_report(report, running.workers)
        if fleet is not None:
            from kvgate.dynamo.gateway import print_served

            print_served(fleet, before)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8, help="distinct shared system prompts")
    parser.add_argument(
        "--per-group",
        type=int,
        default=16,
        help="requests per prompt (the first of each group is cold whatever the routing: with "
        "16, 8 of 128, so the p90 is the steady state rather than the start)",
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=1536,
        help="KV blocks (of 16 tokens) per engine: about four prompts, so that a worker cannot "
        "cache every group's",
    )
    parser.add_argument(
        "--prompt-words",
        type=int,
        default=1500,
        help="system prompt length (1,500 words: ~5,900 tokens, ~120 ms to prefill cold)",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--speedup", type=float, default=1.0, help="engine time divisor")
    parser.add_argument("--port", type=int, default=8000, help="gateway port on 127.0.0.1")
    parser.add_argument("--tokenizer", help="tokenizer dir or hub id (default: bundled Qwen3)")
    parser.add_argument(
        "--backend",
        choices=["sim", "dynamo"],
        default="sim",
        help="simulated engines, or Dynamo's frontend + mocker workers (needs kvgate[dynamo])",
    )
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="run kvgate's routing only (skip the reference and round-robin runs)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (1 <= args.workers <= 64 and 1 <= args.groups * args.per_group <= 2000):
        parser.error("workers must be in 1..64 and groups × per-group in 1..2000")
    reports: list[LoadReport] = []
    try:
        for label, mode, routing in RUNS[:1] if args.no_compare else RUNS:
            reports.append(run_mode(label, mode, routing, args))
    except StartupError as err:
        return fail(PROG, err, RUNTIME_ERROR)
    if len(reports) > 1:
        total = args.groups * args.per_group
        print(f"\n{total} requests in {args.groups} groups sharing a system prompt; the first of "
              f"each group ({args.groups} of {total}) is cold whatever the routing")  # fmt: skip
        print(f"\n{'routing':<14}{'prefix hit rate':>16}{'TTFT p50':>11}{'TTFT p90':>11}")
        for r in reports:
            print(f"{r.mode:<14}{r.hit_rate():>16.0%}{r.ttft_ms(0.5):>8.0f} ms"
                  f"{r.ttft_ms(0.9):>8.0f} ms")  # fmt: skip
    return 0 if all(r.ok() for r in reports) else RUNTIME_ERROR
