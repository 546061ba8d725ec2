"""KvRouter: cost function, selection, busy threshold, approximate mode, invariants."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.index.approx_index import ApproxPrefixIndex
from kvgate.index.prefix_index import PrefixIndex
from kvgate.scheduling.kv_router import (
    AllWorkersBusy,
    Candidate,
    KvRouter,
    NoCandidates,
    RoundRobin,
    RoutingRequest,
)
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.tokens.hashing import block_hashes
from tests.index.utils import BS, leading, ref_seq, stored, tokens_of

# A 70-token prompt: 4 full blocks + 6 tokens, so 5 blocks of load.
PROMPT = tokens_of(seed=1, blocks=5)[:70]
HASHES = block_hashes(PROMPT, BS)[1]
UNRELATED = tokens_of(seed=2, blocks=8)


def make_router(*, seed: int = 0, **config: object) -> KvRouter:
    return KvRouter(KvRouterConfig(block_size=BS, **config), seed=seed)  # type: ignore[arg-type]


def request(rid: str = "req", tokens: list[int] = PROMPT, **kw: object) -> RoutingRequest:
    return RoutingRequest(rid, len(tokens), block_hashes(tokens, BS)[1], **kw)  # type: ignore[arg-type]


def cands(*workers: str) -> list[Candidate]:
    return [Candidate(w) for w in workers]


def cache(router: KvRouter, worker: str, blocks: int, tokens: list[int] = PROMPT) -> None:
    """The worker's engine reports the first ``blocks`` full blocks of ``tokens`` as stored."""
    assert isinstance(router.index, PrefixIndex)
    router.index.apply_event(worker, stored(tokens, 0, blocks))


_private = itertools.count(1)


def busy_with(router: KvRouter, worker: str, rid: str, blocks: int, pending: int) -> None:
    """An in-flight request of ``blocks`` private blocks with ``pending`` prompt tokens left."""
    hashes = [next(_private) for _ in range(blocks)]
    router.active.add(rid, worker, hashes, pending, now=0.0)


# ---------------------------------------------------------------------------------------------
# Cost function, by hand


def hand_example() -> KvRouter:
    router = make_router()
    cache(router, "a", 3)
    cache(router, "b", 1)
    busy_with(router, "a", "a-load", blocks=10, pending=40)
    busy_with(router, "b", "b-load", blocks=2, pending=0)
    # d already runs a request sharing the first 2 blocks (prefill done): 3 active blocks.
    router.active.add("d-load", "d", [*HASHES[:2], 777], 0, now=0.0)
    return router


@pytest.mark.parametrize(
    ("weight", "expected", "winner"),
    [
        # a: overlap 3, 40 pending, 10 active: w*(70-48+40)/16 + (10 + 5 - 0)
        # b: overlap 1,  0 pending,  2 active: w*(70-16)/16    + (2 + 5 - 0)
        # c: nothing:                          w*70/16         + (0 + 5 - 0)
        # d: overlap 0, 0 pending, 3 active, first 2 request blocks active: w*70/16 + (3 + 5 - 2)
        pytest.param(1.0, {"a": 18.875, "b": 10.375, "c": 9.375, "d": 10.375}, "c", id="weight-1"),
        pytest.param(4.0, {"a": 30.5, "b": 20.5, "c": 22.5, "d": 23.5}, "b", id="weight-4"),
        pytest.param(0.0, {"a": 15.0, "b": 7.0, "c": 5.0, "d": 6.0}, "c", id="weight-0"),
        pytest.param(0.5, {"a": 16.9375, "b": 8.6875, "c": 7.1875, "d": 8.1875}, "c", id="w-half"),
    ],
)
def test_cost_function_hand_computed(
    weight: float, expected: dict[str, float], winner: str
) -> None:
    router = hand_example()
    sel = router.select(request(overlap_score_weight=weight), cands("a", "b", "c", "d"), now=0.0)
    assert sel.costs == expected
    assert sel.worker == winner
    assert sel.overlaps == {"a": 3, "b": 1}
    assert sel.overlap_blocks == {"a": 3, "b": 1}.get(winner, 0)
    assert sel.best_overlap == 3
    assert sel.busy == []


def test_configured_weight_is_the_default_and_request_overrides_it() -> None:
    router = hand_example()
    router.config = KvRouterConfig(block_size=BS, overlap_score_weight=4.0)
    assert router.select(request(), cands("a", "b", "c", "d"), now=0.0).worker == "b"
    sel = router.select(request(overlap_score_weight=1.0), cands("a", "b", "c", "d"), now=0.0)
    assert sel.worker == "c"


