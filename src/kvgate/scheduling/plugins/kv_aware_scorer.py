"""`kv-aware-scorer`: the seed's ``dyn-kv`` plugin — token-aware, KV-cache-aware selection.

It owns the gateway's view of the workers' KV caches and of the work it sent them, and makes it
available to every other plugin as products of the prepare phase:

prepare     tokenize the request exactly as the engine will (chat template, tokenizer; long
            prompts in the plugin's tokenizer thread), hash the tokens into KV blocks as the
            engine keys them (a ``cache_salt`` in the first block) (``TOKENS``), look up every
            candidate's cached prefix in the index (``PREFIX_OVERLAPS``), and expose the
            in-flight bookkeeping (``IN_FLIGHT_LOAD``);
score       (when a profile references it) the reference router's cost function over the
            candidates: the router's choice scores 1, every other candidate less, ordered by
            cost (so fallbacks are the next-cheapest);
pre_request book the request: on the picked endpoint its uncached prompt as pending prefill and
            its blocks as active; in disaggregated serving the prefill worker gets the prefill
            (released when the first token arrives) and the decode worker the blocks. With KV
            events off, the approximate index learns the pick. Sets Dynamo's routing headers;
first chunk prefill done: pending prefill released;
complete    request freed (also on abort, so bookkeeping cannot leak).

A plugin configured only under ``plugins`` (no profile references it) still does all of this but
never scores: that is how another scorer (``predicted-latency-scorer``) builds on its products.

Each booking change is also told to the plugin's journal when replica sync runs: other EPP
replicas then count this replica's load (`kvgate.scheduling.services.SharedLoad`).

Configuration comes from the seed's ``DYNAMO_*`` environment variables; ``parameters`` in the
EndpointPickerConfig override them field by field.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from kvgate.errors import ConfigError
from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import PluginContext, Product, Scorer
from kvgate.scheduling.kv_router import (
    AllWorkersBusy,
    Candidate,
    KvRouter,
    NoCandidates,
    RoundRobin,
    RoutingRequest,
    Selection,
)
from kvgate.scheduling.registry import PluginConfigError
from kvgate.scheduling.request import (
    LLMRequest,
    ResponseInfo,
    SchedulingError,
    SchedulingResult,
    prompt_chars,
)
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.scheduling.services import NO_METRICS, ActiveJournal, LoadOwner, SchedulingMetrics
from kvgate.tokens import ModelTokenizer, RequestError, TokenizerLoadError
from kvgate.tokens.hashing import lora_seed, salt_extras, sequence_hashes_of
from kvgate.tokens.request import cache_salt
from kvgate.tokens.tokenizer import RoutingTokens

log = logging.getLogger(__name__)

ROUTING_MODE_HEADER = "x-dynamo-routing-mode"
INSTANCE_HEADER = "x-worker-instance-id"
# Below this much text to encode, tokenizing inline is cheaper than a hop to the tokenizer thread.
_INLINE_TOKENIZE_CHARS = 2048
# Above this much prompt text even rendering the template is left to the thread.
_PLAN_ON_LOOP_CHARS = 64 * 1024
PREFILL_KEY_SUFFIX = "#prefill"
"""A disaggregated request's prefill booking is keyed ``<request id>#prefill``."""


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


