from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvgate.bench.live import Api, BenchSettings, PromptFormat, RequestBuilder, run_bench
from kvgate.bench.report import summarize
from kvgate.bench.traces import TraceRequest, shared_prefix
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


@pytest.mark.parametrize(
    ("api", "prompt_format"),
    [("completions", "text"), ("completions", "tokens"), ("chat", "text")],
)
async def test_every_api_and_prompt_format_reaches_the_engine(
    worker: SimWorker, api: Api, prompt_format: PromptFormat
) -> None:
    trace = requests()
    settings = BenchSettings(url=worker.url, model=MODEL, api=api, prompt_format=prompt_format)
    record = await run_bench(trace, settings)
    m = summarize(record)
    assert (m.requests, m.errors) == (len(trace), 0)
    assert record.output_tokens == 4 * len(trace)
    assert m.hit_rate > 0.0
    isl = sum(r.input_length for r in trace)
    if api == "completions":
        # Text blocks tokenize to exactly the trace's lengths, as token ids do.
        assert record.prompt_tokens == isl
    else:
        # The chat template adds the same few tokens to every prompt.
        assert isl < record.prompt_tokens < isl + 20 * len(trace)


async def test_one_message_per_block_reaches_the_engine_and_shares_prefixes(
    worker: SimWorker,
) -> None:
    trace = requests()
    settings = BenchSettings(url=worker.url, model=MODEL, messages="per-block")
    record = await run_bench(trace, settings)
    m = summarize(record)
    assert (m.requests, m.errors) == (len(trace), 0)
    # Each group's system block is a message of its own, cached for the group's later prompts.
    assert m.hit_rate > 0.4
    isl = sum(r.input_length for r in trace)
    messages = sum(len(r.hash_ids) for r in trace)
    # The template wraps every message in a few tokens of its own.
    assert isl + 2 * messages < record.prompt_tokens < isl + 20 * messages


def test_request_bodies_are_what_clients_send() -> None:
    trace = requests()[0]
    chat = RequestBuilder(BenchSettings(url="u", model=MODEL)).body(trace)
    assert chat["messages"][0]["role"] == "user"
    assert chat["messages"][0]["content"].endswith(".\n")
    assert (chat["max_tokens"], chat["stream"], chat["ignore_eos"]) == (4, True, True)
    assert chat["stream_options"] == {"include_usage": True}
    text = RequestBuilder(BenchSettings(url="u", model=MODEL, api="completions")).body(trace)
    assert text["prompt"] == chat["messages"][0]["content"]
    with pytest.raises(ValueError, match="token-id prompts need the completions API"):
        BenchSettings(url="u", model=MODEL, prompt_format="tokens")
    turns = RequestBuilder(BenchSettings(url="u", model=MODEL, messages="per-block")).body(trace)
    blocks = turns["messages"]
    assert len(blocks) == len(trace.hash_ids) == 2
    assert {m["role"] for m in blocks} == {"user"}
    assert "".join(m["content"] for m in blocks) == chat["messages"][0]["content"]
    with pytest.raises(ValueError, match="messages per block need the chat API"):
        BenchSettings(url="u", model=MODEL, api="completions", messages="per-block")
