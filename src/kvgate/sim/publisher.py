"""ZMQ publisher of an engine's KV events, with vLLM's replay socket.

Each batch goes out as three frames ``[topic, seq, payload]``: ``seq`` is an 8-byte big-endian
counter starting at 0, ``payload`` the msgpack batch (`kvgate.sim.wire`). The last
``buffer_steps`` batches are kept so a subscriber that saw a gap in ``seq`` can ask the ROUTER
replay socket for them: a DEALER sends ``[b"", start_seq]`` and receives
``[b"", topic, seq, payload]`` for each buffered batch with seq >= start_seq, then the end marker
``[b"", b"", -1, b""]`` (seq -1 as signed 8-byte big-endian).

Sending never blocks the event loop: PUB drops when a subscriber is past its high-water mark,
exactly what a real engine does.
"""

from __future__ import annotations

import contextlib
from collections import deque

import zmq
import zmq.asyncio

from kvgate.events.types import KvEvent
from kvgate.sim.wire import EventLayout, encode_batch

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KvEventPublisher:
    """Binds a PUB socket (and optionally a ROUTER for replay) for one engine."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        topic: str,
        *,
        replay_endpoint: str | None = None,
        layout: EventLayout = "map",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
    ) -> None:
        self.topic = topic
        self.layout: EventLayout = layout
        self._topic = topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_steps)
        self._pub = context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        try:
            self._pub.bind(endpoint)
            self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            if replay_endpoint is not None:
                self._replay = zmq.asyncio.Context(context).socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(replay_endpoint)
                self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            # A socket left open here would make the context's term() wait for it forever.
            self.close()
            raise

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: list[KvEvent], ts: float) -> int:
        """Send one batch; returns its sequence number."""
        seq = self._seq
        self._seq += 1
        seq_bytes = seq.to_bytes(8, "big")
        payload = encode_batch(ts, events, self.layout)
        self._buffer.append((seq, seq_bytes, payload))
        # A full queue means a slow subscriber; the replay buffer is its way to catch up.
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self._topic, seq_bytes, payload], flags=zmq.NOBLOCK)
        return seq

    async def serve_replay(self) -> None:
        """Answer replay requests until cancelled (no-op without a replay endpoint)."""
        sock = self._replay
        if sock is None:
            return
        while True:
            frames = await sock.recv_multipart()
            # [identity, b"", start] from a DEALER/REQ; [identity, start] without delimiter.
            if len(frames) not in (2, 3) or len(frames[-1]) != 8:
                continue
            identity = frames[0]
            start = int.from_bytes(frames[-1], "big")
            for seq, seq_bytes, payload in list(self._buffer):
                if seq >= start:
                    await sock.send_multipart([identity, b"", self._topic, seq_bytes, payload])
            await sock.send_multipart([identity, b"", b"", END_SEQ, b""])

    def close(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
