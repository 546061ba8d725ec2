"""The scheduler: runs the configured plugins over one request.

``schedule`` asks the profile handler for profiles until it has none left; each profile runs its
filters in order, then its scorers (each score clamped to [0, 1] and multiplied by the scorer's
weight; the weighted scores summed), then its picker. A profile whose filters leave nothing (or
whose picker picks nothing) yields a result with no endpoints; the handler sees it and decides —
the prefill profile of a disaggregated setup may fail and the request still be served aggregated.
If the primary profile has no endpoint the request is refused: 503 when there were no endpoints at
all, 429 when there were some and all were filtered out.

`prepare` runs the producers of the request's products, each after the producers of what it
consumes (`order_producers`, checked once at construction: a consumed product without a producer,
or two producers of one product, is a configuration error). The other hooks (`pre_request`,
`response_*`, `endpoints_changed`, `close`) fan out to the plugins that override them, in
configuration order; which plugin overrides which hook is worked out once, at construction. They
run for every plugin even if one raises (the error is logged): one plugin's bug must not leak
another's per-request bookkeeping.

Timing: every plugin call is timed with `time.perf_counter` and reported to ``observer(extension
point, plugin, seconds)`` when one is given (the metrics layer's histogram, or a `PluginTimings`
to read totals from). Extension point names follow the reference EPP's metric labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Plugin, Product, ProfileHandler, SchedulerProfile
from kvgate.scheduling.request import (
    LLMRequest,
    ProfileResult,
    ResponseInfo,
    SchedulingError,
    SchedulingResult,
    ScoredEndpoint,
)

log = logging.getLogger(__name__)

PREPARE_DATA: Final = "PrepareData"
PROFILE_HANDLER: Final = "ProfileHandler"
FILTER: Final = "Filter"
SCORER: Final = "Scorer"
PICKER: Final = "Picker"
PRE_REQUEST: Final = "PreRequest"
RESPONSE_RECEIVED: Final = "ResponseReceived"
RESPONSE_STREAMING: Final = "ResponseStreaming"
RESPONSE_COMPLETE: Final = "ResponseComplete"
ENDPOINTS_CHANGED: Final = "EndpointsChanged"
CLOSE: Final = "Close"

Observer = Callable[[str, Plugin, float], None]
"""Called with (extension point, plugin, seconds) after every plugin call."""


@dataclass(slots=True)
class TimingStat:
    calls: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


class PluginTimings:
    """An `Observer` that keeps call count, total and maximum time per
    (extension point, plugin type, plugin name)."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str, str], TimingStat] = {}

    def __call__(self, point: str, plugin: Plugin, seconds: float) -> None:
        key = (point, plugin.type_name, plugin.name)
        stat = self.stats.get(key)
        if stat is None:
            stat = self.stats[key] = TimingStat()
        stat.calls += 1
        stat.total_s += seconds
        stat.max_s = max(stat.max_s, seconds)


