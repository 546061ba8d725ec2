"""InferencePool discovery against a fake API server speaking Kubernetes' list/watch protocol."""

from __future__ import annotations

import asyncio
import base64
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvgate.commands.epp import build_parser, settings_from_args
from kvgate.extproc.epp_runtime import EppRuntime, EppSettings
from kvgate.fleet.endpoint import Endpoint, EndpointSet
from kvgate.fleet.kubernetes import (
    ENGINE_LABEL,
    INSTANCE_ID_ANNOTATION,
    KubeConfig,
    KubeConfigError,
    PoolDiscovery,
    endpoints_of_pod,
)
from kvgate.fleet.sources import EndpointDefaults
from tests.fleet.fake_apiserver import FakeApiServer

POOL = "qwen-pool"
LABELS = {"app": "qwen3-vllm"}


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) for `predicate` to hold."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def addresses(endpoints: EndpointSet) -> set[str]:
    return {ep.address for ep in endpoints}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


class Changes:
    """Every (joined, left) notification of an endpoint set, as address sets."""

    def __init__(self, endpoints: EndpointSet) -> None:
        self.log: list[tuple[set[str], set[str]]] = []
        endpoints.subscribe(self._record)

    def _record(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        self.log.append(({e.address for e in joined}, {e.address for e in left}))

    @property
    def left(self) -> set[str]:
        return set().union(*(gone for _, gone in self.log))


def discovery(api: FakeApiServer, endpoints: EndpointSet, **kwargs: Any) -> PoolDiscovery:
    kwargs.setdefault("backoff_initial_s", 0.01)
    kwargs.setdefault("backoff_max_s", 0.05)
    return PoolDiscovery(endpoints, KubeConfig(server=api.url), POOL, api.namespace, **kwargs)


async def test_lists_ready_matching_pods_with_their_engine_and_instance_id(
    api: FakeApiServer,
) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod(
        "a",
        "10.0.0.1",
        {**LABELS, ENGINE_LABEL: "sglang"},
        annotations={INSTANCE_ID_ANNOTATION: "1732649523291627853"},
    )
    api.add_pod("b", "10.0.0.2", LABELS)
    api.add_pod("not-ready", "10.0.0.3", LABELS, ready=False)
    api.add_pod("terminating", "10.0.0.4", LABELS)
    api.mark_terminating("terminating")
    api.add_pod("other-model", "10.0.0.5", {"app": "llama"})
    endpoints = EndpointSet()
    defaults = EndpointDefaults(events_port=5557)
    async with discovery(api, endpoints, defaults=defaults):
        await until(lambda: endpoints.known)
        assert addresses(endpoints) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    a, b = endpoints.get("10.0.0.1:8000"), endpoints.get("10.0.0.2:8000")
    assert a is not None and b is not None
    assert (a.engine, a.instance_id, a.events_endpoint) == (
        "sglang",
        1732649523291627853,
        "tcp://10.0.0.1:5557",
    )
    assert (b.engine, b.instance_id) == ("vllm", None)
    assert b.labels == LABELS
    # The pod list asked the API server for the pool's selector, not the whole namespace.
    assert ("/api/v1/namespaces/my-model/pods", {"labelSelector": "app=qwen3-vllm"}) in api.requests


async def test_pod_churn_joins_and_leaves(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    changes = Changes(endpoints)
    async with discovery(api, endpoints) as d:
        await until(lambda: addresses(endpoints) == {"10.0.0.1:8000"})
        for i in range(2, 12):
            api.add_pod(f"p{i}", f"10.0.1.{i}", LABELS)
        api.delete_pod("a")
        await until(lambda: addresses(endpoints) == {f"10.0.1.{i}:8000" for i in range(2, 12)})
        for i in range(2, 7):
            api.delete_pod(f"p{i}")
        await until(lambda: len(endpoints) == 5)
        assert d.lists == 1, "churn must come from the watch, not from relisting"
    assert "10.0.0.1:8000" in changes.left
    assert {f"10.0.1.{i}:8000" for i in range(2, 7)} <= changes.left


async def test_readiness_flips_and_relabels(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    api.add_pod("b", "10.0.0.2", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints):
        await until(lambda: len(endpoints) == 2)
        api.set_ready("a", False)
        await until(lambda: addresses(endpoints) == {"10.0.0.2:8000"})
        api.set_ready("a", True)
        await until(lambda: len(endpoints) == 2)
        # Relabelled out of the selector: the API server sends DELETED for a selected watch.
        api.set_labels("b", {"app": "elsewhere"})
        await until(lambda: addresses(endpoints) == {"10.0.0.1:8000"})
        api.mark_terminating("a")
        await until(lambda: len(endpoints) == 0)


async def test_broken_watch_reconnects_and_resyncs(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints) as d:
        await until(lambda: len(endpoints) == 1 and api.open_watches == 2)
        # Changes made while the connection is down and the server refuses requests.
        api.fail_next(3, status=503)
        api.break_watches()
        api.delete_pod("a")
        api.add_pod("b", "10.0.0.2", LABELS)
        await until(lambda: addresses(endpoints) == {"10.0.0.2:8000"})
        assert d.lists >= 2
        await until(lambda: api.open_watches == 2)
        api.add_pod("c", "10.0.0.3", LABELS)
        await until(lambda: len(endpoints) == 2)


async def test_gone_relists_without_losing_changes(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints) as d:
        await until(lambda: len(endpoints) == 1 and api.open_watches == 2)
        api.expire_watches()
        api.add_pod("b", "10.0.0.2", LABELS)
        await until(lambda: d.lists == 2 and len(endpoints) == 2)
        # A resume from a compacted version gets 410 as an ERROR event too: relist again.
        api.compact()
        api.break_watches()
        api.delete_pod("a")
        await until(lambda: d.lists >= 3 and addresses(endpoints) == {"10.0.0.2:8000"})


async def test_watch_timeout_resumes_from_last_version_without_relisting(
    api: FakeApiServer,
) -> None:
    api.put_pool(POOL, LABELS, [8000])
    endpoints = EndpointSet()
    async with discovery(api, endpoints, watch_timeout_s=1) as d:
        await until(lambda: endpoints.known)
        api.add_pod("a", "10.0.0.1", LABELS)
        await until(lambda: len(endpoints) == 1)
        version = api.version

        def pod_watches() -> list[dict[str, str]]:
            return [q for p, q in api.requests if p.endswith("/pods") and q.get("watch") == "1"]

        await until(lambda: len(pod_watches()) >= 2, timeout=5.0)
        assert pod_watches()[-1]["resourceVersion"] == str(version)
        assert d.lists == 1


async def test_pool_selector_and_port_changes_relist(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("old", "10.0.0.1", LABELS)
    api.add_pod("new", "10.0.0.2", {"app": "qwen3-vllm-v2"})
    endpoints = EndpointSet()
    changes = Changes(endpoints)
    async with discovery(api, endpoints):
        await until(lambda: addresses(endpoints) == {"10.0.0.1:8000"})
        api.put_pool(POOL, {"app": "qwen3-vllm-v2"}, [8000])
        await until(lambda: addresses(endpoints) == {"10.0.0.2:8000"})
        assert "10.0.0.1:8000" in changes.left
        api.put_pool(POOL, {"app": "qwen3-vllm-v2"}, [8000, 8001])
        await until(lambda: addresses(endpoints) == {"10.0.0.2:8000", "10.0.0.2:8001"})
        api.delete_pool(POOL)
        await until(lambda: len(endpoints) == 0)


async def test_missing_pool_keeps_readiness_off_until_created(api: FakeApiServer) -> None:
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints):
        await until(lambda: sum(p.endswith(POOL) for p, _ in api.requests) >= 2)
        assert not endpoints.known
        api.put_pool(POOL, LABELS, [8000])
        await until(lambda: len(endpoints) == 1)
        assert endpoints.known


async def test_token_from_kubeconfig_reaches_the_api_server(tmp_path: Path) -> None:
    api = FakeApiServer(token="s3cret")
    await api.start()
    try:
        api.put_pool(POOL, LABELS, [8000])
        api.add_pod("a", "10.0.0.1", LABELS)
        path = tmp_path / "config"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "test",
                    "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
                    "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                    "users": [{"name": "u", "user": {"token": "s3cret"}}],
                }
            )
        )
        endpoints = EndpointSet()
        config = KubeConfig.load(path, env={})
        async with PoolDiscovery(endpoints, config, POOL, api.namespace):
            await until(lambda: len(endpoints) == 1)
    finally:
        await api.aclose()


