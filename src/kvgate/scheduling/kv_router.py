"""KV-aware worker selection: the cost function of the reference router, on kvgate's index.

For each candidate worker ``w`` and a request of ``isl`` prompt tokens::

    overlap_w        = leading request blocks that w already caches (prefix index)
    prefill_blocks_w = (isl - overlap_w * block_size + pending_prefill_tokens_w) / block_size
    decode_blocks_w  = active_blocks_w + request blocks not already active on w
    cost_w           = overlap_score_weight * prefill_blocks_w + decode_blocks_w

Temperature 0 picks the cheapest worker (ties: the smallest index, i.e. least cached state, then
uniformly at random); temperature T > 0 samples with p ∝ exp(-normalised_cost / T). Workers above
the busy threshold are skipped; if every candidate is busy the request is refused.

"Request blocks already active on w" is counted as the leading run of the request's blocks found
among w's active blocks: in-flight requests on a worker hold whole prefixes, so the leading run is
exact in practice and costs one walk instead of a lookup per block per worker.

The router is synchronous and pure apart from its own state; time is passed in. The EPP and the
trace simulator drive it through the ``kv-aware-scorer`` plugin (`overlaps`, `select`, `book_key`,
`mark_prefill_complete`, `free`); `route` (select, then `book`) serves the benchmarks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvgate.index.approx_index import ApproxPrefixIndex
from kvgate.index.prefix_index import PrefixIndex, WorkerId
from kvgate.scheduling.active import ActiveSequences, RequestKey
from kvgate.scheduling.router_config import KvRouterConfig


class NoCandidates(LookupError):
    """No worker to choose from (empty pool or everything filtered out)."""


class AllWorkersBusy(LookupError):
    """Every candidate is above the busy threshold."""


@dataclass(slots=True)
class RoutingRequest:
    request_id: str
    isl: int
    """Prompt length in tokens (including a trailing partial block)."""
    hashes: Sequence[int]
    """Sequence hashes of the request's full blocks, in order."""
    lora_name: str | None = None
    overlap_score_weight: float | None = None
    """Per-request override of the configured weight."""
    temperature: float | None = None
    """Per-request override of the configured temperature."""


@dataclass(slots=True)
class Candidate:
    worker: WorkerId
    total_kv_blocks: int | None = None
    """KV capacity in blocks (from the engine's cache config); None: unknown, never busy."""


@dataclass(slots=True)
class Selection:
    worker: WorkerId
    overlap_blocks: int
    """Leading blocks the chosen worker is predicted to have cached."""
    costs: dict[WorkerId, float]
    overlaps: dict[WorkerId, int]
    busy: list[WorkerId] = field(default_factory=list)

    @property
    def best_overlap(self) -> int:
        return max(self.overlaps.values(), default=0)


