"""What a TLS failure means, in the operator's words: which side refused, and which [tls] key to look at.

The settings themselves are `injector.config.Tls`; each transport hands them to its library (py-amqp, stomp.py)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from injector.config import Tls


REFUSED = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"})


def refusal(exc: BaseException, tls: Tls | None = None) -> str | None:
    """One line for a TLS failure (None if `exc` is not one): the server's certificate refused by us, our
    certificate refused (or, when `tls` gives none, wanted) by the server, or a server that does not speak TLS on
    that port."""
    no_certificate = tls is not None and tls.cert_file is None
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the server's certificate is not trusted ({exc.verify_message}): check ca_file, and that "
                "the certificate names the host (or server_name)")
    if isinstance(exc, ssl.SSLEOFError):  # TLS 1.3: a server refusing our certificate may just hang up
        return ("TLS: the server ended the TLS session at once: it wants a client certificate, or refused ours "
                "(check cert_file, key_file and the CA that issued them)")
    if not isinstance(exc, ssl.SSLError):
        return None
    reason = getattr(exc, "reason", None) or str(exc)
    if reason == "WRONG_VERSION_NUMBER":
        return "TLS: the server does not speak TLS on this port (a plain listener?)"
    if reason in {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE"} or (
            no_certificate and reason in REFUSED):
        return f"TLS: the server wants a client certificate ({reason}): set cert_file and key_file"
    if reason in REFUSED:
        return f"TLS: the server refused our client certificate ({reason}): is it issued by a CA the server trusts?"
    return f"TLS: {reason}"


def diagnosis(tls: Tls, addresses: Iterable[tuple[str, int]], timeout: float = 3.0) -> str | None:
    """Why a TLS connection to the first of `addresses` fails, by making one with `tls`'s own context (for clients
    such as stomp.py that only say they could not connect); None if it succeeds or nothing answers."""
    for host, port in addresses:
        try:
            with socket.create_connection((host, port), timeout) as sock, \
                    tls.context().wrap_socket(sock, server_hostname=host) as wrapped:
                wrapped.settimeout(timeout / 3)
                with contextlib.suppress(TimeoutError):
                    wrapped.recv(1)  # TLS 1.3: a refused client certificate is only said after the handshake
        except (OSError, ValueError) as exc:
            why = refusal(exc, tls)
            if why is not None:
                return why
            continue
        return None
    return None
