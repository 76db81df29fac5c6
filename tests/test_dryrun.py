"""Dry run of a recipe: every violation of every step, with its index, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest
from reference import layout

from instruments.drivers.syringe_pump import SyringePump
from safety.dryrun import dry_run
from safety.envelope import EnvelopeError
from safety.envelopeload import load_envelope, reference_envelope
from safety.limits import Ledger
from safety.model import Command

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
    report = dry_run(recipe, env, MEASURED, layout=layout(env), now=1000.0)
    assert not report.ok
    assert report.refused_steps == [3, 5, 6, 11]
    by_step = {(v.step, v.rule) for v in report.violations}
    assert by_step == {
        (3, "vial.volume.max"),
        (5, "hotplate.setpoint_c.max"),
        (5, "hotplate.setpoint_c.max_rise_per_min"),
        (6, "allowed-commands"),
        (11, "heater-needs-stirring-and-closed-lid"),
    }
    (capacity,) = [v for v in report.violations if v.step == 3]
    assert capacity.command is recipe[3]
    assert capacity.reason == "vial.volume.max: vial.volume=3.0 is above the maximum 2.8"
    assert capacity.values == {"vial.volume": 3.0}
    final = report.final_state
    assert final["vial.volume"] == 2.0  # drained to 0 (never below), then 2.0 of green
    assert final["hotplate.heater"] is False and final["hotplate.stirrer_rpm"] == 0
    text = str(report)
    assert text.startswith("dry run: 4 of 14 steps refused")
    assert "step 3 green.dispense(volume_ml=1.5, rate_ml_min=5.0): vial.volume.max" in text
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
        c("color", "stop_continuous"),
        c("waste", "withdraw", volume_ml=1.0, rate_ml_min=10.0),
    ]
    report = dry_run(recipe, env, view, layout=layout(env), now=0.0)
    assert report.ok and report.violations == [] and str(report).endswith("inside the envelope")
    assert view == MEASURED  # the caller's view is not modified
    assert env.ledger.last_change("vial.volume") is None  # nor the envelope's ledger
    assert ledger.used("vial.added", 86400, 0.0) == 0.0
    assert report.final_state["hotplate.setpoint_c"] == 25.0
    assert report.final_state["enclosure.light"] is True
    assert report.final_state["color.continuous"] is False
    assert report.final_state["vial.volume"] == 0.0


def test_deny_by_default_a_channel_the_envelope_does_not_bound_is_refused() -> None:
    env = reference_envelope()  # lists no color.continuous: continuous mode is not used there
    report = dry_run([c("color", "start_continuous")], env, MEASURED, layout=layout(env), now=0.0)
    (v,) = report.violations
    assert v.rule == "unbounded"
    assert "the envelope does not bound color.continuous" in v.reason
    assert "add channels.color.continuous" in v.reason


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
        recipe,
        env,
        base,
        layout=layout(env),
        now=0.0,
        times=[30.0, 90.0, 120.0, 121.0],
        ledger=ledger,
    )
    assert [(v.step, v.rule) for v in report.violations] == [
        (2, "hotplate.setpoint_c.max_rise_per_min")
    ]
    assert report.final_state["hotplate.setpoint_c"] == 20.0
    # all at the same time (no times): only the first rise is possible
    report = dry_run(recipe, env, base, layout=layout(env), now=30.0, ledger=ledger)
    assert report.refused_steps == [1, 2]


def test_vessels_and_budgets_in_a_dry_run() -> None:
    env = load_envelope(
        "channels:\n  a.rate_ml_min: {max: 5}\n  b.rate_ml_min: {max: 5}\n"
        "  drain.rate_ml_min: {max: 5}\n  solo.rate_ml_min: {max: 5}\n"
        "vessels:\n  beaker: {max: 5, fed_by: [a, b], drained_by: [drain]}\n"
        "budgets:\n  added_per_day: {counts: beaker.added, per: day, max: 3, unit: mL}\n"
    )
    pumps = {"a": SyringePump, "b": SyringePump, "drain": SyringePump, "solo": SyringePump}
    ledger = Ledger()
    ledger.consume("beaker.added", 1.0, 0.0)
    recipe = [
        c("a", "dispense", volume_ml=1.5, rate_ml_min=1.0),
        c("b", "dispense", volume_ml=1.0, rate_ml_min=1.0),  # 1 + 1.5 + 1 > 3 mL per day
        c("drain", "withdraw", volume_ml=5.0, rate_ml_min=1.0),
        c("b", "withdraw", volume_ml=1.0, rate_ml_min=1.0),  # a feed pump cannot draw it back
        c("drain", "dispense", volume_ml=1.0, rate_ml_min=1.0),  # nor a drain pump feed it
        c("solo", "dispense", volume_ml=1.0, rate_ml_min=1.0),  # connected to no vessel
    ]
    report = dry_run(recipe, env, {}, layout=layout(env, pumps), now=10.0, ledger=ledger)
    assert [(v.step, v.rule) for v in report.violations] == [
        (1, "budget.added_per_day"),
        (3, "vessels"),
        (4, "vessels"),
        (5, "vessels"),
    ]
    reasons = [v.reason for v in report.violations]
    assert "b feeds vessel beaker: it may only add to it" in reasons[1]
    assert "drain drains vessel beaker: it may only take from it" in reasons[2]
    assert "solo feeds or drains no vessel of the envelope" in reasons[3]
    assert report.final_state["beaker.volume"] == 0.0


def test_one_instruments_flow_has_its_own_budget() -> None:
    """``<instrument>.delivered`` counts what one feed pump moved (a reagent's daily budget)."""
    env = load_envelope(
        "channels:\n  a.rate_ml_min: {max: 5}\n  b.rate_ml_min: {max: 5}\n"
        "  drain.rate_ml_min: {max: 5}\n"
        "vessels:\n  beaker: {max: 50, fed_by: [a, b], drained_by: [drain]}\n"
        "budgets:\n  a_per_day: {counts: a.delivered, per: day, max: 2, unit: mL}\n"
        "  drained_per_day: {counts: drain.withdrawn, per: day, max: 100, unit: mL}\n"
    )
    pumps = {"a": SyringePump, "b": SyringePump, "drain": SyringePump}
    recipe = [
        c("a", "dispense", volume_ml=1.5, rate_ml_min=1.0),
        c("b", "dispense", volume_ml=3.0, rate_ml_min=1.0),  # b's flow is not a's budget
        c("a", "dispense", volume_ml=1.0, rate_ml_min=1.0),  # 2.5 mL of a in a day
    ]
    times = [0.0, 100.0, 300.0]
    report = dry_run(recipe, env, {}, layout=layout(env, pumps), now=0.0, times=times)
    assert [(v.step, v.rule) for v in report.violations] == [(2, "budget.a_per_day")]
    with pytest.raises(
        EnvelopeError, match=r"budgets.x.counts: cannot count 'b.withdrawn'; known: .*a.delivered"
    ):
        load_envelope(
            "vessels:\n  beaker: {max: 50, fed_by: [a, b], drained_by: [drain]}\n"
            "budgets:\n  x: {counts: b.withdrawn, per: day, max: 1}\n"
        )
