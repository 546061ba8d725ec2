"""What the runtime hands to plugins through `PluginContext`, and what plugins hand back.

Plugins never reach for a transport. The process that runs them (the EPP, the trace simulator, a
test) creates these objects, passes them in the context, and after the plugins are built wires
them to its I/O:

- `KvEventTargets`: indexes that learn from engine KV events. A plugin with such an index adds
  it; the EPP points its ZMQ subscriber at the targets, the simulator applies its engines' events
  to them. The targets fan each event out to every index.
- `SharedLoad`: in-flight bookkeeping that other EPP replicas should count. A plugin adds its
  router; with replica sync on, the EPP starts the NATS side and gives every owner its journal.
- `SchedulingMetrics`: what plugins measure (stage timings, prediction quality, refusals). The EPP
  exports it to Prometheus; `NO_METRICS` drops everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from kvgate.errors import ConfigError

if TYPE_CHECKING:
    from kvgate.events.types import KvEvent
    from kvgate.index.prefix_index import PrefixIndex
    from kvgate.scheduling.kv_router import KvRouter

Stage = Literal["tokenize", "hash", "match", "score", "predict"]
"""Steps of one routing decision, timed separately (``kvgate_stage_duration_seconds``)."""


class SchedulingMetrics(Protocol):
    """Where plugins report what they measure. Calls must be cheap and never raise."""

    def stage(self, stage: Stage, seconds: float) -> None: ...

    def picked(self, overlap_blocks: int, best_overlap_blocks: int, block_size: int) -> None:
        """The chosen endpoint is predicted to hold ``overlap_blocks`` leading blocks; the best
        candidate held ``best_overlap_blocks``."""
        ...

    def busy_rejection(self) -> None:
        """A request was refused because every candidate was over the busy threshold."""
        ...

    def shed(self, reason: str) -> None:
        """A sheddable request was refused by a plugin (``reason``: a short label)."""
        ...

    def ttft_observed(self, predicted_s: float, observed_s: float) -> None:
        """A request's first token came ``observed_s`` after it was sent; it was predicted to
        take ``predicted_s``."""
        ...


class _NoMetrics:
    def stage(self, stage: Stage, seconds: float) -> None:
        pass

    def picked(self, overlap_blocks: int, best_overlap_blocks: int, block_size: int) -> None:
        pass

    def busy_rejection(self) -> None:
        pass

    def shed(self, reason: str) -> None:
        pass

    def ttft_observed(self, predicted_s: float, observed_s: float) -> None:
        pass


NO_METRICS: SchedulingMetrics = _NoMetrics()


class KvEventTargets:
    """The indexes fed by KV events, behind the one `apply_event` / `clear_worker` interface an
    event source needs. All must use one block size: the engines publish one."""

    def __init__(self) -> None:
        self.indexes: list[PrefixIndex] = []
        self.block_size: int | None = None

    def add(self, index: PrefixIndex) -> None:
        if self.block_size is not None and index.block_size != self.block_size:
            raise ConfigError(
                "block_size",
                f"{index.block_size} differs from the {self.block_size} of another KV-event "
                "index; the engines publish one block size",
            )
        self.block_size = index.block_size
        self.indexes.append(index)

    def __bool__(self) -> bool:
        return bool(self.indexes)

    def apply_event(self, worker: str, event: KvEvent) -> None:
        for index in self.indexes:
            index.apply_event(worker, event)

    def clear_worker(self, worker: str) -> None:
        for index in self.indexes:
            index.clear_worker(worker)

    @property
    def entries(self) -> int:
        """(block, worker) entries held, over every index."""
        return sum(index.entries for index in self.indexes)


class ActiveJournal(Protocol):
    """Told of every change to an owner's own in-flight bookings; must not block."""

    def added(
        self,
        owner: str,
        request_id: str,
        worker: str,
        hashes: Sequence[int],
        prefill_tokens: int,
    ) -> None: ...

    def prefill_completed(self, owner: str, request_id: str) -> None: ...

    def freed(self, owner: str, request_id: str) -> None: ...


@dataclass(slots=True)
class LoadOwner:
    name: str
    router: KvRouter
    set_journal: Callable[[ActiveJournal], None]
    wants_sync: bool
    """Its configuration asks for replica sync (``DYNAMO_ROUTER_REPLICA_SYNC``)."""
    namespace: str | None


class SharedLoad:
    """The in-flight bookkeeping replica sync keeps consistent across EPP replicas."""

    def __init__(self) -> None:
        self.owners: dict[str, LoadOwner] = {}

    def add(self, owner: LoadOwner) -> None:
        if owner.name in self.owners:
            raise ConfigError(owner.name, "two plugins share one name")
        self.owners[owner.name] = owner

    def __bool__(self) -> bool:
        return bool(self.owners)

    @property
    def wants_sync(self) -> bool:
        return any(owner.wants_sync for owner in self.owners.values())

    def prefilling(self, worker: str) -> int:
        """The requests routed to ``worker`` and not yet past their first token, over every
        owner's bookkeeping."""
        return sum(owner.router.active.prefilling(worker) for owner in self.owners.values())

    @property
    def namespace(self) -> str | None:
        return next((o.namespace for o in self.owners.values() if o.namespace), None)

    def attach(self, journal: ActiveJournal) -> None:
        for owner in self.owners.values():
            owner.set_journal(journal)
