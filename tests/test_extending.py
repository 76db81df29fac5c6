"""A driver package built outside the source tree runs a guarded campaign, labbridge unedited.

The package is docs/extending.md's own ``file=`` blocks (``tinylab``: a dosing-pump and a
pH-probe driver with declared commands, a simulator on loopback sockets, a compute
function, a ``.dist-info`` with real entry points), written to a temporary folder put on
``sys.path``, found through ``importlib.metadata`` (groups ``labbridge.drivers`` and
``labbridge.functions``). The campaign runs in this process (LocalStation + AsyncJournal,
as tests/test_campaign_local.py): an out-of-envelope proposal is refused by the dry run and
none of its commands reaches the simulator's wire; in-envelope ones run and their
measurements reach the optimizer and the journal, each verified by the program's declared
checks (trusted); a pump that jams makes its result untrusted, with the failing check's
reason in the journal. Afterwards the package is gone again.

The dosing pump counts its doses (``Add("doses", value=1)``): a dose is reserved in the
journal before the pump gets its ``D`` line, and a budget over the count refuses the next
dose, also on a new station actor (a restart).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docpages import write_files
from reference import ObservedJournal

import instruments
from bridge.labconfig import load_lab
from loops import functions
from loops.campaign import CampaignRunner
from loops.journal import AsyncJournal, Journal
from loops.program import load_program
from loops.programmodel import Budget
from loops.stations import LocalStation, StationActor
from safety import SafetyError


def _forget_tinylab() -> None:
    for name in [m for m in sys.modules if m == "tinylab" or m.startswith("tinylab.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    functions.refresh()


@pytest.fixture
def tinylab(tmp_path: Path) -> Iterator[Path]:
    """The package on sys.path, discovered by entry points; removed (and caches cleared) after."""
    folder = tmp_path / "site"
    written = {p.relative_to(folder).as_posix() for p in write_files("extending.md", folder)}
    assert {"tinylab/drivers.py", "tinylab-0.1.dist-info/entry_points.txt"} <= written
    sys.path.insert(0, str(folder))
    _forget_tinylab()
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        _forget_tinylab()
        assert "tinylab-pump" not in instruments.available_drivers()
        assert "off_target" not in functions.registry()


@pytest.mark.timeout(120)
async def test_an_outside_driver_package_runs_a_guarded_campaign(tinylab: Path) -> None:
    from tinylab.sim import Bench  # type: ignore[import-not-found]

    assert instruments.driver_class("tinylab-pump").__module__ == "tinylab.drivers"
    assert callable(functions.resolve("off_target"))
    program = load_program(tinylab / "program.md")
    events: list[dict[str, Any]] = []
    async with Bench(speed=300) as bench:
        lab = load_lab(bench.lab_yaml(str(tinylab / "lab.yaml"), str(tinylab / "sim-lab.yaml")))
        assert lab.check() == []
        st = lab.stations["bench"]
        async with await AsyncJournal.open(lab.store) as journal:
            station = LocalStation(
                StationActor(
                    "bench",
                    list(st.instruments),
                    st.envelope_text,
                    journal=journal,
                    verification={"enabled": True},
                )
            )
            await station.call(StationActor.start)
            try:
                # the lab's set-up recipe (blank.yaml), through the same guard
                (blank,) = st.setup
                assert (blank.name, blank.every, blank.keep) == ("blank", "campaign", ("blank_ph",))
                kept = await station.call(
                    StationActor.run_setup, blank.recipe.as_dict(), list(blank.keep)
                )
                assert kept["blank_ph"] > 8, kept  # the base alone
                assert "D 1.000 8.00" in bench.received["base"]
                assert "W 1.500 25.00" in bench.received["drain"]
                runner = CampaignRunner(
                    program, journal, {"bench": station}, campaign_id="c1", on_event=events.append
                )
                await runner.prepare()
                wire_before = {n: list(v) for n, v in bench.received.items()}
                refused = await runner.propose({"acid_ml": 2.5, "base_ml": 2.5}, "agent:t")
                # refused by the safety layer's dry run (the program's own constraints allow it)
                assert not refused.accepted
                assert any("beaker.volume.max" in r for r in refused.reasons), refused.reasons
                acting = {n: [x for x in v if x[0] in "DWS"] for n, v in bench.received.items()}
                assert acting == {
                    n: [x for x in v if x[0] in "DWS"] for n, v in wire_before.items()
                }
                accepted = await runner.propose({"acid_ml": 1.0, "base_ml": 1.2}, "agent:t")
                assert accepted.accepted, accepted.reasons
                summary = await runner.run()
                status = await station.call(StationActor.status)
                # the acid pump jams after 0.3 mL: its result is kept, untrusted
                bench.pumps["acid"].jam_ml = 0.3
                one = dataclasses.replace(program, budget=Budget(experiments=1))
                jam_runner = CampaignRunner(one, journal, {"bench": station}, campaign_id="c2")
                await jam_runner.prepare()
                jammed = await jam_runner.propose({"acid_ml": 1.0, "base_ml": 1.2}, "agent:t")
                assert jammed.accepted, jammed.reasons
                jam_summary = await jam_runner.run()
            finally:
                await station.call(StationActor.stop)
    assert not status["tripped"], status.get("trip")
    assert list(status["monitors"]) == ["probe-reading-stale"]  # the envelope's, no other
    assert summary.state == "done", summary
    assert summary.counts["done"] == 4 and summary.counts["run"] == 4, summary.counts
    # nothing of the refused proposal reached a pump: no 2.5 mL move was ever sent
    assert "D 2.500 8.00" not in bench.received["acid"] + bench.received["base"]
    assert "W 5.500 25.00" not in bench.received["drain"]
    j = Journal(lab.store)
    try:
        exps = {e.id: e for e in j.experiments("c1")}
        assert exps[refused.experiment_id].state == "rejected"
        done = [e for e in exps.values() if e.state == "done"]
        assert len(done) == 4
        # every run's volumes went over the wire as the guard let them through ...
        for e in done:
            assert f"D {e.params['acid_ml']:.3f} 8.00" in bench.received["acid"]
            assert f"D {e.params['base_ml']:.3f} 8.00" in bench.received["base"]
        # ... and its measurement reached the journal and the optimizer
        agent_run = exps[accepted.experiment_id]
        assert agent_run.state == "done" and agent_run.objective is not None
        assert 0 <= agent_run.objective < 3
        told = j.campaign("c1").optimizer_state["told"]
        assert {e.id for e in done} <= set(told)
        # ... each verified by the program's declared checks: trusted
        for e in done:
            assert e.verified is True and e.trusted, (e.id, e.reason)
            checks = e.result["verification"]["checks"]
            assert set(checks) == {"delivered", "not above the blank"}
            assert all(c["ok"] for c in checks.values()), checks
        # the jammed run: done, its value kept, its check's verdict in the journal
        assert jam_summary.counts["done"] == 1, jam_summary.counts
        (bad,) = j.experiments("c2")
        assert bad.id == jammed.experiment_id and bad.state == "done"
        assert bad.verified is False and not bad.trusted
        assert bad.reason is not None and bad.reason.startswith("unverified: delivered: ")
        assert "not within ±0.01" in bad.reason, bad.reason
        assert bad.result["verification"]["checks"]["delivered"]["value"] < -0.6
        assert bad.result["verification"]["checks"]["not above the blank"]["ok"] is True
    finally:
        j.close()
    finished = [e for e in events if e["event"] == "finished"]
    assert len(finished) == 4


def test_the_core_names_no_bench() -> None:
    """Issue 10's "done when": no word of the reference bench in loops/ or safety/ code
    (``grep -rniwE 'dye|dyes|vial|red|green|blue|colou?r|waste|delta_e2000' loops safety
    --include=*.py``); the bundled programs and envelopes (data) may name it."""
    root = Path(__file__).resolve().parents[1]
    word = re.compile(r"\b(dye|dyes|vial|red|green|blue|colou?r|waste|delta_e2000)\b", re.I)
    found = [
        f"{p.relative_to(root)}:{n}: {line.strip()}"
        for folder in ("loops", "safety")
        for p in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if word.search(line)
    ]
    assert found == []


@pytest.mark.timeout(60)
async def test_a_counted_dose_is_reserved_before_it_acts_and_its_budget_outlives_the_actor(
    tinylab: Path,
) -> None:
    from tinylab.sim import Bench  # type: ignore[import-not-found]

    async with Bench(speed=300) as bench:
        wire: list[tuple[float, str, str]] = []  # when each line reached a device
        answer = bench.answer

        def heard(name: str, line: str) -> str:
            wire.append((time.monotonic(), name, line))
            return str(answer(name, line))

        bench.answer = heard
        lab = load_lab(bench.lab_yaml(str(tinylab / "lab.yaml"), str(tinylab / "sim-lab.yaml")))
        st = lab.stations["bench"]
        budget = "base_doses_per_hour: {counts: base.doses, per: hour, max: 120}"
        assert budget in st.envelope_text
        envelope = st.envelope_text.replace(budget, budget.replace("120", "1"))
        (blank,) = st.setup  # one dose of base

        def actor(journal: Any) -> LocalStation:
            return LocalStation(
                StationActor("bench", list(st.instruments), envelope, journal=journal)
            )

        async with await AsyncJournal.open(lab.store) as journal:
            observed = ObservedJournal(journal)
            station = actor(observed)
            await station.call(StationActor.start)
            try:
                await station.call(StationActor.run_setup, blank.recipe.as_dict(), list(blank.keep))
                doses = [
                    (t, row)
                    for t, rows in observed.reservations
                    for row in rows
                    if row[0] == "base.doses"
                ]
                dispensed = [t for t, name, line in wire if name == "base" and line[0] == "D"]
                assert len(doses) == 1 and doses[0][1][1] == 1.0, observed.reservations
                assert len(dispensed) == 1 and doses[0][0] < dispensed[0]  # on disk first
                with pytest.raises(SafetyError, match="budget base_doses_per_hour: 1.0 used"):
                    await station.call(
                        StationActor.run_setup, blank.recipe.as_dict(), list(blank.keep)
                    )
            finally:
                await station.call(StationActor.stop)
            with Journal(lab.store) as j:  # settled: the dose counted, nothing left reserved
                assert j.consumption("bench", reserved=True) == []
                counted = [a for r, a, _, _ in j.consumption("bench") if r == "base.doses"]
                assert counted == [1.0]
            restarted = actor(journal)  # a new actor reads the dose back from the journal
            await restarted.call(StationActor.start)
            try:
                with pytest.raises(SafetyError, match="budget base_doses_per_hour"):
                    await restarted.call(
                        StationActor.run_setup, blank.recipe.as_dict(), list(blank.keep)
                    )
            finally:
                await restarted.call(StationActor.stop)
        assert [line for _, name, line in wire if name == "base" and line[0] == "D"] == [
            "D 1.000 8.00"
        ]


def test_labbridge_check_names_a_budget_over_a_counter_no_driver_declares(tinylab: Path) -> None:
    envelope = tinylab / "envelope.yaml"
    text = envelope.read_text()
    assert "counts: base.doses" in text
    envelope.write_text(text.replace("counts: base.doses", "counts: base.dosez"))
    (problem,) = load_lab(tinylab / "lab.yaml").check()
    line = 1 + text.splitlines().index(
        "  base_doses_per_hour: {counts: base.doses, per: hour, max: 120}"
    )
    assert problem.startswith(
        f"{envelope}:{line}: budgets.base_doses_per_hour.counts: cannot count 'base.dosez': "
    ), problem
    assert "its counters: acid.doses, base.doses, drain.doses" in problem
