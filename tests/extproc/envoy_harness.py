"""A real Envoy for tests: start it on a generated bootstrap, wait until it is ready, stop it.

    async with envoy_running(bootstrap, workdir=tmp_path) as envoy:
        port = envoy.listener_port("ingress")

Listeners and the admin interface may use port 0: Envoy binds free ports itself and the harness
reads the real ones from the admin API, so there is no race between picking a port and binding it.
Envoy runs in its own session (process group) with ``--disable-hot-restart`` and a ``--base-id``
unique to this process, and is always terminated — SIGTERM, then SIGKILL — when the block exits.
Everything binds 127.0.0.1. The builders below make the bootstrap pieces tests need.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from kvgate.gateway.envoy_binary import find_envoy

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_base_ids = itertools.count(1)


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for servers that cannot bind port 0 themselves)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _base_id() -> int:
    # Unique per process and per start, so parallel test runs never share Envoy's shared memory.
    return (os.getpid() % 100_000) * 100 + next(_base_ids) % 100


@dataclass
class RunningEnvoy:
    process: subprocess.Popen[bytes]
    admin_url: str
    log_path: Path
    config_path: Path

    def admin_get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(f"{self.admin_url}{path}", timeout=timeout) as response:
            return bytes(response.read())

    def listener_port(self, name: str) -> int:
        """The port Envoy really bound for listener ``name``."""
        listeners = json.loads(self.admin_get("/listeners?format=json"))
        for listener in listeners.get("listener_statuses", []):
            if listener.get("name") == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise KeyError(f"no listener named {name!r}: {listeners}")

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges (``name: value``) whose name starts with ``prefix``."""
        text = self.admin_get("/stats?usedonly").decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and name.startswith(prefix) and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _with_admin(bootstrap: Mapping[str, Any] | str) -> dict[str, Any]:
    config = yaml.safe_load(bootstrap) if isinstance(bootstrap, str) else dict(bootstrap)
    if not isinstance(config, dict):
        raise ValueError("the bootstrap must be a YAML/JSON object")
    config.setdefault(
        "admin", {"address": {"socket_address": {"address": LOOPBACK, "port_value": 0}}}
    )
    return config


def _start(
    bootstrap: Mapping[str, Any] | str,
    workdir: Path,
    *,
    concurrency: int,
    log_level: str,
    extra_args: Sequence[str],
) -> RunningEnvoy:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(_with_admin(bootstrap), sort_keys=False))
    admin_path = workdir / "admin-address"
    admin_path.unlink(missing_ok=True)
    log_path = workdir / "envoy.log"
    args = [
        str(find_envoy()),
        "-c",
        str(config_path),
        "--base-id",
        str(_base_id()),
        "--disable-hot-restart",
        "--concurrency",
        str(concurrency),
        "--admin-address-path",
        str(admin_path),
        "--log-level",
        log_level,
        "--log-path",
        str(log_path),
        *extra_args,
    ]
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    envoy = RunningEnvoy(process, "", log_path, config_path)
    try:
        _wait_ready(envoy, admin_path)
    except BaseException:
        _stop(envoy)
        raise
    return envoy


