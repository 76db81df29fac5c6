"""``labbridge report`` (bridge/report.py) and the contact-sheet helpers of instruments/vision/ (_draw.py).

The campaigns are written through :class:`loops.journal.Journal` the way the
campaign runner writes them (propose -> checked -> queued -> running -> finish
/ fail / reject, evidence before the outcome), with camera frames rendered by
``simulators.scene.SceneRenderer``, JPEG-encoded and verified by the real
``loops.checks.run_checks`` (the colour match's declared checks) against a fitted calibration: the results, their
verification, the images by hash and the safety verdicts have exactly the
shape a real run stores. No Ray, no simulated bench: a campaign builds in
well under a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from bridge.export import CampaignDataError
from bridge.report import (
    CONTACT_SHEET,
    CONVERGENCE,
    PARAMETERS,
    report_command,
    select_tiles,
    write_report,
)
from bridge.reportcli import add_report_parser
from instruments.colour import delta_e2000, linear_to_lab
from instruments.vision import (
    Calibration,
    VisionError,
    analyse,
    analysis_from_dict,
    contact_sheet,
    decode_jpeg,
    encode_png,
    fit_calibration,
    overlay,
    prepare_reference,
)
from loops.checks import run_checks
from loops.journal import Experiment, Journal
from loops.program import builtin_program, load_program
from simulators.scene import SceneInputs, SceneRenderer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
TARGET = (47.4, 23.3, -19.2)
SHEET_BACKGROUND = (40, 40, 40)  # contact_sheet's default background
TILE_WIDTH = 400  # write_report's default tile width

# transmissions (R, G, B) of a few dye mixes: the liquid colours of the experiments
COLOURS = [
    (0.35, 0.12, 0.30),
    (0.20, 0.45, 0.25),
    (0.55, 0.20, 0.18),
    (0.25, 0.22, 0.50),
    (0.40, 0.30, 0.45),
    (0.30, 0.16, 0.36),
    (0.60, 0.50, 0.20),
]


def encode_jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


@dataclass
class Scenes:
    renderer: SceneRenderer
    calibration: Calibration
    reference: bytes  # the empty vial, before anything is poured


def make_scenes() -> Scenes:
    """A camera scene renderer, its fitted calibration and the empty-vial reference frame."""
    renderer = SceneRenderer(640, 480, seed=5, noise_sigma=1.5)
    frames = [
        (decode_jpeg(encode_jpeg(renderer.render(SceneInputs(volume_ml=v))[0])), v)
        for v in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    ]
    reference = encode_jpeg(renderer.render(SceneInputs(volume_ml=0.0))[0])
    return Scenes(renderer, fit_calibration(frames), reference)


@pytest.fixture(scope="module")
def scenes() -> Scenes:
    return make_scenes()


@dataclass
class Built:
    """A campaign written to a journal, and what a report or an export must show of it."""

    journal: Path
    campaign_id: str
    refusal_reasons: list[str] = field(default_factory=list)
    rejection_reasons: list[str] = field(default_factory=list)
    failure_reasons: list[str] = field(default_factory=list)
    unverified_reasons: list[str] = field(default_factory=list)
    stop_reason: str = ""
    with_images: list[str] = field(default_factory=list)  # experiment ids, seq order


def _store_image(folder: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"{digest}.jpg"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"sha256": digest, "path": str(path), "bytes": len(data)}


def _params(i: int) -> dict[str, Any]:
    r = 0.3 + 0.11 * (i % 7)
    g = 0.2 + 0.07 * (i % 5)
    b = 0.25 + 0.09 * (i % 6)
    return {
        "red_ml": round(r, 4),
        "green_ml": round(g, 4),
        "blue_ml": round(b, 4),
        "temperature_c": 30.0 + 3 * (i % 11),
        "hold_s": 60 + 17 * (i % 9),
    }


def _allowed(station: str, who: str, instrument: str, action: str, reason: str) -> dict[str, Any]:
    return {
        "allowed": True,
        "station": station,
        "command": {"instrument": instrument, "action": action, "params": {}, "who": who},
        "reason": reason,
        "rule": None,
        "values": {},
        "t": time.time(),
    }


def build_campaign(
    root: Path,
    scenes: Scenes,
    cid: str = "camp",
    *,
    done: int = 5,
    unverified: int = 2,
    failed: int = 1,
    rejected: int = 1,
    refusals: int = 2,
    unchecked: int = 0,
) -> Built:
    """A colour-match campaign in ``root/<cid>/journal.db`` with images in ``root/<cid>/images``.

    Experiments in seq order: ``rejected`` agent proposals (vial capacity), then
    ``done`` verified results, ``unchecked`` results of a station without
    verification (no analysis recorded), ``unverified`` results of a clogged
    red pump (the camera sees 60 % of what the pumps report) and ``failed``
    experiments (a colour-sensor timeout that tripped the station). The
    first verified experiment also has ``refusals`` refused guard verdicts.
    """
    folder = root / cid
    folder.mkdir(parents=True, exist_ok=True)
    images_dir = folder / "images"
    built = Built(folder / "journal.db", cid)
    program = load_program(EXAMPLE)
    j = Journal(built.journal)
    try:
        j.create_campaign(cid, program.name, program.to_markdown())
        seq = 0
        for _ in range(rejected):
            seq += 1
            params = {"red_ml": 1.3, "green_ml": 1.0, "blue_ml": 1.0 + 0.01 * seq}
            params.update(temperature_c=40.0, hold_s=60)
            eid = j.propose(cid, params, "agent:alice")
            refusal = (
                f"step 3: vial-capacity: rule vial-capacity: red.volume=1.3, "
                f"green.volume=1.0, blue.volume={params['blue_ml']}"
            )
            j.reject(eid, [refusal])
            built.rejection_reasons.append(refusal)
        kinds = ["done"] * done + ["unchecked"] * unchecked + ["unverified"] * unverified
        for n, kind in enumerate(kinds):
            seq += 1
            params = _params(seq)
            proposer = "agent:bob" if n == 1 else "optimizer:bayes"
            station = "bench-b" if kind == "unchecked" else "bench-a"
            eid = j.propose(cid, params, proposer)
            j.transition(eid, "checked")
            j.transition(eid, "queued", station=station)
            j.transition(eid, "running")
            transmission = COLOURS[seq % len(COLOURS)]
            reported = params["red_ml"] + params["green_ml"] + params["blue_ml"]
            seen = reported * (0.6 if kind == "unverified" else 1.0)
            outcome = encode_jpeg(
                scenes.renderer.render(SceneInputs(volume_ml=seen, transmission=transmission))[0]
            )
            sensor_lab = [round(v, 4) for v in linear_to_lab(transmission)]
            objective = delta_e2000(sensor_lab, TARGET)
            measurements = {
                "dispensed_ml": {"red": params["red_ml"], "green": params["green_ml"]}
                | {"blue": params["blue_ml"]},
                "lab": sensor_lab,
                "lab_l": sensor_lab[0],
                "lab_a": sensor_lab[1],
                "lab_b": sensor_lab[2],
                "counts": {"red": 9000 + seq, "green": 5600, "blue": 9900, "status": "ok"},
                "liquid_c": params["temperature_c"],
                "delta_e2000": objective,
                "target_lab": list(TARGET),
            }
            images = {
                "outcome": _store_image(images_dir, outcome),
                "reference": _store_image(images_dir, scenes.reference),
            }
            measurements["image_sha256"] = images["outcome"]["sha256"]
            result: dict[str, Any] = {
                "measurements": measurements,
                "durations": [0.5, 1.0, 2.0],
                "elapsed_s": 300.0 + seq,
                "station": station,
                "images": images,
            }
            verified: bool | None = None
            reason: str | None = None
            if kind != "unchecked":
                check = run_checks(  # the colour match's declared checks
                    load_program(builtin_program("color-match")).verification,
                    measurements=measurements,
                    inputs=params,  # as a station gives them (the setpoint the liquid is checked at)
                    images={"outcome": outcome, "reference": scenes.reference},
                    setup={"calibration": scenes.calibration.to_dict()},
                )
                result["verification"] = check.as_dict()
                verified = check.verified
                assert verified is (kind == "done"), check.reasons
                if not verified:
                    reason = "unverified: " + "; ".join(check.reasons)
                    built.unverified_reasons.append(reason)
            verdicts = [
                _allowed(
                    station, proposer, "station", "begin_experiment", "allowed (within the budgets)"
                ),
                _allowed(station, proposer, "red", "dispense", "allowed (within the envelope)"),
                _allowed(station, proposer, "color", "measure", "allowed (does not actuate)"),
            ]
            if n == 0:
                for k in range(refusals):
                    why = (
                        "rule heater-needs-stirring-and-closed-lid: hotplate.heater=True, "
                        f"hotplate.stirrer_rpm={k}, enclosure.lid='open'"
                    )
                    verdicts.append(
                        {
                            "allowed": False,
                            "station": station,
                            "command": {
                                "instrument": "hotplate",
                                "action": "set_heater",
                                "params": {"on": True, "setpoint_c": 60.0 + k},
                                "who": proposer,
                            },
                            "reason": why,
                            "rule": "heater-needs-stirring-and-closed-lid",
                            "values": {"hotplate.stirrer_rpm": k},
                            "t": time.time(),
                        }
                    )
                    built.refusal_reasons.append(why)
            j.record_evidence(eid, verdicts=verdicts, images=images)
            j.finish(eid, result, objective, verified=verified, reason=reason)
            built.with_images.append(eid)
        for _ in range(failed):
            seq += 1
            eid = j.propose(cid, _params(seq), "optimizer:bayes")
            j.transition(eid, "checked")
            j.transition(eid, "queued", station="bench-a")
            j.transition(eid, "running")
            error = (
                "TransportTimeout: ble://AA:BB:CC:DD:EE:01: no notification on "
                f"6e400002-b5a3-f393-e0a9-e50e24dc0001 within 2.1 s ({eid})"
            )
            trip = {
                "station": "bench-a",
                "reason": f"experiment {eid} failed at step 0 (started): {error}",
                "source": "station-actor",
                "safe": ["red", "green", "blue", "waste", "hotplate", "color", "enclosure"],
                "failed": [],
                "reaction_s": 0.008,
            }
            j.record_evidence(
                eid,
                verdicts=[
                    {
                        "allowed": True,
                        "station": "bench-a",
                        "command": {
                            "instrument": "station",
                            "action": "trip",
                            "params": {},
                            "who": "optimizer:bayes",
                        },
                        "reason": trip["reason"],
                        "rule": "station-actor",
                        "values": {},
                        "t": time.time(),
                    }
                ],
            )
            reason = f"failed at step 0: {error}"
            j.fail(eid, reason, data={"step": 0, "error": error, "trip": trip})
            built.failure_reasons.append(reason)
        built.stop_reason = (
            "no station available (bench-a: paused: 3 results in a row failed their checks)"
        )
        j.set_campaign_state(cid, "stopped", reason=built.stop_reason)
    finally:
        j.close()
    return built


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, scenes: Scenes) -> Built:
    return build_campaign(tmp_path_factory.mktemp("runs"), scenes)


class _Text(HTMLParser):
    """The page's text, its image sources and links, and whether it has scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "a" and a.get("href"):
            self.links.append(a["href"] or "")
        if tag == "script":
            self.scripts += 1
        if tag in ("td", "th", "li", "p", "tr", "h1", "h2", "h3"):
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    @property
    def text(self) -> str:
        return re.sub(r"[ \t]+", " ", "".join(self.parts))


