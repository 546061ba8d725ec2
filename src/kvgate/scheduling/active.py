"""Load the router tracks itself: requests it routed that are still in flight, per worker.

Engine metrics arrive late (a scrape interval behind) and say nothing about requests routed a
millisecond ago; a burst of identical prefixes would herd onto one worker. So every routed request
is booked here at once: its uncached prompt tokens count as pending prefill until its first token,
and its blocks count as active KV blocks until it completes or aborts. Blocks shared by several
in-flight requests on one worker are counted once (ref-counted), as the engine holds them once
(the space they take); their context blocks are summed per request (what decoding them reads).

Requests never reported complete (a lost response phase, a crashed client) are expired after
``expiry_s`` so that load cannot leak forever. Time is passed in by the caller.

Requests are keyed by their request id; requests another replica routed (replica sync) are keyed
by ``(router_id, request_id)`` so that they can never collide with this replica's own.

Thread-safety: none; owned by the router's event loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TypeAlias

from kvgate.index.mask_index import MaskIndex, WorkerId

LoadColumns: TypeAlias = tuple[list[int], list[int], list[int], list[int], list[int]]
"""Per worker, in order: pending prefill tokens, requests in prefill, requests in flight, active
blocks, context blocks."""
RequestKey: TypeAlias = str | tuple[str, str]
"""A request id (routed here) or ``(router_id, request_id)`` (routed by another replica)."""

# Expired requests are swept at most this often.
_SWEEP_INTERVAL_S = 1.0


@dataclass(slots=True)
class ActiveRequest:
    worker: WorkerId
    hashes: Sequence[int]
    prefill_tokens: int
    started: float
    prefill_done: bool = False


class ActiveBlocks(MaskIndex):
    """Blocks of in-flight requests per worker, ref-counted, matchable like the prefix index."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: list[dict[int, int]] = []
        self.per_worker: dict[WorkerId, int] = {}
        """Distinct active blocks per worker, kept current so scoring reads one dict."""

    def on_new_slot(self, slot: int) -> None:
        if slot == len(self._counts):
            self._counts.append({})

    def count(self, worker: WorkerId) -> int:
        return self.per_worker.get(worker, 0)

    def add(self, worker: WorkerId, hashes: Sequence[int]) -> None:
        slot = self.slot(worker)
        counts = self._counts[slot]
        self.add_counted(counts, hashes, 1 << slot)
        self.per_worker[worker] = len(counts)

    def release(self, worker: WorkerId, hashes: Sequence[int]) -> None:
        slot = self.slot_of(worker)
        if slot is None:
            return
        counts = self._counts[slot]
        self.release_counted(counts, hashes, 1 << slot)
        self.per_worker[worker] = len(counts)

    def drop_worker(self, worker: WorkerId) -> None:
        slot = self.slot_of(worker)
        if slot is None:
            return
        bit = 1 << slot
        for h in self._counts[slot]:
            self.drop_bit(h, bit)
        self._counts[slot] = {}
        self.per_worker.pop(worker, None)
        self.release_slot(worker)


