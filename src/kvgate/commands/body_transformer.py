"""`kvgate body-transformer`: the ext_proc service writing the picker's routing headers into the
request body's ``nvext`` field (see :mod:`kvgate.extproc.body_transformer`), until SIGINT or
SIGTERM."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvgate.commands.support import UsageError, add_log_level, run_server, setup_logging
from kvgate.extproc.body_transformer import TransformerSettings, serve

PROG = "kvgate body-transformer"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Envoy ext_proc service writing Dynamo routing headers "
        "(x-worker-instance-id, x-prefiller-host-port, x-dynamo-routing-mode) into the "
        "request body's nvext field.",
    )
    p.add_argument("--port", type=int, default=9004, help="ext_proc port (default 9004)")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument(
        "--grpc-health-port", type=int, default=9005, help="gRPC health port (default 9005)"
    )
    p.add_argument(
        "--metrics-port", type=int, default=9091, help="Prometheus metrics port (default 9091)"
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=TransformerSettings.max_body_bytes,
        help="larger request bodies get 413 (default 16 MiB)",
    )
    p.add_argument(
        "--secure-serving",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TLS on the ext_proc port (self-signed unless --cert-path); default off",
    )
    p.add_argument("--cert-path", type=Path, help="directory with tls.crt and tls.key")
    add_log_level(p)
    return p


def settings_from_args(args: argparse.Namespace) -> TransformerSettings:
    for flag, value in (
        ("--port", args.port),
        ("--grpc-health-port", args.grpc_health_port),
        ("--metrics-port", args.metrics_port),
    ):
        if not 0 <= value < 65536:
            raise UsageError(f"{flag}: got {value}; must be a port in 0..65535")
    if args.max_body_bytes <= 0:
        raise UsageError(f"--max-body-bytes: got {args.max_body_bytes}; must be positive")
    if args.cert_path is not None and not args.secure_serving:
        raise UsageError("--cert-path needs --secure-serving")
    return TransformerSettings(
        bind=args.bind,
        port=args.port,
        health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        secure=args.secure_serving,
        cert_path=args.cert_path,
        max_body_bytes=args.max_body_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return run_server(
        PROG,
        lambda: settings_from_args(args),
        serve,
        # grpc reports a port it cannot bind as RuntimeError
        runtime_errors=(OSError, RuntimeError),
    )
