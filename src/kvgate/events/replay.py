"""Client for an engine's replay socket, used to fill a gap in a KV event stream.

Protocol (vLLM ``ZmqEventPublisher``): the engine binds a ROUTER; a DEALER sends
``[b"", start_seq]`` (8-byte big-endian) and receives ``[b"", topic, seq, payload]`` for every
buffered batch whose seq is ``>= start_seq``, oldest first, then ``[b"", b"", END, b""]`` where
END is -1 as a signed 8-byte big-endian integer. The engine keeps a bounded buffer (10,000 batches
by default), so a replay may start later than asked: the caller checks coverage.
"""

from __future__ import annotations

import asyncio
from typing import Final

import zmq
import zmq.asyncio

__all__ = ["END_SEQ_FRAME", "ReplayError", "fetch_replay", "offset_endpoint_port"]

END_SEQ_FRAME: Final = (-1).to_bytes(8, "big", signed=True)
_REPLY_FRAMES: Final = 4


class ReplayError(Exception):
    """The replay socket did not answer in time or answered something off-protocol."""


async def fetch_replay(
    context: zmq.asyncio.Context,
    endpoint: str,
    start_seq: int,
    *,
    stop_before: int,
    timeout_s: float,
) -> list[tuple[int, bytes]]:
    """Ask `endpoint` for the batches from `start_seq` on; return ``(seq, payload)`` in order.

    Stops at the end marker or at the first batch with ``seq >= stop_before`` (the caller already
    has that one), whichever comes first. Raises `ReplayError` after `timeout_s` in total, or on a
    reply that does not follow the protocol.
    """
    dealer = context.socket(zmq.DEALER)
    # The socket is thrown away after one request: pending output must not hold up its close.
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(endpoint)
        async with asyncio.timeout(timeout_s):
            await dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
            batches: list[tuple[int, bytes]] = []
            while True:
                frames = await dealer.recv_multipart()
                if len(frames) != _REPLY_FRAMES or frames[0] != b"" or len(frames[2]) != 8:
                    raise ReplayError(
                        f"replay reply from {endpoint} has an unexpected shape "
                        f"({len(frames)} frames)"
                    )
                if frames[2] == END_SEQ_FRAME:
                    return batches
                seq = int.from_bytes(frames[2], "big")
                if seq >= stop_before:
                    return batches
                batches.append((seq, frames[3]))
    except TimeoutError:
        raise ReplayError(f"replay from {endpoint} timed out after {timeout_s:g} s") from None
    except zmq.ZMQError as exc:
        raise ReplayError(f"replay from {endpoint} failed: {exc}") from None
    finally:
        dealer.close()


def offset_endpoint_port(endpoint: str, data_parallel_rank: int | None) -> str:
    """The endpoint data-parallel rank `data_parallel_rank` uses: vLLM adds the rank to the port."""
    if not data_parallel_rank:
        return endpoint
    base, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not endpoint.startswith("tcp://"):
        raise ValueError(f"cannot offset the port of {endpoint!r}: expected tcp://host:port")
    return f"{base}:{int(port) + data_parallel_rank}"
