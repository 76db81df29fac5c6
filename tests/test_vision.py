"""Camera vision (instruments.vision) on simulator frames with known ground truth.

Frames come from ``simulators.scene.SceneRenderer`` (which returns the truth:
fill level, liquid transmission, boxes) and go through a real JPEG encode /
decode like the camera's, or through the MJPEG camera simulator and the real
camera transport. Calibrations are fitted from frames, never from the
renderer's constants.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

import instruments
from instruments.colour import delta_e2000, linear_to_lab
from instruments.vision import (
    Calibration,
    CalibrationError,
    ColourCorrection,
    FillCalibration,
    VisionError,
    analyse,
    decode_jpeg,
    fit_calibration,
    overlay,
    prepare_reference,
)
from simulators.camera import CameraSim
from simulators.clock import SimClock
from simulators.scene import SceneInputs, SceneRenderer
from simulators.world import ABSORBANCE, DYES, StationWorld

pytestmark = pytest.mark.timeout(60)

SIZES = [(640, 480), (1280, 720)]
FILL_TOL_ML = 0.05  # the goal is 5 % of the 3.0 mL vial (0.15 mL); we hold a third of it
DE_TOL = 2.0  # CIEDE2000, a good low-cost colorimeter


def jpeg(image: np.ndarray, quality: int = 85) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return decode_jpeg(buf.tobytes())


def dye_transmission(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Transmission (R, G, B) of a mix of the station's dyes (Beer-Lambert, as the world)."""
    absorb = [
        sum(ABSORBANCE[d][c] * f for d, f in zip(DYES, fractions, strict=True)) for c in range(3)
    ]
    r, g, b = (10.0 ** (-a) for a in absorb)
    return (r, g, b)


def lab_of(frame: np.ndarray, cal: Calibration) -> tuple[float, float, float]:
    a = analyse(frame, cal)
    assert a.lab is not None, (a.reasons, a.notes)
    return a.lab


@pytest.fixture(scope="module")
def renderers() -> dict[tuple[int, int, float], SceneRenderer]:
    out = {}
    for w, h in SIZES:
        for sigma in (1.0, 2.0, 4.0):
            out[(w, h, sigma)] = SceneRenderer(w, h, seed=int(sigma * 10) + w, noise_sigma=sigma)
    return out


def calibration_frames(renderer: SceneRenderer) -> list[tuple[np.ndarray, float]]:
    """An operator's calibration: empty vial, then known volumes, lighting drifting meanwhile."""
    volumes = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    gains = (0.78, 0.7, 0.9, 0.82, 0.75, 0.95, 0.8)
    trans = dye_transmission((0.5, 0.3, 0.2))
    return [
        (jpeg(renderer.render(SceneInputs(volume_ml=v, transmission=trans, lighting_gain=g))[0]), v)
        for v, g in zip(volumes, gains, strict=True)
    ]


@pytest.fixture(scope="module")
def calibrations(
    renderers: dict[tuple[int, int, float], SceneRenderer],
) -> dict[tuple[int, int], Calibration]:
    return {(w, h): fit_calibration(calibration_frames(renderers[(w, h, 2.0)])) for w, h in SIZES}


