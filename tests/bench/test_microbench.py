"""`kvgate microbench`'s decisions: both policies really decide on the fixture (no timing is
asserted), and every size it times is reported for both."""

from __future__ import annotations

import random

from kvgate.bench import microbench
from kvgate.bench.microbench import (
    BLOCK_SIZES,
    PROMPT_TOKENS,
    VOCAB,
    WORKER_COUNTS,
    bench_decisions,
)
from kvgate.scheduling.kv_router import Selection


def test_both_policies_pick_the_worker_caching_the_whole_prompt() -> None:
    # The fixture caches the prompt on the first workers to depths 1, 3/4, 1/2, 1/4 and books the
    # same load everywhere: the whole prefix wins under either policy.
    rng = random.Random(5)
    tokens = [rng.randrange(VOCAB) for _ in range(2048)]
    fixture = microbench._build(tokens, 16, 8, 5_000, rng=rng, with_reference=False)
    cost_fn = microbench._decision(fixture.router, fixture.candidates, tokens, 16)
    kvgate = microbench._policy_decision(fixture.router, fixture.endpoints, tokens, 16)
    selection = cost_fn()
    assert isinstance(selection, Selection)
    assert selection.worker == fixture.candidates[0].worker
    assert [ep.address for ep in kvgate()] == [fixture.candidates[0].worker]
    # Deciding books nothing: every repeat times the same decision.
    assert len(fixture.router.active) == 2 * 8
    assert [ep.address for ep in kvgate()] == [fixture.candidates[0].worker]


def test_every_size_is_timed_for_both_policies() -> None:
    lines: list[str] = []
    timed = bench_decisions(2_000, 0.0005, with_reference=False, log=lines.append)
    for table in (timed.cost_fn, timed.kvgate, timed.kvgate_extra):
        assert {
            (tokens, block, workers)
            for tokens, by_block in table.items()
            for block, by_workers in by_block.items()
            for workers in by_workers
        } == {
            (str(t), str(b), str(w))
            for t in PROMPT_TOKENS
            for b in BLOCK_SIZES
            for w in WORKER_COUNTS
        }
    assert all(
        timed.kvgate[t][b][w] > 0
        for t in timed.kvgate
        for b in timed.kvgate[t]
        for w in timed.kvgate[t][b]
    )
    assert len(lines) == len(PROMPT_TOKENS) * len(BLOCK_SIZES) * len(WORKER_COUNTS)
    assert all("cost-fn" in line and "kvgate" in line for line in lines)
