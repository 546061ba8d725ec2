"""The replica-sync protocol without a bus or tasks: messages in, messages out, time passed in."""

from __future__ import annotations

from kvgate.scheduling.kv_router import KvRouter
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.sync.messages import Add, Deltas, Free, Heartbeat, Op, Snapshot, SyncRequest, encode
from kvgate.sync.metrics import SyncMetrics
from kvgate.sync.peer_state import PeerState
from tests.sync.utils import SCORER, sync_config

LEASE_S = 3.0


def state(router_id: str = "A") -> tuple[PeerState, KvRouter]:
    router = KvRouter(KvRouterConfig(block_size=16))
    config = sync_config(router_id, heartbeat_s=1.0, lease_s=LEASE_S, snapshot_min_interval_s=0.2)
    return PeerState({SCORER: router}, config, SyncMetrics()), router


def connected(router_id: str = "A") -> tuple[PeerState, KvRouter]:
    peer_state, router = state(router_id)
    peer_state.set_connected(True)
    peer_state.take_outgoing(0.0, 1 << 20)  # the hello: snapshot, request, heartbeat
    return peer_state, router


def test_a_peer_silent_for_its_lease_is_dropped_with_its_bookings() -> None:
    a, router = connected()
    a.receive(encode(Deltas("B", 1, [Add(SCORER, "r1", "w1", [1, 2], 32)])), now=10.0)
    assert router.active.in_flight("w1") == 1
    a.receive(encode(Heartbeat("B", 1, 1)), now=11.0)
    a.expire_peers(11.0 + LEASE_S - 0.01)
    assert "B" in a.peers
    a.expire_peers(11.0 + LEASE_S + 0.01)
    assert "B" not in a.peers
    assert router.active.in_flight("w1") == 0
    assert a.metrics.peers_expired._value.get() == 1


def test_a_gap_in_a_synced_peers_deltas_asks_that_peer_for_a_snapshot() -> None:
    a, _ = connected()
    a.receive(encode(Snapshot("B", 4, 1, 0, 1, [])), now=1.0)
    assert a.peers["B"].synced
    a.receive(encode(Deltas("B", 5, [])), now=1.1)
    assert a.take_outgoing(1.1, 1 << 20)[0] == []
    a.receive(encode(Deltas("B", 7, [])), now=1.2)  # 6 was lost
    assert not a.peers["B"].synced
    assert a.metrics.gaps._value.get() == 1
    assert a.take_outgoing(1.2, 1 << 20)[0] == [SyncRequest("A", "B")]
    # Its heartbeats keep asking, no more often than snapshot_min_interval_s.
    a.receive(encode(Heartbeat("B", 7, 0)), now=1.3)
    assert a.take_outgoing(1.3, 1 << 20)[0] == []
    a.receive(encode(Heartbeat("B", 7, 0)), now=1.5)
    assert a.take_outgoing(1.5, 1 << 20)[0] == [SyncRequest("A", "B")]


def test_a_snapshot_replaces_the_peers_copy_whole() -> None:
    a, router = connected()
    ops: list[Op] = [Add(SCORER, "r1", "w1", [1], 16), Add(SCORER, "r2", "w2", [2], 16)]
    a.receive(encode(Deltas("B", 1, ops)), now=1.0)
    parts = [[Add(SCORER, "r2", "w2", [2], 0)], [Add(SCORER, "r3", "w3", [3], 16)]]
    a.receive(encode(Snapshot("B", 9, 1, 1, 2, parts[1])), now=1.1)
    assert router.active.in_flight("w3") == 0  # applied only once whole
    a.receive(encode(Snapshot("B", 9, 1, 0, 2, parts[0])), now=1.2)
    assert (router.active.in_flight("w1"), router.active.in_flight("w3")) == (0, 1)
    assert router.active.prefill_tokens("w2") == 0  # its prefill completed meanwhile
    assert a.peers["B"].synced and a.peers["B"].last_seq == 9


def test_own_changes_become_numbered_deltas_then_a_heartbeat_with_the_last_seq() -> None:
    a, _ = connected()
    a.queue(Add(SCORER, "r1", "w1", [1], 16))
    a.queue(Free(SCORER, "r1"))
    a.tick(5.0)
    messages, retry_in = a.take_outgoing(5.0, 1 << 20)
    assert messages == [
        Deltas("A", 1, [Add(SCORER, "r1", "w1", [1], 16), Free(SCORER, "r1")]),
        Heartbeat("A", 1, 0),
    ]
    assert retry_in is None


def test_a_snapshot_wanted_too_soon_is_held_back_and_retried() -> None:
    a, router = state()
    router.book_key("r1", "w1", [1], 16, 0.0)
    a.set_connected(True)
    first, _ = a.take_outgoing(10.0, 1 << 20)
    assert [type(m) for m in first] == [Snapshot, SyncRequest, Heartbeat]
    a.receive(encode(SyncRequest("B", "A")), now=10.1)
    messages, retry_in = a.take_outgoing(10.1, 1 << 20)
    assert messages == [] and retry_in is not None and 0.09 < retry_in <= 0.1
    messages, _ = a.take_outgoing(10.2, 1 << 20)
    assert messages == [Snapshot("A", 0, 2, 0, 1, [Add(SCORER, "r1", "w1", [1], 16)])]


def test_changes_made_while_disconnected_are_dropped_and_counted() -> None:
    a, _ = state()
    a.queue(Add(SCORER, "r1", "w1", [1], 16))
    assert a.metrics.dropped_ops._value.get() == 1
    a.set_connected(True)
    a.queue(Add(SCORER, "r2", "w1", [2], 16))
    a.set_connected(False)  # the queued op can no longer be sent in order
    assert a.metrics.dropped_ops._value.get() == 2
    # Back: a snapshot replaces what was lost, and every peer is asked for its own.
    a.set_connected(True)
    assert a.take_outgoing(1.0, 1 << 20)[0] == [
        Snapshot("A", 0, 1, 0, 1, []),
        SyncRequest("A", None),
        Heartbeat("A", 0, 0),
    ]
