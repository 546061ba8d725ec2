"""Workloads for `kvgate simulate` and `kvgate bench`: Mooncake traces and synthetic generators.

One format for everything: the Mooncake JSONL trace (FAST'25), one request per line with
``timestamp`` (ms from the start), ``input_length``, ``output_length`` and ``hash_ids``, the ids of
the prompt's 512-token blocks, where equal ids at equal positions mean equal content (and, ids
being chained, an equal prefix). The synthetic generators write this format too, so the simulator
and the live benchmark read one thing.

Tokens. A hash id stands for a fixed pseudo-random block of 512 token ids: `TokenSynth` derives
token ``j`` of block ``h`` from a 64-bit mix of (seed, h, j), vectorised with numpy, so every run
and every policy sees the same prompt for a request, with no table of blocks kept in memory (the
synthetic Mooncake trace names ~44K blocks, 22M tokens). The last block is cut to
``input_length``.

Ideal hit rate. With one cache of infinite size, a prompt block is served from cache when an
earlier request already carried the same id (with at least as many tokens); the prompt's hit is
its leading run of such blocks. `ideal_hit_rate` computes that for any trace; the generators
return the closed form for theirs, and the tests hold the two to each other.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvgate.errors import InvalidInput

MOONCAKE_BLOCK_TOKENS = 512
DEFAULT_VOCAB = 32_000
"""Token ids drawn from [0, vocab); a Llama-like vocabulary size (any works)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


class TraceError(InvalidInput):
    """A trace line is malformed; the message names the file and line."""


def load_mooncake(
    path: str | Path,
    *,
    time_scale: float = 1.0,
    max_input_length: int | None = None,
    limit: int | None = None,
) -> list[TraceRequest]:
    """Read a Mooncake trace.

    ``time_scale`` multiplies every timestamp (0.5 replays twice as fast); ``max_input_length``
    cuts longer prompts (and their block list) to that many tokens; ``limit`` keeps the first N
    requests."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if max_input_length is not None and max_input_length < 1:
        raise ValueError(f"max_input_length must be >= 1, got {max_input_length}")
    requests: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                ts = float(raw["timestamp"])
                isl = int(raw["input_length"])
                osl = int(raw["output_length"])
                ids = tuple(int(h) for h in raw["hash_ids"])
            except (ValueError, KeyError, TypeError) as err:
                raise TraceError(f"{path}:{lineno}: not a Mooncake request ({err})") from None
            if isl < 1 or osl < 1:
                raise TraceError(f"{path}:{lineno}: input and output lengths must be >= 1")
            if len(ids) < -(-isl // MOONCAKE_BLOCK_TOKENS):
                raise TraceError(
                    f"{path}:{lineno}: {len(ids)} hash ids cannot cover {isl} input tokens"
                )
            if max_input_length is not None and isl > max_input_length:
                isl = max_input_length
            ids = ids[: -(-isl // MOONCAKE_BLOCK_TOKENS)]
            requests.append(TraceRequest(ts * time_scale, isl, osl, ids))
    return requests


def write_mooncake(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            ts: float | int = int(r.timestamp_ms) if r.timestamp_ms.is_integer() else r.timestamp_ms
            line = {
                "timestamp": ts,
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
            }
            f.write(json.dumps(line) + "\n")


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    # splitmix64's finaliser: a bijection whose every output bit depends on every input bit, so
    # neighbouring (block, position) pairs give unrelated tokens.
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    out: npt.NDArray[np.uint64] = x ^ (x >> np.uint64(31))
    return out


class TokenSynth:
    """Token ids of trace prompts; a pure function of (seed, hash ids, length).

    Blocks are computed once into a table (uint16 or uint32 per token: 45 MB for the 44K blocks
    of the synthetic Mooncake trace), grown as larger ids show up, so that a prompt is a gather
    and a ``tolist`` rather than a hash per token on every replay of every policy."""

    def __init__(
        self,
        seed: int = 0,
        *,
        vocab: int = DEFAULT_VOCAB,
        block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    ) -> None:
        if vocab < 2 or block_tokens < 1:
            raise ValueError("vocab must be >= 2 and block_tokens >= 1")
        self.seed = seed
        self.vocab = vocab
        self.block_tokens = block_tokens
        self._salt = mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0]
        self._dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        self._table = np.zeros((0, block_tokens), dtype=self._dtype)

    def _grow(self, max_id: int) -> None:
        old = len(self._table)
        new = max(max_id + 1, 2 * old)
        ids = np.arange(old, new, dtype=np.uint64)
        positions = np.arange(self.block_tokens, dtype=np.uint64)
        with np.errstate(over="ignore"):
            keys = (ids[:, None] * np.uint64(self.block_tokens) + positions) ^ self._salt
            fresh = (mix64(keys) % np.uint64(self.vocab)).astype(self._dtype)
        self._table = np.concatenate([self._table, fresh])

    def tokens(self, request: TraceRequest) -> list[int]:
        n = request.input_length
        ids = request.hash_ids[: -(-n // self.block_tokens)]
        if max(ids) >= len(self._table):
            self._grow(max(ids))
        out: list[int] = self._table[list(ids)].reshape(-1)[:n].tolist()
        return out


def ideal_hit_rate(requests: Sequence[TraceRequest]) -> float:
    """Cached prompt tokens / prompt tokens with one infinite cache, in arrival order."""
    seen: dict[int, int] = {}
    hits = total = 0
    bt = MOONCAKE_BLOCK_TOKENS
    for r in sorted(requests, key=_arrival):
        total += r.input_length
        hitting = True
        for i, h in enumerate(r.hash_ids):
            size = min(bt, r.input_length - i * bt)
            if hitting and seen.get(h, 0) >= size:
                hits += size
            else:
                hitting = False
            if seen.get(h, 0) < size:
                seen[h] = size
    return hits / total if total else 0.0


def _arrival(r: TraceRequest) -> float:
    return r.timestamp_ms


def sample_prefix_groups(
    requests: Sequence[TraceRequest], every: int, *, offset: int = 0
) -> list[TraceRequest]:
    """A smaller trace with the same reuse: every ``every``-th group of requests that share their
    first block (a conversation, or the users of one system prompt), each group whole, on a
    timeline compressed by ``every`` and starting at 0, so the arrival rate stays about the
    original's. Groups are counted in order of first arrival, from ``offset``.

    Keeping every k-th request instead breaks the groups: on the synthetic Mooncake trace the
    ideal hit rate falls from 0.65 to 0.23 at k = 8, while whole groups keep it (0.67 at 16)."""
    if every < 1 or not 0 <= offset < every:
        raise ValueError(f"need every >= 1 and 0 <= offset < every, got {every}, {offset}")
    ordered = sorted(requests, key=_arrival)
    rank: dict[int, int] = {}
    for r in ordered:
        if r.hash_ids:
            rank.setdefault(r.hash_ids[0], len(rank))
    kept = [r for r in ordered if r.hash_ids and rank[r.hash_ids[0]] % every == offset]
    if not kept:
        return []
    start = kept[0].timestamp_ms
    return [
        TraceRequest(
            round((r.timestamp_ms - start) / every, 3), r.input_length, r.output_length, r.hash_ids
        )
        for r in kept
    ]


def whole_blocks(requests: Iterable[TraceRequest]) -> list[TraceRequest]:
    """Each prompt grown to whole 512-token blocks (``input_length = 512 × len(hash_ids)``): what
    clients that synthesise prompts block by block (aiperf) send, so both replay one trace."""
    return [
        TraceRequest(
            r.timestamp_ms, MOONCAKE_BLOCK_TOKENS * len(r.hash_ids), r.output_length, r.hash_ids
        )
        for r in requests
    ]


@dataclass(frozen=True, slots=True)
class Workload:
    requests: list[TraceRequest]
    ideal_hit_rate: float
    """Known in closed form for the generator's parameters."""


