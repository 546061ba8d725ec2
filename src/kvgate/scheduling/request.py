"""The request as the scheduler sees it, and what scheduling makes of it.

An `LLMRequest` has three kinds of fields, filled at three times:

1. **from the client** (set by the EPP before anything runs): ids, model, body, headers, priority;
2. **products** of the prepare phase (`kvgate.scheduling.framework.Product`): tokens and block
   hashes, each endpoint's cached prefix, the in-flight load view, the latency predictions. Each
   is written by the one plugin that declares it produces it, before profiles are picked, so
   every filter, scorer, picker and profile handler may read them;
3. **outputs** written while scheduling and after the pick (routing headers, the decision
   summary, the chosen endpoint's predictions). The EPP reads them to answer Envoy and to export
   metrics; plugins never read another plugin's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from kvgate.fleet.endpoint import Endpoint
from kvgate.tokens.request import RequestKind

LoadTables: TypeAlias = tuple[
    Mapping[str, int], Mapping[str, int], Mapping[str, int], Mapping[str, int], Mapping[str, int]
]
"""Per worker: pending prefill tokens, requests in prefill, requests in flight, active blocks,
context blocks."""


class LoadView(Protocol):
    """The in-flight work the gateway itself has booked on each endpoint (read-only)."""

    def prefill_tokens(self, worker: str) -> int:
        """Prompt tokens booked on ``worker`` whose prefill has not finished."""
        ...

    def active_blocks(self, worker: str) -> int:
        """Distinct KV blocks of the requests in flight on ``worker``."""
        ...

    def context_blocks(self, worker: str) -> int:
        """Prompt blocks of the requests in flight on ``worker``, summed per request (a block
        two of them share counts twice: decoding reads it for each)."""
        ...

    def in_flight(self, worker: str) -> int:
        """Requests booked on ``worker`` and not yet complete."""
        ...

    def prefilling(self, worker: str) -> int:
        """Requests booked on ``worker`` whose first token has not come yet."""
        ...

    def tables(self) -> LoadTables:
        """The five per-worker tables behind the above (absent worker: 0), for reading every
        candidate's load in one pass."""
        ...

    def active_overlaps(self, hashes: Sequence[int]) -> Mapping[str, int]:
        """Per worker, the leading blocks of ``hashes`` that requests in flight there already
        hold (blocks a request sent there would not need to allocate); absent: none."""
        ...


@dataclass(slots=True)
class LatencyPrediction:
    """What one endpoint is predicted to take for this request."""

    ttft_s: float
    """Time to first token: queued prefill work ahead of it plus its own uncached prefill."""
    itl_s: float
    """Inter-token latency once it decodes, from the running batch and KV usage."""
    fixed_ms: float = 0.0
    """The per-step part of the uncalibrated TTFT (what the model calibrates with)."""
    token_ms: float = 0.0
    """The per-token part of the uncalibrated TTFT."""


@dataclass(slots=True)
class LLMRequest:
    request_id: str
    """Unique per scheduled request, made by the gateway: the key of all bookkeeping."""
    model: str
    """Model name the client asked for in the body (``x-gateway-model-name-rewrite`` is not
    trusted: see :mod:`kvgate.extproc.headers`)."""
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
    client_request_id: str | None = None
    """The client's ``x-request-id``, for logs only: clients may repeat it."""
    slo_ttft_s: float | None = None
    """Per-request TTFT objective (``x-slo-ttft-ms``); None: none."""
    slo_itl_s: float | None = None
    """Per-request time-per-output-token objective (``x-slo-tpot-ms``); None: none."""

    # -- products of the prepare phase (Product.TOKENS) -----------------------------------
    tokens: list[int] | None = None
    """The prompt's token ids as the engine will see them."""
    block_size: int | None = None
    block_hashes: Sequence[int] | None = None
    """Sequence hashes of the full blocks of ``tokens``."""
    # Product.PREFIX_OVERLAPS
    overlaps: Mapping[str, int] | None = None
    """Leading blocks of the request each endpoint (by address) is known to cache; absent = 0."""
    # Product.IN_FLIGHT_LOAD
    load: LoadView | None = None
    # Product.LATENCY_PREDICTIONS
    predictions: Mapping[str, LatencyPrediction] | None = None
    """Per endpoint address (the candidates of the profiles that predict)."""

    # -- outputs ------------------------------------------------------------------------
    routing_headers: dict[str, str] = field(default_factory=dict)
    """Headers plugins want set on the routed request (e.g. Dynamo's x-worker-instance-id)."""
    decision_summary: str | None = None
    """One line explaining the pick (for logs and the optional decision header)."""
    predicted_overlap_blocks: int | None = None
    """Leading blocks the chosen endpoint is predicted to hold (for the parity metric)."""
    predicted_ttft_s: float | None = None
    """The chosen endpoint's predicted TTFT (for the prediction-error metric)."""
    predicted_itl_s: float | None = None

    def note_decision(self, text: str) -> None:
        """Add a plugin's part to the one-line explanation of the pick."""
        self.decision_summary = (
            text if not self.decision_summary else f"{self.decision_summary} {text}"
        )


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
    prefill_profile: str | None = None
    """Set when another endpoint prefills the prompt before the primary one decodes
    (disaggregated serving); that profile's first endpoint is the prefill worker."""

    @property
    def primary(self) -> ProfileResult:
        return self.profiles[self.primary_profile]

    @property
    def endpoint(self) -> Endpoint:
        return self.primary.endpoints[0]

    @property
    def prefill_endpoint(self) -> Endpoint | None:
        if self.prefill_profile is None:
            return None
        return self.profiles[self.prefill_profile].endpoints[0]


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


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
    first_token_s: float | None = None
    """Seconds from sending the request on to its first response body chunk."""


class SchedulingError(Exception):
    """Scheduling could not place the request; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
