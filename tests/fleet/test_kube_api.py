"""The Kubernetes client: credentials from kubeconfigs and the cluster, GET and watch, against
the fake API server."""

from __future__ import annotations

import base64
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvgate.fleet.endpoint import EndpointSet
from kvgate.fleet.kube_api import (
    HttpKubeApi,
    KubeApiError,
    KubeConfig,
    KubeConfigError,
    WatchEvent,
    WatchExpired,
)
from kvgate.fleet.pool_discovery import PoolDiscovery
from tests.fleet.fake_apiserver import PODS, FakeApiServer
from tests.fleet.utils import LABELS, POOL, wait_until, write_kubeconfig


async def test_token_from_kubeconfig_reaches_the_api_server(tmp_path: Path) -> None:
    api = FakeApiServer(token="s3cret")
    await api.start()
    try:
        api.put_pool(POOL, LABELS, [8000])
        api.add_pod("a", "10.0.0.1", LABELS)
        path = tmp_path / "config"
        write_kubeconfig(path, {"server": api.url}, {"token": "s3cret"})
        endpoints = EndpointSet()
        config = KubeConfig.load(path, env={})
        async with PoolDiscovery(endpoints, config, POOL, api.namespace):
            await wait_until(lambda: len(endpoints) == 1)
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
        write_kubeconfig(
            path,
            {"server": api.url, "certificate-authority-data": b64(server_cert)},
            {"client-certificate-data": b64(client_cert), "client-key-data": b64(client_key)},
            context="kind",
        )
        config = KubeConfig.from_kubeconfig(path)
        assert config.server.startswith("https://")
        endpoints = EndpointSet()
        async with PoolDiscovery(endpoints, config, POOL, api.namespace):
            await wait_until(lambda: len(endpoints) == 1)
        # The decoded key is not left on disk.
        assert not list(Path(tempfile.gettempdir()).glob("kvgate-kube-*"))
    finally:
        await api.aclose()


def test_kubeconfig_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "config"
    write_kubeconfig(
        path, {"server": "https://k8s.example:6443"}, {"exec": {"command": "aws"}}, context="eks"
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
    write_kubeconfig(
        path,
        {"server": "https://127.0.0.1:6443", "certificate-authority-data": ca},
        {"tokenFile": "token"},
        context="kind",
    )
    (tmp_path / "token").write_text("abc\n")
    config = KubeConfig.from_kubeconfig(path)
    assert config.ca_data is not None and config.ca_data.startswith("-----BEGIN")
    assert config.headers() == {"Authorization": "Bearer abc"}


@pytest.fixture
async def client(api: FakeApiServer) -> AsyncIterator[HttpKubeApi]:
    kube = HttpKubeApi(KubeConfig(server=api.url), request_timeout_s=5.0)
    try:
        yield kube
    finally:
        await kube.aclose()


async def collect(events: AsyncIterator[WatchEvent]) -> list[tuple[str, str]]:
    return [(kind, obj["metadata"]["name"]) async for kind, obj in events]


async def test_get_reads_an_object_and_none_when_it_does_not_exist(
    api: FakeApiServer, client: HttpKubeApi
) -> None:
    api.add_pod("a", "10.0.0.1", LABELS)
    pods = PODS.format(ns=api.namespace)
    listing = await client.get(pods, {"labelSelector": "app=qwen3-vllm"})
    assert listing is not None
    assert [p["metadata"]["name"] for p in listing["items"]] == ["a"]
    assert listing["metadata"]["resourceVersion"] == str(api.version)
    assert await client.get(f"/api/v1/namespaces/{api.namespace}/nothing/here") is None


async def test_watch_yields_the_changes_after_a_version_until_the_server_ends_it(
    api: FakeApiServer, client: HttpKubeApi
) -> None:
    api.add_pod("a", "10.0.0.1", LABELS)
    since = str(api.version)
    api.add_pod("b", "10.0.0.2", LABELS)
    api.set_ready("a", False)
    api.delete_pod("b")
    pods = PODS.format(ns=api.namespace)
    events = await collect(client.watch(pods, {"labelSelector": "app=qwen3-vllm"}, since, 1))
    assert events == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert api.requests[-1][1]["allowWatchBookmarks"] == "true"


async def test_an_expired_version_raises_watch_expired(
    api: FakeApiServer, client: HttpKubeApi
) -> None:
    since = str(api.version)
    api.add_pod("a", "10.0.0.1", LABELS)
    api.compact()
    with pytest.raises(WatchExpired):
        await collect(client.watch(PODS.format(ns=api.namespace), {}, since, 1))


async def test_a_refused_request_says_what_to_check(api: FakeApiServer) -> None:
    kube = HttpKubeApi(KubeConfig(server=api.url, token="wrong"))
    api.token = "right"
    try:
        with pytest.raises(KubeApiError, match="RBAC") as err:
            await kube.get(PODS.format(ns=api.namespace))
        assert err.value.status == 401
    finally:
        await kube.aclose()


async def test_an_unreachable_server_is_an_os_error() -> None:
    kube = HttpKubeApi(KubeConfig(server="http://127.0.0.1:9"), request_timeout_s=2.0)
    try:
        with pytest.raises(OSError):
            await kube.get("/api/v1/namespaces/x/pods")
    finally:
        await kube.aclose()
