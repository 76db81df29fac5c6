"""Camera transport: frames from a camera device, a video file, an MJPEG-over-HTTP or RTSP URL.

The only runtime module that imports OpenCV (``cv2``). URL forms::

    camera://0?timeout=5&width=1280&height=720&fps=30&fourcc=MJPG   device index (V4L2, ...)
    camera:///data/run1.avi?loop=true&width=640                        a file (.avi, .mp4, .mjpg, ...)
    http://[user:pass@]host[:port]/stream.mjpg?res=hd&lb_timeout=2     MJPEG over HTTP (also https://)
    http://host/snapshot.jpg?lb_timeout=2                              single JPEG, fetched per grab
    rtsp://host:554/stream1?lb_timeout=5                               RTSP (OpenCV/FFmpeg)

Options (defaults in brackets). On ``camera://`` URLs they are plain query
options. On ``http(s)://`` and ``rtsp://`` URLs the query string belongs to the
camera, so our options carry an ``lb_`` prefix and are stripped; every other
query option is passed to the camera verbatim. An unknown option (or unknown
``lb_`` option) is an :class:`~instruments.errors.InvalidURLError`.

``timeout`` [5]     seconds: open deadline, and the longest a :meth:`CameraTransport.grab`
                    waits for a new frame; a live stream silent for this long is "stalled"
``width``/``height`` [source size]  frames are delivered at this size (a device is asked for
                    it; any source that delivers another size is resized, one side alone
                    keeps the aspect ratio)
``fps``             frame rate requested from a device (``camera://INDEX`` only)
``fourcc``          pixel format requested from a device, e.g. ``MJPG`` (device only)
``loop`` [false]    files only: restart at the end instead of raising :class:`EndOfStreamError`
``lb_backend`` [auto]  http(s) only: ``mjpeg`` (our reader), ``ffmpeg`` (OpenCV), ``auto``

Threads: live sources (device, HTTP, RTSP) have a reader thread that reads
continuously and keeps only the LATEST frame, so the stream's own buffers
(kernel socket buffer, FFmpeg) are drained and :meth:`grab` never hands out a
stale buffered frame. Files and JPEG snapshot URLs are read on demand on the
transport's :class:`DeviceWorker`. JPEG decoding also runs on the worker,
never on the event loop, and only for frames that are actually grabbed.

Why MJPEG over HTTP is read by our own small HTTP client, not ``cv2.VideoCapture``
(measured with OpenCV 5.0 / FFmpeg here): FFmpeg's open and read timeouts
(``CAP_PROP_OPEN_TIMEOUT_MSEC``/``CAP_PROP_READ_TIMEOUT_MSEC``) do work, but a
blocked ``VideoCapture.read()`` cannot be interrupted from another thread (and
``release()`` during a read is unsafe), so ``close()`` of a stalled stream would
block for the whole read timeout; our reader shuts its socket down and returns
at once. It also exposes each part's headers (``Frame.meta``, e.g. a camera's
``X-Frame-Seq``), hashes the JPEG bytes rather than decoded pixels to detect
bit-identical (frozen) frames, decodes only the frames that are grabbed, and
keeps FFmpeg's warnings out of stderr. ``lb_backend=ffmpeg`` uses OpenCV instead;
``auto`` falls back to it when the HTTP response is not ``multipart/*`` or
``image/jpeg`` (e.g. an MP4 over HTTP). Our reader speaks HTTP/1.1 (chunked
bodies, up to 3 redirects, Basic auth from the URL's ``user:pass@``; no Digest
auth).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, unquote_plus, urljoin, urlsplit, urlunsplit

import cv2
import numpy as np

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    ProtocolError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.base import DeviceWorker, Transport, URLOptions, split_url

log = logging.getLogger(__name__)

_MAX_JPEG_BYTES = 64 * 1024 * 1024
_MAX_HEADER_LINE = 16 * 1024
_MAX_REDIRECTS = 3
_ids = itertools.count(1)


class EndOfStreamError(TransportError):
    """A file source has no more frames (and ``loop`` is off)."""


@dataclass(frozen=True, eq=False)
class Frame:
    """One camera frame.

    ``image``: BGR ``uint8`` array (height, width, 3). ``timestamp``:
    ``time.monotonic()`` when the frame arrived from the source. ``seq``: 1, 2,
    ... frames received from the source by this transport (continues across
    reconnects; gaps mean frames were skipped to stay at the latest).
    ``digest``: 16-byte BLAKE2b of the encoded JPEG (HTTP sources) or of the
    pixels (OpenCV sources): equal digests mean bit-identical frames.
    ``repeats``: how many frames in a row before this one had the same digest
    (0 = differs from its predecessor). ``meta``: per-frame headers of an
    MJPEG part or snapshot (lower-case names, e.g. ``x-frame-seq``), or the
    frame index of a file. ``encoded``: the JPEG bytes exactly as received
    (HTTP sources; store or forward them without re-encoding), None for
    OpenCV sources.
    """

    image: np.ndarray
    timestamp: float
    seq: int
    digest: bytes = b""
    repeats: int = 0
    meta: Mapping[str, str] = field(default_factory=dict)
    encoded: bytes | None = None

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def age_s(self) -> float:
        """Seconds since the frame arrived."""
        return time.monotonic() - self.timestamp

    def __repr__(self) -> str:
        return f"<Frame seq={self.seq} {self.width}x{self.height} repeats={self.repeats}>"


def _digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# --------------------------------------------------------------------- URLs
@dataclass(frozen=True)
class CameraSource:
    """A parsed camera URL: what to open and how."""

    kind: str  # device | file | http | rtsp
    target: int | str  # device index, file path, or the URL handed to the camera/library
    display: str  # the URL with any password replaced by ***
    timeout: float
    width: int = 0
    height: int = 0
    fps: float = 0.0
    fourcc: str | None = None
    loop: bool = False
    backend: str = "auto"  # http: auto | mjpeg | ffmpeg


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def parse_camera_url(url: str) -> CameraSource:
    """Validate ``url`` and split it into the source and our options (see the module docstring)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "camera":
        return _parse_camera_scheme(url)
    if scheme in ("http", "https", "rtsp"):
        return _parse_network(url, scheme)
    raise InvalidURLError(url, "a camera URL starts with camera://, http://, https:// or rtsp://")