# ---------------------------------------------------------------- colour science
def test_a_white_balanced_white_is_lab_white() -> None:
    """The camera's Lab is instruments.colour's: a liquid as bright as the patch is L=100."""
    correction = ColourCorrection(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    lab = correction.lab((200.0, 180.0, 160.0), (200.0, 180.0, 160.0))
    assert lab == pytest.approx(linear_to_lab((1.0, 1.0, 1.0)), abs=1e-9)
    assert lab == pytest.approx((100.0, 0.0, 0.0), abs=1e-9)


# ------------------------------------------------------------ accuracy vs truth
@pytest.mark.parametrize("size", SIZES, ids=["640x480", "1280x720"])
def test_fill_colour_presence_across_lighting_drift_and_noise(
    size: tuple[int, int],
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    rng = np.random.default_rng(size[0])
    cal = calibrations[size]
    fill_err, px_err, de = [], [], []
    for i in range(24):
        sigma = (1.0, 2.0, 4.0)[i % 3]
        trans = dye_transmission(tuple(rng.dirichlet((1.0, 1.0, 1.0))))
        inputs = SceneInputs(
            volume_ml=float(rng.uniform(0.3, 3.0)),
            transmission=trans,
            lighting_gain=float(rng.uniform(0.6, 1.05)),
        )
        image, truth = renderers[(*size, sigma)].render(inputs)
        a = analyse(jpeg(image), cal)
        assert a.status == "ok", (inputs, a.reasons)
        assert a.vial_present and a.reasons == ()
        assert a.fill_ml is not None and a.fill_px is not None and a.lab is not None
        assert a.confidence.fill > 0.5 and a.confidence.colour > 0.5 and a.confidence.vial > 0.5
        fill_err.append(abs(a.fill_ml - truth["fill_ml"]))
        px_err.append(abs(a.fill_px - truth["fill_px"]))
        de.append(delta_e2000(a.lab, linear_to_lab(truth["transmission"])))
        # the measured region is liquid: inside the vial, under the surface
        x, y, w, h = a.liquid_box  # type: ignore[misc]
        ix, iy, iw, ih = truth["vial_inner_box"]
        assert (
            ix <= x
            and x + w <= ix + iw
            and truth["fill_y"] < y
            and y + h <= truth["inner_bottom_y"]
        )
    assert max(fill_err) < FILL_TOL_ML, fill_err
    assert max(px_err) < 2.0 * (size[1] / 480), px_err
    assert max(de) < DE_TOL, de


def test_calibration_from_640x480_serves_1280x720(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    cal = calibrations[(640, 480)]
    for volume in (0.4, 1.3, 2.2, 2.9):
        image, truth = renderers[(1280, 720, 2.0)].render(SceneInputs(volume_ml=volume))
        a = analyse(jpeg(image), cal)
        assert a.fill_ml == pytest.approx(volume, abs=FILL_TOL_ML)
        assert a.fill_px == pytest.approx(truth["fill_px"], abs=3.0)


def test_fill_calibration_residuals_and_inner_bottom(
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    for size, cal in calibrations.items():
        fill = cal.fill
        assert fill.degree == 1 and len(fill.residuals_ml) == 7
        assert fill.max_abs_ml < 0.02 and fill.rms_ml <= fill.max_abs_ml
        assert fill.volume_ml(fill.zero_height) == pytest.approx(0.0, abs=1e-9)
        assert fill.zero_height > 0  # the glass bottom has a thickness
        assert cal.geometry is not None and 0.5 < cal.geometry.vial_height < 0.9, size


def test_empty_vial_and_too_little_liquid(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    r, cal = renderers[(640, 480, 2.0)], calibrations[(640, 480)]
    empty = analyse(jpeg(r.render(SceneInputs(volume_ml=0.0))[0]), cal)
    assert empty.status == "ok" and empty.vial_present
    assert empty.fill_ml == pytest.approx(0.0, abs=FILL_TOL_ML)
    assert empty.lab is None and any("too little liquid" in n for n in empty.notes)
    drop = analyse(
        jpeg(r.render(SceneInputs(volume_ml=0.06, transmission=(0.9, 0.2, 0.2)))[0]), cal
    )
    assert drop.fill_ml == pytest.approx(0.06, abs=FILL_TOL_ML) and drop.lab is None


# ------------------------------------------------------- cannot verify, not a guess
def test_missing_vial_is_cannot_verify(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    for w, h in SIZES:
        image, _ = renderers[(w, h, 2.0)].render(SceneInputs(vial_present=False, lighting_gain=0.9))
        a = analyse(jpeg(image), calibrations[(w, h)])
        assert a.status == "cannot_verify" and not a.ok
        assert not a.vial_present and a.vial is None
        assert a.fill_ml is None and a.fill_px is None and a.lab is None
        assert a.confidence.fill == 0.0 and a.confidence.colour == 0.0
        assert any("no vial found" in r for r in a.reasons)
        assert a.patch is not None  # the rest of the scene is still seen
        json.dumps(a.as_dict())


def test_missing_or_overexposed_patch_is_cannot_verify(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    r, cal = renderers[(640, 480, 2.0)], calibrations[(640, 480)]
    image, truth = r.render(SceneInputs(volume_ml=1.5, transmission=(0.8, 0.4, 0.3)))
    x, y, w, h = truth["patch_box"]
    covered = image.copy()
    covered[y - 2 : y + h + 2, x - 2 : x + w + 2] = round(truth["background_bgr"][0])
    a = analyse(jpeg(covered), cal)
    assert a.status == "cannot_verify" and a.patch is None and a.lab is None
    assert any("no reference patch" in reason for reason in a.reasons)
    assert a.fill_ml == pytest.approx(1.5, abs=FILL_TOL_ML)  # fill needs no patch: still reported

    bright, _ = r.render(
        SceneInputs(volume_ml=1.5, transmission=(0.8, 0.4, 0.3), lighting_gain=1.2)
    )
    a = analyse(jpeg(bright), cal)
    assert a.status == "cannot_verify" and a.lab is None
    assert a.patch is not None and a.patch.saturated and a.confidence.colour == 0.0
    assert any("over-exposed" in reason for reason in a.reasons)


def test_without_calibration_fill_is_not_converted(
    renderers: dict[tuple[int, int, float], SceneRenderer],
) -> None:
    image, truth = renderers[(640, 480, 2.0)].render(
        SceneInputs(volume_ml=2.0, transmission=(0.3, 0.6, 0.9))
    )
    a = analyse(jpeg(image))
    assert a.status == "cannot_verify" and a.fill_ml is None and a.fill_px is None
    assert any("no calibration" in r for r in a.reasons)
    assert a.surface_y == pytest.approx(truth["fill_y"], abs=1.5)  # measured, not converted
    assert a.lab is not None and delta_e2000(a.lab, linear_to_lab(truth["transmission"])) < DE_TOL


# ------------------------------------------------------------------- scene change
def test_frozen_camera(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    r, cal = renderers[(640, 480, 2.0)], calibrations[(640, 480)]
    raw, _ = r.render(SceneInputs(volume_ml=1.0, transmission=(0.9, 0.3, 0.3)))
    frame = jpeg(raw)
    ref = prepare_reference(frame)
    a = analyse(frame.copy(), cal, ref)
    assert a.change is not None and a.change.identical and a.change.frozen
    assert a.status == "cannot_verify" and "bit-identical" in a.reasons[0]
    stamped = frame.copy()  # a stuck camera that still burns in a time stamp
    cv2.putText(stamped, "12:00:01", (500, 470), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    a = analyse(stamped, cal, frame)  # a plain array as reference works too
    assert a.change is not None and a.change.frozen and not a.change.identical
    assert a.status == "cannot_verify"
    brighter = cv2.add(raw, np.full_like(raw, 3))  # same exposure, re-processed: same noise
    a = analyse(brighter, cal, raw)
    assert a.change is not None and a.change.frozen and a.change.noise_correlation is not None
    assert a.change.noise_correlation > 0.9
    live, _ = r.render(SceneInputs(volume_ml=1.0, transmission=(0.9, 0.3, 0.3)))
    a = analyse(jpeg(live), cal, ref)
    assert a.status == "ok" and a.change is not None
    assert not a.change.frozen and not a.change.changed and a.change.summary == ()
    live_raw = analyse(live, cal, raw)
    assert live_raw.change is not None and not live_raw.change.frozen
    assert (
        live_raw.change.noise_correlation is not None
        and abs(live_raw.change.noise_correlation) < 0.2
    )


def test_lighting_drift_and_new_fill_are_not_scene_changes(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    for w, h in SIZES:
        r = renderers[(w, h, 2.0)]
        ref = prepare_reference(jpeg(r.render(SceneInputs(volume_ml=0.0, lighting_gain=0.7))[0]))
        after = r.render(
            SceneInputs(volume_ml=2.5, transmission=(0.2, 0.3, 0.9), lighting_gain=1.0)
        )[0]
        a = analyse(jpeg(after), calibrations[(w, h)], ref)
        assert a.status == "ok" and a.change is not None
        assert not a.change.changed and a.change.regions == () and not a.change.camera_moved
        assert math.hypot(*a.change.shift_px) < 1.0


def test_spill_detected_beside_the_vial(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    for w, h in SIZES:
        r = renderers[(w, h, 2.0)]
        trans = (0.9, 0.25, 0.3)
        ref = prepare_reference(jpeg(r.render(SceneInputs(volume_ml=2.0, transmission=trans))[0]))
        image, truth = r.render(
            SceneInputs(volume_ml=3.0, transmission=trans, spilled_ml=0.3, lighting_gain=0.9)
        )
        a = analyse(jpeg(image), calibrations[(w, h)], ref)
        assert a.change is not None and a.change.spill and a.change.changed
        spill = a.change.regions[0]
        assert spill.kind == "spill" and spill.mean_change < 0
        assert _overlap(spill.box, truth["spill_box"]) > 0.5
        assert any("spill" in n for n in a.notes)
        assert a.status == "ok"  # a spill is reported, the measurements still stand


def test_object_in_scene_detected(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    r = renderers[(1280, 720, 2.0)]
    ref = prepare_reference(jpeg(r.render(SceneInputs(volume_ml=1.0))[0]))
    image = r.render(SceneInputs(volume_ml=1.0))[0].copy()
    tool = (1000, 120, 90, 200)  # a red-ish tool laid in the scene, as bright as the bench
    cv2.rectangle(image, tool[:2], (tool[0] + tool[2], tool[1] + tool[3]), (40, 60, 190), -1)
    a = analyse(jpeg(image), calibrations[(1280, 720)], ref)
    assert a.change is not None and a.change.changed and not a.change.spill
    assert [reg.kind for reg in a.change.regions] == ["object"]
    assert _overlap(a.change.regions[0].box, tool) > 0.8
    assert a.change.changed_fraction == pytest.approx(90 * 200 / (1280 * 720), rel=0.3)


def test_camera_moved_and_vial_moved(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    r, cal = renderers[(640, 480, 2.0)], calibrations[(640, 480)]
    base = SceneInputs(volume_ml=1.5, transmission=(0.5, 0.8, 0.3))
    ref = prepare_reference(jpeg(r.render(base)[0]))
    image, truth = r.render(base)
    shifted = cv2.warpAffine(
        image,
        np.array([[1, 0, 15], [0, 1, -9]], dtype=np.float32),
        (640, 480),
        borderMode=cv2.BORDER_REPLICATE,
    )
    a = analyse(jpeg(shifted), cal, ref)
    assert a.change is not None and a.change.camera_moved and not a.change.vial_moved
    assert a.change.patch_shift_px == pytest.approx((15, -9), abs=1.5)
    assert a.change.shift_px == pytest.approx((15, -9), abs=1.5)
    assert a.fill_ml == pytest.approx(1.5, abs=FILL_TOL_ML)  # the vial is found where it now is
    assert any("moved since calibration" in n for n in a.notes)  # also without a reference
    assert any("moved since calibration" in n for n in analyse(jpeg(shifted), cal).notes)

    # Only the vial moves (someone put it back 20 px to the right).
    x, y, w, h = truth["vial_box"]
    moved = image.copy()
    bench = image[:, 150 : 150 + w + 40].copy()  # empty bench columns, same rows
    moved[:, x - 10 : x + w + 30] = bench
    moved[y - 4 :, x + 20 : x + 20 + w] = image[y - 4 :, x : x + w]
    a = analyse(jpeg(moved), cal, ref)
    assert a.change is not None and a.change.vial_moved and not a.change.camera_moved
    assert a.change.vial_shift_px == pytest.approx((20, 0), abs=1.5)
    assert a.change.patch_shift_px == pytest.approx((0, 0), abs=1.0)


def test_vial_disappeared_versus_reference(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    r = renderers[(640, 480, 2.0)]
    ref = prepare_reference(jpeg(r.render(SceneInputs(volume_ml=1.0))[0]))
    a = analyse(jpeg(r.render(SceneInputs(vial_present=False))[0]), calibrations[(640, 480)], ref)
    assert a.change is not None and a.change.vial_disappeared and not a.change.vial_appeared
    assert a.status == "cannot_verify"


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection over the smaller box's area."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / min(a[2] * a[3], b[2] * b[3])


# ------------------------------------------------------- real JPEG over MJPEG/HTTP
@pytest.fixture
def world() -> Iterator[StationWorld]:
    yield StationWorld(clock=SimClock(50.0), seed=5)


async def test_mjpeg_frames_through_the_camera_transport(
    world: StationWorld, calibrations: dict[tuple[int, int], Calibration]
) -> None:
    with world.lock:
        world.vial.species_ml.update(red=0.9, green=0.3, blue=0.6)
    cal = calibrations[(640, 480)]
    sim = CameraSim(world, fps=30, seed=7)
    await sim.start()
    try:
        async with instruments.connect("camera", sim.url, timeout=3.0) as cam:
            for _ in range(3):
                frame = await cam.capture()
                assert frame.encoded is not None  # the JPEG exactly as received
                truth = sim.truth(int(frame.meta["x-frame-seq"]))
                assert truth is not None
                a = analyse(decode_jpeg(frame.encoded), cal)
                assert np.array_equal(decode_jpeg(frame.encoded), frame.image)
                assert a.status == "ok", a.reasons
                assert a.fill_ml == pytest.approx(truth["fill_ml"], abs=FILL_TOL_ML)
                assert a.lab is not None
                assert delta_e2000(a.lab, linear_to_lab(truth["transmission"])) < DE_TOL

            world.faults.inject("camera-freeze")
            await cam.capture()  # the frame it froze on may be new to us
            first = await cam.capture()
            second = await cam.capture()
            assert second.seq > first.seq  # new deliveries of the same picture
            a = analyse(decode_jpeg(second.encoded or b""), cal, decode_jpeg(first.encoded or b""))
            assert a.status == "cannot_verify" and a.change is not None and a.change.frozen
            assert any("frozen camera" in r for r in a.reasons)
            world.faults.clear("camera-freeze")

            world.faults.inject("vial-missing")
            await cam.capture()
            gone = await cam.capture()
            a = analyse(decode_jpeg(gone.encoded or b""), cal)
            assert a.status == "cannot_verify" and not a.vial_present
            world.faults.clear("vial-missing")
    finally:
        await sim.stop()


# ------------------------------------------------------------------ calibration
def test_calibration_round_trip_json_and_yaml(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    cal = calibrations[(640, 480)]
    as_json = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    as_yaml = Calibration.from_dict(yaml.safe_load(yaml.safe_dump(cal.to_dict())))
    assert as_json == cal and as_yaml == cal
    image = jpeg(renderers[(640, 480, 2.0)].render(SceneInputs(volume_ml=1.7))[0])
    assert analyse(image, as_yaml).as_dict() == analyse(image, cal).as_dict()


def test_calibration_load_errors_name_the_field(
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    good = calibrations[(640, 480)].to_dict()
    with pytest.raises(CalibrationError, match="format"):
        Calibration.from_dict({**good, "format": "something/9"})
    with pytest.raises(CalibrationError, match="'fill'"):
        Calibration.from_dict({k: v for k, v in good.items() if k != "fill"})
    with pytest.raises(CalibrationError, match="fill.coefficients"):
        Calibration.from_dict({**good, "fill": {**good["fill"], "coefficients": ["a", 1]}})
    with pytest.raises(CalibrationError, match="increase"):
        Calibration.from_dict({**good, "fill": {**good["fill"], "coefficients": [1.0, -3.0]}})
    with pytest.raises(CalibrationError, match="3x3"):
        Calibration.from_dict({**good, "colour": {**good["colour"], "matrix": [[1, 0], [0, 1]]}})
    with pytest.raises(CalibrationError, match="response"):
        Calibration.from_dict({**good, "colour": {**good["colour"], "response": "gamma"}})
    with pytest.raises(CalibrationError, match="min_liquid_ml"):
        Calibration.from_dict({**good, "min_liquid_ml": -1})


def test_fit_calibration_errors(
    renderers: dict[tuple[int, int, float], SceneRenderer],
) -> None:
    r = renderers[(640, 480, 2.0)]
    no_vial = jpeg(r.render(SceneInputs(vial_present=False))[0])
    frames = calibration_frames(r)
    with pytest.raises(
        CalibrationError, match=r"too few usable.*2 of 4 usable.*frame 1 \(1.0 mL\): no vial found"
    ):
        fit_calibration([frames[0], (no_vial, 1.0), frames[4], (no_vial, 2.0)])
    swapped = [(frames[i][0], frames[6 - i][1]) if i in (1, 5) else frames[i] for i in range(7)]
    with pytest.raises(CalibrationError, match="bad fill calibration fit: frame"):
        fit_calibration(swapped)
    with pytest.raises(CalibrationError, match="needs .* samples, got none"):
        fit_calibration([])
    with pytest.raises(CalibrationError, match="volume"):
        fit_calibration([(frames[0][0], -1.0)])
    with pytest.raises(CalibrationError, match="4 of 4 usable, need at least 5 for degree 3"):
        fit_calibration(frames[:4], degree=3)
    with pytest.raises(CalibrationError, match="different volumes"):
        FillCalibration.fit([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    quadratic = fit_calibration(frames, degree=2)
    assert quadratic.fill.degree == 2 and quadratic.fill.max_abs_ml < 0.02


def _crosstalk(image: np.ndarray) -> np.ndarray:
    """A camera whose colour channels leak into each other (white stays white)."""
    m_rgb = np.array([[0.80, 0.15, 0.05], [0.12, 0.76, 0.12], [0.04, 0.16, 0.80]])
    m_bgr = m_rgb[::-1, ::-1]
    out = image.reshape(-1, 3).astype(np.float32) @ m_bgr.T.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8).reshape(image.shape)


def test_colour_correction_fitted_from_known_colours(
    renderers: dict[tuple[int, int, float], SceneRenderer],
) -> None:
    r = renderers[(640, 480, 2.0)]
    fills = [
        (jpeg(_crosstalk(f)), v)
        for f, v in ((r.render(SceneInputs(volume_ml=v))[0], v) for v in (0, 1, 2, 3))
    ]
    rng = np.random.default_rng(3)
    mixes = [dye_transmission(tuple(rng.dirichlet((0.7, 0.7, 0.7)))) for _ in range(14)]
    frames = [
        (
            jpeg(
                _crosstalk(
                    r.render(SceneInputs(volume_ml=2.0, transmission=t, lighting_gain=0.85))[0]
                )
            ),
            t,
        )
        for t in mixes
    ]
    known = [(f, linear_to_lab(t)) for f, t in frames[:8]]
    plain = fit_calibration(fills)
    corrected = fit_calibration(fills, colour_samples=known, colour_model="matrix")
    assert corrected.colour.model == "matrix" and len(corrected.colour.residuals) == 8
    assert max(corrected.colour.residuals) < 2.0
    before = [delta_e2000(lab_of(f, plain), linear_to_lab(t)) for f, t in frames[8:]]
    after = [delta_e2000(lab_of(f, corrected), linear_to_lab(t)) for f, t in frames[8:]]
    assert np.median(before) > 3.0  # the cross-talk is visible without correction
    assert max(after) < DE_TOL
    with pytest.raises(CalibrationError, match="at least 4 colour samples"):
        fit_calibration(fills, colour_samples=known[:3], colour_model="matrix")
    gains = fit_calibration(fills, colour_samples=known, colour_model="gains")
    assert gains.colour.model == "gains"
    m = np.asarray(gains.colour.matrix)
    assert np.count_nonzero(m - np.diag(np.diag(m))) == 0


def test_srgb_response_camera(renderers: dict[tuple[int, int, float], SceneRenderer]) -> None:
    """A gamma-encoding (sRGB) camera: response='srgb' undoes the curve before white balance."""

    def encode(image: np.ndarray) -> np.ndarray:
        lin = image.astype(np.float64) / 255.0
        enc = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
        return np.clip(enc * 255.0 + 0.5, 0, 255).astype(np.uint8)

    r = renderers[(640, 480, 1.0)]
    fills = [(jpeg(encode(r.render(SceneInputs(volume_ml=v))[0])), v) for v in (0, 1, 2, 3)]
    cal = fit_calibration(fills, response="srgb")
    trans = dye_transmission((0.2, 0.5, 0.3))
    image, truth = r.render(SceneInputs(volume_ml=1.8, transmission=trans, lighting_gain=0.7))
    a = analyse(jpeg(encode(image)), cal)
    assert a.fill_ml == pytest.approx(1.8, abs=FILL_TOL_ML)
    assert a.lab is not None and delta_e2000(a.lab, linear_to_lab(trans)) < DE_TOL
    as_linear = analyse(jpeg(encode(image)), Calibration(cal.fill))
    assert as_linear.lab is not None and delta_e2000(as_linear.lab, linear_to_lab(trans)) > 5


# -------------------------------------------------------------- garbage in
@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (None, "NumPy BGR image"),
        ([[1, 2, 3]], "NumPy BGR image"),
        (np.zeros((480, 640, 3), np.float32), "uint8"),
        (np.zeros((480, 640), np.uint8), r"shape \(height, width, 3\)"),
        (np.zeros((480, 640, 4), np.uint8), r"got shape \(480, 640, 4\)"),
        (np.zeros((0, 0, 3), np.uint8), "too small"),
        (np.zeros((20, 30, 3), np.uint8), "30x20: too small"),
    ],
)
def test_garbage_frames_raise_clear_errors(frame: Any, match: str) -> None:
    with pytest.raises(VisionError, match=match):
        analyse(frame)
    with pytest.raises(VisionError, match=match):
        prepare_reference(frame)


def test_garbage_jpeg_raises_clear_errors() -> None:
    good = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))[1].tobytes()
    assert decode_jpeg(good).shape == (48, 64, 3)
    assert decode_jpeg(bytearray(good)).shape == (48, 64, 3)
    with pytest.raises(VisionError, match="empty"):
        decode_jpeg(b"")
    with pytest.raises(VisionError, match="not a JPEG"):
        decode_jpeg(b"GIF89a....")
    with pytest.raises(VisionError, match="truncated"):
        decode_jpeg(good[: len(good) // 2])
    with pytest.raises(VisionError, match="could not be decoded"):
        decode_jpeg(b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9")
    with pytest.raises(VisionError, match="needs bytes"):
        decode_jpeg("not bytes")  # type: ignore[arg-type]
    assert isinstance(VisionError("x"), instruments.InstrumentError)


def test_reference_of_another_size_is_refused(
    renderers: dict[tuple[int, int, float], SceneRenderer],
) -> None:
    small = renderers[(640, 480, 2.0)].render(SceneInputs())[0]
    large = renderers[(1280, 720, 2.0)].render(SceneInputs())[0]
    with pytest.raises(VisionError, match="same size"):
        analyse(large, None, small)


def test_colour_correction_validation() -> None:
    with pytest.raises(CalibrationError, match="singular"):
        ColourCorrection(((1, 0, 0), (1, 0, 0), (0, 0, 1)))
    with pytest.raises(CalibrationError, match="at least 2"):
        ColourCorrection.fit([(0.5, 0.5, 0.5)], [(50, 0, 0)])
    with pytest.raises(CalibrationError, match="independent colours"):
        ColourCorrection.fit([(0.5, 0.5, 0.5)] * 5, [(50, 0, 0)] * 5, model="matrix")


# ------------------------------------------------------------ overlay, as_dict
def test_overlay_and_as_dict(
    renderers: dict[tuple[int, int, float], SceneRenderer],
    calibrations: dict[tuple[int, int], Calibration],
) -> None:
    r, cal = renderers[(640, 480, 2.0)], calibrations[(640, 480)]
    ref = jpeg(r.render(SceneInputs(volume_ml=1.0, transmission=(0.9, 0.3, 0.3)))[0])
    frame = jpeg(
        r.render(SceneInputs(volume_ml=2.0, transmission=(0.9, 0.3, 0.3), spilled_ml=0.3))[0]
    )
    before = frame.copy()
    a = analyse(frame, cal, ref)
    drawn = overlay(frame, a)
    assert np.array_equal(frame, before)  # the input is not drawn on
    assert drawn.shape == frame.shape and drawn.dtype == np.uint8
    changed = np.any(drawn != frame, axis=2)
    assert a.surface_y is not None and changed[int(round(a.surface_y))].sum() > 50  # the level line
    assert a.change is not None and a.change.regions
    x, y, w, h = a.change.regions[0].box
    assert changed[y, x : x + w].sum() > 0.8 * w  # the spill's box
    d = json.loads(json.dumps(a.as_dict()))
    assert d["status"] == "ok" and d["fill_ml"] == pytest.approx(2.0, abs=FILL_TOL_ML)
    assert d["change"]["spill"] is True and d["confidence"]["fill"] > 0.5
    empty_scene = jpeg(r.render(SceneInputs(vial_present=False))[0])
    missing = analyse(empty_scene, cal)
    marked = overlay(empty_scene, missing)  # the status line says why
    assert missing.status == "cannot_verify" and np.any(marked[-40:] != empty_scene[-40:])
