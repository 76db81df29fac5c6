"""The camera transport's small blocking HTTP/1.1 client (MJPEG streams and JPEG snapshots).

Why the camera reads MJPEG over HTTP itself rather than through OpenCV is explained
in :mod:`instruments.transports.camera`. :func:`http_get` opens a response (chunked
bodies, up to 3 redirects, Basic auth from the URL's ``user:pass@``; no Digest auth);
:class:`Buffered` reads lines, exact lengths and up to markers from it.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from instruments.errors import ProtocolError, TransportOpenError, TransportTimeout
from instruments.transports.cameraurl import redact

MAX_JPEG_BYTES = 64 * 1024 * 1024
_MAX_HEADER_LINE = 16 * 1024
_MAX_REDIRECTS = 3


class Buffered:
    """A byte reader over ``recv(n)`` with line / exact / until-marker reads (blocking)."""

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._buf = bytearray()

    def _fill(self) -> None:
        data = self._recv(65536)
        if not data:
            raise EOFError("connection closed by the peer")
        self._buf += data

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes (b"" at end of stream): lets a Buffered feed another."""
        if not self._buf:
            try:
                self._fill()
            except EOFError:
                return b""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def readline(self, limit: int = _MAX_HEADER_LINE) -> bytes:
        """One line without its CR LF."""
        start = 0
        while True:
            idx = self._buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self._buf[:idx])
                del self._buf[: idx + 1]
                return line.rstrip(b"\r")
            if len(self._buf) > limit:
                raise ProtocolError("camera", f"header line longer than {limit} bytes")
            start = len(self._buf)
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read_until_any(self, markers: tuple[bytes, ...], limit: int) -> tuple[bytes, bytes]:
        """Data before the earliest marker, and that marker (consumed)."""
        start = 0
        longest = max(len(m) for m in markers)
        while True:
            best: tuple[int, bytes] | None = None
            for m in markers:
                idx = self._buf.find(m, start)
                if idx >= 0 and (best is None or idx < best[0]):
                    best = (idx, m)
            if best is not None:
                idx, marker = best
                data = bytes(self._buf[:idx])
                del self._buf[: idx + len(marker)]
                return data, marker
            if len(self._buf) > limit:
                raise ProtocolError("camera", f"no part boundary within {limit} bytes")
            start = max(0, len(self._buf) - longest)
            self._fill()

    def read_to_eof(self, limit: int) -> bytes:
        while True:
            if len(self._buf) > limit:
                raise ProtocolError("camera", f"body larger than {limit} bytes")
            try:
                self._fill()
            except EOFError:
                out = bytes(self._buf)
                self._buf.clear()
                return out


class _Dechunk:
    """``Transfer-Encoding: chunked`` decoder exposing ``recv(n)``."""

    def __init__(self, raw: Buffered) -> None:
        self._raw = raw
        self._left = 0
        self._done = False

    def recv(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._left == 0:
            line = self._raw.readline()
            if not line:  # the CR LF after the previous chunk
                line = self._raw.readline()
            try:
                self._left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(
                    "camera", "bad chunk size in chunked body", raw=line[:32]
                ) from None
            if self._left == 0:
                self._done = True
                return b""
        data = self._raw.recv(min(n, self._left))
        if not data:
            raise EOFError("connection closed inside a chunk")
        self._left -= len(data)
        return data


@dataclass
class HttpResponse:
    sock: socket.socket
    status: int
    reason: str
    headers: dict[str, str]
    body: Buffered

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def http_get(url: str, display: str, timeout: float) -> HttpResponse:
    """GET ``url`` (blocking; socket timeouts = ``timeout``); follows redirects; status must be 200."""
    for _ in range(_MAX_REDIRECTS + 1):
        resp = _http_request(url, display, timeout)
        if resp.status in (301, 302, 303, 307, 308) and "location" in resp.headers:
            resp.close()
            url = urljoin(url, resp.headers["location"])
            if urlsplit(url).scheme not in ("http", "https"):
                raise TransportOpenError(display, f"redirected to a non-HTTP URL {redact(url)}")
            continue
        if resp.status != 200:
            resp.close()
            hint = (
                " (authentication required: put user:password@ in the URL)"
                if resp.status == 401
                else ""
            )
            raise TransportOpenError(display, f"HTTP {resp.status} {resp.reason}{hint}")
        return resp
    raise TransportOpenError(display, f"more than {_MAX_REDIRECTS} redirects")


def _http_request(url: str, display: str, timeout: float) -> HttpResponse:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise TransportTimeout(
            display, f"connecting to {host}:{port} took longer than {timeout:g} s"
        ) from None
    except OSError as exc:
        raise TransportOpenError(
            display, f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        ) from None
    try:
        if tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {parts.netloc.rpartition('@')[2]}",
            "User-Agent: labbridge-camera",
            "Accept: multipart/x-mixed-replace, image/jpeg, */*",
            "Connection: close",
        ]
        if parts.username is not None:
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            lines.append("Authorization: Basic " + base64.b64encode(cred).decode("ascii"))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        raw = Buffered(sock.recv)
        status_line = raw.readline().decode("latin-1")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            raise ProtocolError(display, "not an HTTP response", raw=status_line[:64])
        headers: dict[str, str] = {}
        while True:
            line = raw.readline().decode("latin-1")
            if not line:
                break
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body = raw
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = Buffered(_Dechunk(raw).recv)
        return HttpResponse(
            sock, int(fields[1]), fields[2] if len(fields) > 2 else "", headers, body
        )
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sock.close()
        if isinstance(exc, TimeoutError):
            raise TransportTimeout(display, f"no HTTP response within {timeout:g} s") from None
        if isinstance(exc, (EOFError, ConnectionError)):
            raise TransportOpenError(display, f"the server closed the connection: {exc}") from None
        if isinstance(exc, ssl.SSLError):
            raise TransportOpenError(display, f"TLS failed: {exc}") from None
        raise


def content_type(headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    value = headers.get("content-type", "")
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        key, sep, val = item.partition("=")
        if sep:
            params[key.strip().lower()] = val.strip().strip('"')
    return main.strip().lower(), params


def read_body(resp: HttpResponse) -> bytes:
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit():
        n = int(length)
        if n > MAX_JPEG_BYTES:
            raise ProtocolError("camera", f"image of {n} bytes is too large")
        return resp.body.read_exact(n)
    return resp.body.read_to_eof(MAX_JPEG_BYTES)


__all__ = ["MAX_JPEG_BYTES", "Buffered", "HttpResponse", "content_type", "http_get", "read_body"]
