"""The simulated engine: a vLLM-style continuous-batching scheduler over a paged prefix cache.

One `Engine` is one model replica. It is a plain synchronous object with no clock and no I/O:

- `add_request(req, now)` queues a request;
- `step(now)` runs one scheduler iteration and returns a `StepResult`: how long the forward pass
  takes (from the timing model), which requests produced a token (first tokens, new tokens,
  finishes) and the KV events the step emitted. Everything in the result takes effect at
  ``now + duration``;
- `abort(request_id, now)` drops a request.

Drivers decide what time it is: the wall-clock runner (`kvgate.sim.runner`) steps, sleeps for the
duration, then delivers; the virtual driver (`kvgate.sim.virtual`) advances a virtual clock
instead. Both use this class unchanged, so the live fleet and the offline simulator cannot
disagree about the model.

Scheduling follows vLLM v1: running requests first, in order, each taking the tokens it still
needs (one for a decoding request, a chunk of the prompt for a prefilling one) out of a per-step
token budget (chunked prefill); then waiting requests, first come first served, after a prefix
cache lookup, while the budget, ``max_num_seqs`` and the cache allow. When a running request
needs a block and none is free, the most recently admitted running request is preempted: its
blocks are released and it goes back to the front of the queue to recompute later. A block enters
the prefix cache when its computation is scheduled, as in vLLM's allocate_slots, so a request
scheduled after it (in the same step or a later one) reuses it; its KV events leave with the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvgate.events.types import KvEvent
from kvgate.sim.blocks import BlockTable, PrefixCache
from kvgate.sim.stats import EngineStats
from kvgate.sim.timing import BatchShape, PolynomialTiming, StepTiming

FinishReason = Literal["stop", "length", "abort"]
RequestStatus = Literal["new", "waiting", "running", "finished"]

# Token ids generated when no tokenizer chose a vocabulary: any fixed ids will do.
DEFAULT_OUTPUT_VOCAB: tuple[int, ...] = tuple(range(1000, 1512))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine sizing. Defaults model vLLM serving Qwen3-0.6B on one H100."""

    block_size: int = 16
    """Tokens per KV block (vLLM's default)."""
    num_gpu_blocks: int = 37_500
    """KV capacity: Qwen3-0.6B needs 112 KiB of KV per token; ~600K tokens fit next to the
    weights on an 80 GB H100, i.e. 37,500 blocks of 16."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step, prefill chunks and decodes together."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    max_model_len: int = 40_960
    """Context length (Qwen3-0.6B); prompt + output must fit."""
    watermark: float = 0.01
    """Fraction of blocks kept free when admitting new requests, so running ones can grow."""
    eos_after: int = 128
    """A request that does not ignore EOS stops ("stop") after this many tokens."""

    def __post_init__(self) -> None:
        positive = {
            "block_size": self.block_size,
            "num_gpu_blocks": self.num_gpu_blocks,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "eos_after": self.eos_after,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.max_model_len > self.num_gpu_blocks * self.block_size:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit in the KV cache "
                f"({self.num_gpu_blocks} blocks x {self.block_size} tokens): lower "
                "max_model_len or raise num_gpu_blocks"
            )


class ContextLengthError(ValueError):
    """The prompt plus the requested output does not fit the model's context."""


