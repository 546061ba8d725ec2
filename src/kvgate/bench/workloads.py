"""Workload families for `kvgate simulate --workload NAME[:k=v,...]` and the policy sweep.

Each family stands for a kind of traffic a KV-aware router is bought for, is seeded and
parameterised, and produces Mooncake trace requests (`kvgate.bench.traces`), so a generated
workload can be written out (`write_mooncake`) and replayed live with `kvgate bench` as well.

Rates are **per worker**, so ``load`` 1 puts the same pressure on a fleet of any size, and
``--load`` multiplies the rate of the family's outer arrival process (sessions, bursts,
requests); what happens inside a session or a burst (tool time, the gap between questions)
keeps its own pace. Sizes of the distinct content (tenants, documents, sessions) also scale with
the fleet, so that the demand stays beyond what it can cache.

How prompts share content. A prompt is a path of 512-token blocks. Content shared between
requests (a system prompt, a retrieved document at a given position, a conversation so far) gets
its hash ids from `_Paths` (equal paths, equal ids) or `_Stream` (a growing conversation: the
last, partial block keeps its id as it fills, so turn k's prompt is exactly a prefix of turn
k + 1's, as for an append-only history). Content of one request only (a question) gets fresh
ids.

The families:

- ``agentic``: agent sessions (coding / research agents). A session re-sends its whole history
  every turn: a shared system prompt with tool definitions (one of a few agent kinds), the task,
  then per turn the model's tool call and the tool's output. Sessions start in bursts (a batch
  of tasks fanned out to agents). Reference numbers: 10,000-token system prompts and dozens of
  calls per session in long-horizon agents (Lumer et al., "Don't Break the Cache",
  arXiv:2601.06007); tool outputs of a few hundred to several thousand tokens (file reads,
  search results); the Mooncake FAST'25 release has a tool-and-agent trace (23,608 requests)
  for the same reason.
- ``rag``: multi-tenant retrieval-augmented generation. Each request is a tenant's system
  prompt, the k chunks retrieved for its topic in rank order, and a question. Tenants, topics
  and the chunks a topic retrieves are drawn with Zipf popularity; with the defaults the top 3%
  of a tenant's chunks draw ~60% of retrievals, the skew RAGCache measured (Jin et al.,
  arXiv:2404.12457), and a retrieval adds a few thousand tokens to a short question. The corpus
  (tenants × chunks, ~8M tokens on 8 workers) is many times one worker's cache.
- ``longdoc``: long-document question answering in bursts: a user (or a batch job) asks
  several questions about one long document (a report, a contract, a paper) within seconds.
  Documents are ~24K tokens (median, lognormal, 8K–100K); LongBench's documents average 6.7K
  words and LongBench v2's range from 8K to 2M words (Bai et al., arXiv:2308.14508,
  arXiv:2412.15204). A few documents per worker, some hotter than others.
- ``hetero``: a mixed chat workload (application system prompts, multi-turn conversations) on a
  heterogeneous fleet: half the workers are a faster, larger GPU, half a slower one with half
  the KV capacity (A100-40GB next to H100-80GB: 312 vs 989 dense BF16 TFLOPS, 1.6 vs 3.35 TB/s,
  so ~0.4x the speed). Its fleet comes with the workload (`Family.fleet`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from kvgate.bench.fleet import WorkerSpec
from kvgate.bench.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest

_BT = MOONCAKE_BLOCK_TOKENS


# -- content ---------------------------------------------------------------------------------


class _Ids:
    """Fresh hash ids, one counter per workload."""

    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[int]:
        start = self.next
        self.next += n
        return list(range(start, start + n))


class _Paths:
    """Hash ids for content shared by position: a segment (whole blocks) after the same
    earlier segments gets the same ids every time."""

    __slots__ = ("_ids", "_nodes")

    def __init__(self, ids: _Ids) -> None:
        self._ids = ids
        self._nodes: dict[tuple[Any, ...], list[int]] = {}

    def ids(self, segments: Sequence[tuple[Any, int]]) -> list[int]:
        """``segments``: (name, blocks) pairs, in prompt order."""
        out: list[int] = []
        path: tuple[Any, ...] = ()
        for name, blocks in segments:
            path = (*path, name)
            got = self._nodes.get(path)
            if got is None:
                got = self._nodes[path] = self._ids.take(blocks)
            out += got
        return out


class _Stream:
    """A conversation's tokens so far, as hash ids: appending fills the last block before
    taking a new id, so every earlier prompt is a prefix of the next."""

    __slots__ = ("_ids", "hash_ids", "tokens")

    def __init__(self, ids: _Ids, prefix: Sequence[int]) -> None:
        self._ids = ids
        self.hash_ids = list(prefix)
        self.tokens = len(prefix) * _BT

    def extend(self, tokens: int) -> None:
        self.tokens += tokens
        missing = -(-self.tokens // _BT) - len(self.hash_ids)
        if missing > 0:
            self.hash_ids += self._ids.take(missing)

    def request(self, at_ms: float, output_tokens: int) -> TraceRequest:
        return TraceRequest(round(at_ms, 3), self.tokens, output_tokens, tuple(self.hash_ids))


def _with_tail(prefix: list[int], ids: _Ids, tail_tokens: int) -> tuple[int, tuple[int, ...]]:
    """Prompt length and hash ids of ``prefix`` (whole blocks) + ``tail_tokens`` of its own."""
    return len(prefix) * _BT + tail_tokens, (*prefix, *ids.take(-(-tail_tokens // _BT)))


class _Zipf:
    """Ranks 0..n-1 with P(k) ∝ 1 / (k + 1)^s."""

    __slots__ = ("_cum",)

    def __init__(self, n: int, s: float) -> None:
        if n < 1:
            raise ValueError("a Zipf distribution needs >= 1 item")
        self._cum = list(accumulate(1.0 / (k + 1) ** s for k in range(n)))

    def draw(self, rng: random.Random) -> int:
        return min(bisect_left(self._cum, rng.random() * self._cum[-1]), len(self._cum) - 1)

    def distinct(self, rng: random.Random, k: int) -> list[int]:
        """``k`` different ranks (all of them if there are fewer), in draw order."""
        k = min(k, len(self._cum))
        out: list[int] = []
        while len(out) < k:
            x = self.draw(rng)
            if x not in out:
                out.append(x)
        return out


def _geometric(rng: random.Random, mean: float) -> int:
    """1, 2, 3, ... with the given mean (>= 1): how many of something a burst brings."""
    if mean <= 1.0:
        return 1
    return 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean))


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(median * math.exp(rng.gauss(0.0, sigma)))))


def _by_arrival(requests: list[TraceRequest]) -> list[TraceRequest]:
    # Stable: requests of one instant keep the order they were generated in.
    return sorted(requests, key=lambda r: r.timestamp_ms)


def _check(load: float, workers: int) -> None:
    if not load > 0:
        raise ValueError(f"load must be > 0, got {load}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


# -- families --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgenticParams:
    sessions_per_worker: int = 20
    burst_rate_per_worker: float = 0.08
    """Bursts of session starts per second per worker (x load)."""
    burst_sessions: float = 4.0
    """Mean sessions started by one burst (geometric)."""
    burst_spread_s: float = 2.0
    """A burst's sessions start within this many seconds."""
    agent_kinds: int = 4
    system_blocks: int = 20
    """Shared system prompt + tool definitions, in 512-token blocks (~10K tokens)."""
    task_tokens: tuple[int, int] = (300, 2000)
    turns_median: float = 10.0
    max_turns: int = 40
    call_tokens_median: float = 150.0
    """The model's output per turn (reasoning + a tool call)."""
    tool_tokens_median: float = 1200.0
    tool_time_median_s: float = 2.0
    max_context: int = 120_000


