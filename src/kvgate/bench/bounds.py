"""What no router can beat, and what the fleet's memory could reach: the yardsticks of a replay.

**Floor TTFT.** Each request's time to first token on an idle worker (nothing queued, nothing
running) whose cache holds every block an infinite cache would hold at that point of the trace.
It is computed with the engine's own rules, so a policy's TTFT can be read as "floor +
what routing cost": the prompt's cached prefix counts in whole KV blocks and at most
``(len - 1) // block_size`` of them (one token must be computed for logits); the rest is
prefilled in chunks of ``max_num_batched_tokens``, one engine step each, timed by the worker's
timing model; the first token is sampled at the end of the last prefill step, and the engine adds
nothing after it. On a heterogeneous fleet the floor is the fastest worker's that can hold the
request.

**Pooled hit rate.** The hit rate of one LRU cache as large as the whole fleet (the sum of the
workers' KV blocks), fed the trace's prompts in arrival order: what the fleet's memory would give
if it were one cache, a reachable reference that, unlike the infinite-cache ideal, pays for
capacity. Hits follow the engine's definition (cached prompt tokens / prompt tokens, whole
blocks, the last token always computed). Prompt blocks are inserted back to front, as vLLM frees
a request's blocks, so a prompt's tail is evicted before its head; generated tokens are not
stored (they never match a later trace prompt).

**Pooled floor TTFT.** The floor TTFT with the pooled cache's hits instead of the infinite
cache's: each request alone on an idle worker that serves what one LRU cache of the fleet's size
would. With the capacity paid for and queueing left out, it is what a router could hope for
when it made the fleet's caches work as one (a reference, not a bound: a router could keep
better blocks than LRU does, and queueing is real). When it is close to a policy's TTFT, the
cache's size, not the routing, sets that TTFT.

Both walk the trace at KV-block granularity. A block is named by the trace node holding its last
token (a path of hash ids from the root: equal paths are equal tokens) and its end offset in that
512-token trace block, so partial trace blocks count exactly as far as they are shared.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from kvgate.bench.report import Bounds
from kvgate.bench.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest
from kvgate.sim.engine import EngineConfig
from kvgate.sim.timing import BatchShape, StepTiming

_BT = MOONCAKE_BLOCK_TOKENS


def _arrival(r: TraceRequest) -> float:
    return r.timestamp_ms


class _TraceTrie:
    """Nodes for paths of hash ids; a request's ``i``-th node names its first ``i + 1`` ids."""

    __slots__ = ("_children",)

    def __init__(self) -> None:
        self._children: dict[tuple[int, int], int] = {}

    def path(self, hash_ids: Sequence[int]) -> list[int]:
        children = self._children
        nodes: list[int] = []
        node = -1
        for h in hash_ids:
            key = (node, h)
            child = children.get(key)
            if child is None:
                child = children[key] = len(children)
            nodes.append(child)
            node = child
        return nodes


