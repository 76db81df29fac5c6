"""Simulated IP camera: MJPEG over HTTP of the rendered station (PROTOCOLS.md "Camera").

Wire (HTTP/1.0 responses, the connection closes after each response):

* ``GET /stream.mjpg``: ``200``, ``Content-Type: multipart/x-mixed-replace;
  boundary=lbframe``, then one part per frame, at ``fps`` frames per real
  second::

      --lbframe\\r\\n
      Content-Type: image/jpeg\\r\\n
      Content-Length: <n>\\r\\n
      X-Frame-Seq: <seq>\\r\\n          frame sequence number (1, 2, ...; repeats when frozen)
      X-Sim-Time: <s>\\r\\n             simulated time of the scene, seconds
      \\r\\n
      <n bytes of JPEG>\\r\\n

* ``GET /frame.jpg``: one JPEG (``image/jpeg`` with ``Content-Length``,
  ``X-Frame-Seq``, ``X-Sim-Time``); a frame younger than ``1/fps`` is reused.
* ``HEAD`` of both gives the headers only; anything else ``404`` (``405`` for
  other methods).

Frames are rendered from the world (:mod:`simulators.scene`) on the
simulator's own render thread, only while a stream client is connected (or
on demand for ``/frame.jpg``), and JPEG-encoded with ``cv2.imencode``.
Every request is recorded as ``world.wire.record("camera", {"method", "path",
"client"})``.

Faults (``device`` parameter optional; when given it must be ``"camera"``):

``camera-freeze``       the same frame (same bytes, same ``X-Frame-Seq``) is served again and again
``vial-missing``        the scene is rendered without the vial
``dropped-connection``  edge-triggered: every open client connection is aborted at injection
``no-reply``            requests are accepted and read but nothing is sent (streams stall)
                        until the fault is cleared
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from simulators.scene import SceneInputs, SceneRenderer
from simulators.world import StationWorld

log = logging.getLogger(__name__)

BOUNDARY = "lbframe"
DEVICE = "camera"
_TRUTH_HISTORY = 256


@dataclass(frozen=True)
class SimFrame:
    """One rendered frame as served: sequence number, scene time, JPEG bytes, ground truth."""

    seq: int
    sim_t: float
    real_t: float  # time.monotonic() when rendered
    jpeg: bytes
    truth: dict[str, Any]
    image: np.ndarray  # the BGR image before JPEG encoding


class CameraSim:
    """An MJPEG-over-HTTP camera looking at the station. See the module docstring.

    ``url`` is ``http://127.0.0.1:PORT/stream.mjpg``, ``frame_url`` the
    single-frame URL. ``port=0`` picks a free port.
    """

    def __init__(
        self,
        world: StationWorld,
        *,
        fps: float = 15.0,
        width: int = 640,
        height: int = 480,
        host: str = "127.0.0.1",
        port: int = 0,
        jpeg_quality: int = 85,
        seed: int = 0,
        noise_sigma: float = 2.0,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps!r}")
        self.world = world
        self.fps = float(fps)
        self.width, self.height = int(width), int(height)
        self.host = host
        self._port = port
        self.jpeg_quality = int(jpeg_quality)
        self._renderer = SceneRenderer(self.width, self.height, seed=seed, noise_sigma=noise_sigma)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._producer: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._render_lock: asyncio.Lock | None = None
        self._current: SimFrame | None = None
        self._seq = 0
        self._tick = 0
        self._tick_event: asyncio.Event | None = None
        self._streamers = 0
        self._streamers_changed: asyncio.Event | None = None
        self._stopping = False
        self._listening = False
        self._truths: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self.world.faults.on_inject(self._on_fault)

    # ------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}/stream.mjpg"

    @property
    def frame_url(self) -> str:
        return f"http://{self.host}:{self._port}/frame.jpg"

    @property
    def latest(self) -> SimFrame | None:
        """The frame most recently rendered (and served), or None."""
        return self._current

    @property
    def latest_seq(self) -> int:
        return self._current.seq if self._current is not None else 0

    def truth(self, seq: int) -> dict[str, Any] | None:
        """Ground truth of a recently served frame (the last 256 are kept)."""
        return self._truths.get(seq)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._render_lock = asyncio.Lock()
        self._tick_event = asyncio.Event()
        self._streamers_changed = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="sim-camera-render"
        )
        self._server = await asyncio.start_server(self._handle, self.host, self._port, limit=65536)
        self._port = self._server.sockets[0].getsockname()[1]
        self._producer = asyncio.create_task(
            self._produce(), name=f"camera-sim-producer:{self._port}"
        )
        self._listening = True

    async def stop(self) -> None:
        """Stop serving: closes the listener and every client, joins the render thread. Idempotent."""
        server, self._server = self._server, None
        self._listening = False
        self._stopping = True
        if server is not None:
            server.close()
        self._abort_clients()
        tasks = [t for t in (self._producer, *self._handlers) if t is not None]
        self._producer = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)  # at most one render (~ms) in flight

    async def __aenter__(self) -> CameraSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- faults
    def _fault(self, name: str) -> dict[str, Any] | None:
        return self.world.faults.active(name, device=DEVICE)

    def _on_fault(self, name: str, params: dict[str, Any]) -> None:
        """Faults listener (any thread): the edge of ``dropped-connection`` aborts every client."""
        if name != "dropped-connection" or params.get("device", DEVICE) != DEVICE:
            return
        loop = self._loop
        if loop is None or not self._listening:
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nothing to drop
            loop.call_soon_threadsafe(self._abort_clients)

    def _abort_clients(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    # ------------------------------------------------------------- rendering
    def _render_encode(self, previous_seq: int) -> SimFrame:
        """On the render thread: world -> scene -> JPEG."""
        inputs = SceneInputs.from_world(self.world)
        image, truth = self._renderer.render(inputs)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:  # pragma: no cover - cv2 encodes any uint8 BGR image
            raise RuntimeError("JPEG encoding failed")
        seq = previous_seq + 1
        truth["seq"] = seq
        return SimFrame(seq, inputs.sim_t, time.monotonic(), buf.tobytes(), truth, image)

    async def _new_frame(self) -> SimFrame:
        """A freshly rendered frame, or the current one while ``camera-freeze`` is active."""
        assert self._render_lock is not None
        async with self._render_lock:
            if self._current is not None and self._fault("camera-freeze") is not None:
                return self._current
            if self._executor is None:
                raise ConnectionError("camera simulator stopped")
            loop = asyncio.get_running_loop()
            frame = await loop.run_in_executor(self._executor, self._render_encode, self._seq)
            self._seq = frame.seq
            self._current = frame
            self._truths[frame.seq] = frame.truth
            while len(self._truths) > _TRUTH_HISTORY:
                self._truths.popitem(last=False)
            return frame

    async def _fresh_frame(self) -> SimFrame:
        """For ``/frame.jpg``: the current frame if younger than one frame period, else a new one."""
        cur = self._current
        if cur is not None and (
            time.monotonic() - cur.real_t < 1.0 / self.fps
            or self._fault("camera-freeze") is not None
        ):
            return cur
        return await self._new_frame()

    async def _produce(self) -> None:
        """Render at ``fps`` while at least one stream client is connected; wake the streams."""
        assert self._streamers_changed is not None
        period = 1.0 / self.fps
        next_t = time.monotonic()
        while True:
            if self._streamers == 0:
                self._streamers_changed.clear()
                await self._streamers_changed.wait()
                next_t = time.monotonic()
                continue
            try:
                await self._new_frame()
            except Exception as exc:  # a render failure must not kill the camera
                log.error("camera simulator: rendering failed: %s", exc)
            self._publish()
            next_t += period
            now = time.monotonic()
            if next_t < now:  # fell behind (slow machine): skip ticks rather than burst
                next_t = now
            await asyncio.sleep(next_t - now)

    def _publish(self) -> None:
        assert self._tick_event is not None
        self._tick += 1
        event, self._tick_event = self._tick_event, asyncio.Event()
        event.set()

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:
            writer.transport.abort()
            return
        self._handlers.add(task)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            await self._serve(reader, writer, client)
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str
    ) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        method = parts[0].upper() if parts else ""
        target = parts[1] if len(parts) > 1 else ""
        path = target.split("?", 1)[0]
        self.world.wire.record(DEVICE, {"method": method, "path": path, "client": client})
        await self._wait_while_no_reply()
        if method not in ("GET", "HEAD"):
            await self._simple(
                writer, "405 Method Not Allowed", b"only GET and HEAD\n", "Allow: GET, HEAD\r\n"
            )
        elif path == "/stream.mjpg":
            await self._stream(writer, head_only=method == "HEAD")
        elif path == "/frame.jpg":
            await self._single(writer, head_only=method == "HEAD")
        else:
            await self._simple(writer, "404 Not Found", f"no such path {path}\n".encode())

    async def _wait_while_no_reply(self) -> None:
        """``no-reply``: say nothing until the fault is cleared (the client may give up)."""
        # Faults notify injections only, not clearing: poll (20 ms).
        while self._fault("no-reply") is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def _simple(
        self, writer: asyncio.StreamWriter, status: str, body: bytes, extra: str = ""
    ) -> None:
        writer.write(
            (
                f"HTTP/1.0 {status}\r\nServer: labbridge-camera-sim\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
            ).encode()
            + body
        )
        await writer.drain()

    @staticmethod
    def _frame_headers(frame: SimFrame) -> str:
        return (
            f"Content-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n"
            f"X-Frame-Seq: {frame.seq}\r\nX-Sim-Time: {frame.sim_t:.3f}\r\n"
        )

    async def _single(self, writer: asyncio.StreamWriter, head_only: bool) -> None:
        frame = await self._fresh_frame()
        writer.write(
            (
                "HTTP/1.0 200 OK\r\nServer: labbridge-camera-sim\r\nCache-Control: no-cache, no-store\r\n"
                f"{self._frame_headers(frame)}Connection: close\r\n\r\n"
            ).encode()
        )
        if not head_only:
            writer.write(frame.jpeg)
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, head_only: bool) -> None:
        assert self._streamers_changed is not None
        writer.write(
            (
                "HTTP/1.0 200 OK\r\nServer: labbridge-camera-sim\r\n"
                f"Content-Type: multipart/x-mixed-replace; boundary={BOUNDARY}\r\n"
                "Cache-Control: no-cache, no-store\r\nPragma: no-cache\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        if head_only:
            return
        self._streamers += 1
        self._streamers_changed.set()
        try:
            last_tick = self._tick
            while True:
                if self._tick == last_tick:
                    assert self._tick_event is not None
                    await self._tick_event.wait()
                    continue
                await self._wait_while_no_reply()
                last_tick = self._tick
                frame = self._current
                if frame is None:
                    continue
                writer.write(
                    f"--{BOUNDARY}\r\n{self._frame_headers(frame)}\r\n".encode()
                    + frame.jpeg
                    + b"\r\n"
                )
                # A slow client makes this wait; meanwhile frames are skipped for it, as IP cameras do.
                await writer.drain()
        finally:
            self._streamers -= 1