class KvRouter:
    def __init__(self, config: KvRouterConfig, *, seed: int | None = None) -> None:
        self.config = config
        self.block_size = config.block_size
        self.index: PrefixIndex | ApproxPrefixIndex = (
            PrefixIndex(config.block_size) if config.use_kv_events else ApproxPrefixIndex()
        )
        self.active = ActiveSequences(config.block_size, expiry_s=config.request_expiry_s)
        self._rng = random.Random(seed)

    @property
    def event_index(self) -> PrefixIndex | None:
        """The index KV events maintain; None with events off (the approximate index)."""
        return self.index if isinstance(self.index, PrefixIndex) else None

    def overlaps(self, request: RoutingRequest, now: float) -> dict[WorkerId, int]:
        if isinstance(self.index, ApproxPrefixIndex):
            return self.index.find_matches_at(request.hashes, now)
        return self.index.find_matches(request.hashes)

    def select(
        self,
        request: RoutingRequest,
        candidates: Sequence[Candidate],
        now: float,
        overlaps: dict[WorkerId, int] | None = None,
    ) -> Selection:
        """Choose a worker; ``overlaps`` (from `overlaps`) may be passed in when the caller
        times the index lookup on its own."""
        if not candidates:
            raise NoCandidates("no candidate workers")
        block_size = self.block_size
        weight = request.overlap_score_weight
        if weight is None:
            weight = self.config.overlap_score_weight
        temperature = request.temperature
        if temperature is None:
            temperature = self.config.temperature
        if overlaps is None:
            overlaps = self.overlaps(request, now)
        active_run = self.active.blocks.find_matches(request.hashes)
        request_blocks = -(-request.isl // block_size)
        # cost_w = weight * (isl - overlap_w*bs + prefill_w) / bs + active_w + blocks - run_w:
        # first without the overlap terms for every candidate (two dict reads per worker: this
        # loop runs for every candidate of every request), then recomputed whole for the few
        # workers that hold part of the prefix. Each cost is one float op on integer token and
        # block counts, so equal costs compare equal and reach the tie-break (subtracting float
        # corrections afterwards drifts by an ulp for weights like 0.1).
        isl = request.isl
        per_token = weight / block_size
        pending = self.active.prefill.get
        active_blocks = self.active.blocks.per_worker.get
        costs = {
            c.worker: per_token * (isl + pending(c.worker, 0))
            + (request_blocks + active_blocks(c.worker, 0))
            for c in candidates
        }
        busy: list[WorkerId] = []
        threshold = self.config.busy_threshold
        if threshold is not None:
            for c in candidates:
                if (
                    c.total_kv_blocks
                    and active_blocks(c.worker, 0) / c.total_kv_blocks > threshold
                    and costs.pop(c.worker, None) is not None  # a duplicate candidate: once
                ):
                    busy.append(c.worker)
        for worker in {**overlaps, **active_run}:
            if worker in costs:
                tokens = isl - overlaps.get(worker, 0) * block_size + pending(worker, 0)
                blocks = request_blocks + active_blocks(worker, 0) - active_run.get(worker, 0)
                costs[worker] = per_token * tokens + blocks
        if not costs:
            raise AllWorkersBusy(f"all {len(candidates)} candidate workers are busy")
        worker = self._argmin(costs) if temperature <= 0 else self._sample(costs, temperature)
        return Selection(worker, overlaps.get(worker, 0), costs, overlaps, busy)

    def _argmin(self, costs: dict[WorkerId, float]) -> WorkerId:
        best = min(costs.values())
        tied = [w for w, c in costs.items() if c == best]
        if len(tied) == 1:
            return tied[0]
        size = self.index.size
        smallest = min(size(w) for w in tied)
        tied = sorted(w for w in tied if size(w) == smallest)
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    def _sample(self, costs: dict[WorkerId, float], temperature: float) -> WorkerId:
        workers = sorted(costs)
        low = min(costs.values())
        span = max(costs.values()) - low
        if span <= 0:
            return self._rng.choice(workers)
        weights = [math.exp(-((costs[w] - low) / span) / temperature) for w in workers]
        return self._rng.choices(workers, weights)[0]

    def book(self, request: RoutingRequest, selection: Selection, now: float) -> int:
        """Count the routed request in the chosen worker's load (and, without KV events, assume
        the worker now caches its blocks). Returns the prompt tokens booked as pending prefill."""
        prefill = self.uncached_tokens(request.isl, selection.overlap_blocks)
        self.book_key(request.request_id, selection.worker, request.hashes, prefill, now)
        return prefill

    def uncached_tokens(self, isl: int, overlap_blocks: int) -> int:
        """Prompt tokens a worker caching ``overlap_blocks`` leading blocks has to prefill."""
        return max(0, isl - overlap_blocks * self.block_size)

    def book_key(
        self,
        key: RequestKey,
        worker: WorkerId,
        hashes: Sequence[int],
        prefill_tokens: int,
        now: float,
        *,
        capacity_blocks: int | None = None,
    ) -> None:
        """Book a request routed here or, keyed ``(router_id, request_id)``, by another replica:
        both count in the worker's load, and both teach the approximate index (which evicts as
        a cache of ``capacity_blocks``, the worker's KV capacity, when known)."""
        self.active.add(key, worker, hashes, prefill_tokens, now)
        if isinstance(self.index, ApproxPrefixIndex):
            self.index.record(worker, hashes, now, capacity_blocks)

    def route(
        self, request: RoutingRequest, candidates: Sequence[Candidate], now: float
    ) -> Selection:
        selection = self.select(request, candidates, now)
        self.book(request, selection, now)
        return selection

    def mark_prefill_complete(self, request_id: RequestKey) -> bool:
        return self.active.mark_prefill_complete(request_id)

    def free(self, request_id: RequestKey) -> bool:
        return self.active.free(request_id)

    def remove_worker(self, worker: WorkerId) -> None:
        """The worker left: its cached blocks and in-flight bookkeeping go with it."""
        self.index.remove_worker(worker)
        self.active.remove_worker(worker)


class RoundRobin:
    """The standard EPP's fallback: no tokens, no index, just take turns."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate]) -> WorkerId:
        if not candidates:
            raise NoCandidates("no candidate workers")
        worker = candidates[self._next % len(candidates)].worker
        self._next += 1
        return worker