def test_partial_trailing_block_counts_as_load_not_overlap() -> None:
    router = make_router()
    cache(router, "a", 4)
    sel = router.select(request(tokens=PROMPT[:65]), cands("a", "b"), now=0.0)
    # a: (65 - 64)/16 + 5 = 5.0625; b: 65/16 + 5 = 9.0625
    assert sel.costs == {"a": 5.0625, "b": 9.0625}
    assert sel.overlap_blocks == 4


def test_booking_adds_uncached_prefill_and_blocks() -> None:
    router = make_router()
    cache(router, "a", 3)
    sel = router.route(request("r1"), cands("a"), now=0.0)
    assert sel.overlap_blocks == 3
    assert router.active.prefill_tokens("a") == 70 - 48
    assert router.active.active_blocks("a") == 4  # full blocks only are hashed
    assert router.mark_prefill_complete("r1") is True
    assert router.active.prefill_tokens("a") == 0
    assert router.free("r1") is True
    assert router.active.active_blocks("a") == 0
    assert router.free("r1") is False


def test_empty_prompt() -> None:
    router = make_router()
    sel = router.route(request("r", tokens=[]), cands("a"), now=0.0)
    assert sel.costs == {"a": 0.0}
    assert sel.overlap_blocks == 0


# ---------------------------------------------------------------------------------------------
# Which worker wins


def test_overlap_wins_when_load_is_equal() -> None:
    router = make_router()
    cache(router, "b", 2)
    for order in (("a", "b", "c"), ("c", "b", "a")):
        assert router.select(request(), cands(*order), now=0.0).worker == "b"


def test_load_wins_when_overlap_is_equal() -> None:
    router = make_router()
    for w in "abc":
        cache(router, w, 2)
    busy_with(router, "a", "la", blocks=4, pending=0)
    busy_with(router, "c", "lc", blocks=1, pending=100)
    assert router.select(request(), cands("a", "b", "c"), now=0.0).worker == "b"


def test_pending_prefill_counts_against_a_worker() -> None:
    router = make_router()
    busy_with(router, "a", "la", blocks=0, pending=16)
    assert router.select(request(), cands("a", "b"), now=0.0).worker == "b"


def test_load_can_outweigh_overlap_and_weight_shifts_the_balance() -> None:
    router = make_router()
    cache(router, "a", 4)
    busy_with(router, "a", "la", blocks=5, pending=0)
    # a: w*6/16 + 10; b: w*70/16 + 5 → b below w = 1.25, a above.
    assert router.select(request(overlap_score_weight=1.0), cands("a", "b"), now=0.0).worker == "b"
    assert router.select(request(overlap_score_weight=2.0), cands("a", "b"), now=0.0).worker == "a"


def test_routed_requests_spread_a_burst() -> None:
    """Booked load steers identical requests away from a worker that got several already."""
    router = make_router()
    picks = [router.route(request(f"r{i}"), cands("a", "b", "c"), now=0.0).worker for i in range(6)]
    assert set(picks) == {"a", "b", "c"}


# ---------------------------------------------------------------------------------------------
# Temperature 0: ties


def test_tie_goes_to_smallest_index() -> None:
    router = make_router()
    cache(router, "a", 6, tokens=UNRELATED)
    cache(router, "b", 2, tokens=UNRELATED)
    for seed in range(20):
        router._rng.seed(seed)
        assert router.select(request(), cands("a", "b", "c"), now=0.0).worker == "c"
        assert router.select(request(), cands("a", "b"), now=0.0).worker == "b"


@pytest.mark.parametrize(
    ("weight", "pending_b"),
    [(0.1, 16), (0.1, 48), (0.1, 96), (0.3, 16), (0.7, 0), (2.3, 32)],
    ids=str,
)
def test_equal_costs_by_different_terms_tie_exactly(weight: float, pending_b: int) -> None:
    """a: 1 block cached but 16 more tokens queued than b; the same cost, so the smaller index
    (a's) must win — which needs the two costs to compare equal, not one ulp apart."""
    router = make_router(overlap_score_weight=weight)
    cache(router, "a", 1)
    busy_with(router, "a", "la", blocks=0, pending=pending_b + 16)
    busy_with(router, "b", "lb", blocks=0, pending=pending_b)
    cache(router, "b", 3, tokens=UNRELATED)  # b's index is larger
    sel = router.select(request(), cands("a", "b"), now=0.0)
    assert sel.costs["a"] == sel.costs["b"]
    assert sel.worker == "a"