def _size_options(opts: URLOptions, prefix: str) -> tuple[int, int]:
    width = opts.int(prefix + "width", 0)
    height = opts.int(prefix + "height", 0)
    for name, value in ((prefix + "width", width), (prefix + "height", height)):
        if value < 0 or value > 16384:
            raise InvalidURLError(opts.url, f"option {name}={value} must be between 1 and 16384")
    return width, height


def _timeout_option(opts: URLOptions, name: str) -> float:
    timeout = opts.float(name, 5.0)
    if timeout <= 0:
        raise InvalidURLError(opts.url, f"option {name} must be > 0 seconds")
    return timeout


def _parse_camera_scheme(url: str) -> CameraSource:
    _, _, raw_opts = split_url(url)
    parts = urlsplit(url)
    opts = URLOptions(url, raw_opts)
    timeout = _timeout_option(opts, "timeout")
    width, height = _size_options(opts, "")
    path = unquote(parts.path)
    if parts.netloc and path not in ("", "/"):
        raise InvalidURLError(
            url, "use camera://INDEX for a device or camera:///absolute/path for a file"
        )
    if parts.netloc:
        try:
            index = int(parts.netloc)
        except ValueError:
            raise InvalidURLError(
                url,
                f"device index {parts.netloc!r} is not an integer (a file is camera:///path/to/file)",
            ) from None
        if index < 0:
            raise InvalidURLError(url, "device index must be >= 0")
        fps = opts.float("fps", 0.0)
        fourcc = opts.optional_str("fourcc")
        if fourcc is not None and len(fourcc) != 4:
            raise InvalidURLError(url, f"option fourcc={fourcc!r} must be 4 characters, e.g. MJPG")
        opts.finish()
        return CameraSource("device", index, url, timeout, width, height, fps, fourcc)
    if not path or path == "/":
        raise InvalidURLError(url, "no device index and no file path")
    for device_only in ("fps", "fourcc"):
        if opts.optional_str(device_only) is not None:
            raise InvalidURLError(
                url, f"option {device_only} applies to camera devices (camera://INDEX) only"
            )
    loop = opts.bool("loop", False)
    opts.finish()
    return CameraSource("file", path, url, timeout, width, height, loop=loop)


