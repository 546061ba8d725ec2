"""The Envoy bootstrap `kvgate up` runs: the seed's request path on one machine.

    client ─▶ listener ─▶ strip gateway-internal headers ─▶ ext_proc: EPP ─▶ first endpoint
    ─▶ [ext_proc: body transformer | Lua nvext] ─▶ router ─▶ ORIGINAL_DST cluster ─▶ worker

- Gateway-internal headers a client sent (`kvgate.extproc.headers`) are removed *before* the EPP
  sees the request, on every route, so a client can never steer routing, even when the EPP is down
  and the request fails open.
- The EPP names the pick and its ordered fallbacks in ``x-gateway-destination-endpoint``
  (``ip:port,ip:port``, the same list as its ``envoy.lb`` metadata, as the GAIE protocol asks).
  Envoy's ORIGINAL_DST cluster takes one address from a header, so a small Lua filter copies the
  first entry to ``x-kvgate-upstream-endpoint``, which the cluster reads: the first endpoint is
  used, as the protocol specifies (no retries down the list here).
- The EPP gets request and response headers and both bodies in FULL_DUPLEX_STREAMED mode (the GAIE
  reference), so it sees first token and completion. The body transformer is configured as the
  seed configures it: request headers SEND, request body BUFFERED, responses skipped.
- With ``response_observer`` the routing filter gets no response phase; a second ext_proc filter
  to the same EPP, just before the router, runs in ``observability_mode``: Envoy sends it the
  response headers, each body chunk (STREAMED) and trailers and waits for nothing, so no response
  chunk waits for Python. It forwards the ``kvgate.epp`` dynamic metadata the routing answer set
  (a random key per routed request; clients cannot set metadata), which ties its stream to the
  routed request. The EPP sets no response headers, so observability mode's ignored mutations
  lose nothing. Its stream must reach the replica that routed: with several EPP hosts each
  replica names itself in that metadata too (``--observer-replica``), one route per replica
  matches the name, and the route's ExtProcPerRoute sends the observer to a cluster of that
  replica alone.
- Failure mode: ``FailClose`` rejects when the EPP is unreachable; ``FailOpen`` passes the request
  on, to a round-robin cluster of the workers (the destination header is then absent, and a
  second route catches that case). Envoy cannot fail open in FULL_DUPLEX_STREAMED mode, so
  ``FailOpen`` runs the EPP with a buffered request body and a STREAMED response body.
- Several EPP replicas (``kvgate up --epp-replicas N``) are the hosts of the one ``epp`` cluster,
  round-robin per request stream. Envoy health-checks each replica's gRPC health port
  ("readiness", every second), ejects a replica whose connection fails at once (outlier
  detection on local-origin errors) and retries a stream whose connection to a replica failed, so a
  dead replica is skipped; a stream already open on a replica when it dies fails (FailClose: 500).
- Admin listens on loopback only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from kvgate.extproc import headers, protocol

DESTINATION_HEADER = headers.DESTINATION
UPSTREAM_HEADER = "x-kvgate-upstream-endpoint"
"""The one address the ORIGINAL_DST cluster connects to: the first entry of the destination."""
STRIPPED_HEADERS = (*headers.GATEWAY_INTERNAL, UPSTREAM_HEADER)
OBSERVER_NAMESPACE = protocol.OBSERVER_NAMESPACE
OBSERVER_FILTER = "envoy.filters.http.ext_proc.epp_response_observer"
# Envoy's Lua has no string split; the first comma-separated entry, blanks trimmed.
FIRST_ENDPOINT_LUA = f"""
function envoy_on_request(handle)
  local headers = handle:headers()
  local destinations = headers:get("{DESTINATION_HEADER}")
  if destinations ~= nil then
    local first = destinations:match("^[ \t]*([^, \t]+)")
    if first ~= nil then
      headers:replace("{UPSTREAM_HEADER}", first)
    end
  end
