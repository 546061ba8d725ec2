"""A small Kubernetes API client: credentials, GET and watch, as pool discovery needs them.

Protocol
    Plain HTTP against the API server, as client-go does it. `HttpKubeApi.get` reads one object or
    list; `HttpKubeApi.watch` sends ``watch=1&resourceVersion=RV&allowWatchBookmarks=true`` and
    yields the newline-delimited JSON events until the server ends the stream. ``410 Gone`` (as an
    HTTP status or an ``ERROR`` event) raises `WatchExpired`: the caller relists.

Credentials
    In the cluster: the service account's token (re-read on every request, as bound tokens
    rotate) and CA. Outside: a kubeconfig (``--kubeconfig``, else ``$KUBECONFIG``, else
    ``~/.kube/config``) with token or client-certificate users; exec and auth-provider plugins are
    not supported.

Why not kubernetes_asyncio: it works against the same list/watch protocol, but importing any part
of it loads its whole generated client (2-3 s and ~80 MB, against under 1 s and ~65 MB for the
whole EPP), its watch does not relist after 410 (that loop would stay ours), and these two calls
are all discovery needs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import yaml

from kvgate.errors import InvalidInput
from kvgate.service import Service

__all__ = [
    "HttpKubeApi",
    "KubeApi",
    "KubeApiError",
    "KubeConfig",
    "KubeConfigError",
    "KubeTask",
    "WatchExpired",
]

_SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A watch event carries one whole object; pods with large specs stay far below this, so a line
# this long means a broken stream rather than a big pod.
_MAX_EVENT_BYTES: Final = 16 << 20


class KubeConfigError(InvalidInput):
    """No usable API server credentials; the message says which file or field is wrong."""


class WatchExpired(Exception):
    """The resource version is too old (410 Gone): relist."""


class KubeApiError(Exception):
    """The API server refused a request (an HTTP error status, or an ERROR watch event)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeConnectionError(OSError):
    """The API server could not be reached, or the connection broke."""


WatchEvent = tuple[str, dict[str, Any]]
"""(type, object): ``ADDED``, ``MODIFIED``, ``DELETED`` or ``BOOKMARK``, and the object."""


class KubeApi(Protocol):
    """What pool discovery asks of the API server.

    Failures: `WatchExpired` (410), `KubeApiError` (another status), `OSError` (unreachable,
    timed out, connection lost), `ValueError` (an answer that is not what the API returns).
    """

    async def get(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> dict[str, Any] | None:
        """The JSON object at ``path``, or None when it does not exist (404)."""
        ...

    def watch(
        self, path: str, params: Mapping[str, str], version: str, timeout_s: int
    ) -> AsyncIterator[WatchEvent]:
        """The events after ``version``, until the server ends the watch (after ``timeout_s``)."""
        ...

    async def aclose(self) -> None: ...


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


class HttpKubeApi:
    """`KubeApi` over aiohttp, with the credentials of a `KubeConfig`. Create it on the event
    loop that uses it; building the TLS context here makes bad certificates fail at once."""

    def __init__(self, config: KubeConfig, *, request_timeout_s: float = 30.0) -> None:
        self._config = config
        self._request_timeout_s = request_timeout_s
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=config.ssl_context())
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def get(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> dict[str, Any] | None:
        timeout = aiohttp.ClientTimeout(total=self._request_timeout_s)
        async with self._request(path, params, timeout) as resp:
            if resp.status == 404:
                return None
            await _raise_for_status(resp)
            body = await resp.json(content_type=None)
        if not isinstance(body, dict):
            raise ValueError(f"GET {path}: expected a JSON object")
        return body

    async def watch(
        self, path: str, params: Mapping[str, str], version: str, timeout_s: int
    ) -> AsyncIterator[WatchEvent]:
        query = {
            **params,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._request_timeout_s,
            sock_read=timeout_s + self._request_timeout_s,
        )
        async with self._request(path, query, timeout) as resp:
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

    @contextlib.asynccontextmanager
    async def _request(
        self, path: str, params: Mapping[str, str] | None, timeout: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET ``path`` with the credentials; aiohttp's errors become `KubeConnectionError`."""
        try:
            async with self._session.get(
                self._config.server + path,
                params=params,
                headers=self._config.headers(),
                timeout=timeout,
            ) as resp:
                yield resp
        except aiohttp.ClientError as err:
            raise KubeConnectionError(str(err) or type(err).__name__) from err


def _decode_event(line: bytes) -> tuple[str, dict[str, Any]]:
    event = json.loads(line)
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise ValueError(f"malformed watch event: {line[:200]!r}")
    kind = str(event.get("type"))
    obj: dict[str, Any] = event["object"]
    if kind == "ERROR":
        code = obj.get("code")
        if code == 410:
            raise WatchExpired()
        raise KubeApiError(int(code or 500), str(obj.get("message", "watch error")))
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise ValueError(f"unknown watch event type {kind!r}")
    return kind, obj


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 300:
        return
    if resp.status == 410:
        raise WatchExpired()
    text = (await resp.text())[:500]
    hint = ""
    if resp.status in (401, 403):
        hint = " (check the service account's RBAC: get/list/watch on inferencepools and pods)"
    raise KubeApiError(resp.status, f"{resp.method} {resp.url.path}: {text}{hint}")


class KubeTask(Service):
    """One background task talking to the API server (a discovery, a watch).

    ``api`` is the API server's credentials — a client is opened with them at start and closed
    with the task — or a client, left open. Subclasses implement `_run`, the task's loop.
    """

    def __init__(
        self, api: KubeConfig | KubeApi, task_name: str, *, request_timeout_s: float = 30.0
    ) -> None:
        self._api_source = api
        self._task_name = task_name
        self._request_timeout_s = request_timeout_s
        self._api: KubeApi | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        source = self._api_source
        if isinstance(source, KubeConfig):
            self._api = HttpKubeApi(source, request_timeout_s=self._request_timeout_s)
        else:
            self._api = source
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._task_name)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        api, self._api = self._api, None
        if api is not None and api is not self._api_source:
            await api.aclose()

    async def _run(self) -> None:
        raise NotImplementedError
