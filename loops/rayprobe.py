"""Before joining a Ray cluster: does its head answer at the address, and in the same way (TLS or not)?

:func:`check_ray_address` answers within a few seconds, where ``ray.init`` retries an
unreachable GCS for minutes and a port where something else listens for ever, printing
only warnings. Ray's GCS speaks gRPC (HTTP/2): a plaintext head answers an HTTP/2 opening
with its SETTINGS frame within milliseconds. Under TLS (``RAY_USE_TLS=1`` on every node and
driver, docs/cluster.md) the same opening goes over a TLS handshake made as Ray's gRPC
makes it: this machine's certificate and key (``RAY_TLS_SERVER_CERT``,
``RAY_TLS_SERVER_KEY``: Ray's servers require a client certificate), the lab's CA
(``RAY_TLS_CA_CERT``), and the head's IP checked against its certificate's
subjectAltName (a head whose certificate lacks its IP does not even start: its own
processes refuse it). Each way a TLS set-up can differ between this process and the
cluster is one line that says what to set (:class:`RayTlsError`):

- this process has no TLS settings and the head speaks TLS (a TLS server closes a
  plaintext connection without a word: a TLS ClientHello tells it apart);
- ``RAY_USE_TLS`` is set here and the head speaks plaintext gRPC;
- a ``RAY_TLS_*`` variable unset, or its file unreadable, or the key not the certificate's;
- the head's certificate not signed by this CA, or not for the head's IP;
- the head refuses this machine's certificate.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

from instruments.deadline import connect_failure

__all__ = [
    "TLS_VARS",
    "RayTlsError",
    "RayUnreachable",
    "check_ray_address",
    "not_ray",
    "tls_files",
    "tls_on",
]

DOC = "docs/cluster.md"
#: the variables Ray's TLS reads (besides RAY_USE_TLS): this machine's certificate and key,
#: the lab's CA
TLS_VARS = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")
_SET_TLS = (
    "set RAY_USE_TLS=1, RAY_TLS_SERVER_CERT and RAY_TLS_SERVER_KEY (this machine's certificate "
    "and key) and RAY_TLS_CA_CERT (the lab's CA), as on the cluster's nodes"
)


class RayUnreachable(ConnectionError):
    """No Ray cluster answers at the address given (``--ray-address``, lab.yaml
    ``ray.address``, ``$RAY_ADDRESS``)."""


class RayTlsError(ConnectionError):
    """This process's TLS settings (``RAY_USE_TLS``, ``RAY_TLS_*``) and the cluster's do not
    fit together, or its certificate files do not work. The message says what to set."""


#: an HTTP/2 client's opening (RFC 9113 3.4): the preface and an empty SETTINGS frame
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4
_FIX_ADDRESS = (
    "fix --ray-address, lab.yaml ray.address or $RAY_ADDRESS, or leave them out to run a local Ray"
)
#: a TLS record's first byte: an alert or a handshake message (RFC 8446 5.1)
_TLS_RECORDS = (0x15, 0x16)


def tls_on() -> bool:
    """Whether this process runs Ray with TLS (``RAY_USE_TLS``, read as Ray reads it)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def tls_files() -> dict[str, Path]:
    """The files the ``RAY_TLS_*`` variables name (variable -> path). Raises
    :class:`RayTlsError` naming a variable that is unset or a file that cannot be read (Ray
    itself would fail later, or wait: its gRPC retries)."""
    out: dict[str, Path] = {}
    for var in TLS_VARS:
        value = os.environ.get(var, "")
        if not value:
            raise RayTlsError(f"RAY_USE_TLS is set but ${var} is not: {_SET_TLS}, see {DOC}")
        path = Path(value)
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            raise RayTlsError(
                f"cannot read ${var} ({path}): {exc.strerror or exc}: {_SET_TLS}, see {DOC}"
            ) from None
        out[var] = path
    return out


