"""Soak: `kvgate up` (a real Envoy, the EPP, simulated engines) under a steady, realistic load for
a given time, watching the picker for leaks.

The load is open-loop (Poisson arrivals at ``--rate``) and mixed:

    kind          share  what                                                       expected
    chat            44%  a question under one of 24 shared system prompts (KV hits)  200
    stream          24%  the same, streamed with usage                              200
    long             6%  a 3,000-6,000-token prompt                                  200
    completion       5%  /v1/completions                                            200
    abort            8%  a stream the client drops after its first chunks           (cut)
    bad-json         6%  a body that is not JSON                                    400
    unknown-model    6%  a model nobody serves                                      404
    oversized     1/20s  a body over the picker's 16 MiB limit                      413

Every ``--sample-every`` seconds it reads the EPP's /metrics and /healthz: resident memory, open
file descriptors, asyncio tasks, what it holds per request (open streams, buffered request bytes,
in-flight bookings), the prefix index size, its rejections by status; and the client's own
counts: sent, completed, unexpected outcomes (a status other than the expected one, a connection
error, a timeout), latency; and the CPU cores each process used (picker, engines, Envoy, this
client), from /proc. After the load, it waits for the picker to go idle and samples again.
Writes ``soak.csv``, ``soak.png`` and ``summary.json`` to ``--out``, and exits 1 unless:
no unexpected outcome, resident memory grew less than 5% from the end of the warm-up to the end
of the load, and the bookkeeping is back to 0 at idle.

    python benchmarks/soak.py [--rate 200] [--duration 120] [--warmup 60] [--workers 4]
                              [--out DIR] [--seed 0]

Loopback only; the load and the wait for idle are bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import re
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, default_tokenizer, free_port

MODEL = "Qwen/Qwen3-0.6B"
OVERSIZED_BYTES = 16 * 1024 * 1024 + 4096
IDLE_TIMEOUT_S = 60.0
MAX_IN_FLIGHT = 4000
"""Beyond this many requests open at once, arrivals are counted as not sent (the machine, not the
picker, is then the limit): memory stays bounded."""
KINDS: list[tuple[str, float, int | None]] = [
    ("chat", 44, 200), ("stream", 24, 200), ("long", 6, 200), ("completion", 5, 200),
    ("abort", 8, None), ("bad-json", 6, 400), ("unknown-model", 6, 404),
]  # fmt: skip
EXPECTED = {name: status for name, _, status in KINDS} | {"oversized": 413}
WORDS = ["prefix", "cache", "block", "token", "worker", "engine", "gateway", "route", "picker",
         "event", "stream", "replica", "batch", "decode", "prefill"]  # fmt: skip


def system_prompt(group: int) -> str:
    rng = random.Random(group)
    rules = " ".join(f"Rule {i}: {' '.join(rng.choices(WORDS, k=8))}." for i in range(40))
    return f"You are assistant {group} of the soak. {rules}"


SYSTEMS = [system_prompt(g) for g in range(24)]


@dataclass
class Counts:
    sent: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    not_sent: int = 0
    in_flight: int = 0

    def fail(self, kind: str, what: str) -> None:
        self.unexpected[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {what}")


def payload(kind: str, rng: random.Random) -> tuple[str, bytes]:
    """(path, body) of one request of ``kind``."""
    question = f"Question {rng.randrange(10**6)}: {' '.join(rng.choices(WORDS, k=12))}?"
    system = rng.choice(SYSTEMS)
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": rng.randrange(2, 16),
    }
    if kind in ("stream", "abort"):
        body.update(stream=True, stream_options={"include_usage": True})
        if kind == "abort":
            body["max_tokens"] = 400
    elif kind == "long":
        body["messages"][0]["content"] = " ".join(rng.choices(WORDS, k=rng.randrange(3000, 6000)))
    elif kind == "completion":
        return "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": system + " " + question, "max_tokens": body["max_tokens"]}
        ).encode()
    elif kind == "unknown-model":
        body["model"] = "nobody/serves-this"
    elif kind == "bad-json":
        return "/v1/chat/completions", json.dumps(body).encode()[: rng.randrange(10, 200)]
    elif kind == "oversized":
        body["messages"][1]["content"] = "x" * OVERSIZED_BYTES
    return "/v1/chat/completions", json.dumps(body).encode()


async def one(session: aiohttp.ClientSession, url: str, kind: str, rng: random.Random,
              counts: Counts) -> None:  # fmt: skip
    path, data = payload(kind, rng)
    started = time.perf_counter()
    counts.sent[kind] += 1
    counts.in_flight += 1
    try:
        async with session.post(
            url + path, data=data, headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:  # fmt: skip
            if kind == "abort":
                if resp.status != 200:
                    counts.fail(kind, f"status {resp.status}")
                    return
                chunks = 0
                async for _ in resp.content.iter_any():
                    chunks += 1
                    if chunks >= 3:
                        break  # the client goes away mid-stream
                resp.close()
                counts.done[kind] += 1
                return
            await resp.read()
            if resp.status != EXPECTED[kind]:
                counts.fail(kind, f"status {resp.status}: {(await resp.text())[:200]}")
                return
        counts.done[kind] += 1
        if EXPECTED[kind] == 200:
            counts.latencies.append(time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError) as err:
        counts.fail(kind, f"{type(err).__name__}: {err}")
    finally:
        counts.in_flight -= 1


async def drive(url: str, rate: float, until: float, rng: random.Random, counts: Counts) -> None:
    """Poisson arrivals at ``rate`` until ``until`` (monotonic), then wait for every request."""
    names = [k for k, _, _ in KINDS]
    weights = [w for _, w, _ in KINDS]
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    next_oversized = time.monotonic() + 5.0
    async with aiohttp.ClientSession(connector=connector) as session:
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= until:
                break
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += rng.expovariate(rate)
            kind = rng.choices(names, weights)[0]
            if time.monotonic() >= next_oversized:
                kind, next_oversized = "oversized", time.monotonic() + 20.0
            if counts.in_flight >= MAX_IN_FLIGHT:
                counts.not_sent += 1
                continue
            task = asyncio.create_task(one(session, url, kind, random.Random(rng.random()), counts))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=90)


# -- sampling ---------------------------------------------------------------------------------


def scrape(metrics_url: str, healthz_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    with urllib.request.urlopen(healthz_url, timeout=10) as resp:
        health = json.loads(resp.read())

    def total(name: str, label: str | None = None) -> float:
        pattern = rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$"
        out = 0.0
        for labels, value in re.findall(pattern, text, re.M):
            if label is None or label in labels:
                out += float(value)
        return out

    row = {
        "rss_mb": total("process_resident_memory_bytes") / 2**20,
        "open_fds": total("process_open_fds"),
        "asyncio_tasks": total("kvgate_asyncio_tasks"),
        "cpu_s": total("process_cpu_seconds_total"),
        "index_entries": total("inference_extension_prefix_indexer_size"),
        "running_requests": total("inference_objective_running_requests"),
        "routed": total("inference_objective_request_total"),
    }
    row.update({k: float(v) for k, v in health["bookkeeping"].items()})
    for code in ("400", "404", "413", "429", "500", "503"):
        row[f"rejected_{code}"] = total("kvgate_rejections_total", f'code="{code}"')
    row["kv_event_errors"] = float(
        health["kv_events"]["internal_errors"] + health["kv_events"]["sink_errors"]
    )
    return row


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sampler:
    metrics_url: str
    healthz_url: str
    counts: Counts
    started: float
    pids: dict[str, int] = field(default_factory=dict)
    """Processes whose CPU share is recorded (``cpu_<name>`` columns: cores used since the last
    sample)."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    _last_sent: int = 0
    _last_latencies: int = 0
    _last_cpu: dict[str, float] = field(default_factory=dict)

    def sample(self, phase: str) -> dict[str, Any]:
        row: dict[str, Any] = {"t_s": round(time.monotonic() - self.started, 1), "phase": phase}
        row.update(scrape(self.metrics_url, self.healthz_url))
        sent = sum(self.counts.sent.values())
        interval = row["t_s"] - (self.rows[-1]["t_s"] if self.rows else 0.0)
        fresh = sorted(self.counts.latencies[self._last_latencies :])
        row.update(
            sent=sent,
            completed=sum(self.counts.done.values()),
            unexpected=sum(self.counts.unexpected.values()),
            not_sent=self.counts.not_sent,
            client_in_flight=self.counts.in_flight,
            rate=round((sent - self._last_sent) / interval, 1) if interval > 0 else 0.0,
            p50_ms=round(1000 * fresh[len(fresh) // 2], 1) if fresh else "",
            p99_ms=round(1000 * fresh[int(len(fresh) * 0.99)], 1) if fresh else "",
        )
        for name, pid in {**self.pids, "client": os.getpid()}.items():
            used = cpu_seconds(pid)
            last = self._last_cpu.get(name)
            row[f"cpu_{name}"] = round((used - last) / interval, 2) if last and interval else ""
            self._last_cpu[name] = used
        self._last_sent = sent
        self._last_latencies = len(self.counts.latencies)
        self.rows.append(row)
        print(
            f"[{row['t_s']:7.1f}s {phase:6}] rate {row['rate']:6.1f}/s  rss {row['rss_mb']:6.1f} MB"
            f"  fds {row['open_fds']:4.0f}  tasks {row['asyncio_tasks']:4.0f}"
            f"  streams {row['open_streams']:4.0f}  bookings {row['inflight_bookings']:4.0f}"
            f"  unexpected {row['unexpected']}  p50 {row['p50_ms']} ms"
            f"  cpu epp {row['cpu_epp']} engines {row['cpu_engines']} envoy {row['cpu_envoy']}"
            f" client {row['cpu_client']}",
            flush=True,
        )
        return row

    async def every(self, seconds: float, phase: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self.sample, phase())


# -- report -----------------------------------------------------------------------------------


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path, title: str, warmup_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    panels = [
        ("EPP resident memory (MB)", ["rss_mb"]),
        ("EPP open fds / asyncio tasks", ["open_fds", "asyncio_tasks"]),
        ("held per request", ["open_streams", "inflight_bookings", "running_requests"]),
        ("requests / s, unexpected (cumulative)", ["rate", "unexpected"]),
    ]
    for ax, (label, keys) in zip(axes, panels, strict=True):
        for key in keys:
            ax.plot(t, [float(r[key] or 0) for r in rows], marker=".", label=key)
        ax.set_ylabel(label, fontsize=8)
        ax.axvline(warmup_s / 60, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes (dotted: end of warm-up)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(rows: list[dict[str, Any]], counts: Counts) -> dict[str, Any]:
    load = [r for r in rows if r["phase"] == "load"]
    idle = [r for r in rows if r["phase"] == "idle"]
    base = load[0]["rss_mb"] if load else math.nan
    end = load[-1]["rss_mb"] if load else math.nan
    growth = (end - base) / base * 100 if load else math.nan
    keys = ("open_streams", "buffered_request_bytes", "inflight_bookings", "running_requests")
    held = {k: idle[-1][k] for k in keys} if idle else {}
    return {
        "unexpected": dict(counts.unexpected),
        "unexpected_examples": counts.examples,
        "rss_after_warmup_mb": round(base, 1),
        "rss_end_of_load_mb": round(end, 1),
        "rss_growth_pct": round(growth, 2),
        "held_at_idle": held,
        "ok": bool(not counts.unexpected and growth < 5.0 and held and not any(held.values())),
    }


async def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or default_tokenizer()
    config = LocalGatewayConfig(
        workers=args.workers, port=free_port(), tokenizer=tokenizer, run_dir=out / "gateway",
        speedup=args.speedup, num_gpu_blocks=args.num_gpu_blocks,
    )  # fmt: skip
    local = LocalGateway(config)
    running = await asyncio.to_thread(local.start)
    try:
        counts = Counts()
        started = time.monotonic()
        pids = {name: running.children[name].process.pid for name in ("epp", "engines", "envoy")}
        sampler = Sampler(
            running.epp_metrics_urls[0], running.epp_healthz_urls[0], counts, started, pids
        )
        await asyncio.to_thread(sampler.sample, "start")
        warm_until = started + args.warmup
        phase = lambda: "warmup" if time.monotonic() < warm_until else "load"  # noqa: E731
        sampling = asyncio.create_task(sampler.every(args.sample_every, phase))
        rng = random.Random(args.seed)
        await drive(running.url, args.rate, started + args.duration, rng, counts)
        sampling.cancel()
        await asyncio.to_thread(sampler.sample, "load")
        # Idle: the picker must let go of everything.
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            await asyncio.sleep(2.0)
            row = await asyncio.to_thread(sampler.sample, "idle")
            keys = ("open_streams", "buffered_request_bytes", "inflight_bookings")
            if not any(row[k] for k in keys) or time.monotonic() > deadline:
                break
    finally:
        await asyncio.to_thread(local.stop)
    rows = sampler.rows
    write_csv(rows, out / "soak.csv")
    result = verdict(rows, counts)
    cpu = [r for r in rows if r["phase"] == "load"]
    summary = {
        "rate_target": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "workers": args.workers,
        "sent": dict(counts.sent),
        "completed": dict(counts.done),
        "not_sent_client_saturated": counts.not_sent,
        "achieved_rate": round(sum(counts.sent.values()) / args.duration, 1),
        "cpu_cores_during_load": {
            name: round(sum(r[f"cpu_{name}"] for r in cpu) / len(cpu), 2)
            for name in (*pids, "client")
            if cpu and all(r[f"cpu_{name}"] != "" for r in cpu)
        },
        "latency_p50_ms_last": cpu[-1]["p50_ms"] if cpu else None,
        **result,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (f"kvgate soak: {summary['achieved_rate']}/s for {args.duration / 60:.0f} min, "
             f"{args.workers} simulated engines; RSS growth {result['rss_growth_pct']}%, "
             f"unexpected {sum(counts.unexpected.values())}")  # fmt: skip
    plot(rows, out / "soak.png", title, args.warmup)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'soak.csv'}, {out / 'soak.png'}, {out / 'summary.json'}")
    return 0 if result["ok"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (Poisson)")
    p.add_argument(
        "--duration", type=float, default=120.0, help="seconds of load, warm-up included"
    )
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--speedup", type=float, default=1.0, help="simulated engine time divisor")
    p.add_argument("--num-gpu-blocks", type=int, default=None)
    p.add_argument("--tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=Path(".kvgate") / time.strftime("soak-%Y%m%d-%H%M%S")
    )
    args = p.parse_args()
    if not 0 <= args.warmup < args.duration:
        p.error("--warmup must be in [0, --duration)")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
