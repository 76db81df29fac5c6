"""Camera: scene renderer, MJPEG camera simulator and CameraTransport over real loopback HTTP.

Real sockets, real JPEG (cv2), real OpenCV VideoCapture for files and the
FFmpeg backend. No camera device exists on CI machines, so ``camera://INDEX``
is only tested for its open error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from instruments.errors import InvalidURLError, LinkLostError, TransportOpenError, TransportTimeout
from instruments.transports import transport_for
from instruments.transports.camera import CameraTransport, EndOfStreamError, parse_camera_url
from simulators.camera import BOUNDARY, CameraSim
from simulators.clock import SimClock
from simulators.scene import SceneInputs, SceneRenderer
from simulators.world import StationWorld

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def world() -> StationWorld:
    return StationWorld(clock=SimClock(50.0), seed=1)


@pytest.fixture
async def sim(world: StationWorld) -> Any:
    camera = CameraSim(world, fps=30)
    await camera.start()
    yield camera
    await camera.stop()


def set_vial(world: StationWorld, **species_ml: float) -> None:
    with world.lock:
        for name in world.vial.species_ml:
            world.vial.species_ml[name] = species_ml.get(name, 0.0)


def box_pixels(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return image[y : y + h, x : x + w].reshape(-1, 3).astype(np.float64)


def surface_row(image: np.ndarray, truth: dict[str, Any]) -> int:
    """The liquid surface found from pixels: first row (top down) in the vial's centre columns unlike air."""
    x, y, w, h = truth["vial_inner_box"]
    xc = x + w // 2
    y, h = y + 15, h - 15  # below the rim
    profile = image[y : y + h, xc - 4 : xc + 4].astype(np.float64).mean(axis=1)  # (rows, 3)
    air = profile[:10].mean(axis=0)
    differs = np.abs(profile - air).max(axis=1) > 25
    rows = np.nonzero(differs)[0]
    assert rows.size, "no liquid found"
    return int(y + rows[0])


async def http_get(
    port: int, path: str, *, read_body: bool = True
) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
        status, *lines = head.strip().split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)
        }
        body = b""
        if read_body and "content-length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
        return status, headers, body
    finally:
        writer.close()
        await writer.wait_closed()


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lb-camera")]


# ------------------------------------------------------------------- scene
def test_scene_fill_level_follows_volume_and_matches_pixels() -> None:
    renderer = SceneRenderer(640, 480, seed=3)
    trans = (0.91, 0.05, 0.10)  # a red liquid
    previous_y = None
    for volume in (0.6, 1.5, 2.7):
        image, truth = renderer.render(
            SceneInputs(volume_ml=volume, transmission=trans, lighting_gain=0.85)
        )
        assert truth["vial_present"] and truth["liquid_visible"]
        assert truth["fill_ml"] == pytest.approx(volume)
        assert truth["fill_px"] == pytest.approx(volume * truth["px_per_ml"])
        assert truth["fill_y"] == pytest.approx(truth["inner_bottom_y"] - truth["fill_px"])
        # The pixels agree with the truth within a pixel (anti-aliased surface, meniscus band).
        assert abs(surface_row(image, truth) - truth["fill_y"]) <= 1.5
        if previous_y is not None:
            assert truth["fill_y"] < previous_y - 50  # more volume -> higher liquid line
        previous_y = truth["fill_y"]
    # Overfull: the image shows the capacity, the truth says so.
    _, truth = renderer.render(SceneInputs(volume_ml=5.0, transmission=trans))
    assert truth["fill_ml"] == 3.0