def not_ray(address: str, why: str) -> str:
    """The line for an address where something answers, but not a Ray cluster's GCS."""
    return (
        f"no Ray cluster answers at {address} ({why}): give the Ray head's address and the "
        f"--port it was started with (ray start --head --port=...): {_FIX_ADDRESS}"
    )


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`RayUnreachable` unless a gRPC server (Ray's GCS speaks gRPC) answers at a
    ``host:port`` Ray address within ``timeout_s``, and :class:`RayTlsError` when it speaks
    TLS and this process does not (``RAY_USE_TLS``), or the other way round, or the TLS
    handshake fails (module docstring). A refused or timed-out connection, or an answer to
    an HTTP/2 opening that is not HTTP/2's, is :class:`RayUnreachable`. ``auto``,
    ``local`` and ``ray://`` addresses are left to Ray.
    """
    if "://" in address or ":" not in address:
        return
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise RayUnreachable(
            f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379)"
        ) from None
    files = tls_files() if tls_on() else None
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            if files is not None:
                answer = _tls_h2_answer(conn, address, host, files, deadline)
            else:
                answer = _h2_answer(conn, deadline)
    except RayTlsError:
        raise
    except OSError as exc:
        why = connect_failure(exc, timeout_s)
        raise RayUnreachable(
            f"no Ray cluster answers at {address} ({why}): start its head "
            f"there (ray start --head --port={port}), {_FIX_ADDRESS}"
        ) from None
    if answer is None:
        why = f"something listens there but said nothing within {timeout_s:g} s"
    elif len(answer) >= 9 and answer[3] == _H2_SETTINGS:
        return
    elif files is None and _speaks_tls(host, port, deadline):
        raise RayTlsError(
            f"the Ray cluster at {address} uses TLS and this process does not: {_SET_TLS}, "
            f"see {DOC}"
        )
    else:
        why = "something listens there but does not speak gRPC, as Ray does"
    raise RayUnreachable(not_ray(address, why))


def _h2_answer(conn: socket.socket | ssl.SSLSocket, deadline: float) -> bytes | None:
    """The first 9 bytes (a frame header) the server at ``conn`` sends back to an HTTP/2
    opening, fewer if it closes first; None if it says nothing by ``deadline``."""
    answer = b""
    try:
        conn.sendall(_H2_PREFACE)
        while len(answer) < 9:
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = conn.recv(9 - len(answer))
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        return answer or None
    except ssl.SSLError:
        raise
    except OSError:  # reset by a server that took the bytes for garbage
        pass
    return answer


def _tls_h2_answer(
    conn: socket.socket, address: str, host: str, files: dict[str, Path], deadline: float
) -> bytes | None:
    """:func:`_h2_answer` over TLS as Ray's gRPC makes it (module docstring); a handshake
    that fails is :class:`RayTlsError` saying why."""
    cert, key, ca = (str(files[v]) for v in TLS_VARS)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise RayTlsError(
            f"the TLS files do not work together ($RAY_TLS_SERVER_CERT {cert}, "
            f"$RAY_TLS_SERVER_KEY {key}, $RAY_TLS_CA_CERT {ca}: {_ssl_reason(exc)}): give this "
            f"machine's certificate, its key and the lab's CA in PEM, see {DOC}"
        ) from None
    context.set_alpn_protocols(["h2"])
    conn.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        tls = context.wrap_socket(conn, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raise RayTlsError(
            f"the Ray head at {address} shows a certificate this machine does not trust "
            f"({exc.verify_message}): sign every machine's certificate with the lab's CA in "
            f"$RAY_TLS_CA_CERT ({ca}), with the machine's IP in its subjectAltName, see {DOC}"
        ) from None
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        if "CERTIFICATE" in reason.upper():  # an alert about ours (TLS 1.2 checks it here)
            raise RayTlsError(_refused(address, cert, reason)) from None
        if "ALERT" not in reason.upper() and _plain_grpc(host, _port(address), deadline):
            raise RayTlsError(
                f"the Ray cluster at {address} does not use TLS and this process does "
                f"(RAY_USE_TLS is set): unset RAY_USE_TLS, or restart the cluster's nodes "
                f"with TLS, see {DOC}"
            ) from None
        raise RayTlsError(
            f"no TLS handshake with {address} ({reason}): is it the Ray head's --port, and "
            f"does the cluster use TLS? see {DOC}"
        ) from None
    try:
        with tls:
            answer = _h2_answer(tls, deadline)
    except ssl.SSLError as exc:  # TLS 1.3: the server checks our certificate after
        raise RayTlsError(_refused(address, cert, _ssl_reason(exc))) from None
    if answer is not None and len(answer) < 9:  # closed on us after the handshake: the same
        raise RayTlsError(_refused(address, cert, "it closed the connection"))
    return answer


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _refused(address: str, cert: str, why: str) -> str:
    return (
        f"the Ray head at {address} refused this machine's certificate after the TLS "
        f"handshake ({why}): $RAY_TLS_SERVER_CERT ({cert}) must be signed by the CA the "
        f"cluster's nodes trust (their $RAY_TLS_CA_CERT), see {DOC}"
    )


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else " ".join(str(exc).split()) or type(exc).__name__


def _speaks_tls(host: str, port: int, deadline: float) -> bool:
    """Whether the server at ``host:port`` answers a TLS ClientHello with a TLS record (a
    handshake message or an alert), on a connection of its own."""
    hello = ssl.MemoryBIO()
    session = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname=host)
    try:
        session.do_handshake()
    except ssl.SSLWantReadError:
        pass
    try:
        with socket.create_connection(
            (host, port), timeout=max(deadline - time.monotonic(), 0.5)
        ) as conn:
            conn.sendall(hello.read())
            first = conn.recv(2)
    except OSError:
        return False
    return len(first) == 2 and first[0] in _TLS_RECORDS and first[1] == 0x03


def _plain_grpc(host: str, port: int, deadline: float) -> bool:
    """Whether the server at ``host:port`` answers an HTTP/2 opening in plaintext (its
    SETTINGS frame), on a connection of its own."""
    try:
        with socket.create_connection(
            (host, port), timeout=max(deadline - time.monotonic(), 0.5)
        ) as conn:
            answer = _h2_answer(conn, max(deadline, time.monotonic() + 0.5))
    except OSError:
        return False
    return answer is not None and len(answer) >= 9 and answer[3] == _H2_SETTINGS
