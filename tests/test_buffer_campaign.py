"""The second bench end to end: the buffer campaign on the simulated bench, its envelope's
rules through the real guard and wires, and its checks catching the faults of issue 11.

Everything here comes from data (examples/buffer: program, envelope, set-up) and the
bundled drivers and simulators: no file of loops/ or safety/ names this bench.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.campaigns import lab_clock, open_lab
from bridge.labconfig import LabConfig, load_lab
from bridge.simbench import bench_data, sim_lab_yaml
from loops.campaign import CampaignRunner
from loops.journal import Journal
from loops.program import Program, load_program
from loops.raylinks import ray_links
from safety import SafetyRefusal, load_envelope, open_station
from safety.model import Command
from simulators.bench import SimulatedLab

SPEED = 200.0
BUFFER = bench_data("buffer")


def _writes(entry: Any) -> bool:
    """A Modbus register write (function 6 or 16) that reached the transmitter."""
    return isinstance(entry.data, dict) and entry.data.get("fc") in (6, 16)


def program(budget: int) -> Program:
    """The buffer program, ``budget`` experiments, no stop target, two initial points."""
    base = load_program(BUFFER.program)
    return dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=budget),
        stop=dataclasses.replace(base.stop, target=None),
        initial_points=min(2, budget),
    )


@contextlib.asynccontextmanager
async def buffer_lab(tmp_path: Path) -> AsyncIterator[tuple[SimulatedLab, LabConfig, Any, Any]]:
    async with SimulatedLab(bench="buffer", speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        async with open_lab(lab) as (journal, actors):  # sets itself up: pH calibration, tare
            yield sim, lab, journal, actors


def test_the_bench_is_data_the_core_does_not_name() -> None:
    """issue 11's "done when": nothing in loops/ or safety/ names the bench."""
    root = Path(__file__).resolve().parents[1]
    words = ("ph-meter", "balance", "phosphate", "pka", "acid_ml", "base_ml")
    found = [
        f"{p.relative_to(root)}: {w}"
        for folder in ("loops", "safety")
        for p in (root / folder).rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml", ".md")
        for w in words
        if w in p.read_text(encoding="utf-8").lower()
    ]
    assert found == []


