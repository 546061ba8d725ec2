"""Sweep routing policies over workloads, loads and fleet sizes, judged against the bounds.

For every cell (workload family x load x workers) each policy is replayed in virtual time
(`kvgate.bench.simulate`, the EPP's own scheduler against simulated engines), and the cell's
bounds are computed (`kvgate.bench.bounds`: floor TTFT on an idle worker with an infinite cache,
hit rate of one LRU cache of the fleet's size, and the floor with that pooled cache's hits).
Families: ``synthetic`` (the Mooncake synthetic trace, at its own rate: load divides its
timestamps) and the generated ones of `kvgate.bench.workloads` (their rates are per worker, so
load 1 is the same pressure on any fleet).

Per cell and policy the report gives TTFT p50/p90/p99, hit rate, the floor's p90, the pooled
hit rate and the pooled floor's p90, and against ``dynamo`` (the reference cost function): the
TTFT p90 and p50 ratios, the hit-rate ratio and the share of dynamo's excess over the floor the
policy closes at p90, ``(dynamo p90 - policy p90) / (dynamo p90 - floor p90)`` (1 = at the
floor, 0 = no better than dynamo, < 0 = worse; left out where dynamo is within 1% of the floor).
Everything is seeded: the same command gives the same numbers, whatever ``--jobs``.

    python benchmarks/sweep_policies.py --quick                       # all cells, small workloads
    python benchmarks/sweep_policies.py --family rag --load 1 --workers 8 --policies kv,dynamo
    python benchmarks/sweep_policies.py --trace benchmarks/traces/mooncake_synthetic.jsonl

Writes ``OUT/sweep.json``, ``OUT/sweep.md`` and ``OUT/sweep.png`` (``--out``, default
``sweep-out``). ``--plugin TYPE=module:Class`` adds a plugin type for a ``config:FILE`` policy
that is not registered yet.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvgate.bench.bounds import fleet_bounds, infinite_hit_rate
from kvgate.bench.fleet import WorkerSpec
from kvgate.bench.report import summarize
from kvgate.bench.simulate import (
    MOONCAKE_WORKER_TOKENS,
    ExtraPlugins,
    SimSettings,
    replay_policy,
    resolve_policy,
)
from kvgate.bench.traces import TraceRequest, load_mooncake
from kvgate.bench.workloads import FAMILIES, generate

SYNTHETIC = "synthetic"
DEFAULT_TRACE = Path(__file__).parent / "traces" / "mooncake_synthetic.jsonl"
REFERENCE = "dynamo"
BLOCK_SIZE = 16

QUICK: dict[str, str] = {
    "agentic": "agentic:sessions_per_worker=2",
    "rag": "rag:requests_per_worker=50",
    "longdoc": "longdoc:bursts_per_worker=3",
    "hetero": "hetero:sessions_per_worker=10",
}
"""The smaller workloads of ``--quick``."""
QUICK_TRACE_STRIDE = 8
"""``--quick`` replays every 8th request of the synthetic trace, 8 times as fast: the same
arrival rate, the same kinds of prefix sharing, an eighth of the work. (Its first eighth would
not do: the trace's reuse builds up over its 17 minutes.) Hit rates are not the full trace's:
ideal 0.23 and pooled 0.21 on 8 workers, against 0.65 and 0.39."""


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    family: str
    load: float
    workers: int

    def label(self) -> str:
        return f"{self.family} load {self.load:g} x{self.workers}"


@dataclass(frozen=True, slots=True)
class Plan:
    trace: Path
    quick: bool
    seed: int
    plugins: ExtraPlugins


_CACHE: dict[Cell, tuple[list[TraceRequest], SimSettings]] = {}


def workload(cell: Cell, plan: Plan) -> tuple[list[TraceRequest], SimSettings]:
    """The cell's requests and fleet (cached per process: each policy of a cell reuses them)."""
    got = _CACHE.get(cell)
    if got is not None:
        return got
    fleet: tuple[WorkerSpec, ...] | None = None
    if cell.family == SYNTHETIC:
        stride = QUICK_TRACE_STRIDE if plan.quick else 1
        requests = load_mooncake(plan.trace, time_scale=1.0 / (cell.load * stride))[::stride]
    else:
        spec = QUICK[cell.family] if plan.quick else cell.family
        w = generate(
            spec,
            workers=cell.workers,
            load=cell.load,
            seed=plan.seed,
            default_blocks=MOONCAKE_WORKER_TOKENS // BLOCK_SIZE,
        )
        requests, fleet = w.requests, w.fleet
    settings = SimSettings(workers=cell.workers, block_size=BLOCK_SIZE, seed=plan.seed, fleet=fleet)
    _CACHE.clear()  # one cell at a time: workloads can be large
    _CACHE[cell] = (requests, settings)
    return requests, settings


def run_policy(cell: Cell, policy: str, plan: Plan) -> dict[str, Any]:
    requests, settings = workload(cell, plan)
    record = replay_policy(requests, resolve_policy(policy), settings, plugins=plan.plugins)
    return summarize(record).to_json()


def run_bounds(cell: Cell, plan: Plan) -> dict[str, Any]:
    requests, settings = workload(cell, plan)
    out = fleet_bounds(requests, settings.worker_models()).to_json()
    out["ideal_hit_rate"] = infinite_hit_rate(requests, BLOCK_SIZE)
    out["requests"] = len(requests)
    out["heterogeneous"] = settings.fleet is not None
    return out


_BLIND = frozenset({"round-robin", "random", "least-loaded"})


def _tasks(cells: list[Cell], policies: list[str]) -> list[tuple[Cell, str | None]]:
    """Bounds (None) and policies per cell; a cell's tasks stay together (the workload cache),
    the costliest cells and policies first, so that the processes finish together."""
    heavy = {SYNTHETIC: 3, "longdoc": 3, "agentic": 2}
    order = sorted(cells, key=lambda c: -c.workers * heavy.get(c.family, 1))
    ranked = sorted(policies, key=lambda name: name in _BLIND)
    return [(c, p) for c in order for p in [*ranked, None]]


def sweep(
    cells: list[Cell], policies: list[str], plan: Plan, jobs: int
) -> dict[Cell, dict[str, Any]]:
    tasks = _tasks(cells, policies)
    results: dict[Cell, dict[str, Any]] = {c: {"policies": {}} for c in cells}
    started = time.perf_counter()
    done = 0

    def store(cell: Cell, policy: str | None, value: dict[str, Any]) -> None:
        nonlocal done
        if policy is None:
            results[cell].update(value)
        else:
            results[cell]["policies"][policy] = value
        done += 1
        what = policy or "bounds"
        elapsed = time.perf_counter() - started
        print(f"[{done}/{len(tasks)} {elapsed:6.1f} s] {cell.label()}: {what}", file=sys.stderr)

    if jobs <= 1:
        for cell, policy in tasks:
            value = run_bounds(cell, plan) if policy is None else run_policy(cell, policy, plan)
            store(cell, policy, value)
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures: dict[Future[dict[str, Any]], tuple[Cell, str | None]] = {}
        for cell, policy in tasks:
            if policy is None:
                future = pool.submit(run_bounds, cell, plan)
            else:
                future = pool.submit(run_policy, cell, policy, plan)
            futures[future] = (cell, policy)
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                store(*futures[future], future.result())
    return results


def ratios(cell: dict[str, Any], policy: dict[str, Any]) -> dict[str, float | None]:
    """The policy against the reference in the same cell (None where undefined)."""
    ref = cell["policies"].get(REFERENCE)
    if ref is None:
        return {}
    floor = cell["floor_ttft_ms"]["p90"]

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    p90, ref_p90 = policy["ttft_ms"]["p90"], ref["ttft_ms"]["p90"]
    excess = None if ref_p90 is None or floor is None else ref_p90 - floor
    closed = None
    # Where the reference is already within 1% of the floor there is no gap to speak of (and
    # the share would divide by noise).
    if excess is not None and excess > 0.01 * ref_p90 and p90 is not None:
        closed = (ref_p90 - p90) / excess
    return {
        "ttft_p90_ratio": div(p90, ref_p90),
        "ttft_p50_ratio": div(policy["ttft_ms"]["p50"], ref["ttft_ms"]["p50"]),
        "ttft_mean_ratio": div(policy["ttft_ms"].get("mean"), ref["ttft_ms"].get("mean")),
        "hit_rate_ratio": div(policy["hit_rate"], ref["hit_rate"]),
        "p90_gap_closed": closed,
    }


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    head = (
        "| family | load | workers | policy | TTFT p50 | p90 | p99 | mean | hit | floor p90"
        " | pooled hit | pooled floor p90 | p90 / dyn | p50 / dyn | mean / dyn | hit / dyn"
        " | p90 gap closed |"
    )
    lines = [
        f"Policies against `{REFERENCE}`; times in ms; floor = idle worker with an infinite "
        "cache; pooled = one LRU cache of the fleet's size; pooled floor = idle worker with "
        "that pooled cache.",
        "",
        head,
        "|" + " --- |" * (head.count("|") - 1),
    ]
    for cell in report["cells"]:
        for name, m in cell["policies"].items():
            r = m.get("vs_reference", {})
            t = m["ttft_ms"]
            lines.append(
                f"| {cell['family']} | {cell['load']:g} | {cell['workers']}"
                f"{' (het)' if cell['heterogeneous'] else ''} | {name} | {_f(t['p50'])} "
                f"| {_f(t['p90'])} | {_f(t['p99'])} | {_f(t.get('mean'))} "
                f"| {_f(m['hit_rate'], 3)} "
                f"| {_f(cell['floor_ttft_ms']['p90'])} | {_f(cell['pooled_hit_rate'], 3)} "
                f"| {_f((cell.get('pooled_floor_ttft_ms') or {}).get('p90'))} "
                f"| {_f(r.get('ttft_p90_ratio'), 3)} | {_f(r.get('ttft_p50_ratio'), 3)} "
                f"| {_f(r.get('ttft_mean_ratio'), 3)} | {_f(r.get('hit_rate_ratio'), 3)} "
                f"| {_f(r.get('p90_gap_closed'), 3)} |"
            )
    summary = report.get("summary") or {}
    if summary:
        lines += [
            "",
            f"Across cells (geometric mean of ratios, mean of gap closed), against `{REFERENCE}`:",
            "",
            "| policy | p90 / dyn | p50 / dyn | mean / dyn | hit / dyn | p90 gap closed | cells |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in summary.items():
            lines.append(
                f"| {name} | {_f(s['ttft_p90_ratio'], 3)} | {_f(s['ttft_p50_ratio'], 3)} "
                f"| {_f(s['ttft_mean_ratio'], 3)} | {_f(s['hit_rate_ratio'], 3)} "
                f"| {_f(s['p90_gap_closed'], 3)} | {s['cells']} |"
            )
    return "\n".join(lines) + "\n"


def summarize_policies(cells: list[dict[str, Any]], policies: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in policies:
        rs = [c["policies"][name].get("vs_reference") or {} for c in cells]
        summary: dict[str, Any] = {"cells": len(rs)}
        for key in ("ttft_p90_ratio", "ttft_p50_ratio", "ttft_mean_ratio", "hit_rate_ratio"):
            xs = [r[key] for r in rs if r.get(key)]
            summary[key] = math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None
        closed = [r["p90_gap_closed"] for r in rs if r.get("p90_gap_closed") is not None]
        summary["p90_gap_closed"] = sum(closed) / len(closed) if closed else None
        out[name] = summary
    return out


def plot(path: Path, report: dict[str, Any], policies: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install matplotlib)", file=sys.stderr)
        return
    families = list(dict.fromkeys(c["family"] for c in report["cells"]))
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4.5), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        cells = [c for c in report["cells"] if c["family"] == family]
        labels = [f"{c['load']:g}×{c['workers']}" for c in cells]
        xs = range(len(cells))
        for name in policies:
            ax.plot(xs, [c["policies"][name]["ttft_ms"]["p90"] for c in cells], "o-", label=name)
        ax.plot(xs, [c["floor_ttft_ms"]["p90"] for c in cells], "k--", label="floor")
        pooled = [(c.get("pooled_floor_ttft_ms") or {}).get("p90") for c in cells]
        if all(v is not None for v in pooled):
            ax.plot(xs, pooled, "k:", label="pooled floor")
        ax.set_xticks(list(xs), labels, rotation=45, fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("load × workers")
        ax.set_ylabel("TTFT p90 (ms, log)")
        ax.set_title(family)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="kv,dynamo,round-robin")
    p.add_argument(
        "--family",
        default=",".join([SYNTHETIC, *FAMILIES]),
        help=f"comma-separated: {SYNTHETIC}, {', '.join(FAMILIES)}",
    )
    p.add_argument("--load", default="0.5,1,1.5", help="comma-separated arrival-rate multipliers")
    p.add_argument("--workers", default="4,8,16", help="comma-separated fleet sizes")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="the synthetic trace")
    p.add_argument("--quick", action="store_true", help="small workloads: minutes on 2 cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=Path("sweep-out"))
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="TYPE=module:Class",
        help="extra plugin type for config:FILE policies (repeatable)",
    )
    args = p.parse_args(argv)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    families = [x.strip() for x in args.family.split(",") if x.strip()]
    unknown = [f for f in families if f != SYNTHETIC and f not in FAMILIES]
    if unknown:
        p.error(f"unknown family {unknown[0]!r}")
    if SYNTHETIC in families and not args.trace.is_file():
        p.error(f"{args.trace} not found: pass --trace, or leave {SYNTHETIC} out of --family")
    plugins = []
    for item in args.plugin:
        type_name, eq, target = item.partition("=")
        if not eq or ":" not in target:
            p.error(f"--plugin {item!r} is not TYPE=module:Class")
        plugins.append((type_name, target))
    for name in policies:
        resolve_policy(name)
    cells = [
        Cell(f, load, w)
        for f in families
        for load in _floats(args.load)
        for w in _ints(args.workers)
    ]
    plan = Plan(args.trace, args.quick, args.seed, tuple(plugins))
    started = time.perf_counter()
    results = sweep(cells, policies, plan, args.jobs)
    wall = time.perf_counter() - started
    cell_reports = []
    for cell in cells:
        r = results[cell]
        for m in r["policies"].values():
            m["vs_reference"] = ratios(r, m)
        ordered = {name: r["policies"][name] for name in policies}
        where = {"family": cell.family, "load": cell.load, "workers": cell.workers}
        cell_reports.append({**where, **r, "policies": ordered})
    report = {
        "reference": REFERENCE,
        "quick": args.quick,
        "seed": args.seed,
        "trace": str(args.trace) if SYNTHETIC in families else None,
        "wall_s": round(wall, 1),
        "cells": cell_reports,
        "summary": summarize_policies(cell_reports, policies) if REFERENCE in policies else {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    (args.out / "sweep.md").write_text(table, encoding="utf-8")
    plot(args.out / "sweep.png", report, policies)
    print(table)
    shape = f"{len(cells)} cells x {len(policies)} policies"
    print(f"{shape} in {wall:.1f} s -> {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