def _parse_network(url: str, scheme: str) -> CameraSource:
    parts = urlsplit(url)
    if not parts.hostname:
        raise InvalidURLError(url, "no host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise InvalidURLError(url, f"bad port: {exc}") from None
    ours: dict[str, str] = {}
    keep: list[str] = []
    for segment in parts.query.split("&") if parts.query else []:
        key = unquote_plus(segment.partition("=")[0])
        if key.startswith("lb_"):
            if key in ours:
                raise InvalidURLError(url, f"option {key!r} given twice")
            ours[key] = unquote_plus(segment.partition("=")[2])
        else:
            keep.append(segment)
    target = urlunsplit(parts._replace(query="&".join(keep)))
    opts = URLOptions(url, ours)
    timeout = _timeout_option(opts, "lb_timeout")
    width, height = _size_options(opts, "lb_")
    backend = "ffmpeg"
    if scheme in ("http", "https"):
        backend = opts.choice("lb_backend", "auto", ("auto", "mjpeg", "ffmpeg"))
    for device_only in ("lb_fps", "lb_fourcc", "lb_loop"):
        if device_only in ours:
            raise InvalidURLError(
                url, f"option {device_only} does not apply to {scheme}:// sources"
            )
    opts.finish()
    kind = "rtsp" if scheme == "rtsp" else "http"
    return CameraSource(kind, target, _redact(url), timeout, width, height, backend=backend)


# ------------------------------------------------------------- HTTP client
class _Buffered:
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
        """Up to ``n`` bytes (b"" at end of stream): lets a _Buffered feed another."""
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

    def __init__(self, raw: _Buffered) -> None:
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
class _HttpResponse:
    sock: socket.socket
    status: int
    reason: str
    headers: dict[str, str]
    body: _Buffered

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _http_get(url: str, display: str, timeout: float) -> _HttpResponse:
    """GET ``url`` (blocking; socket timeouts = ``timeout``); follows redirects; status must be 200."""
    for _ in range(_MAX_REDIRECTS + 1):
        resp = _http_request(url, display, timeout)
        if resp.status in (301, 302, 303, 307, 308) and "location" in resp.headers:
            resp.close()
            url = urljoin(url, resp.headers["location"])
            if urlsplit(url).scheme not in ("http", "https"):
                raise TransportOpenError(display, f"redirected to a non-HTTP URL {_redact(url)}")
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


def _http_request(url: str, display: str, timeout: float) -> _HttpResponse:
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
        raw = _Buffered(sock.recv)
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
            body = _Buffered(_Dechunk(raw).recv)
        return _HttpResponse(
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


def _content_type(headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    value = headers.get("content-type", "")
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        key, sep, val = item.partition("=")
        if sep:
            params[key.strip().lower()] = val.strip().strip('"')
    return main.strip().lower(), params


def _read_body(resp: _HttpResponse) -> bytes:
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit():
        n = int(length)
        if n > _MAX_JPEG_BYTES:
            raise ProtocolError("camera", f"image of {n} bytes is too large")
        return resp.body.read_exact(n)
    return resp.body.read_to_eof(_MAX_JPEG_BYTES)


# ----------------------------------------------------------------- readers
@dataclass(frozen=True)
class _Raw:
    """A frame as the reader thread keeps it (not decoded yet for JPEG sources)."""

    seq: int
    timestamp: float
    payload: bytes | np.ndarray
    digest: bytes
    repeats: int
    meta: Mapping[str, str]


class _Reader(threading.Thread):
    """A live source's reader thread: keeps only the latest frame; reports the first failure."""

    def __init__(self, display: str, seq_start: int, notify: Callable[[], None]) -> None:
        super().__init__(name=f"lb-camera-reader-{next(_ids)}", daemon=True)
        self.display = display
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._notify = notify
        self._lock = threading.Lock()
        self._latest: _Raw | None = None
        self._failure: Exception | None = None
        self._seq = seq_start
        self._prev_digest: bytes | None = None
        self._repeats = 0
        self._stop_event = threading.Event()

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def state(self) -> tuple[_Raw | None, Exception | None]:
        with self._lock:
            return self._latest, self._failure

    def stop(self) -> None:
        self._stop_event.set()
        self._interrupt()

    def _interrupt(self) -> None:
        """Unblock a blocking read (overridden where that is possible)."""

    def _open_done(self, exc: Exception | None = None) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if exc is None:
                self.opened.set_result(None)
            else:
                self.opened.set_exception(exc)

    def _publish(self, payload: bytes | np.ndarray, digest: bytes, meta: Mapping[str, str]) -> None:
        with self._lock:
            self._repeats = self._repeats + 1 if digest == self._prev_digest else 0
            self._prev_digest = digest
            self._seq += 1
            self._latest = _Raw(self._seq, time.monotonic(), payload, digest, self._repeats, meta)
        self._notify()

    def _fail(self, exc: Exception) -> None:
        if self.stopping:
            return
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._notify()


class _MjpegReader(_Reader):
    """Reads ``multipart/x-mixed-replace`` parts from an open HTTP response."""

    def __init__(
        self,
        display: str,
        seq_start: int,
        notify: Callable[[], None],
        resp: _HttpResponse,
        boundary: str,
        stall_s: float,
    ) -> None:
        super().__init__(display, seq_start, notify)
        self._resp = resp
        b = boundary.encode("latin-1")
        # RFC 2046: delimiter is "--" + boundary; some cameras declare "--x" and send "--x".
        self._delims = {b"--" + b}
        if b.startswith(b"--"):
            self._delims.add(b)
        self._ends = {d + b"--" for d in self._delims}
        self._markers = tuple(b"\n" + d for d in self._delims)
        self._sock_lock = threading.Lock()
        self._closed = False
        self._after_marker = False
        self._stall_s = stall_s
        self._open_done()

    def _interrupt(self) -> None:
        with self._sock_lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    self._resp.sock.shutdown(socket.SHUT_RDWR)

    def _close_sock(self) -> None:
        with self._sock_lock:
            self._closed = True
            self._resp.close()

    def run(self) -> None:
        try:
            self._resp.sock.settimeout(self._stall_s)
            while not self.stopping:
                data, headers = self._next_part()
                ctype = headers.get("content-type", "image/jpeg").lower()
                if "jpeg" not in ctype and "jpg" not in ctype:
                    continue  # e.g. a metadata part interleaved by some cameras
                self._publish(data, _digest(data), headers)
        except TimeoutError:
            self._fail(
                TransportTimeout(self.display, f"stream stalled: no data for {self._stall_s:g} s")
            )
        except (EOFError, OSError) as exc:
            self._fail(LinkLostError(self.display, f"MJPEG stream lost: {exc}"))
        except ProtocolError as exc:
            self._fail(exc)
        except Exception as exc:  # anything else ends the stream, reported once
            self._fail(LinkLostError(self.display, f"MJPEG reader failed: {exc!r}"))
        finally:
            self._close_sock()

    def _next_part(self) -> tuple[bytes, dict[str, str]]:
        body = self._resp.body
        if self._after_marker:
            rest = body.readline()  # what follows a delimiter found inside data: CRLF or "--" (end)
            if rest.startswith(b"--"):
                raise EOFError("the camera ended the multipart stream")
            self._after_marker = False
        else:
            skipped = 0
            while True:
                line = body.readline().strip()
                if line in self._delims:
                    break
                if line in self._ends:
                    raise EOFError("the camera ended the multipart stream")
                skipped += len(line) + 2
                if skipped > 1024 * 1024:
                    raise ProtocolError(self.display, "no multipart boundary found", raw=line[:32])
        headers: dict[str, str] = {}
        while True:
            text = body.readline().decode("latin-1")
            if not text:
                break
            name, sep, value = text.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "")
        if length.isdigit():
            n = int(length)
            if n > _MAX_JPEG_BYTES:
                raise ProtocolError(self.display, f"part of {n} bytes is too large")
            return body.read_exact(n), headers
        data, _ = body.read_until_any(self._markers, _MAX_JPEG_BYTES)
        self._after_marker = True
        return data.rstrip(b"\r"), headers


class _CaptureReader(_Reader):
    """Reads a live OpenCV ``VideoCapture`` (device, RTSP, HTTP via FFmpeg) on its own thread."""

    def __init__(self, source: CameraSource, seq_start: int, notify: Callable[[], None]) -> None:
        super().__init__(source.display, seq_start, notify)
        self.source = source
        self.backend_name = ""

    def _create(self) -> Any:
        src = self.source
        if src.kind == "device":
            return cv2.VideoCapture(int(src.target), cv2.CAP_ANY)
        ms = int(src.timeout * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        return cv2.VideoCapture(str(src.target), cv2.CAP_FFMPEG, params)

    def _configure(self, cap: Any) -> None:
        src = self.source
        if src.kind != "device":
            return
        if src.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*src.fourcc))
        if src.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, src.width)
        if src.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, src.height)
        if src.fps:
            cap.set(cv2.CAP_PROP_FPS, src.fps)

    def run(self) -> None:
        cap: Any = None
        opened = False
        try:
            cap = self._create()
            if not cap.isOpened():
                what = (
                    "no such camera device"
                    if self.source.kind == "device"
                    else "OpenCV/FFmpeg could not open the stream"
                )
                self._open_done(TransportOpenError(self.display, what))
                return
            self.backend_name = cap.getBackendName()
            self._configure(cap)
            opened = True
            self._open_done()
            read_timeout = self.source.timeout if self.source.kind != "device" else 0.0
            while not self.stopping:
                t0 = time.monotonic()
                ok, image = cap.read()
                if self.stopping:
                    break
                if not ok or image is None:
                    waited = time.monotonic() - t0
                    if read_timeout and waited >= 0.8 * read_timeout:
                        self._fail(
                            TransportTimeout(
                                self.display, f"stream stalled: no frame for {waited:.1f} s"
                            )
                        )
                    else:
                        self._fail(
                            LinkLostError(self.display, "the source stopped delivering frames")
                        )
                    return
                self._publish(image, _digest(image), {})
        except Exception as exc:  # cv2.error and friends, reported once
            if opened:
                self._fail(LinkLostError(self.display, f"reading failed: {exc}"))
            else:
                self._open_done(TransportOpenError(self.display, f"cannot open: {exc}"))
        finally:
            if cap is not None:
                cap.release()


