"""Reaching a `--superlink` before anything is written or sent: TCP, then TLS with the given CA, so a
wrong address, a closed port or a certificate problem is named at once, not after `flwr run` times out.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cotune.runtime.flower import FlowerRunError

PROBE_TIMEOUT = 10.0  # seconds for the TCP connect and the TLS handshake with a --superlink


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) of --superlink, refused when it is not one."""
    shown = address if len(address) <= 80 else address[:80] + "..."
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FlowerRunError(f"--superlink {shown!r} is not HOST:PORT (e.g. coordinator.example.org:8000)")
    return host, int(port)


def probe_superlink(address: str, root_certificates: Path | None, timeout: float = PROBE_TIMEOUT) -> None:
    """Before a run is submitted: can this machine reach the SuperLink, and (with a CA certificate)
    does its TLS certificate verify? `flwr run` reports every such failure as "Connection to the
    SuperLink is unavailable"; this names the cause and what to do, in seconds."""
    host, port = split_address(address)
    shown = f"{host}:{port}" if len(host) <= 80 else f"{host[:80]}...:{port}"
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        raise FlowerRunError(
            f"--superlink {shown}: the host name does not resolve: check the address "
            "(HOST:PORT of the SuperLink)"
        ) from None
    except ConnectionRefusedError:
        raise FlowerRunError(
            f"--superlink {shown}: connection refused, nothing listens there: start the SuperLink "
            "(flower-superlink) or give its host and --port (default 8000)"
        ) from None
    except (TimeoutError, OSError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise FlowerRunError(
            f"--superlink {shown} is unreachable ({why} within {timeout:g}s): check the address, the "
            "network and any firewall between this machine and the SuperLink's port"
        ) from None
    with conn:
        if root_certificates is not None:
            check_tls(conn, host, shown, Path(root_certificates), timeout)


def check_tls(conn: socket.socket, host: str, shown: str, ca: Path, timeout: float) -> None:
    """A TLS handshake with the SuperLink, verified against `ca` as Flower verifies it."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise FlowerRunError(
            f"--root-certificates {ca}: not a readable PEM CA certificate "
            f"({getattr(exc, 'reason', None) or getattr(exc, 'strerror', None) or type(exc).__name__}): "
            "give the CA certificate the SuperLink's certificate was signed with"
        ) from None
    conn.settimeout(timeout)
    try:
        context.wrap_socket(conn, server_hostname=host).close()
    except ssl.SSLCertVerificationError as exc:
        raise FlowerRunError(
            f"--superlink {shown}: the SuperLink's TLS certificate does not verify against "
            f"--root-certificates {ca} ({exc.verify_message}): give the CA that signed the SuperLink's "
            "certificate (its --ssl-ca-certfile), and a certificate that names this host"
        ) from None
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        raise FlowerRunError(
            f"--superlink {shown}: no TLS handshake ({getattr(exc, 'reason', None) or type(exc).__name__}): "
            "the SuperLink probably runs with --insecure; leave out --root-certificates only if it is "
            "meant to (127.0.0.1 demos), otherwise start it with --ssl-*"
        ) from None
