"""The safety envelope: each rule kind, budgets, the YAML loader's errors, the reference bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from reference import layout

from safety.effects import assess
from safety.envelope import Envelope, EnvelopeError
from safety.envelopeload import load_envelope, reference_envelope
from safety.expr import RuleSyntaxError
from safety.limits import Ledger, Violation
from safety.model import Command

BENCH = ["red", "green", "blue", "waste", "hotplate", "color", "enclosure", "camera"]
SAFE_BENCH: dict[str, Any] = {
    "hotplate.heater": False,
    "hotplate.stirrer": False,
    "hotplate.stirrer_rpm": 0,
    "hotplate.setpoint_c": 25.0,
    "enclosure.lid": "closed",
    "vial.volume": 0.0,
}


def rules_of(violations: list[Violation]) -> list[str]:
    return [v.rule for v in violations]


# ------------------------------------------------------------------ limits
def test_min_max_only_for_the_channels_a_command_sets() -> None:
    env = load_envelope("channels:\n  hp.setpoint_c: {min: 0, max: 80}\n  hp.rpm: {max: 10}\n")
    state = {"hp.rpm": 5000}  # out of range already, but not touched by the command
    assert env.check(state, {"hp.setpoint_c": 80}, now=0) == []
    assert env.check(state, {"hp.setpoint_c": 0.0}, now=0) == []
    (v,) = env.check(state, {"hp.setpoint_c": 80.5}, now=0)
    assert v.rule == "hp.setpoint_c.max" and v.kind == "limit"
    assert v.reason == "hp.setpoint_c.max: hp.setpoint_c=80.5 is above the maximum 80"
    assert v.values == {"hp.setpoint_c": 80.5}
    assert rules_of(env.check(state, {"hp.setpoint_c": -1}, now=0)) == ["hp.setpoint_c.min"]
    assert rules_of(env.check(state, {"hp.rpm": 11}, now=0)) == ["hp.rpm.max"]
    for bad in ("hot", None, True, float("nan"), float("inf")):
        (v,) = env.check(state, {"hp.setpoint_c": bad}, now=0)
        assert "is not a finite number" in v.reason, bad


def test_allowed_values() -> None:
    env = load_envelope(
        "channels:\n  enc.lid: {allowed: [open, closed]}\n  x.mode: {allowed: [1, 2]}\n"
    )
    assert env.check({}, {"enc.lid": "open"}, now=0) == []
    (v,) = env.check({}, {"enc.lid": "ajar"}, now=0)
    assert v.rule == "enc.lid.allowed" and v.kind == "allowed"
    assert v.reason == "enc.lid.allowed: enc.lid='ajar' is not one of 'open', 'closed'"
    assert env.check({}, {"x.mode": 2.0}, now=0) == []
    assert rules_of(env.check({}, {"x.mode": True}, now=0)) == ["x.mode.allowed"]  # True is not 1


def test_rate_of_change_uses_the_time_of_the_last_change() -> None:
    env = load_envelope("channels:\n  hp.setpoint_c: {min: 0, max: 80, max_rate_per_min: 10}\n")
    ledger = Ledger()
    ledger.start(0.0)
    state: dict[str, Any] = {"hp.setpoint_c": 20.0}
    # no change recorded yet: counts from the state's value at the ledger's start (t=0)
    (v,) = env.check(state, {"hp.setpoint_c": 30.0}, now=30.0, ledger=ledger)
    assert v.rule == "hp.setpoint_c.max_rate_per_min" and v.kind == "rate"
    assert "rise from 20.0 to 30.0 within 30 s" in v.reason and "allows 5.0" in v.reason
    assert env.check(state, {"hp.setpoint_c": 25.0}, now=30.0, ledger=ledger) == []
    env.commit(state, {"hp.setpoint_c": 25.0}, now=30.0, ledger=ledger)
    state["hp.setpoint_c"] = 25.0
    # 6 s later: 1 degC allowed, either way
    assert env.check(state, {"hp.setpoint_c": 26.0}, now=36.0, ledger=ledger) == []
    assert rules_of(env.check(state, {"hp.setpoint_c": 27.0}, now=36.0, ledger=ledger)) == [
        "hp.setpoint_c.max_rate_per_min"
    ]
    (v,) = env.check(state, {"hp.setpoint_c": 20.0}, now=36.0, ledger=ledger)
    assert "fall from 25.0 to 20.0" in v.reason
    # the same value again is no change; the last change stays at t=30
    env.commit(state, {"hp.setpoint_c": 25.0}, now=80.0, ledger=ledger)
    assert ledger.last_change("hp.setpoint_c") == (25.0, 30.0)
    assert env.check(state, {"hp.setpoint_c": 40.0}, now=120.0, ledger=ledger) == []
    # the envelope's own ledger is used when none is given, and is independent
    assert env.ledger is not ledger and env.ledger.last_change("hp.setpoint_c") is None


def test_rise_only_rate_allows_any_decrease() -> None:
    env = load_envelope("channels:\n  hp.setpoint_c: {min: 0, max: 80, max_rise_per_min: 10}\n")
    ledger = Ledger()
    ledger.start(0.0)
    state = {"hp.setpoint_c": 60.0}
    assert env.check(state, {"hp.setpoint_c": 0.0}, now=0.0, ledger=ledger) == []
    (v,) = env.check(state, {"hp.setpoint_c": 61.0}, now=0.0, ledger=ledger)
    assert v.rule == "hp.setpoint_c.max_rise_per_min"
    # with no value known, a channel starts from its minimum at the ledger's start
    assert env.check({}, {"hp.setpoint_c": 10.0}, now=60.0, ledger=ledger) == []
    assert rules_of(env.check({}, {"hp.setpoint_c": 10.5}, now=60.0, ledger=ledger)) == [
        "hp.setpoint_c.max_rise_per_min"
    ]


def test_cross_channel_rules_refuse_any_command_whose_post_state_breaks_them() -> None:
    env = reference_envelope()
    state = dict(SAFE_BENCH)
    (v,) = env.check(state, {"hotplate.heater": True}, now=0)
    assert v.rule == "heater-needs-stirring-and-closed-lid" and v.kind == "rule"
    assert v.reason == (
        "rule heater-needs-stirring-and-closed-lid: hotplate.heater=True, "
        "hotplate.stirrer_rpm=0, enclosure.lid='closed'"
    )
    stirring = {**state, "hotplate.stirrer": True, "hotplate.stirrer_rpm": 300}
    assert env.check(stirring, {"hotplate.heater": True}, now=0) == []
    # already violated (the lid was opened while heating): an unrelated command is refused too
    heating_open = {**stirring, "hotplate.heater": True, "enclosure.lid": "open"}
    assert rules_of(env.check(heating_open, {"enclosure.intensity": 0.5}, now=0)) == [
        "heater-needs-stirring-and-closed-lid"
    ]
    # capacity: the vessel's volume is a channel limited by its max
    (v,) = env.check({**state, "vial.volume": 2.7}, {"vial.volume": 2.9}, now=0)
    assert v.rule == "vial.volume.max"
    assert v.reason == "vial.volume.max: vial.volume=2.9 is above the maximum 2.8"
    assert env.check(state, {"vial.volume": 2.8}, now=0) == []


def test_a_rule_that_cannot_be_evaluated_refuses() -> None:
    env = reference_envelope()
    state = {k: v for k, v in SAFE_BENCH.items() if k != "enclosure.lid"}
    state.update({"hotplate.stirrer": True, "hotplate.stirrer_rpm": 300})
    (v,) = env.check(state, {"hotplate.heater": True}, now=0)
    assert v.rule == "heater-needs-stirring-and-closed-lid"
    assert "cannot be evaluated (unknown name 'enclosure.lid')" in v.reason
    assert "enclosure.lid=<unknown>" in v.reason
    # ... but with the heater off the implication does not need the lid
    assert env.check(state, {"hotplate.stirrer_rpm": 0}, now=0) == []
    weird = load_envelope("rules:\n  - {name: odd, when: x.a}\n")
    (v,) = weird.check({"x.a": 3}, {}, now=0)
    assert "evaluated to 3, not true/false" in v.reason


def test_budgets_over_rolling_windows() -> None:
    env = load_envelope(
        "vessels:\n  beaker: {max: 5, fed_by: [a]}\n"
        "budgets:\n  added_per_day: {counts: beaker.added, per: day, max: 50, unit: mL}\n"
        "  experiments_per_hour: 2\n"
    )
    ledger = Ledger()
    added = "beaker.added"
    env.commit({}, {}, now=0.0, consumes={added: 49.5}, ledger=ledger)
    assert env.check({}, {}, now=10.0, consumes={added: 0.5}, ledger=ledger) == []
    (v,) = env.check({}, {}, now=10.0, consumes={added: 0.6}, ledger=ledger)
    assert v.rule == "budget.added_per_day" and v.kind == "budget"
    assert v.reason == "budget added_per_day: 49.5 mL used in the last day + 0.6 mL asked > 50 mL"
    assert env.check({}, {}, now=86400.5, consumes={added: 10}, ledger=ledger) == []
    for t in (0.0, 100.0):
        assert env.check_budget("experiments", 1, now=t, ledger=ledger) == []
        env.commit({}, {}, now=t, consumes={"experiments": 1}, ledger=ledger)
    assert rules_of(env.check_budget("experiments", 1, now=3599.0, ledger=ledger)) == [
        "budget.experiments_per_hour"
    ]
    assert env.check_budget("experiments", 1, now=3600.5, ledger=ledger) == []
    assert ledger.used(added, 86400, 10.0) == pytest.approx(49.5)
    copy = ledger.copy()
    copy.consume(added, 1.0, 11.0)
    assert ledger.used(added, 86400, 11.0) == pytest.approx(49.5)  # copies are independent


# ------------------------------------------------------------------ loading
def test_yaml_errors_name_file_line_and_field(tmp_path: Path) -> None:
    cases = {
        "channels:\n  hotplate.setpoint_c: {min: 0, mx: 80}\n": (
            2,
            "channels.hotplate.setpoint_c.mx: unknown key 'mx'",
        ),
        "channels:\n  a.b:\n    min: 5\n    max: 1\n": (3, "channels.a.b.min: min 5 > max 1"),
        "channel:\n  a.b: {min: 1}\n": (1, "channel: unknown key 'channel'"),
        "channels:\n  setpoint: {min: 1}\n": (2, "channels.setpoint: channel names are"),
        "channels:\n  a.b: {min: one}\n": (2, "channels.a.b.min: must be a number, got 'one'"),
        "channels:\n  a.b: {allowed: []}\n": (2, "channels.a.b.allowed: must be a non-empty list"),
        "channels:\n  a.b: {max_rate_per_min: -1}\n": (2, "max_rate_per_min: must be > 0"),
        "channels:\n  a.b: {min: 1}\n  a.b: {min: 2}\n": (3, "channels.a.b: duplicate key 'a.b'"),
        "rules:\n  - name: r\n    whenn: a.b\n": (3, "rules[0].whenn: unknown key 'whenn'"),
        "rules:\n  - name: r\n": (2, "rules[0]: missing 'when'"),
        "rules:\n  - {name: r, when: a.b}\n  - {name: r, when: a.c}\n": (
            3,
            "rules[1].name: duplicate rule name 'r'",
        ),
        "rules:\n  name: r\n": (1, "rules: must be a list"),
        "rules:\n  - {name: r, when: 3}\n": (2, "rules[0].when: must be a rule text"),
        "budgets:\n  dye_per_week: 5\n": (2, "budgets.dye_per_week: a budget is {counts:"),
        "budgets:\n  experiments_per_day: -5\n": (2, "budgets.experiments_per_day: must be >= 0"),
        "budgets:\n  b: {counts: vial.added, per: day, max: 1}\n": (
            2,
            "budgets.b.counts: cannot count 'vial.added'; known: experiments",
        ),
        "budgets:\n  b: {counts: experiments, per: week, max: 1}\n": (
            2,
            "budgets.b.per: must be minute, hour or day",
        ),
        "vessels:\n  v: {max: 3, capacity: 2}\n": (2, "vessels.v.max: max 3 > capacity 2"),
        "vessels:\n  v: {max: 1, fed_by: a}\n": (2, "vessels.v.fed_by: must be a list"),
        "vessels:\n  v: {max: 1, fed_by: [a], drained_by: [a]}\n": (2, "a both feeds and drains"),
        "vessels:\n  v: {max: 1, fed_by: [a]}\n  w: {max: 1, drained_by: [a]}\n": (
            3,
            "vessels.w: 'a' already feeds or drains vessel 'v'",
        ),
        "channels:\n  a.b: {unbounded: ''}\n": (2, "channels.a.b.unbounded: give the reason"),
        "channels: [1, 2]\n": (1, "channels: must be a mapping"),
        "channels:\n  a.b: {min: 1\n": (3, "not valid YAML"),
    }
    for text, (line, message) in cases.items():
        path = tmp_path / "lab.yaml"
        path.write_text(text)
        with pytest.raises(EnvelopeError) as info:
            load_envelope(path)
        assert str(info.value).startswith(f"{path}:{line}: "), (text, str(info.value))
        assert message in str(info.value), (text, str(info.value))
        assert info.value.line == line


def test_a_rule_that_does_not_parse_names_file_line_and_column_in_the_yaml() -> None:
    text = (
        "channels:\n"
        "  hotplate.setpoint_c: {max: 80}\n"
        "rules:\n"
        "  - name: plain\n"
        "    when: hotplate.heater -> > 3\n"
    )
    with pytest.raises(RuleSyntaxError) as info:
        load_envelope(text, source="lab.yaml")
    assert str(info.value) == (
        "lab.yaml:5:30: unexpected token '>' in rule \"hotplate.heater -> > 3\""
    )
    quoted = text.replace("when: hotplate.heater -> > 3", "when: 'hotplate.heater -> > 3'")
    with pytest.raises(RuleSyntaxError) as info:
        load_envelope(quoted, source="lab.yaml")
    assert (info.value.line, info.value.column, info.value.token) == (5, 31, ">")
    block = text.replace("when: hotplate.heater -> > 3", "when: |\n      a.b and\n      c.d ==")
    with pytest.raises(RuleSyntaxError) as info:
        load_envelope(block, source="lab.yaml")
    assert (info.value.line, info.value.column) == (7, 13)
    assert "unexpected end of rule" in str(info.value)


def test_unknown_instruments_or_channels_when_known_is_given() -> None:
    text = "channels:\n  red.volume: {max: 2.8}\nrules:\n  - name: h\n    when: heater.on -> red.volume < 1\n"
    assert load_envelope(text).names() == {"red.volume", "heater.on"}
    with pytest.raises(EnvelopeError) as info:
        load_envelope(text, source="lab.yaml", known=BENCH)
    assert str(info.value).startswith("lab.yaml:5: rules[0].when: unknown instrument 'heater'")
    with pytest.raises(EnvelopeError) as info:
        load_envelope(text, source="lab.yaml", known={"heater": None, "red": {"rate_ml_min"}})
    assert "lab.yaml:2: channels.red.volume: unknown channel 'red.volume'" in str(info.value)
    load_envelope(text, known=["heater", "red.volume"])  # exact channel names work too
    with pytest.raises(EnvelopeError, match="unknown channel 'red.rate'"):
        load_envelope("channels:\n  red.rate: {max: 1}\n", known=["red.volume"])


def test_loading_from_a_mapping_text_or_path(tmp_path: Path) -> None:
    data = {"channels": {"a.b": {"min": 0, "max": 1}}, "budgets": {"experiments_per_hour": 3}}
    env = load_envelope(data, source="lab.yaml:stations.a")
    assert env.channels["a.b"].max == 1 and env.budgets[0].window_s == 3600
    with pytest.raises(EnvelopeError) as info:
        load_envelope({"channels": {"a.b": {"min": 2, "max": 1}}}, source="cfg")
    assert str(info.value) == "cfg: channels.a.b.min: min 2 > max 1"  # no line for plain data
    path = tmp_path / "env.yml"
    path.write_text("channels:\n  a.b: {max: 3}\n")
    assert load_envelope(str(path)).source == str(path)
    assert load_envelope(path, source="x").channels["a.b"].max == 3
    assert load_envelope("").channels == {}
    with pytest.raises(EnvelopeError, match="cannot read"):
        load_envelope(tmp_path / "missing.yaml")
    with pytest.raises(EnvelopeError, match="an envelope is a mapping"):
        load_envelope("- 1\n- 2\n")


# ------------------------------------------------------------------ the reference bench
def test_reference_envelope_encodes_the_bench_facts() -> None:
    env = reference_envelope(known=BENCH)
    assert isinstance(env, Envelope)
    assert env.channels["hotplate.setpoint_c"].max == 80
    assert env.channels["hotplate.setpoint_c"].max_rise_per_min == 10
    assert env.channels["hotplate.stirrer_rpm"].max == 1200
    assert {r.name for r in env.rules} == {"heater-needs-stirring-and-closed-lid"}
    vial = env.vessels["vial"]
    assert (vial.max, vial.capacity, vial.fed_by, vial.drained_by) == (
        2.8,
        3.0,
        ("red", "green", "blue"),
        ("waste",),
    )
    assert env.channels["vial.volume"].max == 2.8
    assert {b.name: (b.resource, b.limit) for b in env.budgets} == {
        "experiments_per_hour": ("experiments", 30),
        "dye_ml_per_day": ("vial.added", 50),
    }
    assert {b.name: b.limit for b in env.budgets} == {
        "experiments_per_hour": 30,
        "dye_ml_per_day": 50,
    }
    assert reference_envelope().ledger is not env.ledger  # each call: a fresh ledger


def test_reference_envelope_refuses_heater_on_with_the_lid_open() -> None:
    env = reference_envelope(known=BENCH)
    station = layout(env)
    view = {**SAFE_BENCH, "hotplate.stirrer": True, "hotplate.stirrer_rpm": 300}
    heat = Command("hotplate", "set_heater", {"on": True, "setpoint_c": 25.0}, "test")
    ok = assess(heat, layout=station, envelope=env, view=view, now=0)
    assert ok.allowed, ok.reason
    a = assess(heat, layout=station, envelope=env, view={**view, "enclosure.lid": "open"}, now=0)
    assert not a.allowed and a.rule == "heater-needs-stirring-and-closed-lid"
    assert "enclosure.lid='open'" in a.reason
    hot = Command("hotplate", "set_heater", {"on": True, "setpoint_c": 85.0}, "test")
    a = assess(hot, layout=station, envelope=env, view=view, now=3600)
    assert a.rule == "hotplate.setpoint_c.max"
    fast = Command("red", "dispense", {"volume_ml": 0.5, "rate_ml_min": 25.0}, "test")
    a = assess(fast, layout=station, envelope=env, view=view, now=0)
    assert a.rule == "red.rate_ml_min.max"


# ------------------------------------------------------------------ monitors
MONITORS_YAML = """\
monitors:
  - name: too-hot
    kind: threshold
    channel: plate.liquid_c
    trip_above: 80
    clear_below: 75.5
  - name: too-cold
    kind: threshold
    channel: plate.liquid_c
    trip_below: 2
    clear_above: 4
  - name: plate-stale
    kind: staleness
    channel: plate.plate_c
    max_age_s: 2
    grace_s: 5
    clear_age_s: 1
  - name: box-heartbeat
    kind: heartbeat
    channel: box.heartbeat_age_s
    max_age_s: 1.5
  - name: door-open-while-heating
    kind: interlock
    trip_when: >-
      (plate.heating or plate.heater)
      and box.door != "closed"
    doc: an example with other instrument names than the reference bench
  - name: plate-tripped
    kind: interlock
    trip_when: plate.tripped and plate.heater
    confirm: true
