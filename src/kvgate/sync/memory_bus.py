"""An in-process `kvgate.sync.bus.Bus` for fast tests of replica sync: several replicas in one
event loop share one `MemoryBroker` instead of a NATS server.

Core NATS semantics (fan-out to the other connections, no echo, in order, nothing stored) with
synchronous delivery: a publish has reached every subscriber when it returns. Faults on demand:
``drop_if`` loses chosen messages (NATS delivers at most once), and `MemoryBroker.partition` cuts a
connection off without telling anyone, as a crashed or unplugged replica looks to the others.
"""

from __future__ import annotations

from collections.abc import Callable

from kvgate.sync.bus import BusListener, Handler


class MemoryBroker:
    def __init__(self, *, max_payload: int = 1 << 20) -> None:
        self.max_payload = max_payload
        self.drop_if: Callable[[str, bytes], bool] | None = None
        """Return True to lose a (subject, payload) published by anyone."""
        self.published: list[tuple[str, bytes]] = []
        """Every message published and not lost, in order."""
        self._subscriptions: dict[str, list[tuple[MemoryBus, Handler]]] = {}
        self._buses: dict[BusListener, MemoryBus] = {}
        self._partitioned: set[MemoryBus] = set()

    async def connect(self, listener: BusListener) -> MemoryBus:
        """A `kvgate.sync.bus.Connect`: pass ``broker.connect`` to `ReplicaSync`."""
        bus = self._buses[listener] = MemoryBus(self)
        return bus

    def partition(self, listener: BusListener) -> None:
        """From now on, nothing the listener's connection publishes arrives and nothing
        reaches it; nobody is told."""
        self._partitioned.add(self._buses[listener])

    def heal(self, listener: BusListener) -> None:
        self._partitioned.discard(self._buses[listener])

    def _deliver(self, sender: MemoryBus, subject: str, payload: bytes) -> None:
        if sender in self._partitioned or (self.drop_if and self.drop_if(subject, payload)):
            return
        self.published.append((subject, payload))
        for bus, handler in list(self._subscriptions.get(subject, ())):
            if bus is not sender and not bus.closed and bus not in self._partitioned:
                handler(payload)


class MemoryBus:
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self.closed = False

    @property
    def max_payload(self) -> int:
        return self._broker.max_payload

    @property
    def is_connected(self) -> bool:
        return not self.closed

    async def publish(self, subject: str, payload: bytes) -> None:
        if self.closed:
            raise ConnectionError("the memory bus is closed")
        if len(payload) > self._broker.max_payload:
            raise ValueError(f"payload of {len(payload)} bytes exceeds max_payload")
        self._broker._deliver(self, subject, payload)

    async def subscribe(self, subject: str, handler: Handler) -> None:
        self._broker._subscriptions.setdefault(subject, []).append((self, handler))

    async def flush(self, timeout_s: float) -> None:
        pass

    async def close(self) -> None:
        self.closed = True
