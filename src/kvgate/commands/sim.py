"""`kvgate sim`: run N simulated vLLM-compatible workers until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio

import zmq

from kvgate.commands.support import UsageError, run_server
from kvgate.sim.engine import EngineConfig
from kvgate.sim.fleet import FleetConfig, serve
from kvgate.sim.prompts import TokensCodec
from kvgate.sim.timing import LinearTiming, PolynomialTiming, StepTiming
from kvgate.tokens import TokensError

PROG = "kvgate sim"
_DEFAULTS = EngineConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run simulated vLLM-compatible engines (HTTP API, KV events, metrics).",
    )
    p.add_argument("--workers", type=int, default=1, help="number of engines (default 1)")
    p.add_argument(
        "--base-port", type=int, default=8000, help="HTTP port of worker 0; 0 = free ports"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B", help="served model name")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: --model)")
    p.add_argument("--block-size", type=int, default=_DEFAULTS.block_size)
    p.add_argument("--num-gpu-blocks", type=int, default=_DEFAULTS.num_gpu_blocks)
    p.add_argument("--max-num-batched-tokens", type=int, default=_DEFAULTS.max_num_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=_DEFAULTS.max_num_seqs)
    p.add_argument("--max-model-len", type=int, default=_DEFAULTS.max_model_len)
    p.add_argument(
        "--eos-after",
        type=int,
        default=_DEFAULTS.eos_after,
        help="tokens after which a request not ignoring EOS stops",
    )
    p.add_argument(
        "--timing",
        choices=("polynomial", "linear"),
        default="polynomial",
        help="step-time model: Dynamo mocker polynomial (default) or linear betas",
    )
    p.add_argument(
        "--linear-betas",
        default="4796,9.45,35.63",
        help="b0,b1,b2 in microseconds for --timing linear (default: Qwen2.5-3B fit)",
    )
    p.add_argument(
        "--speedup", type=float, default=1.0, help="divide every step time by this factor"
    )
    p.add_argument(
        "--events-base-port",
        type=int,
        help="ZMQ PUB port of worker 0 (default 5557, or free ports with --base-port 0)",
    )
    p.add_argument(
        "--replay-base-port",
        type=int,
        help="ZMQ replay port of worker 0 (default: after the event ports)",
    )
    p.add_argument("--no-events", action="store_true", help="do not publish KV events")
    p.add_argument(
        "--event-layout",
        choices=("map", "array"),
        default="map",
        help="event encoding: vLLM 0.33 maps (default) or older arrays",
    )
    p.add_argument(
        "--instance-id-base", type=int, help="instance id of worker 0 (default: its HTTP port)"
    )
    return p


def _timing(args: argparse.Namespace) -> StepTiming:
    if args.timing == "polynomial":
        return PolynomialTiming(speedup=args.speedup)
    try:
        b0, b1, b2 = (float(x) for x in args.linear_betas.split(","))
    except ValueError:
        raise ValueError(f"--linear-betas needs three numbers, got {args.linear_betas!r}") from None
    return LinearTiming(b0, b1, b2, speedup=args.speedup)


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    events: int | None = None
    if not args.no_events:
        default_events = 0 if args.base_port == 0 else 5557
        events = default_events if args.events_base_port is None else args.events_base_port
    engine = EngineConfig(
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        eos_after=args.eos_after,
    )
    return FleetConfig(
        workers=args.workers,
        base_port=args.base_port,
        host=args.host,
        model=args.model,
        tokenizer=args.tokenizer or args.model,
        events_base_port=events,
        replay_base_port=args.replay_base_port,
        event_layout=args.event_layout,
        instance_id_base=args.instance_id_base,
        engine=engine,
        timing=_timing(args),
    )


def _announce(line: str) -> None:
    print(line, flush=True)


def fleet_from_args(args: argparse.Namespace) -> tuple[FleetConfig, TokensCodec]:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        codec = TokensCodec.load(config.tokenizer)
    except TokensError as exc:
        raise UsageError(f"cannot load tokenizer {config.tokenizer!r}: {exc}") from None
    return config, codec


async def _serve(fleet: tuple[FleetConfig, TokensCodec], stop: asyncio.Event) -> None:
    await serve(*fleet, _announce, stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_server(
        PROG,
        lambda: fleet_from_args(args),
        _serve,
        runtime_errors=(OSError, zmq.ZMQError),  # typically a port already in use
    )
