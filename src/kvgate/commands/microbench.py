"""`kvgate microbench`: the routing core's hot paths timed against the reference in one run (see
:mod:`kvgate.bench.microbench` for what is measured and how)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvgate.bench.microbench import measure

PROG = "kvgate microbench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Time the routing core's hot paths.")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument(
        "--blocks", type=int, default=1 << 20, help="indexed blocks per fixture (default 2^20)"
    )
    parser.add_argument(
        "--seconds", type=float, default=0.05, help="minimum time per timing repeat"
    )
    parser.add_argument("--tokenizer", help="tokenizer dir or hub id for the tokenization bench")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip ai-dynamo-runtime even if installed"
    )
    return parser


def _log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.blocks <= 0 or args.seconds <= 0:
        parser.error("--blocks and --seconds must be positive")
    result = measure(
        args.blocks,
        args.seconds,
        tokenizer=args.tokenizer,
        reference=not args.no_reference,
        log=_log,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _log(f"wrote {args.json}")
    return 0