def test_scene_colour_follows_dye_and_lighting(world: StationWorld) -> None:
    renderer = SceneRenderer(640, 480, seed=4)
    results = {}
    for dye in ("red", "blue"):
        set_vial(world, **{dye: 2.0})
        image, truth = renderer.render(SceneInputs.from_world(world))
        liquid = box_pixels(image, truth["liquid_box"]).mean(axis=0)
        assert liquid == pytest.approx(truth["liquid_bgr"], abs=1.5)  # noise averages out
        assert truth["liquid_rgb"] == tuple(reversed(truth["liquid_bgr"]))
        patch = box_pixels(image, truth["patch_box"]).mean(axis=0)
        assert patch == pytest.approx(truth["patch_bgr"], abs=1.0)
        # White balance on the patch recovers the transmission.
        balanced = liquid / patch
        assert balanced[::-1] == pytest.approx(truth["transmission"], abs=0.02)
        results[dye] = liquid
    b, g, r = results["red"]
    assert r > 3 * b and r > 3 * g
    b, g, r = results["blue"]
    assert b > 3 * r
    # The enclosure LED raises the lighting gain and so every pixel.
    dark = renderer.render(SceneInputs.from_world(world))[1]["patch_bgr"][0]
    with world.lock:
        world.enclosure.light_on, world.enclosure.intensity = True, 1.0
    bright_image, bright = renderer.render(SceneInputs.from_world(world))
    assert bright["patch_bgr"][0] > dark + 40
    assert box_pixels(bright_image, bright["patch_box"]).mean() == pytest.approx(
        bright["patch_bgr"][0], abs=1.0
    )


