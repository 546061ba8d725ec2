"""Fuzz target: ext_proc message sequences against the real EPP, in process.

`ExtProcTarget` runs what `kvgate epp` runs (`EppRuntime`: the seed's EndpointPickerConfig, the
Qwen3 tokenizer, KV events from three simulated engines, metrics scraping) on an event loop of its
own. A case is one to three concurrent streams, each a sequence of Envoy's messages:

- mostly a plausible request (request headers, body in chunks, maybe trailers, then maybe the
  response phases), in any body mode Envoy announces (or none, or an unknown one), then damaged:
  messages dropped (missing phases), repeated, swapped or inserted at random;
- sometimes a random sequence of any messages;
- bodies: chat and completions requests (long prompts, streaming, unknown models, adapters,
  multimodal parts, odd field types, ``nvext``), truncated, with invalid UTF-8 or lone surrogates,
  JSON that is no object, nesting 100,000 deep, random bytes, empty, larger than the limit;
- headers: client-sent routing and gateway headers, repeated and upper-case names, values that
  are not UTF-8, a subset hint of known, unknown or ill-typed endpoints;
- responses: JSON with usage, SSE events, garbage, non-numeric statuses;
- the stream then ends: Envoy half-closes after its last message, or the client goes away (the
  stream is cancelled) after any message.

Each case is driven straight into ``process_stream`` (the handler the gRPC servicer wraps), or in
one case of ten through the real gRPC server over loopback. Afterwards:

- no stream raised and the picker answered no 500 of its own (an exception it caught);
- every immediate answer has a documented status (400, 404, 413, 429, 503), every destination is
  a known endpoint;
- nothing is left behind: no open stream, no buffered request bytes, no in-flight booking in the
  KV scorer, no running request in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from kvgate.extproc.epp import EppOptions, process_stream
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.sim.engine import EngineConfig
from kvgate.sim.fleet import Fleet, FleetConfig
from kvgate.sim.prompts import TokensCodec
from kvgate.sim.timing import PolynomialTiming
from tests.extproc.utils import MODEL, Stack, loopback_epp_settings
from tests.reliability.choices import Choices

MAX_BODY = 256 * 1024
DOCUMENTED_STATUSES = frozenset({400, 404, 413, 429, 503})
ADAPTER = "adapter-a"
STREAM_TIMEOUT_S = 20.0
_MODES = [4, 4, 4, 4, 2, 2, 2, 1, 3, 0, None, 99]  # FULL_DUPLEX_STREAMED .. BUFFERED, none, bogus
_PATHS = ["/v1/chat/completions"] * 7 + ["/v1/completions"] * 2 + [
    "/v1/models", "/", "/v1/embeddings", "/v1/chat/completions?x=1", "",
]  # fmt: skip
_WORDS = ("the gateway routes each request to the worker caching its prefix; " * 3).split()
SYSTEM = "You are the fuzzing assistant. " + " ".join(
    f"Rule {i}: keep block {i} warm." for i in range(60)
)


# -- bodies ---------------------------------------------------------------------------------


def _text(c: Choices) -> str:
    kind = c.integer(0, 9)
    if kind <= 5:
        return " ".join(c.pick(_WORDS) for _ in range(c.integer(0, 20)))
    if kind == 6:
        return SYSTEM * c.integer(1, 12)  # long prompts: up to ~16k tokens
    if kind == 7:
        return c.text(40)
    if kind == 8:
        return "\ud800 lone surrogate"  # valid JSON escape, not valid Unicode text
    return "<|im_start|>assistant\n<think>\n</think>\n<|im_end|>"


def _odd(c: Choices) -> Any:
    return c.pick([None, 0, -1, 1.5, True, "", [], {}, [1], {"a": 1}, "x" * 3, 2**64])


def _content(c: Choices) -> Any:
    kind = c.integer(0, 9)
    if kind <= 6:
        return _text(c)
    if kind == 7:
        parts: list[Any] = [{"type": "text", "text": _text(c)} for _ in range(c.integer(0, 3))]
        if c.boolean():
            parts.insert(
                c.integer(0, len(parts)),
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            )
        return parts
    return _odd(c)


def _chat(c: Choices) -> dict[str, Any]:
    messages: list[Any] = []
    if c.percent(50):
        messages.append({"role": "system", "content": SYSTEM})
    for _ in range(c.integer(0, 4) if c.percent(10) else c.integer(1, 3)):
        role = c.pick(["user", "user", "assistant", "system", "tool", "developer", "robot", ""])
        message: dict[str, Any] = {"role": role, "content": _content(c)}
        if role == "assistant" and c.percent(20):
            message["tool_calls"] = [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": c.pick(['{"a": 1}', "{bad", "[]"])}}
            ]  # fmt: skip
        if c.percent(3):
            message = _odd(c)
        messages.append(message)
    body: dict[str, Any] = {"model": _model(c), "messages": messages}
    if c.percent(3):
        body["messages"] = _odd(c)
    _extras(c, body)
    return body


def _completion(c: Choices) -> dict[str, Any]:
    prompt = c.pick(
        [_text(c), [_text(c), _text(c)], list(range(c.integer(0, 200))), [[1, 2, 3]], "", _odd(c)]
    )
    body: dict[str, Any] = {"model": _model(c), "prompt": prompt}
    _extras(c, body)
    return body


def _model(c: Choices) -> Any:
    return MODEL if c.percent(85) else c.pick([ADAPTER, "other/model", "", 5, None, MODEL.lower()])


def _extras(c: Choices, body: dict[str, Any]) -> None:
    if c.percent(40):
        body["stream"] = c.pick([True, True, False, "yes", 1, None])
        if c.boolean():
            body["stream_options"] = {"include_usage": c.boolean()}
    if c.percent(30):
        body["max_tokens"] = c.pick([1, 16, 0, -1, 10**9, "8", None])
    if c.percent(10):
        body["nvext"] = c.pick(
            [{"backend_instance_id": 1}, {"ignore_eos": True, "decode_worker_id": "2"}, [], "x"]
        )
    if c.percent(5):
        body[c.pick(["tools", "user", "temperature", "cache_salt", "n", "x"])] = _odd(c)


def body_bytes(c: Choices) -> tuple[str, bytes]:
    """A request body and the path it is most likely sent to."""
    path = "/v1/chat/completions"
    kind = c.integer(0, 99)
    if kind < 55:
        data = json.dumps(_chat(c)).encode()
    elif kind < 72:
        data = json.dumps(_completion(c)).encode()
        path = "/v1/completions"
    elif kind < 77:
        data = json.dumps(_odd(c)).encode()
    elif kind < 81:
        depth = c.integer(1, 100_000)
        data = c.pick([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth])
        if c.boolean():  # nesting inside an otherwise good request
            inner = data.decode()
            data = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {inner}}}]}}'
            data = data.encode()
    elif kind < 88:
        data = c.raw(300)
    elif kind < 92:
        data = b""
    else:
        data = json.dumps(_chat(c)).encode()
        data = data + b" " * (MAX_BODY - len(data) + c.integer(-2, 64))  # about the limit
    if kind < 72 and c.percent(20):
        data = _damage(c, data)
    return (path if c.percent(90) else c.pick(_PATHS)), data


def _damage(c: Choices, data: bytes) -> bytes:
    at = c.integer(0, len(data))
    op = c.integer(0, 3)
    if op == 0:
        return data[:at]
    if op == 1:
        return (
            data[:at]
            + c.pick([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xf0\x9f"])
            + data[at:]
        )
    if op == 2:
        return data[:at] + c.raw(8) + data[at:]
    return data + c.pick([b"}", b",", b"\n{}", b"\x00"])


# -- messages -------------------------------------------------------------------------------


def _header_value(key: str, value: str | bytes, c: Choices) -> base_pb2.HeaderValue:
    raw = value if isinstance(value, bytes) else value.encode()
    if c.percent(5):
        return base_pb2.HeaderValue(key=key, value=raw.decode("utf-8", "replace"))
    return base_pb2.HeaderValue(key=key, raw_value=raw)


def headers_message(
    c: Choices, addresses: list[str], *, end_of_stream: bool, path: str | None = None
) -> pb.ProcessingRequest:
    pairs: list[tuple[str, str | bytes]] = [
        (":method", c.pick(["POST", "POST", "POST", "GET", "PUT", ""])),
        (":path", path if path is not None else c.pick(_PATHS)),
        ("content-type", c.pick(["application/json", "application/json", "text/plain", ""])),
    ]
    if c.percent(40):
        pairs.append(("x-request-id", c.pick(["req-1", "req-2", "", "ID-with-ü", c.text(12)])))
    if c.percent(25):
        extra: list[tuple[str, str | bytes]] = [
            ("x-gateway-model-name-rewrite", c.pick([MODEL, "other/model", ADAPTER, ""])),
            ("x-gateway-inference-objective", c.pick(["critical", "sheddable", "", "unknown"])),
            ("x-gateway-destination-endpoint", c.pick([*addresses, "10.9.9.9:1", "a,b"])),
            ("x-worker-instance-id", c.pick(["1", "x"])),
            ("x-prefiller-host-port", "127.0.0.1:1"),
            ("x-dynamo-routing-mode", "prefill"),
            ("content-length", c.pick(["0", "12", "-1", "x"])),
            ("X-Request-Id", "upper"),
            ("x-request-id", b"\xff\xfe not utf-8"),
            (c.text(10) or "k", c.raw(20)),
        ]
        for _ in range(c.integer(1, 4)):
            pairs.append(c.pick(extra))
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[_header_value(k, v, c) for k, v in pairs]),
            end_of_stream=end_of_stream,
        )
    )
    mode = c.pick(_MODES)
    if mode is not None:
        msg.protocol_config.request_body_mode = mode  # type: ignore[assignment]
        msg.protocol_config.response_body_mode = mode  # type: ignore[assignment]
        msg.protocol_config.send_body_without_waiting_for_header_response = c.percent(20)
    if c.percent(10):
        hint = struct_pb2.Struct()
        subset: Any = c.pick(
            [addresses[:1], addresses[1:], [], ["10.9.9.9:1"], 3, True, addresses[0], [1, 2]]
        )
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return msg


def body_messages(c: Choices, body: bytes, *, response: bool = False) -> list[pb.ProcessingRequest]:
    cuts = sorted({c.integer(0, len(body)) for _ in range(c.integer(0, 3))} | {0, len(body)})
    pieces = [body[a:b] for a, b in itertools.pairwise(cuts)] or [b""]
    end = not c.percent(10)  # sometimes the body never ends
    out = []
    for i, piece in enumerate(pieces):
        http = pb.HttpBody(body=piece, end_of_stream=end and i == len(pieces) - 1)
        out.append(
            pb.ProcessingRequest(response_body=http)
            if response
            else pb.ProcessingRequest(request_body=http)
        )
    return out


def _trailers(response: bool) -> pb.ProcessingRequest:
    trailers = pb.HttpTrailers(trailers=base_pb2.HeaderMap())
    if response:
        return pb.ProcessingRequest(response_trailers=trailers)
    return pb.ProcessingRequest(request_trailers=trailers)


def response_messages(c: Choices, addresses: list[str]) -> list[pb.ProcessingRequest]:
    streaming = c.boolean()
    status = c.pick(["200", "200", "200", "500", "429", "abc", ""])
    ctype = "text/event-stream" if streaming else "application/json"
    headers = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=status.encode()),
                    base_pb2.HeaderValue(key="content-type", raw_value=ctype.encode()),
                ]
            ),
            end_of_stream=c.percent(5),
        )
    )
    if c.percent(30):
        served = struct_pb2.Struct()
        served.update({"x-gateway-destination-endpoint-served": c.pick([*addresses, "x", ""])})
        headers.metadata_context.filter_metadata["envoy.lb"].CopyFrom(served)
    details = c.pick([{"cached_tokens": 16}, None, "x", {"cached_tokens": "y"}])
    usage = {"prompt_tokens": c.pick([10, 0, -1, "x", None]), "completion_tokens": 2,
             "prompt_tokens_details": details}  # fmt: skip
    kind = c.integer(0, 9)
    if kind <= 3:
        body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": usage}).encode()
    elif kind <= 6:
        events = [b'data: {"choices": [{"delta": {"content": "h"}}]}\n\n'] * c.integer(0, 3)
        body = (
            b"".join(events) + f"data: {json.dumps({'usage': usage})}\n\ndata: [DONE]\n\n".encode()
        )
    elif kind == 7:
        depth = c.integer(1, 100_000)
        body = b"data: " * c.integer(0, 1) + b"[" * depth + b"]" * depth
    else:
        body = c.raw(200)
    out = [headers, *body_messages(c, body, response=True)]
    if c.percent(10):
        out.append(_trailers(True))
    return out


def random_message(c: Choices, addresses: list[str]) -> pb.ProcessingRequest:
    kind = c.integer(0, 6)
    if kind == 0:
        return headers_message(c, addresses, end_of_stream=c.boolean())
    if kind == 1:
        return pb.ProcessingRequest(
            request_body=pb.HttpBody(body=c.raw(40), end_of_stream=c.boolean())
        )
    if kind == 2:
        return _trailers(c.boolean())
    if kind == 3:
        return response_messages(c, addresses)[0]
    if kind == 4:
        return pb.ProcessingRequest(
            response_body=pb.HttpBody(body=c.raw(40), end_of_stream=c.boolean())
        )
    if kind == 5:
        return pb.ProcessingRequest(observability_mode=True)
    return pb.ProcessingRequest()  # no phase at all


@dataclass
class StreamPlan:
    messages: list[pb.ProcessingRequest]
    cancel_at: int | None
    """Cancel the stream (the client went away) before sending this message; None: half-close
    after the last one."""
    pauses: list[int] = field(default_factory=list)
    """Event-loop turns to yield after each message (interleaves concurrent streams)."""


def stream_plan(c: Choices, addresses: list[str]) -> StreamPlan:
    if c.percent(10):
        messages = [random_message(c, addresses) for _ in range(c.integer(1, 8))]
    else:
        path, body = body_bytes(c)
        bodyless = c.percent(8)
        messages = [headers_message(c, addresses, end_of_stream=bodyless, path=path)]
        if not bodyless:
            messages += body_messages(c, body)
            if c.percent(8):
                messages.append(_trailers(False))
        if c.percent(70):
            messages += response_messages(c, addresses)
        for _ in range(c.integer(0, 3) if c.percent(30) else 0):
            at = c.integer(0, len(messages) - 1)
            op = c.integer(0, 3)
            if op == 0 and len(messages) > 1:
                del messages[at]
            elif op == 1:
                messages.insert(at, messages[at])
            elif op == 2 and at + 1 < len(messages):
                messages[at], messages[at + 1] = messages[at + 1], messages[at]
            else:
                messages.insert(at, random_message(c, addresses))
    cancel_at = c.integer(0, len(messages)) if c.percent(25) else None
    pauses = [c.integer(0, 3) for _ in messages]
    return StreamPlan(messages, cancel_at, pauses)


@dataclass
class Case:
    streams: list[StreamPlan]
    grpc: bool


def case(c: Choices, addresses: list[str]) -> Case:
    use_grpc = c.percent(10)
    count = c.integer(1, 3) if c.percent(30) else 1
    return Case([stream_plan(c, addresses) for _ in range(count)], use_grpc)


# -- the target -------------------------------------------------------------------------------


class _Internal(logging.Handler):
    """Keeps the tracebacks of exceptions the picker caught and answered with a 500."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=out)
    return out.getvalue()