def _wait_ready(envoy: RunningEnvoy, admin_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if envoy.process.poll() is not None:
            raise RuntimeError(
                f"envoy exited with {envoy.process.returncode} before it was ready:\n"
                f"{envoy.log_tail()}"
            )
        if not envoy.admin_url:
            address = admin_path.read_text().strip() if admin_path.exists() else ""
            if address:
                envoy.admin_url = f"http://{address}"
        if envoy.admin_url:
            with contextlib.suppress(OSError, urllib.error.URLError):
                if envoy.admin_get("/ready", timeout=1.0).strip() == b"LIVE":
                    return
        time.sleep(0.05)
    raise TimeoutError(f"envoy not ready after {READY_TIMEOUT_S}s:\n{envoy.log_tail()}")


def _stop(envoy: RunningEnvoy) -> None:
    process = envoy.process
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def envoy_running_sync(
    bootstrap: Mapping[str, Any] | str,
    *,
    workdir: Path,
    concurrency: int = 1,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
) -> Iterator[RunningEnvoy]:
    """Envoy on ``bootstrap`` (a dict or YAML text) for the duration of the block."""
    envoy = _start(
        bootstrap, workdir, concurrency=concurrency, log_level=log_level, extra_args=extra_args
    )
    try:
        yield envoy
    finally:
        _stop(envoy)


@contextlib.asynccontextmanager
async def envoy_running(
    bootstrap: Mapping[str, Any] | str,
    *,
    workdir: Path,
    concurrency: int = 1,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
) -> AsyncIterator[RunningEnvoy]:
    """:func:`envoy_running_sync` for async code: starting and stopping happen off the loop, so
    servers on the same loop (upstreams, ext_proc) keep answering meanwhile."""
    envoy = await asyncio.to_thread(
        _start,
        bootstrap,
        workdir,
        concurrency=concurrency,
        log_level=log_level,
        extra_args=extra_args,
    )
    try:
        yield envoy
    finally:
        await asyncio.to_thread(_stop, envoy)


# -- bootstrap builders --------------------------------------------------------------------------


def socket_address(port: int, address: str = LOOPBACK) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def static_cluster(name: str, port: int, *, http2: bool = False) -> dict[str, Any]:
    """A cluster of one endpoint on 127.0.0.1 (``http2`` for gRPC services such as ext_proc)."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def http_listener(
    name: str,
    cluster: str,
    http_filters: Sequence[Mapping[str, Any]] = (),
    *,
    port: int = 0,
    route_timeout_s: float = 30.0,
    buffer_limit_bytes: int | None = None,
) -> dict[str, Any]:
    """An HTTP listener routing everything to ``cluster`` through ``http_filters`` (the router
    filter is appended)."""
    listener: dict[str, Any] = {
        "name": name,
        "address": socket_address(port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "route": {
                                                    "cluster": cluster,
                                                    "timeout": f"{route_timeout_s}s",
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                *http_filters,
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "http.router.v3.Router"
                                    },
                                },
                            ],
                        },
                    }
                ]
            }
        ],
    }
    if buffer_limit_bytes is not None:
        listener["per_connection_buffer_limit_bytes"] = buffer_limit_bytes
    return listener


def bootstrap(
    listeners: Sequence[Mapping[str, Any]], clusters: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return {"static_resources": {"listeners": list(listeners), "clusters": list(clusters)}}


def ext_proc_filter(
    cluster: str, processing_mode: Mapping[str, str], *, message_timeout_s: float = 10.0
) -> dict[str, Any]:
    """An ext_proc HTTP filter calling the gRPC service behind ``cluster``; fails closed."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
            "ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "10s"},
            "failure_mode_allow": False,
            "message_timeout": f"{message_timeout_s}s",
            "processing_mode": dict(processing_mode),
        },
    }


def lua_filter(source: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": source},
        },
    }


# -- an upstream that shows what Envoy forwarded --------------------------------------------------


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return web.json_response(
        {
            "served_by": sockname[1] if sockname else None,
            "method": request.method,
            "path": request.path_qs,
            "body_b64": base64.b64encode(body).decode(),
            "content_length": request.headers.get("content-length"),
            "transfer_encoding": request.headers.get("transfer-encoding"),
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
    )


@contextlib.asynccontextmanager
async def echo_upstream(max_body_bytes: int = 64 << 20) -> AsyncIterator[int]:
    """An HTTP server on 127.0.0.1 answering every request with JSON describing it (body as
    base64, ``content_length``, ``transfer_encoding``, ``headers``, and ``served_by``: the port
    the request arrived on); yields its port. The
    listening socket has TCP_NODELAY (inherited by accepted sockets): without it small answers
    wait ~40 ms for delayed ACKs."""
    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((LOOPBACK, 0))
        sock.listen(256)
        site = web.SockSite(runner, sock)
        await site.start()
        yield int(sock.getsockname()[1])
    finally:
        await runner.cleanup()
        sock.close()


def echoed_body(answer: Mapping[str, Any]) -> bytes:
    return base64.b64decode(answer["body_b64"])
