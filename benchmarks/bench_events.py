"""Benchmark the KV event write path: decode alone, then decode + ingest through real ZMQ.

    python benchmarks/bench_events.py [--batches 20000] [--blocks 1 16 64 256] [--layout map]

decode: `decode_batch` on one pre-encoded payload in a loop (µs per batch, blocks/s).
ingest: a publisher *process* sends pre-encoded batches as fast as it can over tcp://127.0.0.1 to a
`KvEventSubscriber` whose sink only counts blocks; timed from the first message received to the
last, so it measures the subscriber (receive, seq tracking, decode, apply) when saturated. Both HWMs
are unlimited so nothing is dropped; the run checks that every batch arrived without a gap.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from kvgate.events.decode import decode_batch
from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.events.types import BlockStored, KvEvent

BLOCK_SIZE = 16
WORKER = "127.0.0.1:8000"


def make_payload(blocks: int, layout: str, seed: int) -> bytes:
    """One batch: a BlockStored of `blocks` blocks (vLLM-like token ids), as vLLM encodes it."""
    rng = random.Random(seed)
    hashes = [rng.getrandbits(64) for _ in range(blocks)]
    tokens = [rng.randrange(151_000) for _ in range(blocks * BLOCK_SIZE)]
    parent = rng.getrandbits(64)
    event: object
    if layout == "map":
        event = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": BLOCK_SIZE,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        }
    else:
        event = ["BlockStored", hashes, parent, tokens, BLOCK_SIZE, None, "GPU", None]
    return msgspec.msgpack.encode([time.time(), [event], 0])


def bench_decode(payload: bytes, blocks: int, seconds: float = 1.0) -> tuple[float, float]:
    """(µs per batch, blocks per second)."""
    iterations = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            decode_batch(iterations, payload)
        iterations += 200
    elapsed = time.perf_counter() - start
    return elapsed / iterations * 1e6, iterations * blocks / elapsed


def publisher_process(endpoint_queue: multiprocessing.Queue[str], payloads: list[bytes]) -> None:
    context = zmq.Context()
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    endpoint_queue.put(endpoint.decode())
    pub.recv()  # the subscription: the subscriber is listening
    topic = b"kv@" + WORKER.encode() + b"@bench"
    for seq, payload in enumerate(payloads):
        pub.send_multipart([topic, seq.to_bytes(8, "big"), payload])
    pub.close(linger=-1)  # flush everything before exiting
    context.term()


@dataclass
class CountingSink:
    blocks: int = 0
    first: float = 0.0
    last: float = 0.0

    def apply_event(self, worker: str, event: KvEvent) -> None:
        if type(event) is BlockStored:
            self.blocks += len(event.block_hashes)
        now = time.perf_counter()
        if not self.first:
            self.first = now
        self.last = now

    def clear_worker(self, worker: str) -> None:
        raise AssertionError("no gap or restart expected in the benchmark")


async def bench_ingest(payloads: list[bytes], blocks: int) -> tuple[float, float]:
    """(blocks per second, batches per second) through a real loopback socket."""
    sink = CountingSink()
    config = SubscriberConfig(block_size=BLOCK_SIZE, rcvhwm=0)
    queue: multiprocessing.Queue[str] = multiprocessing.Queue()
    process = multiprocessing.Process(target=publisher_process, args=(queue, payloads))
    process.start()
    try:
        endpoint = await asyncio.to_thread(queue.get, True, 10)
        async with KvEventSubscriber(sink, config) as sub:
            sub.add_source(WORKER, endpoint)
            expected = len(payloads) * blocks
            async with asyncio.timeout(120):
                while sink.blocks < expected:
                    await asyncio.sleep(0.01)
            stats = sub.stats.workers[WORKER]
            assert stats.batches == len(payloads), stats
            assert stats.gaps == stats.malformed == 0, stats
    finally:
        await asyncio.to_thread(process.join, 10)
    elapsed = sink.last - sink.first
    # The first batch's own processing is not inside the interval.
    return (expected - blocks) / elapsed, (len(payloads) - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--layout", choices=["map", "array"], default="map")
    args = parser.parse_args()

    print(f"layout={args.layout} block_size={BLOCK_SIZE} batches={args.batches}")
    header = "blocks/batch  bytes  decode µs/batch  decode Mblocks/s  ingest Mblocks/s  batches/s"
    print(header)
    for blocks in args.blocks:
        payloads = [make_payload(blocks, args.layout, seed) for seed in range(64)]
        decode_us, decode_rate = bench_decode(payloads[0], blocks)
        # Cycle a few distinct payloads: identical bytes would flatter any caching below us.
        stream = [payloads[i % len(payloads)] for i in range(args.batches)]
        ingest_rate, batch_rate = asyncio.run(bench_ingest(stream, blocks))
        print(
            f"{blocks:>12}  {len(payloads[0]):>5}  {decode_us:>15.2f}  {decode_rate / 1e6:>15.2f}"
            f"  {ingest_rate / 1e6:>16.2f}  {batch_rate:>9,.0f}"
        )


if __name__ == "__main__":
    main()
