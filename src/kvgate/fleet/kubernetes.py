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
    from their address.

Protocol
    Plain HTTP list/watch against the API server, as client-go does it: list (collection
    ``resourceVersion``), then ``watch=1&resourceVersion=RV&allowWatchBookmarks=true``, reading
    newline-delimited JSON events. A watch that ends normally resumes from the last version seen;
    ``410 Gone`` (as an HTTP status or an ``ERROR`` event) relists at once; any other failure
    retries with exponential backoff (with jitter) and then relists, so missed events are never
    trusted to a stale cache. While the API server is unreachable the last endpoint set stays.

Credentials
    In the cluster: the service account's token (re-read on every request, as bound tokens
    rotate) and CA. Outside: a kubeconfig (``--kubeconfig``, else ``$KUBECONFIG``, else
    ``~/.kube/config``) with token or client-certificate users; exec and auth-provider plugins are
    not supported.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import random
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import yaml

from kvgate.fleet.endpoint import Endpoint, EndpointSet, EngineType, Role
from kvgate.fleet.sources import EndpointDefaults, events_endpoint_for
from kvgate.service import Service

__all__ = [
    "ENGINE_LABEL",
    "INSTANCE_ID_ANNOTATION",
    "ROLE_LABEL",
    "KubeConfig",
    "KubeConfigError",
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
_SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_MAX_INSTANCE_ID: Final = 2**63
# A watch event carries one whole object; pods with large specs stay far below this, so a line
# this long means a broken stream rather than a big pod.
_MAX_EVENT_BYTES: Final = 16 << 20


class KubeConfigError(ValueError):
    """No usable API server credentials; the message says which file or field is wrong."""


class _Gone(Exception):
    """The resource version is too old (410): relist."""


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class KubeConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    token: str | None = None
    token_file: Path | None = None
    """Read on every request (bound service-account tokens are rotated in place)."""
    ca_file: Path | None = None
    ca_data: str | None = None
    """PEM text of the CA (a kubeconfig's ``certificate-authority-data``)."""
    client_cert: tuple[Path, Path] | None = None
    """(certificate, key) PEM files."""
    client_cert_data: tuple[bytes, bytes] | None = field(default=None, repr=False)
    """(certificate, key) PEM bytes, from a kubeconfig's ``client-*-data``."""
    insecure_skip_tls_verify: bool = False

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] | None = None) -> KubeConfig:
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeConfigError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are unset")
        token = _SERVICE_ACCOUNT / "token"
        if not token.is_file():
            raise KubeConfigError(f"service account token {token} not found")
        if ":" in host:
            host = f"[{host}]"
        return cls(
            server=f"https://{host}:{port}", token_file=token, ca_file=_SERVICE_ACCOUNT / "ca.crt"
        )

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> KubeConfig:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise KubeConfigError(f"kubeconfig {path}: {err}") from None
        if not isinstance(doc, dict):
            raise KubeConfigError(f"kubeconfig {path}: not a mapping")
        name = context or doc.get("current-context")
        ctx = _named(doc, "contexts", "context", name, path)
        cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), path)
        user = _named(doc, "users", "user", ctx.get("user"), path) if ctx.get("user") else {}
        if "exec" in user or "auth-provider" in user:
            raise KubeConfigError(
                f"kubeconfig {path}: user {ctx.get('user')!r} uses an exec/auth-provider plugin; "
                "give kvgate a token or client certificate user instead"
            )
        server = cluster.get("server")
        if not isinstance(server, str) or not server.startswith(("http://", "https://")):
            raise KubeConfigError(f"kubeconfig {path}: cluster has no http(s) server")
        base = path.parent

        def file(key: str, section: Mapping[str, Any]) -> Path | None:
            return base / str(section[key]) if section.get(key) else None

        def data(key: str, section: Mapping[str, Any]) -> bytes | None:
            raw = section.get(f"{key}-data")
            try:
                return base64.b64decode(raw, validate=True) if raw else None
            except ValueError:
                raise KubeConfigError(f"kubeconfig {path}: {key}-data is not base64") from None

        cert, key = file("client-certificate", user), file("client-key", user)
        cert_data, key_data = data("client-certificate", user), data("client-key", user)
        ca_data = data("certificate-authority", cluster)
        token_file = user.get("tokenFile")
        return cls(
            server=server.rstrip("/"),
            token=user.get("token"),
            token_file=base / token_file if token_file else None,
            ca_file=file("certificate-authority", cluster),
            ca_data=ca_data.decode("ascii", "replace") if ca_data else None,
            client_cert=(cert, key) if cert and key else None,
            client_cert_data=(cert_data, key_data) if cert_data and key_data else None,
            insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify")),
        )

    @classmethod
    def load(
        cls, kubeconfig: Path | None = None, env: Mapping[str, str] | None = None
    ) -> KubeConfig:
        """In-cluster credentials when running in a pod and no kubeconfig is named, else the
        kubeconfig (``--kubeconfig``, ``$KUBECONFIG``'s first file, ``~/.kube/config``)."""
        env = os.environ if env is None else env
        if kubeconfig is None and env.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster(env)
        if kubeconfig is None:
            listed = env.get("KUBECONFIG", "").split(os.pathsep)[0]
            kubeconfig = Path(listed) if listed else Path.home() / ".kube" / "config"
        return cls.from_kubeconfig(kubeconfig)

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https://"):
            return False
        if self.insecure_skip_tls_verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None, cadata=self.ca_data
            )
        if self.client_cert is not None:
            context.load_cert_chain(str(self.client_cert[0]), str(self.client_cert[1]))
        elif self.client_cert_data is not None:
            # ssl loads key pairs only from files: write them to a private directory that is
            # removed as soon as the context holds them.
            with tempfile.TemporaryDirectory(prefix="kvgate-kube-") as tmp:
                cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
                cert.write_bytes(self.client_cert_data[0])
                key.write_bytes(self.client_cert_data[1])
                context.load_cert_chain(str(cert), str(key))
        return context

    def headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file is not None:
            token = self.token_file.read_text(encoding="utf-8").strip()
        return {"Authorization": f"Bearer {token}"} if token else {}


