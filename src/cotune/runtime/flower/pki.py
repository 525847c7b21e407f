"""Certificates and node keys for a secure local federation (tests, `flower-local.sh --secure`).

A real deployment gets its CA and server certificate from its own PKI; this makes the same kind of
files for 127.0.0.1 so that TLS and SuperNode authentication are exercised end to end on one
machine: a throwaway CA, a server certificate for 127.0.0.1 / localhost signed by it, and one EC
key pair per SuperNode (private key in OpenSSH format, as `flower-supernode
--auth-supernode-private-key` reads it; public key to register with `flwr supernode register`).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID = datetime.timedelta(days=7)


@dataclass(frozen=True)
class ServerFiles:
    ca: Path  # the CA certificate every client (SuperNode, flwr CLI) verifies the SuperLink with
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKeys:
    private: Path
    public: Path


def private_pem(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def make_server_files(out: Path) -> ServerFiles:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cotune local federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = ServerFiles(out / "ca.crt", out / "server.crt", out / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(files.key, private_pem(server_key, serialization.PrivateFormat.PKCS8))
    return files


def make_node_keys(out: Path, name: str) -> NodeKeys:
    """One SuperNode's EC key pair."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(out / f"{name}.key", out / f"{name}.pub")
    write_private(keys.private, private_pem(key, serialization.PrivateFormat.OpenSSH))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys.public.write_bytes(public)
    return keys