class KvAwareScorer(Scorer):
    type_name: ClassVar[str] = "kv-aware-scorer"
    params_type: ClassVar[type[KvAwareScorerParams]] = KvAwareScorerParams
    produces: ClassVar[frozenset[Product]] = frozenset(
        {Product.TOKENS, Product.PREFIX_OVERLAPS, Product.IN_FLIGHT_LOAD}
    )

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
        tokenizer = context.tokenizer
        if params.tokenizer is not None:
            try:
                tokenizer = ModelTokenizer.load(params.tokenizer)
            except TokenizerLoadError as err:
                raise PluginConfigError(
                    f"plugin {name}",
                    str(err),
                    plugin_name=name,
                    plugin_type=cls.type_name,
                    parameter="tokenizer",
                ) from None
        if config.use_kv_routing and tokenizer is None and not context.requests_carry_tokens:
            raise PluginConfigError(
                f"plugin {name}",
                "KV routing needs the model's tokenizer: pass --tokenizer or set the parameter",
                plugin_name=name,
                plugin_type=cls.type_name,
                parameter="tokenizer",
            )
        scorer = cls(
            name,
            config,
            tokenizer if config.use_kv_routing else None,
            clock=context.now,
            seed=context.rng_seed,
            metrics=context.metrics,
        )
        if config.use_kv_routing:
            index = scorer.router.event_index
            if index is not None:
                context.kv_events.add(index)
            context.shared_load.add(
                LoadOwner(
                    name,
                    scorer.router,
                    scorer.set_journal,
                    wants_sync=config.replica_sync,
                    namespace=config.namespace,
                )
            )
        return scorer

    def __init__(
        self,
        name: str,
        config: KvRouterConfig,
        tokenizer: ModelTokenizer | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        metrics: SchedulingMetrics = NO_METRICS,
    ) -> None:
        super().__init__(name)
        self.config = config
        self.tokenizer = tokenizer
        self.router = KvRouter(config, seed=seed)
        self.round_robin = RoundRobin()
        self.clock = clock
        self.metrics = metrics
        self.journal: ActiveJournal | None = None
        self._executor: ThreadPoolExecutor | None = None

    def set_journal(self, journal: ActiveJournal) -> None:
        self.journal = journal

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
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- prepare: the products --------------------------------------------------------------

    async def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        if not self.config.use_kv_routing:
            return
        # Tokens given by the caller (trace replay in `kvgate simulate`) are the engine's tokens.
        if request.tokens is None and (
            self.tokenizer is None or not await self._tokenize(request, self.tokenizer)
        ):
            return
        block_size = self.config.block_size
        tokens = request.tokens
        assert tokens is not None
        if request.block_hashes is None or request.block_size != block_size:
            started = time.perf_counter()
            try:
                # The engine salts the first block: salted prompts only match the same salt.
                extras = salt_extras(cache_salt(request.body))
            except RequestError as err:
                raise SchedulingError(400, f"invalid request: {err}") from None
            request.block_hashes = sequence_hashes_of(
                tokens, block_size, lora_seed(request.lora_name), extras=extras
            )
            request.block_size = block_size
            self.metrics.stage("hash", time.perf_counter() - started)
        started = time.perf_counter()
        request.overlaps = self.router.overlaps(self._routing(request), self.clock())
        self.metrics.stage("match", time.perf_counter() - started)
        request.load = self.router.active

    async def _tokenize(self, request: LLMRequest, tokenizer: ModelTokenizer) -> bool:
        kind = request.kind or _guess_kind(request.body)
        if kind is None:
            return False
        body = request.body
        started = time.perf_counter()
        try:
            chars = prompt_chars(body)
            if chars <= _INLINE_TOKENIZE_CHARS:
                routed = tokenizer.tokenize_for_routing(body, kind)
            elif chars > _PLAN_ON_LOOP_CHARS:
                routed = await self._in_thread(tokenizer.tokenize_for_routing, body, kind)
            else:
                # Rendering and the segment-cache lookup are cheap; only encoding what the cache
                # missed is worth the hop to the thread (a warm prompt has little left).
                plan = tokenizer.plan_for_routing(body, kind)
                if plan.missing_chars <= _INLINE_TOKENIZE_CHARS:
                    routed = plan.finish()
                else:
                    routed = await self._in_thread(plan.finish)
        except RequestError as err:
            raise SchedulingError(400, f"invalid request: {err}") from None
        self.metrics.stage("tokenize", time.perf_counter() - started)
        # With media the engine's prompt is only partly known: its known prefix earns prefix
        # credit and load, the rest is not predicted (never a refusal the engine would not give).
        request.tokens = routed.tokens
        return True

    async def _in_thread(self, fn: Callable[..., RoutingTokens], *args: Any) -> RoutingTokens:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvgate-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _routing(self, request: LLMRequest) -> RoutingRequest:
        assert request.tokens is not None
        return RoutingRequest(request.request_id, len(request.tokens), request.block_hashes or [])

    # -- score -----------------------------------------------------------------------------

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        if not endpoints:
            return {}
        if not self.config.use_kv_routing or request.tokens is None:
            chosen = self.round_robin.pick([Candidate(ep.address) for ep in endpoints])
            return {chosen: 1.0}
        candidates = [Candidate(ep.address, ep.metrics.num_gpu_blocks) for ep in endpoints]
        started = time.perf_counter()
        try:
            selection = self.router.select(
                self._routing(request), candidates, self.clock(), dict(request.overlaps or {})
            )
        except AllWorkersBusy as err:
            self.metrics.busy_rejection()
            raise SchedulingError(429, str(err)) from None
        except NoCandidates as err:
            raise SchedulingError(503, str(err)) from None
        self.metrics.stage("score", time.perf_counter() - started)
        log.debug(
            "request %s: cheapest %s, costs %s",
            request.request_id,
            selection.worker,
            {w: round(c, 2) for w, c in selection.costs.items()},
        )
        return _scores(selection)

    # -- lifecycle -------------------------------------------------------------------------

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        chosen = result.endpoint
        request.routing_headers.setdefault(ROUTING_MODE_HEADER, "aggregated")
        request.routing_headers[INSTANCE_HEADER] = str(chosen.worker_instance_id())
        if request.tokens is None or not self.config.use_kv_routing:
            return
        overlaps = request.overlaps or {}
        block_size = self.config.block_size
        routing = self._routing(request)
        now = self.clock()
        prefill_worker = result.prefill_endpoint
        if prefill_worker is None:
            overlap = overlaps.get(chosen.address, 0)
            self._book(request.request_id, chosen, routing, overlap, now)
        else:
            # The prefill worker computes the prompt (minus what it caches) and hands the KV
            # over; the decode worker then holds the blocks with no prefill of its own.
            overlap = overlaps.get(prefill_worker.address, 0)
            self._book(
                request.request_id + PREFILL_KEY_SUFFIX, prefill_worker, routing, overlap, now
            )
            self._book(request.request_id, chosen, routing, None, now)
        best = max((overlaps.get(a, 0) for a in result.primary.scores), default=overlap)
        request.predicted_overlap_blocks = overlap
        request.note_decision(
            f"endpoint={chosen.address} overlap_blocks={overlap} "
            f"best_overlap_blocks={best} block_size={block_size}"
        )
        if prefill_worker is not None:
            request.note_decision(f"prefill_endpoint={prefill_worker.address}")
        self.metrics.picked(overlap, best, block_size)

    def _book(
        self,
        key: str,
        endpoint: Endpoint,
        routing: RoutingRequest,
        overlap_blocks: int | None,
        now: float,
    ) -> None:
        """Book ``routing`` on ``endpoint`` with its uncached prompt as pending prefill, or none
        when ``overlap_blocks`` is None (the prompt is prefilled elsewhere)."""
        if overlap_blocks is None:
            prefill = 0
        else:
            prefill = self.router.uncached_tokens(routing.isl, overlap_blocks)
        worker = endpoint.address
        capacity = endpoint.metrics.num_gpu_blocks
        self.router.book_key(key, worker, routing.hashes, prefill, now, capacity_blocks=capacity)
        if self.journal is not None:
            self.journal.added(self.name, key, worker, routing.hashes, prefill)

    def response_streaming(
        self, request: LLMRequest, result: SchedulingResult, first_chunk: bool
    ) -> None:
        if not first_chunk:
            return
        request_id = request.request_id
        if result.prefill_profile is not None:
            self._free(request_id + PREFILL_KEY_SUFFIX)
        if self.router.mark_prefill_complete(request_id) and self.journal is not None:
            self.journal.prefill_completed(self.name, request_id)

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        if result.prefill_profile is not None:
            self._free(request.request_id + PREFILL_KEY_SUFFIX)
        self._free(request.request_id)

    def _free(self, key: str) -> None:
        if self.router.free(key) and self.journal is not None:
            self.journal.freed(self.name, key)

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
