from __future__ import annotations

import dataclasses
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from kvgate.bench.fleet import WorkerSpec, parse_fleet
from kvgate.bench.traces import (
    MOONCAKE_BLOCK_TOKENS,
    TraceRequest,
    ideal_hit_rate,
    load_mooncake,
    write_mooncake,
)
from kvgate.bench.workloads import FAMILIES, RagParams, generate, parse_spec

BLOCKS = 32_000
SMALL = {
    "agentic": "agentic:sessions_per_worker=3",
    "rag": "rag:requests_per_worker=60",
    "longdoc": "longdoc:bursts_per_worker=4",
    "hetero": "hetero:sessions_per_worker=10",
}


def test_every_family_has_a_small_spec_here() -> None:
    assert set(SMALL) == set(FAMILIES)


def is_prefix(a: TraceRequest, b: TraceRequest) -> bool:
    """Whether ``a``'s prompt is a prefix of ``b``'s (same ids; ``a``'s last block may be part
    of ``b``'s)."""
    return a.input_length <= b.input_length and b.hash_ids[: len(a.hash_ids)] == a.hash_ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_are_valid_mooncake_traces_and_seeded(family: str, tmp_path: Path) -> None:
    w = generate(SMALL[family], workers=2, seed=3, default_blocks=BLOCKS)
    assert w.requests == generate(SMALL[family], workers=2, seed=3, default_blocks=BLOCKS).requests
    assert w.requests != generate(SMALL[family], workers=2, seed=4, default_blocks=BLOCKS).requests
    times = [r.timestamp_ms for r in w.requests]
    assert times == sorted(times)
    for r in w.requests:
        assert r.input_length >= 1 and r.output_length >= 1
        assert len(r.hash_ids) == -(-r.input_length // MOONCAKE_BLOCK_TOKENS)
    path = tmp_path / "w.jsonl"
    write_mooncake(path, w.requests)
    assert load_mooncake(path) == w.requests
    # Content is shared (what a router is for) and far from all of it.
    assert 0.3 < ideal_hit_rate(w.requests) < 0.99


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_speeds_up_the_arrival_process_and_the_fleet_size_scales_the_demand(
    family: str,
) -> None:
    one = generate(SMALL[family], workers=2, load=1.0, seed=1, default_blocks=BLOCKS).requests
    fast = generate(SMALL[family], workers=2, load=2.0, seed=1, default_blocks=BLOCKS).requests
    # The same requests, only sooner: sessions, bursts or requests start at half the times,
    # what happens inside a session or burst keeps its pace.
    when = {(r.hash_ids, r.input_length, r.output_length): r.timestamp_ms for r in one}
    sooner = {(r.hash_ids, r.input_length, r.output_length): r.timestamp_ms for r in fast}
    assert len(when) == len(one) and sooner.keys() == when.keys()
    assert all(sooner[k] <= when[k] + 1e-3 for k in when)
    assert sum(sooner[k] < when[k] - 1e-3 for k in when) > 0.8 * len(when)
    if family == "rag":
        assert [r.timestamp_ms / 2 for r in one] == pytest.approx(
            [r.timestamp_ms for r in fast], abs=1e-3
        )
    bigger = generate(SMALL[family], workers=4, load=1.0, seed=1, default_blocks=BLOCKS).requests
    assert len(bigger) > 1.3 * len(one)  # twice the sessions, bursts or requests


def test_agentic_sessions_resend_their_history_behind_a_shared_system_prompt() -> None:
    requests = generate(SMALL["agentic"], workers=2, seed=2, default_blocks=BLOCKS).requests
    # A session's turns: each prompt extends the previous one.
    by_session: dict[tuple[int, ...], list[TraceRequest]] = defaultdict(list)
    system = 20
    for r in requests:
        by_session[r.hash_ids[: system + 1]].append(r)
    assert len(by_session) == 6
    for turns in by_session.values():
        assert len(turns) >= 1
        for a, b in pairwise(turns):
            assert is_prefix(a, b) and b.input_length > a.input_length
    # Sessions of one agent kind share the system prompt, and only that.
    firsts = {r.hash_ids[:system] for r in requests}
    assert 1 <= len(firsts) <= 4


def test_rag_chunk_popularity_matches_the_skew_it_cites() -> None:
    p = RagParams()
    ranks = 1.0 / np.arange(1, p.chunks_per_tenant + 1) ** p.chunk_skew
    top = ranks[: int(0.03 * p.chunks_per_tenant)].sum() / ranks.sum()
    assert top == pytest.approx(0.6, abs=0.03)


def test_rag_prompts_share_tenant_system_prompts_and_retrieved_chunks() -> None:
    requests = generate("rag:requests_per_worker=50", workers=8, seed=1, default_blocks=BLOCKS)
    prefixes: dict[tuple[int, ...], int] = defaultdict(int)
    for r in requests.requests:
        prefixes[r.hash_ids[:-1]] += 1  # everything but the question
    assert max(prefixes.values()) > 5  # a popular topic retrieves the same chunks
    distinct = {h for r in requests.requests for h in r.hash_ids}
    # Far beyond one worker's cache (32,000 blocks of 16 tokens).
    assert len(distinct) * MOONCAKE_BLOCK_TOKENS > 2 * BLOCKS * 16


def test_longdoc_bursts_ask_several_questions_about_one_document() -> None:
    requests = generate(SMALL["longdoc"], workers=2, seed=1, default_blocks=BLOCKS).requests
    docs = {r.hash_ids[:-1] for r in requests}
    assert len(requests) > 2 * len(docs)
    assert all(8_000 <= r.input_length <= 101_000 for r in requests)


def test_hetero_comes_with_a_fleet_of_two_kinds() -> None:
    w = generate(SMALL["hetero"], workers=5, seed=1, default_blocks=1000)
    assert w.fleet == (WorkerSpec(),) * 3 + (WorkerSpec(0.4, 500),) * 2
    assert generate(SMALL["rag"], workers=5, default_blocks=1000).fleet is None


def test_specs_override_parameters_and_name_their_mistakes() -> None:
    family, params = parse_spec("rag:top_k=2,question-tokens=10-20,rate_per_worker=1.5")
    assert family.name == "rag"
    assert params == dataclasses.replace(
        RagParams(), top_k=2, question_tokens=(10, 20), rate_per_worker=1.5
    )
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        parse_spec("nope")
    with pytest.raises(ValueError, match=r"bad parameter 'colour=red' \(known: requests_per"):
        parse_spec("rag:colour=red")
    with pytest.raises(ValueError, match="top_k='x' is not a int"):
        parse_spec("rag:top_k=x")
    with pytest.raises(ValueError, match="load must be > 0"):
        generate("rag", workers=2, load=0.0, default_blocks=BLOCKS)


def test_fleet_specs() -> None:
    assert parse_fleet("2x1.0, 1x0.5:100") == (WorkerSpec(), WorkerSpec(), WorkerSpec(0.5, 100))
    for bad in ("", "2", "x1.0", "0x1.0", "2x0", "2xfast", "2x1.0:0"):
        with pytest.raises(ValueError):
            parse_fleet(bad)