def agentic(p: AgenticParams, *, workers: int, load: float, seed: int) -> list[TraceRequest]:
    _check(load, workers)
    rng = random.Random(seed)
    ids = _Ids()
    kinds = _Zipf(p.agent_kinds, 1.0)
    systems = [ids.take(p.system_blocks) for _ in range(p.agent_kinds)]
    requests: list[TraceRequest] = []
    sessions = p.sessions_per_worker * workers
    rate = p.burst_rate_per_worker * workers * load
    t = 0.0
    started = 0
    while started < sessions:
        t += rng.expovariate(rate)
        for _ in range(min(_geometric(rng, p.burst_sessions), sessions - started)):
            start = t + rng.uniform(0.0, p.burst_spread_s)
            requests += _agent_session(p, rng, ids, systems[kinds.draw(rng)], start)
            started += 1
    return _by_arrival(requests)


def _agent_session(
    p: AgenticParams, rng: random.Random, ids: _Ids, system: list[int], start_s: float
) -> list[TraceRequest]:
    stream = _Stream(ids, system)
    stream.extend(rng.randint(*p.task_tokens))
    turns = _lognormal_int(rng, p.turns_median, 0.6, 1, p.max_turns)
    at = start_s
    out: list[TraceRequest] = []
    for _ in range(turns):
        call = _lognormal_int(rng, p.call_tokens_median, 0.7, 16, 2000)
        out.append(stream.request(at * 1000.0, call))
        tool = _lognormal_int(rng, p.tool_tokens_median, 1.0, 20, 16_000)
        if stream.tokens + call + tool > p.max_context:
            break
        stream.extend(call + tool)
        # Open loop, as a trace records it: the next call comes after the model's answer
        # (estimated at ~15 ms a token plus overhead) and the tool's run.
        generation = 0.3 + 0.015 * call
        at += generation + rng.lognormvariate(math.log(p.tool_time_median_s), 0.8)
    return out


