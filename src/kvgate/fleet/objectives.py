"""InferenceObjective priorities from Kubernetes: the objectives of the picker's pool, watched.

A request names its objective in ``x-gateway-inference-objective``; the objective's priority
decides whether the request is shed while the pool is saturated (below 0). With ``--pool-name``
the picker watches the ``inference.networking.x-k8s.io/v1alpha2`` InferenceObjectives of the
pool's namespace whose ``spec.poolRef`` names the pool, and keeps a live name → priority map
(``spec.priority``; unset is 0) over the ``--objectives`` flag's, the API's value winning for a
name both give. Same protocol as pool discovery (`kvgate.fleet.pool_discovery`): list, then
watch from the list's version; ``410 Gone`` relists at once, other failures back off and relist;
the last map stays while the API server is unreachable. A cluster without the InferenceObjective
API (404) keeps the flag's map and looks again now and then.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

from kvgate.fleet.kube_api import KubeApi, KubeApiError, KubeConfig, KubeTask, WatchExpired

log = logging.getLogger(__name__)

OBJECTIVE_API: Final = "/apis/inference.networking.x-k8s.io/v1alpha2"
_POOL_GROUP: Final = "inference.networking.k8s.io"


def objective_priority(objective: Mapping[str, Any], pool_name: str) -> int | None:
    """The objective's priority if it belongs to ``pool_name``, else None."""
    spec = objective.get("spec") or {}
    ref = spec.get("poolRef") or {}
    if ref.get("name") != pool_name or ref.get("group", _POOL_GROUP) != _POOL_GROUP:
        return None
    if ref.get("kind", "InferencePool") != "InferencePool":
        return None
    priority = spec.get("priority", 0)
    if priority is None:
        return 0
    if not isinstance(priority, int) or isinstance(priority, bool):
        return None
    return priority


class ObjectiveWatch(KubeTask):
    """Keep ``priorities`` equal to ``static`` updated by the pool's InferenceObjectives.

    ``priorities`` is changed in place (the endpoint picker reads it per request). ``api`` is
    the API server's credentials (a client is opened at start, closed at the end) or a client.
    """

    def __init__(
        self,
        priorities: dict[str, int],
        api: KubeConfig | KubeApi,
        pool_name: str,
        namespace: str,
        *,
        watch_timeout_s: int = 300,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        super().__init__(api, f"objectives {namespace}/{pool_name}")
        self.priorities = priorities
        self._static = dict(priorities)
        self.pool_name = pool_name
        self.namespace = namespace
        self._watch_timeout_s = watch_timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._watched: dict[str, int] = {}
        self._missing_logged = False

    async def _run(self) -> None:
        delay = self._backoff[0]
        while True:
            try:
                await self._sync()
                delay = self._backoff[0]
                continue
            except WatchExpired:
                log.info("InferenceObjective watch expired (410); relisting")
                continue
            except _NoObjectiveApi:
                delay = self._backoff[1]
            except (KubeApiError, ValueError, OSError) as err:
                log.warning(
                    "InferenceObjectives of %s/%s: %s; retrying in %.2fs",
                    self.namespace,
                    self.pool_name,
                    str(err) or type(err).__name__,
                    delay,
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._backoff[1])

    async def _sync(self) -> None:
        assert self._api is not None
        path = f"{OBJECTIVE_API}/namespaces/{quote(self.namespace)}/inferenceobjectives"
        listing = await self._api.get(path)
        if listing is None:
            if not self._missing_logged:
                self._missing_logged = True
                log.info(
                    "no InferenceObjective API in %s: objective priorities come from "
                    "--objectives only",
                    self.namespace,
                )
            raise _NoObjectiveApi
        self._watched = {}
        for item in listing.get("items") or []:
            self._apply("ADDED", item)
        self._publish()
        version = str(listing.get("metadata", {}).get("resourceVersion", ""))
        while True:
            started = asyncio.get_running_loop().time()
            events = 0
            async for kind, item in self._api.watch(path, {}, version, self._watch_timeout_s):
                events += 1
                version = str(item.get("metadata", {}).get("resourceVersion", version))
                if kind != "BOOKMARK":
                    self._apply(kind, item)
                    self._publish()
            if not events and asyncio.get_running_loop().time() - started < 1.0:
                raise ValueError("InferenceObjective watch closed immediately")

    def _apply(self, kind: str, item: Mapping[str, Any]) -> None:
        name = (item.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            return
        priority = None if kind == "DELETED" else objective_priority(item, self.pool_name)
        if priority is None:
            self._watched.pop(name, None)
        else:
            self._watched[name] = priority

    def _publish(self) -> None:
        current = {**self._static, **self._watched}
        if current != self.priorities:
            log.info("InferenceObjective priorities of pool %s: %s", self.pool_name, current)
            self.priorities.clear()
            self.priorities.update(current)


class _NoObjectiveApi(Exception):
    pass
