"""ext_proc messages built by `kvgate.extproc.protocol`: the exact messages Envoy expects."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from kvgate.extproc import protocol as proto


def test_header_mutation_sets_in_order_overwriting_and_removes() -> None:
    built = proto.header_mutation(
        {"x-gateway-destination-endpoint": "10.0.0.1:8000,10.0.0.2:8000", "x-t": "é"},
        ["x-kvgate-decision"],
    )
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    expected = pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(
                    key="x-gateway-destination-endpoint", raw_value=b"10.0.0.1:8000,10.0.0.2:8000"
                ),
                append_action=overwrite,
            ),
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="x-t", raw_value="é".encode()),
                append_action=overwrite,
            ),
        ],
        remove_headers=["x-kvgate-decision"],
    )
    assert built == expected
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


def test_an_empty_header_mutation_is_the_empty_message() -> None:
    assert proto.header_mutation({}) == pb.HeaderMutation()
    assert proto.header_mutation({}, iter(["a", "b"])).remove_headers == ["a", "b"]


def test_lb_metadata_names_the_destinations_and_the_observer_key() -> None:
    destinations = ["10.0.0.1:8000", "10.0.0.2:8000"]
    for observer_key, replica in ((None, None), ("k1", None), ("k1", "epp-0")):
        expected = struct_pb2.Struct()
        expected.update({"envoy.lb": {"x-gateway-destination-endpoint": ",".join(destinations)}})
        if observer_key is not None:
            observer = {"request": observer_key}
            if replica is not None:
                observer["replica"] = replica
            expected.update({"kvgate.epp": observer})
        built = proto.lb_metadata(destinations, observer_key=observer_key, replica=replica)
        assert built == expected
