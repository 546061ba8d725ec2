"""Endpoints (workers) as the scheduler sees them, and the live set of them.

An endpoint is identified by its ``address`` (``ip:port``): the key of the prefix index and of
every per-worker table, and the value Envoy routes to unless the endpoint names another
``destination`` (a Dynamo worker is reached through its frontend). Discovery (a static list, a
watched file, Kubernetes, Dynamo) replaces the set; listeners hear who joined and who left so that
per-worker state (KV events subscription, index entries, in-flight load) follows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import xxhash

EngineType = Literal["vllm", "sglang", "trtllm"]
Role = Literal["decode", "prefill", "both"]
ROLE_LABEL: Final = "llm-d.ai/role"
"""Pod label naming a worker's role (``decode`` / ``prefill`` / ``both``), as llm-d uses it."""


@dataclass(slots=True)
class EndpointMetrics:
    """What the last scrape of the endpoint's ``/metrics`` said."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    """Fraction of KV cache in use, 0..1."""
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    active_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int | None = None
    updated_at: float | None = None
    """Monotonic time of the last successful scrape; None: never scraped."""
    booked_prefilling: int | None = None
    """The requests this gateway had routed to the endpoint and not yet seen the first token of,
    counted when the scrape was read (None: not known). ``waiting`` beyond it is work another
    router (or a direct client) gave the engine. It is compared with this count and not with the
    one at prediction time: requests leave prefill between scrapes while a ``waiting`` read
    before still counts them, which would look like other routers' work and steer traffic away
    from a worker for as long as the scrape is old."""
    stale: bool = True
    """True until the first scrape and whenever the last success is older than the threshold."""


@dataclass(slots=True, eq=False)
class Endpoint:
    address: str
    """``ip:port``: the worker's identity everywhere in kvgate (index, load, events, metrics);
    also where Envoy routes unless ``destination`` is set."""
    instance_id: int | None = None
    """Dynamo-style integer worker id for ``x-worker-instance-id``; None: derived from address."""
    engine: EngineType = "vllm"
    role: Role = "both"
    labels: Mapping[str, str] = field(default_factory=dict)
    events_endpoint: str | None = None
    """ZMQ endpoint of the engine's KV-event publisher (``tcp://ip:port``), if subscribed to."""
    replay_endpoint: str | None = None
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    destination: str | None = None
    """``ip:port`` Envoy sends this worker's requests to when that is not the worker itself: a
    Dynamo frontend, which forwards to the worker named by ``x-worker-instance-id``. None: the
    address. Not part of the identity: a new destination keeps the worker's state."""
    kv_blocks: int | None = None
    """KV capacity (blocks) the discovery source states (a Dynamo worker's model card), for
    engines whose metrics do not say it: the scraper keeps it in ``metrics.num_gpu_blocks``
    when a scrape has none. Not part of the identity."""

    def __post_init__(self) -> None:
        if self.metrics.num_gpu_blocks is None:
            self.metrics.num_gpu_blocks = self.kv_blocks

    @property
    def route_address(self) -> str:
        """Where requests picked for this worker go (``x-gateway-destination-endpoint``)."""
        return self.destination or self.address

    @property
    def ip(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def worker_instance_id(self) -> int:
        """The id put in Dynamo routing headers: the configured one, else a stable one derived
        from the address (so headers are integers even for plain vLLM fleets)."""
        if self.instance_id is not None:
            return self.instance_id
        ip_part = self.ip
        octets = ip_part.split(".")
        if len(octets) == 4 and all(o.isdigit() for o in octets):
            packed = 0
            for o in octets:
                packed = packed << 8 | int(o)
            return packed << 16 | self.port
        return xxhash.xxh3_64_intdigest(self.address.encode()) >> 1

    def same_spec(self, other: Endpoint) -> bool:
        return (
            self.address == other.address
            and self.instance_id == other.instance_id
            and self.engine == other.engine
            and self.role == other.role
            and dict(self.labels) == dict(other.labels)
            and self.events_endpoint == other.events_endpoint
            and self.replay_endpoint == other.replay_endpoint
        )


Listener = Callable[[list[Endpoint], list[Endpoint]], None]
"""Called with (joined, left) after every change of the set."""


class EndpointSet:
    """The current endpoints, keyed by address. Owned by the EPP's event loop."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._by_address: dict[str, Endpoint] = {}
        self._listeners: list[Listener] = []
        self.known = False
        """True once a discovery source delivered its first set (readiness)."""
        self.replace(endpoints, initial=True)

    def __len__(self) -> int:
        return len(self._by_address)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._by_address.values())

    def __contains__(self, address: object) -> bool:
        return address in self._by_address

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def snapshot(self) -> list[Endpoint]:
        return list(self._by_address.values())

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def replace(self, endpoints: Iterable[Endpoint], *, initial: bool = False) -> None:
        """Make the set exactly ``endpoints``. An endpoint whose spec changed counts as leaving
        and rejoining (its events source or identity may differ); metrics of unchanged endpoints
        are kept."""
        incoming: dict[str, Endpoint] = {}
        for ep in endpoints:
            if ep.address in incoming:
                raise ValueError(f"duplicate endpoint address {ep.address}")
            incoming[ep.address] = ep
        joined: list[Endpoint] = []
        left: list[Endpoint] = []
        merged: dict[str, Endpoint] = {}
        for address, ep in incoming.items():
            current = self._by_address.get(address)
            if current is not None and current.same_spec(ep):
                current.destination = ep.destination
                current.kv_blocks = ep.kv_blocks
                merged[address] = current
                continue
            if current is not None:
                left.append(current)
            joined.append(ep)
            merged[address] = ep
        left.extend(ep for a, ep in self._by_address.items() if a not in incoming)
        self._by_address = merged
        if not initial:
            self.known = True
        if joined or left:
            for listener in self._listeners:
                listener(joined, left)
