"""TLS preflight: a handshake verified against the consortium CA, with a message saying what to check (Flower itself
reports a wrong CA, a wrong name or a closed port only as "unavailable")."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from fedct.deploy.common import DeployError


def check_tls(host: str, port: int, ca_cert: Path, *, timeout: float = 5.0, setting: str = "FEDCT_CA_CERT") -> str:
    """TLS handshake with ``host:port`` verified against ``ca_cert`` (hostname included); returns the TLS version.

    Raises :class:`ConnectionError` when nothing answers and :class:`DeployError` (with what to check) when the
    certificate does not verify — the cases Flower reports only as "unavailable".
    """
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return str(tls.version())
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in str(exc.verify_message).lower():  # "Hostname mismatch" or "IP address mismatch"
            raise DeployError(
                f"TLS: the SuperLink at {host}:{port} has a certificate that is not valid for {host!r} "
                f"({exc.verify_message}). Connect with a name or IP listed in the server certificate's SANs, or "
                f"re-issue it with `fedct certs --san {host}`."
            ) from exc
        raise DeployError(
            f"TLS: the SuperLink at {host}:{port} presented a certificate that {setting}={ca_cert} does not verify "
            f"({exc.verify_message}). Check that {setting} is the consortium's ca.crt from `fedct certs` (the CA that "
            "signed the server certificate), not another consortium's or an old one."
        ) from exc
    except ssl.SSLError as exc:
        raise DeployError(
            f"TLS: handshake with {host}:{port} failed ({exc.reason or exc}); is this a fedct SuperLink "
            "started with TLS (not --insecure), on this port?"
        ) from exc
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"cannot reach the SuperLink at {host}:{port} ({exc.strerror or exc}); check the address, "
            "that the server is running and that the firewall lets this host through"
        ) from exc


def wait_for_tls(
    host: str,
    port: int,
    ca_cert: Path,
    *,
    wait_s: float,
    setting: str = "FEDCT_CA_CERT",
    alive: Callable[[], bool] | None = None,
) -> str:
    """:func:`check_tls` retried while nothing answers (up to ``wait_s``); certificate errors fail at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_tls(host, port, ca_cert, setting=setting)
        except ConnectionError:
            if time.monotonic() >= deadline or (alive is not None and not alive()):
                raise
            time.sleep(0.5)
