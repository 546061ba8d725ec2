"""TLS for the picker's gRPC port: a given certificate, or a self-signed one made at start-up
(as the upstream EPP does; Envoy's cluster for the EPP accepts it without verification)."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc


def server_credentials(cert_path: Path | None) -> grpc.ServerCredentials:
    if cert_path is not None:
        cert_file = cert_path / "tls.crt"
        key_file = cert_path / "tls.key"
        for f in (cert_file, key_file):
            if not f.is_file():
                raise FileNotFoundError(f"--cert-path: {f} not found (expects tls.crt and tls.key)")
        return grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())])
    key, cert = self_signed()
    return grpc.ssl_server_credentials([(key, cert)])


def self_signed(common_name: str = "kvgate-epp") -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
