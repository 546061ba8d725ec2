"""The EPP's own work per request, without gRPC: `process_stream` fed the messages Envoy sends.

One process builds the picker as `kvgate epp` does (the given EndpointPickerConfig, the Qwen3
tokenizer, 8 endpoints) and routes warm 2k-token chats (a shared 1.9k-token system prompt + a new
question, as `bench_epp.py` sends): request headers, body, response headers, a final body with
usage (or, with ``--chunks N``, a streamed response of N SSE chunks). Reported: CPU time per
request (the client's part, building bodies and messages, done before the clock starts). Run it
twice under cachegrind for instruction counts, which the machine's other load cannot move (the
difference of two request counts removes start-up); the client's part is in that difference
too: ``--client-only`` measures it alone, to subtract:

    python benchmarks/bench_epp_inproc.py [--requests 1000] [--kind warm|cold]
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
        python benchmarks/bench_epp_inproc.py --requests 120     # minus the same with 20
    ... --client-only                                            # the client's part, as above

Nothing is bound; one process.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import uvloop
from bench_epp import CONFIG, default_tokenizer, headers_msg, make_bodies
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from kvgate.extproc.epp import Director, EppOptions, process_stream
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.extproc.metrics import EppMetrics
from kvgate.fleet.endpoint import Endpoint, EndpointSet
from kvgate.scheduling.framework import PluginContext
from kvgate.scheduling.picker_config import load_epp_config
from kvgate.scheduling.scheduler import PluginTimings
from kvgate.scheduling.services import KvEventTargets, SharedLoad
from kvgate.tokens import ModelTokenizer

_USAGE = b'{"usage":{"prompt_tokens":2000,"completion_tokens":8,"total_tokens":2008}}'
_DELTA = (
    b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}]}\n\n'
)
_LAST = b"data: " + _USAGE + b"\n\ndata: [DONE]\n\n"


def messages(body: bytes, request_id: str, chunks: int) -> list[pb.ProcessingRequest]:
    """Envoy's side of one request; ``chunks`` > 1: a streamed (SSE) response of that many."""
    head = headers_msg()
    head.request_headers.headers.headers.append(
        base_pb2.HeaderValue(key="x-request-id", raw_value=request_id.encode())
    )
    response = pb.ProcessingRequest()
    kind = b"text/event-stream" if chunks > 1 else b"application/json"
    for key, value in ((":status", b"200"), ("content-type", kind)):
        response.response_headers.headers.headers.append(
            base_pb2.HeaderValue(key=key, raw_value=value)
        )
    out = [
        head,
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        response,
    ]
    if chunks == 1:
        return [
            *out,
            pb.ProcessingRequest(response_body=pb.HttpBody(body=_USAGE, end_of_stream=True)),
        ]
    out += [pb.ProcessingRequest(response_body=pb.HttpBody(body=_DELTA)) for _ in range(chunks - 1)]
    return [*out, pb.ProcessingRequest(response_body=pb.HttpBody(body=_LAST, end_of_stream=True))]


async def run(args: argparse.Namespace) -> None:
    tokenizer = ModelTokenizer.load(args.tokenizer or default_tokenizer())
    metrics = EppMetrics()
    context = PluginContext(
        env={"DYNAMO_KV_BLOCK_SIZE": "16"},
        rng_seed=0,
        tokenizer=tokenizer,
        metrics=metrics,
        kv_events=KvEventTargets(),
        shared_load=SharedLoad(),
    )
    plugins = load_epp_config(args.config.read_text(), context=context)
    # Every plugin call timed as `kvgate epp` times it: its runtime's observer, on these metrics.
    runtime = SimpleNamespace(timings=PluginTimings(), metrics=metrics)
    scheduler = plugins.scheduler(observer=functools.partial(EppRuntime._observe, runtime))
    endpoints = EndpointSet([Endpoint(f"127.0.0.1:{9000 + i}") for i in range(8)])
    director = Director(endpoints, scheduler, EppOptions(), metrics)
    bodies = make_bodies(args.kind, args.requests + 1, seed=3)
    streams = [messages(body, f"r{i}", args.chunks) for i, body in enumerate(bodies)]
    if args.client_only:
        scheduler.close()
        return

    async def one(stream: list[pb.ProcessingRequest], request_id: str) -> None:
        async def incoming() -> AsyncIterator[pb.ProcessingRequest]:
            for msg in stream:
                yield msg

        answers = [answer async for answer in process_stream(director, incoming())]
        if any(answer.HasField("immediate_response") for answer in answers):
            raise RuntimeError(f"request {request_id} was refused: {answers[-1]}")

    await one(streams[0], "warm-up")  # the system prompt's segments are cached
    # As `kvgate epp` does once started (epp_runtime.serve); without it a full collection over
    # the start-up heap (~50 ms) lands in some runs and not others.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    started = time.process_time()
    for i, stream in enumerate(streams[1:]):
        await one(stream, f"r{i}")
    cpu = time.process_time() - started
    scheduler.close()
    print(
        f"{args.requests} {args.kind} requests, {args.chunks} response chunk(s) each: "
        f"{1e6 * cpu / args.requests:.0f} us CPU per request"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--kind", choices=["warm", "cold", "small"], default="warm")
    parser.add_argument(
        "--chunks", type=int, default=1, help="response body chunks (> 1: a streamed response)"
    )
    parser.add_argument(
        "--client-only",
        action="store_true",
        help="build the bodies and messages, route nothing (the client's part of a count)",
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    if not (1 <= args.requests <= 100_000 and 1 <= args.chunks <= 10_000):
        parser.error("requests must be in [1, 100000] and chunks in [1, 10000]")
    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
