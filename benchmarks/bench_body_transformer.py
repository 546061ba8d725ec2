"""Latency the nvext rewrite adds to a request through Envoy, on this machine.

One Envoy (one worker thread) with three listeners in front of the same upstream (an echo server
in its own process): ``direct`` (no filter), ``ext_proc`` (the seed's processing mode: request
headers SEND, body BUFFERED; calling `kvgate body-transformer`, run as its own process) and
``lua`` (the Lua filter of ``deploy/lua-filter/``). Requests carry the routing headers, so every
body is rewritten. Each (listener, body size) runs at a fixed arrival rate, in several rounds that
alternate the listeners so that machine noise hits all of them alike; reported: p50/p99/mean
latency and what each filter adds over ``direct``. Bodies: a small chat request and one of ~2k
tokens (~10 KB).

    python benchmarks/bench_body_transformer.py [--rate 100] [--duration 20] [--rounds 4]
                                                [--json out.json]

Everything binds 127.0.0.1; every loop is bounded in count and time; the processes started are
stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.extproc.envoy_harness import (  # noqa: E402
    bootstrap,
    echo_upstream,
    envoy_running,
    ext_proc_filter,
    free_port,
    http_listener,
    static_cluster,
)

SEED_MODE = {
    "request_header_mode": "SEND",
    "request_body_mode": "BUFFERED",
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}
HEADERS = {
    "content-type": "application/json",
    "x-worker-instance-id": "1732649523291627853",
    "x-dynamo-routing-mode": "aggregated",
}
LISTENERS = ("direct", "ext_proc", "lua")
T = TypeVar("T")
WORDS = ["cache", "prefix", "block", "worker", "engine", "token", "latency", "gateway", "router"]


def make_body(rng: random.Random, words: int) -> bytes:
    text = " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))
    return json.dumps(
        {
            "model": "Qwen/Qwen3-0.6B",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 16,
            "nvext": {"ignore_eos": True},
        }
    ).encode()


@contextlib.asynccontextmanager
async def upstream_process() -> AsyncIterator[int]:
    """The echo upstream in a child process, so it does not share the client's event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-upstream",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        yield int(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the child exits when its stdin closes
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def serve_upstream() -> None:
    async with echo_upstream() as port:
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextlib.asynccontextmanager
async def body_transformer() -> AsyncIterator[int]:
    port, health_port, metrics_port = free_port(), free_port(), free_port()
    args = [
        *(sys.executable, "-m", "kvgate", "body-transformer", "--bind", "127.0.0.1"),
        *("--port", str(port), "--grpc-health-port", str(health_port)),
        *("--metrics-port", str(metrics_port), "--log-level", "warning"),
    ]
    proc = subprocess.Popen(args, start_new_session=True)
    try:
        await _wait_serving(health_port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _wait_serving(health_port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"body-transformer exited with {proc.returncode}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError("body-transformer did not start")


def lua_http_filter() -> dict[str, Any]:
    manifest = yaml.safe_load((REPO / "deploy/lua-filter/istio-envoyfilter.yaml").read_text())
    value: dict[str, Any] = manifest["spec"]["configPatches"][0]["patch"]["value"]
    return value


async def run_rate(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], rate: float, duration: float
) -> tuple[list[float], int]:
    """Open loop: request i starts at i/rate seconds whether or not earlier ones finished.
    Returns the latencies (seconds) of the successful requests and the error count."""
    count = max(1, int(rate * duration))
    latencies: list[float] = []
    errors = 0

    async def one(body: bytes) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=HEADERS) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    return
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
            return
        latencies.append(time.perf_counter() - started)

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(bodies[i % len(bodies)])))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 30)
    return latencies, errors


def summary(latencies: list[float], errors: int) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    return {
        "requests": len(latencies) + errors,
        "errors": errors,
        "p50_ms": ms[len(ms) // 2],
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "mean_ms": statistics.fmean(ms),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    sizes = {
        "small": [make_body(rng, 8) for _ in range(64)],
        "2k_tokens": [make_body(rng, 1000) for _ in range(64)],
    }
    results: dict[str, Any] = {
        "rate": args.rate,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "body_bytes": {k: len(v[0]) for k, v in sizes.items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-bt-") as tmp:
        async with upstream_process() as upstream_port, body_transformer() as bt_port:
            listeners = [
                http_listener("direct", "upstream"),
                http_listener("ext_proc", "upstream", [ext_proc_filter("bt", SEED_MODE)]),
                http_listener("lua", "upstream", [lua_http_filter()]),
            ]
            clusters = [
                static_cluster("upstream", upstream_port),
                static_cluster("bt", bt_port, http2=True),
            ]
            config = bootstrap(listeners, clusters)
            async with (
                envoy_running(config, workdir=Path(tmp)) as envoy,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            ):
                urls = {
                    name: f"http://127.0.0.1:{envoy.listener_port(name)}/v1/chat/completions"
                    for name in LISTENERS
                }
                for size, bodies in sizes.items():
                    for name in LISTENERS:  # warm-up: connections, Lua VM, gRPC channel
                        await run_rate(session, urls[name], bodies, args.rate, 1.0)
                    collected: dict[str, tuple[list[float], int]] = {n: ([], 0) for n in LISTENERS}
                    for _ in range(args.rounds):
                        for name in LISTENERS:
                            latencies, errors = await run_rate(
                                session, urls[name], bodies, args.rate, args.duration / args.rounds
                            )
                            previous = collected[name]
                            collected[name] = (previous[0] + latencies, previous[1] + errors)
                    for name in LISTENERS:
                        stats = summary(*collected[name])
                        results[f"{size}/{name}"] = stats
                        print(
                            f"{size:>9} {name:>8}: p50 {stats['p50_ms']:6.2f} ms  "
                            f"p99 {stats['p99_ms']:6.2f} ms  mean {stats['mean_ms']:6.2f} ms  "
                            f"errors {stats['errors']:.0f}",
                            flush=True,
                        )
    for size in sizes:
        direct = results[f"{size}/direct"]
        for name in ("ext_proc", "lua"):
            r = results[f"{size}/{name}"]
            print(
                f"{size:>9} {name:>8} adds: p50 {r['p50_ms'] - direct['p50_ms']:+6.2f} ms  "
                f"p99 {r['p99_ms'] - direct['p99_ms']:+6.2f} ms"
            )
    return results


def run(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop when installed (as the kvgate commands use): the client's own overhead is part of
    every measured latency, so keep it small."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    p.add_argument(
        "--duration", type=float, default=20.0, help="seconds per listener and size (default 20)"
    )
    p.add_argument("--rounds", type=int, default=4, help="alternations of the listeners")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_upstream:
        run(serve_upstream())
        return 0
    if not (0 < args.rate <= 2000 and 0 < args.duration <= 300 and 1 <= args.rounds <= 50):
        p.error("--rate must be in (0, 2000], --duration in (0, 300], --rounds in [1, 50]")
    results = run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
