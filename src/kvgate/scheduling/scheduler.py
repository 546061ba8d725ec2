"""The scheduler: runs the configured plugins over one request.

``schedule`` asks the profile handler for profiles until it has none left; each profile runs its
filters in order, then its scorers (each score clamped to [0, 1] and multiplied by the scorer's
weight; the weighted scores summed), then its picker. A profile whose filters leave nothing (or
whose picker picks nothing) yields a result with no endpoints; the handler sees it and decides —
the prefill profile of a disaggregated setup may fail and the request still be served aggregated.
If the primary profile has no endpoint the request is refused: 503 when there were no endpoints at
all, 429 when there were some and all were filtered out.

Request-control hooks (`prepare`, `pre_request`, `response_*`, `endpoints_changed`) fan out to the
plugins that override them; which plugin overrides which hook is worked out once, at construction.
The hooks after the pick run for every plugin even if one of them raises (the error is logged):
one plugin's bug must not leak another's per-request bookkeeping.

Timing: every plugin call is timed with `time.perf_counter` and reported to ``observer(extension
point, plugin, seconds)`` when one is given (the metrics layer's histogram, or a `PluginTimings`
to read totals from). Extension point names follow the reference EPP's metric labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Final

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import (
    LLMRequest,
    Plugin,
    ProfileHandler,
    ProfileResult,
    ResponseInfo,
    SchedulerProfile,
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
        self._prepare = [p for p in plugins if _overrides(p, "prepare")]
        self._pre_request = [p for p in plugins if _overrides(p, "pre_request")]
        self._received = [p for p in plugins if _overrides(p, "response_received")]
        self._streaming = [p for p in plugins if _overrides(p, "response_streaming")]
        self._complete = [p for p in plugins if _overrides(p, "response_complete")]
        self._changed = [p for p in plugins if _overrides(p, "on_endpoints_changed")]

    async def prepare(self, request: LLMRequest) -> None:
        """Run the prepare hooks in configuration order (a later one may use an earlier one's
        product, e.g. hashes of the tokens another produced)."""
        for plugin in self._prepare:
            start = perf_counter()
            await plugin.prepare(request)
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
        for plugin in self._pre_request:
            start = perf_counter()
            try:
                plugin.pre_request(request, result)
            except Exception:
                log.exception("%r failed in pre_request of %s", plugin, request.request_id)
            self._observe(PRE_REQUEST, plugin, start)

    def response_received(
        self, request: LLMRequest, result: SchedulingResult, headers: Mapping[str, str]
    ) -> None:
        for plugin in self._received:
            start = perf_counter()
            try:
                plugin.response_received(request, result, headers)
            except Exception:
                log.exception("%r failed in response_received of %s", plugin, request.request_id)
            self._observe(RESPONSE_RECEIVED, plugin, start)

    def response_streaming(
        self, request: LLMRequest, result: SchedulingResult, first_chunk: bool
    ) -> None:
        for plugin in self._streaming:
            start = perf_counter()
            try:
                plugin.response_streaming(request, result, first_chunk)
            except Exception:
                log.exception("%r failed in response_streaming of %s", plugin, request.request_id)
            self._observe(RESPONSE_STREAMING, plugin, start)

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        for plugin in self._complete:
            start = perf_counter()
            try:
                plugin.response_complete(request, result, response)
            except Exception:
                log.exception("%r failed in response_complete of %s", plugin, request.request_id)
            self._observe(RESPONSE_COMPLETE, plugin, start)

    def endpoints_changed(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        """Fan an endpoint-set change out; fits `EndpointSet.subscribe` as a listener."""
        for plugin in self._changed:
            start = perf_counter()
            try:
                plugin.on_endpoints_changed(joined, left)
            except Exception:
                log.exception("%r failed in on_endpoints_changed", plugin)
            self._observe(ENDPOINTS_CHANGED, plugin, start)

    def _observe(self, point: str, plugin: Plugin, start: float) -> None:
        if self.observer is not None:
            self.observer(point, plugin, perf_counter() - start)
