"""`kvgate bench`: replay a trace against any OpenAI-compatible endpoint, measured at the client.

Requests go out at the trace's timestamps (scaled by ``--time-scale``), at most
``--max-concurrency`` at once (later arrivals wait for a slot, and their wait counts in their
latency, as a user's would). Each is a streamed ``POST /v1/completions`` whose prompt is the
request's token ids (`TokenSynth`, so identical hash ids are identical tokens on the wire) with
``max_tokens`` = the trace's output length, ``ignore_eos`` and usage in the stream. The client
records the time to the first content chunk, the gaps between chunks (ITL), the latency, the
serving worker (``x-kvgate-worker`` header, when the endpoint names one) and ``usage`` (prompt,
completion and ``prompt_tokens_details.cached_tokens`` for the hit rate).

Bounds: ``--limit`` requests at most; ``--duration`` seconds at most, after which no request is
started and those in flight are cancelled; each request times out after ``--request-timeout``.
Failures (HTTP errors, timeouts, cancellations, broken streams) are counted by kind in the
report, never dropped. Output: the same table and JSON schema as `kvgate simulate`, with one
policy entry named ``--label``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.bench.report import Progress, RunRecord, plot, report_json, summarize, table, write_json
from kvgate.bench.traces import TokenSynth, TraceRequest, ideal_hit_rate, load_mooncake

WORKER_HEADER = "x-kvgate-worker"


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it; ``error`` names the failure kind, if any."""

    error: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    worker: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    timeout_s: float,
) -> Outcome:
    """POST a streamed completion; never raises for HTTP or stream problems (they become the
    outcome's ``error``)."""
    started = time.perf_counter()
    out = Outcome()
    last: float | None = None
    try:
        async with session.post(
            f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            out.worker = resp.headers.get(WORKER_HEADER)
            if resp.status != 200:
                await resp.read()
                out.error = f"http {resp.status}"
                return out
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                now = time.perf_counter()
                if any(c.get("text") for c in event.get("choices") or ()):
                    if last is None:
                        out.ttft_s = now - started
                    else:
                        out.gaps_s.append(now - last)
                    last = now
                _read_usage(out, event)
            if not done:
                out.error = "stream ended early"
    except TimeoutError:
        out.error = "timeout"
    except aiohttp.ClientError as err:
        out.error = f"connection: {type(err).__name__}"
    except ValueError:
        out.error = "bad stream data"
    out.latency_s = time.perf_counter() - started
    return out


def _read_usage(out: Outcome, event: dict[str, Any]) -> None:
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return
    out.prompt_tokens = usage.get("prompt_tokens")
    out.completion_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        out.cached_tokens = details.get("cached_tokens")


@dataclass(frozen=True, slots=True)
class BenchSettings:
    url: str
    model: str
    max_concurrency: int = 64
    duration_s: float = 600.0
    request_timeout_s: float = 120.0
    seed: int = 0


def _record(record: RunRecord, out: Outcome, queued_s: float, arrival: float) -> None:
    if out.error is not None:
        record.error(out.error)
        return
    if out.ttft_s is None:
        record.error("no tokens")
        return
    record.ttft_s.append(queued_s + out.ttft_s)
    record.e2e_s.append(queued_s + out.latency_s)
    record.itl_s.extend(out.gaps_s)
    record.first_arrival_s = min(record.first_arrival_s, arrival)
    record.last_finish_s = max(record.last_finish_s, arrival + queued_s + out.latency_s)
    record.output_tokens += out.completion_tokens or len(out.gaps_s) + 1
    if out.prompt_tokens is not None:
        record.prompt_tokens += out.prompt_tokens
        record.cached_tokens += out.cached_tokens or 0
    else:
        record.error("no usage")
    if out.worker is not None:
        record.per_worker[out.worker] = record.per_worker.get(out.worker, 0) + 1


async def run_bench(
    requests: Sequence[TraceRequest],
    settings: BenchSettings,
    *,
    session: aiohttp.ClientSession | None = None,
    progress: Progress | None = None,
) -> RunRecord:
    """Replay ``requests`` open-loop; returns what the client measured."""
    if settings.max_concurrency < 1 or not settings.duration_s > 0:
        raise ValueError("max_concurrency must be >= 1 and duration > 0")
    record = RunRecord()
    synth = TokenSynth(settings.seed)
    slots = asyncio.Semaphore(settings.max_concurrency)
    start = time.perf_counter()
    done = 0

    async def one(r: TraceRequest, http: aiohttp.ClientSession) -> None:
        nonlocal done
        await asyncio.sleep(max(0.0, start + r.timestamp_ms / 1000.0 - time.perf_counter()))
        arrival = time.perf_counter() - start
        body = {
            "model": settings.model,
            "prompt": synth.tokens(r),
            "max_tokens": r.output_length,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with slots:
            queued = time.perf_counter() - start - arrival
            out = await stream_completion(http, settings.url, body, settings.request_timeout_s)
        _record(record, out, queued, arrival)
        done += 1
        if progress is not None:
            progress.update(done)

    async def all_requests(http: aiohttp.ClientSession) -> None:
        tasks = [asyncio.create_task(one(r, http)) for r in requests]
        finished, unfinished = await asyncio.wait(tasks, timeout=settings.duration_s)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        for task in finished:
            task.result()  # a bug in this module must not pass silently
        for _ in unfinished:
            record.error("cut at --duration")

    started = time.perf_counter()
    if session is None:
        connector = aiohttp.TCPConnector(limit=settings.max_concurrency)
        async with aiohttp.ClientSession(connector=connector) as own:
            await all_requests(own)
    else:
        await all_requests(session)
    record.wall_s = time.perf_counter() - started
    return record


async def _first_model(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{url}/v1/models") as resp,
    ):
        resp.raise_for_status()
        payload = await resp.json()
    models = payload.get("data") or []
    if not models:
        raise ValueError(f"{url}/v1/models lists no model: pass --model")
    return str(models[0]["id"])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvgate bench",
        description="Replay a Mooncake trace against an OpenAI-compatible endpoint and measure "
        "TTFT, ITL, latency and prefix hit rate at the client.",
    )
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", required=True, help="Mooncake JSONL trace")
    p.add_argument("--model", default=None, help="model name (default: the first /v1/models)")
    p.add_argument("--label", default="bench", help="name of the run in the table and JSON")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply trace timestamps")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests")
    p.add_argument("--max-input-length", type=int, default=None, help="cut longer prompts")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0, help="token content of the hash ids")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    url = args.url.rstrip("/")
    try:
        requests = load_mooncake(
            args.trace,
            time_scale=args.time_scale,
            max_input_length=args.max_input_length,
            limit=args.limit,
        )
        model = args.model or asyncio.run(_first_model(url))
        settings = BenchSettings(
            url=url,
            model=model,
            max_concurrency=args.max_concurrency,
            duration_s=args.duration,
            request_timeout_s=args.request_timeout,
            seed=args.seed,
        )
        progress = None if args.quiet else Progress(args.label, len(requests), sys.stderr)
        record = asyncio.run(run_bench(requests, settings, progress=progress))
    except (OSError, ValueError, aiohttp.ClientError) as err:
        print(f"kvgate bench: {err}", file=sys.stderr)
        return 2
    ideal = ideal_hit_rate(requests)
    results = {args.label: summarize(record)}
    print(table(results, ideal))
    if record.errors:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(record.error_kinds.items()))
        print(f"{record.errors} errors ({kinds})", file=sys.stderr)
    if args.json is not None:
        write_json(args.json, report_json(str(args.trace), ideal, results))
    if args.plot is not None:
        plot(args.plot, {args.label: record}, results, ideal, f"{args.trace} — {url}")
    return 0
