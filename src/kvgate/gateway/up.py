"""`kvgate up`: start the local gateway and keep it running until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from kvgate.gateway.envoy_binary import EnvoyNotFound
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, RunningGateway
from kvgate.gateway.supervisor import StartupError

_DECISION = re.compile(r'^kvgate_decisions_total\{endpoint="([^"]+)"\} ([0-9.e+]+)$', re.M)
_INDEX = re.compile(r"^inference_extension_prefix_indexer_size ([0-9.e+]+)$", re.M)


def status_line(running: RunningGateway) -> str:
    try:
        with urllib.request.urlopen(running.epp_metrics_url, timeout=2) as resp:
            text = resp.read().decode()
    except OSError as err:
        return f"EPP metrics unavailable: {err}"
    decisions = {m[0]: int(float(m[1])) for m in _DECISION.findall(text)}
    index = _INDEX.search(text)
    per_worker = " ".join(f"{w.rsplit(':', 1)[1]}={decisions.get(w, 0)}" for w in running.workers)
    blocks = int(float(index.group(1))) if index else 0
    return f"routed {sum(decisions.values())} [{per_worker}] index entries {blocks}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvgate up",
        description="Run the whole gateway locally: Envoy + EPP (+ body transformer) + engines.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workers", type=int, default=4, help="simulated engines (default 4)")
    src.add_argument(
        "--endpoint", action="append", default=[], help="external worker URL (repeatable)"
    )
    p.add_argument("--endpoint-events-port", type=int, help="KV-event port of external workers")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="gateway listen address")
    p.add_argument("--mode", choices=["kv", "standard"], default="kv")
    p.add_argument("--config", type=Path, help="EndpointPickerConfig for the EPP")
    p.add_argument(
        "--body-transformer", choices=["ext-proc", "inline", "lua", "off"], default="off"
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
    p.add_argument("--status-interval", type=float, default=5.0, help="seconds; 0 = quiet")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.endpoint and not 1 <= args.workers <= 64:
        print("kvgate up: --workers must be in 1..64", file=sys.stderr)
        return 2
    if args.prefill_workers and not 0 < args.prefill_workers < args.workers:
        print("kvgate up: --prefill-workers must leave at least one decode worker", file=sys.stderr)
        return 2
    config = LocalGatewayConfig(
        workers=args.workers,
        endpoints=args.endpoint,
        endpoint_events_port=args.endpoint_events_port,
        port=args.port,
        host=args.host,
        mode=args.mode,
        config_file=args.config,
        body_transformer=args.body_transformer,
        failure_mode=args.failure_mode,
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        speedup=args.speedup,
        run_dir=args.run_dir,
        prefill_workers=args.prefill_workers,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gateway = LocalGateway(config)
        with gateway as running:
            print(f"kvgate gateway: {running.url}  (OpenAI API: /v1/models, /v1/chat/completions)")
            for name, child in running.children.items():
                print(f"  {name:<17} pid {child.process.pid:<7} log {child.log}")
            print(f"  workers           {' '.join(running.workers)}")
            print(f"  EPP metrics       {running.epp_metrics_url}")
            print(f"  Envoy admin       {running.admin_url}")
            print(f"  run directory     {running.run_dir}")
            print("Ctrl-C stops everything.", flush=True)
            while not stop.wait(args.status_interval or 3600):
                dead = gateway.supervisor.dead()
                if dead:
                    print(f"kvgate up: {dead[0].name} exited; see {dead[0].log}", file=sys.stderr)
                    return 1
                if args.status_interval:
                    print(status_line(running), flush=True)
            print("stopping...", flush=True)
    except (StartupError, EnvoyNotFound) as err:
        print(f"kvgate up: {err}", file=sys.stderr)
        return 1
    return 0
