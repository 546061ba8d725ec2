"""Dynamo workers as kvgate endpoints, learned from Dynamo's own discovery.

What Dynamo says about a worker
    Every worker registers its ``generate`` endpoint: its instance id (an unsigned 64-bit
    integer, new on every start), its component (``backend`` for aggregated and decode workers,
    ``prefill`` for prefill workers) and its request-plane address (``host:port/...``: the host is
    the worker's IP). Two views of that registry are read here:

    - the *file* discovery backend (``--discovery-backend file``, the directory ``$DYN_FILE_KV``):
      ``v1/instances/<ns>%2F<component>%2Fgenerate%2F<hex id>`` records, and the worker's model
      card in ``v1/mdc/...``, whose file URLs point at the worker's system server (its
      ``DYN_SYSTEM_PORT``; the frontend downloads the tokenizer from there) and which says
      ``worker_type`` (aggregated, prefill, decode);
    - the frontend's ``GET /health``: ``instances[]`` with the same fields, whatever discovery
      backend the deployment uses (etcd, Kubernetes, file). It has no system port.

What kvgate needs per worker, and where it comes from
    - identity (``Endpoint.address``, the key of the index, the load and the metrics scrape): the
      worker's system server ``ip:port``, whose ``/metrics`` carries the vLLM-style gauges the
      scraper reads. The port is the model card's when Dynamo records one, else
      ``WorkerAddressing.system_port`` (9090, the Dynamo operator's ``DYN_SYSTEM_PORT``);
    - the id for ``x-worker-instance-id`` / ``nvext``: the instance id;
    - the role: ``prefill`` for the prefill component; ``decode`` for a backend worker whose card
      says so or, when the card is not at hand, for every backend worker of a fleet that has
      prefill workers; otherwise unlabelled (both);
    - the KV capacity, for the latency model: the card's ``runtime_config.total_kv_blocks``
      (the worker's ``/metrics`` has no ``vllm:cache_config_info``); without a card (the
      frontend's ``/health``), the predicted-latency scorer's default;
    - the vLLM-format KV events and their replay socket (``--zmq-kv-events-ports`` /
      ``--zmq-replay-ports`` of the mocker, ``--kv-events-config`` of vLLM): Dynamo does not
      record them, so they follow a convention, ports relative to the system port (default +1 and
      +2) or absolute (``WorkerAddressing``), on the worker's IP;
    - the destination: a frontend, never the worker itself (it has no HTTP API). With several
      frontends each worker is assigned one (instance id modulo their number), so the load
      spreads; a change of frontends moves destinations without touching any worker's state.

Joins and leaves
    Every poll makes the endpoint set equal to what Dynamo lists. A worker that deregisters
    (graceful stop) leaves at the next poll. One that dies without deregistering stays listed
    until its lease runs out (about 25 s with the file backend), but its system server stops
    answering at once: the metrics scraper marks it stale within its threshold, the picker
    routes around stale endpoints and the EPP drops their cached-block and load state. A poll
    that fails (an unreadable record, a frontend not answering) changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aiohttp

from kvgate.fleet.endpoint import ROLE_LABEL, Endpoint, EndpointSet, Role
from kvgate.fleet.sources import events_endpoint_for
from kvgate.service import Service

__all__ = [
    "DEFAULT_NAMESPACE",
    "DiscoveryError",
    "DynamoDiscovery",
    "DynamoWorker",
    "FileStoreSource",
    "FrontendHealthSource",
    "PortRule",
    "WorkerAddressing",
    "endpoints_for",
    "parse_health",
    "read_file_store",
]

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE: Final = "dynamo"
GENERATE: Final = "generate"
PREFILL_COMPONENT: Final = "prefill"
_U64: Final = 1 << 64
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d+)")


class DiscoveryError(Exception):
    """Dynamo's registry could not be read this time; the last known workers stay."""