def _block_keys(nodes: Sequence[int], input_length: int, block_size: int) -> Iterator[int]:
    """Keys of the prompt's full KV blocks, in order."""
    for k in range(input_length // block_size):
        last = (k + 1) * block_size - 1
        yield nodes[last // _BT] * (_BT + 1) + last % _BT + 1


def infinite_cache_hits(requests: Sequence[TraceRequest], block_size: int) -> list[int]:
    """Per request (in the order given): the prompt tokens an idle engine serves from cache when
    it holds every earlier request's prompt (arrival order) — the engine's count, whole blocks,
    at most ``(len - 1) // block_size`` of them."""
    trie = _TraceTrie()
    seen: dict[int, int] = {}
    """Per trie node: the most tokens of that trace block any earlier prompt carried."""
    order = sorted(range(len(requests)), key=lambda i: _arrival(requests[i]))
    hits = [0] * len(requests)
    for i in order:
        r = requests[i]
        nodes = trie.path(r.hash_ids)
        matched = 0
        for j, node in enumerate(nodes):
            size = min(_BT, r.input_length - j * _BT)
            held = seen.get(node, 0)
            matched += min(held, size)
            if held < size:
                break
        cap = (r.input_length - 1) // block_size
        hits[i] = min(matched // block_size, cap) * block_size
        for j, node in enumerate(nodes):
            size = min(_BT, r.input_length - j * _BT)
            if seen.get(node, 0) < size:
                seen[node] = size
    return hits


def infinite_hit_rate(requests: Sequence[TraceRequest], block_size: int) -> float:
    """The ideal hit rate counted as the engine counts: cached prompt tokens / prompt tokens with
    one infinite cache (`infinite_cache_hits`).

    `kvgate.bench.traces.ideal_hit_rate` counts in 512-token trace blocks, whole blocks only; this
    also counts the shared part of a trace block a conversation has since filled, and leaves out
    what the engine cannot serve (less than a KV block, a fully cached prompt's last block)."""
    total = sum(r.input_length for r in requests)
    return sum(infinite_cache_hits(requests, block_size)) / total if total else 0.0


def pooled_hit_rate(
    requests: Sequence[TraceRequest], capacity_blocks: int, block_size: int
) -> float:
    """Cached prompt tokens / prompt tokens of one LRU cache of ``capacity_blocks`` KV blocks."""
    total = sum(r.input_length for r in requests)
    hits = pooled_cache_hits(requests, capacity_blocks, block_size)
    return sum(hits) / total if total else 0.0


def pooled_cache_hits(
    requests: Sequence[TraceRequest], capacity_blocks: int, block_size: int
) -> list[int]:
    """Per request (in the order given): the prompt tokens one LRU cache of
    ``capacity_blocks`` KV blocks serves it, fed the prompts in arrival order."""
    if capacity_blocks < 1:
        raise ValueError(f"capacity must be >= 1 block, got {capacity_blocks}")
    if _BT % block_size:
        return _pooled_by_block(requests, capacity_blocks, block_size)
    return _pooled_by_node(requests, capacity_blocks, block_size)


def _pooled_by_node(
    requests: Sequence[TraceRequest], capacity_blocks: int, block_size: int
) -> list[int]:
    # KV blocks tile each 512-token trace block, so the cache is kept per trace node as the
    # number of its leading KV blocks held. Blocks of a prompt are touched back to front, so
    # within a node the tail is always the least recent part: eviction trims a node from its
    # end. (Exact when a node, once touched, is never touched again with fewer blocks — true of
    # append-only conversations and unique tails; otherwise the shorter touch refreshes the
    # node's tail too.)
    trie = _TraceTrie()
    held: OrderedDict[int, int] = OrderedDict()
    size = 0
    hits = [0] * len(requests)
    for i in sorted(range(len(requests)), key=lambda i: _arrival(requests[i])):
        r = requests[i]
        nodes = trie.path(r.hash_ids)
        need = [min(_BT, r.input_length - j * _BT) // block_size for j in range(len(nodes))]
        got = 0
        for node, n in zip(nodes, need, strict=True):
            h = min(held.get(node, 0), n)
            got += h
            if h < n:
                break
        hits[i] = min(got, (r.input_length - 1) // block_size) * block_size
        for node, n in zip(reversed(nodes), reversed(need), strict=True):
            before = held.get(node, 0)
            if n > before:
                held[node] = n
                size += n - before
            if before or n:
                held.move_to_end(node)
        while size > capacity_blocks:
            node, n = next(iter(held.items()))
            excess = size - capacity_blocks
            if n <= excess:
                del held[node]
                size -= n
            else:
                held[node] = n - excess
                size -= excess
    return hits


def _pooled_by_block(
    requests: Sequence[TraceRequest], capacity_blocks: int, block_size: int
) -> list[int]:
    """The same, one LRU entry per KV block: for block sizes that do not tile 512 tokens."""
    trie = _TraceTrie()
    lru: OrderedDict[int, None] = OrderedDict()
    hits = [0] * len(requests)
    for i in sorted(range(len(requests)), key=lambda i: _arrival(requests[i])):
        r = requests[i]
        keys = list(_block_keys(trie.path(r.hash_ids), r.input_length, block_size))
        got = 0
        for key in keys[: (r.input_length - 1) // block_size]:
            if key not in lru:
                break
            got += 1
        hits[i] = got * block_size
        for key in reversed(keys):
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return hits


def prefill_seconds(
    prompt_tokens: int, cached_tokens: int, config: EngineConfig, timing: StepTiming
) -> float:
    """TTFT of a request alone on an idle engine that has ``cached_tokens`` of it cached."""
    remaining = prompt_tokens - cached_tokens
    if remaining < 1:
        raise ValueError("at least one prompt token must be computed")
    chunk = config.max_num_batched_tokens
    seconds = 0.0
    while remaining > 0:
        n = min(remaining, chunk)
        seconds += timing.step_seconds(BatchShape(n, 0, 0.0))
        remaining -= n
    return seconds


@dataclass(frozen=True, slots=True)
class WorkerModel:
    """What the bounds need of one worker: its engine sizing and its timing model."""

    config: EngineConfig
    timing: StepTiming


def floor_ttft_s(
    requests: Sequence[TraceRequest],
    fleet: Sequence[WorkerModel],
    hits: Sequence[int] | None = None,
) -> list[float | None]:
    """Per request: the floor TTFT (see the module docs); None when no worker can hold it.
    ``hits``: the cached tokens per request, instead of the infinite cache's (e.g. the pooled
    cache's, `pooled_cache_hits`)."""
    if not fleet:
        raise ValueError("the fleet is empty")
    sizes = {w.config.block_size for w in fleet}
    if len(sizes) != 1:
        raise ValueError(f"workers disagree on the block size: {sorted(sizes)}")
    if hits is None:
        hits = infinite_cache_hits(requests, sizes.pop())
    floors: list[float | None] = []
    for r, cached in zip(requests, hits, strict=True):
        best: float | None = None
        for w in fleet:
            if r.input_length + r.output_length > w.config.max_model_len:
                continue
            t = prefill_seconds(r.input_length, cached, w.config, w.timing)
            if best is None or t < best:
                best = t
        floors.append(best)
    return floors


def fleet_bounds(requests: Sequence[TraceRequest], fleet: Sequence[WorkerModel]) -> Bounds:
    """The floor TTFT percentiles, the pooled hit rate and the pooled floor's percentiles of
    ``requests`` on ``fleet``."""
    # Workers that share sizing and timing give the same floor: time each kind once.
    kinds = list({(w.config, w.timing): w for w in fleet}.values())
    capacity = sum(w.config.num_gpu_blocks for w in fleet)
    block_size = fleet[0].config.block_size
    pooled = pooled_cache_hits(requests, capacity, block_size)
    total = sum(r.input_length for r in requests)
    return Bounds(
        floor_ttft_ms=_percentiles_ms(floor_ttft_s(requests, kinds)),
        pooled_hit_rate=sum(pooled) / total if total else 0.0,
        pooled_floor_ttft_ms=_percentiles_ms(floor_ttft_s(requests, kinds, pooled)),
    )


def _percentiles_ms(seconds: Sequence[float | None]) -> dict[str, float]:
    known = [s for s in seconds if s is not None]
    if not known:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    values = np.percentile(np.asarray(known) * 1000.0, (50, 90, 99))
    return {f"p{p}": float(v) for p, v in zip((50, 90, 99), values, strict=True)}
