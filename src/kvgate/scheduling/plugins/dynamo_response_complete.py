"""`dynamo-response-complete`: the seed's cleanup plugin, kept so its config loads unchanged.

In the seed this plugin frees the KV router's bookkeeping when a response ends. kvgate's
`kv-aware-scorer` already frees its own requests on completion and on abort; this plugin makes the
same call for every KV scorer in the configuration, which is idempotent, so configs that list it
behave exactly like configs that don't.
"""

from __future__ import annotations

from typing import ClassVar

from kvgate.scheduling.framework import LLMRequest, Plugin, ResponseInfo, SchedulingResult
from kvgate.scheduling.plugins.kv_aware_scorer import KV_SCORERS_EXTRA, KvAwareScorer
from kvgate.scheduling.registry import NoParams, PluginContext


class DynamoResponseComplete(Plugin):
    type_name: ClassVar[str] = "dynamo-response-complete"
    params_type: ClassVar[type[NoParams]] = NoParams

    def __init__(self, name: str, scorers: list[KvAwareScorer]) -> None:
        super().__init__(name)
        self._scorers = scorers

    @classmethod
    def from_config(
        cls, name: str, params: NoParams, context: PluginContext
    ) -> DynamoResponseComplete:
        scorers = context.extras.setdefault(KV_SCORERS_EXTRA, [])
        return cls(name, scorers)

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        for scorer in self._scorers:
            scorer.release(request.request_id)
