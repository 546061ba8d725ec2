"""Sequence tracking of KV event streams, without sockets."""

from __future__ import annotations

import pytest

from kvgate.events.sequence import SequenceTracker, SeqVerdict, is_unbroken, replay_shortfall

V = SeqVerdict


def verdicts(tracker: SequenceTracker, seqs: list[int], rank: int | None = None) -> list[str]:
    return [tracker.observe(rank, seq)[0].value for seq in seqs]


@pytest.mark.parametrize(
    ("seqs", "expected"),
    [
        ([0, 1, 2], ["first", "next", "next"]),
        ([5, 6], ["joined", "next"]),
        ([0, 1, 4, 5], ["first", "next", "gap", "next"]),
        ([0, 1, 2, 0, 1], ["first", "next", "next", "restarted", "next"]),
        # A new engine's first messages may be lost while the connection is set up.
        ([7, 8, 3, 4], ["joined", "next", "restarted", "next"]),
        ([3, 3], ["joined", "restarted"]),
    ],
    ids=["in-order", "joined-under-way", "gap", "restart-to-zero", "restart-mid-way", "repeat"],
)
def test_verdicts(seqs: list[int], expected: list[str]) -> None:
    assert verdicts(SequenceTracker(), seqs) == expected


def test_a_gap_names_the_last_batch_before_it_and_resumes_after_it() -> None:
    tracker = SequenceTracker()
    tracker.observe(None, 0)
    tracker.observe(None, 1)
    assert tracker.observe(None, 5) == (V.GAP, 1)  # batches 2..4 are missing
    assert tracker.observe(None, 6) == (V.NEXT, 5)


def test_live_batches_a_start_up_replay_covered_are_skipped_not_taken_for_a_restart() -> None:
    tracker = SequenceTracker()
    assert not tracker.started
    tracker.replayed(0, 10)
    assert tracker.started
    assert verdicts(tracker, [9, 10, 11, 12], rank=0) == [
        "already_applied",
        "already_applied",
        "next",
        "next",
    ]
    # Past the replay, a lower seq is a restart again.
    assert tracker.observe(0, 3)[0] is V.RESTARTED


def test_a_gap_right_after_a_start_up_replay_is_still_a_gap() -> None:
    tracker = SequenceTracker()
    tracker.replayed(None, 10)
    assert tracker.observe(None, 14) == (V.GAP, 10)
    assert tracker.observe(None, 9)[0] is V.RESTARTED


def test_data_parallel_ranks_are_separate_streams() -> None:
    tracker = SequenceTracker()
    assert tracker.observe(0, 0)[0] is V.FIRST
    assert tracker.observe(1, 4)[0] is V.JOINED
    assert tracker.observe(0, 1)[0] is V.NEXT
    assert tracker.observe(1, 5)[0] is V.NEXT


@pytest.mark.parametrize(
    ("seqs", "unbroken"),
    [([], True), ([4], True), ([4, 5, 6], True), ([4, 6], False), ([5, 4], False)],
)
def test_is_unbroken(seqs: list[int], unbroken: bool) -> None:
    assert is_unbroken(seqs) is unbroken


@pytest.mark.parametrize(
    ("seqs", "first", "stop", "late", "shortfall"),
    [
        ([2, 3, 4], 2, 5, False, None),
        ([], 5, 5, False, None),
        ([2, 4], 2, 5, False, "the replay skipped from 3 to 4 (buffer too short?)"),
        ([3, 4], 2, 5, False, "the replay skipped from 2 to 3 (buffer too short?)"),
        ([2, 3], 2, 5, False, "the replay stopped at 3"),
        ([3, 4], 0, 5, True, None),
        ([3], 0, 5, True, "the replay stopped at 3"),
        ([], 0, 5, True, "the replay stopped at -1"),
    ],
    ids=[
        "fills",
        "nothing-missing",
        "hole",
        "starts-late",
        "stops-short",
        "late-start-allowed",
        "late-start-stops-short",
        "empty-buffer",
    ],
)
def test_replay_shortfall(
    seqs: list[int], first: int, stop: int, late: bool, shortfall: str | None
) -> None:
    assert replay_shortfall(seqs, first, stop, allow_late_start=late) == shortfall
