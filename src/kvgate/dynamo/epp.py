"""`kvgate epp` in front of Dynamo: the ``--dynamo-*`` flags and starting Dynamo discovery.

The picker's endpoints are then Dynamo *workers* (`kvgate.dynamo.discovery`), and Envoy's
destination for each is a Dynamo *frontend*: given with ``--dynamo-frontend``, or, in Kubernetes,
the pods of the InferencePool (``--pool-name``), which selects the frontend pods.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kvgate.dynamo.discovery import (
    DEFAULT_NAMESPACE,
    DynamoDiscovery,
    FileStoreSource,
    FrontendHealthSource,
    PortRule,
    WorkerAddressing,
    WorkerSource,
)
from kvgate.errors import ConfigError
from kvgate.fleet.endpoint import EndpointSet
from kvgate.fleet.sources import EndpointSpecError, parse_endpoints_flag
from kvgate.service import Service

__all__ = [
    "DynamoEppSettings",
    "add_dynamo_arguments",
    "dynamo_settings_from_args",
    "start_dynamo_discovery",
]

SourceKind = Literal["file", "frontend"]


@dataclass(frozen=True, slots=True)
class DynamoEppSettings:
    source: SourceKind
    frontends: tuple[str, ...] = ()
    """Static frontends (``ip:port``); empty: the InferencePool's pods."""
    store: Path | None = None
    """The file discovery store (source "file")."""
    namespace: str = DEFAULT_NAMESPACE
    addressing: WorkerAddressing = field(default_factory=WorkerAddressing)
    poll_interval_s: float = 0.5


def add_dynamo_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "Dynamo backend (endpoints are Dynamo workers, requests go to a Dynamo frontend)"
    )
    g.add_argument(
        "--dynamo-discovery",
        choices=["file", "frontend"],
        help="learn the workers from Dynamo's file discovery store (--dynamo-store) or from a "
        "frontend's GET /health (any discovery backend; the Kubernetes choice)",
    )
    g.add_argument(
        "--dynamo-frontend",
        default="",
        help="frontend(s) requests are sent to, ip:port,... (default with --pool-name: the pool's "
        "pods)",
    )
    g.add_argument("--dynamo-store", type=Path, help="file discovery store (default $DYN_FILE_KV)")
    g.add_argument(
        "--dynamo-namespace",
        help=f"Dynamo namespace (default $DYN_NAMESPACE or {DEFAULT_NAMESPACE})",
    )
    g.add_argument(
        "--dynamo-system-port",
        type=int,
        default=9090,
        help="workers' system server port when Dynamo does not record it (default 9090)",
    )
    g.add_argument(
        "--dynamo-events-port",
        default="+1",
        help="workers' vLLM-format KV-event port: N, +N (system port + N) or off (default +1)",
    )
    g.add_argument(
        "--dynamo-replay-port",
        default="+2",
        help="workers' KV-event replay port: N, +N or off (default +2)",
    )


def dynamo_settings_from_args(
    args: argparse.Namespace, env: Mapping[str, str] = os.environ
) -> DynamoEppSettings | None:
    """None without ``--dynamo-discovery``; `ConfigError` naming the flag when a value is wrong."""
    source: SourceKind | None = args.dynamo_discovery
    if source is None:
        return None
    if args.endpoints or args.endpoints_file is not None:
        raise ConfigError(
            "--dynamo-discovery", "the workers come from Dynamo: drop --endpoints[-file]"
        )
    try:
        frontends = tuple(ep.address for ep in parse_endpoints_flag(args.dynamo_frontend))
    except EndpointSpecError as err:
        raise ConfigError("--dynamo-frontend", str(err)) from None
    if not frontends and not args.pool_name:
        raise ConfigError(
            "--dynamo-frontend", "name the frontend(s) requests go to, or the InferencePool "
            "of the frontend pods with --pool-name"
        )  # fmt: skip
    store = args.dynamo_store
    if source == "file":
        if store is None and env.get("DYN_FILE_KV"):
            store = Path(env["DYN_FILE_KV"])
        if store is None:
            raise ConfigError("--dynamo-store", "file discovery needs the store directory")
    if not 0 < args.dynamo_system_port < 65536:
        raise ConfigError("--dynamo-system-port", f"got {args.dynamo_system_port}; not a port")
    rules: dict[str, PortRule | None] = {}
    for flag, text in (
        ("--dynamo-events-port", args.dynamo_events_port),
        ("--dynamo-replay-port", args.dynamo_replay_port),
    ):
        try:
            rules[flag] = PortRule.parse(text)
        except ValueError as err:
            raise ConfigError(flag, str(err)) from None
    namespace = args.dynamo_namespace or env.get("DYN_NAMESPACE") or DEFAULT_NAMESPACE
    return DynamoEppSettings(
        source=source,
        frontends=frontends,
        store=store,
        namespace=namespace,
        addressing=WorkerAddressing(
            system_port=args.dynamo_system_port,
            events=rules["--dynamo-events-port"],
            replay=rules["--dynamo-replay-port"],
        ),
    )


async def start_dynamo_discovery(
    stack: contextlib.AsyncExitStack,
    workers: EndpointSet,
    settings: DynamoEppSettings,
    *,
    frontend_pool: Callable[[EndpointSet], Service] | None = None,
) -> DynamoDiscovery:
    """Start discovery into ``workers``; everything started is stopped by ``stack``.

    ``frontend_pool`` builds the discovery of the frontend pods (the InferencePool) when no
    static frontend is given.
    """
    frontend_set = EndpointSet()

    def frontends() -> list[str]:
        return list(settings.frontends) or [ep.address for ep in frontend_set]

    if not settings.frontends:
        if frontend_pool is None:
            raise ConfigError("--dynamo-frontend", "no frontend given and no InferencePool")
        pool = frontend_pool(frontend_set)
        await pool.start()
        stack.push_async_callback(pool.aclose)
    source: WorkerSource
    if settings.source == "file":
        assert settings.store is not None
        source = FileStoreSource(settings.store, settings.namespace)
    else:
        source = FrontendHealthSource(frontends, settings.namespace)
    discovery = DynamoDiscovery(
        workers,
        source,
        frontends,
        settings.addressing,
        poll_interval_s=settings.poll_interval_s,
    )
    await discovery.start()
    stack.push_async_callback(discovery.aclose)
    return discovery