def test_exact_tie_is_random_but_seeded() -> None:
    def picks(seed: int, order: tuple[str, ...]) -> list[str]:
        router = make_router(seed=seed)
        return [router.select(request(), cands(*order), now=0.0).worker for _ in range(30)]

    first = picks(7, ("a", "b", "c"))
    assert picks(7, ("a", "b", "c")) == first  # deterministic for a seed
    assert picks(7, ("c", "a", "b")) == first  # and independent of candidate order
    assert set(first) == {"a", "b", "c"}
    assert picks(8, ("a", "b", "c")) != first


# ---------------------------------------------------------------------------------------------
# Temperature > 0: sampling


def chi_square(counts: Counter[str], probs: dict[str, float], n: int) -> float:
    return sum((counts[w] - n * p) ** 2 / (n * p) for w, p in probs.items())


# 99.9th percentile of chi-square with 2 degrees of freedom.
CHI2_2DOF_999 = 13.82


@pytest.mark.parametrize(
    ("temperature", "via_request"),
    [(0.5, False), (1.0, False), (0.25, True)],
    ids=["T0.5-config", "T1-config", "T0.25-request"],
)
def test_sampling_follows_softmax_of_normalised_costs(
    temperature: float, via_request: bool
) -> None:
    router = make_router(seed=3, temperature=0.0 if via_request else temperature)
    prompt = tokens_of(seed=5, blocks=4)  # 64 tokens
    cache(router, "b", 2, tokens=prompt)
    cache(router, "c", 4, tokens=prompt)
    req = request(tokens=prompt, temperature=temperature if via_request else None)
    # Costs 8, 6, 4 → normalised by (max - min) = 4 to 1, 0.5, 0.
    sel = router.select(req, cands("a", "b", "c"), now=0.0)
    assert sel.costs == {"a": 8.0, "b": 6.0, "c": 4.0}
    weights = {w: math.exp(-x / temperature) for w, x in {"a": 1.0, "b": 0.5, "c": 0.0}.items()}
    probs = {w: v / sum(weights.values()) for w, v in weights.items()}
    n = 3000
    counts = Counter(router.select(req, cands("a", "b", "c"), now=0.0).worker for _ in range(n))
    assert chi_square(counts, probs, n) < CHI2_2DOF_999, (counts, probs)


def test_sampling_is_uniform_when_all_costs_equal() -> None:
    router = make_router(seed=4, temperature=0.8)
    n = 3000
    counts = Counter(
        router.select(request(), cands("a", "b", "c"), now=0.0).worker for _ in range(n)
    )
    assert chi_square(counts, dict.fromkeys("abc", 1 / 3), n) < CHI2_2DOF_999, counts


def test_sampling_is_seeded_and_order_independent() -> None:
    def picks(order: str) -> list[str]:
        router = make_router(seed=11, temperature=1.0)
        cache(router, "b", 2)
        return [router.select(request(), cands(*order), now=0.0).worker for _ in range(50)]

    assert picks("abc") == picks("abc") == picks("cba")


def test_request_temperature_zero_overrides_config() -> None:
    router = make_router(seed=1, temperature=5.0)
    cache(router, "b", 4)
    for _ in range(50):
        assert router.select(request(temperature=0.0), cands("a", "b"), now=0.0).worker == "b"


# ---------------------------------------------------------------------------------------------
# Busy threshold and empty pools


def test_busy_workers_are_skipped() -> None:
    router = make_router(busy_threshold=0.5)
    cache(router, "a", 4)  # a would win on overlap...
    busy_with(router, "a", "la", blocks=6, pending=0)  # ...but 6/10 > 0.5
    busy_with(router, "b", "lb", blocks=5, pending=0)  # 5/10 = 0.5 is not above
    busy_with(router, "c", "lc", blocks=100, pending=0)  # capacity unknown: never busy
    busy_with(router, "d", "ld", blocks=100, pending=0)  # capacity 0 = unknown
    candidates = [Candidate("a", 10), Candidate("b", 10), Candidate("c", None), Candidate("d", 0)]
    sel = router.select(request(), candidates, now=0.0)
    assert sel.busy == ["a"]
    assert set(sel.costs) == {"b", "c", "d"}
    assert sel.worker == "b"


