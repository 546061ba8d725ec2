"""Keep the KV-event subscriber (and whoever registers) in step with the endpoint set.

A joining endpoint becomes a source of the subscriber: in connect mode the subscriber connects to
its ``events_endpoint`` (endpoints without one publish nothing and get no source); in central mode
(engines connect to the subscriber's bound socket) the source only makes its topic accepted. A
leaving endpoint's source is removed first, so no event of it reaches the index afterwards, then
every ``on_left`` callback runs (``PrefixIndex.remove_worker``, the router's and plugins' per-worker
state). An endpoint whose spec changed leaves and rejoins: its events endpoint or identity may be
different, so its old state goes.

A failure for one endpoint (a ZMQ endpoint that cannot be connected, a callback raising) is logged
and does not stop the others: the endpoint set calls listeners synchronously from ``replace``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from kvgate.events.subscriber import KvEventSubscriber
from kvgate.fleet.endpoint import Endpoint, EndpointSet

__all__ = ["FleetFollower"]

logger = logging.getLogger(__name__)


class FleetFollower:
    """Subscribes to `endpoints` on construction and applies its current members at once."""

    def __init__(
        self,
        endpoints: EndpointSet,
        subscriber: KvEventSubscriber,
        *,
        central: bool = False,
        on_left: Iterable[Callable[[str], None]] = (),
    ) -> None:
        self._subscriber = subscriber
        self._central = central
        self.on_left: list[Callable[[str], None]] = list(on_left)
        """Called with the address of each endpoint that left, after its source is removed."""
        self._on_change(endpoints.snapshot(), [])
        endpoints.subscribe(self._on_change)

    def _on_change(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        # Left first: an endpoint whose spec changed is in both lists, and a worker can be a
        # source only once.
        for endpoint in left:
            self._leave(endpoint.address)
        for endpoint in joined:
            self._join(endpoint)

    def _join(self, endpoint: Endpoint) -> None:
        try:
            if self._central:
                self._subscriber.add_source(endpoint.address)
            elif endpoint.events_endpoint is not None:
                self._subscriber.add_source(
                    endpoint.address,
                    endpoint.events_endpoint,
                    replay_endpoint=endpoint.replay_endpoint,
                )
        except Exception:
            logger.exception(
                "cannot subscribe to the KV events of %s; it is routed without them",
                endpoint.address,
            )

    def _leave(self, address: str) -> None:
        try:
            self._subscriber.remove_source(address)
        except Exception:
            logger.exception("removing the KV event source of %s failed", address)
        for callback in self.on_left:
            try:
                callback(address)
            except Exception:
                logger.exception("on_left callback %r failed for %s", callback, address)
