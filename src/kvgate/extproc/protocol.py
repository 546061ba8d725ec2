"""Building and reading Envoy ext_proc v3 messages.

Facts this module encodes (GAIE endpoint-picker protocol):
- the destination goes in the ``x-gateway-destination-endpoint`` header *and* in dynamic metadata
  ``envoy.lb`` under the same key, with the same value (comma-separated fallbacks after the pick);
- a changed body must come with a matching ``content-length`` or Envoy answers 500;
- streamed body chunks sent back to Envoy are at most 62,000 bytes;
- header values arrive in ``raw_value`` (bytes) from current Envoys, ``value`` from older ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from kvgate.extproc import headers

DESTINATION_HEADER = headers.DESTINATION
DESTINATION_SERVED_KEY = headers.SERVED
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = headers.SUBSET
LB_NAMESPACE = "envoy.lb"
OBSERVER_NAMESPACE = "kvgate.epp"
"""Dynamic metadata the routing answer sets for an observe-only ext_proc filter to forward."""
OBSERVER_KEY = "request"
OBSERVER_REPLICA_KEY = "replica"
MAX_CHUNK_BYTES = 62_000

BodyMode = processing_mode_pb2.ProcessingMode.BodySendMode
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BODY_NONE = processing_mode_pb2.ProcessingMode.NONE
BUFFERED_MODES = frozenset(
    {
        processing_mode_pb2.ProcessingMode.BUFFERED,
        processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL,
    }
)


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Lower-case header names to values; repeated headers are joined with ','."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_mutation(
    set_headers: Mapping[str, str], remove: Iterable[str] = ()
) -> pb.HeaderMutation:
    # Built by attribute paths: nested keyword construction costs ~3x as much (~12 us for the
    # four or five headers of every routed request).
    mutation = pb.HeaderMutation()
    add = mutation.set_headers.add
    for key, value in set_headers.items():
        option = add()
        header = option.header
        header.key = key
        header.raw_value = value.encode()
        option.append_action = _OVERWRITE
    mutation.remove_headers.extend(remove)
    return mutation


def lb_metadata(
    destinations: Sequence[str], *, observer_key: str | None = None, replica: str | None = None
) -> struct_pb2.Struct:
    """``{"envoy.lb": {"x-gateway-destination-endpoint": "ip:port,ip:port"}}``, and with
    ``observer_key`` ``{"kvgate.epp": {"request": key, "replica": replica}}`` for the observer
    filter (and the gateway's routes to the replica that routed)."""
    # Set field by field: Struct.update converts through Python dicts at twice the cost.
    meta = struct_pb2.Struct()
    lb = meta.fields[LB_NAMESPACE].struct_value.fields
    lb[DESTINATION_HEADER].string_value = ",".join(destinations)
    if observer_key is not None:
        observer = meta.fields[OBSERVER_NAMESPACE].struct_value.fields
        observer[OBSERVER_KEY].string_value = observer_key
        if replica is not None:
            observer[OBSERVER_REPLICA_KEY].string_value = replica
    return meta


def request_headers_response(
    mutation: pb.HeaderMutation | None = None, *, clear_route_cache: bool = False
) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=mutation, clear_route_cache=clear_route_cache
            )
        )
    )


def streamed_body_responses(body: bytes, *, response: bool = False) -> list[pb.ProcessingResponse]:
    """The body as ≤62,000-byte streamed chunks, ``end_of_stream`` on the last one."""
    chunks = [body[i : i + MAX_CHUNK_BYTES] for i in range(0, len(body), MAX_CHUNK_BYTES)] or [b""]
    out = []
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        answer = pb.ProcessingResponse()
        phase = answer.response_body if response else answer.request_body
        streamed = phase.response.body_mutation.streamed_response
        streamed.body = chunk
        streamed.end_of_stream = i == last
        out.append(answer)
    return out


def echo_response_chunk(chunk: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    # Set through attribute paths: building the nested messages from keyword arguments costs
    # ~4x as much, and this runs for every chunk of every streamed response.
    answer = pb.ProcessingResponse()
    streamed = answer.response_body.response.body_mutation.streamed_response
    streamed.body = chunk
    streamed.end_of_stream = end_of_stream
    return answer


def buffered_body_response(
    mutation: pb.HeaderMutation | None, body: bytes | None, *, clear_route_cache: bool
) -> pb.ProcessingResponse:
    common = pb.CommonResponse(
        header_mutation=mutation,
        clear_route_cache=clear_route_cache,
        body_mutation=pb.BodyMutation(body=body) if body is not None else None,
    )
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


def continue_response(kind: str) -> pb.ProcessingResponse:
    """An empty CONTINUE for the phase ``kind`` (a ProcessingResponse oneof field name)."""
    answer = pb.ProcessingResponse()
    getattr(answer, kind).SetInParent()
    return answer


ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


def immediate_error(
    status: int, message: str, *, reason: str | None = None
) -> pb.ProcessingResponse:
    """An OpenAI-shaped JSON error answered by Envoy without reaching a worker."""
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": ERROR_TYPES.get(status, "error"),
                "param": None,
                "code": status,
            }
        }
    ).encode()
    headers = {"content-type": "application/json"}
    if reason:
        headers["x-kvgate-dropped-reason"] = reason
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=body,
            details=reason or "",
        )
    )


def metadata_value(request: pb.ProcessingRequest, namespace: str, key: str) -> object | None:
    """A value from the request's metadata context, converted to Python (None if absent)."""
    ctx = request.metadata_context.filter_metadata
    if namespace not in ctx:
        return None
    fields = ctx[namespace].fields
    if key not in fields:
        return None
    value = fields[key]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [str(v.string_value) for v in value.list_value.values]
    if kind == "string_value":
        return str(value.string_value)
    if kind == "number_value":
        return float(value.number_value)
    if kind == "bool_value":
        return bool(value.bool_value)
    return None