@dataclass(frozen=True, slots=True)
class DynamoWorker:
    instance_id: int
    component: str
    """``backend`` (aggregated or decode) or ``prefill``."""
    host: str | None
    """The worker's IP, from its request-plane address."""
    system_address: str | None = None
    """``ip:port`` of its system server, when Dynamo records it (the model card's file URLs)."""
    worker_type: str | None = None
    """``aggregated``, ``prefill`` or ``decode``, from the model card."""
    kv_blocks: int | None = None
    """Its KV cache in blocks, from the model card (``runtime_config.total_kv_blocks``)."""


def _instance_id(value: object) -> int:
    if type(value) is not int or not 0 <= value < _U64:
        raise DiscoveryError(f"instance id {value!r} is not an unsigned 64-bit integer")
    return value


def _host_of(transport: object) -> str | None:
    """The IP of a request-plane address (``{"tcp": "10.0.0.7:4312/<hex>/ns/component/ep"}``)."""
    if not isinstance(transport, Mapping):
        return None
    for value in transport.values():
        if isinstance(value, str):
            found = _HOST_PORT.match(value.removeprefix("tcp://"))
            if found:
                return found.group(1).strip("[]")
    return None


def _system_address(card: object) -> str | None:
    """The ``host:port`` of the first HTTP file URL of a model card: the worker's system server."""
    stack: list[object] = [card]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            path = item.get("path")
            if isinstance(path, str) and path.startswith("http://"):
                netloc = urlsplit(path).netloc
                if _HOST_PORT.match(netloc):
                    return netloc
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _kv_blocks(card: object) -> int | None:
    """``runtime_config.total_kv_blocks`` of a model card: the worker's KV capacity, which its
    ``/metrics`` does not state (the mocker and Dynamo's vLLM workers serve no
    ``vllm:cache_config_info``)."""
    config = card.get("runtime_config") if isinstance(card, Mapping) else None
    blocks = config.get("total_kv_blocks") if isinstance(config, Mapping) else None
    return blocks if type(blocks) is int and blocks > 0 else None


def _load_records(directory: Path) -> list[dict[str, Any]]:
    if not directory.is_dir():
        return []
    records: list[dict[str, Any]] = []
    for path in sorted(directory.iterdir()):
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            continue  # deregistered between the listing and the read
        except (OSError, ValueError) as exc:
            # Most likely caught half-written: the whole poll is retried rather than taking the
            # worker for gone (which would drop its index entries).
            raise DiscoveryError(f"cannot read {path}: {exc}") from None
        if isinstance(record, dict):
            record.setdefault("_key", unquote(path.name))
            records.append(record)
    return records


def read_file_store(
    root: str | os.PathLike[str], namespace: str = DEFAULT_NAMESPACE
) -> list[DynamoWorker]:
    """The ``generate`` workers of ``namespace`` registered in a file discovery store."""
    root = Path(root)
    cards: dict[int, tuple[str | None, str | None, int | None]] = {}
    for record in _load_records(root / "v1" / "mdc"):
        if record.get("namespace") != namespace or record.get("endpoint") != GENERATE:
            continue
        card = record.get("card_json")
        worker_type = card.get("worker_type") if isinstance(card, Mapping) else None
        cards[_instance_id(record.get("instance_id"))] = (
            _system_address(card),
            worker_type if isinstance(worker_type, str) else None,
            _kv_blocks(card),
        )
    workers: list[DynamoWorker] = []
    for record in _load_records(root / "v1" / "instances"):
        if record.get("namespace") != namespace or record.get("endpoint") != GENERATE:
            continue
        instance = _instance_id(record.get("instance_id"))
        system, worker_type, kv_blocks = cards.get(instance, (None, None, None))
        workers.append(
            DynamoWorker(
                instance,
                str(record.get("component")),
                _host_of(record.get("transport")),
                system,
                worker_type,
                kv_blocks,
            )
        )
    return workers