def _certificate(name: str, ip: str | None = None) -> tuple[bytes, bytes]:
    """A self-signed (certificate, key) PEM pair, valid for `ip` when given."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_tls_with_client_certificate_from_kubeconfig_data(tmp_path: Path) -> None:
    """A kubeconfig like kind's: CA and client key pair inline, server verified by IP."""
    server_cert, server_key = _certificate("apiserver", "127.0.0.1")
    client_cert, client_key = _certificate("kvgate")
    for name, data in {
        "server.crt": server_cert,
        "server.key": server_key,
        "client.crt": client_cert,
    }.items():
        (tmp_path / name).write_bytes(data)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    server_ssl.load_verify_locations(tmp_path / "client.crt")
    server_ssl.verify_mode = ssl.CERT_REQUIRED
    api = FakeApiServer()
    await api.start(ssl_context=server_ssl)
    try:
        api.put_pool(POOL, LABELS, [8000])
        api.add_pod("a", "10.0.0.1", LABELS)

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        path = tmp_path / "config"
        path.write_text(
            yaml.safe_dump(
                {
                    "current-context": "kind",
                    "contexts": [{"name": "kind", "context": {"cluster": "c", "user": "u"}}],
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": api.url,
                                "certificate-authority-data": b64(server_cert),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "u",
                            "user": {
                                "client-certificate-data": b64(client_cert),
                                "client-key-data": b64(client_key),
                            },
                        }
                    ],
                }
            )
        )
        config = KubeConfig.from_kubeconfig(path)
        assert config.server.startswith("https://")
        endpoints = EndpointSet()
        async with PoolDiscovery(endpoints, config, POOL, api.namespace):
            await until(lambda: len(endpoints) == 1)
        # The decoded key is not left on disk.
        assert not list(Path(tempfile.gettempdir()).glob("kvgate-kube-*"))
    finally:
        await api.aclose()


