"""A test-only scorer that predicts: it scores every endpoint alike and sets a fixed TTFT and
inter-token-gap prediction on each request, so the replay's prediction error is known."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import PluginContext, Scorer
from kvgate.scheduling.request import LLMRequest

PREDICTED_TTFT_S = 0.05
PREDICTED_ITL_S = 0.01


@dataclass(frozen=True, slots=True)
class FixedPredictionParams:
    ttft_s: float = PREDICTED_TTFT_S
    itl_s: float = PREDICTED_ITL_S


class FixedPredictionScorer(Scorer):
    type_name: ClassVar[str] = "fixed-prediction-scorer"
    params_type: ClassVar[type[FixedPredictionParams]] = FixedPredictionParams

    def __init__(self, name: str, params: FixedPredictionParams) -> None:
        super().__init__(name)
        self.params = params

    @classmethod
    def from_config(cls, name: str, params: FixedPredictionParams, context: PluginContext) -> Self:
        return cls(name, params)

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        request.predicted_ttft_s = self.params.ttft_s
        request.predicted_itl_s = self.params.itl_s
        return {ep.address: 1.0 for ep in endpoints}


PLUGINS = ((FixedPredictionScorer.type_name, f"{__name__}:FixedPredictionScorer"),)

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: fixed-prediction-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: fixed-prediction-scorer
  - pluginRef: max-score-picker
"""
