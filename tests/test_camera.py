"""Camera driver: against the MJPEG camera simulator, a file, and a minimal MJPEG server from PROTOCOLS.md."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import instruments
from instruments.drivers.camera import Camera
from instruments.errors import TransportOpenError, TransportTimeout
from instruments.transports.base import Transport
from instruments.transports.camera import CameraTransport
from simulators.camera import CameraSim
from simulators.clock import SimClock
from simulators.world import StationWorld

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def world() -> StationWorld:
    return StationWorld(clock=SimClock(50.0), seed=2)


@pytest.fixture
async def sim(world: StationWorld) -> Any:
    camera = CameraSim(world, fps=30)
    await camera.start()
    yield camera
    await camera.stop()


class MinimalMjpegCamera:
    """An IP camera written from PROTOCOLS.md alone: ``GET /stream.mjpg`` gives
    ``multipart/x-mixed-replace`` with one ``image/jpeg`` part (Content-Length)
    per frame, here of a solid BGR colour. ``flicker`` alternates the blue
    value by one step so consecutive frames differ (as sensor noise makes them)."""

    def __init__(
        self, colour: tuple[int, int, int], *, flicker: bool = True, fps: float = 25.0
    ) -> None:
        self.colour = colour
        self.flicker = flicker
        self.fps = fps
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        b, g, r = colour
        self._jpegs = [
            cv2.imencode(
                ".jpg",
                np.full((120, 160, 3), (b + d, g, r), np.uint8),
                [cv2.IMWRITE_JPEG_QUALITY, 95],
            )[1].tobytes()
            for d in ((0, 8) if flicker else (0,))
        ]

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/stream.mjpg"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            request = (await reader.readuntil(b"\r\n\r\n")).decode()
            path = request.split()[1]
            self.requests.append(path)
            if path != "/stream.mjpg":
                writer.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n"
            )
            i = 0
            while True:
                jpeg = self._jpegs[i % len(self._jpegs)]
                writer.write(
                    b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                    + jpeg
                    + b"\r\n"
                )
                await writer.drain()
                i += 1
                await asyncio.sleep(1.0 / self.fps)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()


# ------------------------------------------------------------------- tests
async def test_connect_read_describe_safe_state(sim: CameraSim) -> None:
    async with instruments.connect("camera", sim.url, timeout=3.0) as cam:
        assert isinstance(cam, Camera)
        assert cam.describe()["resolution"] == [640, 480]  # known from open()
        reading = await cam.read()
        assert (reading["width"], reading["height"]) == (640, 480)
        assert reading["seq"] >= 1 and 0 <= reading["age_s"] < 0.5
        assert 40 < reading["brightness"] < 200
        for ch in ("mean_b", "mean_g", "mean_r"):
            assert 0 < reading[ch] < 255
        assert reading["frozen"] is False and reading["identical_frames"] == 0
        second = await cam.read()
        assert second["seq"] > reading["seq"]  # every read is a fresh frame
        desc = cam.describe()
        assert desc["kind"] == "camera" and desc["url"] == sim.url
        assert desc["source"]["mode"] == "mjpeg" and desc["source"]["frame_size"] == (640, 480)
        assert all(not ch["settable"] for ch in desc["channels"].values())
        assert all(not ch.settable for ch in cam.channels.values())
        await cam.safe_state()
        await cam.safe_state()  # idempotent, no actuator


async def test_camera_freeze_flagged_frozen(sim: CameraSim, world: StationWorld) -> None:
    async with instruments.connect("camera", sim.url, frozen_after=3) as cam:
        await cam.capture()
        world.faults.inject("camera-freeze")
        await cam.capture()  # the frame it froze on may be new to us
        flags = [(await cam.read())["frozen"] for _ in range(4)]
        assert flags[-1] is True and flags.count(True) >= 2
        world.faults.clear("camera-freeze")
        await cam.capture()
        reading = await cam.read()
        assert reading["frozen"] is False and reading["identical_frames"] == 0


async def test_capture_reconnects_after_dropped_connection(
    sim: CameraSim, world: StationWorld
) -> None:
    async with instruments.connect("camera", sim.url) as cam:
        first = await cam.capture()
        world.faults.inject("dropped-connection", device="camera")
        frames = [await cam.capture() for _ in range(5)]  # the driver reconnects once by itself
        assert [f.seq for f in frames] == sorted(f.seq for f in frames) and frames[
            0
        ].seq > first.seq
        assert [w["path"] for w in world.wire.data("camera")] == ["/stream.mjpg", "/stream.mjpg"]


async def test_camera_gone_raises_naming_url(world: StationWorld) -> None:
    camera = CameraSim(world, fps=30)
    await camera.start()
    url = camera.url + "?lb_timeout=1"
    try:
        async with instruments.connect("camera", url, timeout=1.0) as cam:
            await cam.capture()
            await camera.stop()
            with pytest.raises(TransportOpenError) as err:
                for _ in range(5):
                    await cam.capture()
            assert url in str(err.value)
            await cam.safe_state()  # still fine after the fault
    finally:
        await camera.stop()


async def test_open_fails_cleanly_when_camera_is_mute(sim: CameraSim, world: StationWorld) -> None:
    world.faults.inject("no-reply", device="camera")
    url = sim.url + "?lb_timeout=0.3"
    with pytest.raises(TransportTimeout) as err:
        async with instruments.connect("camera", url):
            pass
    assert url in str(err.value)
    world.faults.clear("no-reply")


async def test_minimal_spec_camera() -> None:
    """The driver follows PROTOCOLS.md, not our simulator's quirks."""
    server = MinimalMjpegCamera((30, 140, 220), flicker=True)
    await server.start()
    try:
        async with instruments.connect("camera", server.url, timeout=2.0) as cam:
            readings = [await cam.read() for _ in range(4)]
            for reading in readings:
                assert (reading["width"], reading["height"]) == (160, 120)
                assert reading["mean_g"] == pytest.approx(140, abs=3)
                assert reading["mean_r"] == pytest.approx(220, abs=3)
                assert reading["mean_b"] == pytest.approx(30, abs=3) or reading[
                    "mean_b"
                ] == pytest.approx(38, abs=3)
            assert readings[-1]["frozen"] is False
            assert cam.describe()["resolution"] == [160, 120]
        assert server.requests == ["/stream.mjpg"]
    finally:
        await server.stop()

    stuck = MinimalMjpegCamera((200, 200, 200), flicker=False)
    await stuck.start()
    try:
        async with instruments.connect("camera", stuck.url, frozen_after=3) as cam:
            flags = [(await cam.read())["frozen"] for _ in range(4)]
            assert flags == [False, False, False, True]  # 3 identical captures after the first
    finally:
        await stuck.stop()


async def test_file_source_through_driver(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 5, (64, 48))
    for level in (50, 150):
        writer.write(np.full((48, 64, 3), level, np.uint8))
    writer.release()
    async with instruments.connect("camera", f"camera://{path}") as cam:
        assert cam.resolution == (64, 48)
        first = await cam.capture()
        assert first.seq == 1 and first.meta["frame_index"] == "0"  # open() peeked, did not consume
        assert first.image.mean() == pytest.approx(50, abs=3)
        assert (await cam.read())["mean_g"] == pytest.approx(150, abs=3)


async def test_driver_argument_checks(sim: CameraSim) -> None:
    class NotACamera(Transport):
        async def _open(self) -> None: ...

        async def _close(self) -> None: ...

    with pytest.raises(TypeError, match="frame source"):
        Camera(NotACamera("serial:///dev/null"))
    with pytest.raises(ValueError):
        Camera(CameraTransport(sim.url), timeout=0)
    with pytest.raises(ValueError):
        Camera(CameraTransport(sim.url), frozen_after=0)
    cam = Camera(CameraTransport(sim.url))
    assert cam.describe()["resolution"] is None  # nothing seen yet
    await cam.close()