end
"""
BodyTransformer = Literal["ext-proc", "inline", "lua", "off"]
FailureMode = Literal["FailOpen", "FailClose"]

_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_EXT_PROC_PER_ROUTE = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
)
_LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
_HEADER_MUTATION = (
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
)
_HTTP2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


@dataclass
class GatewaySpec:
    listen_host: str
    listen_port: int
    admin_port: int
    epp_address: tuple[str, int]
    workers: Sequence[tuple[str, int]]
    """Used only for the fail-open fallback cluster."""
    failure_mode: FailureMode = "FailClose"
    body_transformer: BodyTransformer = "off"
    body_transformer_address: tuple[str, int] | None = None
    lua_code: str | None = None
    request_timeout_s: float = 600.0
    extra_clusters: list[dict[str, Any]] = field(default_factory=list)
    epp_addresses: Sequence[tuple[str, int]] = ()
    """Every EPP replica; empty: just ``epp_address``."""
    epp_health_ports: Sequence[int] = ()
    """The gRPC health port of each replica in ``epp_addresses``: Envoy health-checks them."""
    response_observer: bool = False
    """The EPP sees responses through an observe-only filter instead of in the request path."""
    epp_replica_names: Sequence[str] = ()
    """With the observer and several EPP hosts: each host's ``--observer-replica`` name, in the
    order of ``epp_addresses``."""

    def epp_hosts(self) -> list[tuple[str, int]]:
        return list(self.epp_addresses) or [self.epp_address]


def _health_checked(cluster: dict[str, Any], health_ports: Sequence[int]) -> dict[str, Any]:
    """Skip dead or unready replicas: an active gRPC health check of every host (on its own health
    port, service "readiness") and ejection after one failed connection. No panic routing: with
    every replica down the stream fails, and the filter's failure mode decides."""
    for lb_endpoint, port in zip(
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"], health_ports, strict=True
    ):
        lb_endpoint["endpoint"]["health_check_config"] = {"port_value": port}
    cluster["health_checks"] = [
        {
            "timeout": "1s",
            "interval": "1s",
            "no_traffic_interval": "1s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": "readiness"},
        }
    ]
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 1,
        "interval": "1s",
        "base_ejection_time": "3s",
        "max_ejection_percent": 100,
    }
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return cluster


def _circuit_breakers() -> dict[str, Any]:
    """Envoy's default circuit breakers allow 1,024 requests in flight per cluster. Every request
    holds a stream to each ext_proc service for as long as it lasts (through the response), and
    LLM requests last seconds: those clusters need as much room as the workers'."""
    limit = 40000
    return {
        "thresholds": [
            {"max_connections": limit, "max_pending_requests": limit, "max_requests": limit}
        ]
    }


def _cluster(name: str, hosts: Sequence[tuple[str, int]], *, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": _circuit_breakers(),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                        for host, port in hosts
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = _HTTP2_OPTIONS
    return cluster


def _ext_proc(
    cluster: str,
    *,
    full_duplex: bool,
    fail_open: bool,
    responses: bool,
    retries: int = 0,
    observed: bool = False,
) -> dict[str, Any]:
    body_mode = "FULL_DUPLEX_STREAMED" if full_duplex else "BUFFERED"
    # Envoy cannot fail open once body chunks went to the processor in full-duplex mode (it
    # answers 500 instead), so fail-open configs use the buffered request body and the
    # chunk-by-chunk STREAMED response mode, which keep responses streaming.
    response_mode = "STREAMED" if body_mode == "BUFFERED" else body_mode
    mode = {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND" if responses else "SKIP",
        "request_body_mode": body_mode,
        "response_body_mode": response_mode if responses else "NONE",
        "request_trailer_mode": "SEND" if full_duplex else "SKIP",
        "response_trailer_mode": "SEND" if full_duplex and responses else "SKIP",
    }
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": cluster}, "timeout": "10s"}
    if retries:
        # Another replica when the connection to one fails (it just died or was ejected).
        grpc_service["retry_policy"] = {
            "retry_on": "connect-failure,refused-stream,reset,unavailable",
            "num_retries": retries,
            "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.25s"},
        }
    config: dict[str, Any] = {
        "@type": _EXT_PROC,
        "grpc_service": grpc_service,
        "processing_mode": mode,
        "message_timeout": "1000s",
        "failure_mode_allow": fail_open,
        "allow_mode_override": False,
    }
    if observed:
        # The routing answer's request id, for the observer filter to forward.
        config["metadata_options"] = {"receiving_namespaces": {"untyped": [OBSERVER_NAMESPACE]}}
    return {"name": f"envoy.filters.http.ext_proc.{cluster}", "typed_config": config}


def _response_observer(cluster: str) -> dict[str, Any]:
    return {
        "name": OBSERVER_FILTER,
        "typed_config": {
            "@type": _EXT_PROC,
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            "observability_mode": True,
            # Envoy closes the stream this long after the HTTP stream ends, so that messages
            # still on their way are not cut off; the EPP completes the request at the end of
            # the response (or at the routing stream's end plus its grace) before that.
            "deferred_close_timeout": "5s",
            "processing_mode": {
                "request_header_mode": "SKIP",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                # The only body mode observability mode sends.
                "response_body_mode": "STREAMED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SEND",
            },
            "metadata_options": {"forwarding_namespaces": {"untyped": [OBSERVER_NAMESPACE]}},
            # Observing must never fail a request.
            "failure_mode_allow": True,
        },
    }


def _observer_cluster(replica: int) -> str:
    return f"epp_observer_{replica}"


def _observer_disabled() -> dict[str, Any]:
    return {OBSERVER_FILTER: {"@type": _EXT_PROC_PER_ROUTE, "disabled": True}}


