"""One routing policy's decisions on `kvgate microbench`'s fixture, to count their instructions.

`kvgate microbench` times kvgate's policy against the reference cost function in CPU time, which
a shared machine still moves by several microseconds. Instruction counts it cannot move: run this
under cachegrind twice, with two decision counts, and divide the difference by theirs (start-up
and the fixture cancel out):

    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
        python benchmarks/bench_decision.py --policy kvgate --decisions 220   # minus 20

``--policy cost-fn`` is the reference cost function (`KvRouter.select` after hashing, the
``dynamo`` policy); ``kvgate`` is kvgate's policy (hashing and prefix match, then
predicted-latency-scorer's prepare and score and slo-aware-picker's pick). Both are exactly what
the microbench times. Without valgrind it prints the CPU time per decision.
``--ttft-tolerance 0`` turns predicted-latency-scorer's near-tie settling off, to count what it
adds.
"""

from __future__ import annotations

import argparse
import random
import time

from kvgate.bench.microbench import VOCAB, _build, _decision, _policy_decision
from kvgate.scheduling.plugins.predicted_latency_scorer import PredictedLatencyParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=("cost-fn", "kvgate"), required=True)
    parser.add_argument("--decisions", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=1 << 20, help="indexed blocks")
    parser.add_argument("--ttft-tolerance", type=float, default=None, help="kvgate policy only")
    args = parser.parse_args()
    rng = random.Random(1)
    # As the microbench: the prompt is the start of a longer one cached to different depths.
    longest = [rng.randrange(VOCAB) for _ in range(max(args.tokens, 32768))]
    fixture = _build(
        longest, args.block_size, args.workers, args.blocks, rng=rng, with_reference=False
    )
    tokens = longest[: args.tokens]
    if args.policy == "cost-fn":
        decide = _decision(fixture.router, fixture.candidates, tokens, args.block_size)
    else:
        params = (
            None
            if args.ttft_tolerance is None
            else PredictedLatencyParams(ttft_tolerance=args.ttft_tolerance)
        )
        decide = _policy_decision(
            fixture.router, fixture.endpoints, tokens, args.block_size, params
        )
    decide()
    started = time.process_time()
    for _ in range(args.decisions):
        decide()
    each_us = (time.process_time() - started) / max(args.decisions, 1) * 1e6
    print(f"{args.policy}: {args.decisions} decisions, {each_us:.1f} us CPU each")


if __name__ == "__main__":
    main()