class ActiveSequences:
    def __init__(self, block_size: int, *, expiry_s: float = 300.0) -> None:
        self.block_size = block_size
        self.expiry_s = expiry_s
        self.blocks = ActiveBlocks()
        self._requests: dict[RequestKey, ActiveRequest] = {}
        self.prefill: dict[WorkerId, int] = {}
        """Prompt tokens routed but not yet prefilled, per worker."""
        self._in_flight: dict[WorkerId, int] = {}
        self._prefilling: dict[WorkerId, int] = {}
        self._context: dict[WorkerId, int] = {}
        self._next_sweep = 0.0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def get(self, request_id: RequestKey) -> ActiveRequest | None:
        return self._requests.get(request_id)

    def own(self) -> Iterator[tuple[str, ActiveRequest]]:
        """The requests this replica routed (not those learned from other replicas)."""
        for key, request in self._requests.items():
            if isinstance(key, str):
                yield key, request

    def prefill_tokens(self, worker: WorkerId) -> int:
        return self.prefill.get(worker, 0)

    def active_blocks(self, worker: WorkerId) -> int:
        return self.blocks.count(worker)

    def context_blocks(self, worker: WorkerId) -> int:
        """The in-flight requests' prompt blocks on ``worker``, summed per request."""
        return self._context.get(worker, 0)

    def in_flight(self, worker: WorkerId) -> int:
        return self._in_flight.get(worker, 0)

    def prefilling(self, worker: WorkerId) -> int:
        """Requests booked on ``worker`` whose first token has not come yet."""
        return self._prefilling.get(worker, 0)

    def loads(self, workers: Sequence[WorkerId]) -> LoadColumns:
        """For each of ``workers``: pending prefill tokens, requests in prefill, requests in
        flight, active blocks, context blocks (one pass per column)."""
        prefill, prefilling, in_flight, blocks, context = (table.get for table in self.tables())
        return (
            [prefill(w, 0) for w in workers],
            [prefilling(w, 0) for w in workers],
            [in_flight(w, 0) for w in workers],
            [blocks(w, 0) for w in workers],
            [context(w, 0) for w in workers],
        )

    def tables(
        self,
    ) -> tuple[
        dict[WorkerId, int],
        dict[WorkerId, int],
        dict[WorkerId, int],
        dict[WorkerId, int],
        dict[WorkerId, int],
    ]:
        """Per worker: pending prefill tokens, requests in prefill, requests in flight, active
        blocks, context blocks (the dicts themselves, read-only: the routing hot path reads them
        for every candidate, natively when it can)."""
        blocks = self.blocks.per_worker
        return self.prefill, self._prefilling, self._in_flight, blocks, self._context

    def active_overlaps(self, hashes: Sequence[int]) -> dict[WorkerId, int]:
        """Per worker, the leading run of ``hashes`` among its in-flight requests' blocks."""
        return self.blocks.find_matches(hashes)

    def add(
        self,
        request_id: RequestKey,
        worker: WorkerId,
        hashes: Sequence[int],
        prefill_tokens: int,
        now: float,
    ) -> None:
        """Book a routed request. Booking an id twice replaces the first booking."""
        self.expire(now)
        if request_id in self._requests:
            self.free(request_id)
        self._requests[request_id] = ActiveRequest(worker, hashes, prefill_tokens, now)
        self.prefill[worker] = self.prefill.get(worker, 0) + prefill_tokens
        self._in_flight[worker] = self._in_flight.get(worker, 0) + 1
        self._prefilling[worker] = self._prefilling.get(worker, 0) + 1
        self._context[worker] = self._context.get(worker, 0) + len(hashes)
        self.blocks.add(worker, hashes)

    def mark_prefill_complete(self, request_id: RequestKey) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.prefill_done:
            return False
        req.prefill_done = True
        self.prefill[req.worker] -= req.prefill_tokens
        self._prefilling[req.worker] -= 1
        return True

    def free(self, request_id: RequestKey) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if not req.prefill_done:
            self.prefill[req.worker] -= req.prefill_tokens
            self._prefilling[req.worker] -= 1
        self._in_flight[req.worker] -= 1
        self._context[req.worker] -= len(req.hashes)
        self.blocks.release(req.worker, req.hashes)
        return True

    def remove_worker(self, worker: WorkerId) -> None:
        for request_id in [r for r, req in self._requests.items() if req.worker == worker]:
            del self._requests[request_id]
        self.prefill.pop(worker, None)
        self._in_flight.pop(worker, None)
        self._prefilling.pop(worker, None)
        self._context.pop(worker, None)
        self.blocks.drop_worker(worker)

    def expire(self, now: float) -> int:
        """Forget requests booked more than ``expiry_s`` ago (dict order is booking order)."""
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + _SWEEP_INTERVAL_S
        deadline = now - self.expiry_s
        stale = 0
        for req in self._requests.values():
            if req.started > deadline:
                break
            stale += 1
        for request_id in list(islice(self._requests, stale)):
            self.free(request_id)
        self.expired += stale
        return stale
