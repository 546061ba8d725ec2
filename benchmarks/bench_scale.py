"""One picker at fleet scale: 256 workers × 30k cached blocks each, in one process.

1. **Fill**: every worker's cache arrives as BlockStored events (64 blocks of 16 tokens each,
   chained by parent hash, token hashing included), exactly what the KV-event subscriber applies;
   workers come in pairs holding the same prefixes, so the 7.7 M (block, worker) entries name
   3.8 M distinct blocks. Reported: entries, resident memory (RSS) added, bytes per entry, and
   the ingest rate of the fill (per CPU-second: the machine may be shared).
2. **Steady state**: one loop, as in the EPP, routes 2k-token requests at a fixed rate (hashing,
   prefix match over the whole index, cost over all 256 workers, pick, book and free) while it
   applies a stream of KV events in between — each worker storing 64 new blocks and evicting its
   64 oldest, so the index stays the same size. Reported: blocks ingested per second alongside
   the routing, and the decision time: its CPU time (p50/p99), and the wall time, by itself and
   as a request sees it (including the event batch it waited behind), which on a shared machine
   also holds the moments another process had the core.

    python benchmarks/bench_scale.py [--workers 256] [--blocks 30000] [--rate 500]
        [--seconds 5] [--json out.json]
    PYTHONPATH=OTHER/src python benchmarks/bench_scale.py ...   # another kvgate version

Pure computation in one process; nothing is bound, every loop is bounded.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from kvgate.events.types import BlockRemoved, BlockStored, EngineHash
from kvgate.index import prefix_index
from kvgate.index.prefix_index import PrefixIndex
from kvgate.scheduling.kv_router import Candidate, KvRouter, RoutingRequest
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.tokens.hashing import NATIVE_HASHING, sequence_hashes_of

BLOCK = 16
PER_EVENT = 64
POOL = 512
# Each worker's first events are the hot prefixes requests reuse: never evicted (an engine's LRU
# keeps them too), so the steady-state requests keep matching.
PINNED_EVENTS = 2
VOCAB = 151_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Fleet:
    """Per worker: the chain of events it stored (the first engine id of each, oldest first:
    ids are consecutive within an event, so the benchmark's own bookkeeping stays small)."""

    def __init__(self, workers: int, seed: int) -> None:
        rng = random.Random(seed)
        self.pool = [[rng.randrange(VOCAB) for _ in range(PER_EVENT * BLOCK)] for _ in range(POOL)]
        self.names = [f"10.1.{w // 250}.{w % 250}:8000" for w in range(workers)]
        self.held: list[deque[int]] = [deque() for _ in range(workers)]
        self.last: list[EngineHash | None] = [None] * workers
        self.step = [0] * workers
        self._next_id = 1

    def tokens(self, worker: int, step: int) -> list[int]:
        # Both workers of a pair see the same token stream, so they cache the same prefixes.
        pair = worker // 2
        return self.pool[(pair * 7919 + step) % POOL]

    def stored(self, worker: int) -> BlockStored:
        step = self.step[worker]
        ids = [EngineHash(self._next_id + i) for i in range(PER_EVENT)]
        self._next_id += PER_EVENT
        event = BlockStored(ids, self.last[worker], self.tokens(worker, step), BLOCK)
        self.last[worker] = ids[-1]
        self.step[worker] = step + 1
        if step >= PINNED_EVENTS:
            self.held[worker].append(ids[0])
        return event

    def evicted(self, worker: int) -> BlockRemoved:
        first = self.held[worker].popleft()
        return BlockRemoved([EngineHash(first + i) for i in range(PER_EVENT)])

    def prompt(self, pair: int, blocks: int) -> list[int]:
        """The first ``blocks`` blocks a pair of workers stored: a request they both cache."""
        tokens: list[int] = []
        step = 0
        while len(tokens) < blocks * BLOCK:
            tokens += self.tokens(2 * pair, step)
            step += 1
        return tokens[: blocks * BLOCK]


def fill(index: PrefixIndex, fleet: Fleet, blocks: int) -> float:
    """Every worker stores ``blocks`` blocks, round-robin one event at a time; returns blocks/s."""
    events = blocks // PER_EVENT
    workers = len(fleet.names)
    started = time.process_time()
    for _ in range(events):
        for w in range(workers):
            index.apply_event(fleet.names[w], fleet.stored(w))
    return events * PER_EVENT * workers / (time.process_time() - started)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def steady(
    router: KvRouter, index: PrefixIndex, fleet: Fleet, rate: float, seconds: float
) -> dict[str, Any]:
    """Route at ``rate`` req/s for ``seconds``; apply KV events whenever no decision is due."""
    workers = len(fleet.names)
    candidates = [Candidate(name, 1_000_000) for name in fleet.names]
    prompts = [
        fleet.prompt(pair, PINNED_EVENTS * PER_EVENT) for pair in range(min(64, workers // 2))
    ]
    interval = 1.0 / rate
    decided: list[float] = []
    decided_cpu: list[float] = []
    seen: list[float] = []
    stored_blocks = 0
    booked: deque[str] = deque()
    matched = 0
    clock = time.perf_counter
    cpu_clock = time.thread_time
    cpu_start = cpu_clock()
    start = clock()
    due = start
    worker = 0
    n = 0
    while True:
        now = clock()
        if now - start >= seconds:
            break
        if now >= due:
            t0 = clock()
            c0 = cpu_clock()
            tokens = prompts[n % len(prompts)]
            request = RoutingRequest(f"r{n}", len(tokens), sequence_hashes_of(tokens, BLOCK))
            selection = router.route(request, candidates, now)
            booked.append(request.request_id)
            if len(booked) > 64:  # requests complete: in-flight load stays bounded
                router.free(booked.popleft())
            t1 = clock()
            decided_cpu.append(cpu_clock() - c0)
            matched += selection.overlap_blocks > 0
            decided.append(t1 - t0)
            seen.append(t1 - due)
            n += 1
            due += interval
            continue
        index.apply_event(fleet.names[worker], fleet.stored(worker))
        index.apply_event(fleet.names[worker], fleet.evicted(worker))
        stored_blocks += PER_EVENT
        worker = (worker + 1) % workers
    elapsed = clock() - start
    cpu = cpu_clock() - cpu_start
    ingest_cpu = cpu - sum(decided_cpu)
    return {
        "cpu_share": round(cpu / elapsed, 3),
        # What one whole core ingests in the time the routing leaves it.
        "ingested_blocks_per_ingest_cpu_s": round(2 * stored_blocks / ingest_cpu),
        "routing_cpu_share": round(sum(decided_cpu) / elapsed, 3),
        "requests": n,
        "routed_per_s": round(n / elapsed, 1),
        "matched_fraction": round(matched / max(n, 1), 3),
        "stored_blocks_per_s": round(stored_blocks / elapsed),
        "ingested_blocks_per_s": round(2 * stored_blocks / elapsed),
        "decision_p50_ms": round(pct(decided, 0.5) * 1e3, 3),
        "decision_p99_ms": round(pct(decided, 0.99) * 1e3, 3),
        # CPU time: what the decision costs, without the time the shared machine took the core
        "decision_cpu_p50_ms": round(pct(decided_cpu, 0.5) * 1e3, 3),
        "decision_cpu_p99_ms": round(pct(decided_cpu, 0.99) * 1e3, 3),
        "seen_p50_ms": round(pct(seen, 0.5) * 1e3, 3),
        "seen_p99_ms": round(pct(seen, 0.99) * 1e3, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=30_000, help="cached blocks per worker")
    parser.add_argument("--rate", type=float, default=500.0, help="routed requests/s")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (2 <= args.workers <= 1024 and PER_EVENT <= args.blocks <= 200_000):
        parser.error("workers must be in [2, 1024] and blocks in [64, 200000]")
    if not (0 < args.rate <= 5000 and 0 < args.seconds <= 60):
        parser.error("rate must be in (0, 5000] and seconds in (0, 60]")
    fleet = Fleet(args.workers, args.seed)
    gc.collect()
    gc.set_threshold(50_000, 20, 20)  # as `kvgate epp` runs
    before = rss_bytes()
    router = KvRouter(KvRouterConfig(block_size=BLOCK), seed=args.seed)
    index = router.index
    assert isinstance(index, PrefixIndex)
    index.max_entries = max(index.max_entries, 2 * args.workers * args.blocks)
    fill_rate = fill(index, fleet, args.blocks)
    gc.collect()
    gc.freeze()  # as `kvgate epp` does with what it loaded at start-up
    grown = rss_bytes() - before
    entries = index.entries
    results: dict[str, Any] = {
        "workers": args.workers,
        "blocks_per_worker": args.blocks,
        "entries": entries,
        "distinct_blocks": index.num_blocks,
        "rss_added_mb": round(grown / 2**20, 1),
        "rss_total_mb": round(rss_bytes() / 2**20, 1),
        "bytes_per_entry": round(grown / entries, 1),
        "fill_blocks_per_s": round(fill_rate),
        "native_hashing": NATIVE_HASHING,
        # (absent before the compact map existed: lets this script measure older versions too)
        "native_block_map": getattr(prefix_index, "NATIVE_BLOCK_MAP", False),
    }
    print(
        f"fill      {entries:,} entries ({index.num_blocks:,} distinct blocks) on "
        f"{args.workers} workers: {fill_rate:,.0f} blocks per CPU-second"
    )
    print(
        f"memory    RSS +{grown / 2**20:,.0f} MiB (total {rss_bytes() / 2**20:,.0f} MiB): "
        f"{grown / entries:.1f} bytes per entry"
    )
    results["steady"] = s = steady(router, index, fleet, args.rate, args.seconds)
    print(
        f"steady    {s['routed_per_s']:.0f} routed/s ({100 * s['matched_fraction']:.0f}% "
        f"matched) while ingesting {s['ingested_blocks_per_s']:,} blocks/s "
        f"({s['stored_blocks_per_s']:,} stored + as many evicted)"
    )
    print(
        f"          this process had {100 * s['cpu_share']:.0f}% of a core (the machine is "
        f"shared); routing took {100 * s['routing_cpu_share']:.0f}% of a core, ingest "
        f"{s['ingested_blocks_per_ingest_cpu_s']:,} blocks per CPU-second of its own"
    )
    print(
        f"decision  CPU p50 {s['decision_cpu_p50_ms']:.3f} ms  "
        f"p99 {s['decision_cpu_p99_ms']:.3f} ms; wall p50 {s['decision_p50_ms']:.3f} ms  "
        f"p99 {s['decision_p99_ms']:.3f} ms; "
        f"as a request sees it (waiting behind events) p50 {s['seen_p50_ms']:.3f} ms  "
        f"p99 {s['seen_p99_ms']:.3f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
