"""An endpoint's destination: where requests for a worker go when that is not the worker."""

from __future__ import annotations

from kvgate.fleet.endpoint import Endpoint, EndpointSet


def test_route_address_is_the_destination_else_the_address() -> None:
    assert Endpoint("10.0.0.7:9090").route_address == "10.0.0.7:9090"
    worker = Endpoint("10.0.0.7:9090", instance_id=42, destination="10.0.1.1:8000")
    assert worker.route_address == "10.0.1.1:8000"
    assert worker.worker_instance_id() == 42


def test_a_new_destination_keeps_the_worker_and_its_state() -> None:
    endpoints = EndpointSet([Endpoint("10.0.0.7:9090", destination="10.0.1.1:8000")])
    changes: list[tuple[list[Endpoint], list[Endpoint]]] = []
    endpoints.subscribe(lambda joined, left: changes.append((joined, left)))
    kept = endpoints.get("10.0.0.7:9090")
    assert kept is not None
    kept.metrics.waiting = 3

    endpoints.replace([Endpoint("10.0.0.7:9090", destination="10.0.1.2:8000")])
    assert changes == []  # no leave/join: index entries, load and events stay
    assert endpoints.get("10.0.0.7:9090") is kept
    assert kept.route_address == "10.0.1.2:8000"
    assert kept.metrics.waiting == 3