@dataclass(frozen=True, slots=True)
class RagParams:
    requests_per_worker: int = 250
    rate_per_worker: float = 5.0
    """Requests per second per worker (x load), Poisson."""
    tenants_per_worker: int = 2
    tenant_skew: float = 0.8
    system_blocks: tuple[int, int] = (2, 6)
    chunks_per_tenant: int = 500
    chunk_blocks: int = 2
    chunk_skew: float = 1.15
    """Zipf exponent of chunk popularity: 1.15 over 500 chunks puts ~60% of retrievals on
    the top 3%."""
    topics_per_tenant: int = 200
    topic_skew: float = 1.0
    """Zipf exponent of topic popularity: questions on one topic retrieve the same chunks."""
    top_k: int = 4
    question_tokens: tuple[int, int] = (30, 200)
    output_median: float = 150.0


def rag(p: RagParams, *, workers: int, load: float, seed: int) -> list[TraceRequest]:
    _check(load, workers)
    rng = random.Random(seed)
    ids = _Ids()
    paths = _Paths(ids)
    n_tenants = p.tenants_per_worker * workers
    tenants = _Zipf(n_tenants, p.tenant_skew)
    chunks = _Zipf(p.chunks_per_tenant, p.chunk_skew)
    topics = _Zipf(p.topics_per_tenant, p.topic_skew)
    # A topic's retrieval: its top-k chunks in rank order, fixed, so that questions on one topic
    # share the whole context and topics share their leading chunks as often as popular
    # chunks come first.
    prompts: list[list[tuple[Any, int]]] = []
    for tenant in range(n_tenants):
        system: tuple[Any, int] = (("system", tenant), rng.randint(*p.system_blocks))
        for _ in range(p.topics_per_tenant):
            retrieved = chunks.distinct(rng, p.top_k)
            prompts.append([system, *((("chunk", tenant, c), p.chunk_blocks) for c in retrieved)])
    rate = p.rate_per_worker * workers * load
    requests: list[TraceRequest] = []
    t = 0.0
    for _ in range(p.requests_per_worker * workers):
        prompt = prompts[tenants.draw(rng) * p.topics_per_tenant + topics.draw(rng)]
        isl, hash_ids = _with_tail(paths.ids(prompt), ids, rng.randint(*p.question_tokens))
        output = _lognormal_int(rng, p.output_median, 0.6, 8, 1500)
        requests.append(TraceRequest(round(t * 1000.0, 3), isl, output, hash_ids))
        t += rng.expovariate(rate)
    return requests


@dataclass(frozen=True, slots=True)
class LongDocParams:
    bursts_per_worker: int = 15
    burst_rate_per_worker: float = 0.1
    """Bursts per second per worker (x load), Poisson."""
    burst_questions: float = 5.0
    """Mean questions per burst (1 + geometric)."""
    question_gap_s: float = 1.5
    """Mean gap between a burst's questions (exponential)."""
    documents_per_worker: int = 4
    document_skew: float = 0.8
    document_tokens_median: float = 24_000.0
    document_tokens: tuple[int, int] = (8_192, 100_352)
    instruction_blocks: int = 1
    question_tokens: tuple[int, int] = (20, 200)
    output_median: float = 120.0


def longdoc(p: LongDocParams, *, workers: int, load: float, seed: int) -> list[TraceRequest]:
    _check(load, workers)
    rng = random.Random(seed)
    ids = _Ids()
    paths = _Paths(ids)
    n_docs = p.documents_per_worker * workers
    low, high = p.document_tokens
    doc_blocks = [
        _lognormal_int(rng, p.document_tokens_median, 0.6, low, high) // _BT for _ in range(n_docs)
    ]
    docs = _Zipf(n_docs, p.document_skew)
    rate = p.burst_rate_per_worker * workers * load
    requests: list[TraceRequest] = []
    t = 0.0
    for _ in range(p.bursts_per_worker * workers):
        t += rng.expovariate(rate)
        doc = docs.draw(rng)
        prefix = paths.ids([("instruction", p.instruction_blocks), (doc, doc_blocks[doc])])
        at = t
        for _ in range(_geometric(rng, p.burst_questions)):
            isl, hash_ids = _with_tail(prefix, ids, rng.randint(*p.question_tokens))
            output = _lognormal_int(rng, p.output_median, 0.6, 8, 1000)
            requests.append(TraceRequest(round(at * 1000.0, 3), isl, output, hash_ids))
            at += rng.expovariate(1.0 / p.question_gap_s)
    return _by_arrival(requests)


