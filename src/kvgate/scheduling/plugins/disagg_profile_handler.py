"""`pd-profile-handler`: prefill/decode disaggregation as two scheduling profiles.

The decode profile always runs first. The prefill profile (when configured) runs next if the part
of the prompt the chosen decode worker does not cache is at least ``threshold`` tokens; short
uncached suffixes are cheaper to prefill on the decode worker itself. The uncached part is
``len(tokens) - overlap * block_size`` with the prepare phase's tokens and the decode worker's
overlap (products of the KV scorer), otherwise the prompt's characters / 4. With ``threshold`` 0
(the default) every request with a prefill profile is disaggregated.

With ``decision: predicted`` (kvgate's policy) the prefill profile always runs, and the latency
predictions decide instead (product ``LATENCY_PREDICTIONS`` of ``predicted-latency-scorer``): the
request is prefilled remotely when the prefill worker's predicted TTFT plus the KV transfer
(``transferFixedMs`` + ``transferMsPerToken`` × its uncached tokens) beats the decode worker's
predicted TTFT for prefilling it locally — a decode worker busy decoding, or one without the
prefix, loses to an idle prefill worker that has it. Without predictions (a request kvgate does
not tokenize) the threshold rule applies.

The result's primary profile is decode. The Dynamo routing headers say how the request is served:
``x-dynamo-routing-mode: disaggregated`` plus ``x-prefiller-host-port`` (the prefill worker's
address), or ``aggregated`` when no prefill worker was chosen — including when the prefill profile
found no candidate or chose the decode worker itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import PluginContext, ProfileHandler, Range, SchedulerProfile
from kvgate.scheduling.request import LLMRequest, ProfileResult, SchedulingResult, prompt_chars

ROUTING_MODE_HEADER = "x-dynamo-routing-mode"
PREFILLER_HEADER = "x-prefiller-host-port"
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class PdProfileHandlerParams:
    threshold: Annotated[int, Range(ge=0)] = 0
    """Uncached prompt tokens from which a request is prefilled on a separate worker."""
    decode_profile: str = "decode"
    prefill_profile: str = "prefill"
    decision: Literal["threshold", "predicted"] = "threshold"
    """How remote prefill is decided: the uncached-token threshold, or predicted latency."""
    transfer_fixed_ms: Annotated[float, Range(ge=0)] = 2.0
    """Fixed cost of handing a prefilled KV cache to the decode worker (``predicted``)."""
    transfer_ms_per_token: Annotated[float, Range(ge=0)] = 0.005
    """Per prompt token computed remotely: 112 KiB of KV per token (Qwen3-0.6B) at ~25 GB/s."""
    prefiller_header: Literal["instance-id", "address"] = "instance-id"
    """What ``x-prefiller-host-port`` carries: Dynamo backends (and the body transformer's
    ``nvext.prefill_worker_id``) need the prefill worker's integer instance id despite the
    header's name; llm-d's routing sidecar reads ``ip:port``."""


class PdProfileHandler(ProfileHandler):
    type_name = "pd-profile-handler"
    params_type = PdProfileHandlerParams

    def __init__(self, name: str, params: PdProfileHandlerParams | None = None) -> None:
        super().__init__(name)
        self.params = params or PdProfileHandlerParams()

    @classmethod
    def from_config(cls, name: str, params: PdProfileHandlerParams, context: PluginContext) -> Self:
        return cls(name, params)

    def validate_profiles(self, names: Sequence[str]) -> None:
        decode, prefill = self.params.decode_profile, self.params.prefill_profile
        if decode not in names:
            raise ValueError(
                f"needs a scheduling profile named {decode!r} (parameter decodeProfile); "
                f"configured: {', '.join(names)}"
            )
        extra = [n for n in names if n not in (decode, prefill)]
        if extra:
            raise ValueError(
                f"runs only the profiles {decode!r} and {prefill!r}; {', '.join(extra)} would "
                "never run"
            )

    def pick_profiles(
        self,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult],
    ) -> Sequence[str]:
        decode, prefill = self.params.decode_profile, self.params.prefill_profile
        if decode not in results:
            return (decode,)
        if (
            prefill in profiles
            and prefill not in results
            and results[decode].endpoints
            and (
                self.params.threshold == 0
                or self._predicts(request)
                or uncached_tokens(request, results[decode].endpoints[0]) >= self.params.threshold
            )
        ):
            return (prefill,)
        return ()

    def process_results(
        self, request: LLMRequest, results: Mapping[str, ProfileResult]
    ) -> SchedulingResult:
        decode_name = self.params.decode_profile
        decode = results[decode_name]
        prefill = results.get(self.params.prefill_profile)
        chosen = {decode_name: decode}
        headers = request.routing_headers
        if (
            prefill is not None
            and prefill.endpoints
            and decode.endpoints
            and prefill.endpoints[0].address != decode.endpoints[0].address
            and (
                not self._predicts(request)
                or self._remote_is_faster(request, decode.endpoints[0], prefill.endpoints[0])
            )
        ):
            chosen[self.params.prefill_profile] = prefill
            prefill_profile: str | None = self.params.prefill_profile
            headers[ROUTING_MODE_HEADER] = "disaggregated"
            prefill_worker = prefill.endpoints[0]
            headers[PREFILLER_HEADER] = (
                str(prefill_worker.worker_instance_id())
                if self.params.prefiller_header == "instance-id"
                else prefill_worker.address
            )
        else:
            prefill_profile = None
            headers[ROUTING_MODE_HEADER] = "aggregated"
        return SchedulingResult(decode_name, chosen, prefill_profile)

    def _predicts(self, request: LLMRequest) -> bool:
        return self.params.decision == "predicted" and request.predictions is not None

    def _remote_is_faster(self, request: LLMRequest, decode: Endpoint, prefill: Endpoint) -> bool:
        predictions = request.predictions or {}
        local, remote = predictions.get(decode.address), predictions.get(prefill.address)
        if local is None or remote is None:
            return False
        transfer_ms = (
            self.params.transfer_fixed_ms
            + self.params.transfer_ms_per_token * uncached_tokens(request, prefill)
        )
        return remote.ttft_s + transfer_ms / 1000.0 < local.ttft_s


def uncached_tokens(request: LLMRequest, worker: Endpoint) -> int:
    """Prompt tokens ``worker`` does not cache."""
    if request.tokens is None:
        return prompt_chars(request.body) // CHARS_PER_TOKEN
    cached = 0
    if request.overlaps is not None and request.block_size is not None:
        cached = request.overlaps.get(worker.address, 0) * request.block_size
    return max(0, len(request.tokens) - cached)
