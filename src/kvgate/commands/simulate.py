"""`kvgate simulate`: compare routing policies on a trace or a generated workload, in virtual time.

The replay is `kvgate.bench.simulate`; this module reads the options, builds the workload (a
Mooncake trace, or a family of `kvgate.bench.workloads`), runs every policy, and prints the table
with the bounds (`kvgate.bench.bounds`: floor TTFT, pooled hit rate), optionally as JSON and PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kvgate.bench.bounds import fleet_bounds, infinite_hit_rate
from kvgate.bench.fleet import WorkerSpec, parse_fleet
from kvgate.bench.policies import POLICIES
from kvgate.bench.report import PolicyMetrics, plot, report_json, summarize, table, write_json
from kvgate.bench.simulate import MOONCAKE_WORKER_TOKENS, SimSettings, resolve_policy, simulate
from kvgate.bench.traces import (
    MOONCAKE_BLOCK_TOKENS,
    TraceRequest,
    load_mooncake,
    write_mooncake,
)
from kvgate.bench.workloads import FAMILIES, generate
from kvgate.scheduling.picker_config import EppConfigError

DEFAULT_WORKERS = 8


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvgate simulate",
        description="Replay a Mooncake trace or a generated workload in virtual time against "
        "simulated engines and compare routing policies (the EPP's own scheduler and plugins).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="Mooncake JSONL trace")
    source.add_argument(
        "--workload",
        metavar="NAME[:k=v,...]",
        help=f"generate a workload instead: {', '.join(FAMILIES)} (parameters in "
        "kvgate.bench.workloads)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"simulated workers (default: {DEFAULT_WORKERS}, or as many as --fleet lists)",
    )
    p.add_argument(
        "--fleet",
        default=None,
        metavar="COUNTxSPEED[:KV_BLOCKS],...",
        help='heterogeneous workers, e.g. "4x1.0,4x0.4:16000" (default: all alike, speed 1)',
    )
    p.add_argument(
        "--load",
        type=float,
        default=1.0,
        help="arrival-rate multiplier (a trace's timestamps are divided by it; a workload's "
        "arrival process is sped up by it)",
    )
    p.add_argument(
        "--policy",
        default="kv",
        help=f"comma-separated: {', '.join(POLICIES)}, all, or config:FILE (default: kv)",
    )
    p.add_argument("--block-size", type=int, default=16, help="engine KV block size (tokens)")
    p.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=None,
        help=f"KV blocks per worker (default: {MOONCAKE_WORKER_TOKENS} tokens / block size)",
    )
    p.add_argument("--event-delay-ms", type=float, default=0.0, help="KV event propagation delay")
    p.add_argument("--scrape-interval-ms", type=float, default=50.0, help="metrics refresh")
    p.add_argument("--seed", type=int, default=0, help="token content, plugins and workloads")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply trace timestamps")
    p.add_argument("--max-input-length", type=int, default=None, help="cut longer prompts")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    p.add_argument(
        "--save-trace",
        type=Path,
        default=None,
        help="also write the replayed requests as a Mooncake trace (e.g. for kvgate bench)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="policies replayed in parallel processes (default: min(2, CPUs))",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _settings(args: argparse.Namespace, family_fleet: tuple[WorkerSpec, ...] | None) -> SimSettings:
    fleet = parse_fleet(args.fleet) if args.fleet is not None else family_fleet
    workers = args.workers
    if fleet is not None:
        if workers is not None and workers != len(fleet):
            raise ValueError(f"--workers {workers} but the fleet has {len(fleet)} workers")
        workers = len(fleet)
        if all(spec == WorkerSpec() for spec in fleet):
            fleet = None  # the homogeneous default, spelled out
    return SimSettings(
        workers=workers or DEFAULT_WORKERS,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        event_delay_s=args.event_delay_ms / 1000.0,
        scrape_interval_s=args.scrape_interval_ms / 1000.0,
        seed=args.seed,
        fleet=fleet,
    )


def _workload(
    args: argparse.Namespace,
) -> tuple[str, list[TraceRequest], tuple[WorkerSpec, ...] | None]:
    """The source's name, its requests and the fleet it asks for (if any)."""
    if not args.load > 0:
        raise ValueError(f"--load must be > 0, got {args.load}")
    if args.trace is not None:
        requests = load_mooncake(
            args.trace,
            time_scale=args.time_scale / args.load,
            max_input_length=args.max_input_length,
            limit=args.limit,
        )
        return str(args.trace), requests, None
    if args.fleet is not None:
        workers = len(parse_fleet(args.fleet))
    else:
        workers = args.workers or DEFAULT_WORKERS
    blocks = args.num_gpu_blocks or MOONCAKE_WORKER_TOKENS // args.block_size
    workload = generate(
        args.workload, workers=workers, load=args.load, seed=args.seed, default_blocks=blocks
    )
    requests = workload.requests
    if args.time_scale != 1.0 or args.max_input_length is not None or args.limit is not None:
        requests = _trimmed(requests, args)
    name = f"workload:{args.workload} load={args.load:g} seed={args.seed}"
    return name, requests, workload.fleet


def _trimmed(requests: list[TraceRequest], args: argparse.Namespace) -> list[TraceRequest]:
    if not args.time_scale > 0:
        raise ValueError(f"--time-scale must be > 0, got {args.time_scale}")
    out = []
    cut = args.max_input_length
    for r in requests[: args.limit]:
        isl = r.input_length if cut is None else min(r.input_length, cut)
        ids = r.hash_ids[: -(-isl // MOONCAKE_BLOCK_TOKENS)]
        out.append(TraceRequest(r.timestamp_ms * args.time_scale, isl, r.output_length, ids))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.policy.split(",") if n.strip()]
    if names == ["all"]:
        names = list(POLICIES)
    try:
        for name in names:
            resolve_policy(name)
        source, requests, family_fleet = _workload(args)
        settings = _settings(args, family_fleet)
        if args.save_trace is not None:
            write_mooncake(args.save_trace, requests)
        started = time.perf_counter()
        records = simulate(
            requests,
            names,
            settings,
            jobs=args.jobs,
            progress=None if args.quiet else sys.stderr,
        )
        elapsed = time.perf_counter() - started
        bounds = fleet_bounds(requests, settings.worker_models())
    except (OSError, ValueError, EppConfigError) as err:
        print(f"kvgate simulate: {err}", file=sys.stderr)
        return 2
    ideal = infinite_hit_rate(requests, settings.block_size)
    results: dict[str, PolicyMetrics] = {n: summarize(r) for n, r in records.items()}
    print(table(results, ideal, bounds))
    shape = f"{settings.workers} workers" + (" (heterogeneous)" if settings.fleet else "")
    print(
        f"{len(requests)} requests, {shape}, {len(names)} policies in {elapsed:.1f} s",
        file=sys.stderr,
    )
    if args.json is not None:
        write_json(args.json, report_json(source, ideal, results, bounds))
    if args.plot is not None:
        plot(args.plot, records, results, ideal, f"{source} — {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