@dataclass(frozen=True, slots=True)
class HeteroParams:
    sessions_per_worker: int = 60
    session_rate_per_worker: float = 1.0
    """Conversations started per second per worker (x load), Poisson."""
    apps: int = 8
    app_skew: float = 1.0
    system_blocks: tuple[int, int] = (2, 8)
    turns_mean: float = 4.0
    message_tokens: tuple[int, int] = (30, 600)
    answer_median: float = 250.0
    think_time_median_s: float = 15.0
    slow_speed: float = 0.4
    """Speed of the slower half of the fleet."""
    slow_capacity: float = 0.5
    """KV capacity of the slower half, relative to the default."""


def hetero(p: HeteroParams, *, workers: int, load: float, seed: int) -> list[TraceRequest]:
    _check(load, workers)
    rng = random.Random(seed)
    ids = _Ids()
    apps = _Zipf(p.apps, p.app_skew)
    systems = [ids.take(rng.randint(*p.system_blocks)) for _ in range(p.apps)]
    rate = p.session_rate_per_worker * workers * load
    requests: list[TraceRequest] = []
    t = 0.0
    for _ in range(p.sessions_per_worker * workers):
        t += rng.expovariate(rate)
        stream = _Stream(ids, systems[apps.draw(rng)])
        at = t
        for _ in range(_geometric(rng, p.turns_mean)):
            stream.extend(rng.randint(*p.message_tokens))
            answer = _lognormal_int(rng, p.answer_median, 0.8, 8, 2000)
            requests.append(stream.request(at * 1000.0, answer))
            stream.extend(answer)
            at += 0.3 + 0.015 * answer + rng.lognormvariate(math.log(p.think_time_median_s), 0.7)
    return _by_arrival(requests)


def hetero_fleet(p: HeteroParams, workers: int, default_blocks: int) -> tuple[WorkerSpec, ...]:
    """The faster half first (the larger half when ``workers`` is odd)."""
    fast = (workers + 1) // 2
    slow = WorkerSpec(p.slow_speed, max(1, round(default_blocks * p.slow_capacity)))
    return (WorkerSpec(),) * fast + (slow,) * (workers - fast)


# -- the registry ----------------------------------------------------------------------------


Generator = Callable[..., list[TraceRequest]]
FleetShape = Callable[[Any, int, int], tuple[WorkerSpec, ...]]


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    params: type[Any]
    generate: Generator
    fleet: FleetShape | None = None
    """The fleet the family is about, from (params, workers, default KV blocks), if any."""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("agentic", AgenticParams, agentic),
        Family("rag", RagParams, rag),
        Family("longdoc", LongDocParams, longdoc),
        Family("hetero", HeteroParams, hetero, hetero_fleet),
    )
}


@dataclass(frozen=True, slots=True)
class Workload:
    """A generated workload: its requests and, for a family about the fleet, that fleet."""

    name: str
    requests: list[TraceRequest]
    fleet: tuple[WorkerSpec, ...] | None


def parse_spec(spec: str) -> tuple[Family, Any]:
    """``NAME[:k=v,...]`` → the family and its parameters (defaults overridden by k=v)."""
    name, _, rest = spec.partition(":")
    family = FAMILIES.get(name.strip())
    if family is None:
        raise ValueError(f"unknown workload {name!r} (known: {', '.join(FAMILIES)})")
    fields = {f.name: f for f in dataclasses.fields(family.params)}
    changes: dict[str, Any] = {}
    for item in (i.strip() for i in rest.split(",") if rest):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            known = ", ".join(fields)
            raise ValueError(f"workload {name}: bad parameter {item!r} (known: {known})")
        default = fields[key].default
        changes[key] = _convert(name, key, value.strip(), default)
    return family, family.params(**changes)


def _convert(family: str, key: str, value: str, default: Any) -> Any:
    try:
        if isinstance(default, tuple):
            low, _, high = value.partition("-")
            return (type(default[0])(low), type(default[1])(high or low))
        if isinstance(default, bool):
            raise ValueError
        return type(default)(value)
    except ValueError:
        shape = "LOW-HIGH" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"workload {family}: {key}={value!r} is not a {shape}") from None


def generate(
    spec: str, *, workers: int, load: float = 1.0, seed: int = 0, default_blocks: int
) -> Workload:
    """Generate ``spec`` (``NAME[:k=v,...]``) for a fleet of ``workers``; ``default_blocks`` is
    a worker's KV capacity, for families that shape the fleet."""
    family, params = parse_spec(spec)
    requests = family.generate(params, workers=workers, load=load, seed=seed)
    fleet = None if family.fleet is None else family.fleet(params, workers, default_blocks)
    return Workload(spec, requests, fleet)