def _observed_by(route: dict[str, Any], replica: str, cluster: str) -> dict[str, Any]:
    """``route`` for requests the replica named ``replica`` routed (its name in the routing
    answer's metadata), with their observer stream sent to ``cluster``: that replica alone."""
    match = {
        **route["match"],
        "dynamic_metadata": [
            {
                "filter": OBSERVER_NAMESPACE,
                "path": [{"key": protocol.OBSERVER_REPLICA_KEY}],
                "value": {"string_match": {"exact": replica}},
            }
        ],
    }
    override = {"grpc_service": {"envoy_grpc": {"cluster_name": cluster}}}
    return {
        **route,
        "match": match,
        "typed_per_filter_config": {
            OBSERVER_FILTER: {"@type": _EXT_PROC_PER_ROUTE, "overrides": override}
        },
    }


def _lua(name: str, code: str) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {"@type": _LUA, "default_source_code": {"inline_string": code}},
    }


def build_bootstrap(spec: GatewaySpec) -> dict[str, Any]:
    fail_open = spec.failure_mode == "FailOpen"
    epp_hosts = spec.epp_hosts()
    per_replica = spec.response_observer and len(epp_hosts) > 1
    if per_replica and len(spec.epp_replica_names) != len(epp_hosts):
        raise ValueError(
            "the response observer with several EPP hosts needs each one's replica name: its "
            "stream must reach the one that routed"
        )
    filters: list[dict[str, Any]] = [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": _HEADER_MUTATION,
                "mutations": {
                    "request_mutations": [{"remove": h} for h in STRIPPED_HEADERS],
                },
            },
        },
        _ext_proc(
            "epp",
            full_duplex=not fail_open,
            fail_open=fail_open,
            responses=not spec.response_observer,
            retries=len(epp_hosts) if len(epp_hosts) > 1 else 0,
            observed=spec.response_observer,
        ),
        _lua("kvgate.first_endpoint", FIRST_ENDPOINT_LUA),
    ]
    epp_cluster = _cluster("epp", epp_hosts, http2=True)
    if spec.epp_health_ports:
        epp_cluster = _health_checked(epp_cluster, spec.epp_health_ports)
    clusters = [
        {
            "name": "original_destination_cluster",
            "type": "ORIGINAL_DST",
            "connect_timeout": "5s",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {
                "use_http_header": True,
                "http_header_name": UPSTREAM_HEADER,
            },
            "circuit_breakers": _circuit_breakers(),
        },
        epp_cluster,
    ]
    if per_replica:
        clusters += [
            _cluster(_observer_cluster(i), [host], http2=True) for i, host in enumerate(epp_hosts)
        ]
    if spec.workers:
        clusters.append(_cluster("fail_open_workers", spec.workers, http2=False))
    if spec.body_transformer == "ext-proc":
        if spec.body_transformer_address is None:
            raise ValueError("body transformer address required for --body-transformer ext-proc")
        filters.append(
            _ext_proc("body_transformer", full_duplex=False, fail_open=False, responses=False)
        )
        clusters.append(_cluster("body_transformer", [spec.body_transformer_address], http2=True))
    elif spec.body_transformer == "lua":
        if not spec.lua_code:
            raise ValueError("Lua code required for --body-transformer lua")
        filters.append(_lua("envoy.filters.http.lua", spec.lua_code))
    if spec.response_observer:
        filters.append(_response_observer("epp"))
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}})
    timeout = f"{spec.request_timeout_s:g}s"
    routed: dict[str, Any] = {
        "match": {
            "prefix": "/",
            "headers": [{"name": DESTINATION_HEADER, "present_match": True}],
        },
        "route": {
            "cluster": "original_destination_cluster",
            "timeout": timeout,
            "idle_timeout": timeout,
        },
    }
    routes: list[dict[str, Any]] = []
    if per_replica:
        routes += [
            _observed_by(routed, name, _observer_cluster(i))
            for i, name in enumerate(spec.epp_replica_names)
        ]
        # Routed without naming a replica (a request without a body): no observer knows it.
        routed = {**routed, "typed_per_filter_config": _observer_disabled()}
    routes.append(routed)
    if fail_open and spec.workers:
        fallback: dict[str, Any] = {
            "match": {"prefix": "/"},
            "route": {"cluster": "fail_open_workers", "timeout": timeout},
        }
        if spec.response_observer:
            # Not routed by the EPP: nothing to observe.
            fallback["typed_per_filter_config"] = _observer_disabled()
        routes.append(fallback)
    hcm = {
        "@type": _HCM,
        "stat_prefix": "kvgate",
        "codec_type": "AUTO",
        "route_config": {
            "name": "kvgate",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "http_filters": filters,
        "stream_idle_timeout": timeout,
        "request_timeout": "0s",
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": spec.admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "kvgate",
                    "address": {
                        "socket_address": {
                            "address": spec.listen_host,
                            "port_value": spec.listen_port,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [*clusters, *spec.extra_clusters],
        },
    }


def bootstrap_yaml(spec: GatewaySpec) -> str:
    return yaml.safe_dump(build_bootstrap(spec), sort_keys=False)