class ExtProcTarget:
    """The EPP and three simulated engines on an event loop of the target's own; use as a context
    manager, then call with a case's bytes."""

    name = "extproc"

    def __init__(self, tokenizer_dir: Path, workdir: Path) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.outcomes: dict[str, int] = {"streams": 0, "grpc_cases": 0, "cancelled": 0,
                                         "routed": 0}  # fmt: skip
        self.internal = _Internal()
        self.stuck = ""
        """Where the event loop's tasks were when a stream did not end in time."""

    def __enter__(self) -> ExtProcTarget:
        self.loop.run_until_complete(self._start())
        logger = logging.getLogger("kvgate.extproc.epp")
        logger.addHandler(self.internal)
        if logger.getEffectiveLevel() > logging.ERROR:
            logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("kvgate.extproc.epp").removeHandler(self.internal)
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    async def _start(self) -> None:
        codec = TokensCodec.load(str(self.tokenizer_dir))
        config = FleetConfig(
            workers=3, base_port=0, events_base_port=0, replay_base_port=0, model=MODEL,
            engine=EngineConfig(num_gpu_blocks=4096, max_model_len=32_768),
            timing=PolynomialTiming(speedup=50.0),
        )  # fmt: skip
        self.fleet = Fleet(config, codec)
        await self.fleet.__aenter__()
        endpoints_file = self.workdir / "endpoints.json"
        settings = loopback_epp_settings(self.tokenizer_dir, endpoints_file)
        settings.options = EppOptions(
            max_body_bytes=MAX_BODY,
            max_buffered_bytes=2 * MAX_BODY,  # two large bodies at once: the next one gets 503
            served_model=MODEL,
            lora_adapters=frozenset({ADAPTER}),
            priorities={"critical": 2, "sheddable": -1},
            # A case announcing no response body (mode NONE) leaves its request to an observer
            # stream, which never comes here: freed once its stream ends, not seconds later.
            observer_grace_s=0.0,
        )
        stack = Stack(self.fleet, None, None, endpoints_file)  # type: ignore[arg-type]
        stack.write_endpoints()
        self.runtime = EppRuntime(settings)
        await self.runtime.__aenter__()
        stack.runtime = self.runtime
        await stack.wait_endpoints(3)
        self.addresses = stack.addresses
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.runtime.bound_ports['grpc']}",
            options=[("grpc.max_send_message_length", 8 * MAX_BODY)],
        )
        self.director = self.runtime.director
        assert self.director is not None

    async def _stop(self) -> None:
        await self.channel.close()
        await self.runtime.__aexit__(None, None, None)
        await self.fleet.__aexit__(None, None, None)

    # -- one case ---------------------------------------------------------------------------

    def __call__(self, data: bytes) -> None:
        plan = case(Choices(data), self.addresses)
        self.internal.records.clear()
        answers = self.loop.run_until_complete(self._run(plan))
        self.check(answers)

    async def _run(self, plan: Case) -> list[pb.ProcessingResponse]:
        drive = self._over_grpc if plan.grpc else self._direct
        self.outcomes["grpc_cases"] += plan.grpc
        results = await asyncio.gather(*(drive(s) for s in plan.streams))
        self.outcomes["streams"] += len(plan.streams)
        await self._settled(plan.grpc)
        return [answer for answers in results for answer in answers]

    async def _direct(self, plan: StreamPlan) -> list[pb.ProcessingResponse]:
        assert self.director is not None
        queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
        answers: list[pb.ProcessingResponse] = []

        async def requests() -> AsyncIterator[pb.ProcessingRequest]:
            while (msg := await queue.get()) is not None:
                yield msg

        async def serve() -> None:
            async for answer in process_stream(self.director, requests()):  # type: ignore[arg-type]
                answers.append(answer)

        task = asyncio.get_running_loop().create_task(serve())
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            for i, msg in enumerate(plan.messages):
                if i == plan.cancel_at:
                    break
                queue.put_nowait(msg)
                for _ in range(plan.pauses[i]):
                    await asyncio.sleep(0)
            if plan.cancel_at is not None and plan.cancel_at < len(plan.messages):
                self.outcomes["cancelled"] += 1
                task.cancel()
            else:
                queue.put_nowait(None)
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
        return answers

    async def _over_grpc(self, plan: StreamPlan) -> list[pb.ProcessingResponse]:
        call = pb_grpc.ExternalProcessorStub(self.channel).Process()
        answers: list[pb.ProcessingResponse] = []

        async def read() -> None:
            while (answer := await call.read()) is not grpc.aio.EOF:
                answers.append(answer)

        reader = asyncio.get_running_loop().create_task(read())
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            cancelled = False
            for i, msg in enumerate(plan.messages):
                if i == plan.cancel_at:
                    cancelled = True
                    break
                try:
                    await call.write(msg)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    # The picker ended the stream: an internal error (checked below), or a
                    # stream opened in observability mode that names no routed request.
                    break
                for _ in range(plan.pauses[i]):
                    await asyncio.sleep(0)
            if cancelled:
                self.outcomes["cancelled"] += 1
                call.cancel()
            else:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.done_writing()
            try:
                await reader
            except (asyncio.CancelledError, grpc.aio.AioRpcError) as err:
                if not cancelled and not _ended_under_a_write(err):
                    raise
        return answers

    async def _settled(self, grpc_used: bool, timeout_s: float = 10.0) -> None:
        """Wait for the picker to have finished every stream. Over gRPC a cancelled stream
        ends on the server a little after the client gave up, and one cancelled at once may
        not even have started there yet: wait for no stream to be open for a while (nor a
        request waiting for an observer: it is freed just after its stream ends)."""
        assert self.director is not None
        quiet_needed = 0.02 if grpc_used else 0.0
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.director.open_streams or self.director.awaiting_observer:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_needed:
                return
            await asyncio.sleep(0.002)
        self.stuck = _task_stacks()

    # -- the properties -----------------------------------------------------------------------

    def bookkeeping(self) -> dict[str, float]:
        held = dict(self.runtime.bookkeeping())
        held["running_requests_metric"] = sum(
            sample.value
            for metric in self.runtime.metrics.running.collect()
            for sample in metric.samples
        )
        return held

    def check(self, answers: list[pb.ProcessingResponse]) -> None:
        assert not self.internal.records, "the picker caught an exception:\n" + "\n".join(
            self.internal.records
        )
        for answer in answers:
            if answer.HasField("immediate_response"):
                status = answer.immediate_response.status.code
                assert status in DOCUMENTED_STATUSES, (status, answer.immediate_response.body)
                key = f"status_{status}"
                self.outcomes[key] = self.outcomes.get(key, 0) + 1
            for phase in ("request_headers", "request_body"):
                if answer.HasField(phase):
                    mutation = getattr(answer, phase).response.header_mutation
                    for h in mutation.set_headers:
                        if h.header.key == "x-gateway-destination-endpoint":
                            assert h.header.raw_value.decode() in self.addresses, h
                            self.outcomes["routed"] += 1
        held = self.bookkeeping()
        assert not any(held.values()), f"left behind after the case: {held}\n{self.stuck}"


def _ended_under_a_write(err: BaseException) -> bool:
    """Whether the picker ended the stream (e.g. one opened as an observer that names no routed
    request) while this client still had a message on its way: the client's gRPC core then
    fails its own send and reports INTERNAL "Internal error from Core". The picker itself never
    answers INTERNAL (its failures are UNKNOWN, and each is caught by the log check)."""
    return (
        isinstance(err, grpc.aio.AioRpcError)
        and err.code() is grpc.StatusCode.INTERNAL
        and "Internal error from Core" in (err.details() or "")
    )
