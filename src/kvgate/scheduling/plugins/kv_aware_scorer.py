"""`kv-aware-scorer`: the seed's ``dyn-kv`` plugin — token-aware, KV-cache-aware selection.

prepare     tokenize the request exactly as the engine will (chat template, tokenizer) in the
            plugin's tokenizer thread, hash the tokens into KV blocks;
score       run the KV router's cost function over the candidates: the router's choice scores 1,
            every other candidate less, ordered by cost (so fallbacks are the next-cheapest);
pre_request book the request on the endpoint finally picked (pending prefill, active blocks; with
            KV events off, the approximate index learns the pick) and set Dynamo's routing headers;
first chunk prefill done: pending prefill released;
complete    request freed (also on abort, so bookkeeping cannot leak).

Each of the last three changes is also told to the scorer's `journal` when one is set: replica
sync (`kvgate.sync`) publishes them so that other EPP replicas count this replica's load.

Configuration comes from the seed's ``DYNAMO_*`` environment variables; ``parameters`` in the
EndpointPickerConfig override them field by field.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.config import ConfigError, KvRouterConfig
from kvgate.scheduling.framework import (
    LLMRequest,
    ResponseInfo,
    SchedulingError,
    SchedulingResult,
    Scorer,
    prompt_chars,
)
from kvgate.scheduling.kv_router import (
    AllWorkersBusy,
    Candidate,
    KvRouter,
    NoCandidates,
    RoundRobin,
    RoutingRequest,
    Selection,
)
from kvgate.scheduling.registry import PluginConfigError, PluginContext
from kvgate.tokens import ModelTokenizer, RequestError
from kvgate.tokens.hashing import lora_seed, sequence_hashes_of

log = logging.getLogger(__name__)

ROUTING_MODE_HEADER = "x-dynamo-routing-mode"
INSTANCE_HEADER = "x-worker-instance-id"
# Below this much prompt text, tokenizing inline is cheaper than a hop to the tokenizer thread.
_INLINE_TOKENIZE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class KvAwareScorerParams:
    """Written camelCase in the config (``blockSize``...); unset = from the DYNAMO_* env."""

    block_size: int | None = None
    use_kv_routing: bool | None = None
    use_kv_events: bool | None = None
    overlap_score_weight: float | None = None
    router_temperature: float | None = None
    busy_threshold: float | None = None
    replica_sync: bool | None = None
    """Share this scorer's in-flight load with other EPP replicas (the EPP connects to NATS)."""
    tokenizer: str | None = None
    """Tokenizer dir or hub id; default: the EPP's ``--tokenizer``."""


class ActiveJournal(Protocol):
    """Told of every change to a scorer's own in-flight bookings; must not block."""

    def added(
        self,
        scorer: str,
        request_id: str,
        worker: str,
        hashes: Sequence[int],
        prefill_tokens: int,
    ) -> None: ...

    def prefill_completed(self, scorer: str, request_id: str) -> None: ...

    def freed(self, scorer: str, request_id: str) -> None: ...


# Keys of PluginContext.extras this plugin reads.
TOKENIZER_EXTRA = "tokenizer"
"""A loaded `ModelTokenizer` (the EPP's ``--tokenizer``), shared with other plugins."""
METRICS_EXTRA = "metrics"
"""The EPP's `EppMetrics`, or absent."""
KV_SCORERS_EXTRA = "kv_scorers"
"""Filled with every built `KvAwareScorer`: the EPP wires their indexes to KV events, and the
cleanup plugin frees their requests."""


