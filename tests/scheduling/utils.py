"""Builders shared by the scheduling tests: endpoints with metrics, requests, scored lists."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kvgate.fleet.endpoint import Endpoint, EndpointMetrics, Role
from kvgate.scheduling.active import ActiveSequences
from kvgate.scheduling.framework import PluginContext
from kvgate.scheduling.picker_config import load_epp_config
from kvgate.scheduling.request import LLMRequest, SchedulingResult, ScoredEndpoint
from kvgate.scheduling.scheduler import Scheduler
from kvgate.scheduling.services import KvEventTargets, SharedLoad
from kvgate.tokens import ModelTokenizer
from kvgate.tokens.request import RequestKind


def endpoint(
    address: str = "10.0.0.1:8000",
    *,
    waiting: int = 0,
    running: int = 0,
    kv: float = 0.0,
    role: Role = "both",
    labels: Mapping[str, str] | None = None,
    active_loras: Iterable[str] = (),
    waiting_loras: Iterable[str] = (),
    max_loras: int | None = None,
    block_size: int | None = None,
    num_gpu_blocks: int | None = None,
    stale: bool = False,
    updated_at: float | None = None,
    booked_prefilling: int | None = None,
) -> Endpoint:
    return Endpoint(
        address,
        role=role,
        labels=dict(labels or {}),
        metrics=EndpointMetrics(
            waiting=waiting,
            running=running,
            kv_usage=kv,
            block_size=block_size,
            num_gpu_blocks=num_gpu_blocks,
            active_loras=frozenset(active_loras),
            waiting_loras=frozenset(waiting_loras),
            max_loras=max_loras,
            updated_at=updated_at,
            stale=stale,
            booked_prefilling=booked_prefilling,
        ),
    )


def endpoints(count: int, **metrics: Any) -> list[Endpoint]:
    return [endpoint(f"10.0.0.{i + 1}:8000", **metrics) for i in range(count)]


def request(
    body: dict[str, Any] | None = None,
    *,
    request_id: str = "req-1",
    model: str = "m",
    kind: RequestKind | None = "chat",
    lora: str | None = None,
    **products: Any,
) -> LLMRequest:
    if body is None:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return LLMRequest(request_id, model, kind, body, {}, lora_name=lora, **products)


def chat(text: str, *, request_id: str = "req-1", model: str = "m", **body: Any) -> LLMRequest:
    payload = {"model": model, "messages": [{"role": "user", "content": text}], **body}
    return request(payload, request_id=request_id, model=model, kind="chat")


def completion(
    prompt: str, *, request_id: str = "req-1", model: str = "m", **body: Any
) -> LLMRequest:
    payload = {"model": model, "prompt": prompt, **body}
    return request(payload, request_id=request_id, model=model, kind="completions")


def scored(*pairs: tuple[str, float]) -> list[ScoredEndpoint]:
    return [ScoredEndpoint(endpoint(address), score) for address, score in pairs]


def context(seed: int = 7, **kwargs: Any) -> PluginContext:
    return PluginContext(rng_seed=seed, **kwargs)


class ConfiguredScheduler:
    """An EndpointPickerConfig built the way the EPP builds it (block size 16, seed 0), routed
    through the scheduler's hooks in the order the EPP calls them."""

    def __init__(self, config: str, tokenizer: ModelTokenizer) -> None:
        self.events = KvEventTargets()
        self.load = SharedLoad()
        ctx = PluginContext(
            env={"DYNAMO_KV_BLOCK_SIZE": "16"},
            rng_seed=0,
            tokenizer=tokenizer,
            kv_events=self.events,
            shared_load=self.load,
        )
        self.scheduler: Scheduler = load_epp_config(config, context=ctx).scheduler()
        (owner,) = self.load.owners.values()
        self.active: ActiveSequences = owner.router.active
        self.tokenizer = tokenizer

    async def route(
        self, request_id: str, body: dict[str, Any], workers: list[Endpoint]
    ) -> tuple[LLMRequest, SchedulingResult]:
        llm = LLMRequest(request_id, "m", "chat", body, {})
        await self.scheduler.prepare(llm, workers)
        result = self.scheduler.schedule(llm, workers)
        self.scheduler.pre_request(llm, result)
        return llm, result
