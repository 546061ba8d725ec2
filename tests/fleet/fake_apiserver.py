"""A Kubernetes API server stand-in for discovery tests, speaking the real list/watch protocol.

Served (one namespace, plain HTTP on 127.0.0.1):
- ``GET /apis/inference.networking.k8s.io/v1/namespaces/NS/inferencepools/NAME``: the pool or 404;
- ``GET .../inferencepools?watch=1&fieldSelector=metadata.name=NAME&resourceVersion=RV``;
- ``GET /api/v1/namespaces/NS/pods?labelSelector=k=v,...``: a ``PodList`` whose
  ``metadata.resourceVersion`` is the store's version;
- ``GET /apis/inference.networking.x-k8s.io/v1alpha2/namespaces/NS/inferenceobjectives``: an
  ``InferenceObjectiveList`` (404 for the whole API when the server is made without it);
- the same with ``watch=1&resourceVersion=RV``: a chunked stream of newline-delimited
  ``{"type", "object"}`` events, first the stored history after RV, then live changes, until
  ``timeoutSeconds``. As the real server does for a label-selected watch, an object that stops
  matching is sent as DELETED and one that starts matching as ADDED. A RV older than the
  compaction point is answered with an ERROR event carrying a 410 Status.

Tests change the store with the synchronous methods (`put_pool`, `add_pod`, `set_ready`, ...)
and break things with `expire_watches` (ERROR 410 on open watches), `break_watches` (connection
cut mid-stream) and `fail_next` (HTTP errors on the next requests).
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
PODS = "/api/v1/namespaces/{ns}/pods"
OBJECTIVES = "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{ns}/inferenceobjectives"

Obj = dict[str, Any]
Matcher = Callable[[Obj], bool]


@dataclass
class _Change:
    version: int
    resource: str  # "pods", "pools" or "objectives"
    old: Obj | None
    new: Obj | None


@dataclass
class _Watcher:
    resource: str
    matches: Matcher
    queue: asyncio.Queue[_Change | str] = field(default_factory=asyncio.Queue)


def _label_matcher(selector: str) -> Matcher:
    wanted = dict(item.split("=", 1) for item in selector.split(",") if item)

    def matches(obj: Obj) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in wanted.items())

    return matches


def _field_matcher(selector: str) -> Matcher:
    key, _, value = selector.partition("=")
    assert key == "metadata.name", f"fake API server: unsupported fieldSelector {selector}"
    return lambda obj: bool(obj["metadata"]["name"] == value)


class FakeApiServer:
    def __init__(
        self, namespace: str = "my-model", *, token: str | None = None, objectives: bool = True
    ) -> None:
        self.namespace = namespace
        self.token = token
        self.serves_objectives = objectives
        """False: a cluster without the InferenceObjective CRD (its API answers 404)."""
        self.objectives: dict[str, Obj] = {}
        self.version = 100
        self.compacted = 0
        """Watches from a version below this get 410 Gone."""
        self.pools: dict[str, Obj] = {}
        self.pods: dict[str, Obj] = {}
        self.history: list[_Change] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._watchers: list[_Watcher] = []
        self._failures: list[int] = []
        self._runner: web.AppRunner | None = None
        self._tls = False
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._tls = ssl_context is not None
        app = web.Application()
        app.router.add_get(POOLS.format(ns="{ns}") + "/{name}", self._get_pool)
        app.router.add_get(POOLS.format(ns="{ns}"), self._pools)
        app.router.add_get(PODS.format(ns="{ns}"), self._pods)
        app.router.add_get(OBJECTIVES.format(ns="{ns}"), self._objectives)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        self.break_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- store changes ------------------------------------------------------------------------

    def _commit(self, resource: str, old: Obj | None, new: Obj | None) -> None:
        self.version += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self.version)
        change = _Change(self.version, resource, copy.deepcopy(old), copy.deepcopy(new))
        self.history.append(change)
        for watcher in self._watchers:
            if watcher.resource == resource:
                watcher.queue.put_nowait(change)

    def put_pool(self, name: str, match_labels: dict[str, str], ports: list[int]) -> None:
        old = self.pools.get(name)
        pool: Obj = {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": old["metadata"]["uid"] if old else str(uuid.uuid4()),
            },
            "spec": {
                "selector": {"matchLabels": dict(match_labels)},
                "targetPorts": [{"number": p} for p in ports],
                "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
            },
        }
        self.pools[name] = pool
        self._commit("pools", old, pool)

    def delete_pool(self, name: str) -> None:
        old = self.pools.pop(name)
        self._commit("pools", old, None)

    def put_objective(self, name: str, pool: str, priority: int | None) -> None:
        old = self.objectives.get(name)
        spec: Obj = {"poolRef": {"group": "inference.networking.k8s.io", "name": pool}}
        if priority is not None:
            spec["priority"] = priority
        objective: Obj = {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferenceObjective",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": old["metadata"]["uid"] if old else str(uuid.uuid4()),
            },
            "spec": spec,
        }
        self.objectives[name] = objective
        self._commit("objectives", old, objective)

    def delete_objective(self, name: str) -> None:
        old = self.objectives.pop(name)
        self._commit("objectives", old, None)

    def add_pod(
        self,
        name: str,
        ip: str,
        labels: dict[str, str],
        *,
        ready: bool = True,
        annotations: dict[str, str] | None = None,
    ) -> None:
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": str(uuid.uuid4()),
                "labels": dict(labels),
                "annotations": dict(annotations or {}),
            },
            "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": []},
        }
        self._set_ready_condition(pod, ready)
        self.pods[name] = pod
        self._commit("pods", None, pod)

    @staticmethod
    def _set_ready_condition(pod: Obj, ready: bool) -> None:
        pod["status"]["conditions"] = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]

    def _modify_pod(self, name: str, change: Callable[[Obj], None]) -> None:
        old = copy.deepcopy(self.pods[name])
        change(self.pods[name])
        self._commit("pods", old, self.pods[name])

    def set_ready(self, name: str, ready: bool) -> None:
        self._modify_pod(name, lambda pod: self._set_ready_condition(pod, ready))

    def set_labels(self, name: str, labels: dict[str, str]) -> None:
        self._modify_pod(name, lambda pod: pod["metadata"].update(labels=dict(labels)))

    def mark_terminating(self, name: str) -> None:
        self._modify_pod(
            name, lambda pod: pod["metadata"].update(deletionTimestamp="2026-11-27T06:00:00Z")
        )

    def delete_pod(self, name: str) -> None:
        old = self.pods.pop(name)
        self._commit("pods", old, None)

    # --- faults -------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget history: watches from any version older than the current one get 410 Gone."""
        self.compacted = self.version

    def expire_watches(self) -> None:
        """Send every open watch an ERROR event with a 410 Status, as after etcd compaction."""
        self.compact()
        for watcher in self._watchers:
            watcher.queue.put_nowait("expire")

    def break_watches(self) -> None:
        """Cut every open watch mid-stream (the connection drops without a final chunk)."""
        for watcher in self._watchers:
            watcher.queue.put_nowait("break")

    def fail_next(self, count: int, status: int = 500) -> None:
        self._failures.extend([status] * count)

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    # --- HTTP ---------------------------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The error answer to give instead of serving the request, if any."""
        self.requests.append((request.path, dict(request.query)))
        if request.match_info["ns"] != self.namespace:
            return _status(404)
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return _status(401)
        if self._failures:
            return _status(self._failures.pop(0))
        return None

    async def _get_pool(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._refusal(request)) is not None:
            return refusal
        pool = self.pools.get(request.match_info["name"])
        return _status(404) if pool is None else web.json_response(pool)

    async def _pools(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._refusal(request)) is not None:
            return refusal
        matches = _field_matcher(request.query.get("fieldSelector", "metadata.name="))
        if _flag(request.query.get("watch")):
            return await self._watch(request, "pools", matches)
        items = [p for p in self.pools.values() if matches(p)]
        return self._list("InferencePoolList", items)

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._refusal(request)) is not None:
            return refusal
        matches = _label_matcher(request.query.get("labelSelector", ""))
        if _flag(request.query.get("watch")):
            return await self._watch(request, "pods", matches)
        items = [p for p in self.pods.values() if matches(p)]
        return self._list("PodList", items)

    async def _objectives(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._refusal(request)) is not None:
            return refusal
        if not self.serves_objectives:
            return _status(404)
        if _flag(request.query.get("watch")):
            return await self._watch(request, "objectives", lambda _obj: True)
        return self._list("InferenceObjectiveList", list(self.objectives.values()))

    def _list(self, kind: str, items: list[Obj]) -> web.Response:
        return web.json_response(
            {
                "kind": kind,
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }
        )

    @staticmethod
    def _event(change: _Change, matches: Matcher) -> Obj | None:
        old_in = change.old is not None and matches(change.old)
        new_in = change.new is not None and matches(change.new)
        if new_in and not old_in:
            return {"type": "ADDED", "object": change.new}
        if new_in:
            return {"type": "MODIFIED", "object": change.new}
        if old_in:
            gone = copy.deepcopy(change.new if change.new is not None else change.old)
            assert gone is not None
            gone["metadata"]["resourceVersion"] = str(change.version)
            return {"type": "DELETED", "object": gone}
        return None

    async def _watch(
        self, request: web.Request, resource: str, matches: Matcher
    ) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds", "300"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event: Obj) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        if since < self.compacted:
            await send(_gone())
            await response.write_eof()
            return response
        watcher = _Watcher(resource, matches)
        backlog = [c for c in self.history if c.version > since and c.resource == resource]
        self._watchers.append(watcher)
        try:
            for change in backlog:
                event = self._event(change, matches)
                if event is not None:
                    await send(event)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), left)
                except TimeoutError:
                    break
                if item == "expire":
                    await send(_gone())
                    break
                if item == "break":
                    if request.transport is not None:  # None: the client already left
                        request.transport.abort()
                    return response
                assert isinstance(item, _Change)
                event = self._event(item, matches)
                if event is not None:
                    await send(event)
            await response.write_eof()
            return response
        finally:
            self._watchers.remove(watcher)


def _gone() -> Obj:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": "too old resource version",
            "reason": "Expired",
            "code": 410,
        },
    }


def _flag(value: str | None) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _status(code: int) -> web.Response:
    return web.json_response({"kind": "Status", "status": "Failure", "code": code}, status=code)