class KvAwareScorer(Scorer):
    type_name: ClassVar[str] = "kv-aware-scorer"
    params_type: ClassVar[type[KvAwareScorerParams]] = KvAwareScorerParams

    @classmethod
    def from_config(
        cls, name: str, params: KvAwareScorerParams, context: PluginContext
    ) -> KvAwareScorer:
        try:
            config = cls.build_config(context.env, params)
        except ConfigError as err:
            raise PluginConfigError(
                f"plugin {name}",
                err.reason,
                plugin_name=name,
                plugin_type=cls.type_name,
                parameter=err.field,
            ) from None
        tokenizer = context.extras.get(TOKENIZER_EXTRA)
        if params.tokenizer is not None:
            tokenizer = ModelTokenizer.load(params.tokenizer)
        scorer = cls(
            name,
            config,
            tokenizer if config.use_kv_routing else None,
            clock=context.now,
            seed=context.rng_seed,
            metrics=context.extras.get(METRICS_EXTRA),
        )
        context.extras.setdefault(KV_SCORERS_EXTRA, []).append(scorer)
        return scorer

    def __init__(
        self,
        name: str,
        config: KvRouterConfig,
        tokenizer: ModelTokenizer | None,
        *,
        clock: Any = time.monotonic,
        seed: int | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(name)
        if config.use_kv_routing and tokenizer is None:
            raise ConfigError(
                f"plugin {name!r} (kv-aware-scorer).tokenizer",
                "KV routing needs the model's tokenizer: pass --tokenizer or set the parameter",
            )
        self.config = config
        self.tokenizer = tokenizer
        self.router = KvRouter(config, seed=seed)
        self.round_robin = RoundRobin()
        self.clock = clock
        self.metrics = metrics
        self._pending: dict[str, Selection] = {}
        self.journal: ActiveJournal | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvgate-tokenize")

    @staticmethod
    def build_config(env: Mapping[str, str], params: KvAwareScorerParams) -> KvRouterConfig:
        overrides = {
            "DYNAMO_KV_BLOCK_SIZE": params.block_size,
            "DYNAMO_USE_KV_ROUTING": params.use_kv_routing,
            "DYNAMO_USE_KV_EVENTS": params.use_kv_events,
            "DYNAMO_OVERLAP_SCORE_WEIGHT": params.overlap_score_weight,
            "DYNAMO_ROUTER_TEMPERATURE": params.router_temperature,
            "DYNAMO_BUSY_THRESHOLD": params.busy_threshold,
            "DYNAMO_ROUTER_REPLICA_SYNC": params.replica_sync,
        }
        merged = dict(env)
        for key, value in overrides.items():
            if value is not None:
                merged[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return KvRouterConfig.from_env(merged)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- prepare ---------------------------------------------------------------------------

    async def prepare(self, request: LLMRequest) -> None:
        # Tokens given by the caller (trace replay in `kvgate simulate`) are the engine's tokens.
        if not self.config.use_kv_routing or self.tokenizer is None or request.tokens is not None:
            return
        kind = request.kind or _guess_kind(request.body)
        if kind is None:
            return
        tokenizer = self.tokenizer
        body = request.body
        started = time.perf_counter()
        try:
            if prompt_chars(body) <= _INLINE_TOKENIZE_CHARS:
                tokens = tokenizer.tokenize_request(body, kind)
            else:
                loop = asyncio.get_running_loop()
                tokens = await loop.run_in_executor(
                    self._executor, tokenizer.tokenize_request, body, kind
                )
        except RequestError as err:
            raise SchedulingError(400, f"invalid request: {err}") from None
        tokenized = time.perf_counter()
        block_size = self.config.block_size
        hashes = sequence_hashes_of(tokens, block_size, lora_seed(request.lora_name))
        if self.metrics is not None:
            stages = self.metrics.stage_duration
            stages.labels("tokenize").observe(tokenized - started)
            stages.labels("hash").observe(time.perf_counter() - tokenized)
        request.tokens = tokens
        request.block_hashes = hashes
        request.block_size = block_size

    # -- score -----------------------------------------------------------------------------

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        if not endpoints:
            return {}
        if not self.config.use_kv_routing or request.tokens is None:
            chosen = self.round_robin.pick([Candidate(ep.address) for ep in endpoints])
            return {chosen: 1.0}
        routing = RoutingRequest(
            request.request_id, len(request.tokens), request.block_hashes or []
        )
        candidates = [Candidate(ep.address, ep.metrics.num_gpu_blocks) for ep in endpoints]
        now = self.clock()
        started = time.perf_counter()
        overlaps = self.router.overlaps(routing, now)
        matched = time.perf_counter()
        try:
            selection = self.router.select(routing, candidates, now, overlaps)
        except AllWorkersBusy as err:
            if self.metrics is not None:
                self.metrics.busy_rejections.inc()
            raise SchedulingError(429, str(err)) from None
        except NoCandidates as err:
            raise SchedulingError(503, str(err)) from None
        if self.metrics is not None:
            stages = self.metrics.stage_duration
            stages.labels("match").observe(matched - started)
            stages.labels("score").observe(time.perf_counter() - matched)
        self._pending[request.request_id] = selection
        return _scores(selection)

    # -- lifecycle -------------------------------------------------------------------------

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        chosen = result.endpoint
        request.routing_headers.setdefault(ROUTING_MODE_HEADER, "aggregated")
        request.routing_headers[INSTANCE_HEADER] = str(chosen.worker_instance_id())
        selection = self._pending.pop(request.request_id, None)
        if selection is None or request.tokens is None:
            return
        overlap = selection.overlaps.get(chosen.address, 0)
        if chosen.address != selection.worker:
            selection = replace(selection, worker=chosen.address, overlap_blocks=overlap)
        routing = RoutingRequest(
            request.request_id, len(request.tokens), request.block_hashes or []
        )
        prefill = self.router.book(routing, selection, self.clock())
        if self.journal is not None:
            self.journal.added(
                self.name, request.request_id, chosen.address, routing.hashes, prefill
            )
        request.predicted_overlap_blocks = overlap
        request.decision_summary = (
            f"endpoint={chosen.address} overlap_blocks={overlap} "
            f"best_overlap_blocks={selection.best_overlap} block_size={self.config.block_size}"
        )
        if self.metrics is not None:
            self.metrics.predicted_overlap.observe(overlap)
            self.metrics.predicted_cached_tokens.inc(overlap * self.config.block_size)
            if overlap < selection.best_overlap:
                self.metrics.non_max_overlap_picks.inc()
        log.debug(
            "request %s -> %s overlap=%d best=%d costs=%s",
            request.request_id,
            chosen.address,
            overlap,
            selection.best_overlap,
            {w: round(c, 2) for w, c in selection.costs.items()},
        )

    def response_streaming(
        self, request: LLMRequest, result: SchedulingResult, first_chunk: bool
    ) -> None:
        if (
            first_chunk
            and self.router.mark_prefill_complete(request.request_id)
            and self.journal is not None
        ):
            self.journal.prefill_completed(self.name, request.request_id)

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self.release(request.request_id)

    def release(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        if self.router.free(request_id) and self.journal is not None:
            self.journal.freed(self.name, request_id)

    def on_endpoints_changed(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        for endpoint in left:
            self.router.remove_worker(endpoint.address)


def _scores(selection: Selection) -> dict[str, float]:
    """1 for the router's choice; others in [0, 0.5], cheaper higher (ordered fallbacks)."""
    costs = selection.costs
    low = min(costs.values())
    span = max(costs.values()) - low
    scores = {w: 0.5 * (1 - (c - low) / span) if span > 0 else 0.5 for w, c in costs.items()}
    scores[selection.worker] = 1.0
    return scores


def _guess_kind(body: Mapping[str, Any]) -> Any:
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completions"
    return None
