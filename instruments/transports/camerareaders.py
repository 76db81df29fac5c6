"""The camera transport's reader threads for live sources (MJPEG over HTTP, OpenCV captures).

A :class:`Reader` reads its source continuously and keeps only the LATEST frame
(as a :class:`RawFrame`, not decoded yet for JPEG sources) plus the first failure;
:class:`~instruments.transports.camera.CameraTransport` takes frames from it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from instruments.errors import LinkLostError, ProtocolError, TransportOpenError, TransportTimeout
from instruments.transports.camerahttp import MAX_JPEG_BYTES, HttpResponse
from instruments.transports.cameraurl import CameraSource

thread_ids = itertools.count(1)  # names the camera's reader and worker threads


def frame_digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class RawFrame:
    """A frame as the reader thread keeps it (not decoded yet for JPEG sources)."""

    seq: int
    timestamp: float
    payload: bytes | np.ndarray
    digest: bytes
    repeats: int
    meta: Mapping[str, str]


class Reader(threading.Thread):
    """A live source's reader thread: keeps only the latest frame; reports the first failure."""

    def __init__(self, display: str, seq_start: int, notify: Callable[[], None]) -> None:
        super().__init__(name=f"lb-camera-reader-{next(thread_ids)}", daemon=True)
        self.display = display
        self.opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._notify = notify
        self._lock = threading.Lock()
        self._latest: RawFrame | None = None
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

    def state(self) -> tuple[RawFrame | None, Exception | None]:
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
            self._latest = RawFrame(
                self._seq, time.monotonic(), payload, digest, self._repeats, meta
            )
        self._notify()

    def _fail(self, exc: Exception) -> None:
        if self.stopping:
            return
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._notify()


class MjpegReader(Reader):
    """Reads ``multipart/x-mixed-replace`` parts from an open HTTP response."""

    def __init__(
        self,
        display: str,
        seq_start: int,
        notify: Callable[[], None],
        resp: HttpResponse,
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
                self._publish(data, frame_digest(data), headers)
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
            if n > MAX_JPEG_BYTES:
                raise ProtocolError(self.display, f"part of {n} bytes is too large")
            return body.read_exact(n), headers
        data, _ = body.read_until_any(self._markers, MAX_JPEG_BYTES)
        self._after_marker = True
        return data.rstrip(b"\r"), headers


class CaptureReader(Reader):
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
                self._publish(image, frame_digest(image), {})
        except Exception as exc:  # cv2.error and friends, reported once
            if opened:
                self._fail(LinkLostError(self.display, f"reading failed: {exc}"))
            else:
                self._open_done(TransportOpenError(self.display, f"cannot open: {exc}"))
        finally:
            if cap is not None:
                cap.release()


__all__ = ["CaptureReader", "MjpegReader", "RawFrame", "Reader", "frame_digest", "thread_ids"]