@dataclass(slots=True, eq=False)
class SimRequest:
    """A generation request and its progress. Fields below ``cache_salt`` are engine-owned."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int | None = None
    """Output token limit; None means up to the context length, as in vLLM."""
    ignore_eos: bool = False
    cache_salt: str | None = None
    """Keys the first block, as in vLLM: only requests with the same salt share cached blocks."""

    status: RequestStatus = field(default="new", init=False)
    token_ids: list[int] = field(default_factory=list, init=False)
    """Prompt then output tokens."""
    num_computed_tokens: int = field(default=0, init=False)
    num_cached_tokens: int = field(default=-1, init=False)
    """Prompt tokens served from the prefix cache at first admission (-1 until admitted)."""
    arrival_time: float = field(default=0.0, init=False)
    first_token_time: float | None = field(default=None, init=False)
    finish_time: float | None = field(default=None, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    num_preemptions: int = field(default=0, init=False)
    blocks: BlockTable = field(default_factory=BlockTable, init=False)
    _output_limit: int = field(default=0, init=False)
    _vocab_offset: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.cache_salt is not None:
            self.blocks = BlockTable(self.cache_salt)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]


@dataclass(slots=True)
class StepResult:
    """The outcome of one step, effective at ``start + duration``.

    ``outputs`` lists each request that produced one token this step (its last token); a request
    with ``num_output_tokens == 1`` got its first token, one with a ``finish_reason`` finished.
    Read them before the next `Engine.step`, which moves them on.
    """

    start: float
    duration: float
    batch: BatchShape
    outputs: list[SimRequest]
    preempted: list[SimRequest]
    events: list[KvEvent]

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def idle(self) -> bool:
        return not self.batch.prefill_tokens and not self.batch.decode_tokens


_EMPTY_BATCH = BatchShape(prefill_tokens=0, decode_tokens=0, decode_kv_usage=0.0)


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        timing: StepTiming | None = None,
        output_vocab: Sequence[int] = DEFAULT_OUTPUT_VOCAB,
    ) -> None:
        self.config = config or EngineConfig()
        self.timing: StepTiming = timing or PolynomialTiming()
        if not output_vocab:
            raise ValueError("output_vocab must not be empty")
        self._vocab = tuple(output_vocab)
        self.cache = PrefixCache(self.config.num_gpu_blocks, self.config.block_size)
        self.stats = EngineStats()
        self._waiting: deque[SimRequest] = deque()
        self._running: list[SimRequest] = []
        self._requests: dict[str, SimRequest] = {}
        self._watermark_blocks = int(self.config.watermark * self.config.num_gpu_blocks)

    # -- state -----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    def waiting_requests(self) -> tuple[SimRequest, ...]:
        """The queue, next to be admitted first (a copy; O(n))."""
        return tuple(self._waiting)

    def running_requests(self) -> tuple[SimRequest, ...]:
        """The running batch in scheduling order (a copy; O(n))."""
        return tuple(self._running)

    # -- requests --------------------------------------------------------------------------

    def add_request(self, req: SimRequest, now: float) -> None:
        """Queue ``req``; raises ValueError (`ContextLengthError`) if it cannot be served."""
        if req.status != "new":
            raise ValueError(f"request {req.request_id!r} was already submitted")
        if req.request_id in self._requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        n_prompt = len(req.prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        max_len = self.config.max_model_len
        wanted = n_prompt + (req.max_tokens or 1)
        if wanted > max_len:
            raise ContextLengthError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {wanted} tokens ({n_prompt} in the prompt, "
                f"{wanted - n_prompt} in the completion). Please reduce the length of the "
                "prompt or of the completion."
            )
        req._output_limit = req.max_tokens or max_len - n_prompt
        req._vocab_offset = n_prompt * 31
        req.token_ids = list(req.prompt_token_ids)
        req.arrival_time = now
        req.status = "waiting"
        self._requests[req.request_id] = req
        self._waiting.append(req)

    def abort(self, request_id: str, now: float) -> SimRequest | None:
        """Drop a request wherever it is; returns it, or None if it already finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == "running":
            self._running.remove(req)
            self.cache.release(req.blocks)
        else:
            self._waiting.remove(req)
        self._finish(req, "abort", now)
        return req

    def reset_prefix_cache(self) -> bool:
        """Clear the prefix cache (emits AllBlocksCleared); False while requests hold blocks."""
        return self.cache.reset()

    def take_events(self) -> list[KvEvent]:
        """KV events emitted outside a step (a reset); steps return theirs in `StepResult`."""
        return self.cache.take_events()

    # -- the step --------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        preempted: list[SimRequest] = []
        running = self._running
        bs = self.config.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(len(req.token_ids) - req.num_computed_tokens, budget)
            # Most decode steps stay inside the last block: skip the allocator then.
            if req.num_computed_tokens + n > req.blocks.num_held * bs and not (
                self._grow_or_preempt(req, n, preempted)
            ):
                break
            scheduled.append((req, n))
            budget -= n
            self._cache_scheduled(req, n)
            i += 1
        # As in vLLM: after a preemption the cache is short, so no new request is admitted.
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        if not scheduled:
            return StepResult(now, 0.0, _EMPTY_BATCH, [], preempted, self.cache.take_events())

        batch = self._shape(scheduled)
        duration = self.timing.step_seconds(batch)
        end = now + duration
        outputs: list[SimRequest] = []
        finished = False
        cache = self.cache
        for req, n in scheduled:
            computed = req.num_computed_tokens = req.num_computed_tokens + n
            if computed == len(req.token_ids):
                finished |= self._sample(req, end)
                outputs.append(req)
        if finished:
            for req in outputs:
                if req.finish_reason is not None:
                    cache.release(req.blocks)
                    del self._requests[req.request_id]
            self._running = [r for r in running if r.finish_reason is None]
        self.stats.generation_tokens += len(outputs)
        return StepResult(now, duration, batch, outputs, preempted, cache.take_events())

    def _grow_or_preempt(self, req: SimRequest, n: int, preempted: list[SimRequest]) -> bool:
        """Give ``req`` blocks for ``n`` more tokens, preempting from the back; False if ``req``
        itself had to go."""
        running = self._running
        while not self.cache.grow(req.blocks, req.num_computed_tokens + n):
            victim = running.pop()
            self.cache.release(victim.blocks)
            victim.num_computed_tokens = 0
            victim.num_preemptions += 1
            victim.status = "waiting"
            self._waiting.appendleft(victim)
            self.stats.preemptions += 1
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, budget: int, scheduled: list[tuple[SimRequest, int]]) -> int:
        waiting = self._waiting
        running = self._running
        cache = self.cache
        bs = self.config.block_size
        max_seqs = self.config.max_num_seqs
        while waiting and budget > 0 and len(running) < max_seqs:
            req = waiting[0]
            tokens = req.token_ids
            # At least one token must be computed to produce logits, so a fully cached prompt
            # recomputes its last block (vLLM does the same).
            hits = cache.match_prefix(req.blocks, tokens, (len(tokens) - 1) // bs)
            computed = hits * bs
            n = min(len(tokens) - computed, budget)
            # With nothing running every block is reclaimable: skip the watermark, or a prompt
            # close to the cache size could never start.
            reserve = self._watermark_blocks if running else 0
            if not cache.admit(req.blocks, hits, computed + n, reserve):
                break
            waiting.popleft()
            req.num_computed_tokens = computed
            req.status = "running"
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed
                stats = self.stats
                stats.prompt_tokens += req.num_prompt_tokens
                stats.prefix_cache_queries += req.num_prompt_tokens
                stats.prefix_cache_hits += computed
            running.append(req)
            scheduled.append((req, n))
            budget -= n
            self._cache_scheduled(req, n)
        return budget

    def _cache_scheduled(self, req: SimRequest, n: int) -> None:
        """Enter the blocks the step will fill into the prefix cache now, at scheduling, as
        vLLM's allocate_slots does: a request scheduled after this one, in this step or while
        this one's prefill is still running, reuses them instead of computing them again (each
        layer writes the step's new KV before attention reads it)."""
        end = req.num_computed_tokens + n
        if end // self.config.block_size > req.blocks.num_committed:
            self.cache.commit(req.blocks, req.token_ids, end)

    def _shape(self, scheduled: list[tuple[SimRequest, int]]) -> BatchShape:
        prefill = decode = context = 0
        for req, n in scheduled:
            # Computing one token past the prompt is a decode; anything else (first prefill,
            # chunk, recompute after preemption) is prefill work on uncached tokens.
            if n == 1 and req.num_computed_tokens >= len(req.prompt_token_ids):
                decode += 1
                context += req.num_computed_tokens + 1
            else:
                prefill += n
        # u: each decoder's own context summed, over the pool's tokens, clamped at 1. Attention
        # reads every request's KV even where requests share blocks, and Dynamo 1.6.1's mocker
        # charges it so (measured: copies of one prompt cost what their summed contexts do).
        if not decode:
            return BatchShape(prefill, 0, 0.0)
        capacity = self.config.num_gpu_blocks * self.config.block_size
        return BatchShape(prefill, decode, min(1.0, context / capacity))

    def _sample(self, req: SimRequest, now: float) -> bool:
        """Append the request's next token; True if it finished."""
        n = len(req.token_ids) - len(req.prompt_token_ids)
        vocab = self._vocab
        req.token_ids.append(vocab[(req._vocab_offset + 7 * n) % len(vocab)])
        n += 1
        if n == 1:
            req.first_token_time = now
            self.stats.ttft.observe(now - req.arrival_time)
        if not req.ignore_eos and n >= self.config.eos_after:
            self._finish(req, "stop", now)
        elif n >= req._output_limit:
            self._finish(req, "length", now)
        return req.finish_reason is not None

    def _finish(self, req: SimRequest, reason: FinishReason, now: float) -> None:
        req.status = "finished"
        req.finish_reason = reason
        req.finish_time = now
        finished = self.stats.finished
        finished[reason] = finished.get(reason, 0) + 1
