"""vLLM-compatible HTTP front of one simulated engine (aiohttp), plus its KV event publisher.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (SSE streaming or not, ``stream_options.include_usage``,
``usage.prompt_tokens_details.cached_tokens``), ``POST /tokenize``, ``GET /metrics``; for other
routers fronting the same fleet, vLLM's ``POST /v1/chat/completions/render`` and
``/v1/completions/render`` and SGLang's ``GET /get_model_info``, ``/get_server_info``,
``/get_load``; for tests and benchmarks, vLLM's ``POST /reset_prefix_cache``.

Every response names the worker that produced it: ``x-kvgate-worker: <host:port>`` and
``x-worker-instance-id-served: <instance id>``. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``; nothing returns a traceback.

Accepted connections get TCP_NODELAY from the event loop's transports and again from aiohttp
(without it a response can wait ~40 ms for the peer's delayed ACK, as seen behind Envoy);
`tests/sim/test_http.py` checks the option on the accepted socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import zmq
from aiohttp import web
from prometheus_client import generate_latest

from kvgate.events.types import KvEvent
from kvgate.sim.clock import Clock, WallClock
from kvgate.sim.engine import Engine, FinishReason, SimRequest
from kvgate.sim.metrics import engine_registry
from kvgate.sim.prompts import PromptCodec
from kvgate.sim.publisher import KvEventPublisher
from kvgate.sim.runner import EngineRunner, TokenStream
from kvgate.sim.wire import EventLayout
from kvgate.tokens import RequestError, RequestKind
from kvgate.tokens.request import cache_salt

log = logging.getLogger(__name__)

WORKER_HEADER: Final = "x-kvgate-worker"
NVEXT_HEADER: Final = "x-kvgate-received-nvext"
"""Response header echoing the request's ``nvext`` object, when it had one."""
NVEXT_KEY: Final = "kvgate.nvext"
INSTANCE_HEADER: Final = "x-worker-instance-id-served"
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
# vLLM's default for /v1/completions (OpenAI's too); chat defaults to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
# Below this body size the hop to the tokenizer thread costs more than encoding inline.
_INLINE_TOKENIZE_BYTES: Final = 4096
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE: Final = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model: str = "Qwen/Qwen3-0.6B"
    """Served model name; requests naming another model get 404."""
    tokenizer: str = ""
    """Tokenizer directory or hub id (reported by /get_model_info)."""
    host: str = "127.0.0.1"
    port: int = 0
    """HTTP port; 0 picks a free one."""
    instance_id: int | None = None
    """Integer id for Dynamo-style routing headers; defaults to the HTTP port."""
    events_port: int | None = None
    """ZMQ PUB port for KV events; None disables events, 0 picks a free port."""
    replay_port: int | None = None
    """ZMQ ROUTER port for replay; None disables replay, 0 picks a free port."""
    event_layout: EventLayout = "map"