def test_without_threshold_nobody_is_busy() -> None:
    router = make_router()
    busy_with(router, "a", "la", blocks=100, pending=0)
    sel = router.select(request(), [Candidate("a", 10)], now=0.0)
    assert (sel.worker, sel.busy) == ("a", [])


def test_all_busy_is_refused() -> None:
    router = make_router(busy_threshold=0.5)
    busy_with(router, "a", "la", blocks=6, pending=0)
    busy_with(router, "b", "lb", blocks=60, pending=0)
    with pytest.raises(AllWorkersBusy, match="2 candidate"):
        router.select(request(), [Candidate("a", 10), Candidate("b", 100)], now=0.0)
    # Freeing load makes them eligible again.
    router.free("la")
    assert (
        router.select(request(), [Candidate("a", 10), Candidate("b", 100)], now=0.0).worker == "a"
    )


def test_duplicate_candidates_are_harmless() -> None:
    router = make_router(busy_threshold=0.5)
    busy_with(router, "a", "la", blocks=6, pending=0)
    candidates = [Candidate("a", 10), Candidate("a", 10), Candidate("b", 10), Candidate("b", 10)]
    sel = router.select(request(), candidates, now=0.0)
    assert (sel.worker, sel.busy, list(sel.costs)) == ("b", ["a"], ["b"])


def test_no_candidates() -> None:
    with pytest.raises(NoCandidates):
        make_router().select(request(), [], now=0.0)
    with pytest.raises(NoCandidates):
        RoundRobin().pick([])


def test_round_robin_takes_turns() -> None:
    rr = RoundRobin()
    assert [rr.pick(cands("a", "b", "c")) for _ in range(7)] == list("abcabca")
    assert [rr.pick(cands("x")) for _ in range(2)] == ["x", "x"]


# ---------------------------------------------------------------------------------------------
# Approximate mode and worker removal


def test_approximate_mode_learns_from_its_own_picks() -> None:
    router = make_router(use_kv_events=False, seed=5)
    assert isinstance(router.index, ApproxPrefixIndex)
    first = router.route(request("r1"), cands("a", "b", "c"), now=0.0)
    assert first.overlap_blocks == 0
    router.free("r1")
    for i in range(5):
        again = router.route(request(f"again{i}"), cands("a", "b", "c"), now=1.0 + i)
        assert again.worker == first.worker
        assert again.overlap_blocks == len(HASHES)
        router.free(f"again{i}")
    other = router.route(request("o", tokens=UNRELATED), cands("a", "b", "c"), now=10.0)
    assert other.overlap_blocks == 0
    assert other.worker != first.worker  # tie among the others: smaller (empty) index first


def test_approximate_mode_forgets_after_ttl() -> None:
    router = make_router(use_kv_events=False)
    first = router.route(request("r1"), cands("a", "b"), now=0.0)
    router.free("r1")
    assert router.select(request(), cands("a", "b"), now=119.0).overlaps == {first.worker: 4}
    assert router.select(request(), cands("a", "b"), now=121.0).overlaps == {}


def test_remove_worker_drops_index_and_load() -> None:
    router = make_router()
    cache(router, "a", 4)
    router.route(request("r1"), cands("a"), now=0.0)
    router.remove_worker("a")
    assert "a" not in router.index
    assert router.active.prefill_tokens("a") == 0
    assert router.active.active_blocks("a") == 0
    assert router.active.in_flight("a") == 0
    assert router.free("r1") is False
    sel = router.select(request(), cands("a", "b"), now=0.0)
    assert sel.overlaps == {}
    assert sel.costs["a"] == sel.costs["b"]


def test_remove_worker_in_approximate_mode() -> None:
    router = make_router(use_kv_events=False)
    router.route(request("r1"), cands("a"), now=0.0)
    router.remove_worker("a")
    assert router.select(request(), cands("a", "b"), now=1.0).overlaps == {}


def test_stale_bookings_expire() -> None:
    router = make_router()
    router.route(request("lost"), cands("a"), now=0.0)
    router.route(request("next"), cands("b"), now=301.0)
    assert router.active.in_flight("a") == 0
    assert router.free("lost") is False


# ---------------------------------------------------------------------------------------------
# Invariants

DOCS = [tokens_of(seed=20 + i, blocks=6) for i in range(3)]
DOC_SEQS = [ref_seq(d) for d in DOCS]
WORKERS = ["w0", "w1", "w2", "w3"]


@dataclass
class Live:
    worker: str
    hashes: list[int]
    prefill: int
    prefill_done: bool = False


