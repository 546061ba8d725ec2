"""The plugin author's contract: what a plugin declares, the hooks it may implement, when they run.

A plugin is a class with

- ``type_name``: its registry key (``kvgate.scheduling.registry.BUILTIN_PLUGINS`` maps it to the
  class); many instances may be configured, each with its own ``name``;
- ``params_type``: a frozen dataclass of its parameters with defaults (`NoParams` if none).
  Fields are written camelCase in the EndpointPickerConfig; bounds as ``Annotated[int,
  Range(ge=1)]``, choices as ``Literal``, durations as ``Annotated[float, SECONDS]``; unknown
  keys and out-of-range values are refused, never replaced;
- ``from_config(name, params, context)``: builds an instance (default: ``cls(name)``). The
  `PluginContext` carries the services a plugin may use (clock, seeded randomness, tokenizer,
  metrics, KV-event targets, shared load); raising ValueError here reports a config error at the
  plugin's parameters;
- ``produces`` / ``consumes``: the `Product` s it writes on the request in `Plugin.prepare`, and
  the ones it needs. A consumed product must have a producer in the configuration (else the
  configuration is refused); producers run before the plugins that consume what they make.

Per request the scheduler calls, in this order:

prepare            (producers only, async, before any profile is picked) make the products:
                   tokenize off the event loop, look up the prefix index, predict latencies;
profile handler    pick the profiles to run; for each profile: **filters** (drop endpoints) →
                   **scorers** (a score in [0, 1] per endpoint, clamped by the framework, summed
                   with the profile's weights) → **picker** (the endpoint, then ordered fallbacks);
pre_request        after the pick, before the request is sent on: book load, set headers;
response_received  response headers; response_streaming: each body chunk (the first one ends
                   prefill); response_complete: end, error or abort — exactly once per request.

Between requests: on_endpoints_changed (joins and leaves, including a worker found dead), and
close when the process stops. Every hook has a no-op default, so a plugin implements only what
it needs; which plugin implements which hook is found once, at configuration time.

Reading rule: filters, scorers, pickers and profile handlers read the client's fields and the
products. Fields written after scheduling (`LLMRequest` outputs) are for the EPP, not for plugins.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.request import (
    LLMRequest,
    ProfileResult,
    ResponseInfo,
    SchedulingResult,
    ScoredEndpoint,
)
from kvgate.scheduling.services import NO_METRICS, KvEventTargets, SchedulingMetrics, SharedLoad
from kvgate.settings import Range

if TYPE_CHECKING:
    from kvgate.tokens import ModelTokenizer

__all__ = [
    "SECONDS",
    "Duration",
    "Filter",
    "NoParams",
    "Picker",
    "Plugin",
    "PluginContext",
    "Product",
    "ProfileHandler",
    "Range",
    "SchedulerProfile",
    "Scorer",
    "WeightedScorer",
]


class Product(enum.Enum):
    """Request data made in the prepare phase; the value is the `LLMRequest` field."""

    TOKENS = "tokens"
    """``tokens``, ``block_size`` and ``block_hashes``."""
    PREFIX_OVERLAPS = "overlaps"
    """Each endpoint's cached leading blocks of the request."""
    IN_FLIGHT_LOAD = "load"
    """A view of the work booked on each endpoint."""
    LATENCY_PREDICTIONS = "predictions"
    """Each endpoint's predicted TTFT and ITL for the request."""


@dataclass(frozen=True, slots=True)
class NoParams:
    """The parameter spec of a plugin that takes none (any key is refused)."""


class Duration:
    """Marks a float parameter written as a Go-style duration (``"200ms"``, ``"1m30s"``) or a
    number of seconds."""


SECONDS: Final = Duration()
"""``Annotated[float, SECONDS]``: a duration parameter, parsed to seconds."""


@dataclass(frozen=True, slots=True)
class PluginContext:
    """The services handed to every plugin constructor."""

    env: Mapping[str, str] = field(default_factory=dict)
    now: Callable[[], float] = time.monotonic
    """Monotonic seconds; the simulator passes its virtual clock."""
    rng_seed: int | None = None
    """None: plugins draw from OS entropy; an int makes every plugin's choices reproducible."""
    tokenizer: ModelTokenizer | None = None
    """The model's tokenizer (the EPP's ``--tokenizer``), shared by plugins that tokenize."""
    requests_carry_tokens: bool = False
    """Every request arrives with its tokens set (trace replay): no tokenizer is needed."""
    metrics: SchedulingMetrics = NO_METRICS
    kv_events: KvEventTargets = field(default_factory=KvEventTargets)
    shared_load: SharedLoad = field(default_factory=SharedLoad)

    def rng(self, plugin_name: str) -> random.Random:
        """A random stream of its own per plugin instance, so that adding a plugin to the
        configuration does not shift the choices of the others."""
        if self.rng_seed is None:
            return random.Random()
        return random.Random(f"{self.rng_seed}/{plugin_name}")


class Plugin:
    type_name: ClassVar[str]
    params_type: ClassVar[type[Any]] = NoParams
    produces: ClassVar[frozenset[Product]] = frozenset()
    consumes: ClassVar[frozenset[Product]] = frozenset()

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Any, context: PluginContext) -> Self:
        return cls(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, type={self.type_name!r})"

    async def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        """Make the declared products for ``request`` given the candidate ``endpoints``; may
        await (e.g. tokenize in a worker thread). Only producers implement it."""

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """After the pick, before the request is sent on."""

    def response_received(
        self, request: LLMRequest, result: SchedulingResult, headers: Mapping[str, str]
    ) -> None:
        """Response headers arrived."""

    def response_streaming(
        self, request: LLMRequest, result: SchedulingResult, first_chunk: bool
    ) -> None:
        """A response body chunk passed; ``first_chunk`` marks the end of prefill."""

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        """The response ended, normally or not; called exactly once per scheduled request."""

    def on_endpoints_changed(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        """The endpoint set changed, or a worker stopped answering (it is in ``left`` and
        rejoins when it answers again): drop per-endpoint state of ``left``."""

    def close(self) -> None:
        """The process is stopping: release threads and other resources."""


class Filter(Plugin):
    def filter(self, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        """Score in [0, 1] per endpoint address (higher is better; missing = 0)."""
        raise NotImplementedError


class Picker(Plugin):
    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        """The chosen endpoint first, then ordered fallbacks; empty if none."""
        raise NotImplementedError


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class SchedulerProfile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None


class ProfileHandler(Plugin):
    def validate_profiles(self, names: Sequence[str]) -> None:
        """At configuration time: raise ValueError (saying what to change) if this handler
        cannot run the configured profiles."""

    def pick_profiles(
        self,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult],
    ) -> Sequence[str]:
        """Profiles to run next given the results so far; empty when done."""
        raise NotImplementedError

    def process_results(
        self, request: LLMRequest, results: Mapping[str, ProfileResult]
    ) -> SchedulingResult:
        raise NotImplementedError
