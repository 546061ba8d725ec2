"""The picker's ext_proc gRPC server under a burst of new streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from kvgate.extproc.listeners import serve_ext_proc

STREAMS = 2000

# Opens STREAMS ext_proc streams on one connection, each sending one message and reading one
# answer; prints how each ended.
CLIENT = """
import asyncio, collections, json, sys
import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

async def main(port, n):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def one():
            call = stub.Process()
            try:
                await call.write(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
                answer = await asyncio.wait_for(call.read(), 60)
                return "answered" if answer is not grpc.aio.EOF else "ended"
            except grpc.aio.AioRpcError as err:
                return err.code().name

        ends = await asyncio.gather(*(one() for _ in range(n)))
    print(json.dumps(collections.Counter(ends)))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


async def answer_once(
    requests: AsyncIterator[pb.ProcessingRequest],
) -> AsyncIterator[pb.ProcessingResponse]:
    async for _ in requests:
        yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        return


async def test_a_burst_of_streams_the_server_has_not_taken_yet_is_served_whole() -> None:
    """gRPC's core holds each new call until the application takes it (grpc.aio takes them one
    at a time, on its event loop) and by default rejects some at random once 1,000 wait: a
    burst of requests through Envoy then fails a few of them. Held here by blocking the loop
    while a client opens 2,000 streams."""
    async with contextlib.AsyncExitStack() as stack:
        port = await serve_ext_proc(
            stack,
            answer_once,
            "127.0.0.1:0",
            secure=False,
            cert_path=None,
            max_message_bytes=1 << 20,
        )
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            str(port),
            str(STREAMS),
            stdout=asyncio.subprocess.PIPE,
        )
        time.sleep(4.0)  # the server takes no call meanwhile: they all wait in gRPC's core
        out, _ = await asyncio.wait_for(client.communicate(), 120)
    assert client.returncode == 0
    assert json.loads(out) == {"answered": STREAMS}
