"""The routing policies `kvgate simulate` compares, each as an EndpointPickerConfig.

Every policy runs through the EPP's own scheduler and plugins. Two peers' policies have no
kvgate plugin, so they are small plugins here, registered only in the benchmark's registry:

- ``least-loaded-scorer``: 1 for the endpoints with the fewest requests in flight as the router
  counts them (booked at the pick, released at completion), 0 for the rest; the max-score
  picker chooses among equals at random.
- ``sglang-cache-aware-scorer``: SGLang's ``cache_aware`` policy with its defaults. Load is the
  requests in flight the router counts. If ``max - min > balance_abs_threshold`` (64) and
  ``max > min × balance_rel_threshold`` (1.5) the least loaded endpoint wins; otherwise the
  request is matched against the prefixes routed so far: a match rate (matched / prompt
  length) above ``cache_threshold`` (0.3) sends it to the endpoint with the longest match, else
  to the least loaded. The chosen endpoint then records the prompt either way. Every
  ``eviction_interval_s`` (120 s) each endpoint's record is trimmed to ``max_tree_size``
  tokens, least recently used first.

  One simplification: SGLang keeps a character (or token) radix tree; here an endpoint's record
  is the set of chained block hashes of the prompts sent to it, so matches are counted in whole
  blocks (16 tokens by default), as every other index in kvgate does.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final, Self

from kvgate.epp_configs import KVGATE, ROUND_ROBIN, shipped_config
from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import NoParams, PluginContext, Range, Scorer
from kvgate.scheduling.picker_config import API_VERSION, KIND
from kvgate.scheduling.registry import Registry, builtin_registry
from kvgate.scheduling.request import LLMRequest, ResponseInfo, SchedulingResult


class _InFlight:
    """Requests in flight per endpoint, counted by the router itself."""

    __slots__ = ("by_request", "load")

    def __init__(self) -> None:
        self.load: dict[str, int] = {}
        self.by_request: dict[str, str] = {}

    def add(self, request_id: str, address: str) -> None:
        self.by_request[request_id] = address
        self.load[address] = self.load.get(address, 0) + 1

    def done(self, request_id: str) -> None:
        address = self.by_request.pop(request_id, None)
        if address is not None:
            self.load[address] -= 1

    def least_loaded(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        load = self.load
        low = min(load.get(ep.address, 0) for ep in endpoints)
        return [ep for ep in endpoints if load.get(ep.address, 0) == low]


class LeastLoadedScorer(Scorer):
    type_name: ClassVar[str] = "least-loaded-scorer"
    params_type: ClassVar[type[NoParams]] = NoParams

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._inflight = _InFlight()

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        return cls(name)

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        if not endpoints:
            return {}
        return {ep.address: 1.0 for ep in self._inflight.least_loaded(endpoints)}

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        self._inflight.add(request.request_id, result.endpoint.address)

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self._inflight.done(request.request_id)


@dataclass(frozen=True, slots=True)
class SglangCacheAwareParams:
    """SGLang router defaults (``sglang-router``'s ``cache_aware`` policy)."""

    cache_threshold: Annotated[float, Range(ge=0.0, le=1.0)] = 0.3
    balance_abs_threshold: Annotated[int, Range(ge=0)] = 64
    balance_rel_threshold: Annotated[float, Range(ge=1.0)] = 1.5
    eviction_interval_s: Annotated[float, Range(gt=0.0)] = 120.0
    max_tree_size: Annotated[int, Range(ge=1)] = 1 << 26
    """Per endpoint, in tokens."""


class SglangCacheAwareScorer(Scorer):
    type_name: ClassVar[str] = "sglang-cache-aware-scorer"
    params_type: ClassVar[type[SglangCacheAwareParams]] = SglangCacheAwareParams

    def __init__(self, name: str, params: SglangCacheAwareParams, context: PluginContext) -> None:
        super().__init__(name)
        self.params = params
        self._now = context.now
        self._next_eviction = context.now() + params.eviction_interval_s
        self._inflight = _InFlight()
        self._trees: dict[str, OrderedDict[int, None]] = {}
        """Per endpoint: block hashes routed there, least recently used first."""
        self._holders: dict[int, set[str]] = {}
        self._block_tokens = 1
        """Tokens per recorded hash, to size the trees in tokens as SGLang does."""

    @classmethod
    def from_config(cls, name: str, params: SglangCacheAwareParams, context: PluginContext) -> Self:
        return cls(name, params, context)

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        if not endpoints:
            return {}
        self._maybe_evict()
        return {self._choose(request, endpoints).address: 1.0}

    def _choose(self, request: LLMRequest, endpoints: list[Endpoint]) -> Endpoint:
        p = self.params
        load = self._inflight.load
        loads = [load.get(ep.address, 0) for ep in endpoints]
        high, low = max(loads), min(loads)
        # Ties go to the first endpoint in address order, as SGLang's min_by over its worker
        # list does, so the choice is deterministic.
        least = min(self._inflight.least_loaded(endpoints), key=_address)
        if high - low > p.balance_abs_threshold and high > low * p.balance_rel_threshold:
            return least
        hashes = request.block_hashes or ()
        tokens = len(request.tokens or ())
        if not hashes or not tokens:
            return least
        alive = {ep.address for ep in endpoints}
        matched = 0
        holders = self._holders
        for h in hashes:
            still = alive & holders.get(h, set())
            if not still:
                break
            alive = still
            matched += 1
        block = request.block_size or 1
        if matched and matched * block / tokens > p.cache_threshold:
            best = [ep for ep in endpoints if ep.address in alive]
            return min(best, key=lambda ep: (load.get(ep.address, 0), ep.address))
        return least

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        address = result.endpoint.address
        self._inflight.add(request.request_id, address)
        self._block_tokens = request.block_size or 1
        tree = self._trees.setdefault(address, OrderedDict())
        holders = self._holders
        # Back to front, so a prompt's leading blocks are the most recent and trimming takes
        # leaves first.
        for h in reversed(request.block_hashes or ()):
            if h in tree:
                tree.move_to_end(h)
            else:
                tree[h] = None
                holders.setdefault(h, set()).add(address)

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self._inflight.done(request.request_id)

    def _maybe_evict(self) -> None:
        now = self._now()
        if now < self._next_eviction:
            return
        self._next_eviction = now + self.params.eviction_interval_s
        for address, tree in self._trees.items():
            limit = self.params.max_tree_size // self._block_tokens
            while len(tree) > limit:
                h, _ = tree.popitem(last=False)
                owners = self._holders[h]
                owners.discard(address)
                if not owners:
                    del self._holders[h]


def _address(ep: Endpoint) -> str:
    return ep.address


def bench_registry() -> Registry:
    """The EPP's registry plus the two benchmark-only plugins."""
    return builtin_registry().extended(
        [
            (LeastLoadedScorer.type_name, LeastLoadedScorer),
            (SglangCacheAwareScorer.type_name, SglangCacheAwareScorer),
        ]
    )


def _single_scorer(plugin_type: str) -> str:
    """A config for a benchmark-only scorer: not a file of deploy/config, because `kvgate epp`
    has no such plugin."""
    return f"""\
apiVersion: {API_VERSION}
kind: {KIND}
plugins:
- type: single-profile-handler
- name: scorer
  type: {plugin_type}
- name: picker
  type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: scorer
  - pluginRef: picker
"""


# The KV-aware policies cost the most to replay (index updates for every stored and evicted
# block); listing them first lets `kvgate simulate --jobs 2` start them first.
POLICIES: Final[dict[str, str]] = {
    "kv": shipped_config(KVGATE),
    "dynamo": shipped_config("epp-config-dynamo-pinned.yaml"),
    "kv-approx": shipped_config("epp-config-kv-approx.yaml"),
    "gaie-default": shipped_config("epp-config-default.yaml"),
    "sglang-cache-aware": _single_scorer(SglangCacheAwareScorer.type_name),
    "least-loaded": _single_scorer(LeastLoadedScorer.type_name),
    "round-robin": shipped_config(ROUND_ROBIN),
    "random": shipped_config("epp-config-random.yaml"),
}
"""Policy name → EndpointPickerConfig text. ``kv`` is `kvgate up`'s KV configuration; all but the
two benchmark-only scorers are files of deploy/config."""
