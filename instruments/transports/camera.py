"""Camera transport: frames from a camera device, a video file, an MJPEG-over-HTTP or RTSP URL.

With its reader threads (:mod:`~instruments.transports.camerareaders`), the only runtime
code that imports OpenCV (``cv2``); URLs are parsed in :mod:`~instruments.transports.cameraurl`,
HTTP is spoken by :mod:`~instruments.transports.camerahttp`. URL forms::

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
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from instruments.deadline import bounded
from instruments.errors import (
    LinkLostError,
    ProtocolError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.base import DeviceWorker, Transport
from instruments.transports.camerahttp import content_type, http_get, read_body
from instruments.transports.camerareaders import (
    CaptureReader,
    MjpegReader,
    RawFrame,
    Reader,
    frame_digest,
    thread_ids,
)
from instruments.transports.cameraurl import CameraSource, parse_camera_url

log = logging.getLogger(__name__)


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
        self._reader: Reader | None = None
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
        self._worker = DeviceWorker(f"camera-{next(thread_ids)}")
        try:
            if self.source.kind == "file":
                await self._worker.run(
                    self._open_file, timeout=self.timeout + 5.0, url=self.display_url
                )
                self._mode = "file"
            elif self.source.kind == "http" and self.source.backend != "ffmpeg":
                await self._open_http()
            else:
                await self._start_reader(CaptureReader(self.source, self._seq, self._notify))
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

    async def _start_reader(self, reader: Reader) -> None:
        self._reader = reader
        reader.start()
        try:
            await bounded(asyncio.wrap_future(reader.opened), self.timeout * 2 + 5.0)
        except TimeoutError:
            raise TransportTimeout(
                self.display_url, f"opening took longer than {self.timeout * 2 + 5.0:g} s"
            ) from None
        if isinstance(reader, CaptureReader):
            self._backend = reader.backend_name

    async def _open_http(self) -> None:
        assert self._worker is not None
        target = str(self.source.target)
        resp = await self._worker.run(
            http_get,
            target,
            self.display_url,
            self.timeout,
            timeout=self.timeout * 3 + 5.0,
            url=self.display_url,
        )
        ctype, params = content_type(resp.headers)
        if ctype.startswith("multipart/") and params.get("boundary"):
            reader = MjpegReader(
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
        await self._start_reader(CaptureReader(self.source, self._seq, self._notify))
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
                await bounded(self._frame_event.wait(), remaining)

    async def _to_frame(self, raw: RawFrame, wait_s: float) -> Frame:
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
        digest = frame_digest(image)
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
        digest = frame_digest(data)
        image = await self._worker.run(
            self._decode, data, self._seq + 1, timeout=wait_s, url=self.display_url
        )
        seq, repeats = self._next_seq(digest)
        return Frame(image, arrived, seq, digest, repeats, headers, data)

    def _snapshot_blocking(self, timeout: float) -> tuple[bytes, dict[str, str], float]:
        """Worker thread: one GET of the snapshot URL (a refused connection is a lost link)."""
        try:
            resp = http_get(self._snapshot_url, self.display_url, timeout)
        except TransportOpenError as exc:
            raise LinkLostError(self.display_url, str(exc).split(": ", 1)[-1]) from None
        try:
            data = read_body(resp)
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