def _named(
    doc: Mapping[str, Any], section: str, key: str, name: object, path: Path
) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key)
            if isinstance(value, dict):
                return value
    raise KubeConfigError(f"kubeconfig {path}: no {key} named {name!r} in {section}")


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


class PoolDiscovery(Service):
    """Keep an `EndpointSet` equal to the Ready pods of an InferencePool (see module docstring).

    Use as ``async with PoolDiscovery(...):`` or `start` / `aclose`. Starting does not wait for
    the API server: the set stays unknown (readiness off) until the first successful list.
    """

    def __init__(
        self,
        endpoints: EndpointSet,
        config: KubeConfig,
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
        self._endpoints = endpoints
        self._config = config
        self.pool_name = pool_name
        self.namespace = namespace
        self._defaults = defaults
        self._annotation = instance_id_annotation
        self._watch_timeout_s = watch_timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._pods: dict[str, dict[str, Any]] = {}
        self._spec: _PoolSpec | None = None
        self.lists = 0
        """Completed pod lists (the first sync and every resync)."""

    async def start(self) -> None:
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._config.ssl_context())
        )
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"pool-discovery {self.namespace}/{self.pool_name}"
        )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        delay = self._backoff[0]
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._sync()
                delay = self._backoff[0]
                continue
            except _Gone:
                # Expected after a long watch (etcd compaction): relist at once. Right after a
                # list it means a server that cannot serve its own versions: back off.
                if loop.time() - started > 1.0:
                    log.info("watch expired (410); relisting")
                    delay = self._backoff[0]
                    continue
                reason = "watch expired (410) right after listing"
            except (aiohttp.ClientError, TimeoutError, _ApiError, ValueError, OSError) as err:
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
        status, pool = await self._get(f"{pool_path}/{quote(self.pool_name)}")
        if status == 404:
            self._publish_empty("not found")
            raise _ApiError(404, f"InferencePool {self.namespace}/{self.pool_name} not found")
        spec = _PoolSpec.parse(pool)
        pods_path = f"/api/v1/namespaces/{quote(self.namespace)}/pods"
        selector = {"labelSelector": spec.label_selector()}
        _, listing = await self._get(pods_path, selector)
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

    async def _watch(
        self, path: str, params: dict[str, str], version: str
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events of one watch request; ends when the server closes the stream."""
        assert self._session is not None
        query = {
            **params,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._watch_timeout_s),
        }
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._request_timeout_s,
            sock_read=self._watch_timeout_s + self._request_timeout_s,
        )
        async with self._session.get(
            self._config.server + path,
            params=query,
            headers=self._config.headers(),
            timeout=timeout,
        ) as resp:
            await _raise_for_status(resp)
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > _MAX_EVENT_BYTES:
                    raise ValueError(f"watch event longer than {_MAX_EVENT_BYTES} bytes")
                for line in lines:
                    if line.strip():
                        yield _decode_event(line)

    async def _get(
        self, path: str, params: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self._request_timeout_s)
        async with self._session.get(
            self._config.server + path,
            params=params,
            headers=self._config.headers(),
            timeout=timeout,
        ) as resp:
            if resp.status == 404:
                return 404, {}
            await _raise_for_status(resp)
            body = await resp.json(content_type=None)
        if not isinstance(body, dict):
            raise ValueError(f"GET {path}: expected a JSON object")
        return resp.status, body

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


def _decode_event(line: bytes) -> tuple[str, dict[str, Any]]:
    event = json.loads(line)
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise ValueError(f"malformed watch event: {line[:200]!r}")
    kind = str(event.get("type"))
    obj: dict[str, Any] = event["object"]
    if kind == "ERROR":
        code = obj.get("code")
        if code == 410:
            raise _Gone()
        raise _ApiError(int(code or 500), str(obj.get("message", "watch error")))
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise ValueError(f"unknown watch event type {kind!r}")
    return kind, obj


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 300:
        return
    if resp.status == 410:
        raise _Gone()
    text = (await resp.text())[:500]
    hint = ""
    if resp.status in (401, 403):
        hint = " (check the service account's RBAC: get/list/watch on inferencepools and pods)"
    raise _ApiError(resp.status, f"{resp.method} {resp.url.path}: {text}{hint}")
