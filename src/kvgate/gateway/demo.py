"""What `kvgate demo` sends and how it reports: G groups of requests that share a long system
prompt (think: G applications, each with its own prompt), arriving interleaved. A KV-aware picker
keeps each group on the worker that cached its prompt; round-robin spreads every group over every
worker and recomputes the prompt each time. Everything is bounded: a fixed number of requests, each
with a timeout."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections import Counter
from dataclasses import dataclass

import aiohttp

from kvgate.gateway.client import ChatResult, chat
from kvgate.gateway.local import DEFAULT_MODEL

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
