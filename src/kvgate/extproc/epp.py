"""The endpoint picker's ext_proc service: one gRPC stream per HTTP request.

Phases, as Envoy sends them:

1. request headers — remembered; gateway-internal headers a client sent (see
   :mod:`kvgate.extproc.headers`) are never trusted and are removed from the routed request. With
   the request body in a buffered mode Envoy waits for our answer before sending the body, so we
   answer CONTINUE at once and make the routing decision in the body answer; in
   FULL_DUPLEX_STREAMED mode (the GAIE reference) nothing is answered until the body is complete.
   Envoy tells which mode it uses in the first message's ``protocol_config``; without it the
   configured default applies.
2. request body — buffered up to the size limit, then parsed, prepared (tokenized off the event
   loop), scheduled; the answer carries the destination header (the pick, then its ordered
   fallbacks), the same value in ``envoy.lb`` metadata, the routing headers of the plugins and
   ``content-length``, then the body — without any ``nvext`` routing field of the client's — in
   ≤62,000 byte chunks (full duplex) or as a body mutation (buffered).
3. response headers / body — passed straight back; the first body chunk marks the end of prefill,
   the end of the stream completes the request (usage parsed from the final body or last SSE event).
4. a stream that ends any other way (client gone, upstream reset) frees the request's bookkeeping.

The response phase may instead come on a second stream, from an ext_proc filter in
``observability_mode`` (Envoy sends and does not wait, so no response chunk waits for the picker):
when the routing stream's ``protocol_config`` says it gets no response body, the request waits in
the director under a random key of its own, which the routing answer also puts in dynamic metadata
(namespace ``kvgate.epp``, which clients cannot set); the observer's stream carries that metadata
and feeds phase 3 to the routed request. Phase 4 then has two signals: the observer's stream ends,
or the routing stream ends (Envoy closes it when the HTTP stream is gone) and no end of response
arrives within ``observer_grace_s``.

Errors become ImmediateResponses with the documented status codes and an OpenAI-shaped JSON body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from kvgate.extproc import headers as gw
from kvgate.extproc import protocol as proto
from kvgate.extproc.metrics import EppMetrics
from kvgate.extproc.nvext import (
    NVEXT,
    WORKER_ID_HEADER,
    Injected,
    inject_nvext,
    strip_routing_fields,
)
from kvgate.extproc.usage import UsageTracker
from kvgate.fleet.endpoint import Endpoint, EndpointSet
from kvgate.scheduling.request import LLMRequest, ResponseInfo, SchedulingError, SchedulingResult
from kvgate.scheduling.scheduler import Scheduler
from kvgate.tokens.request import request_kind_for_path

log = logging.getLogger(__name__)

# Parsing JSON costs ~1 ms per 100 KB; above this size it moves off the event loop.
_OFFLOAD_PARSE_BYTES = 64 * 1024


@dataclass
class EppOptions:
    max_body_bytes: int = 16 * 1024 * 1024
    """Larger request bodies are refused with 413."""
    max_buffered_bytes: int = 512 * 1024 * 1024
    """All request bodies being buffered at once; past it new bodies get 503 (no memory blow-up
    from a flood of large bodies)."""
    max_concurrent_scheduling: int = 256
    """Requests in prepare/schedule at once; more wait their turn."""
    default_full_duplex: bool = True
    """Body mode assumed when Envoy does not send protocol_config."""
    served_model: str | None = None
    """When set, requests for other models (and not a known adapter) get 404."""
    lora_adapters: frozenset[str] = frozenset()
    priorities: dict[str, int] = field(default_factory=dict)
    """InferenceObjective name → priority (``x-gateway-inference-objective``)."""
    decision_header: bool = False
    """Add ``x-kvgate-decision`` with a summary of the pick to the routed request."""
    inline_nvext: bool = False
    """Merge Dynamo's ``nvext`` routing fields into the body here (the body transformer's job,
    one ext_proc hop less)."""
    observer_replica: str | None = None
    """This replica's name, added to the observer key in the routing answer's metadata
    (``kvgate.epp`` ``replica``), so that a gateway with several replicas can send the observer's
    stream to the one that routed."""
    observer_grace_s: float = 2.0
    """A request whose response goes to an observer stream is completed (as aborted) this long
    after its routing stream ended without the end of the response: the observer's last
    messages travel on another stream and may arrive after the routing stream's end, or never
    (client gone before the response started, observer stream failed)."""


class Director:
    """Everything a request stream needs: endpoints, scheduler, limits, metrics."""

    def __init__(
        self,
        endpoints: EndpointSet,
        scheduler: Scheduler,
        options: EppOptions,
        metrics: EppMetrics,
        *,
        saturation: Callable[[list[Endpoint]], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoints = endpoints
        self.saturated = saturation
        self.scheduler = scheduler
        self.options = options
        self.metrics = metrics
        self.clock = clock
        self._slots = asyncio.Semaphore(options.max_concurrent_scheduling)
        self._buffered = 0
        self.open_streams = 0
        """ext_proc streams being served now (one per HTTP request in flight through Envoy)."""
        self._awaiting_observer: dict[str, RequestStream] = {}
        """Routed requests whose response phase comes on an observer stream, by observer key."""

    def await_observer(self, stream: RequestStream) -> str:
        """Registers ``stream`` for an observer; returns the key the observer will name."""
        key = secrets.token_hex(16)
        self._awaiting_observer[key] = stream
        return key

    def observed(self, observer_key: str) -> RequestStream | None:
        return self._awaiting_observer.get(observer_key)

    def forget_observed(self, observer_key: str) -> None:
        self._awaiting_observer.pop(observer_key, None)

    @property
    def awaiting_observer(self) -> int:
        """Routed requests whose observer stream has not yet completed them."""
        return len(self._awaiting_observer)

    @property
    def buffered_bytes(self) -> int:
        """Request body bytes held by streams still waiting for the end of their body."""
        return self._buffered

    def reserve_body(self, size: int) -> bool:
        if self._buffered + size > self.options.max_buffered_bytes:
            return False
        self._buffered += size
        return True

    def release_body(self, size: int) -> None:
        self._buffered -= size

    def ready(self) -> bool:
        return self.endpoints.known

    async def schedule(self, request: LLMRequest, subset: list[str] | None) -> SchedulingResult:
        candidates = self.endpoints.snapshot()
        if subset is not None:
            allowed = set(subset)
            # The hint names where the data plane may send the request: a Dynamo worker's
            # frontend, other workers themselves.
            candidates = [ep for ep in candidates if ep.route_address in allowed]
            if not candidates:
                raise SchedulingError(503, "no endpoint of the data plane's subset hint is known")
        if not candidates:
            raise SchedulingError(503, "no ready endpoints")
        # A worker whose metrics stopped answering is probably gone: route around it, unless
        # nothing answers at all (then metrics are what is broken, not every worker).
        fresh = [ep for ep in candidates if not ep.metrics.stale]
        candidates = fresh or candidates
        if request.priority < 0 and self.saturated is not None and self.saturated(candidates):
            raise SchedulingError(429, "pool saturated; sheddable request (priority < 0) dropped")
        async with self._slots:
            await self.scheduler.prepare(request, candidates)
            return self.scheduler.schedule(request, candidates)


class RequestStream:
    """State of one ext_proc stream (one HTTP request)."""

    def __init__(self, director: Director) -> None:
        self.director = director
        self.headers: dict[str, str] = {}
        self.full_duplex = director.options.default_full_duplex
        self.responses_here = True
        """This stream gets the response body; False when Envoy's protocol_config says it does
        not (then an observer stream may report the response)."""
        self.body = bytearray()
        self.reserved = 0
        self.request: LLMRequest | None = None
        self.result: SchedulingResult | None = None
        self.response = ResponseInfo()
        self.usage = UsageTracker()
        self.first_chunk_seen = False
        self.completed = False
        self.started = director.clock()
        self.request_id = str(uuid.uuid4())
        """The server-side key of this request's bookkeeping, unique per stream: clients may
        repeat an ``x-request-id`` (by mistake or to free another request's load)."""
        self.client_request_id: str | None = None
        self.observer_key: str | None = None
        """Names this request to the observer filter's stream (through Envoy's dynamic metadata),
        when one reports its response. Not ``request_id``: that one travels to the worker as
        ``x-request-id`` and may come back to the client, and whoever could reach the EPP's port
        with it could end the request."""
        # Envoy skips the request headers phase when so configured (request_header_mode SKIP):
        # a body may come first.
        self.subset: list[str] | None = None
        self.decided = False
        """The request was routed or refused; later request phases (a second end of body, from
        a misbehaving data plane) must not route it again."""

    async def handle(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if msg.HasField("protocol_config"):
            mode = msg.protocol_config.request_body_mode
            self.full_duplex = mode == proto.FULL_DUPLEX or (
                mode in proto.BUFFERED_MODES
                and msg.protocol_config.send_body_without_waiting_for_header_response
            )
            self.responses_here = msg.protocol_config.response_body_mode != proto.BODY_NONE
        kind = msg.WhichOneof("request")
        if self.decided and kind in ("request_headers", "request_body"):
            return []
        if kind == "request_headers":
            return await self._request_headers(msg)
        if kind == "request_body":
            return await self._request_body(msg)
        if kind == "request_trailers":
            return await self._request_trailers(msg)
        if kind == "response_headers":
            return self._response_headers(msg)
        if kind == "response_body":
            return self._response_body(msg)
        if kind == "response_trailers":
            self._complete()
            return [proto.continue_response("response_trailers")]
        return []

    # -- request ---------------------------------------------------------------------------

    async def _request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        self.headers = proto.header_map(msg.request_headers)
        self.client_request_id = self.headers.get("x-request-id") or None
        self.subset = self._subset(msg)
        if msg.request_headers.end_of_stream:
            return await self._route_bodyless()
        if self.full_duplex:
            return []
        return [proto.request_headers_response(self._strip_mutation())]

    def _strip_mutation(self) -> pb.HeaderMutation:
        present = [h for h in gw.GATEWAY_INTERNAL if h in self.headers]
        extra = {} if self.client_request_id else {"x-request-id": self.request_id}
        return proto.header_mutation(extra, present)

    @property
    def log_id(self) -> str:
        """The id logs name a request by: the ``x-request-id`` it travels under."""
        return self.client_request_id or self.request_id

    def _subset(self, msg: pb.ProcessingRequest) -> list[str] | None:
        value = proto.metadata_value(msg, proto.SUBSET_NAMESPACE, proto.SUBSET_KEY)
        if value is None:
            return None
        if isinstance(value, list):
            return [str(v) for v in value]
        return [str(value)]

    async def _request_body(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        chunk = msg.request_body.body
        if chunk:
            if len(self.body) + len(chunk) > self.director.options.max_body_bytes:
                return self._reject(
                    413,
                    f"request body exceeds {self.director.options.max_body_bytes} bytes",
                    "body_too_large",
                )
            if not self.director.reserve_body(len(chunk)):
                return self._reject(503, "gateway is buffering too many request bodies", "overload")
            self.reserved += len(chunk)
            self.body += chunk
        if not msg.request_body.end_of_stream:
            return []
        return await self._route_body()

    async def _request_trailers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if not self.decided:
            out = await self._route_body()
            return [*out, proto.continue_response("request_trailers")]
        return [proto.continue_response("request_trailers")]

    async def _route_bodyless(self) -> list[pb.ProcessingResponse]:
        """GET /v1/models and the like: any ready endpoint will do."""
        self.decided = True
        endpoints = self.director.endpoints.snapshot()
        if self.subset is not None:
            endpoints = [ep for ep in endpoints if ep.route_address in set(self.subset)]
        if not endpoints:
            return self._reject(503, "no ready endpoints", "no_endpoints")
        endpoint = endpoints[int(self.director.clock() * 1000) % len(endpoints)]
        mutation = self._route_mutation([endpoint.route_address], {}, None)
        response = proto.request_headers_response(mutation, clear_route_cache=True)
        response.dynamic_metadata.CopyFrom(proto.lb_metadata([endpoint.route_address]))
        return [response]

    async def _route_body(self) -> list[pb.ProcessingResponse]:
        self.decided = True
        started = self.director.clock()
        body = bytes(self.body)
        try:
            parsed = await self._parse(body)
            request = self._build_request(parsed)
            self.request = request
            result = await self.director.schedule(request, self.subset)
        except SchedulingError as err:
            self.director.metrics.request_errors.labels(code=str(err.status)).inc()
            return self._reject(err.status, str(err), "scheduling")
        finally:
            self.director.release_body(self.reserved)
            self.reserved = 0
            self.body = bytearray()
        self.result = result
        self.director.scheduler.pre_request(request, result)
        if not self.responses_here:
            self.observer_key = self.director.await_observer(self)
        chosen = result.endpoint
        if chosen.destination is not None:
            # Reached through a Dynamo frontend: the request must name the worker, whichever
            # plugins picked it (a direct-mode frontend refuses it otherwise).
            request.routing_headers.setdefault(WORKER_ID_HEADER, str(chosen.worker_instance_id()))
        destinations = [ep.route_address for ep in result.primary.endpoints]
        self.director.metrics.observe_decision(request, result, self.director.clock() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s routed: %s",
                self.log_id,
                request.decision_summary or f"endpoint={destinations[0]}",
            )
        new_body = await self._rewrite_body(body, request)
        changed = new_body is not body
        length = len(new_body) if self.full_duplex or changed else None
        mutation = self._route_mutation(destinations, request.routing_headers, length)
        metadata = proto.lb_metadata(
            destinations,
            observer_key=self.observer_key,
            replica=self.director.options.observer_replica,
        )
        if self.full_duplex:
            head = proto.request_headers_response(mutation, clear_route_cache=True)
            head.dynamic_metadata.CopyFrom(metadata)
            return [head, *proto.streamed_body_responses(new_body)]
        answer = proto.buffered_body_response(
            mutation, new_body if changed else None, clear_route_cache=True
        )
        answer.dynamic_metadata.CopyFrom(metadata)
        return [answer]

    def _route_mutation(
        self, destinations: list[str], routing_headers: dict[str, str], length: int | None
    ) -> pb.HeaderMutation:
        # The same list as the envoy.lb metadata: the GAIE protocol forbids the two to differ.
        headers = {gw.DESTINATION: ",".join(destinations)}
        headers.update(routing_headers)
        if self.director.options.decision_header and self.request is not None:
            headers[gw.DECISION] = self.request.decision_summary or f"endpoint={destinations[0]}"
        if not self.client_request_id:
            headers["x-request-id"] = self.request_id
        if length is not None:
            headers["content-length"] = str(length)
        # Gateway-internal headers a client sent are removed, unless set here (then overwritten).
        remove = [h for h in gw.GATEWAY_INTERNAL if h in self.headers and h not in headers]
        return proto.header_mutation(headers, remove)

    async def _rewrite_body(self, body: bytes, request: LLMRequest) -> bytes:
        """The body to forward: with our ``nvext`` routing fields merged in (inline mode), and
        never with a client's own (any mode: the worker is the picker's choice); ``body`` itself
        when nothing changes."""
        offload = len(body) > _OFFLOAD_PARSE_BYTES
        if self.director.options.inline_nvext:
            if offload:
                result = await asyncio.to_thread(inject_nvext, body, request.routing_headers)
            else:
                result = inject_nvext(body, request.routing_headers)
            if isinstance(result, Injected):
                return result.body
            self.director.metrics.nvext_unchanged.labels(str(result.reason)).inc()
        if NVEXT not in request.body:
            return body
        if offload:
            stripped = await asyncio.to_thread(strip_routing_fields, body)
        else:
            stripped = strip_routing_fields(body)
        return body if stripped is None else stripped

    async def _parse(self, body: bytes) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            if len(body) > _OFFLOAD_PARSE_BYTES:
                parsed = await asyncio.to_thread(json.loads, body)
            else:
                parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise SchedulingError(400, f"request body is not valid JSON: {err}") from None
        except RecursionError:
            raise SchedulingError(400, "request body is nested too deeply") from None
        if not isinstance(parsed, dict):
            raise SchedulingError(
                400, f"request body must be a JSON object, got {type(parsed).__name__}"
            )
        self.director.metrics.stage("parse", time.perf_counter() - started)
        return parsed

    def _build_request(self, body: dict[str, Any]) -> LLMRequest:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise SchedulingError(400, "request body has no 'model' string")
        options = self.director.options
        lora = model if model in options.lora_adapters else None
        if options.served_model and model != options.served_model and lora is None:
            raise SchedulingError(
                404, f"model {model!r} is not served here (serving {options.served_model!r})"
            )
        objective = self.headers.get(gw.OBJECTIVE, "")
        return LLMRequest(
            request_id=self.request_id,
            client_request_id=self.client_request_id,
            model=model,
            kind=request_kind_for_path(self.headers.get(":path", "")),
            body=body,
            headers=self.headers,
            priority=options.priorities.get(objective, 0),
            lora_name=lora,
            stream=bool(body.get("stream")),
            slo_ttft_s=self._slo_seconds(gw.SLO_TTFT),
            slo_itl_s=self._slo_seconds(gw.SLO_TPOT),
        )

    def _slo_seconds(self, header: str) -> float | None:
        raw = self.headers.get(header)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise SchedulingError(400, f"{header} must be a positive number of milliseconds")
        return value / 1000.0

    def _reject(self, status: int, message: str, reason: str) -> list[pb.ProcessingResponse]:
        self.director.release_body(self.reserved)
        self.reserved = 0
        self.body = bytearray()
        self.director.metrics.rejections.labels(code=str(status), reason=reason).inc()
        log.info("request %s rejected with %d: %s", self.log_id, status, message)
        return [proto.immediate_error(status, message, reason=reason)]

    # -- response --------------------------------------------------------------------------

    def _response_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        headers = proto.header_map(msg.response_headers)
        status = headers.get(":status", "")
        self.response.status = int(status) if status.isdigit() else None
        self.response.streaming = headers.get("content-type", "").startswith("text/event-stream")
        served = proto.metadata_value(msg, proto.LB_NAMESPACE, proto.DESTINATION_SERVED_KEY)
        if isinstance(served, str):
            self.response.served_endpoint = served
        if self.request is not None and self.result is not None:
            self.director.scheduler.response_received(self.request, self.result, headers)
        if msg.response_headers.end_of_stream:
            self._complete()
        return [proto.continue_response("response_headers")]

    def _response_body(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        chunk = msg.response_body.body
        end = msg.response_body.end_of_stream
        self._observe_body(chunk, end)
        if self.full_duplex:
            return [proto.echo_response_chunk(chunk, end)]
        return [proto.continue_response("response_body")]

    def observe(self, msg: pb.ProcessingRequest) -> bool:
        """A message of this request's observer stream: the response phase, nothing answered.
        True once the request is complete (nothing more to observe)."""
        kind = msg.WhichOneof("request")
        if kind == "response_headers":
            self._response_headers(msg)
        elif kind == "response_body":
            self._observe_body(msg.response_body.body, msg.response_body.end_of_stream)
        elif kind == "response_trailers":
            self._complete()
        return self.completed

    def observation_ended(self) -> None:
        """No more of the response will be observed: complete the request if its end was not
        seen (client gone, upstream reset, observer stream lost)."""
        self._complete(aborted=True)

    def _observe_body(self, chunk: bytes, end: bool) -> None:
        if self.request is not None and self.result is not None:
            if not self.first_chunk_seen and (chunk or end):
                self.first_chunk_seen = True
                self.director.metrics.observe_ttft(
                    self.request, self.director.clock() - self.started
                )
                self.director.scheduler.response_streaming(self.request, self.result, True)
            self.usage.feed(chunk, streaming=self.response.streaming)
        if end:
            self._complete()

    def _complete(self, *, aborted: bool = False) -> None:
        if self.completed or self.request is None or self.result is None:
            return
        self.completed = True
        if self.observer_key is not None:
            self.director.forget_observed(self.observer_key)
        usage = self.usage.result()
        self.response.prompt_tokens = usage.prompt_tokens
        self.response.completion_tokens = usage.completion_tokens
        self.response.cached_tokens = usage.cached_tokens
        self.response.aborted = aborted
        self.director.scheduler.response_complete(self.request, self.result, self.response)
        self.director.metrics.observe_completion(
            self.request, self.result, self.response, self.director.clock() - self.started
        )

    def close(self) -> None:
        """The stream ended: free anything still held."""
        if self.reserved:
            self.director.release_body(self.reserved)
            self.reserved = 0
        if self.completed:
            return
        if self.observer_key is not None:
            # The HTTP stream is over; the observer's last messages may still be on their way.
            asyncio.get_running_loop().call_later(
                self.director.options.observer_grace_s, self.observation_ended
            )
            return
        self._complete(aborted=True)


async def process_stream(
    director: Director, requests: AsyncIterator[pb.ProcessingRequest]
) -> AsyncIterator[pb.ProcessingResponse]:
    messages = aiter(requests)
    first = await anext(messages, None)
    if first is None:
        return
    if first.observability_mode:
        await _observe_stream(director, first, messages)
        return
    stream = RequestStream(director)
    director.open_streams += 1
    try:
        async for msg in _prepend(first, messages):
            try:
                responses = await stream.handle(msg)
            except Exception:
                log.exception("request %s: internal error in the picker", stream.log_id)
                director.metrics.rejections.labels(code="500", reason="internal").inc()
                yield proto.immediate_error(500, "internal error in the endpoint picker")
                return
            for response in responses:
                yield response
    finally:
        director.open_streams -= 1
        stream.close()


async def _prepend(
    first: pb.ProcessingRequest, rest: AsyncIterator[pb.ProcessingRequest]
) -> AsyncIterator[pb.ProcessingRequest]:
    yield first
    async for msg in rest:
        yield msg


async def _observe_stream(
    director: Director, first: pb.ProcessingRequest, rest: AsyncIterator[pb.ProcessingRequest]
) -> None:
    """An observer filter's stream: Envoy ignores answers, so none are sent. A stream without a
    known routed request (its routing stream refused it, or completed it already) is ended at
    once, which also tells Envoy to send nothing more on it."""
    key = proto.metadata_value(first, proto.OBSERVER_NAMESPACE, proto.OBSERVER_KEY)
    stream = director.observed(key) if isinstance(key, str) else None
    if stream is None:
        director.metrics.observer_streams.labels("unmatched").inc()
        return
    director.metrics.observer_streams.labels("matched").inc()
    try:
        # Ending the call once the response has ended closes Envoy's side too, rather than
        # holding it until Envoy's deferred close (seconds after the HTTP stream).
        if not stream.observe(first):
            async for msg in rest:
                if stream.observe(msg):
                    break
    except Exception:
        # Nothing to answer (Envoy ignores it): the request is completed below, as aborted.
        log.exception("request %s: internal error observing the response", stream.log_id)
    finally:
        stream.observation_ended()


def endpoint_summary(endpoint: Endpoint) -> str:
    return f"{endpoint.address}#{endpoint.worker_instance_id()}"
