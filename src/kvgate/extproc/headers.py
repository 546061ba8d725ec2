"""Request headers that mean something inside the gateway, grouped by who may set them.

A client can send any header. Those the endpoint picker or the gateway itself sets must therefore
never be taken from a client: the picker removes or overwrites them on every request it routes,
`kvgate up`'s Envoy strips them before the picker sees the request, and the Helm chart's HTTPRoute
removes the gateway inputs. docs/configuration.md lists them.

- **Picker outputs** (``PICKER_OUTPUTS``): what the picker sets on the routed request. A client's
  own value is removed unless the picker sets one; the picker's value always wins.
- **Gateway inputs** (``GATEWAY_INPUTS``): what, in the GAIE protocol, the gateway (its route or
  its load balancer) tells the picker. kvgate takes none of them from headers, so a client
  cannot use them: ``x-gateway-model-name-rewrite`` is ignored (kvgate routes on the body's
  ``model``; it does not rewrite model names), the subset hint and the served endpoint are read
  from Envoy's metadata only. They are removed from the forwarded request.
- **Client controls** (``CLIENT_CONTROLS``): chosen by clients by design (GAIE). An objective name
  only selects among the pool's InferenceObjectives (unknown: priority 0), so a client gains no
  more than by naming none; latency objectives (``x-slo-ttft-ms``, ``x-slo-tpot-ms``) only shape
  how the client's own request is placed.
"""

from __future__ import annotations

from kvgate.extproc.nvext import MODE_HEADER, PREFILL_HEADER, WORKER_ID_HEADER

PREFILL_INSTANCE = "x-prefill-instance-id"
"""Dynamo's name for the prefill worker's instance id in some releases."""
DESTINATION = "x-gateway-destination-endpoint"
"""The picked endpoint, then ordered fallbacks: ``ip:port[,ip:port...]``."""
DECISION = "x-kvgate-decision"
MODEL_REWRITE = "x-gateway-model-name-rewrite"
SUBSET = "x-gateway-destination-endpoint-subset"
SERVED = "x-gateway-destination-endpoint-served"
OBJECTIVE = "x-gateway-inference-objective"
FAIRNESS_ID = "x-gateway-inference-fairness-id"
SLO_TTFT = "x-slo-ttft-ms"
SLO_TPOT = "x-slo-tpot-ms"

PICKER_OUTPUTS = (
    DESTINATION,
    WORKER_ID_HEADER,
    PREFILL_HEADER,
    MODE_HEADER,
    PREFILL_INSTANCE,
    DECISION,
)
GATEWAY_INPUTS = (MODEL_REWRITE, SUBSET, SERVED)
CLIENT_CONTROLS = (OBJECTIVE, FAIRNESS_ID, SLO_TTFT, SLO_TPOT)
GATEWAY_INTERNAL = (*PICKER_OUTPUTS, *GATEWAY_INPUTS)
"""Every header a client must not be able to set."""
