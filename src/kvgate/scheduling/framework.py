"""The endpoint-picker plugin framework: the request, the extension points, the result.

Per request the scheduler asks the **profile handler** which scheduling profiles to run (one for
aggregated serving; decode then prefill for disaggregated), and runs each profile as
**filters** (drop endpoints) → **scorers** (each returns a score in [0, 1] per endpoint, clamped
by the framework, summed with the profile's weights) → **picker** (the endpoint, plus ordered
fallbacks). Around scheduling, request-control hooks see the request's life:
**prepare** (async, before scheduling: e.g. tokenize off the event loop), **pre_request** (after
the pick: book load, set headers), **response_received** (response headers), **response_streaming**
(each body chunk), **response_complete** (end, error or abort — always called once).

Every plugin has a type name (its registry key) and an instance name (from the config; defaults to
the type). Hooks default to no-ops so a plugin implements only what it needs; the scheduler finds
which hooks a plugin implements once, at configuration time, not per request.

Products that plugins hand to each other are declared fields of `LLMRequest` (tokens, block
hashes, predicted overlap), not a free-form dictionary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvgate.fleet.endpoint import Endpoint
from kvgate.tokens.request import RequestKind


@dataclass(slots=True)
class LLMRequest:
    request_id: str
    model: str
    """Model name the client asked for (after any rewrite)."""
    kind: RequestKind | None
    """chat / completions, or None for an endpoint kvgate does not tokenize."""
    body: dict[str, Any]
    headers: Mapping[str, str]
    """Request headers, lower-case names."""
    priority: int = 0
    """From the InferenceObjective named by ``x-gateway-inference-objective``; < 0: sheddable."""
    lora_name: str | None = None
    """Adapter name when ``model`` names a LoRA adapter rather than the base model."""
    stream: bool = False
    # Products of prepare-phase plugins:
    tokens: list[int] | None = None
    block_hashes: Sequence[int] | None = None
    """Sequence hashes of the full blocks of ``tokens``."""
    predicted_overlap_blocks: int | None = None
    """Leading blocks the chosen endpoint is predicted to hold (set by the KV scorer)."""
    block_size: int | None = None
    predicted_ttft_s: float | None = None
    """Time to first token the policy predicts on the chosen endpoint (set by a predicting
    scorer; benchmarks compare it with what happened)."""
    predicted_itl_s: float | None = None
    """Mean gap between output tokens the policy predicts on the chosen endpoint."""
    routing_headers: dict[str, str] = field(default_factory=dict)
    """Headers plugins want set on the routed request (e.g. Dynamo's x-worker-instance-id)."""
    decision_summary: str | None = None
    """One line explaining the pick (for logs and the optional decision header)."""


@dataclass(slots=True)
class ProfileResult:
    profile: str
    endpoints: list[Endpoint]
    """Picked endpoint first, then fallbacks in order."""
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class SchedulingResult:
    primary_profile: str
    profiles: dict[str, ProfileResult]

    @property
    def primary(self) -> ProfileResult:
        return self.profiles[self.primary_profile]

    @property
    def endpoint(self) -> Endpoint:
        return self.primary.endpoints[0]


@dataclass(slots=True)
class ResponseInfo:
    """What the data plane showed of the response by the time it ended."""

    status: int | None = None
    streaming: bool = False
    served_endpoint: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    aborted: bool = False
    """The stream ended without a complete response (client gone, upstream reset)."""


class SchedulingError(Exception):
    """Scheduling could not place the request; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Plugin:
    type_name: ClassVar[str]

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, type={self.type_name!r})"

    # Request-control hooks (no-ops by default).
    async def prepare(self, request: LLMRequest) -> None:
        """Before scheduling; may await (e.g. tokenize in a worker thread)."""

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
        """The endpoint set changed; drop per-endpoint state of ``left``."""


class Filter(Plugin):
    def filter(self, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        """Score in [0, 1] per endpoint address (higher is better; missing = 0)."""
        raise NotImplementedError


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


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


def prompt_chars(body: Mapping[str, Any]) -> int:
    """Characters of prompt text in an OpenAI body: a cheap size estimate before tokenizing."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    total += len(text)
    return total
