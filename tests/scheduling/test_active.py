"""ActiveSequences: the load the router books for its own in-flight requests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.scheduling.active import ActiveSequences

BS = 16
PREFIX = [1, 2, 3]  # opaque sequence hashes
A = [*PREFIX, 10, 11]
B = [*PREFIX, 20]


def load(active: ActiveSequences, worker: str) -> tuple[int, int, int]:
    """(pending prefill tokens, distinct active blocks, requests in flight)."""
    return active.prefill_tokens(worker), active.active_blocks(worker), active.in_flight(worker)


def test_add_books_prefill_blocks_and_request() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, prefill_tokens=70, now=0.0)
    assert load(active, "w") == (70, 5, 1)
    assert load(active, "other") == (0, 0, 0)
    assert "r1" in active
    assert len(active) == 1
    req = active.get("r1")
    assert req is not None
    assert (req.worker, list(req.hashes), req.prefill_tokens, req.prefill_done) == (
        "w",
        A,
        70,
        False,
    )


def test_prefill_complete_releases_prefill_only_once() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 70, now=0.0)
    active.add("r2", "w", B, 30, now=0.0)
    assert active.mark_prefill_complete("r1") is True
    assert load(active, "w") == (30, 6, 2)
    assert active.mark_prefill_complete("r1") is False
    assert active.mark_prefill_complete("unknown") is False
    assert load(active, "w") == (30, 6, 2)


def test_free_releases_everything() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 70, now=0.0)
    assert active.free("r1") is True
    assert load(active, "w") == (0, 0, 0)
    assert "r1" not in active
    assert active.blocks.find_matches(A) == {}


def test_free_after_prefill_complete_does_not_subtract_twice() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 70, now=0.0)
    active.add("r2", "w", B, 30, now=0.0)
    active.mark_prefill_complete("r1")
    active.free("r1")
    assert load(active, "w") == (30, 4, 1)


def test_double_free_is_harmless() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 70, now=0.0)
    active.add("r2", "w", B, 30, now=0.0)
    assert active.free("r1") is True
    assert active.free("r1") is False
    assert active.free("never-booked") is False
    assert load(active, "w") == (30, 4, 1)


def test_shared_prefix_blocks_count_once_and_survive_one_free() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 80, now=0.0)
    active.add("r2", "w", B, 64, now=0.0)
    # 3 shared + 2 of A + 1 of B, not 5 + 4: the space they take. Decoding reads 5 + 4.
    assert active.active_blocks("w") == 6
    assert active.context_blocks("w") == 9
    assert active.blocks.find_matches(B) == {"w": 4}
    active.free("r1")
    assert (active.active_blocks("w"), active.context_blocks("w")) == (4, 4)
    assert active.blocks.find_matches(A) == {"w": 3}
    assert active.blocks.find_matches(B) == {"w": 4}
    active.free("r2")
    assert (active.active_blocks("w"), active.context_blocks("w")) == (0, 0)
    assert active.blocks.num_blocks == 0


def test_same_blocks_on_two_workers_are_counted_per_worker() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w1", A, 80, now=0.0)
    active.add("r2", "w2", A, 80, now=0.0)
    assert active.active_blocks("w1") == active.active_blocks("w2") == 5
    active.free("r1")
    assert load(active, "w1") == (0, 0, 0)
    assert load(active, "w2") == (80, 5, 1)
    assert active.blocks.find_matches(A) == {"w2": 5}


def test_identical_requests_ref_count() -> None:
    active = ActiveSequences(BS)
    for i in range(3):
        active.add(f"r{i}", "w", A, 80, now=0.0)
    assert load(active, "w") == (240, 5, 3)
    active.free("r0")
    active.free("r1")
    assert load(active, "w") == (80, 5, 1)


def test_booking_same_id_twice_replaces_first_booking() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w1", A, 80, now=0.0)
    active.add("r1", "w2", B, 64, now=1.0)
    assert len(active) == 1
    assert load(active, "w1") == (0, 0, 0)
    assert load(active, "w2") == (64, 4, 1)
    active.free("r1")
    assert load(active, "w2") == (0, 0, 0)


def test_rebooking_after_prefill_complete() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 80, now=0.0)
    active.mark_prefill_complete("r1")
    active.add("r1", "w", A, 80, now=1.0)
    assert load(active, "w") == (80, 5, 1)


def test_remove_worker_drops_its_requests_only() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w1", A, 80, now=0.0)
    active.add("r2", "w2", B, 64, now=0.0)
    active.add("r3", "w1", B, 64, now=0.0)
    active.remove_worker("w1")
    assert load(active, "w1") == (0, 0, 0)
    assert (active.context_blocks("w1"), active.context_blocks("w2")) == (0, 4)
    assert load(active, "w2") == (64, 4, 1)
    assert len(active) == 1
    assert active.free("r1") is False  # its response finishing later is harmless
    assert active.mark_prefill_complete("r3") is False
    assert load(active, "w2") == (64, 4, 1)
    assert active.blocks.find_matches(B) == {"w2": 4}
    active.remove_worker("never-seen")


def test_worker_rejoining_after_removal_starts_clean() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w1", A, 80, now=0.0)
    active.remove_worker("w1")
    active.add("r2", "w3", B, 64, now=1.0)  # reuses w1's slot
    active.add("r3", "w1", [99], 16, now=1.0)
    assert load(active, "w1") == (16, 1, 1)
    assert active.blocks.find_matches(A) == {"w3": 3}  # the shared prefix, via B only
    assert active.blocks.find_matches(B) == {"w3": 4}


def test_requests_expire_after_300_seconds() -> None:
    active = ActiveSequences(BS)
    assert active.expiry_s == 300.0
    active.add("old", "w", A, 80, now=0.0)
    active.add("new", "w", B, 64, now=100.0)
    assert active.expire(now=299.0) == 0
    assert "old" in active
    assert active.expire(now=301.0) == 1
    assert "old" not in active
    assert "new" in active
    assert load(active, "w") == (64, 4, 1)
    assert active.expired == 1
    assert active.expire(now=401.0) == 1
    assert load(active, "w") == (0, 0, 0)
    assert active.expired == 2


def test_booking_sweeps_expired_requests() -> None:
    active = ActiveSequences(BS, expiry_s=10.0)
    active.add("old", "w", A, 80, now=0.0)
    active.add("next", "w", B, 64, now=11.0)
    assert "old" not in active
    assert load(active, "w") == (64, 4, 1)


def test_rebooking_restarts_expiry_clock() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 80, now=0.0)
    active.add("r2", "w", B, 64, now=50.0)
    active.add("r1", "w", A, 80, now=200.0)  # retried: booked again, now last in line
    assert active.expire(now=351.0) == 1
    assert "r1" in active
    assert "r2" not in active
    assert active.expire(now=501.0) == 1
    assert len(active) == 0


def test_expired_request_freed_late_is_harmless() -> None:
    active = ActiveSequences(BS)
    active.add("r1", "w", A, 80, now=0.0)
    active.expire(now=400.0)
    assert active.free("r1") is False
    assert active.mark_prefill_complete("r1") is False
    assert load(active, "w") == (0, 0, 0)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "prefill", "free", "free", "remove_worker"]),
            st.integers(0, 4),  # request id
            st.sampled_from(["w0", "w1", "w2"]),
            # hashes: shared prefixes as real requests have, or any small-vocabulary list
            st.integers(0, 5).map(lambda k: list(range(1, k + 1)))
            | st.lists(st.integers(1, 5), max_size=5),
            st.integers(0, 500),  # prefill tokens
        ),
        min_size=8,
        max_size=40,
    )
)
def test_load_matches_a_model(ops: list[tuple[str, int, str, list[int], int]]) -> None:
    """Against a model recomputing each worker's load from its live requests; once everything
    is freed, every worker's load is zero."""
    active = ActiveSequences(BS)
    live: dict[str, tuple[str, list[int], int, bool]] = {}
    for kind, n, worker, hashes, tokens in ops:
        rid = f"r{n}"
        if kind == "add":
            active.add(rid, worker, hashes, tokens, now=0.0)
            live[rid] = (worker, hashes, tokens, False)
        elif kind == "prefill":
            assert active.mark_prefill_complete(rid) == (rid in live and not live[rid][3])
            if rid in live:
                w, h, t, _ = live[rid]
                live[rid] = (w, h, t, True)
        elif kind == "free":
            assert active.free(rid) == (rid in live)
            live.pop(rid, None)
        else:
            active.remove_worker(worker)
            live = {r: v for r, v in live.items() if v[0] != worker}
        for w in ("w0", "w1", "w2"):
            mine = [v for v in live.values() if v[0] == w]
            assert load(active, w) == (
                sum(t for _, _, t, done in mine if not done),
                len({h for _, hs, _, _ in mine for h in hs}),
                len(mine),
            )
            assert active.context_blocks(w) == sum(len(hs) for _, hs, _, _ in mine)
    for rid in list(live):
        assert active.free(rid)
    for w in ("w0", "w1", "w2"):
        assert load(active, w) == (0, 0, 0)
        assert active.context_blocks(w) == 0
    assert active.blocks.num_blocks == 0
    assert len(active) == 0