class ApiError(Exception):
    """A request the server refuses, rendered as an OpenAI error body."""

    _TYPES: Final = {
        400: "BadRequestError",
        404: "NotFoundError",
        405: "MethodNotAllowed",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        fallback = "InternalServerError" if self.status >= 500 else "Error"
        kind = self._TYPES.get(self.status, fallback)
        body = {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }
        return web.Response(
            status=self.status, body=_json_encode(body), content_type="application/json"
        )


@dataclass(slots=True)
class _Generation:
    """The parsed, validated knobs of one completion request."""

    kind: RequestKind
    request_id: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    ignore_eos: bool
    cache_salt: str | None


def _cache_salt(body: Mapping[str, Any]) -> str | None:
    try:
        return cache_salt(body)
    except RequestError as exc:
        raise ApiError(400, str(exc), "cache_salt") from None


def _opt_bool(body: Mapping[str, Any], key: str, default: bool, prefix: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{prefix}{key}' must be a boolean", prefix + key)
    return value


def _opt_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer", key)
    return value


def _json_response(payload: object) -> web.Response:
    return web.Response(body=_json_encode(payload), content_type="application/json")


class SimWorker:
    """One engine behind its own HTTP server (and optional ZMQ publisher) in the running loop.

    Use as ``async with SimWorker(...) as worker:`` or call `start` / `stop`.
    """

    def __init__(
        self,
        engine: Engine,
        codec: PromptCodec,
        config: WorkerConfig | None = None,
        *,
        token_text: Mapping[int, str] | None = None,
        clock: Clock | None = None,
        zmq_context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.engine = engine
        self.codec = codec
        self.config = config or WorkerConfig()
        self.clock = clock or WallClock()
        self._zmq_context = zmq_context
        self._text_json: dict[int, bytes] = {
            tid: _json_encode(text) for tid, text in (token_text or {}).items()
        }
        self._text: dict[int, str] = dict(token_text or {})
        self._runner = EngineRunner(engine, self.clock, self._publish)
        self._registry = engine_registry(engine, self.config.model)
        self._ids = itertools.count()
        self._publisher: KvEventPublisher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._http: web.AppRunner | None = None
        self._tokenizer_thread: ThreadPoolExecutor | None = None
        self._accepting = False
        self.address = ""
        self.instance_id = -1

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def topic(self) -> str:
        return f"kv@{self.address}@{self.config.model}"

    @property
    def events_endpoint(self) -> str | None:
        return None if self._publisher is None else self._publisher.endpoint

    @property
    def replay_endpoint(self) -> str | None:
        return None if self._publisher is None else self._publisher.replay_endpoint

    async def start(self) -> None:
        config = self.config
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        routes = app.router
        routes.add_get("/health", self._health)
        routes.add_get("/v1/models", self._models)
        routes.add_post("/v1/chat/completions", self._chat)
        routes.add_post("/v1/completions", self._completions)
        routes.add_post("/v1/chat/completions/render", self._render_chat)
        routes.add_post("/v1/completions/render", self._render_completions)
        routes.add_post("/tokenize", self._tokenize)
        routes.add_get("/metrics", self._metrics)
        routes.add_get("/get_model_info", self._model_info)
        routes.add_get("/get_server_info", self._server_info)
        routes.add_get("/get_load", self._load)
        routes.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        app.on_response_prepare.append(self._identify)
        self._http = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._http.setup()
        site = web.TCPSite(self._http, config.host, config.port)
        await site.start()
        host, port = self._http.addresses[0][:2]
        self.address = f"{host}:{port}"
        self.instance_id = port if config.instance_id is None else config.instance_id
        if config.events_port is not None:
            context = self._zmq_context or zmq.Context.instance()
            replay = None
            if config.replay_port is not None:
                replay = f"tcp://{host}:{config.replay_port or '*'}"
            self._publisher = KvEventPublisher(
                context,
                f"tcp://{host}:{config.events_port or '*'}",
                self.topic,
                replay_endpoint=replay,
                layout=config.event_layout,
            )
            self._tasks.append(asyncio.create_task(self._publisher.serve_replay()))
            self._tasks[-1].add_done_callback(self._replay_done)
        engine_task = asyncio.create_task(self._runner.run())
        engine_task.add_done_callback(self._engine_done)
        self._tasks.append(engine_task)
        self._accepting = True

    async def stop(self) -> None:
        """Stop accepting, end open streams (finish reason "abort"), release every socket."""
        self._accepting = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if self._tokenizer_thread is not None:
            self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
            self._tokenizer_thread = None

    async def __aenter__(self) -> SimWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _engine_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # The crashed loop has already ended its open streams; refuse new requests rather than
        # queue them forever.
        self._accepting = False
        log.error("worker %s: engine loop failed", self.address, exc_info=task.exception())

    def _replay_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %s: replay socket failed", self.address, exc_info=task.exception())

    def _publish(self, events: list[KvEvent]) -> None:
        if self._publisher is not None:
            self._publisher.publish(events, time.time())

    # -- plumbing --------------------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return ApiError(exc.status, exc.reason).response()
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return ApiError(500, "internal error in the simulated engine").response()

    async def _identify(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = self.address
        response.headers[INSTANCE_HEADER] = str(self.instance_id)
        nvext = request.get(NVEXT_KEY)
        if nvext is not None:
            # Dynamo backends route on nvext; echoing it lets tests see what the gateway sent.
            response.headers[NVEXT_HEADER] = _json_encode(nvext).decode()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = _json_decode(raw)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        if isinstance(body.get("nvext"), dict):
            request[NVEXT_KEY] = body["nvext"]
        model = body.get("model")
        if model is not None and model != self.config.model:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")
        return body

    def _tokens(self, body: Mapping[str, Any], kind: RequestKind) -> list[int]:
        try:
            return self.codec.tokenize(body, kind)
        except ValueError as exc:
            raise ApiError(400, str(exc), getattr(exc, "field", None)) from None

    async def _tokens_off_loop(
        self, body: Mapping[str, Any], kind: RequestKind, body_bytes: int
    ) -> list[int]:
        """`_tokens`, in this worker's own thread for a long prompt: every engine of the process
        steps on this event loop, and a real engine tokenizes in its API server, apart from the
        engine core, so one cold prompt must not stall the others' steps (`tokenizers` releases
        the GIL while it encodes)."""
        if body_bytes <= _INLINE_TOKENIZE_BYTES:
            return self._tokens(body, kind)
        if self._tokenizer_thread is None:
            self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="sim-tokenize")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, self._tokens, body, kind)

    def _token_json(self, token_id: int) -> bytes:
        text = self._text_json.get(token_id)
        if text is None:
            text = self._text_json[token_id] = _json_encode(self._token_text(token_id))
        return text

    def _token_text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.codec.decode([token_id])
        return text

    # -- info endpoints --------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, _request: web.Request) -> web.Response:
        model = self.config.model
        card = {
            "id": model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": model,
            "parent": None,
            "max_model_len": self.engine.config.max_model_len,
        }
        return _json_response({"object": "list", "data": [card]})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _model_info(self, _request: web.Request) -> web.Response:
        return _json_response(
            {
                "model_path": self.config.model,
                "tokenizer_path": self.config.tokenizer or self.config.model,
                "is_generation": True,
            }
        )

    async def _server_info(self, _request: web.Request) -> web.Response:
        config = self.engine.config
        return _json_response(
            {
                "model_path": self.config.model,
                "served_model_name": self.config.model,
                "page_size": config.block_size,
                "max_total_num_tokens": config.num_gpu_blocks * config.block_size,
                "max_running_requests": config.max_num_seqs,
                "chunked_prefill_size": config.max_num_batched_tokens,
                "context_length": config.max_model_len,
                "dp_size": 1,
                "version": "kvgate-sim",
            }
        )

    async def _load(self, _request: web.Request) -> web.Response:
        engine = self.engine
        cache = engine.cache
        used_tokens = (cache.num_blocks - cache.num_free_blocks) * cache.block_size
        return _json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": engine.num_running + engine.num_waiting,
                    "num_waiting_reqs": engine.num_waiting,
                    "num_tokens": used_tokens,
                }
            ]
        )

    async def _reset_prefix_cache(self, _request: web.Request) -> web.Response:
        if not self._runner.reset_prefix_cache():
            raise ApiError(400, "The prefix cache is in use by running requests; retry when idle")
        return web.Response()

    # -- tokenizer endpoints ---------------------------------------------------------------

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        kind: RequestKind = "chat" if "messages" in body else "completions"
        tokens = self._tokens(body, kind)
        return _json_response(
            {
                "count": len(tokens),
                "max_model_len": self.engine.config.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            }
        )

    async def _render_chat(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        tokens = self._tokens(body, "chat")
        try:
            prompt = self.codec.render_chat(body)
        except ValueError as exc:
            raise ApiError(400, str(exc), getattr(exc, "field", None)) from None
        return _json_response(self._rendered("chatcmpl", prompt, tokens))

    async def _render_completions(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        tokens = self._tokens(body, "completions")
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else self.codec.decode(tokens)
        return _json_response([self._rendered("cmpl", text, tokens)])

    def _rendered(self, prefix: str, prompt: str, tokens: list[int]) -> dict[str, object]:
        return {
            "request_id": f"{prefix}-{self.instance_id:x}-{next(self._ids)}",
            "prompt": prompt,
            "token_ids": tokens,
            "model": self.config.model,
        }

    # -- generation ------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    def _parse(self, body: Mapping[str, Any], kind: RequestKind) -> _Generation:
        stream = _opt_bool(body, "stream", False)
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not isinstance(options, dict):
                raise ApiError(400, "'stream_options' must be an object", "stream_options")
            if not stream:
                raise ApiError(
                    400, "Stream options can only be defined when `stream=True`.", "stream_options"
                )
            include_usage = _opt_bool(options, "include_usage", False, "stream_options.")
        if kind == "chat":
            max_tokens = _opt_int(body, "max_completion_tokens")
            if max_tokens is None:
                max_tokens = _opt_int(body, "max_tokens")
        else:
            max_tokens = _opt_int(body, "max_tokens")
            if max_tokens is None:
                max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        n = _opt_int(body, "n")
        if n is not None and n != 1:
            raise ApiError(400, "The simulated engine supports only n=1.", "n")
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return _Generation(
            kind=kind,
            request_id=f"{prefix}-{self.instance_id:x}-{next(self._ids)}",
            stream=stream,
            include_usage=include_usage,
            max_tokens=max_tokens,
            ignore_eos=_opt_bool(body, "ignore_eos", False),
            cache_salt=_cache_salt(body),
        )

    async def _generate(self, request: web.Request, kind: RequestKind) -> web.StreamResponse:
        if not self._accepting:
            raise ApiError(503, "The simulated engine is shutting down.")
        body = await self._body(request)
        gen = self._parse(body, kind)
        # aiohttp keeps the body it read: its size is the cheap measure of the prompt's.
        tokens = await self._tokens_off_loop(body, kind, len(await request.read()))
        sim = SimRequest(gen.request_id, tokens, gen.max_tokens, gen.ignore_eos, gen.cache_salt)
        try:
            stream = self._runner.submit(sim, wake_each=gen.stream)
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages" if kind == "chat" else "prompt") from None
        try:
            if gen.stream:
                return await self._sse(request, gen, stream)
            return await self._whole(gen, stream)
        except BaseException:
            # Cancelled handler or engine shutdown: free the request's blocks (idempotent).
            self._runner.abort(gen.request_id)
            raise

    def _usage(self, req: SimRequest) -> dict[str, object]:
        prompt = req.num_prompt_tokens
        completion = req.num_output_tokens
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": max(req.num_cached_tokens, 0)},
        }

    async def _whole(self, gen: _Generation, stream: TokenStream) -> web.Response:
        pieces: list[str] = []
        reason: FinishReason | None = None
        while reason is None:
            token_id, reason = await stream.next()
            if token_id >= 0:
                pieces.append(self._token_text(token_id))
        if reason == "abort":
            raise ApiError(503, "The simulated engine shut down before finishing the request.")
        req = stream.request
        text = "".join(pieces)
        choice: dict[str, object] = {"index": 0}
        if gen.kind == "chat":
            choice["message"] = {
                "role": "assistant",
                "content": text,
                "reasoning_content": None,
                "tool_calls": [],
            }
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=reason, stop_reason=None)
        return _json_response(
            {
                "id": gen.request_id,
                "object": "chat.completion" if gen.kind == "chat" else "text_completion",
                "created": int(time.time()),
                "model": self.config.model,
                "choices": [choice],
                "usage": self._usage(req),
            }
        )

    async def _sse(
        self, request: web.Request, gen: _Generation, stream: TokenStream
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        chunks = _SseChunks(gen, self.config.model)
        try:
            first = True
            while True:
                token_id, reason = await stream.next()
                chunk = chunks.token(self._token_json(token_id) if token_id >= 0 else b'""', reason)
                if first:
                    chunk = chunks.role + chunk
                    first = False
                if reason is not None:
                    if gen.include_usage:
                        chunk += chunks.usage(_json_encode(self._usage(stream.request)))
                    await response.write(chunk + _DONE)
                    break
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            # The client hung up mid-stream; stop generating for it.
            self._runner.abort(gen.request_id)
        return response


class _SseChunks:
    """Byte templates of one streamed response's events.

    Every chunk is a fixed envelope, the token's pre-encoded JSON text and a fixed tail, joined
    by concatenation: no JSON encoding on the per-token path.
    """

    __slots__ = ("_envelope", "_middle", "_open_tail", "_start", "role")

    def __init__(self, gen: _Generation, model: str) -> None:
        chat = gen.kind == "chat"
        self._envelope = b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":' % (
            gen.request_id.encode(),
            b"chat.completion.chunk" if chat else b"text_completion",
            int(time.time()),
            _json_encode(model),
        )
        if chat:
            self._start = self._envelope + b'[{"index":0,"delta":{"content":'
            self._middle = b"},"
            self.role = self._envelope + (
                b'[{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}]}\n\n'
            )
        else:
            self._start = self._envelope + b'[{"index":0,"text":'
            self._middle = b","
            self.role = b""
        self._open_tail = (
            self._middle + b'"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
        )

    def token(self, text_json: bytes, reason: FinishReason | None) -> bytes:
        if reason is None:
            return self._start + text_json + self._open_tail
        return b'%s%s%s"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n' % (
            self._start,
            text_json,
            self._middle,
            reason.encode(),
        )

    def usage(self, usage_json: bytes) -> bytes:
        return self._envelope + b'[],"usage":' + usage_json + b"}\n\n"
