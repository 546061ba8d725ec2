"""KV-cache events: the write side of the prefix index (decode, subscribe, track sequences)."""

from kvgate.events.decode import MalformedEvent, decode_batch, parse_seq
from kvgate.events.subscriber import (
    EventSink,
    KvEventSubscriber,
    SubscriberConfig,
    SubscriberStats,
    WorkerStats,
)
from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KvEvent

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventSink",
    "KvEvent",
    "KvEventSubscriber",
    "MalformedEvent",
    "SubscriberConfig",
    "SubscriberStats",
    "WorkerStats",
    "decode_batch",
    "parse_seq",
]
