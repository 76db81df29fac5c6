"""loops.verify on rendered frames with known truth, as real JPEG bytes: agreement verifies; a
pump that under-delivers, a colour the sensor does not see, a spill, a frozen camera and a
missing vial are each reported with what disagreed; the tolerances come from the lab config."""

from __future__ import annotations

import cv2
import pytest

from instruments.colour import linear_to_lab
from instruments.vision import Calibration, decode_jpeg, fit_calibration
from loops.verify import Tolerances, verify
from simulators.scene import SceneInputs, SceneRenderer

TRANS = (0.55, 0.35, 0.7)  # a purple liquid
RENDER = SceneRenderer(640, 480, seed=5, noise_sigma=2.0)


def jpeg(inputs: SceneInputs) -> bytes:
    image, _ = RENDER.render(inputs)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    samples = [
        (decode_jpeg(jpeg(SceneInputs(volume_ml=v, transmission=TRANS, lighting_gain=0.8))), v)
        for v in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    ]
    return fit_calibration(samples)


def measured(volume_ml: float, lab: tuple[float, float, float] | None = None) -> dict[str, object]:
    """What the instruments report: the pumps' volumes and the colour sensor's Lab."""
    return {
        "dispensed_ml": {"red": volume_ml * 0.6, "blue": volume_ml * 0.4},
        "lab": list(lab if lab is not None else linear_to_lab(TRANS)),
    }


REFERENCE = SceneInputs(volume_ml=0.0, transmission=TRANS, lighting_gain=0.8, sim_t=0.0)


def outcome(**changes: object) -> bytes:
    fields = {"volume_ml": 1.6, "transmission": TRANS, "lighting_gain": 0.82, "sim_t": 60.0}
    fields.update(changes)
    return jpeg(SceneInputs(**fields))  # type: ignore[arg-type]


def test_agreement_is_verified(calibration: Calibration) -> None:
    v = verify(outcome(), measured(1.6), calibration, Tolerances(), reference_jpeg=jpeg(REFERENCE))
    assert v.verified is True, v.reasons
    assert v.reasons == () and v.reason is None
    assert v.checks["fill"]["ok"] and abs(v.checks["fill"]["difference_ml"]) < 0.05
    assert v.checks["colour"]["ok"] and v.checks["colour"]["delta_e2000"] < 2.0
    assert v.checks["scene"] == {"summary": [], "ok": True}
    assert v.analysis is not None and v.analysis["status"] == "ok"


def test_a_pump_that_under_delivers_is_caught(calibration: Calibration) -> None:
    # the pumps say 1.6 mL went in; the camera sees 1.1 mL (a clogged pump)
    v = verify(outcome(volume_ml=1.1), measured(1.6), calibration, Tolerances())
    assert v.verified is False
    assert v.checks["fill"]["ok"] is False
    assert v.checks["fill"]["difference_ml"] == pytest.approx(-0.5, abs=0.05)
    assert len(v.reasons) == 1 and v.reasons[0].startswith("fill level: the camera sees 1.1")
    assert "the pumps report 1.60 mL" in v.reasons[0]
    # within a looser tolerance the same frame verifies: the lab config decides
    assert verify(
        outcome(volume_ml=1.1), measured(1.6), calibration, Tolerances(fill_ml=0.6)
    ).verified


def test_a_colour_the_sensor_does_not_see_is_caught(calibration: Calibration) -> None:
    wrong = (80.0, -30.0, 40.0)  # a green-yellow the liquid is not
    v = verify(outcome(), measured(1.6, wrong), calibration, Tolerances())
    assert v.verified is False and v.checks["colour"]["ok"] is False
    assert v.reasons[0].startswith("colour: camera and colour sensor differ by dE00")


def test_a_spill_is_reported_from_the_scene(calibration: Calibration) -> None:
    v = verify(
        outcome(spilled_ml=0.6),
        measured(1.6),
        calibration,
        Tolerances(),
        reference_jpeg=jpeg(REFERENCE),
    )
    assert v.verified is False
    assert any(r.startswith("scene: spill") for r in v.reasons), v.reasons


def test_a_frozen_camera_cannot_verify(calibration: Calibration) -> None:
    same = jpeg(REFERENCE)  # the camera sent the reference frame again after the experiment
    v = verify(same, measured(1.6), calibration, Tolerances(), reference_jpeg=same)
    assert v.verified is False
    assert any("cannot verify" in r and "frozen" in r for r in v.reasons), v.reasons


def test_a_missing_vial_cannot_verify(calibration: Calibration) -> None:
    v = verify(outcome(vial_present=False), measured(1.6), calibration, Tolerances())
    assert v.verified is False
    assert any("cannot verify" in r and "vial" in r for r in v.reasons), v.reasons
    assert "fill" not in v.checks  # nothing was guessed


def test_no_frame_or_a_broken_frame_cannot_verify(calibration: Calibration) -> None:
    assert verify(None, measured(1.0), calibration, Tolerances()).reasons == (
        "cannot verify: no camera frame of the outcome",
    )
    broken = verify(b"\xff\xd8garbage", measured(1.0), calibration, Tolerances())
    assert broken.verified is False and broken.reasons[0].startswith("cannot verify: ")


def test_tolerances_are_checked() -> None:
    with pytest.raises(ValueError, match="fill_ml must be a number > 0"):
        Tolerances(fill_ml=0)
    with pytest.raises(ValueError, match="max_disagreements must be an integer >= 1"):
        Tolerances(max_disagreements=0)
    assert Tolerances().as_dict() == {"fill_ml": 0.15, "colour_de2000": 8.0, "max_disagreements": 3}
