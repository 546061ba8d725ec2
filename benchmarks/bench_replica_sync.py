"""What replica sync costs: decision latency with and without it, and sync messages per request.

Starts `kvgate sim` (4 engines), a local nats-server and two `kvgate epp` replicas (the seed's
config), then plays Envoy's part of ext_proc for whole requests, alternating between the replicas
at a fixed arrival rate: request headers + a chat body (shared system prompt, new question), the
picker's answer (timed: the decision latency as Envoy sees it), then response headers and a final
response body, so that every request is booked, marked prefilled and freed. Runs alternate
sync-off and sync-on rounds on the same engines, so both see the same machine noise.

    python benchmarks/bench_replica_sync.py [--rate 100] [--duration 8] [--rounds 2] [--json f]

Everything binds 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from bench_epp import (
    REPO,
    default_tokenizer,
    free_port,
    make_bodies,
    paced,
    pct,
    route,
    wait_ready,
)
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from kvgate.sync.nats_server import nats_server_argv

MODEL = "Qwen/Qwen3-0.6B"
WORKERS = 4
USAGE = json.dumps({"usage": {"prompt_tokens": 700, "completion_tokens": 8}}).encode()


async def lifecycle(stub: pb_grpc.ExternalProcessorStub, body: bytes) -> float:
    """One whole request through the picker; returns the routing decision's round trip."""
    call = stub.Process()
    decided = await route(call, body)
    status = base_pb2.HeaderValue(key=":status", raw_value=b"200")
    await call.write(
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[status]))
        )
    )
    await call.write(
        pb.ProcessingRequest(response_body=pb.HttpBody(body=USAGE, end_of_stream=True))
    )
    await call.done_writing()
    async with asyncio.timeout(10):
        while await call.read() is not grpc.aio.EOF:
            pass
    return decided


async def drive(ports: list[int], bodies: list[bytes], rate: float) -> list[float]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    stubs = [pb_grpc.ExternalProcessorStub(c) for c in channels]
    try:
        for stub in stubs:  # the system prompt's segments are cached in both
            await lifecycle(stub, bodies[0])
        return await paced(lambda i, body: lifecycle(stubs[i % len(stubs)], body), bodies, rate)
    finally:
        for channel in channels:
            await channel.close()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for name, labels, value in re.findall(
        r"^(kvgate_replica_sync_\w+)(\{[^}]*\})? (\S+)$", text, re.M
    ):
        totals[name + labels] = totals.get(name + labels, 0.0) + float(value)
    return totals


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_round(
    sync: bool, args: argparse.Namespace, run_dir: Path, nats_url: str, seed: int
) -> dict[str, object]:
    tokenizer = args.tokenizer or default_tokenizer()
    replicas = []
    for i in range(2):
        ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
        cmd = [
            sys.executable, "-m", "kvgate", "epp", "--bind", "127.0.0.1", "--no-secure-serving",
            "--grpc-port", str(ports["grpc"]), "--grpc-health-port", str(ports["health"]),
            "--metrics-port", str(ports["metrics"]), "--config-file",
            str(REPO / "deploy" / "config" / "epp-config-dynamo.yaml"),
            "--endpoints-file", str(run_dir / "endpoints.json"), "--tokenizer", tokenizer,
            "--model", MODEL, "--log-level", "warning", "--replica-id", f"epp-{i}",
        ]  # fmt: skip
        if sync:
            cmd += ["--replica-sync", "--nats-url", nats_url]
        env = {"DYNAMO_KV_BLOCK_SIZE": "16"}
        proc = start(cmd, run_dir / f"epp-{i}-{'sync' if sync else 'nosync'}.log", env)
        replicas.append((proc, ports))
    try:
        for _, ports in replicas:
            wait_ready(lambda p=ports["grpc"]: port_open(p), "kvgate epp")  # type: ignore[misc]
        time.sleep(1.5)  # metrics scrapes, event subscriptions, sync handshake
        count = int(args.rate * args.duration)
        bodies = make_bodies("warm", count, seed=seed)
        latencies = asyncio.run(drive([p["grpc"] for _, p in replicas], bodies, args.rate))
        time.sleep(0.5)
        metrics = [scrape(p["metrics"]) for _, p in replicas]
    finally:
        stop(*(proc for proc, _ in replicas))
    sent = sum(
        v for m in metrics for k, v in m.items()
        if k.startswith("kvgate_replica_sync_messages_total") and 'direction="sent"' in k
    )  # fmt: skip
    deltas = sum(
        v for m in metrics for k, v in m.items()
        if k.startswith("kvgate_replica_sync_messages_total") and 'kind="deltas"' in k
        and 'direction="sent"' in k
    )  # fmt: skip
    routed = count + 2  # plus one warm-up per replica
    return {
        "sync": sync,
        "requests": count,
        "p50_ms": round(pct(latencies, 0.5), 3),
        "p99_ms": round(pct(latencies, 0.99), 3),
        "sync_messages_per_request": round(sent / routed, 3),
        "delta_messages_per_request": round(deltas / routed, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s over both replicas")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=2, help="sync-off/sync-on pairs")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 0 < args.duration <= 60 or not 0 < args.rate <= 1000 or not 1 <= args.rounds <= 5:
        parser.error("duration in (0, 60] s, rate in (0, 1000] req/s, rounds in [1, 5]")
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvgate-bench-sync-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    base = 20000 + random.randrange(20000)
    events = base + 100
    tokenizer = args.tokenizer or default_tokenizer()
    sim = start(
        [sys.executable, "-m", "kvgate", "sim", "--workers", str(WORKERS), "--base-port",
         str(base), "--events-base-port", str(events), "--tokenizer", tokenizer, "--model", MODEL,
         "--speedup", "100"],
        run_dir / "sim.log",
    )  # fmt: skip
    replay = events + WORKERS
    endpoints = [
        {
            "address": f"127.0.0.1:{base + i}",
            "instance_id": base + i,
            "events": f"tcp://127.0.0.1:{events + i}",
            "replay": f"tcp://127.0.0.1:{replay + i}",
        }
        for i in range(WORKERS)
    ]
    (run_dir / "endpoints.json").write_text(json.dumps(endpoints))
    nats_port = free_port()
    nats = start(nats_server_argv(nats_port), run_dir / "nats.log")
    results: list[dict[str, object]] = []
    try:
        wait_ready(lambda: "ready" in (run_dir / "sim.log").read_text(), "kvgate sim")
        wait_ready(lambda: port_open(nats_port), "nats-server")
        for r in range(args.rounds):
            for sync in (False, True):
                result = run_round(sync, args, run_dir, f"nats://127.0.0.1:{nats_port}", seed=r)
                results.append(result)
                print(json.dumps(result))
    finally:
        stop(nats, sim)
    summary = {}
    for sync in (False, True):
        rows = [r for r in results if r["sync"] is sync]
        summary["sync_on" if sync else "sync_off"] = {
            "p50_ms": round(sum(float(r["p50_ms"]) for r in rows) / len(rows), 3),  # type: ignore[arg-type]
            "p99_ms": round(sum(float(r["p99_ms"]) for r in rows) / len(rows), 3),  # type: ignore[arg-type]
            "sync_messages_per_request": rows[-1]["sync_messages_per_request"],
            "delta_messages_per_request": rows[-1]["delta_messages_per_request"],
        }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
