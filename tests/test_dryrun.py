"""Dry run of a recipe: every violation of every step, with its index, no I/O."""

from __future__ import annotations

import json
from typing import Any

from safety.dryrun import dry_run
from safety.envelope import Ledger, load_envelope, reference_envelope
from safety.model import Command

KINDS = {
    "red": "syringe-pump",
    "green": "syringe-pump",
    "blue": "syringe-pump",
    "waste": "syringe-pump",
    "hotplate": "hotplate",
    "color": "color-sensor",
    "enclosure": "enclosure",
    "camera": "camera",
}
MEASURED: dict[str, Any] = {"enclosure.lid": "closed", "hotplate.setpoint_c": 25.0}


def c(instrument: str, action: str, **params: Any) -> Command:
    return Command(instrument, action, params, "agent:test")


def test_a_violating_step_is_reported_with_its_index_and_the_rest_still_checked() -> None:
    recipe = [
        c("hotplate", "set_stirrer", on=True, rpm=300),
        c("hotplate", "set_heater", on=True, setpoint_c=25.0),
        c("red", "dispense", volume_ml=1.5, rate_ml_min=5.0),
        c("green", "dispense", volume_ml=1.5, rate_ml_min=5.0),  # 3.0 mL: over capacity
        c("blue", "dispense", volume_ml=1.0, rate_ml_min=5.0),  # fine: step 3 was skipped
        c("hotplate", "set_heater", on=True, setpoint_c=95.0),  # above max, too fast
        c("red", "run"),  # not an allowed command
        c("color", "measure"),
        c("camera", "capture"),
        c("waste", "withdraw", volume_ml=3.0, rate_ml_min=10.0),
        c("green", "dispense", volume_ml=2.0, rate_ml_min=5.0),  # fine after the drain
        c("hotplate", "set_stirrer", on=False),  # breaks the heater rule
        c("hotplate", "set_heater", on=False),  # always allowed
        c("hotplate", "set_stirrer", on=False),  # now fine
    ]
    env = reference_envelope()
    report = dry_run(recipe, env, MEASURED, kinds=KINDS, now=1000.0)
    assert not report.ok
    assert report.refused_steps == [3, 5, 6, 11]
    by_step = {(v.step, v.rule) for v in report.violations}
    assert by_step == {
        (3, "vial-capacity"),
        (5, "hotplate.setpoint_c.max"),
        (5, "hotplate.setpoint_c.max_rise_per_min"),
        (6, "allowed-commands"),
        (11, "heater-needs-stirring-and-closed-lid"),
    }
    (capacity,) = [v for v in report.violations if v.step == 3]
    assert capacity.command is recipe[3]
    assert (
        capacity.reason == "rule vial-capacity: red.volume=1.5, green.volume=1.5, blue.volume=0.0"
    )
    assert capacity.values == {"red.volume": 1.5, "green.volume": 1.5, "blue.volume": 0.0}
    final = report.final_state
    assert final["green.volume"] == 2.0 and final["red.volume"] == 0.0
    assert final["hotplate.heater"] is False and final["hotplate.stirrer_rpm"] == 0
    text = str(report)
    assert text.startswith("dry run: 4 of 14 steps refused")
    assert "step 3 green.dispense(volume_ml=1.5, rate_ml_min=5.0): rule vial-capacity" in text
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ok"] is False and data["violations"][0]["step"] == 3
    assert data["violations"][0]["command"]["who"] == "agent:test"


def test_a_clean_recipe_is_ok_and_nothing_is_changed() -> None:
    env = reference_envelope()
    ledger = env.ledger.copy()
    view = dict(MEASURED)
    recipe = [
        c("enclosure", "set_light", on=True, intensity=0.5),
        c("red", "dispense", volume_ml=0.4, rate_ml_min=5.0),
        c("hotplate", "set_stirrer", on=True, rpm=250),
        c("hotplate", "set_heater", on=True),
        c("color", "start_continuous"),
        c("color", "stop_continuous"),
        c("waste", "withdraw", volume_ml=1.0, rate_ml_min=10.0),
    ]
    report = dry_run(recipe, env, view, kinds=KINDS, now=0.0)
    assert report.ok and report.violations == [] and str(report).endswith("inside the envelope")
    assert view == MEASURED  # the caller's view is not modified
    assert env.ledger.last_change("red.volume") is None  # nor the envelope's ledger
    assert ledger.used("dye_ml", 86400, 0.0) == 0.0
    assert report.final_state["hotplate.setpoint_c"] == 25.0
    assert report.final_state["enclosure.light"] is True
    assert report.final_state["color.continuous"] is False


def test_step_times_feed_the_rate_limits() -> None:
    env = reference_envelope()
    base = {**MEASURED, "hotplate.stirrer": True, "hotplate.stirrer_rpm": 300}
    recipe = [
        c("hotplate", "set_heater", on=True, setpoint_c=30.0),
        c("hotplate", "set_heater", on=True, setpoint_c=40.0),
        c("hotplate", "set_heater", on=True, setpoint_c=50.0),
        c("hotplate", "set_heater", on=True, setpoint_c=20.0),  # going down: always fine
    ]
    ledger = Ledger()
    ledger.start(0.0)
    report = dry_run(
        recipe, env, base, kinds=KINDS, now=0.0, times=[30.0, 90.0, 120.0, 121.0], ledger=ledger
    )
    assert [(v.step, v.rule) for v in report.violations] == [
        (2, "hotplate.setpoint_c.max_rise_per_min")
    ]
    assert report.final_state["hotplate.setpoint_c"] == 20.0
    # all at the same time (no times): only the first rise is possible
    report = dry_run(recipe, env, base, kinds=KINDS, now=30.0, ledger=ledger)
    assert report.refused_steps == [1, 2]


def test_budgets_and_roles_in_a_dry_run() -> None:
    env = load_envelope(
        "rules:\n  - {name: cap, when: a.volume + b.volume <= 5}\nbudgets:\n  dye_ml_per_day: 3\n"
    )
    kinds = {"a": "syringe-pump", "b": "syringe-pump", "drain": "syringe-pump"}
    ledger = Ledger()
    ledger.consume("dye_ml", 1.0, 0.0)
    recipe = [
        c("a", "dispense", volume_ml=1.5, rate_ml_min=1.0),
        c("b", "dispense", volume_ml=1.0, rate_ml_min=1.0),  # 1 + 1.5 + 1 > 3 mL per day
        c("drain", "withdraw", volume_ml=5.0, rate_ml_min=1.0),
        c("b", "withdraw", volume_ml=1.0, rate_ml_min=1.0),  # a dye pump cannot withdraw
    ]
    report = dry_run(
        recipe, env, {}, kinds=kinds, roles={"drain": "waste"}, now=10.0, ledger=ledger
    )
    assert [(v.step, v.rule) for v in report.violations] == [
        (1, "budget.dye_ml_per_day"),
        (3, "allowed-commands"),
    ]
    assert "budget dye_ml_per_day: 2.5 mL used in the last day + 1.0 mL asked > 3 mL" in str(report)
    assert report.final_state["a.volume"] == 0.0  # drained
