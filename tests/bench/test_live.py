from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvgate.bench.live import BenchSettings, main, run_bench
from kvgate.bench.report import summarize
from kvgate.bench.traces import TraceRequest, shared_prefix, write_mooncake
from kvgate.sim.engine import Engine, EngineConfig
from kvgate.sim.http import SimWorker, WorkerConfig
from kvgate.sim.prompts import TokensCodec, output_vocabulary
from kvgate.sim.timing import PolynomialTiming

MODEL = "Qwen/Qwen3-0.6B"


@pytest.fixture
async def worker(qwen3_dir: Path) -> AsyncIterator[SimWorker]:
    codec = TokensCodec.load(str(qwen3_dir))
    vocab = output_vocabulary(codec)
    engine = Engine(
        EngineConfig(num_gpu_blocks=2048, max_model_len=8192),
        PolynomialTiming(speedup=50.0),
        tuple(vocab),
    )
    async with SimWorker(engine, codec, WorkerConfig(model=MODEL), token_text=vocab) as w:
        yield w


def requests() -> list[TraceRequest]:
    return shared_prefix(
        groups=2,
        prompts_per_group=4,
        system_blocks=1,
        question_tokens=100,
        output_tokens=4,
        rate_per_s=50.0,
        seed=1,
    ).requests


@pytest.mark.slow
async def test_replay_against_a_simulated_worker(worker: SimWorker) -> None:
    trace = requests()
    record = await run_bench(trace, BenchSettings(url=worker.url, model=MODEL, duration_s=30.0))
    m = summarize(record)
    assert (m.requests, m.errors) == (len(trace), 0)
    assert record.per_worker == {worker.address: len(trace)}
    assert record.output_tokens == 4 * len(trace)
    assert len(record.itl_s) == 3 * len(trace)
    # Requests after the first of each group find the 512-token system prompt cached.
    assert 0.0 < m.hit_rate <= 1.0


@pytest.mark.slow
async def test_errors_are_counted_by_kind(worker: SimWorker) -> None:
    trace = requests()
    wrong_model = await run_bench(trace, BenchSettings(url=worker.url, model="nope"))
    assert wrong_model.error_kinds == {"http 404": len(trace)}
    late = [TraceRequest(60_000.0, 10, 1, (1,))]
    cut = await run_bench(late, BenchSettings(url=worker.url, model=MODEL, duration_s=0.2))
    assert cut.error_kinds == {"cut at --duration": 1}


def test_cli_reports_unreachable_endpoints_as_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, requests()[:3])
    out = tmp_path / "out.json"
    argv = ["--url", f"http://127.0.0.1:{port}", "--trace", str(trace), "--model", MODEL]
    assert main([*argv, "--label", "down", "--json", str(out), "--quiet"]) == 0
    assert "3 errors (connection: " in capsys.readouterr().err
    report = json.loads(out.read_text(encoding="utf-8"))
    entry = report["policies"]["down"]
    assert (entry["requests"], entry["errors"]) == (0, 3)
    assert entry["ttft_ms"]["p50"] is None