# --------------------------------------------------------------- transport
class CameraTransport(Transport):
    """Frames from a camera, file or stream URL; see the module docstring for URLs and threads.

    ``await grab()`` returns a frame newer than the previous one it returned
    (waiting up to ``timeout``), ``await latest()`` the most recent frame
    received. After a lost link (:class:`LinkLostError`) or a stall
    (:class:`TransportTimeout`) the next call reconnects.
    """

    schemes = ("camera", "http", "https", "rtsp")

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.source = parse_camera_url(url)
        self._worker: DeviceWorker | None = None
        self._reader: _Reader | None = None
        self._mode = ""  # file | snapshot | mjpeg | opencv
        self._cap: Any = None  # file VideoCapture (worker thread only)
        self._backend = ""
        self._seq = 0
        self._prev_digest: bytes | None = None
        self._repeats = 0
        self._last_returned = 0
        self._last_frame: Frame | None = None
        self._pending: Frame | None = None  # file: first frame peeked by latest(), not yet grabbed
        self._decoded: Frame | None = None  # live: cache of the last decoded frame
        self._snapshot_url = ""
        self._frame_event = asyncio.Event()
        self._grab_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def display_url(self) -> str:
        """The URL with any password replaced by ``***`` (used in errors and logs)."""
        return self.source.display

    @property
    def timeout(self) -> float:
        return self.source.timeout

    @property
    def mode(self) -> str:
        """How frames are read now: ``file``, ``snapshot``, ``mjpeg``, ``opencv`` ("" when closed)."""
        return self._mode

    def describe(self) -> dict[str, Any]:
        size = (
            (self._last_frame.width, self._last_frame.height)
            if self._last_frame is not None
            else None
        )
        return {
            "url": self.display_url,
            "source": self.source.kind,
            "mode": self._mode or None,
            "backend": self._backend or None,
            "timeout_s": self.source.timeout,
            "requested_size": (self.source.width, self.source.height)
            if (self.source.width or self.source.height)
            else None,
            "frame_size": size,
        }

    # ------------------------------------------------------------ open/close
    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = DeviceWorker(f"camera-{next(_ids)}")
        try:
            if self.source.kind == "file":
                await self._worker.run(
                    self._open_file, timeout=self.timeout + 5.0, url=self.display_url
                )
                self._mode = "file"
            elif self.source.kind == "http" and self.source.backend != "ffmpeg":
                await self._open_http()
            else:
                await self._start_reader(_CaptureReader(self.source, self._seq, self._notify))
                self._mode = "opencv"
        except BaseException:
            await self._teardown()
            raise

    def _notify(self) -> None:
        """From a reader thread: wake whoever waits in grab()."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(self._frame_event.set)

    async def _start_reader(self, reader: _Reader) -> None:
        self._reader = reader
        reader.start()
        try:
            await asyncio.wait_for(asyncio.wrap_future(reader.opened), self.timeout * 2 + 5.0)
        except TimeoutError:
            raise TransportTimeout(
                self.display_url, f"opening took longer than {self.timeout * 2 + 5.0:g} s"
            ) from None
        if isinstance(reader, _CaptureReader):
            self._backend = reader.backend_name

    async def _open_http(self) -> None:
        assert self._worker is not None
        target = str(self.source.target)
        resp = await self._worker.run(
            _http_get,
            target,
            self.display_url,
            self.timeout,
            timeout=self.timeout * 3 + 5.0,
            url=self.display_url,
        )
        ctype, params = _content_type(resp.headers)
        if ctype.startswith("multipart/") and params.get("boundary"):
            reader = _MjpegReader(
                self.display_url, self._seq, self._notify, resp, params["boundary"], self.timeout
            )
            await self._start_reader(reader)
            self._mode, self._backend = "mjpeg", "labbridge-mjpeg"
            return
        if ctype in ("image/jpeg", "image/jpg"):
            resp.close()  # verified; each grab fetches its own snapshot
            self._snapshot_url = target
            self._mode, self._backend = "snapshot", "labbridge-http"
            return
        resp.close()
        if self.source.backend == "mjpeg":
            raise TransportOpenError(
                self.display_url,
                f"not an MJPEG stream (Content-Type {ctype or 'missing'!r}); try lb_backend=ffmpeg",
            )
        log.info("%s: Content-Type %r, reading it with OpenCV/FFmpeg", self.display_url, ctype)
        await self._start_reader(_CaptureReader(self.source, self._seq, self._notify))
        self._mode = "opencv"

    def _open_file(self) -> None:
        path = str(self.source.target)
        if not os.path.exists(path):
            raise TransportOpenError(self.display_url, f"no such file {path}")
        if not os.path.isfile(path):
            raise TransportOpenError(self.display_url, f"{path} is not a regular file")
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            cap.release()
            raise TransportOpenError(self.display_url, f"OpenCV cannot read {path} as a video")
        self._cap = cap
        self._backend = cap.getBackendName()

    async def _close(self) -> None:
        await self._teardown()

    async def _release(self) -> None:
        await self._teardown()

    async def _teardown(self) -> None:
        """Stop and join the reader, release the capture, stop the worker (idempotent)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()
            await self._join(reader)
            self._seq = max(self._seq, reader.last_seq)
        worker, self._worker = self._worker, None
        if worker is not None:
            cap, self._cap = self._cap, None
            if cap is not None:
                with contextlib.suppress(Exception):
                    await worker.run(cap.release, timeout=10.0)
            await worker.aclose()
        self._mode = ""
        self._pending = None
        self._decoded = None
        self._frame_event.set()  # wake a grab() waiting on this link

    async def _join(self, thread: threading.Thread) -> None:
        if not thread.is_alive() and thread.ident is None:
            return
        deadline = time.monotonic() + self.timeout + 10.0
        while thread.is_alive():
            if time.monotonic() > deadline:
                log.error("%s: reader thread %s did not stop", self.display_url, thread.name)
                return
            await asyncio.sleep(0.005)
        thread.join()

    async def _drop_link(self) -> None:
        """After a failure: free everything; the next call reopens (reconnect on demand)."""
        self._is_open = False
        await self._teardown()

    # ---------------------------------------------------------------- frames
    async def grab(self, timeout: float | None = None) -> Frame:
        """A fresh frame: one received after this call (a live stream's frames buffered before
        it may show the scene before the last change: a pump still running), also newer than
        the last one returned; waits up to ``timeout`` (default: the URL's).

        Raises :class:`TransportTimeout` (no new frame in time, or the stream
        stalled), :class:`LinkLostError` (the stream ended; the next call
        reconnects), :class:`EndOfStreamError` (end of a file without loop),
        :class:`ProtocolError` (an undecodable frame).
        """
        t = self.timeout if timeout is None else float(timeout)
        async with self._grab_lock:
            await self.ensure_open()
            if self._mode == "file":
                frame = self._pending or await self._read_file(t)
                self._pending = None
            elif self._mode == "snapshot":
                frame = await self._fetch_snapshot(t)
            else:
                reader = self._reader
                raw = reader.state()[0] if reader is not None else None
                received = raw.seq if raw is not None else 0
                frame = await self._live(t, newer_than=max(self._last_returned, received))
            self._last_returned = frame.seq
            self._last_frame = frame
            return frame

    async def latest(self, timeout: float | None = None) -> Frame:
        """The most recent frame received (may be one already returned); waits only if there is none yet."""
        t = self.timeout if timeout is None else float(timeout)
        async with self._grab_lock:
            await self.ensure_open()
            if self._mode == "file":
                if self._pending is None and self._last_frame is None:
                    self._pending = await self._read_file(t)
                frame = self._pending or self._last_frame
                assert frame is not None
                return frame
            if self._mode == "snapshot":
                if self._last_frame is None:
                    self._last_frame = await self._fetch_snapshot(t)
                return self._last_frame
            return await self._live(t, newer_than=0, failure_first=True)

    async def _live(self, wait_s: float, newer_than: int, failure_first: bool = False) -> Frame:
        """The latest frame with ``seq > newer_than``; frames received before a failure come first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            reader = self._reader
            if reader is None:
                raise LinkLostError(
                    self.display_url, "the transport was closed while waiting for a frame"
                )
            self._frame_event.clear()
            raw, failure = reader.state()
            if (
                raw is not None
                and raw.seq > newer_than
                and not (failure_first and failure is not None)
            ):
                return await self._to_frame(raw, max(0.5, deadline - loop.time()))
            if failure is not None:
                await self._drop_link()
                raise failure
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransportTimeout(self.display_url, f"no new frame within {wait_s:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._frame_event.wait(), remaining)

    async def _to_frame(self, raw: _Raw, wait_s: float) -> Frame:
        cached = self._decoded
        if cached is not None and cached.seq == raw.seq:
            return cached
        assert self._worker is not None
        image = await self._worker.run(
            self._decode, raw.payload, raw.seq, timeout=wait_s, url=self.display_url
        )
        encoded = raw.payload if isinstance(raw.payload, bytes) else None
        frame = Frame(image, raw.timestamp, raw.seq, raw.digest, raw.repeats, raw.meta, encoded)
        self._decoded = frame
        return frame

    def _decode(self, payload: bytes | np.ndarray, seq: int) -> np.ndarray:
        """Worker thread: JPEG bytes (or an image) -> BGR image at the requested size."""
        if isinstance(payload, np.ndarray):
            return self._fit(payload)
        decoded = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ProtocolError(
                self.display_url, f"frame {seq} is not a decodable JPEG", raw=payload[:16]
            )
        return self._fit(np.asarray(decoded, dtype=np.uint8))

    def _fit(self, image: np.ndarray) -> np.ndarray:
        w, h = self.source.width, self.source.height
        if not (w or h):
            return image
        ih, iw = image.shape[:2]
        if not w:
            w = max(1, round(iw * h / ih))
        if not h:
            h = max(1, round(ih * w / iw))
        if (iw, ih) == (w, h):
            return image
        interp = cv2.INTER_AREA if w * h < iw * ih else cv2.INTER_LINEAR
        return cv2.resize(image, (w, h), interpolation=interp)

    def _next_seq(self, digest: bytes) -> tuple[int, int]:
        self._repeats = self._repeats + 1 if digest == self._prev_digest else 0
        self._prev_digest = digest
        self._seq += 1
        return self._seq, self._repeats

    async def _read_file(self, wait_s: float) -> Frame:
        assert self._worker is not None
        image, index = await self._worker.run(self._file_read, timeout=wait_s, url=self.display_url)
        digest = _digest(image)
        seq, repeats = self._next_seq(digest)
        return Frame(image, time.monotonic(), seq, digest, repeats, {"frame_index": str(index)})

    def _file_read(self) -> tuple[np.ndarray, int]:
        cap = self._cap
        if cap is None:
            raise LinkLostError(self.display_url, "file closed")
        index = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
        ok, image = cap.read()
        if (not ok or image is None) and self.source.loop:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            index = 0
            ok, image = cap.read()
        if not ok or image is None:
            raise EndOfStreamError(self.display_url, f"end of file after frame {index}")
        return self._fit(image), index

    async def _fetch_snapshot(self, wait_s: float) -> Frame:
        assert self._worker is not None
        try:
            data, headers, arrived = await self._worker.run(
                self._snapshot_blocking,
                min(wait_s, self.timeout),
                timeout=wait_s + 1.0,
                url=self.display_url,
            )
        except (LinkLostError, TransportTimeout):
            await self._drop_link()
            raise
        digest = _digest(data)
        image = await self._worker.run(
            self._decode, data, self._seq + 1, timeout=wait_s, url=self.display_url
        )
        seq, repeats = self._next_seq(digest)
        return Frame(image, arrived, seq, digest, repeats, headers, data)

    def _snapshot_blocking(self, timeout: float) -> tuple[bytes, dict[str, str], float]:
        """Worker thread: one GET of the snapshot URL (a refused connection is a lost link)."""
        try:
            resp = _http_get(self._snapshot_url, self.display_url, timeout)
        except TransportOpenError as exc:
            raise LinkLostError(self.display_url, str(exc).split(": ", 1)[-1]) from None
        try:
            data = _read_body(resp)
        except TimeoutError:
            raise TransportTimeout(
                self.display_url, f"snapshot body not complete within {timeout:g} s"
            ) from None
        except (EOFError, OSError) as exc:
            raise LinkLostError(self.display_url, f"snapshot transfer failed: {exc}") from None
        finally:
            resp.close()
        return data, dict(resp.headers), time.monotonic()


__all__ = ["CameraSource", "CameraTransport", "EndOfStreamError", "Frame", "parse_camera_url"]