def test_kubeconfig_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "eks",
                "contexts": [{"name": "eks", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://k8s.example:6443"}}],
                "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
            }
        )
    )
    with pytest.raises(KubeConfigError, match="exec/auth-provider"):
        KubeConfig.from_kubeconfig(path)
    with pytest.raises(KubeConfigError, match="no context named 'nope'"):
        KubeConfig.from_kubeconfig(path, context="nope")
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        KubeConfig.in_cluster(env={})


def test_kubeconfig_inline_certificate_data(tmp_path: Path) -> None:
    path = tmp_path / "config"
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "kind",
                "contexts": [{"name": "kind", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:6443",
                            "certificate-authority-data": ca,
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"tokenFile": "token"}}],
            }
        )
    )
    (tmp_path / "token").write_text("abc\n")
    config = KubeConfig.from_kubeconfig(path)
    assert config.ca_data is not None and config.ca_data.startswith("-----BEGIN")
    assert config.headers() == {"Authorization": "Bearer abc"}


def _pod(**status: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {}, "annotations": {}},
        "status": {"podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    pod["status"].update(status)
    return pod


@pytest.mark.parametrize(
    ("pod", "ports", "expected"),
    [
        (_pod(), [8000], {"10.0.0.9:8000": None}),
        (_pod(podIP="fd00::0:9"), [8000], {"[fd00::9]:8000": None}),
        (_pod(podIP=None), [8000], {}),
        (_pod(podIP="pending"), [8000], {}),
        (_pod(conditions=[]), [8000], {}),
        (_pod(conditions=[{"type": "Ready", "status": "False"}]), [8000], {}),
    ],
    ids=["ready", "ipv6-canonical", "no-ip-yet", "bad-ip", "no-conditions", "not-ready"],
)
def test_endpoints_of_pod(
    pod: dict[str, Any], ports: list[int], expected: dict[str, int | None]
) -> None:
    assert {e.address: e.instance_id for e in endpoints_of_pod(pod, ports)} == expected


@pytest.mark.parametrize(
    ("annotation", "ports", "ids"),
    [
        ("7,8", [8000, 8001], [7, 8]),
        ("7", [8000, 8001], [None, None]),
        ("-1", [8000], [None]),
        (str(2**63), [8000], [None]),
    ],
    ids=["one-id-per-port", "too-few-ids-ignored", "negative-ignored", "over-int64-ignored"],
)
def test_instance_id_annotation(annotation: str, ports: list[int], ids: list[int | None]) -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {INSTANCE_ID_ANNOTATION: annotation}
    assert [e.instance_id for e in endpoints_of_pod(pod, ports)] == ids


@pytest.mark.parametrize(
    ("label", "engine"),
    [("trtllm-serve", "trtllm"), ("sglang", "sglang"), ("mystery", "vllm")],
)
def test_engine_label(label: str, engine: str) -> None:
    pod = _pod()
    pod["metadata"]["labels"] = {ENGINE_LABEL: label, "llm-d.ai/role": "prefill"}
    (endpoint,) = endpoints_of_pod(pod, [8000])
    assert (endpoint.engine, endpoint.role) == (engine, "prefill")


async def test_epp_discovers_its_pool(api: FakeApiServer, tmp_path: Path) -> None:
    """`kvgate epp --pool-name` end to end: flags, kubeconfig, runtime, readiness."""
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS, annotations={"example.com/worker": "42"})
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "current-context": "t",
                "contexts": [{"name": "t", "context": {"cluster": "c"}}],
                "clusters": [{"name": "c", "cluster": {"server": api.url}}],
            }
        )
    )
    args = build_parser().parse_args(
        [
            f"--pool-name={POOL}",
            f"--pool-namespace={api.namespace}",
            f"--kubeconfig={kubeconfig}",
            "--instance-id-annotation=example.com/worker",
            "--no-secure-serving",
        ]
    )
    settings: EppSettings = settings_from_args(args)
    settings.bind, settings.grpc_port, settings.health_port, settings.metrics_port = (
        "127.0.0.1",
        0,
        0,
        0,
    )
    settings.env = {}
    async with EppRuntime(settings) as runtime:
        await until(lambda: len(runtime.endpoints) == 1)
        (endpoint,) = runtime.endpoints
        assert (endpoint.address, endpoint.instance_id) == ("10.0.0.1:8000", 42)
        api.delete_pod("a")
        await until(lambda: len(runtime.endpoints) == 0)
