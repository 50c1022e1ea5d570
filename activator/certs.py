"""A serving certificate for the webhook without cert-manager.

The API server calls the webhook over HTTPS and checks its certificate
against the `caBundle` of the MutatingWebhookConfiguration. cert-manager
makes and renews one (deploy/base/certificate.yaml); where it is not
installed, `activator webhook-cert` makes a private CA and a certificate it
signs for the webhook's Service DNS names, and prints the caBundle.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    ca_pem: bytes  # the caBundle
    cert_pem: bytes
    key_pem: bytes  # the serving key: secret


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for a Service (it uses the .svc one)."""
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
    ]


def make(dns_names: list[str], days: int = 365) -> Certificates:
    """A fresh CA (P-256) and a serving certificate it signs for `dns_names`."""
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little: a node whose clock is behind must not see it as not yet valid.
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pod-activator webhook CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Certificates(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write(certs: Certificates, directory: Path) -> None:
    """ca.crt, tls.crt and tls.key (mode 0600), the names a TLS Secret uses."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(certs.ca_pem)
    (directory / "tls.crt").write_bytes(certs.cert_pem)
    key = directory / "tls.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(certs.key_pem)
    os.chmod(key, 0o600)  # an existing file keeps its mode through O_CREAT
