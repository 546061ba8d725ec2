"""Endpoints from Kubernetes: an InferencePool and the Ready pods its selector matches.

What is watched
    The InferencePool ``inference.networking.k8s.io/v1`` named by ``--pool-name`` (its
    ``spec.selector.matchLabels`` and ``spec.targetPorts``), then the pods of its namespace that
    match the selector. Each pod that has an IP, is Ready and is not being deleted gives one
    endpoint per target port. A change of the pool's selector or ports relists the pods.

Per-pod settings
    Engine type from the label ``inference.networking.k8s.io/engine-type`` (``vllm``, ``sglang``,
    ``trtllm``; ``trtllm-serve`` and ``triton-tensorrt-llm`` count as ``trtllm``; absent or unknown:
    the ``--engine`` default). Role from the label ``llm-d.ai/role`` (``decode``, ``prefill``,
    ``both``). The Dynamo worker id from the annotation named by ``--instance-id-annotation``
    (default `INSTANCE_ID_ANNOTATION`): one integer, or with several target ports a
    comma-separated list, one per port in the pool's order; pods without it get an id derived
    from their address. KV events and their replay socket on the pod's IP at the ports given by
    ``--events-port`` and ``--replay-port`` (the same for every pod, as in a Deployment).

Protocol
    List (collection ``resourceVersion``), then watch from there, as client-go does (the client:
    `kvgate.fleet.kube_api`). A watch that ends normally resumes from the last version seen;
    ``410 Gone`` relists at once; any other failure retries with exponential backoff (with
    jitter) and then relists, so missed events are never trusted to a stale cache. While the API
    server is unreachable the last endpoint set stays.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from kvgate.fleet.endpoint import Endpoint, EndpointSet, EngineType, Role
from kvgate.fleet.kube_api import (
    KubeApi,
    KubeApiError,
    KubeConfig,
    KubeTask,
    WatchEvent,
    WatchExpired,
)
from kvgate.fleet.sources import EndpointDefaults, events_endpoint_for

__all__ = [
    "ENGINE_LABEL",
    "INSTANCE_ID_ANNOTATION",
    "ROLE_LABEL",
    "PoolDiscovery",
    "endpoints_of_pod",
]

log = logging.getLogger(__name__)

ENGINE_LABEL: Final = "inference.networking.k8s.io/engine-type"
ROLE_LABEL: Final = "llm-d.ai/role"
INSTANCE_ID_ANNOTATION: Final = "kvgate.io/instance-id"
POOL_API: Final = "/apis/inference.networking.k8s.io/v1"
_ENGINES: Final[Mapping[str, EngineType]] = {
    "vllm": "vllm",
    "sglang": "sglang",
    "trtllm": "trtllm",
    "trtllm-serve": "trtllm",
    "triton-tensorrt-llm": "trtllm",
}
_ROLES: Final[Mapping[str, Role]] = {"decode": "decode", "prefill": "prefill", "both": "both"}
_DEFAULTS: Final = EndpointDefaults()
_MAX_INSTANCE_ID: Final = 2**63


def _address(ip: str, port: int) -> str:
    parsed = ipaddress.ip_address(ip)
    if parsed.version == 6:
        return f"[{parsed.compressed}]:{port}"
    return f"{parsed}:{port}"


def _instance_ids(raw: str | None, count: int) -> list[int | None]:
    """The annotation's ids, one per target port (None each when absent); ValueError when the
    annotation does not give exactly one integer per port."""
    if raw is None:
        return [None] * count
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) != count or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"expected {count} comma-separated non-negative integers, got {raw!r}")
    ids = [int(p) for p in parts]
    if any(i >= _MAX_INSTANCE_ID for i in ids):
        raise ValueError(f"instance ids must be below 2**63, got {raw!r}")
    return list(ids)


def _is_ready(pod: Mapping[str, Any]) -> bool:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def endpoints_of_pod(
    pod: Mapping[str, Any],
    ports: list[int],
    defaults: EndpointDefaults = _DEFAULTS,
    *,
    instance_id_annotation: str = INSTANCE_ID_ANNOTATION,
) -> list[Endpoint]:
    """The endpoints a pod gives: none unless it has an IP, is Ready and is not being deleted."""
    meta = pod.get("metadata", {})
    ip = pod.get("status", {}).get("podIP")
    if meta.get("deletionTimestamp") or not ip or not _is_ready(pod):
        return []
    name = f"pod {meta.get('namespace')}/{meta.get('name')}"
    labels: dict[str, str] = dict(meta.get("labels") or {})
    engine = defaults.engine
    engine_label = labels.get(ENGINE_LABEL)
    if engine_label is not None:
        if engine_label in _ENGINES:
            engine = _ENGINES[engine_label]
        else:
            log.warning("%s: unknown %s %r; using %s", name, ENGINE_LABEL, engine_label, engine)
    role = _ROLES.get(labels.get(ROLE_LABEL, "both"), "both")
    try:
        ids = _instance_ids((meta.get("annotations") or {}).get(instance_id_annotation), len(ports))
    except ValueError as err:
        log.warning("%s: annotation %s ignored: %s", name, instance_id_annotation, err)
        ids = [None] * len(ports)
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        log.warning("%s: podIP %r is not an IP address; skipped", name, ip)
        return []
    endpoints = []
    for port, instance_id in zip(ports, ids, strict=True):
        address = _address(ip, port)
        events = (
            events_endpoint_for(address, defaults.events_port)
            if defaults.events_port is not None
            else None
        )
        endpoints.append(
            Endpoint(
                address,
                instance_id=instance_id,
                engine=engine,
                role=role,
                labels=labels,
                events_endpoint=events,
                replay_endpoint=defaults.replay_for(address),
            )
        )
    return endpoints


@dataclass(frozen=True)
class _PoolSpec:
    match_labels: tuple[tuple[str, str], ...]
    ports: tuple[int, ...]

    @classmethod
    def parse(cls, pool: Mapping[str, Any]) -> _PoolSpec:
        spec = pool.get("spec") or {}
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        ports = [p.get("number") for p in spec.get("targetPorts") or []]
        if not labels or not ports or not all(isinstance(p, int) for p in ports):
            raise ValueError("InferencePool needs spec.selector.matchLabels and spec.targetPorts")
        return cls(tuple(sorted(labels.items())), tuple(ports))

    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.match_labels)


class PoolDiscovery(KubeTask):
    """Keep an `EndpointSet` equal to the Ready pods of an InferencePool (see module docstring).

    Use as ``async with PoolDiscovery(...):`` or `start` / `aclose`. Starting does not wait for
    the API server: the set stays unknown (readiness off) until the first successful list.
    ``api`` is the API server's credentials (an `HttpKubeApi` is opened with them at start, and
    closed with the discovery) or a client of one (left open).
    """

    def __init__(
        self,
        endpoints: EndpointSet,
        api: KubeConfig | KubeApi,
        pool_name: str,
        namespace: str,
        defaults: EndpointDefaults = _DEFAULTS,
        *,
        instance_id_annotation: str = INSTANCE_ID_ANNOTATION,
        watch_timeout_s: int = 300,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(
            api,
            f"pool-discovery {namespace}/{pool_name}",
            request_timeout_s=request_timeout_s,
        )
        self._endpoints = endpoints
        self.pool_name = pool_name
        self.namespace = namespace
        self._defaults = defaults
        self._annotation = instance_id_annotation
        self._watch_timeout_s = watch_timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._pods: dict[str, dict[str, Any]] = {}
        self._spec: _PoolSpec | None = None
        self.lists = 0
        """Completed pod lists (the first sync and every resync)."""

    async def _run(self) -> None:
        delay = self._backoff[0]
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._sync()
                delay = self._backoff[0]
                continue
            except WatchExpired:
                # Expected after a long watch (etcd compaction): relist at once. Right after a
                # list it means a server that cannot serve its own versions: back off.
                if loop.time() - started > 1.0:
                    log.info("watch expired (410); relisting")
                    delay = self._backoff[0]
                    continue
                reason = "watch expired (410) right after listing"
            except (KubeApiError, ValueError, OSError) as err:
                reason = str(err) or type(err).__name__
            log.warning(
                "InferencePool %s/%s discovery: %s; retrying in %.2fs",
                self.namespace,
                self.pool_name,
                reason,
                delay,
            )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._backoff[1])

    async def _sync(self) -> None:
        """One list of the pool and its pods, then watch both until something forces a relist."""
        pool_path = f"{POOL_API}/namespaces/{quote(self.namespace)}/inferencepools"
        api = self._api
        assert api is not None
        pool = await api.get(f"{pool_path}/{quote(self.pool_name)}")
        if pool is None:
            self._publish_empty("not found")
            raise KubeApiError(404, f"InferencePool {self.namespace}/{self.pool_name} not found")
        spec = _PoolSpec.parse(pool)
        pods_path = f"/api/v1/namespaces/{quote(self.namespace)}/pods"
        selector = {"labelSelector": spec.label_selector()}
        listing = await api.get(pods_path, selector)
        if listing is None:
            raise KubeApiError(404, f"pods of namespace {self.namespace} not found")
        self._spec = spec
        self._pods = {
            item["metadata"]["uid"]: item for item in listing.get("items") or [] if _has_uid(item)
        }
        self.lists += 1
        self._publish()
        pod_watch = asyncio.ensure_future(
            self._watch_pods(pods_path, selector, listing["metadata"]["resourceVersion"])
        )
        pool_watch = asyncio.ensure_future(
            self._watch_pool(pool_path, spec, pool["metadata"]["resourceVersion"])
        )
        try:
            done, _ = await asyncio.wait(
                (pod_watch, pool_watch), return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
        finally:
            for task in (pod_watch, pool_watch):
                task.cancel()
            await asyncio.gather(pod_watch, pool_watch, return_exceptions=True)

    async def _watch_pods(self, path: str, params: dict[str, str], version: str) -> None:
        while True:
            started = asyncio.get_running_loop().time()
            events = 0
            async for kind, pod in self._watch(path, params, version):
                events += 1
                version = pod.get("metadata", {}).get("resourceVersion", version)
                if kind == "BOOKMARK" or not _has_uid(pod):
                    continue
                uid = pod["metadata"]["uid"]
                if kind == "DELETED":
                    self._pods.pop(uid, None)
                else:
                    self._pods[uid] = pod
                self._publish()
            # A watch that the server ends normally is resumed; one that ends at once, empty, is
            # a misbehaving server, not a timeout: back off instead of spinning.
            if not events and asyncio.get_running_loop().time() - started < 1.0:
                raise ValueError("pod watch closed immediately")

    async def _watch_pool(self, path: str, spec: _PoolSpec, version: str) -> None:
        """Returns (forcing a relist) when the pool's selector or ports change or it goes."""
        params = {"fieldSelector": f"metadata.name={self.pool_name}"}
        while True:
            started = asyncio.get_running_loop().time()
            events = 0
            async for kind, pool in self._watch(path, params, version):
                events += 1
                version = pool.get("metadata", {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    log.warning("InferencePool %s/%s deleted", self.namespace, self.pool_name)
                    self._publish_empty("deleted")
                    return
                try:
                    changed = _PoolSpec.parse(pool) != spec
                except ValueError as err:
                    log.warning("InferencePool %s: %s; keeping the last spec", self.pool_name, err)
                    continue
                if changed:
                    log.info("InferencePool %s changed; relisting its pods", self.pool_name)
                    return
            if not events and asyncio.get_running_loop().time() - started < 1.0:
                raise ValueError("InferencePool watch closed immediately")

    def _watch(self, path: str, params: dict[str, str], version: str) -> AsyncIterator[WatchEvent]:
        assert self._api is not None
        return self._api.watch(path, params, version, self._watch_timeout_s)

    def _publish(self) -> None:
        assert self._spec is not None
        ports = list(self._spec.ports)
        wanted = dict(self._spec.match_labels)
        by_address: dict[str, Endpoint] = {}
        for pod in sorted(self._pods.values(), key=lambda p: str(p["metadata"].get("name"))):
            labels = pod["metadata"].get("labels") or {}
            # The watch is already filtered by the selector; this guards a pod relabelled out of
            # it (the API server sends that as DELETED, but a resync may race it).
            if any(labels.get(k) != v for k, v in wanted.items()):
                continue
            for ep in endpoints_of_pod(
                pod, ports, self._defaults, instance_id_annotation=self._annotation
            ):
                if ep.address in by_address:
                    log.warning("%s is claimed by two pods; keeping the first", ep.address)
                    continue
                by_address[ep.address] = ep
        if len(by_address) != len(self._endpoints) or not self._endpoints.known:
            log.info(
                "InferencePool %s/%s: %d endpoints", self.namespace, self.pool_name, len(by_address)
            )
        self._endpoints.replace(by_address.values())

    def _publish_empty(self, why: str) -> None:
        self._pods = {}
        # Only an emptied fleet is published: a pool that never existed must not turn
        # readiness on.
        if len(self._endpoints):
            log.warning("InferencePool %s/%s %s: no endpoints", self.namespace, self.pool_name, why)
            self._endpoints.replace([])


def _has_uid(obj: Mapping[str, Any]) -> bool:
    return isinstance(obj.get("metadata"), dict) and bool(obj["metadata"].get("uid"))
