"""Cold tokenization of a 2k-token chat: its cost against raw `tokenizers`, and what it does to
the event loop.

1. **Against raw tokenizers**: `ModelTokenizer.tokenize_for_routing` (chat template, split at added
   tokens, segment-cache bookkeeping; cache off, so every prompt is cold) against
   `tokenizers.Tokenizer.encode` of the same rendered text, alternating, several rounds: the ratio
   of the two.
2. **The loop**: the kv-aware-scorer's prepare (as the EPP calls it) for cold prompts, a few at a
   time, while a ticker on the same loop wakes every millisecond: how late the ticker ran (the
   longest the loop was blocked), against the time one prompt takes to tokenize.

    python benchmarks/bench_tokenize.py [--prompts 60] [--rounds 5] [--json out.json]

Runs in one process (``--one-core``: pinned to one core, which the loop and the tokenizer thread
then share: the loop waits for the CPU, not for the GIL); nothing is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_epp import default_tokenizer, make_bodies

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.plugins.kv_aware_scorer import KvAwareScorer
from kvgate.scheduling.request import LLMRequest
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.tokens import ModelTokenizer, TokenizerConfig


def against_raw(
    tokenizer: ModelTokenizer, bodies: list[dict[str, Any]], rounds: int
) -> dict[str, Any]:
    raw = tokenizer._tokenizer  # the Rust tokenizer itself: the reference
    texts = [tokenizer.render_chat(body) for body in bodies]
    ratios, ours_ms, raw_ms = [], [], []
    for _ in range(rounds):
        started = time.process_time()
        for body in bodies:
            tokenizer.tokenize_for_routing(body, "chat")
        ours = time.process_time() - started
        started = time.process_time()
        for text in texts:
            raw.encode(text, add_special_tokens=False)
        theirs = time.process_time() - started
        ratios.append(ours / theirs)
        ours_ms.append(1e3 * ours / len(bodies))
        raw_ms.append(1e3 * theirs / len(bodies))
    tokens = len(raw.encode(texts[0], add_special_tokens=False).ids)
    # The part the EPP's loop runs for a cold prompt (render, split, cache lookup).
    plans = []
    for body in bodies:
        started = time.process_time()
        tokenizer.plan_for_routing(body, "chat")
        plans.append(time.process_time() - started)
    plan_ms = 1e3 * statistics.median(plans)
    print(
        f"cold {tokens}-token chat: kvgate {statistics.median(ours_ms):.2f} ms, raw tokenizers "
        f"{statistics.median(raw_ms):.2f} ms of CPU; ratio median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {rounds} rounds); the loop's part "
        f"(render, split, cache lookup) {plan_ms:.3f} ms"
    )
    return {
        "prompt_tokens": tokens,
        "kvgate_ms": round(statistics.median(ours_ms), 3),
        "raw_ms": round(statistics.median(raw_ms), 3),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "plan_on_loop_ms": round(plan_ms, 3),
    }


async def loop_lag(tokenizer: ModelTokenizer, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    scorer = KvAwareScorer("kv", KvRouterConfig(block_size=16), tokenizer)
    worker = [Endpoint("10.0.0.1:8000")]
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + 0.001
            await asyncio.sleep(0.001)
            lags.append(loop.time() - due)

    async def route(i: int, body: dict[str, Any]) -> float:
        request = LLMRequest(f"r{i}", "m", "chat", body, {})
        started = time.perf_counter()
        await scorer.prepare(request, worker)
        return time.perf_counter() - started

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0.05)
        loop_cpu = time.thread_time()
        all_cpu = time.process_time()
        took: list[float] = []
        for start in range(0, len(bodies), 4):  # four cold prompts in flight at a time
            batch = bodies[start : start + 4]
            took += await asyncio.gather(*(route(start + i, b) for i, b in enumerate(batch)))
        loop_cpu = time.thread_time() - loop_cpu
        thread_cpu = time.process_time() - all_cpu - loop_cpu
    finally:
        stop.set()
        await tick
        scorer.close()
    lags.sort()
    worst = lags[-1] * 1e3
    p99 = lags[int(0.99 * (len(lags) - 1))] * 1e3
    one = statistics.median(took) * 1e3
    on_loop = 1e3 * loop_cpu / len(bodies)
    off_loop = 1e3 * thread_cpu / len(bodies)
    print(
        f"cold prompts through the kv-aware-scorer (4 at a time): CPU per prompt on the loop "
        f"{on_loop:.2f} ms (with a 1 ms ticker's own), in the tokenizer thread {off_loop:.2f} ms; "
        f"ticker late by p99 {p99:.2f} ms, worst {worst:.2f} ms (on a busy machine this is mostly "
        f"waiting for a CPU); prepare takes {one:.2f} ms (median)"
    )
    return {
        "loop_cpu_ms_per_prompt": round(on_loop, 3),
        "thread_cpu_ms_per_prompt": round(off_loop, 3),
        "lag_p99_ms": round(p99, 3),
        "lag_max_ms": round(worst, 3),
        "prepare_ms": round(one, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument(
        "--one-core", action="store_true",
        help="pin to one core (the loop then shares it with the tokenizer thread)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (1 <= args.prompts <= 1000 and 1 <= args.rounds <= 20):
        parser.error("prompts must be in [1, 1000] and rounds in [1, 20]")
    if args.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    source = args.tokenizer or default_tokenizer()
    bodies = [json.loads(b) for b in make_bodies("cold", args.prompts, seed=11)]
    cold = ModelTokenizer.load(source, config=TokenizerConfig(cache_max_bytes=0))
    results = {"against_raw": against_raw(cold, bodies, args.rounds)}
    fresh = [json.loads(b) for b in make_bodies("cold", args.prompts, seed=12)]
    results["loop"] = asyncio.run(loop_lag(ModelTokenizer.load(source), fresh))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