@pytest.mark.timeout(120)
async def test_the_envelope_rules_hold_on_the_real_wires() -> None:
    """One reagent at a time, no tare and no pH calibration while a pump runs, no stirring an
    empty beaker: refused by the guard before anything reaches the wire; the same commands
    pass when they may."""
    envelope = load_envelope(Path(BUFFER.envelope).read_text(), source=BUFFER.envelope)
    async with SimulatedLab(bench="buffer", speed=SPEED) as sim:
        bench = sim.stations[0]
        world = bench.world
        specs = [s.as_dict() for s in bench.instruments()]
        async with open_station(
            bench.name,
            specs,
            envelope,
            clock=world.clock.now,
            supervisor_options={"device_time_scale": SPEED, "poll_interval": 0.1},
        ) as station:
            guard = station.guard

            def cmd(instrument: str, action: str, **params: Any) -> Command:
                return Command(instrument, action, params, "test")

            # the dry run: a whole recipe, each refusal with its rule
            report = guard.dry_run(
                [
                    cmd("hotplate", "set_stirrer", on=True, rpm=300),  # nothing to cover the bar
                    cmd("acid", "dispense", volume_ml=10.0, rate_ml_min=10.0),
                    cmd("base", "dispense", volume_ml=10.0, rate_ml_min=10.0),  # acid still runs
                    cmd("balance", "tare"),  # ... and so does the acid pump
                    cmd("ph", "calibrate", buffer_ph=7.0),  # ... still
                    cmd("acid", "dispense", volume_ml=200.0, rate_ml_min=10.0),  # overfills
                ]
            )
            rules = {v.step: v.rule for v in report.violations}
            assert rules == {
                0: "stir-bar-covered",
                2: "one-reagent-at-a-time",
                3: "no-tare-while-pumps-run",
                4: "no-calibration-while-pumps-run",
                5: "beaker.volume.max",
            }, report
            # through the guard, on the wire: a tare while the acid pump runs is refused
            acid, balance, ph = (
                station.handle("acid", who="test"),
                station.handle("balance", who="test"),
                station.handle("ph", who="test"),
            )
            sent_before = len(world.wire.entries("balance"))
            ph_before = len(world.wire.entries("ph"))
            calibration_before = dataclasses.replace(bench.ph.calibration)
            await acid.dispense(volume_ml=5.0, rate_ml_min=10.0)
            with pytest.raises(SafetyRefusal, match="no-tare-while-pumps-run"):
                await balance.tare()
            # a calibration point while the acid runs: refused, not a byte to the transmitter
            with pytest.raises(SafetyRefusal, match="no-calibration-while-pumps-run"):
                await ph.calibrate(buffer_ph=7.0)
            base = station.handle("base", who="test")
            with pytest.raises(SafetyRefusal, match="one-reagent-at-a-time"):
                await base.dispense(volume_ml=5.0, rate_ml_min=10.0)
            sent = [str(e.data).strip() for e in world.wire.entries("balance")[sent_before:]]
            assert "T" not in sent, sent  # (TA: the supervisor reading the tare, no tare)
            assert not [e for e in world.wire.entries("ph")[ph_before:] if _writes(e)]
            assert bench.ph.calibration == calibration_before and not bench.ph.calibrating
            await acid.wait_until_stopped(timeout=120, poll_interval=0.05)
            # stopped (a read of it says so): both are allowed now, and the tare's event does
            # not stick to the next command
            assert await balance.tare() is not None
            await base.dispense(volume_ml=5.0, rate_ml_min=10.0)
            await base.wait_until_stopped(timeout=120, poll_interval=0.05)
            # no pump running and the probe covered: the calibration point goes through
            water = station.handle("water", who="test")
            await water.dispense(volume_ml=15.0, rate_ml_min=30.0)
            await water.wait_until_stopped(timeout=120, poll_interval=0.05)
            await ph.calibrate(buffer_ph=7.0)
            assert list(bench.ph.calibration.points) == [7000]
            written = [e.data for e in world.wire.entries("ph")[ph_before:] if _writes(e)]
            assert written == [{"fc": 6, "address": 10, "values": [7000]}], written
            world.advance()
            assert world.snapshot()["beaker"]["volume_ml"] == pytest.approx(25.0, abs=0.05)


@pytest.mark.timeout(240)
async def test_the_balance_catches_a_pump_that_under_delivers(
    ray_session: Any, tmp_path: Path
) -> None:
    """A clogged acid pump reports what it was asked for; the balance weighs less: every
    result is unverified (the gravimetric check) and the station pauses after three."""
    events: list[dict[str, Any]] = []
    async with buffer_lab(tmp_path) as (sim, lab, journal, actors):
        store = lab.stations["bench-a"].setup_store
        assert store is not None
        kept = store.values()
        assert kept["calibration_due"] is False  # the set-up calibrated the probe
        assert kept["beaker_g"] == pytest.approx(52.38, abs=0.05)  # and tared the empty beaker
        sim.stations[0].inject_fault("clogged-pump", pump="acid", factor=0.5)
        runner = CampaignRunner(
            program(budget=4),
            *ray_links(journal, actors),
            campaign_id="clog",
            clock_now=lab_clock(lab)[1],
            on_event=events.append,
        )
        summary = await runner.run()
    j = Journal(lab.store)
    try:
        exps = [e for e in j.experiments("clog") if e.state == "done"]
    finally:
        j.close()
    assert len(exps) == 3, summary
    for e in exps:
        assert e.verified is False
        reasons = e.result["verification"]["reasons"]
        assert any(r.startswith("gravimetric:") for r in reasons), reasons
    paused = [ev for ev in events if ev["event"] == "station" and ev["state"] == "paused"]
    assert paused and "3 results in a row" in paused[0]["reason"], events
    assert summary.counts["done"] == 3  # the fourth never ran: the only station paused


@pytest.mark.timeout(240)
def test_labbridge_sim_bench_buffer_runs_to_its_target(ray_session: Any, tmp_path: Path) -> None:
    """The README's route for the second bench: one command, to the target."""
    import subprocess
    import sys

    out = tmp_path / "run"
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "sim",
            "--bench",
            "buffer",
            "--out",
            str(out),
            "--ray-address",
            address,
            "--no-progress",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=230,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "campaign run: done: target reached: ph_error=" in proc.stdout, proc.stdout
    assert (out / "report" / "report.html").exists()
