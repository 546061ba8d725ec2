"""Where the latency `kvgate up --backend dynamo` adds goes, on an idle fleet.

One Dynamo fleet (mocker workers, a direct-mode frontend) and one kvgate gateway in front of it;
sequential one-token requests (chat "Hi", and one token id on /v1/completions) along each path,
interleaved in rounds so that drift on a shared machine spreads over all of them:

    direct             the frontend, pinned to a worker (x-worker-instance-id): the floor
    envoy              a bare Envoy (router filter only) in front of it, pinned the same way
    kvgate             the gateway as `kvgate up` runs it (ext_proc full duplex both ways)
    kvgate/no-resp     the same EPP and Envoy config, but the response phase not sent to the EPP
    kvgate/buffered    the same, request body BUFFERED instead of FULL_DUPLEX_STREAMED, no
                       response phase
    kvgate/off         --body-transformer off instead of inline nvext (the frontend's direct
                       mode reads the worker from the header)

plus the EPP's own time per decision (``kvgate_stage_duration_seconds``). The variants are
measurements only: kvgate's Envoy configuration is not changed by this script.

    python benchmarks/bench_dynamo_path.py [--requests 150] [--rounds 3] [--json out.json]

Loopback only; every loop bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from bench_dynamo import epp_stage_ms

from kvgate.dynamo.processes import DynamoFleet, FleetSettings
from kvgate.gateway.bootstrap import GatewaySpec, build_bootstrap
from kvgate.gateway.local import (
    LocalGateway,
    LocalGatewayConfig,
    RunningGateway,
    default_tokenizer,
    free_port,
    start_envoy,
)
from kvgate.gateway.supervisor import Supervisor

MODEL = "Qwen/Qwen3-0.6B"
BODIES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    "completions": ("/v1/completions", {"prompt": [9707]}),
}
NO_RESPONSE_PHASE = {
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}
VARIANTS: dict[str, dict[str, str]] = {
    "kvgate/no-resp": NO_RESPONSE_PHASE,
    "kvgate/buffered": {
        **NO_RESPONSE_PHASE,
        "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
    },
}


def envoy_from(sup: Supervisor, name: str, config: dict[str, Any], run_dir: Path) -> None:
    path = run_dir / f"{name.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump(config))
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    start_envoy(sup, name.replace("/", "-"), path, admin)


def bare_envoy(sup: Supervisor, run_dir: Path, frontend: tuple[str, int]) -> str:
    """Envoy with the router filter only and a static cluster to the frontend."""
    port, admin = free_port(), free_port()
    config = build_bootstrap(GatewaySpec("127.0.0.1", port, admin, ("127.0.0.1", 1), [frontend],
                                         "FailOpen"))  # fmt: skip
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["http_filters"] = hcm["typed_config"]["http_filters"][-1:]
    host = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
    host["routes"] = host["routes"][-1:]
    envoy_from(sup, "envoy-bare", config, run_dir)
    return f"http://127.0.0.1:{port}"


def variant_envoy(sup: Supervisor, gateway: RunningGateway, name: str, mode: dict[str, str]) -> str:
    """The gateway's own Envoy config on other ports, with the EPP filter's processing mode
    changed: the same EPP process answers."""
    config = yaml.safe_load((gateway.run_dir / "envoy.yaml").read_text())
    port = free_port()
    config["admin"]["address"]["socket_address"]["port_value"] = free_port()
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        if f["name"].startswith("envoy.filters.http.ext_proc"):
            f["typed_config"]["processing_mode"].update(mode)
    envoy_from(sup, name, config, gateway.run_dir)
    return f"http://127.0.0.1:{port}"


async def latencies(url: str, headers: dict[str, str], body: dict[str, Any], n: int) -> list[float]:
    out: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for i in range(n + 3):
            started = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            if i >= 3:  # connections and caches warm up
                out.append((time.perf_counter() - started) * 1e3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--requests", type=int, default=150, help="per path and prompt kind, in all")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (0 < args.requests <= 2000 and 0 < args.rounds <= 20):
        p.error("requests must be in (0, 2000] and rounds in (0, 20]")
    run_dir = Path(tempfile.mkdtemp(prefix="bench-dynamo-path-"))
    settings = FleetSettings(workers=args.workers, router_modes=("direct",), log_level="warn")
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        fleet = stack.enter_context(DynamoFleet(settings, run_dir / "fleet"))
        sup = Supervisor(run_dir)
        stack.callback(sup.stop_all)
        frontend = fleet.frontend("direct")
        gateways: dict[str, RunningGateway] = {}
        for name, transformer in (("kvgate", "inline"), ("kvgate/off", "off")):
            config = LocalGatewayConfig(
                backend="dynamo", dynamo_fleet=fleet, dynamo_router_mode="direct",
                body_transformer=transformer, port=free_port(), tokenizer=default_tokenizer(),
                run_dir=run_dir / name.replace("/", "-"),
            )  # fmt: skip
            gateways[name] = stack.enter_context(LocalGateway(config))  # type: ignore[arg-type]
        pin = {"x-worker-instance-id": str(fleet.workers[0].instance_id)}
        paths: dict[str, tuple[str, dict[str, str]]] = {
            "direct": (frontend.url, pin),
            "envoy": (bare_envoy(sup, run_dir, ("127.0.0.1", frontend.port)), pin),
            "kvgate": (gateways["kvgate"].url, {}),
            **{
                name: (variant_envoy(sup, gateways["kvgate"], name, mode), {})
                for name, mode in VARIANTS.items()
            },
            "kvgate/off": (gateways["kvgate/off"].url, {}),
        }
        per_round = max(1, args.requests // args.rounds)
        for kind, (route, extra) in BODIES.items():
            body = {"model": MODEL, "max_tokens": 1, **extra}
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, (url, headers) in paths.items():
                    samples[name] += asyncio.run(latencies(url + route, headers, body, per_round))
            floor = statistics.median(samples["direct"])
            for name, values in samples.items():
                p50 = statistics.median(values)
                results[f"{kind}/{name}"] = {
                    "p50_ms": round(p50, 3),
                    "added_ms": round(p50 - floor, 3),
                }
                print(f"{kind:>11} {name:>16}: p50 {p50:6.2f} ms, {p50 - floor:+5.2f} ms")
        stages = epp_stage_ms(gateways["kvgate"].epp_metrics_url)
        results["epp_stage_ms"] = {k: round(v, 3) for k, v in stages.items()}
        print("EPP ms per decision, by stage:", results["epp_stage_ms"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