def shared_prefix(
    *,
    groups: int,
    prompts_per_group: int,
    system_blocks: int,
    question_tokens: int,
    output_tokens: int,
    rate_per_s: float,
    seed: int = 0,
) -> Workload:
    """G groups of P prompts; each prompt = its group's system prompt (``system_blocks`` × 512
    tokens) + a question of its own. Arrivals: Poisson at ``rate_per_s``, groups shuffled.

    Ideal hit rate: every prompt but the first of its group hits the whole system prompt, so
    ``(P - 1)·S / (P·(S + Q))`` with S = 512·system_blocks, Q = question_tokens."""
    if min(groups, prompts_per_group, system_blocks, question_tokens, output_tokens) < 1:
        raise ValueError("every size must be >= 1")
    if not rate_per_s > 0:
        raise ValueError("rate_per_s must be > 0")
    rng = random.Random(seed)
    bt = MOONCAKE_BLOCK_TOKENS
    order = [g for g in range(groups) for _ in range(prompts_per_group)]
    rng.shuffle(order)
    question_blocks = -(-question_tokens // bt)
    next_id = groups * system_blocks
    t = 0.0
    requests: list[TraceRequest] = []
    for g in order:
        system = range(g * system_blocks, (g + 1) * system_blocks)
        question = range(next_id, next_id + question_blocks)
        next_id += question_blocks
        isl = system_blocks * bt + question_tokens
        requests.append(TraceRequest(round(t, 3), isl, output_tokens, (*system, *question)))
        t += rng.expovariate(rate_per_s) * 1000.0
    s, q, p = system_blocks * bt, question_tokens, prompts_per_group
    return Workload(requests, (p - 1) * s / (p * (s + q)))


def multi_turn(
    *,
    sessions: int,
    turns: int,
    turn_blocks: int,
    output_tokens: int,
    think_time_s: float,
    session_gap_s: float,
    seed: int = 0,
) -> Workload:
    """Conversations: turn k's prompt is the whole history (k + 1 turns of ``turn_blocks`` × 512
    tokens: what was said before, the previous answer, the new message), so each turn extends
    the last one's prompt. Session i starts at ``i·session_gap_s`` (jittered); its turns follow
    every ``think_time_s`` (open loop, as a trace records them).

    Ideal hit rate: turn k hits k of its k + 1 turn-chunks, so over T turns
    ``sum(k) / sum(k + 1) = (T - 1) / (T + 1)``, whatever the sessions and sizes."""
    if min(sessions, turns, turn_blocks, output_tokens) < 1:
        raise ValueError("every size must be >= 1")
    if think_time_s < 0 or session_gap_s < 0:
        raise ValueError("times must be >= 0")
    rng = random.Random(seed)
    bt = MOONCAKE_BLOCK_TOKENS
    requests: list[TraceRequest] = []
    next_id = 0
    for i in range(sessions):
        # Up to a tenth of the gap of jitter, so sessions do not arrive in lockstep.
        start = (i + rng.uniform(0.0, 0.1)) * session_gap_s * 1000.0
        history: list[int] = []
        for k in range(turns):
            history.extend(range(next_id, next_id + turn_blocks))
            next_id += turn_blocks
            ts = round(start + k * think_time_s * 1000.0, 3)
            requests.append(TraceRequest(ts, len(history) * bt, output_tokens, tuple(history)))
    requests.sort(key=_arrival)
    return Workload(requests, (turns - 1) / (turns + 1))