def _overrides(plugin: Plugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


def order_producers(plugins: Sequence[Plugin]) -> list[Plugin]:
    """The plugins that make products, each after the producers of what it consumes.

    Raises ValueError (saying what to change) when a plugin consumes a product nobody makes, two
    plugins make the same product, producers depend on each other in a cycle, or a plugin
    implements `Plugin.prepare` without declaring what it produces."""
    makers: dict[Product, Plugin] = {}
    for plugin in plugins:
        if _overrides(plugin, "prepare") and not plugin.produces:
            raise ValueError(
                f"{plugin!r} implements prepare but declares no product (class attribute "
                "produces): prepare is where products are made"
            )
        for product in plugin.produces:
            other = makers.setdefault(product, plugin)
            if other is not plugin:
                raise ValueError(
                    f"plugins {other.name!r} and {plugin.name!r} both produce "
                    f"{product.value!r}; configure one and reference it from every profile"
                )
    for plugin in plugins:
        for product in sorted(plugin.consumes, key=lambda p: p.value):
            if product not in makers:
                raise ValueError(
                    f"plugin {plugin.name!r} (type {plugin.type_name!r}) needs "
                    f"{product.value!r}, which no configured plugin produces"
                )
    ordered: list[Plugin] = []
    state: dict[int, bool] = {}  # id -> finished (False while being visited)

    def visit(plugin: Plugin) -> None:
        seen = state.get(id(plugin))
        if seen:
            return
        if seen is False:
            raise ValueError(f"producers depend on each other in a cycle through {plugin.name!r}")
        state[id(plugin)] = False
        for product in sorted(plugin.consumes, key=lambda p: p.value):
            visit(makers[product])
        state[id(plugin)] = True
        ordered.append(plugin)

    for plugin in plugins:
        if plugin.produces:
            visit(plugin)
    return ordered


def _implementing(plugins: Sequence[Plugin], hook: str) -> list[tuple[Plugin, Callable[..., None]]]:
    return [(p, getattr(p, hook)) for p in plugins if _overrides(p, hook)]


class Scheduler:
    def __init__(
        self,
        profile_handler: ProfileHandler,
        profiles: Mapping[str, SchedulerProfile],
        all_plugins: Sequence[Plugin],
        *,
        observer: Observer | None = None,
    ) -> None:
        self.profile_handler = profile_handler
        self.profiles = dict(profiles)
        for name, profile in self.profiles.items():
            if profile.picker is None:
                raise ValueError(f"scheduling profile {name!r} has no picker")
        # Hooks run in configuration order; plugins reachable only through the handler or a
        # profile (not listed in all_plugins) follow.
        unique: dict[int, Plugin] = {}
        for plugin in (*all_plugins, profile_handler):
            unique.setdefault(id(plugin), plugin)
        for profile in self.profiles.values():
            for plugin in (*profile.filters, *(ws.scorer for ws in profile.scorers)):
                unique.setdefault(id(plugin), plugin)
            assert profile.picker is not None
            unique.setdefault(id(profile.picker), profile.picker)
        plugins = self.plugins = tuple(unique.values())
        self.observer = observer
        self._prepare = order_producers(plugins)
        self._pre_request = _implementing(plugins, "pre_request")
        self._received = _implementing(plugins, "response_received")
        self._streaming = _implementing(plugins, "response_streaming")
        self._complete = _implementing(plugins, "response_complete")
        self._changed = _implementing(plugins, "on_endpoints_changed")
        self._close = _implementing(plugins, "close")

    async def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        """Run the producers, each after those it depends on."""
        for plugin in self._prepare:
            start = perf_counter()
            await plugin.prepare(request, endpoints)
            self._observe(PREPARE_DATA, plugin, start)

    def schedule(self, request: LLMRequest, endpoints: list[Endpoint]) -> SchedulingResult:
        """Place the request; raises `SchedulingError` (503 / 429) when it cannot be placed."""
        if not endpoints:
            raise SchedulingError(503, "no endpoints are available")
        handler = self.profile_handler
        results: dict[str, ProfileResult] = {}
        failures: dict[str, SchedulingError] = {}
        while True:
            start = perf_counter()
            names = handler.pick_profiles(request, self.profiles, results)
            self._observe(PROFILE_HANDLER, handler, start)
            if not names:
                break
            for name in names:
                profile = self.profiles.get(name)
                if profile is None or name in results:
                    raise SchedulingError(
                        500,
                        f"profile handler {handler.name!r} asked for "
                        f"{'unknown' if profile is None else 'already run'} profile {name!r}",
                    )
                results[name] = self._run_profile(profile, request, endpoints, failures)
        start = perf_counter()
        result = handler.process_results(request, results)
        self._observe(PROFILE_HANDLER, handler, start)
        if not result.primary.endpoints:
            raise failures.get(result.primary_profile) or SchedulingError(
                429, f"profile {result.primary_profile!r} picked no endpoint"
            )
        return result

    def _run_profile(
        self,
        profile: SchedulerProfile,
        request: LLMRequest,
        endpoints: list[Endpoint],
        failures: dict[str, SchedulingError],
    ) -> ProfileResult:
        candidates = endpoints
        for f in profile.filters:
            start = perf_counter()
            candidates = f.filter(request, candidates)
            self._observe(FILTER, f, start)
            if not candidates:
                failures[profile.name] = SchedulingError(
                    429,
                    f"profile {profile.name!r}: filter {f.name!r} left none of "
                    f"{len(endpoints)} endpoints",
                )
                return ProfileResult(profile.name, [])
        totals = dict.fromkeys((ep.address for ep in candidates), 0.0)
        for weighted in profile.scorers:
            scorer, weight = weighted.scorer, weighted.weight
            start = perf_counter()
            scores = scorer.score(request, candidates)
            self._observe(SCORER, scorer, start)
            # Iterate what the scorer returned (sparse scorers return few entries); an address
            # that is not a candidate is ignored. `not s >= 0` also catches NaN.
            for address, s in scores.items():
                if address in totals:
                    if not s >= 0.0:
                        continue
                    totals[address] += weight * (1.0 if s > 1.0 else s)
        picker = profile.picker
        assert picker is not None
        scored = [ScoredEndpoint(ep, totals[ep.address]) for ep in candidates]
        start = perf_counter()
        picked = picker.pick(request, scored)
        self._observe(PICKER, picker, start)
        if not picked:
            failures[profile.name] = SchedulingError(
                429, f"profile {profile.name!r}: picker {picker.name!r} picked no endpoint"
            )
        return ProfileResult(profile.name, picked, totals)

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        self._fan_out(PRE_REQUEST, self._pre_request, request.request_id, request, result)

    def response_received(
        self, request: LLMRequest, result: SchedulingResult, headers: Mapping[str, str]
    ) -> None:
        self._fan_out(
            RESPONSE_RECEIVED, self._received, request.request_id, request, result, headers
        )

    def response_streaming(
        self, request: LLMRequest, result: SchedulingResult, first_chunk: bool
    ) -> None:
        self._fan_out(
            RESPONSE_STREAMING, self._streaming, request.request_id, request, result, first_chunk
        )

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self._fan_out(
            RESPONSE_COMPLETE, self._complete, request.request_id, request, result, response
        )

    def endpoints_changed(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        """Fan an endpoint-set change out; fits `EndpointSet.subscribe` as a listener."""
        self._fan_out(ENDPOINTS_CHANGED, self._changed, None, joined, left)

    def close(self) -> None:
        self._fan_out(CLOSE, self._close, None)

    def _fan_out(
        self,
        point: str,
        hooks: list[tuple[Plugin, Callable[..., None]]],
        request_id: str | None,
        *args: Any,
    ) -> None:
        for plugin, hook in hooks:
            start = perf_counter()
            try:
                hook(*args)
            except Exception:
                log.exception(
                    "%r failed in %s%s",
                    plugin,
                    point,
                    "" if request_id is None else f" of request {request_id}",
                )
            self._observe(point, plugin, start)

    def _observe(self, point: str, plugin: Plugin, start: float) -> None:
        if self.observer is not None:
            self.observer(point, plugin, perf_counter() - start)