def parse_health(payload: object, namespace: str = DEFAULT_NAMESPACE) -> list[DynamoWorker]:
    """The ``generate`` workers of ``namespace`` in a frontend's ``/health`` answer."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("instances"), list):
        raise DiscoveryError("the frontend's /health has no instances list")
    workers: list[DynamoWorker] = []
    for item in payload["instances"]:
        if not isinstance(item, Mapping) or item.get("endpoint") != GENERATE:
            continue
        if item.get("namespace", namespace) != namespace:
            continue
        workers.append(
            DynamoWorker(
                _instance_id(item.get("instance_id")),
                str(item.get("component")),
                _host_of(item.get("transport")),
            )
        )
    return workers


@dataclass(frozen=True, slots=True)
class PortRule:
    """A port given absolutely (``20080``) or relative to the system port (``+1``)."""

    value: int
    relative: bool

    @classmethod
    def parse(cls, text: str) -> PortRule | None:
        """``"+N"``, ``"N"``, or ``"off"`` / ``""`` for none."""
        text = text.strip()
        if text in ("", "off", "none"):
            return None
        relative = text.startswith("+")
        digits = text.removeprefix("+")
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"expected a port, +offset or off, got {text!r}")
        value = int(digits)
        if not (0 < value < 65536):
            raise ValueError(f"{text!r} is out of range")
        return cls(value, relative)

    def port(self, system_port: int) -> int:
        port = system_port + self.value if self.relative else self.value
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        return port

    def __str__(self) -> str:
        return f"+{self.value}" if self.relative else str(self.value)


@dataclass(frozen=True, slots=True)
class WorkerAddressing:
    """Where kvgate finds a worker's metrics and KV events (see the module docstring)."""

    system_port: int = 9090
    """When Dynamo does not record the worker's system server."""
    events: PortRule | None = PortRule(1, relative=True)
    replay: PortRule | None = PortRule(2, relative=True)

    def endpoint(self, worker: DynamoWorker, role: Role, destination: str) -> Endpoint | None:
        address = worker.system_address
        if address is None:
            if worker.host is None:
                return None
            host = f"[{worker.host}]" if ":" in worker.host else worker.host
            address = f"{host}:{self.system_port}"
        system_port = int(address.rpartition(":")[2])
        return Endpoint(
            address,
            instance_id=worker.instance_id,
            role=role,
            labels={ROLE_LABEL: role} if role != "both" else {},
            events_endpoint=None
            if self.events is None
            else events_endpoint_for(address, self.events.port(system_port)),
            replay_endpoint=None
            if self.replay is None
            else events_endpoint_for(address, self.replay.port(system_port)),
            destination=destination,
            kv_blocks=worker.kv_blocks,
        )


def _role(worker: DynamoWorker, disaggregated: bool) -> Role:
    if worker.component == PREFILL_COMPONENT or worker.worker_type == "prefill":
        return "prefill"
    if worker.worker_type == "decode" or (worker.worker_type is None and disaggregated):
        return "decode"
    return "both"


def endpoints_for(
    workers: Iterable[DynamoWorker], addressing: WorkerAddressing, frontends: list[str]
) -> list[Endpoint]:
    """kvgate endpoints for Dynamo workers routed through ``frontends`` (``ip:port``); none when
    no frontend is known (there is nowhere to send a request)."""
    workers = sorted(workers, key=lambda w: w.instance_id)
    if not frontends:
        return []
    frontends = sorted(frontends)
    disaggregated = any(_role(w, False) == "prefill" for w in workers)
    endpoints: dict[str, Endpoint] = {}
    for worker in workers:
        role = _role(worker, disaggregated)
        destination = frontends[worker.instance_id % len(frontends)]
        endpoint = addressing.endpoint(worker, role, destination)
        if endpoint is None:
            log.warning("Dynamo worker %d has no address; skipped", worker.instance_id)
            continue
        if endpoint.address in endpoints:
            log.warning(
                "Dynamo workers %d and %d share the system server %s; kvgate tells workers "
                "apart by it, so only the first is used (run one worker per process)",
                endpoints[endpoint.address].instance_id,
                worker.instance_id,
                endpoint.address,
            )
            continue
        endpoints[endpoint.address] = endpoint
    return list(endpoints.values())