def parse(page: Path) -> _Text:
    p = _Text()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def section(text: str, title: str, until: str) -> str:
    start = text.index(title)
    return text[start : text.index(until, start)]


def tile_rows(text: str) -> list[list[str]]:
    """The contact sheet's tile table: [tile number, experiment, objective, verification, overlay]."""
    block = section(text, "tile\nexperiment", "Safety")
    rows = []
    for line in block.split("\n\n"):
        cells = [c.strip() for c in line.strip().split("\n") if c.strip()]
        if cells and cells[0].isdigit():
            rows.append(cells)
    return rows


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND", f"{path.name} is truncated"
    return width, height


def read_png(path: Path) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, f"{path.name} does not decode"
    return np.asarray(image, np.uint8)


def count_tiles(sheet: np.ndarray, tile_width: int = TILE_WIDTH, aspect: float = 0.75) -> int:
    """Frames on a contact sheet: connected non-background blocks at least a frame big
    (``tile_width`` wide, ``aspect`` * as high)."""
    mask = np.any(sheet != np.array(SHEET_BACKGROUND, np.uint8), axis=2).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    frame_area = tile_width * tile_width * aspect
    return sum(1 for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 0.9 * frame_area)


# ------------------------------------------------------------------ the report
def test_the_report_states_the_campaign_its_best_result_and_every_refusal(
    campaign: Built, tmp_path: Path
) -> None:
    page = write_report(campaign.journal, campaign.campaign_id, tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    doc = parse(page)
    text = doc.text
    assert f"Campaign {campaign.campaign_id}" in text
    assert "stopped" in text and campaign.stop_reason in text
    j = Journal(campaign.journal)
    try:
        exps = j.experiments(campaign.campaign_id)
    finally:
        j.close()
    trusted = [e for e in exps if e.state == "done" and e.verified is not False]
    best = min(trusted, key=lambda e: e.objective or 0.0)
    untrusted_better = [
        e for e in exps if e.verified is False and (e.objective or 0.0) < (best.objective or 0.0)
    ]
    best_block = section(text, "Best result", "Convergence")
    assert f"{best.id}: delta_e2000 = {best.objective:.4g}" in best_block
    for name, value in best.params.items():  # its parameters, one row each
        assert re.search(
            rf"{name}\s+{re.escape(f'{value:.4g}' if isinstance(value, float) else str(value))}\s",
            best_block,
        )
    for e in untrusted_better:  # a better but unverified result is named as not trusted
        assert e.id in best_block
    counts = section(text, "Counts", "Best result")
    assert re.search(rf"experiments proposed\s+{len(exps)}\b", counts)
    for state in ("done", "failed", "rejected"):
        assert re.search(rf"{state}\s+{sum(e.state == state for e in exps)}\b", counts)
    assert re.search(r"results unverified\s+2\b", counts)
    safety = section(text, "\nSafety\n", "\nExperiments\n")
    for reason in campaign.refusal_reasons:
        assert reason in safety
    assert "Refusals (2)" in safety and "heater-needs-stirring-and-closed-lid" in safety
    for reason in campaign.rejection_reasons:
        assert reason in section(safety, "Rejected proposals", "Trips and failures")
    failures = section(safety, "Trips and failures", "Campaign and station events")
    for reason in campaign.failure_reasons:
        assert reason in failures
    assert "reaction 8.0 ms" in failures and "safe state: red, green" in failures
    for reason in campaign.unverified_reasons:
        assert reason in text
    # self-contained: relative links to PNGs next to it, no scripts
    assert doc.scripts == 0
    assert sorted(set(doc.images)) == sorted([CONTACT_SHEET, CONVERGENCE, PARAMETERS])
    for src in doc.images + doc.links:
        if not src.startswith("#"):
            assert "/" not in src and (page.parent / src).is_file(), src


def test_the_pngs_are_valid_and_of_a_sensible_size(campaign: Built, tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(campaign.journal, campaign.campaign_id, out)
    for name in (CONVERGENCE, PARAMETERS, CONTACT_SHEET):
        width, height = png_size(out / name)
        assert 400 <= width <= 4000 and 300 <= height <= 6000, (name, width, height)
        image = read_png(out / name)
        assert image.shape[:2] == (height, width)
        assert float(image.std()) > 10.0, f"{name} is blank"


def test_the_contact_sheet_has_one_tile_per_experiment_with_an_image(
    campaign: Built, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    doc = parse(write_report(campaign.journal, campaign.campaign_id, out))
    sheet = read_png(out / CONTACT_SHEET)
    assert count_tiles(sheet) == len(campaign.with_images) == 7
    rows = tile_rows(doc.text)
    assert [r[1] for r in rows] == campaign.with_images  # in experiment order
    assert all(r[-1] == "recorded" for r in rows)  # the analysis the verification stored
    assert "all 7 experiments with a camera image" in doc.text
    assert "2 experiments have no outcome image" in doc.text  # the rejected and the failed one
    assert sheet.shape[1] == 6 + 4 * (TILE_WIDTH + 6)  # 4 columns of 400 px with 6 px gaps


def test_a_large_campaign_caps_the_sheet_to_the_best_and_the_unverified(
    tmp_path: Path, scenes: Scenes
) -> None:
    built = build_campaign(tmp_path, scenes, "big", done=14, unverified=5, failed=1, refusals=0)
    out = tmp_path / "report"
    doc = parse(write_report(built.journal, "big", out, best_tiles=4, max_tiles=8))
    j = Journal(built.journal)
    try:
        exps = j.experiments("big")
    finally:
        j.close()
    trusted = sorted(
        (e for e in exps if e.state == "done" and e.verified), key=lambda e: e.objective or 0.0
    )
    unverified = [e for e in exps if e.verified is False]
    expected = sorted(trusted[:4] + unverified[:4], key=lambda e: e.seq)
    rows = tile_rows(doc.text)
    assert [r[1] for r in rows] == [e.id for e in expected]
    assert count_tiles(read_png(out / CONTACT_SHEET)) == 8
    assert (
        "8 of 19 experiments with a camera image (cap 8): the 4 best trusted results and "
        "the first 4 of 5 unverified or failed ones" in doc.text
    )
    # every unverified result is still listed with its reason, shown on the sheet or not
    assert unverified[-1].reason and unverified[-1].reason in doc.text


def _exp(seq: int, state: str, objective: float | None, verified: bool | None) -> Experiment:
    return Experiment(
        id=f"c-{seq:04d}",
        campaign_id="c",
        seq=seq,
        station="bench-a",
        params={},
        proposer="optimizer",
        state=state,
        step=None,
        recipe=None,
        result=None,
        objective=objective,
        verified=verified,
        reason=None,
        created=0.0,
        updated=0.0,
    )


def test_tile_selection_takes_the_best_then_the_problems_in_order() -> None:
    exps = [_exp(i, "done", float(20 - i), True) for i in range(1, 11)]  # later is better
    exps += [_exp(11, "done", 0.5, False), _exp(12, "failed", None, None)]
    exps += [_exp(13, "rejected", None, None)]
    has_image = lambda e: e.state != "rejected"  # noqa: E731
    chosen, text = select_tiles(exps, has_image, best_tiles=3, max_tiles=5)
    assert [e.seq for e in chosen] == [8, 9, 10, 11, 12]
    assert text.startswith("5 of 12 experiments")
    chosen, _ = select_tiles(exps, has_image, minimize=False, best_tiles=3, max_tiles=5)
    assert [e.seq for e in chosen] == [1, 2, 3, 11, 12]  # maximise: the first were best
    chosen, _ = select_tiles(exps, has_image, best_tiles=3, max_tiles=4)
    assert [e.seq for e in chosen] == [8, 9, 10, 11]  # the cap holds
    chosen, text = select_tiles(exps, has_image, best_tiles=3, max_tiles=12)
    assert len(chosen) == 12 and text == "all 12 experiments with a camera image"
    with pytest.raises(ValueError, match="max_tiles"):
        select_tiles(exps, has_image, max_tiles=0)


def test_a_campaign_without_experiments_still_gets_a_report(tmp_path: Path, scenes: Scenes) -> None:
    built = build_campaign(
        tmp_path, scenes, "empty", done=0, unverified=0, failed=0, rejected=0, refusals=0
    )
    out = tmp_path / "report"
    out.mkdir()
    (out / CONVERGENCE).write_bytes(b"stale plot of an earlier report")
    doc = parse(write_report(built.journal, "empty", out))
    assert "Campaign empty" in doc.text
    assert "This campaign has no experiments (yet)" in doc.text
    assert "No camera images: no experiments." in doc.text
    assert doc.images == []
    assert not (out / CONVERGENCE).exists()  # no stale plot next to a report that has none
    assert "No trusted result" not in doc.text  # nothing to say about results that never were


def test_unrecorded_analysis_is_redone_and_a_missing_image_says_so(
    tmp_path: Path, scenes: Scenes
) -> None:
    built = build_campaign(
        tmp_path, scenes, "mixed", done=2, unchecked=1, unverified=0, failed=0, rejected=0
    )
    j = Journal(built.journal)
    try:
        exps = j.experiments("mixed")
        Path(j.images(exps[0].id)["outcome"]["path"]).unlink()  # someone cleaned the folder
    finally:
        j.close()
    out = tmp_path / "report"
    doc = parse(write_report(built.journal, "mixed", out))
    rows = {r[1]: r for r in tile_rows(doc.text)}
    assert rows[exps[0].id][-1].startswith("image file missing (")
    assert rows[exps[1].id][-1] == "recorded"
    assert rows[exps[2].id][-1] == "re-analysed"  # verification off: no analysis was stored
    assert rows[exps[2].id][3] == "not checked (verification off)"
    assert count_tiles(read_png(out / CONTACT_SHEET)) == 3


def test_missing_journal_or_campaign_is_a_clear_error(campaign: Built, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "journal.db"
    with pytest.raises(CampaignDataError, match=r"no journal at .*nope/journal.db"):
        write_report(missing, "camp", tmp_path / "out")
    assert not missing.exists()  # looking did not create it
    with pytest.raises(
        CampaignDataError, match=r"no campaign 'other' in journal .*; it has 1: camp"
    ):
        write_report(campaign.journal, "other", tmp_path / "out")
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("hello")
    with pytest.raises(CampaignDataError, match="is not a labbridge journal"):
        write_report(not_sqlite, "camp", tmp_path / "out")
    with pytest.raises(CampaignDataError, match="is a folder"):
        write_report(campaign.journal.parent, "camp", tmp_path / "out")


# ------------------------------------------------------------------------- CLI
def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labbridge")
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return report_command(args)


def test_cli_writes_next_to_the_journal_and_says_where(
    campaign: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = campaign.journal.parent.parent
    assert cli(["report", campaign.campaign_id, "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    page = campaign.journal.parent / "report" / "report.html"
    assert f"report written to {page}" in out and page.is_file()
    assert (page.parent / CONTACT_SHEET).is_file()


def test_cli_errors_exit_1_with_the_reason(
    campaign: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["report", "ghost", "--runs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"labbridge report: no journal at {tmp_path / 'ghost' / 'journal.db'}" in err
    assert cli(["report", "ghost", "--journal", str(campaign.journal), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no campaign 'ghost' in journal {campaign.journal}; it has 1: camp" in err
    assert not (tmp_path / "report.html").exists()
    assert cli(["report", "camp", "--journal", str(campaign.journal), "--max-tiles", "0"]) == 1
    assert "--max-tiles must be >= 1" in capsys.readouterr().err


def test_cli_help_and_exclusive_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli(["report", "--help"])
    assert info.value.code == 0
    assert "--journal PATH" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli(["report", "c", "--runs", "a", "--journal", "b"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------- instruments.vision helpers
def test_a_recorded_analysis_draws_exactly_like_the_original(scenes: Scenes) -> None:
    r = scenes.renderer
    ref = prepare_reference(decode_jpeg(scenes.reference))
    frames = [
        r.render(SceneInputs(volume_ml=1.7, transmission=(0.4, 0.2, 0.3)))[0],
        r.render(SceneInputs(volume_ml=1.2, spilled_ml=0.4, transmission=(0.3, 0.5, 0.2)))[0],
        r.render(SceneInputs(vial_present=False))[0],
    ]
    kinds = []
    for frame in frames:
        frame = decode_jpeg(encode_jpeg(frame))
        for cal, reference in ((scenes.calibration, ref), (None, None)):
            original = analyse(frame, cal, reference)
            stored = json.loads(json.dumps(original.as_dict()))  # as the journal keeps it
            again = analysis_from_dict(stored)
            assert again == original
            assert np.array_equal(overlay(frame, again), overlay(frame, original))
            kinds.append((original.status, original.change is not None and original.change.spill))
    assert ("ok", True) in kinds or ("cannot_verify", True) in kinds  # a spill region was drawn
    assert ("cannot_verify", False) in kinds and ("ok", False) in kinds


def test_a_malformed_recorded_analysis_names_the_field(scenes: Scenes) -> None:
    frame = decode_jpeg(scenes.reference)
    stored = analyse(frame, scenes.calibration).as_dict()
    broken = dict(stored)
    del broken["surface_y"]
    with pytest.raises(VisionError, match="analysis: missing field 'surface_y'"):
        analysis_from_dict(broken)
    broken = {**stored, "vial": {**stored["vial"], "left_x": "left"}}
    with pytest.raises(VisionError, match="analysis.vial.left_x must be a number, got 'left'"):
        analysis_from_dict(broken)
    with pytest.raises(VisionError, match="analysis.patch must be a mapping"):
        analysis_from_dict({**stored, "patch": [1, 2]})
    with pytest.raises(VisionError, match="'ok' or 'cannot_verify'"):
        analysis_from_dict({**stored, "status": "fine"})
    with pytest.raises(VisionError, match="must be a mapping"):
        analysis_from_dict([])  # type: ignore[arg-type]


def test_contact_sheet_layout_and_captions() -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(60, 200, (480, 640, 3), dtype=np.uint8) for _ in range(5)]
    frames.append(rng.integers(60, 200, (240, 640, 3), dtype=np.uint8))  # a wider aspect
    captions = [[f"tile {i}", "a long reason " * 12] for i in range(6)]
    bare = contact_sheet(frames, None, columns=4, tile_width=200, gap=6)
    assert bare.dtype == np.uint8 and bare.shape == (6 + 2 * (150 + 6), 6 + 4 * (200 + 6), 3)
    assert count_tiles(bare, 200, aspect=75 / 200) == 6
    assert count_tiles(bare, 200) == 5  # the wide one is smaller than a 4:3 frame
    # the wide frame (75 px high once scaled) is centred in its 150 px tile (row 1, column 1)
    x0, y0 = 6 + 200 + 6, 6 + 150 + 6
    background = np.array(SHEET_BACKGROUND, np.uint8)
    assert np.array_equal(bare[y0 + 30, x0 + 100], background)
    assert not np.array_equal(bare[y0 + 75, x0 + 100], background)
    assert np.array_equal(bare[y0 + 120, x0 + 100], background)
    # captions: wrapped, at most caption_lines lines, in the caption colour, under each frame
    sheet = contact_sheet(
        frames,
        captions,
        columns=4,
        tile_width=200,
        caption_lines=3,
        gap=6,
        colours=[(0, 0, 255)] * 6,
    )
    tile_h = (sheet.shape[0] - 6) // 2 - 6
    assert tile_h > 150 and sheet.shape[1] == bare.shape[1]
    caption = sheet[6 + 150 : 6 + tile_h, 6 : 6 + 200]
    red = (caption[:, :, 2] > 150) & (caption[:, :, 0] < 100)
    assert red.any(), "no caption text drawn"
    lines_with_text = np.flatnonzero(red.any(axis=1))
    assert lines_with_text.max() - lines_with_text.min() > 2 * 10  # three lines, not one
    more = contact_sheet(frames, captions, columns=4, tile_width=200, caption_lines=5, gap=6)
    assert more.shape[0] > sheet.shape[0]  # more lines allowed, more room taken
    # OpenCV draws ASCII only: the usual symbols are spelt out rather than drawn as "?"
    spelt = contact_sheet(frames[:1], [["dE00 <= 8 at 60 degC"]], tile_width=200)
    assert np.array_equal(contact_sheet(frames[:1], [["ΔE00 ≤ 8 at 60 °C"]], tile_width=200), spelt)
    assert not np.array_equal(
        contact_sheet(frames[:1], [["dE00 <= 8 at 61 degC"]], tile_width=200), spelt
    )
    with pytest.raises(VisionError, match="5 frames but 6 captions"):
        contact_sheet(frames[:5], captions)
    with pytest.raises(VisionError, match="at least one frame"):
        contact_sheet([])
    with pytest.raises(VisionError, match="frame 0 must be uint8"):
        contact_sheet([frames[0].astype(np.float32)])


def test_encode_png_round_trips() -> None:
    image = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert back is not None
    assert np.array_equal(back, image)
    with pytest.raises(VisionError, match="uint8"):
        encode_png(image.astype(np.float64))
    with pytest.raises(VisionError, match="compression"):
        encode_png(image, compression=12)


def test_a_report_of_a_running_campaign_says_it_has_not_ended(
    tmp_path: Path, scenes: Scenes
) -> None:
    built = build_campaign(tmp_path, scenes, "live", done=1, unverified=0, failed=0, rejected=0)
    j = Journal(built.journal)
    try:
        j.set_campaign_state("live", "running", reason="resumed by test")
        eid = j.propose("live", _params(9), "operator:ann")  # waiting to be checked
    finally:
        j.close()
    doc = parse(write_report(built.journal, "live", tmp_path / "r"))
    assert "The campaign has not ended" in doc.text and "labbridge resume live" in doc.text
    assert re.search(r"proposed\s+1\b", doc.text)
    assert eid in section(doc.text, "\nExperiments\n", "operator:ann")


def test_many_parameters_and_an_unreadable_program_still_report(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = Journal(path)
    try:
        j.create_campaign("wide", "wide", {"name": "wide", "parameters": "not a mapping"})
        for i in range(6):
            params = {f"p{k}": float((i * 7 + k * 3) % 10) for k in range(8)}
            eid = j.propose("wide", params, "optimizer:random")
            if i == 3:
                j.reject(eid, ["p0 too high"])
                continue
            j.transition(eid, "checked")
            j.transition(eid, "queued", station="s1")
            j.transition(eid, "running")
            j.finish(eid, {"measurements": {"y": float(i)}}, float(i))
    finally:
        j.close()
    out = tmp_path / "report"
    doc = parse(write_report(path, "wide", out))
    assert "program could not be read" in doc.text and "assumed minimize" in doc.text
    assert "parallel coordinates" in doc.text
    assert "none of the 6 experiments has an outcome image" in doc.text
    assert sorted(doc.images) == [CONVERGENCE, PARAMETERS]
    width, height = png_size(out / PARAMETERS)
    assert width >= 900 and height >= 500
    assert "wide-0001: objective = 0" in doc.text  # the best, minimising by default
    assert "p0 too high" in doc.text