@settings(max_examples=40, deadline=None)
@given(
    use_kv_events=st.booleans(),
    threshold=st.none() | st.sampled_from([0.3, 0.5, 1.0]),
    temperature=st.sampled_from([0.0, 0.0, 0.5, 2.0]),
    weight=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    capacity=st.lists(st.none() | st.integers(0, 20), min_size=4, max_size=4),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["route", "route", "store", "prefill", "free"]),
            st.integers(0, 2),  # doc
            st.integers(0, 96),  # prompt length / blocks to store
            st.lists(st.sampled_from(WORKERS), max_size=4, unique=True),
            st.integers(0, 9),  # request id
        ),
        min_size=5,
        max_size=30,
    ),
    seed=st.integers(0, 3),
)
def test_selection_invariants(
    *,
    use_kv_events: bool,
    threshold: float | None,
    temperature: float,
    weight: float,
    capacity: list[int | None],
    ops: list[tuple[str, int, int, list[str], int]],
    seed: int,
) -> None:
    """Against a model kept by the test alone: what each worker caches (events, or the router's
    own picks without them), each live request's blocks and pending prefill."""
    router = make_router(
        seed=seed,
        use_kv_events=use_kv_events,
        busy_threshold=threshold,
        temperature=temperature,
        overlap_score_weight=weight,
    )
    cap = dict(zip(WORKERS, capacity, strict=True))
    cached: dict[str, set[int]] = {w: set() for w in WORKERS}
    live: dict[str, Live] = {}
    now = 0.0
    for kind, doc, n, workers, rid_n in ops:
        now += 0.5
        rid = f"r{rid_n}"
        if kind == "store" and use_kv_events and workers:
            cache(router, workers[0], n % 7, tokens=DOCS[doc])
            cached[workers[0]] |= set(DOC_SEQS[doc][: n % 7])
        elif kind == "route":
            tokens = DOCS[doc][:n]
            hashes = DOC_SEQS[doc][: n // BS]
            req = request(rid, tokens=tokens)
            mine = {w: [r for r in live.values() if r.worker == w] for w in WORKERS}
            active = {w: {h for r in mine[w] for h in r.hashes} for w in WORKERS}
            pending = {w: sum(r.prefill for r in mine[w] if not r.prefill_done) for w in WORKERS}
            busy = [
                w
                for w in workers
                if threshold is not None and cap[w] and len(active[w]) / cap[w] > threshold  # type: ignore[operator]
            ]
            candidates = [Candidate(w, cap[w]) for w in workers]
            if not workers:
                with pytest.raises(NoCandidates):
                    router.route(req, candidates, now)
                continue
            if len(busy) == len(workers):
                with pytest.raises(AllWorkersBusy):
                    router.route(req, candidates, now)
                continue
            sel = router.route(req, candidates, now)
            assert sel.worker in workers
            assert sel.worker not in busy
            assert sel.busy == busy
            overlaps = {w: leading(cached[w], hashes) for w in WORKERS}
            assert sel.overlaps == {w: o for w, o in overlaps.items() if o}
            assert sel.overlap_blocks == overlaps[sel.worker] <= len(hashes)
            expected = {
                w: weight * (len(tokens) - overlaps[w] * BS + pending[w]) / BS
                + len(active[w])
                + math.ceil(len(tokens) / BS)
                - leading(active[w], hashes)
                for w in workers
                if w not in busy
            }
            assert sel.costs == pytest.approx(expected)
            if temperature == 0:
                best = min(expected.values())
                tied = [w for w, c in expected.items() if math.isclose(c, best)]
                smallest = min(len(cached[w]) for w in tied)
                assert sel.worker in [w for w in tied if len(cached[w]) == smallest]
            live.pop(rid, None)
            live[rid] = Live(sel.worker, hashes, len(tokens) - overlaps[sel.worker] * BS)
            if not use_kv_events:
                cached[sel.worker] |= set(hashes)
        elif kind == "prefill":
            assert router.mark_prefill_complete(rid) == (rid in live and not live[rid].prefill_done)
            if rid in live:
                live[rid].prefill_done = True
        elif kind == "free":
            assert router.free(rid) == (rid in live)
            live.pop(rid, None)
    for rid in list(live):
        assert router.free(rid)
    for w in WORKERS:
        assert router.active.prefill_tokens(w) == 0
        assert router.active.active_blocks(w) == 0
        assert router.active.in_flight(w) == 0
    assert router.active.blocks.num_blocks == 0
    assert len(router.active) == 0
