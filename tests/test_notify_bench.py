"""Notifications from things that really happen on a simulated bench (bridge/notify.py):
results that keep failing verification (the camera frozen), a safety budget spent (the
envelope's dye budget), and a station the service lost (its actor killed). Each reaches a
real HTTP receiver on 127.0.0.1 as the alert kind a person filters on, with a link to the
page; the service and the notifier are the ones ``labbridge serve`` runs
(:class:`~bridge.service.LabService`, :func:`bridge.notify.notifications`), on the
session's Ray. (Trips, e-stops, approvals, a campaign's end and the channels themselves:
tests/test_notify.py.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from reference import relaxed_staleness
from test_mqtt_api import small_program, until
from test_notify import SEEN_S, Receiver, notifications_yaml

from bridge.labconfig import load_lab
from bridge.notify import notifications
from bridge.service import LabService
from bridge.simbench import sim_lab_yaml
from loops.program import Parameter, load_program
from safety.envelopeload import REFERENCE_BENCH
from simulators.bench import SimulatedLab

SPEED = 500.0
#: about 1.56 mL of dye per experiment: after the station's set-up (its calibration puts
#: 2.51 mL of dye in), two fit in the budget below, a third does not
NARROW = {
    "red_ml": (0.70, 0.71),
    "green_ml": (0.10, 0.11),
    "blue_ml": (0.75, 0.76),
    "temperature_c": (30.0, 31.0),
    "hold_s": (30, 31),
}
BUDGET = "dye_ml_per_day: {counts: vial.added, per: day, max: 6.5, unit: mL}"


def narrow_program(experiments: int) -> str:
    """The colour match with ``experiments`` experiments and no target
    (:func:`test_mqtt_api.small_program`), every parameter in a narrow range (so each
    experiment puts about 1.56 mL of dye in the vial)."""
    base = load_program(small_program(experiments))
    params = tuple(
        dataclasses.replace(p, low=NARROW[p.name][0], high=NARROW[p.name][1])
        for p in base.parameters
    )
    assert all(isinstance(p, Parameter) for p in params) and len(params) == len(NARROW)
    return dataclasses.replace(base, parameters=params).to_markdown()


def lab_yaml(sim: SimulatedLab, tmp_path: Path, receiver: Receiver) -> Path:
    """The simulated lab with a dye budget of 6.5 mL per simulated day, relaxed staleness
    limits (a starved poll on a loaded machine is not what this tests), and a webhook that
    takes every alert at once (no rate limit) after two unverified results in a row."""
    config = yaml.safe_load(sim_lab_yaml(sim, tmp_path / "journal.db", bridge_id="bench-alerts"))
    station = config["stations"]["bench-a"]
    assert station["envelope"] == "reference"
    lines = relaxed_staleness(REFERENCE_BENCH.read_text()).splitlines()
    budgets = [i for i, line in enumerate(lines) if line.strip().startswith("dye_ml_per_day:")]
    assert len(budgets) == 1, "the reference envelope has one dye budget"
    lines[budgets[0]] = f"  {BUDGET}"
    (tmp_path / "envelope.yaml").write_text("\n".join(lines) + "\n")
    station["envelope"] = "envelope.yaml"
    path = tmp_path / "lab.yaml"
    path.write_text(
        yaml.safe_dump(config, sort_keys=False)
        + notifications_yaml(
            page_url="http://lab-pc.example.org:8765/",
            rate_limit_s=0,
            verification_failures=2,
            retry_s=0.2,
            station_poll_s=0.2,
            webhooks={"chat": {"url": receiver.url}},
        )
    )
    return path


@pytest.mark.timeout(240)
async def test_unverified_results_a_spent_budget_and_a_lost_station_reach_the_webhook(
    ray_session: Any, tmp_path: Path
) -> None:
    async with Receiver() as chat, SimulatedLab(stations=1, speed=SPEED) as sim:
        lab = load_lab(lab_yaml(sim, tmp_path, chat))
        assert lab.notifications is not None
        async with (
            LabService(lab) as service,
            notifications(lab.notifications, service, lab.bridge_id) as notifier,
        ):
            assert notifier is not None
            # --- the camera freezes: every result fails verification
            sim.stations[0].inject_fault("camera-freeze")
            started = await service.start_campaign("frozen", narrow_program(3), who="ana")
            assert started.accepted, started
            await until(lambda: "verification" in chat.kinds(), SEEN_S, "the verification alert")
            said = chat.bodies[chat.kinds().index("verification")]
            assert said["title"].startswith(
                "station bench-a: 2 results in a row failed verification in campaign frozen"
            ), said
            assert "cannot verify" in said["text"], said
            assert said["url"] == "http://lab-pc.example.org:8765/#/campaign/frozen", said
            # --- the third experiment would put more dye in than the day allows
            await until(lambda: "budget" in chat.kinds(), SEEN_S, "the budget alert")
            spent = chat.bodies[chat.kinds().index("budget")]
            assert "campaign frozen" in spent["title"], spent
            assert "dye_ml_per_day" in spent["text"], spent
            assert spent["stations"] == ["bench-a"], spent
            summary = await service.wait_campaign("frozen")
            assert summary is not None
            done = [e for e in await service.experiments("frozen") if e.state == "done"]
            assert len(done) == 2 and all(e.verified is False for e in done), done
            # --- the station's actor dies: the watch tells the service lost it, once
            sim.stations[0].clear_fault("camera-freeze")
            ray.kill(service.actors["bench-a"], no_restart=True)
            await until(lambda: "station_lost" in chat.kinds(), SEEN_S, "the lost station")
            lost = chat.bodies[chat.kinds().index("station_lost")]
            assert lost["title"].startswith("the service lost station bench-a: "), lost
            assert lost["url"] == "http://lab-pc.example.org:8765/#/lab", lost
            n = len(chat.bodies)
            await until(lambda: notifier.counts["chat"].sent >= n, SEEN_S, "the count")
            assert chat.kinds().count("station_lost") == 1
    assert "trip" not in chat.kinds(), chat.kinds()  # none of the three is a trip
