"""`kvgate bench`: replay a Mooncake trace against an OpenAI-compatible endpoint (live load).

The client is `kvgate.bench.live`; this module reads the options, runs it and prints the same
table and JSON as `kvgate simulate`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp

from kvgate.bench.live import PATHS, BenchSettings, first_model, run_bench
from kvgate.bench.report import Progress, plot, report_json, summarize, table, write_json
from kvgate.bench.traces import ideal_hit_rate, load_mooncake


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
    p.add_argument(
        "--api",
        choices=list(PATHS),
        default="chat",
        help="chat: one user message per request (default); completions: a prompt",
    )
    p.add_argument(
        "--prompt-format",
        choices=["text", "tokens"],
        default="text",
        help="text: each hash id as a fixed ~512-token paragraph (default); tokens: token ids "
        "(completions only; most routers cannot read them)",
    )
    p.add_argument(
        "--messages",
        choices=["one", "per-block"],
        default="one",
        help="chat: the prompt as one user message (default), or one message per 512-token "
        "hash id, as a multi-turn client sends its history",
    )
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply trace timestamps")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests")
    p.add_argument("--max-input-length", type=int, default=None, help="cut longer prompts")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0, help="content of the hash ids")
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
        model = args.model or asyncio.run(first_model(url))
        settings = BenchSettings(
            url=url,
            model=model,
            max_concurrency=args.max_concurrency,
            duration_s=args.duration,
            request_timeout_s=args.request_timeout,
            seed=args.seed,
            api=args.api,
            prompt_format=args.prompt_format,
            messages=args.messages,
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


if __name__ == "__main__":
    sys.exit(main())
