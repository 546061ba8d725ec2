"""Sequence numbers of one engine's KV event streams: next in order, restarted, or after a gap.

An engine numbers its event batches 0, 1, 2... per publisher (one per data-parallel rank). ZMQ
delivers one publisher's messages in order and at most once, so from the ``seq`` of each batch
alone the subscriber can tell (`SequenceTracker.observe`):

- the first batch of a stream: at seq 0 nothing came before it; past 0 the stream was joined under
  way, and what came before is in the engine's replay buffer (backfill);
- the next batch: ``last + 1``;
- a batch a start-up replay already applied: while the socket buffered live batches during that
  replay, those up to the replay's last are skipped, not taken for a restart;
- a restart: ``seq`` at or below the last one (not only back to 0: a new engine's first messages
  may be lost while the connection is set up);
- a gap: batches ``last + 1 .. seq - 1`` were lost.

Every verdict moves the stream to ``seq`` at once: what the subscriber does about it (replay,
clear the worker) cannot change where the stream resumes. Pure bookkeeping, no I/O; one tracker
per worker, owned by the subscriber's event loop.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = ["SeqVerdict", "SequenceTracker", "is_unbroken", "replay_shortfall"]


class SeqVerdict(enum.Enum):
    FIRST = "first"
    """First batch of the stream, at seq 0: apply it."""
    JOINED = "joined"
    """First batch of the stream, past seq 0: earlier batches are unknown (backfill them)."""
    NEXT = "next"
    """The batch after the last one: apply it."""
    ALREADY_APPLIED = "already_applied"
    """Covered by the start-up replay: skip it."""
    RESTARTED = "restarted"
    """At or below the last seq: the publisher restarted; clear the worker, then apply."""
    GAP = "gap"
    """Batches after the last one are missing: fill them (or clear the worker), then apply."""


class _Stream:
    __slots__ = ("last", "replayed")

    def __init__(self, last: int, replayed: bool) -> None:
        self.last = last
        """Seq of the last batch applied, or accounted for by a reset."""
        self.replayed = replayed
        """Set after a start-up replay, until the first batch past it."""


class SequenceTracker:
    """The streams of one worker, keyed by data-parallel rank (None when the engine has one)."""

    __slots__ = ("_streams",)

    def __init__(self) -> None:
        self._streams: dict[int | None, _Stream] = {}

    @property
    def started(self) -> bool:
        """A batch of some stream was seen (or replayed at start-up)."""
        return bool(self._streams)

    def observe(self, rank: int | None, seq: int) -> tuple[SeqVerdict, int]:
        """Classify the batch ``seq`` of stream ``rank`` and move the stream to it.

        Returns the verdict and the seq of the stream's previous batch (-1 for a first batch):
        after a `GAP` the missing batches are ``previous + 1 .. seq - 1``.
        """
        stream = self._streams.get(rank)
        if stream is None:
            self._streams[rank] = _Stream(seq, replayed=False)
            return (SeqVerdict.JOINED if seq > 0 else SeqVerdict.FIRST), -1
        previous = stream.last
        if seq == previous + 1:
            stream.last = seq
            stream.replayed = False
            return SeqVerdict.NEXT, previous
        if seq <= previous and stream.replayed:
            return SeqVerdict.ALREADY_APPLIED, previous
        stream.replayed = False
        stream.last = seq
        return (SeqVerdict.RESTARTED if seq <= previous else SeqVerdict.GAP), previous

    def replayed(self, rank: int | None, last: int) -> None:
        """A start-up replay applied the stream's batches up to ``last``."""
        self._streams[rank] = _Stream(last, replayed=True)


def is_unbroken(seqs: Sequence[int]) -> bool:
    """The seqs follow one another without a hole (an empty list is unbroken)."""
    return not seqs or list(seqs) == list(range(seqs[0], seqs[0] + len(seqs)))


def replay_shortfall(
    seqs: Sequence[int], first_missing: int, stop_before: int, *, allow_late_start: bool = False
) -> str | None:
    """Why the replayed ``seqs`` do not fill ``first_missing .. stop_before - 1``; None if they do.

    ``allow_late_start``: the replay may begin after ``first_missing`` (a bounded buffer no longer
    holds the oldest batches); it must still run unbroken up to ``stop_before``.
    """
    start = first_missing
    if allow_late_start and seqs and seqs[0] > first_missing:
        start = seqs[0]
    for expected, seq in enumerate(seqs, start=start):
        if seq != expected:
            return f"the replay skipped from {expected} to {seq} (buffer too short?)"
    if start + len(seqs) != stop_before:
        return f"the replay stopped at {start + len(seqs) - 1}"
    return None
