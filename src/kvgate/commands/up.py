"""`kvgate up`: start the local gateway and keep it running until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from kvgate.commands.support import RUNTIME_ERROR, USAGE_ERROR, fail
from kvgate.errors import StartupError
from kvgate.gateway.envoy_binary import EnvoyNotFound
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, RunningGateway
from kvgate.gateway.status import status_line

PROG = "kvgate up"


def _replicas(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run the whole gateway locally: Envoy + EPP (+ body transformer) + engines.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workers", type=int, default=4, help="simulated engines (default 4)")
    src.add_argument(
        "--endpoint", action="append", default=[], help="external worker URL (repeatable)"
    )
    src.add_argument(
        "--endpoints-file",
        type=Path,
        help="external workers as an EPP endpoints file (YAML/JSON: address, events, replay, "
        "...; watched: edits add or remove workers while running)",
    )
    p.add_argument("--endpoint-events-port", type=int, help="KV-event port of external workers")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="gateway listen address")
    p.add_argument("--mode", choices=["kv", "standard"], default="kv")
    p.add_argument(
        "--routing",
        choices=["kvgate", "dynamo"],
        default="kvgate",
        help="KV routing policy in kv mode: kvgate's predicted latency (default), or the "
        "reference router's cost function (DYNAMO_* settings)",
    )
    p.add_argument("--config", type=Path, help="EndpointPickerConfig for the EPP")
    p.add_argument(
        "--body-transformer",
        choices=["ext-proc", "inline", "lua", "off"],
        help="how nvext reaches the backend (default: inline with --backend dynamo, else off)",
    )
    p.add_argument(
        "--backend",
        choices=["sim", "dynamo"],
        default="sim",
        help="simulated engines, or a Dynamo frontend + mocker workers (needs kvgate[dynamo])",
    )
    p.add_argument(
        "--dynamo-router-mode",
        choices=["direct", "kv", "round-robin"],
        help="the Dynamo frontend's router mode (default: kv with FailOpen, else direct)",
    )
    p.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        help="disaggregated serving: the first N simulated workers prefill, the rest decode",
    )
    p.add_argument("--failure-mode", choices=["FailClose", "FailOpen"], default="FailClose")
    p.add_argument("--tokenizer", help="tokenizer dir or hub id (default: bundled Qwen3)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks", type=int, help="KV capacity of each simulated engine")
    p.add_argument("--speedup", type=float, default=1.0, help="simulated engine time divisor")
    p.add_argument("--run-dir", type=Path, help="where logs and generated configs go")
    p.add_argument(
        "--epp-replicas",
        type=_replicas,
        default=1,
        metavar="N",
        help="EPP processes behind Envoy, round-robin and health-checked (default 1)",
    )
    p.add_argument(
        "--replica-sync",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EPP replicas share in-flight load through a local nats-server "
        "(default: on when --epp-replicas > 1 in kv mode)",
    )
    p.add_argument(
        "--response-phase",
        choices=["observer", "inline"],
        default="observer",
        help="how the EPP sees responses: an observe-only ext_proc filter that Envoy does not "
        "wait for (default), or in the routing filter's path, each chunk a round trip (the GAIE "
        "reference)",
    )
    p.add_argument("--status-interval", type=float, default=5.0, help="seconds; 0 = quiet")
    return p


def _print_banner(running: RunningGateway) -> None:
    print(f"kvgate gateway: {running.url}  (OpenAI API: /v1/models, /v1/chat/completions)")
    for name, child in running.children.items():
        print(f"  {name:<17} pid {child.process.pid:<7} log {child.log}")
    print(f"  workers           {' '.join(running.workers)}")
    if len(running.epp_children) > 1:
        sync = f"synced via {running.nats_url}" if running.nats_url else "no sync"
        print(f"  EPP replicas      {len(running.epp_children)} ({sync})")
        for child, url in zip(running.epp_children, running.epp_metrics_urls, strict=True):
            print(f"  {child.name + ' metrics':<17} {url}")
    else:
        print(f"  EPP metrics       {running.epp_metrics_url}")
        if running.nats_url:
            print(f"  replica sync      {running.nats_url}")
    print(f"  Envoy admin       {running.admin_url}")
    print(f"  run directory     {running.run_dir}")
    print("Ctrl-C stops everything.", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    external = bool(args.endpoint or args.endpoints_file)
    if not external and not 1 <= args.workers <= 64:
        return fail(PROG, "--workers must be in 1..64", USAGE_ERROR)
    if args.backend == "dynamo" and external:
        drop = "drop --endpoint/--endpoints-file"
        return fail(PROG, f"--backend dynamo starts its workers; {drop}", USAGE_ERROR)
    if args.prefill_workers and not 0 < args.prefill_workers < args.workers:
        return fail(PROG, "--prefill-workers must leave at least one decode worker", USAGE_ERROR)
    config = LocalGatewayConfig(
        workers=args.workers,
        endpoints=args.endpoint,
        endpoint_events_port=args.endpoint_events_port,
        endpoints_file=args.endpoints_file,
        port=args.port,
        host=args.host,
        mode=args.mode,
        routing=args.routing,
        config_file=args.config,
        body_transformer=args.body_transformer or ("inline" if args.backend == "dynamo" else "off"),
        backend=args.backend,
        dynamo_router_mode=args.dynamo_router_mode,
        failure_mode=args.failure_mode,
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        speedup=args.speedup,
        run_dir=args.run_dir,
        prefill_workers=args.prefill_workers,
        epp_replicas=args.epp_replicas,
        replica_sync=args.replica_sync,
        response_observer=args.response_phase == "observer",
    )
    # The gateway's children are processes supervised from this thread: no event loop here.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gateway = LocalGateway(config)
        with gateway as running:
            _print_banner(running)
            while not stop.wait(args.status_interval or 3600):
                dead = gateway.supervisor.dead()
                if dead:
                    return fail(PROG, f"{dead[0].name} exited; see {dead[0].log}", RUNTIME_ERROR)
                if args.status_interval:
                    print(status_line(running), flush=True)
            print("stopping...", flush=True)
    except (StartupError, EnvoyNotFound) as err:
        return fail(PROG, err, RUNTIME_ERROR)
    return 0