WorkerSource = Callable[[], Awaitable[list[DynamoWorker]]]


class FileStoreSource:
    """Workers from a file discovery store (local deployments, `kvgate up --backend dynamo`)."""

    def __init__(self, root: str | os.PathLike[str], namespace: str = DEFAULT_NAMESPACE) -> None:
        self.root = Path(root)
        self.namespace = namespace

    async def __call__(self) -> list[DynamoWorker]:
        return await asyncio.to_thread(read_file_store, self.root, self.namespace)

    def __str__(self) -> str:
        return f"file store {self.root}"


class FrontendHealthSource:
    """Workers from the first frontend that answers ``GET /health`` (any discovery backend)."""

    def __init__(
        self,
        frontends: Callable[[], list[str]],
        namespace: str = DEFAULT_NAMESPACE,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        self._frontends = frontends
        self.namespace = namespace
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self) -> list[DynamoWorker]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        errors: list[str] = []
        for frontend in self._frontends():
            try:
                async with self._session.get(f"http://{frontend}/health") as resp:
                    resp.raise_for_status()
                    payload = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                errors.append(f"{frontend}: {exc!r}")
                continue
            return parse_health(payload, self.namespace)
        raise DiscoveryError(f"no frontend answered /health ({'; '.join(errors) or 'none known'})")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __str__(self) -> str:
        return "frontend /health"


class DynamoDiscovery(Service):
    """Keep an `EndpointSet` equal to the Dynamo workers a source lists (module docstring)."""

    def __init__(
        self,
        endpoints: EndpointSet,
        source: WorkerSource,
        frontends: Callable[[], list[str]],
        addressing: WorkerAddressing = WorkerAddressing(),
        *,
        poll_interval_s: float = 0.5,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self._endpoints = endpoints
        self._source = source
        self._frontends = frontends
        self.addressing = addressing
        self._interval = poll_interval_s
        self._task: asyncio.Task[None] | None = None
        self._error: str | None = None
        self.polls = 0
        """Successful polls."""

    async def start(self) -> None:
        """Poll once (a failure is logged: the set stays unknown until a poll succeeds), then
        keep polling."""
        if self._task is not None:
            return
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="dynamo-discovery")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        close = getattr(self._source, "aclose", None)
        if close is not None:
            await close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                # A listener of the endpoint set failed; discovery must outlive it.
                log.exception("applying Dynamo's workers failed")

    async def check(self) -> bool:
        """One poll; True if it succeeded (the set is then what Dynamo lists)."""
        frontends = self._frontends()
        try:
            if not frontends:
                raise DiscoveryError("no frontend is known yet (nowhere to send requests)")
            workers = await self._source()
        except DiscoveryError as exc:
            if str(exc) != self._error:
                self._error = str(exc)
                log.warning("Dynamo discovery (%s): %s; keeping the last %d workers",
                            self._source, exc, len(self._endpoints))  # fmt: skip
            return False
        if self._error is not None:
            self._error = None
            log.info("Dynamo discovery (%s) works again", self._source)
        before = {ep.address: ep.instance_id for ep in self._endpoints}
        endpoints = endpoints_for(workers, self.addressing, frontends)
        self._endpoints.replace(endpoints)
        after = {ep.address: ep.instance_id for ep in endpoints}
        if after != before or self.polls == 0:
            log.info(
                "Dynamo workers (%s): %s",
                self._source,
                ", ".join(f"{ep.instance_id}@{ep.address} ({ep.role})" for ep in endpoints)
                or "none",
            )
        self.polls += 1
        return True