def test_scene_vial_missing_and_spill(world: StationWorld) -> None:
    renderer = SceneRenderer(640, 480, seed=5)
    set_vial(world, green=1.5)
    world.faults.inject("vial-missing")
    image, truth = renderer.render(SceneInputs.from_world(world))
    assert truth["vial_present"] is False and truth["liquid_visible"] is False
    assert truth["fill_px"] == 0.0 and truth["liquid_bgr"] is None
    vial = box_pixels(image, truth["vial_box"])
    assert vial.mean(axis=0) == pytest.approx(truth["background_bgr"], abs=0.5)
    assert vial.std() < 3 * truth["noise_sigma"]  # only noise: no glass, no liquid
    world.faults.clear("vial-missing")
    image, truth = renderer.render(SceneInputs.from_world(world))
    assert box_pixels(image, truth["vial_box"]).std() > 20  # the vial is back
    assert truth["spill_visible"] is False and truth["spill_box"] is None

    with world.lock:
        world.vial.spilled_ml = 0.5
    image, truth = renderer.render(SceneInputs.from_world(world))
    assert truth["spill_visible"] and truth["spilled_ml"] == 0.5
    x, y, w, h = truth["spill_box"]
    centre = box_pixels(image, (x + w // 2 - 5, y + h // 2 - 2, 10, 4)).mean(axis=0)
    assert (centre < np.array(truth["background_bgr"]) * 0.75).all()  # a darker, wet puddle
    bigger = renderer.render(SceneInputs(spilled_ml=2.0))[1]["spill_box"]
    assert bigger[2] > w  # more spill, bigger puddle


def test_scene_sizes_and_noise() -> None:
    hd = SceneRenderer(1280, 720, seed=1)
    image, truth = hd.render(SceneInputs(volume_ml=1.0, transmission=(0.3, 0.6, 0.9)))
    assert image.shape == (720, 1280, 3) and image.dtype == np.uint8
    assert truth["px_per_ml"] == pytest.approx(150.0)
    assert abs(surface_row(image, truth) - truth["fill_y"]) <= 1.5
    a, _ = SceneRenderer(640, 480, seed=1).render(SceneInputs())
    renderer = SceneRenderer(640, 480, seed=1)
    b1, _ = renderer.render(SceneInputs())
    b2, _ = renderer.render(SceneInputs())
    assert np.array_equal(a, b1)  # seeded: reproducible
    assert not np.array_equal(b1, b2)  # sensor noise: consecutive frames differ
    noise = b1.astype(np.float64) - b2.astype(np.float64)
    assert noise[200:300, 450:550].std() == pytest.approx(2.0 * np.sqrt(2), rel=0.2)


# -------------------------------------------------------------- simulator
async def test_sim_frame_jpg_404_and_wire_log(sim: CameraSim, world: StationWorld) -> None:
    assert sim.url == f"http://127.0.0.1:{sim.port}/stream.mjpg"
    assert sim.frame_url == f"http://127.0.0.1:{sim.port}/frame.jpg"
    status, headers, body = await http_get(sim.port, "/frame.jpg")
    assert status.split()[1] == "200"
    assert headers["content-type"] == "image/jpeg"
    assert int(headers["content-length"]) == len(body) > 1000
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (480, 640, 3)
    truth = sim.truth(int(headers["x-frame-seq"]))
    assert truth is not None and truth["vial_present"]
    assert float(headers["x-sim-time"]) >= 0.0
    status, _, body = await http_get(sim.port, "/nope")
    assert status.split()[1] == "404"
    wire = world.wire.data("camera")
    assert [w["path"] for w in wire] == ["/frame.jpg", "/nope"]
    assert all(w["client"].startswith("127.0.0.1:") for w in wire)


async def test_sim_stream_is_multipart_mjpeg(sim: CameraSim) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
        assert head.startswith("HTTP/1.0 200")
        assert f"Content-Type: multipart/x-mixed-replace; boundary={BOUNDARY}\r\n" in head
        seqs = []
        for _ in range(3):
            delimiter = await asyncio.wait_for(reader.readline(), 5)
            assert delimiter == f"--{BOUNDARY}\r\n".encode()
            part = (await reader.readuntil(b"\r\n\r\n")).decode()
            fields = dict(line.split(": ", 1) for line in part.strip().split("\r\n"))
            assert fields["Content-Type"] == "image/jpeg"
            jpeg = await reader.readexactly(int(fields["Content-Length"]))
            assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
            assert await reader.readexactly(2) == b"\r\n"
            seqs.append(int(fields["X-Frame-Seq"]))
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
    finally:
        writer.close()
        await writer.wait_closed()


async def test_sim_renders_only_while_streaming(sim: CameraSim) -> None:
    await asyncio.sleep(0.2)
    assert sim.latest_seq == 0  # nobody watching: nothing rendered
    await http_get(sim.port, "/frame.jpg")
    await http_get(sim.port, "/frame.jpg")  # within one frame period: the cached frame
    assert sim.latest_seq == 1


# -------------------------------------------------------------- transport
async def test_transport_fresh_frames_latest_not_buffered(sim: CameraSim) -> None:
    cam = CameraTransport(sim.url + "?lb_timeout=2")
    try:
        await cam.open()
        assert cam.mode == "mjpeg"
        frames = [await cam.grab() for _ in range(5)]
        seqs = [f.seq for f in frames]
        server_seqs = [int(f.meta["x-frame-seq"]) for f in frames]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        assert server_seqs == sorted(server_seqs) and len(set(server_seqs)) == 5
        assert all(f.image.shape == (480, 640, 3) and f.image.dtype == np.uint8 for f in frames)
        assert all(f.repeats == 0 for f in frames)
        assert (
            frames[0].encoded is not None and frames[0].encoded[:2] == b"\xff\xd8"
        )  # the JPEG as sent
        # Stall the consumer; the stream keeps coming (and would pile up in buffers).
        await asyncio.sleep(0.8)
        fresh = await cam.grab()
        fresh_server = int(fresh.meta["x-frame-seq"])
        assert (
            fresh_server >= server_seqs[-1] + 15
        )  # ~24 frames later at 30 fps, not the next-in-buffer
        assert fresh_server >= sim.latest_seq - 2  # the newest (give or take one in flight)
        assert fresh.seq > seqs[-1] + 10  # the reader drained everything in between
        assert fresh.age_s < 0.2
        latest = await cam.latest()
        assert latest.seq >= fresh.seq
        # a frame already received when grab is called may show the scene before the last
        # change (a pump still running): grab waits for the next one
        await asyncio.sleep(0.2)
        buffered = await cam.latest()
        after = await cam.grab()
        assert after.seq > buffered.seq
        assert int(after.meta["x-frame-seq"]) > int(buffered.meta["x-frame-seq"])
    finally:
        await cam.close()


async def test_transport_camera_freeze_gives_identical_frames(
    sim: CameraSim, world: StationWorld
) -> None:
    cam = CameraTransport(sim.url + "?lb_timeout=2")
    try:
        await cam.grab()
        world.faults.inject("camera-freeze")
        frozen = [await cam.grab() for _ in range(4)][1:]
        assert len({f.meta["x-frame-seq"] for f in frozen}) == 1
        assert len({f.digest for f in frozen}) == 1
        assert all(f.repeats >= 1 for f in frozen[1:])
        assert np.array_equal(frozen[0].image, frozen[-1].image)
        assert frozen[-1].seq > frozen[0].seq  # new arrivals, same content
        world.faults.clear("camera-freeze")
        await cam.grab()
        thawed = await cam.grab()
        assert thawed.repeats == 0 and thawed.digest != frozen[-1].digest
    finally:
        await cam.close()


async def test_transport_vial_missing_and_fill_level_end_to_end(
    sim: CameraSim, world: StationWorld
) -> None:
    cam = CameraTransport(sim.url)
    try:
        rows = {}
        for volume in (0.8, 2.4):
            set_vial(world, blue=volume)
            await cam.grab()  # the frame in flight may predate the change
            frame = await cam.grab()
            truth = sim.truth(int(frame.meta["x-frame-seq"]))
            assert truth is not None and truth["fill_ml"] == pytest.approx(volume, abs=0.01)
            rows[volume] = surface_row(frame.image, truth)
            assert abs(rows[volume] - truth["fill_y"]) <= 2.0  # through JPEG, still within 2 px
        assert rows[2.4] < rows[0.8] - 100
        world.faults.inject("vial-missing")
        await cam.grab()
        frame = await cam.grab()
        truth = sim.truth(int(frame.meta["x-frame-seq"]))
        assert truth is not None and truth["vial_present"] is False
        vial = box_pixels(frame.image, truth["vial_box"])
        assert vial.mean(axis=0) == pytest.approx(truth["background_bgr"], abs=2.0)
        assert vial.std() < 6.0
    finally:
        await cam.close()


async def test_transport_dropped_connection_then_reconnects(
    sim: CameraSim, world: StationWorld
) -> None:
    cam = CameraTransport(sim.url + "?lb_timeout=2")
    try:
        before = await cam.grab()
        world.faults.inject("dropped-connection", device="camera")
        with pytest.raises(LinkLostError) as err:
            for _ in range(5):  # frames already received before the drop come first
                await cam.grab()
        assert sim.url in str(err.value)
        assert not cam.is_open
        after = await cam.grab()  # reconnect on demand
        assert after.seq > before.seq
        assert cam.is_open
        assert [w["path"] for w in world.wire.data("camera")] == ["/stream.mjpg", "/stream.mjpg"]
    finally:
        await cam.close()


async def test_transport_server_gone_names_url(world: StationWorld) -> None:
    camera = CameraSim(world, fps=30)
    await camera.start()
    url = camera.url + "?lb_timeout=1"
    cam = CameraTransport(url)
    try:
        await cam.grab()
        await camera.stop()
        with pytest.raises(LinkLostError) as lost:
            for _ in range(5):
                await cam.grab()
        assert url in str(lost.value)
        with pytest.raises(TransportOpenError) as refused:
            await cam.grab()
        assert url in str(refused.value) and "cannot connect" in str(refused.value)
        await camera.start()  # the camera comes back on the same port
        assert camera.url + "?lb_timeout=1" == url
        frame = await cam.grab()
        assert frame.image.shape == (480, 640, 3)
    finally:
        await cam.close()
        await camera.stop()


async def test_transport_no_reply_times_out_naming_url(sim: CameraSim, world: StationWorld) -> None:
    url = sim.url + "?lb_timeout=0.4"
    cam = CameraTransport(url)
    try:
        world.faults.inject("no-reply", device="camera")
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout) as err:
            await cam.open()
        assert url in str(err.value) and time.monotonic() - t0 < 2.0
        world.faults.clear("no-reply")
        await cam.grab()
        # Mid-stream: the camera goes quiet; grab times out, then recovers once it talks again.
        world.faults.inject("no-reply", device="camera")
        with pytest.raises(TransportTimeout) as err:
            for _ in range(5):
                await cam.grab(timeout=0.3)
        assert url in str(err.value)
        world.faults.clear("no-reply")
        frame = await cam.grab(timeout=2.0)
        assert frame.image.shape == (480, 640, 3)
    finally:
        world.faults.clear()
        await cam.close()


async def test_transport_snapshot_url_and_resize(sim: CameraSim) -> None:
    cam = CameraTransport(sim.frame_url + "?lb_width=320")
    try:
        await cam.open()
        assert cam.mode == "snapshot"
        a = await cam.grab()
        await asyncio.sleep(0.05)
        b = await cam.grab()
        assert a.image.shape == (240, 320, 3)  # one side given: aspect kept
        assert int(b.meta["x-frame-seq"]) > int(a.meta["x-frame-seq"])
        assert b.seq == a.seq + 1
    finally:
        await cam.close()


async def test_transport_http_errors(sim: CameraSim) -> None:
    bad = f"http://127.0.0.1:{sim.port}/nope.mjpg?lb_timeout=1"
    with pytest.raises(TransportOpenError) as err:
        await CameraTransport(bad).open()
    assert bad in str(err.value) and "404" in str(err.value)
    assert not reader_threads()


async def test_transport_ffmpeg_backend_reads_the_stream(sim: CameraSim) -> None:
    cam = CameraTransport(sim.url + "?lb_backend=ffmpeg&lb_timeout=3")
    try:
        await cam.open()
        assert cam.mode == "opencv" and cam.describe()["backend"] == "FFMPEG"
        a = await cam.grab()
        b = await cam.grab()
        assert b.seq > a.seq and a.image.shape == (480, 640, 3)
        assert a.digest != b.digest and b.meta == {} and b.encoded is None
    finally:
        await cam.close()
    assert not reader_threads()


# ------------------------------------------------------------------- files
def write_avi(path: Path, levels: list[int], size: tuple[int, int] = (160, 120)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for level in levels:
        writer.write(np.full((size[1], size[0], 3), level, np.uint8))
    writer.release()


async def test_file_source_in_order_end_and_loop(tmp_path: Path) -> None:
    path = tmp_path / "x.avi"
    write_avi(path, [20, 80, 140, 200])
    cam = CameraTransport(f"camera://{path}")
    try:
        peek = await cam.latest()  # the first frame, not consumed
        frames = [await cam.grab() for _ in range(4)]
        assert frames[0] is peek
        means = [f.image.mean() for f in frames]
        assert means == pytest.approx([20, 80, 140, 200], abs=3)
        assert [f.meta["frame_index"] for f in frames] == ["0", "1", "2", "3"]
        assert [f.seq for f in frames] == [1, 2, 3, 4]
        with pytest.raises(EndOfStreamError) as err:
            await cam.grab()
        assert str(path) in str(err.value)
        assert (await cam.latest()) is frames[-1]
    finally:
        await cam.close()

    looped = CameraTransport(f"camera://{path}?loop=true&width=80&height=60")
    try:
        frames = [await looped.grab() for _ in range(6)]
        assert [f.meta["frame_index"] for f in frames] == ["0", "1", "2", "3", "0", "1"]
        assert frames[4].image.shape == (60, 80, 3)
        assert frames[4].image.mean() == pytest.approx(20, abs=3)
    finally:
        await looped.close()


async def test_open_errors_name_the_url(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    for url in (f"camera://{tmp_path}/missing.avi", f"camera://{garbage}", "camera://9?timeout=1"):
        cam = CameraTransport(url)
        with pytest.raises(TransportOpenError) as err:
            await cam.open()
        assert url in str(err.value)
        assert not cam.is_open
        await cam.close()
    # Nothing listens on this port: refused.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    url = f"http://user:secret@127.0.0.1:{port}/stream.mjpg?lb_timeout=1"
    with pytest.raises(TransportOpenError) as err:
        await CameraTransport(url).open()
    assert f"http://user:***@127.0.0.1:{port}/stream.mjpg" in str(err.value)
    assert "secret" not in str(err.value)
    assert not reader_threads()


# -------------------------------------------------------------------- URLs
@pytest.mark.parametrize(
    "url",
    [
        "camera://",
        "camera://abc",
        "camera://-1",
        "camera://0?timeout=0",
        "camera://0?timeout=-1",
        "camera://0?width=wide",
        "camera://0?bogus=1",
        "camera://0?fourcc=MJPEG",
        "camera:///data/x.avi?fps=30",
        "camera:///data/x.avi?loop=maybe",
        "camera://0/data/x.avi",
        "http:///stream.mjpg",
        "http://cam:99999/stream.mjpg",
        "http://cam/stream.mjpg?lb_bogus=1",
        "http://cam/stream.mjpg?lb_timeout=soon",
        "http://cam/stream.mjpg?lb_backend=vlc",
        "http://cam/stream.mjpg?lb_timeout=1&lb_timeout=2",
        "rtsp://cam/stream1?lb_backend=mjpeg",
        "rtsp://cam/stream1?lb_fps=10",
        "ftp://cam/x",
    ],
)
def test_bad_urls_rejected(url: str) -> None:
    with pytest.raises(InvalidURLError):
        parse_camera_url(url)


def test_url_options_parsed_and_camera_query_kept() -> None:
    src = parse_camera_url("http://cam:8080/video?res=hd&lb_timeout=2.5&fps=5&lb_width=320&a=1&a=2")
    assert src.kind == "http" and src.timeout == 2.5 and src.width == 320
    assert src.target == "http://cam:8080/video?res=hd&fps=5&a=1&a=2"  # the camera's own, verbatim
    src = parse_camera_url("camera://2?width=1280&height=720&fps=30&fourcc=MJPG&timeout=3")
    assert (src.kind, src.target, src.width, src.height, src.fps, src.fourcc, src.timeout) == (
        "device",
        2,
        1280,
        720,
        30.0,
        "MJPG",
        3.0,
    )
    src = parse_camera_url("camera:///data/run%201.avi?loop=true")
    assert (src.kind, src.target, src.loop, src.timeout) == ("file", "/data/run 1.avi", True, 5.0)
    src = parse_camera_url("rtsp://admin:pw@cam:554/stream1?channel=1&lb_timeout=4")
    assert src.target == "rtsp://admin:pw@cam:554/stream1?channel=1" and src.timeout == 4.0
    assert src.display == "rtsp://admin:***@cam:554/stream1?channel=1&lb_timeout=4"
    assert isinstance(transport_for("http://cam/stream.mjpg"), CameraTransport)


# -------------------------------------------------------- a quirky server
async def test_mjpeg_reader_handles_chunked_quoted_boundary_no_length() -> None:
    """HTTP/1.1 chunked body, boundary declared quoted with a leading '--', parts without Content-Length."""
    jpegs = [
        cv2.imencode(".jpg", np.full((48, 64, 3), v, np.uint8))[1].tobytes() for v in (40, 120, 200)
    ]
    stop = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b'HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary="--quirk"\r\n'
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            i = 0
            while not stop.is_set():
                part = b"----quirk\r\nContent-Type: image/jpeg\r\n\r\n" + jpegs[i % 3] + b"\r\n"
                half = len(part) // 2
                for piece in (part[:half], part[half:]):  # a part split across chunks
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                await writer.drain()
                i += 1
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cam = CameraTransport(f"http://127.0.0.1:{port}/video?lb_timeout=2")
    try:
        levels = set()
        for _ in range(6):
            frame = await cam.grab()
            assert frame.image.shape == (48, 64, 3)
            levels.add(round(float(frame.image.mean()) / 40))
        assert levels == {1, 3, 5}
    finally:
        await cam.close()
        stop.set()
        server.close()
        await server.wait_closed()


async def test_close_idempotent_no_leaks(sim: CameraSim) -> None:
    never_opened = CameraTransport(sim.url)
    await never_opened.close()
    await never_opened.close()
    cam = CameraTransport(sim.url)
    await cam.grab()
    assert any(name.startswith("lb-camera-reader") for name in reader_threads())
    t0 = time.monotonic()
    await cam.close()
    await cam.close()
    assert time.monotonic() - t0 < 1.0  # the reader is interrupted, not waited out
    assert not cam.is_open and not reader_threads()
