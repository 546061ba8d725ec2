"""`kvgate demo`: the whole gateway on this machine, one real request, a short shared-prefix load,
per-worker results — with KV-aware routing, then with the standard round-robin EPP for contrast.

The load is G groups of requests that share a long system prompt (think: G applications, each with
its own prompt), arriving interleaved. A KV-aware picker keeps each group on the worker that cached
its prompt; round-robin spreads every group over every worker and recomputes the prompt each time.
Everything is bounded: a fixed number of requests, each with a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from collections import Counter
from dataclasses import dataclass

import aiohttp

from kvgate.gateway.client import ChatResult, chat
from kvgate.gateway.local import DEFAULT_MODEL, LocalGateway, LocalGatewayConfig, Mode
from kvgate.gateway.supervisor import StartupError

_WORDS = [
    "gateway", "cache", "prefix", "block", "worker", "engine", "token", "latency", "router",
    "envoy", "kernel", "batch", "schedule", "memory", "prompt", "answer", "system", "policy",
]  # fmt: skip


def system_prompt(group: int, words: int) -> str:
    rng = random.Random(group)
    body = " ".join(f"{rng.choice(_WORDS)}{rng.randrange(1000)}" for _ in range(words))
    return f"You are assistant number {group}. Follow these notes: {body}"


def workload(groups: int, per_group: int, prompt_words: int) -> list[dict[str, object]]:
    """Every group's requests, in a seeded shuffled order (the same order for every mode)."""
    prompts = [system_prompt(g, prompt_words) for g in range(groups)]
    bodies: list[dict[str, object]] = []
    for i in range(per_group):
        for g in range(groups):
            bodies.append(
                {
                    "model": DEFAULT_MODEL,
                    "messages": [
                        {"role": "system", "content": prompts[g]},
                        {"role": "user", "content": f"Question {i} for group {g}: summarise."},
                    ],
                    "max_tokens": 16,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
    random.Random(7).shuffle(bodies)
    return bodies


@dataclass
class LoadReport:
    mode: str
    results: list[ChatResult]

    def ok(self) -> list[ChatResult]:
        return [r for r in self.results if r.status == 200 and r.error is None]

    def hit_rate(self) -> float:
        ok = self.ok()
        prompt = sum(r.prompt_tokens or 0 for r in ok)
        return sum(r.cached_tokens or 0 for r in ok) / prompt if prompt else 0.0

    def ttft_ms(self, q: float) -> float:
        values = sorted(r.ttft_s for r in self.ok() if r.ttft_s is not None)
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else 0.0


async def run_load(url: str, bodies: list[dict[str, object]], concurrency: int) -> list[ChatResult]:
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(body: dict[str, object]) -> ChatResult:
            async with semaphore:
                try:
                    return await chat(session, url, body)
                except (aiohttp.ClientError, TimeoutError) as err:
                    return ChatResult(0, None, None, 0.0, "", error=repr(err))

        return list(await asyncio.gather(*(one(b) for b in bodies)))


async def first_request(url: str) -> ChatResult:
    async with aiohttp.ClientSession() as session:
        body = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Hello through Envoy! What routes me?"}],
            "max_tokens": 12,
        }
        return await chat(session, url, body)


def print_report(report: LoadReport, workers: list[str]) -> None:
    ok = report.ok()
    errors = len(report.results) - len(ok)
    print(f"\n[{report.mode}] {len(ok)} requests ok, {errors} errors; prefix hit rate "
          f"{report.hit_rate():.0%}; TTFT p50 {report.ttft_ms(0.5):.0f} ms, "
          f"p90 {report.ttft_ms(0.9):.0f} ms")  # fmt: skip
    if not any(r.worker for r in ok):
        return  # the backend does not name the serving worker (Dynamo: see its counters)
    print(f"  {'worker':<22}{'requests':>9}{'cached/prompt':>16}{'TTFT p50':>11}")
    per_worker = Counter(r.worker for r in ok)
    for worker in workers:
        mine = [r for r in ok if r.worker == worker]
        prompt = sum(r.prompt_tokens or 0 for r in mine)
        cached = sum(r.cached_tokens or 0 for r in mine)
        ttfts = [r.ttft_s for r in mine if r.ttft_s is not None]
        p50 = f"{statistics.median(ttfts) * 1e3:.0f} ms" if ttfts else "-"
        share = f"{cached}/{prompt}" if prompt else "-"
        print(f"  {worker:<22}{per_worker.get(worker, 0):>9}{share:>16}{p50:>11}")
    for r in report.results:
        if r.error:
            print(f"  error: {r.status} {r.error[:200]}")
            break


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvgate demo", description=__doc__.split("\n\n")[0])
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
    args = parser.parse_args(argv)
    if not (1 <= args.workers <= 64 and 1 <= args.groups * args.per_group <= 2000):
        parser.error("workers must be in 1..64 and groups × per-group in 1..2000")
    try:
        kv = run_mode("kv", args)
        if args.no_compare:
            return 0 if kv.ok() else 1
        standard = run_mode("standard", args)
    except StartupError as err:
        print(f"kvgate demo: {err}", file=sys.stderr)
        return 1
    print(f"\nKV-aware vs round-robin: prefix hit rate {kv.hit_rate():.0%} vs "
          f"{standard.hit_rate():.0%}; TTFT p50 {kv.ttft_ms(0.5):.0f} vs "
          f"{standard.ttft_ms(0.5):.0f} ms, p90 {kv.ttft_ms(0.9):.0f} vs "
          f"{standard.ttft_ms(0.9):.0f} ms")  # fmt: skip
    return 0 if kv.ok() and standard.ok() else 1
