"""`kvgate epp`: the endpoint picker process — flags to `EppSettings`, then `EppRuntime` until
SIGINT or SIGTERM (see :mod:`kvgate.extproc.epp_runtime`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvgate.commands.support import add_log_level, run_server, setup_logging
from kvgate.dynamo.epp import add_dynamo_arguments, dynamo_settings_from_args
from kvgate.errors import ConfigError
from kvgate.extproc.epp import EppOptions
from kvgate.extproc.epp_runtime import EppSettings, serve
from kvgate.fleet.pool_discovery import INSTANCE_ID_ANNOTATION
from kvgate.sync import DEFAULT_NATS_URL

PROG = "kvgate epp"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="KV-cache-aware endpoint picker: an Envoy ext_proc server (GAIE protocol).",
    )
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc port (default 9002)")
    p.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument(
        "--secure-serving",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TLS on the ext_proc port (self-signed unless --cert-path); default on",
    )
    p.add_argument("--cert-path", type=Path, help="directory with tls.crt and tls.key")
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--config-file", type=Path, help="EndpointPickerConfig YAML file")
    cfg.add_argument("--config-text", help="EndpointPickerConfig YAML text")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--endpoints", default="", help="ip:port[=instance_id],... (static)")
    src.add_argument("--endpoints-file", type=Path, help="YAML/JSON endpoint list, watched")
    p.add_argument("--engine", default="vllm", choices=["vllm", "sglang", "trtllm"])
    p.add_argument("--events-port", type=int, help="engines' KV-event port (tcp://<ip>:<port>)")
    p.add_argument(
        "--replay-port",
        type=int,
        help="engines' KV-event replay port (vLLM's replay_endpoint, tcp://<ip>:<port>), for "
        "endpoints whose events come by --events-port: gaps refilled, history read on start",
    )
    p.add_argument(
        "--events-bind", help="bind one SUB socket that engines connect to (e.g. tcp://*:5557)"
    )
    p.add_argument("--pool-name", help="InferencePool to discover endpoints from (Kubernetes)")
    p.add_argument("--pool-namespace", default="default", help="namespace of the InferencePool")
    p.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig for --pool-name outside a cluster (default: in-cluster service "
        "account, else $KUBECONFIG, else ~/.kube/config)",
    )
    p.add_argument(
        "--instance-id-annotation",
        default=INSTANCE_ID_ANNOTATION,
        help="pod annotation with the worker's Dynamo instance id (default %(default)s)",
    )
    p.add_argument("--model", help="served model name; other model names get 404")
    p.add_argument("--lora-adapters", default="", help="comma-separated adapter names served")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (needed for KV routing)")
    p.add_argument("--max-body-bytes", type=int, default=EppOptions.max_body_bytes)
    p.add_argument("--scrape-interval", type=float, default=0.05, help="seconds between scrapes")
    p.add_argument(
        "--body-mode",
        choices=["full-duplex", "buffered"],
        default="full-duplex",
        help="request body mode assumed when Envoy does not announce it",
    )
    p.add_argument(
        "--objectives",
        default="",
        help="InferenceObjective priorities, name=priority,... (chosen per request by the "
        "x-gateway-inference-objective header; priority < 0 is shed when the pool is saturated)",
    )
    p.add_argument("--decision-header", action="store_true", help="add x-kvgate-decision")
    p.add_argument(
        "--inline-nvext",
        action="store_true",
        help="merge Dynamo nvext routing fields into the body here (no body transformer)",
    )
    p.add_argument(
        "--observer-replica",
        help="this replica's name in the routing answer's kvgate.epp metadata, for a gateway "
        "that sends a response observer's stream to the replica that routed (kvgate up: epp-N)",
    )
    sync = p.add_argument_group("replica sync (several EPP replicas sharing in-flight load)")
    sync.add_argument(
        "--replica-sync",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share in-flight load with other replicas over NATS "
        "(default: $DYNAMO_ROUTER_REPLICA_SYNC, else off)",
    )
    sync.add_argument(
        "--nats-url", help=f"NATS server (default $NATS_SERVER or {DEFAULT_NATS_URL})"
    )
    sync.add_argument(
        "--replica-sync-subject",
        help="NATS subject shared by the replicas of one pool (default "
        "kvgate.<pool, namespace or model>.active_sequences)",
    )
    sync.add_argument("--replica-id", help="this replica's id (default host-pid-random)")
    sync.add_argument(
        "--replica-lease",
        type=float,
        default=3.0,
        help="seconds without a heartbeat (sent every lease/3) before a replica's load is "
        "dropped (default 3)",
    )
    add_dynamo_arguments(p)
    add_log_level(p)
    return p


def settings_from_args(args: argparse.Namespace) -> EppSettings:
    if args.pool_name and (args.endpoints or args.endpoints_file is not None):
        raise ConfigError("--pool-name", "give either --pool-name or --endpoints[-file], not both")
    config_text = None
    if args.config_file is not None:
        try:
            config_text = args.config_file.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError("--config-file", f"cannot read {args.config_file}: {err}") from None
    elif args.config_text:
        config_text = args.config_text
    for flag, value in (
        ("--grpc-port", args.grpc_port),
        ("--grpc-health-port", args.grpc_health_port),
        ("--metrics-port", args.metrics_port),
    ):
        if not 0 <= value < 65536:
            raise ConfigError(flag, f"got {value}; must be a port in 0..65535")
    if args.max_body_bytes <= 0:
        raise ConfigError("--max-body-bytes", "must be positive")
    if not args.replica_lease > 0:
        raise ConfigError("--replica-lease", f"got {args.replica_lease}; must be > 0")
    adapters = frozenset(a.strip() for a in args.lora_adapters.split(",") if a.strip())
    priorities: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in args.objectives.split(","))):
        name, sep, value = item.partition("=")
        try:
            priorities[name.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError("--objectives", f"{item!r}: expected name=integer priority")
    options = EppOptions(
        max_body_bytes=args.max_body_bytes,
        default_full_duplex=args.body_mode == "full-duplex",
        served_model=args.model,
        lora_adapters=adapters,
        decision_header=args.decision_header,
        inline_nvext=args.inline_nvext,
        observer_replica=args.observer_replica,
        priorities=priorities,
    )
    return EppSettings(
        bind=args.bind,
        grpc_port=args.grpc_port,
        health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        secure=args.secure_serving,
        cert_path=args.cert_path,
        config_text=config_text,
        endpoints=args.endpoints,
        endpoints_file=args.endpoints_file,
        engine=args.engine,
        events_port=args.events_port,
        replay_port=args.replay_port,
        events_bind=args.events_bind,
        pool_name=args.pool_name,
        pool_namespace=args.pool_namespace,
        kubeconfig=args.kubeconfig,
        instance_id_annotation=args.instance_id_annotation,
        model=args.model,
        tokenizer=args.tokenizer,
        lora_adapters=adapters,
        scrape_interval_s=args.scrape_interval,
        options=options,
        replica_sync=args.replica_sync,
        nats_url=args.nats_url,
        sync_subject=args.replica_sync_subject,
        router_id=args.replica_id,
        sync_heartbeat_s=args.replica_lease / 3,
        sync_lease_s=args.replica_lease,
        dynamo=dynamo_settings_from_args(args),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return run_server(
        PROG,
        lambda: settings_from_args(args),
        serve,
        runtime_errors=(OSError,),
    )
