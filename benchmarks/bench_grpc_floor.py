"""The floor under the EPP: what Python's gRPC server costs per ext_proc stream and message.

An ext_proc server that does nothing but answer (each message gets one ProcessingResponse) runs
in a subprocess pinned to core 0, as `benchmarks/bench_epp.py` pins the EPP; a client on the
other core opens streams of 1, 2 and 4 messages (32 at a time) and a few long streams. Reported:
the server's CPU time per stream and per message (from the kernel's scheduler statistics, so the
machine's other load moves it little), the round trip of one message on an idle stream, and the
streams per CPU-second that leaves — the most any Python ext_proc server of this kind can route
per core. Other servers: ``grpc-aio-rw`` (grpc.aio with the call's read()/write() instead of
async iterators), ``grpc-sync`` (grpc's thread-pool server), ``grpclib`` (pure Python, when
installed).

    python benchmarks/bench_grpc_floor.py [--server grpc-aio|grpc-aio-rw|grpc-sync|grpclib]

Binds 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from kvgate.bench.cpu import process_cpu_seconds

CHUNK = b"data: " + b"x" * 200 + b"\n\n"


def answer(msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    out.response_body.response.body_mutation.streamed_response.body = msg.response_body.body
    return out


async def serve_grpc_aio(port: int) -> None:
    class Echo(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests: Any, context: Any) -> Any:
            async for msg in requests:
                yield answer(msg)

    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def serve_grpc_aio_rw(port: int) -> None:
    """grpc.aio with the call's own read()/write() instead of async iterators."""

    class Echo(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests: Any, context: Any) -> None:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                await context.write(answer(msg))

    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_grpc_sync(port: int) -> None:
    """grpc's thread-pool server (no event loop)."""
    from concurrent.futures import ThreadPoolExecutor

    class Echo(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        def Process(self, requests: Any, context: Any) -> Any:
            for msg in requests:
                yield answer(msg)

    server = grpc.server(ThreadPoolExecutor(max_workers=64))
    pb_grpc.add_ExternalProcessorServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def serve_grpclib(port: int) -> None:
    import grpclib.const  # type: ignore[import-not-found]
    import grpclib.server  # type: ignore[import-not-found]

    class Echo:
        async def process(self, stream: Any) -> None:
            async for msg in stream:
                await stream.send_message(answer(msg))

        def __mapping__(self) -> dict[str, Any]:
            return {
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process": grpclib.const.Handler(
                    self.process,
                    grpclib.const.Cardinality.STREAM_STREAM,
                    pb.ProcessingRequest,
                    pb.ProcessingResponse,
                )
            }

    server = grpclib.server.Server([Echo()])
    await server.start("127.0.0.1", port)
    await server.wait_closed()


async def streams_of(stub: Any, streams: int, messages: int, concurrency: int) -> None:
    remaining = streams

    async def one() -> None:
        call = stub.Process()
        for _ in range(messages):
            await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=CHUNK)))
            await call.read()
        await call.done_writing()
        await call.read()  # the end of the stream

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(concurrency))), 300)


async def idle_round_trip(stub: Any, messages: int) -> float:
    call = stub.Process()
    samples = []
    for _ in range(messages):
        started = time.perf_counter()
        await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=CHUNK)))
        await call.read()
        samples.append(time.perf_counter() - started)
        await asyncio.sleep(0.002)
    await call.done_writing()
    return sorted(samples)[len(samples) // 2]


async def measure(port: int, pid: int, streams: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        await streams_of(stub, 50, 2, 8)  # warm up
        results["idle_round_trip_us"] = round(1e6 * await idle_round_trip(stub, 300), 1)
        per_stream = {}
        for messages in (1, 2, 4):
            before = process_cpu_seconds(pid)
            await streams_of(stub, streams, messages, 32)
            per_stream[messages] = (process_cpu_seconds(pid) - before) / streams
            print(
                f"streams of {messages} message(s): server CPU {1e6 * per_stream[messages]:.0f} "
                f"us per stream = {1 / per_stream[messages]:.0f} streams per CPU-second",
                flush=True,
            )
        # Least squares over 1, 2, 4 messages: CPU = setup + n * per message.
        xs = list(per_stream)
        mean_x = sum(xs) / len(xs)
        mean_y = sum(per_stream.values()) / len(xs)
        slope = sum((x - mean_x) * (per_stream[x] - mean_y) for x in xs) / sum(
            (x - mean_x) ** 2 for x in xs
        )
        results["cpu_us_per_stream"] = {str(k): round(1e6 * v, 1) for k, v in per_stream.items()}
        results["cpu_us_per_message"] = round(1e6 * slope, 1)
        results["cpu_us_stream_setup"] = round(1e6 * (mean_y - slope * mean_x), 1)
    print(
        f"per message {results['cpu_us_per_message']:.0f} us, per stream set-up "
        f"{results['cpu_us_stream_setup']:.0f} us; one message on an idle stream: "
        f"{results['idle_round_trip_us']:.0f} us round trip"
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", choices=["grpc-aio", "grpc-aio-rw", "grpc-sync", "grpclib"], default="grpc-aio"
    )
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server subprocess
    args = parser.parse_args()
    if args.serve:
        import uvloop

        if args.server == "grpc-sync":
            serve_grpc_sync(args.serve)
            return 0
        serve = {
            "grpc-aio": serve_grpc_aio, "grpc-aio-rw": serve_grpc_aio_rw, "grpclib": serve_grpclib
        }[args.server]  # fmt: skip
        uvloop.run(serve(args.serve))
        return 0
    if not 10 <= args.streams <= 20000:
        parser.error("streams must be in [10, 20000]")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [sys.executable, __file__, "--server", args.server, "--serve", str(port)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    server = subprocess.Popen(cmd, start_new_session=True)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the client on the other core
    try:
        deadline = time.time() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("the echo server did not start")
            time.sleep(0.1)
        results = {"server": args.server, **asyncio.run(measure(port, server.pid, args.streams))}
    finally:
        server.terminate()
        server.wait(timeout=10)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