"""


def test_monitors_section_loads_each_kind_and_builds_fresh_monitors() -> None:
    from safety.monitors import Heartbeat, Interlock, Staleness, Threshold

    env = load_envelope(MONITORS_YAML, source="lab.yaml", known=["plate", "box"])
    specs = {m.name: m for m in env.monitors}
    assert [m.kind for m in env.monitors] == [
        "threshold",
        "threshold",
        "staleness",
        "heartbeat",
        "interlock",
        "interlock",
    ]
    assert specs["too-hot"].line == 2 and specs["plate-stale"].line == 12
    assert specs["door-open-while-heating"].channels == (
        "plate.heating",
        "plate.heater",
        "box.door",
    )
    assert "box.door" in env.names() and "box.heartbeat_age_s" in env.names()
    built = {m.name: m for m in env.build_monitors()}
    hot = built["too-hot"]
    assert isinstance(hot, Threshold)
    assert (hot.channel, hot.trip_above, hot.clear_below) == ("plate.liquid_c", 80.0, 75.5)
    cold = built["too-cold"]
    assert isinstance(cold, Threshold) and (cold.trip_below, cold.clear_above) == (2.0, 4.0)
    stale = built["plate-stale"]
    assert isinstance(stale, Staleness) and not isinstance(stale, Heartbeat)
    assert (stale.max_age_s, stale.grace_s, stale.clear_age_s) == (2.0, 5.0, 1.0)
    beat = built["box-heartbeat"]
    assert isinstance(beat, Heartbeat) and (beat.max_age_s, beat.grace_s) == (1.5, 1.5)
    door = built["door-open-while-heating"]
    assert isinstance(door, Interlock) and not door.confirm
    assert door.trip_when is not None and door.trip_when.line == 25  # the block scalar's text
    assert isinstance(built["plate-tripped"], Interlock) and built["plate-tripped"].confirm
    # each call builds new monitors (a monitor keeps its arming time: one per supervisor)
    assert all(a is not b for a, b in zip(env.build_monitors(), env.build_monitors(), strict=True))
    assert env.fresh().monitors == env.monitors
    assert load_envelope("channels: {}\n").build_monitors() == []


def test_monitors_section_errors_name_file_line_and_field(tmp_path: Path) -> None:
    one = "monitors:\n  - name: m\n"
    cases = {
        "monitors: {m: 1}\n": (1, "monitors: must be a list of {name, kind, ...}"),
        "monitors:\n  - 3\n": (2, "monitors[0]: a monitor is a mapping"),
        one + "    channel: a.b\n": (2, "monitors[0]: missing 'kind'"),
        one + "    kind: watchdog\n": (
            3,
            "monitors[0].kind: unknown kind 'watchdog'; known: threshold, staleness, heartbeat, "
            "interlock",
        ),
        "monitors:\n  - {name: 'a b', kind: threshold}\n": (2, "monitors[0].name: a monitor name"),
        one + "    kind: threshold\n    trip_above: 1\n": (
            2,
            "monitors[0]: missing 'channel' (a threshold monitor needs channel)",
        ),
        one + "    kind: threshold\n    channel: a.b\n    max_age_s: 1\n": (
            5,
            "monitors[0].max_age_s: unknown key 'max_age_s' for a threshold monitor",
        ),
        one + "    kind: threshold\n    channel: nodot\n    trip_above: 1\n": (
            4,
            "monitors[0].channel: a channel is '<instrument>.<channel>', got 'nodot'",
        ),
        one + "    kind: threshold\n    channel: a.b\n    trip_above: hot\n": (
            5,
            "monitors[0].trip_above: must be a number, got 'hot'",
        ),
        one + "    kind: threshold\n    channel: a.b\n": (
            2,
            "monitors[0]: threshold m: give trip_above and/or trip_below",
        ),
        one + "    kind: threshold\n    channel: a.b\n    trip_above: 80\n    clear_below: 85\n": (
            6,
            "monitors[0].clear_below: threshold m: clear_below 85.0 is above trip_above 80.0",
        ),
        one + "    kind: staleness\n    channel: a.b\n": (
            2,
            "monitors[0]: missing 'max_age_s' (a staleness monitor needs channel, max_age_s)",
        ),
        one + "    kind: staleness\n    channel: a.b\n    max_age_s: 0\n": (
            5,
            "monitors[0].max_age_s: staleness m: max_age_s must be > 0",
        ),
        one + "    kind: heartbeat\n    channel: a.b\n    max_age_s: 1\n    grace_s: -1\n": (
            6,
            "monitors[0].grace_s: must be >= 0 (real seconds), got -1",
        ),
        one + "    kind: interlock\n    trip_when: 3\n": (
            4,
            "monitors[0].trip_when: must be a rule text (a string), got 3",
        ),
        one + "    kind: interlock\n    trip_when: a.b\n    confirm: yes please\n": (
            5,
            "monitors[0].confirm: must be true or false, got 'yes please'",
        ),
        one + "    kind: interlock\n    trip_when: a.b\n    doc: 4\n": (
            5,
            "monitors[0].doc: must be a string",
        ),
        one + "    kind: interlock\n    trip_when: a.b\n  - name: m\n    kind: interlock\n"
        "    trip_when: a.c\n": (5, "monitors[1].name: duplicate monitor name 'm'"),
    }
    for text, (line, message) in cases.items():
        path = tmp_path / "lab.yaml"
        path.write_text(text)
        with pytest.raises(EnvelopeError) as info:
            load_envelope(path)
        assert str(info.value).startswith(f"{path}:{line}: "), (text, str(info.value))
        assert message in str(info.value), (text, str(info.value))


def test_a_monitor_condition_that_does_not_parse_names_file_line_and_column() -> None:
    text = "monitors:\n  - name: m\n    kind: interlock\n    trip_when: a.b and and c.d\n"
    with pytest.raises(RuleSyntaxError) as info:
        load_envelope(text, source="lab.yaml")
    assert str(info.value).startswith("lab.yaml:4:24: ")


def test_monitor_channels_must_name_the_stations_instruments() -> None:
    text = (
        "monitors:\n"
        "  - {name: hot, kind: threshold, channel: plate.liquid_c, trip_above: 80}\n"
        "  - name: door\n"
        "    kind: interlock\n"
        "    trip_when: plate.heater and furnace.door != 'closed'\n"
    )
    with pytest.raises(EnvelopeError) as info:
        load_envelope(text, source="lab.yaml", known=["hotplate"])
    assert str(info.value).startswith(
        "lab.yaml:2: monitors[0].channel: unknown instrument 'plate' (in 'plate.liquid_c')"
    )
    assert "in monitor hot" in str(info.value)
    with pytest.raises(EnvelopeError) as info:
        load_envelope(text, source="lab.yaml", known=["plate"])
    assert str(info.value).startswith(
        "lab.yaml:3: monitors[1].trip_when: unknown instrument 'furnace' (in 'furnace.door')"
    )
    with pytest.raises(EnvelopeError, match="unknown channel 'plate.liquid_c'"):
        load_envelope(text, known={"plate": {"heater"}, "furnace": None})
    load_envelope(text, known=["plate", "furnace"])


def test_reference_envelope_declares_the_bench_monitors() -> None:
    env = reference_envelope(known=BENCH)
    assert {m.name: m.kind for m in env.monitors} == {
        "liquid-overtemp": "threshold",
        "hotplate-reading-stale": "staleness",
        "enclosure-heartbeat-stale": "heartbeat",
        "enclosure-offline": "interlock",
        "lid-open-while-heating": "interlock",
    }
    # the hotplate's watchdog and the pumps' alarms are its drivers' declared faults, watched
    # without a word in the envelope (tests/test_devicefaults.py); it changes none of them
    assert env.fault_settings == []
    specs = {m.name: m for m in env.monitors}
    assert dict(specs["liquid-overtemp"].params) == {
        "channel": "hotplate.liquid_c",
        "trip_above": 80.0,
        "clear_below": 75.0,
    }
    assert dict(specs["hotplate-reading-stale"].params) == {
        "channel": "hotplate.plate_c",
        "max_age_s": 3.0,
        "grace_s": 5.0,
    }
    assert dict(specs["enclosure-heartbeat-stale"].params) == {
        "channel": "enclosure.heartbeat_age_s",
        "max_age_s": 2.0,
        "grace_s": 5.0,
    }
    assert specs["lid-open-while-heating"].channels == (
        "hotplate.heating",
        "hotplate.heater_enabled",
        "hotplate.heater",
        "enclosure.lid",
    )


def test_the_yaml_examples_of_docs_safety_md_load_as_written() -> None:
    import re

    text = (Path(__file__).parent.parent / "docs" / "safety.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    full = load_envelope(blocks[0], source="docs/safety.md", known=BENCH)
    assert [m.name for m in full.monitors] == [
        "liquid-overtemp",
        "hotplate-reading-stale",
        "lid-open-while-heating",
    ]
    monitors = load_envelope(blocks[1], source="docs/safety.md", known=BENCH)
    reference = {m.name: m for m in reference_envelope().monitors}
    for spec in monitors.monitors:  # the examples say what the reference bench declares
        assert spec.kind == reference[spec.name].kind
        assert spec.channels == reference[spec.name].channels
    # the device faults' settings: names the faults the drivers really declare
    from instruments.drivers.hotplate import Hotplate
    from instruments.drivers.ph_meter import PhMeter
    from safety.devicefaults import fault_monitors

    settings = load_envelope(blocks[2], source="docs/safety.md", known=[*BENCH, "ph"])
    assert settings.monitors == []
    assert [(f.name, f.disabled is None, f.when is None) for f in settings.fault_settings] == [
        ("ph.not-immersed", True, False),
        ("hotplate.probe-fault", False, True),
    ]
    built, off = fault_monitors({"hotplate": Hotplate, "ph": PhMeter}, settings.fault_settings)
    assert off == {"hotplate.probe-fault": "no liquid probe fitted on this bench"}
    assert "hotplate.stirrer" in {
        c for m in built for c in m.channels if m.name == "ph.not-immersed"
    }
