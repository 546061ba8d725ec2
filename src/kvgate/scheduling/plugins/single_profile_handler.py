"""`single-profile-handler`: run the one configured profile; its result is the answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvgate.scheduling.framework import ProfileHandler, SchedulerProfile
from kvgate.scheduling.request import LLMRequest, ProfileResult, SchedulingResult


class SingleProfileHandler(ProfileHandler):
    type_name = "single-profile-handler"

    def validate_profiles(self, names: Sequence[str]) -> None:
        if len(names) != 1:
            configured = f"{len(names)} are configured ({', '.join(names)})" if names else "none is"
            raise ValueError(
                f"runs exactly one scheduling profile and {configured}; configure one, or use a "
                "multi-profile handler such as pd-profile-handler"
            )

    def pick_profiles(
        self,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult],
    ) -> Sequence[str]:
        return () if results else tuple(profiles)

    def process_results(
        self, request: LLMRequest, results: Mapping[str, ProfileResult]
    ) -> SchedulingResult:
        (name,) = results
        return SchedulingResult(primary_profile=name, profiles=dict(results))
