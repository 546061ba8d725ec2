"""`kvgate up`'s Envoy bootstrap as data: how the filters are arranged (the real Envoy runs it in
test_bootstrap_envoy.py and test_response_observer.py)."""

from __future__ import annotations

import dataclasses

import pytest

from kvgate.gateway.bootstrap import OBSERVER_FILTER, GatewaySpec, build_bootstrap

LOOPBACK = "127.0.0.1"


def test_the_observer_filter_sits_before_the_router_and_the_routing_filter_skips_responses() -> (
    None
):
    spec = GatewaySpec(
        listen_host=LOOPBACK,
        listen_port=8000,
        admin_port=9901,
        epp_address=(LOOPBACK, 9002),
        workers=[(LOOPBACK, 8100)],
        failure_mode="FailOpen",
        response_observer=True,
    )
    hcm = build_bootstrap(spec)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]
    names: list[str] = [f["name"] for f in hcm["http_filters"]]
    assert names[-2:] == [OBSERVER_FILTER, "envoy.filters.http.router"]
    routing = next(f for f in hcm["http_filters"] if f["name"].endswith(".epp"))["typed_config"]
    assert routing["processing_mode"]["response_body_mode"] == "NONE"
    assert routing["processing_mode"]["response_header_mode"] == "SKIP"
    observer = hcm["http_filters"][-2]["typed_config"]
    assert observer["observability_mode"] and observer["failure_mode_allow"]
    # The fail-open route is not routed by the picker: no observer stream for it.
    fallback = hcm["route_config"]["virtual_hosts"][0]["routes"][-1]
    assert fallback["typed_per_filter_config"][OBSERVER_FILTER]["disabled"] is True
    replicated = dataclasses.replace(spec, epp_addresses=[(LOOPBACK, 9002), (LOOPBACK, 9012)])
    with pytest.raises(ValueError, match="replica name"):
        build_bootstrap(replicated)


def test_with_several_replicas_each_replicas_requests_are_observed_by_that_replica() -> None:
    spec = GatewaySpec(
        listen_host=LOOPBACK,
        listen_port=8000,
        admin_port=9901,
        epp_address=(LOOPBACK, 9002),
        epp_addresses=[(LOOPBACK, 9002), (LOOPBACK, 9012)],
        epp_replica_names=["epp-0", "epp-1"],
        workers=[(LOOPBACK, 8100)],
        response_observer=True,
    )
    config = build_bootstrap(spec)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    for i, name in enumerate(["epp-0", "epp-1"]):
        (matcher,) = routes[i]["match"]["dynamic_metadata"]
        assert matcher["filter"] == "kvgate.epp" and matcher["path"] == [{"key": "replica"}]
        assert matcher["value"]["string_match"]["exact"] == name
        override = routes[i]["typed_per_filter_config"][OBSERVER_FILTER]["overrides"]
        cluster = clusters[override["grpc_service"]["envoy_grpc"]["cluster_name"]]
        (host,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert host["endpoint"]["address"]["socket_address"]["port_value"] == 9002 + 10 * i
    # A routed request naming no replica: no observer can know it.
    assert routes[2]["typed_per_filter_config"][OBSERVER_FILTER]["disabled"] is True
