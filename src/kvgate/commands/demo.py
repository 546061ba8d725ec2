"""`kvgate demo`: the whole gateway on this machine, one real request, a short shared-prefix load,
per-worker results — with KV-aware routing, then with the standard round-robin EPP for contrast.

The load and its report are in :mod:`kvgate.gateway.demo`.
"""

from __future__ import annotations

import argparse
import asyncio

from kvgate.commands.support import RUNTIME_ERROR, fail
from kvgate.gateway.demo import LoadReport, first_request, print_report, run_load, workload
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, Mode
from kvgate.gateway.supervisor import StartupError

PROG = "kvgate demo"


def run_mode(mode: Mode, args: argparse.Namespace) -> LoadReport:
    config = LocalGatewayConfig(
        workers=args.workers,
        port=args.port,
        mode=mode,
        tokenizer=args.tokenizer,
        speedup=args.speedup,
        num_gpu_blocks=args.num_gpu_blocks,
        body_transformer="inline" if args.backend == "dynamo" else "off",
        backend=args.backend,
    )
    gateway = LocalGateway(config)
    engines = "Dynamo mocker workers" if args.backend == "dynamo" else "simulated engines"
    print(f"\n== {mode} routing: starting Envoy, EPP and {args.workers} {engines} "
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
        report = LoadReport(mode, results)
        print_report(report, running.workers)
        if fleet is not None:
            from kvgate.dynamo.gateway import print_served

            print_served(fleet, before)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8, help="distinct shared system prompts")
    parser.add_argument("--per-group", type=int, default=6, help="requests per prompt")
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=512,
        help="KV blocks per engine: small, so that a worker cannot cache every prompt",
    )
    parser.add_argument("--prompt-words", type=int, default=600, help="system prompt length")
    parser.add_argument("--concurrency", type=int, default=4)
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
        "--no-compare", action="store_true", help="skip the round-robin comparison run"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (1 <= args.workers <= 64 and 1 <= args.groups * args.per_group <= 2000):
        parser.error("workers must be in 1..64 and groups × per-group in 1..2000")
    try:
        kv = run_mode("kv", args)
        if args.no_compare:
            return 0 if kv.ok() else RUNTIME_ERROR
        standard = run_mode("standard", args)
    except StartupError as err:
        return fail(PROG, err, RUNTIME_ERROR)
    print(f"\nKV-aware vs round-robin: prefix hit rate {kv.hit_rate():.0%} vs "
          f"{standard.hit_rate():.0%}; TTFT p50 {kv.ttft_ms(0.5):.0f} vs "
          f"{standard.ttft_ms(0.5):.0f} ms, p90 {kv.ttft_ms(0.9):.0f} vs "
          f"{standard.ttft_ms(0.9):.0f} ms")  # fmt: skip
    return 0 if kv.ok() and standard.ok() else RUNTIME_ERROR
