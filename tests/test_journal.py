"""Journal: state machine, durability settings, idempotent campaigns, resume, and kill -9.

The crash test runs a real child process that journals experiments as fast as
it can (each step takes a few ms, like a very fast physical step), kills it
with SIGKILL at random points, and checks from outside that every transition
the child had reported as committed is there, the database is intact, and
resume marks the in-flight experiment interrupted without losing a result.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loops.journal import (
    EXPERIMENT_STATES,
    JOURNAL_API,
    NEXT_STATES,
    SCHEMA_VERSION,
    AsyncJournal,
    CampaignMismatch,
    IllegalTransition,
    Journal,
    JournalError,
    StepOrderError,
    UnknownCampaign,
    UnknownExperiment,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    j = Journal(tmp_path / "journal.db")
    j.create_campaign("c", "test campaign", {"budget": 10})
    yield j
    j.close()


def drive(j: Journal, state: str, campaign: str = "c", station: str = "bench-a") -> str:
    """A new experiment taken along a legal path to ``state``."""
    eid = j.propose(campaign, {"red": 0.5}, "optimizer")
    paths = {
        "proposed": [],
        "awaiting-approval": ["awaiting-approval"],
        "checked": ["checked"],
        "rejected": ["rejected"],
        "cancelled": ["cancelled"],
        "queued": ["checked", "queued"],
        "running": ["checked", "queued", "running"],
        "done": ["checked", "queued", "running", "done"],
        "failed": ["checked", "queued", "running", "failed"],
        "interrupted": ["checked", "queued", "running", "interrupted"],
    }
    for s in paths[state]:
        if s == "done":
            j.finish(eid, {"de": 1.0}, 1.0)
        elif s == "awaiting-approval":
            j.await_approval(eid, ["a rule asked"], time.time() + 3600)
        elif s == "rejected":
            j.reject(eid, ["too much dye"])
        elif s == "queued":
            j.transition(eid, s, station=station)
        else:
            j.transition(eid, s, reason="because" if s in ("failed", "interrupted") else None)
    assert j.experiment(eid).state == state
    return eid


# ---------------------------------------------------------------- durability
def test_wal_and_synchronous_full_are_set(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path) as j:
        s = j.settings()
        assert s["journal_mode"] == "wal"
        assert s["synchronous"] == "FULL"
        assert s["foreign_keys"] is True
        assert s["schema_version"] == SCHEMA_VERSION
        # the pragmas as SQLite reports them on the journal's own connection
        conn = j._db()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        j.create_campaign("c", "n", "---\nbudget: 3\n---\n# body\n")
        eid = j.propose("c", {"x": 1}, "agent:claude")
        # committed before returning: another connection sees it at once
        other = sqlite3.connect(path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
            row = other.execute("SELECT state, proposer FROM experiments WHERE id = ?", (eid,))
            assert row.fetchone() == ("proposed", "agent:claude")
        finally:
            other.close()
        assert Path(str(path) + "-wal").exists()
        stats = j.commit_stats()
        assert stats["count"] == 2 and stats["median_ms"] > 0 and stats["p99_ms"] >= 0
    with pytest.raises(JournalError, match="not durable"):
        Journal(":memory:")


def test_schema_version_migration_and_append_only_log(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path) as j:
        j.create_campaign("c", "n", {})
        eid = j.propose("c", {}, "operator:alice")
    with Journal(path) as j:  # reopening does not migrate again or lose data
        assert j.experiment(eid).proposer == "operator:alice"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE transitions SET state = 'done'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM transitions")
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(JournalError, match="newer than this labbridge"):
        Journal(path)


def test_a_version_1_journal_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    from loops.journal._schema import _MIGRATIONS

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in _MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = 1")
        conn.execute("INSERT INTO campaigns VALUES ('c', 'n', '{}', 0, 'running', NULL, 0)")
    finally:
        conn.close()
    with Journal(path) as j:
        assert j.settings()["schema_version"] == SCHEMA_VERSION == 5
        assert j.campaign("c").state == "running"
        eid = j.propose("c", {"x": 1}, "optimizer")
        j.transition(eid, "checked")
        j.transition(eid, "queued", station="s1")
        j.transition(eid, "running")
        verdict = {
            "allowed": False,
            "station": "s1",
            "command": {
                "instrument": "red",
                "action": "dispense",
                "params": {},
                "who": "optimizer",
            },
            "reason": "vial-capacity: 3.1 mL > 2.8",
            "rule": "vial-capacity",
            "values": {"total": 3.1},
            "t": 12.5,
        }
        image = {"sha256": "ab" * 32, "path": "/x/ab.jpg", "bytes": 1234}
        j.record_evidence(eid, verdicts=[verdict], images={"outcome": image})
        j.record_evidence(eid, images={"outcome": image})  # idempotent for the same image
        [stored] = j.verdicts("c")
        assert stored["experiment_id"] == eid and stored["who"] == "optimizer"
        assert (stored["allowed"], stored["rule"], stored["values"]) == (
            False,
            "vial-capacity",
            {"total": 3.1},
        )
        assert j.verdicts("c", "c-9999") == []
        assert j.images(eid) == {"outcome": image}


def test_connection_is_confined_to_its_thread(journal: Journal) -> None:
    errors: list[BaseException] = []

    def use() -> None:
        try:
            journal.propose("c", {}, "optimizer")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=use, name="other-thread")
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], sqlite3.ProgrammingError)


# ----------------------------------------------------------------- campaigns
def test_create_campaign_is_idempotent_with_exist_ok(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        program = {"space": {"red": [0, 1]}, "budget": 30}
        first = j.create_campaign("cm", "colour match", program)
        again = j.create_campaign(
            "cm", "colour match", {"budget": 30, "space": {"red": [0, 1]}}, exist_ok=True
        )
        assert again == first and again.state == "running" and again.program == program
        with pytest.raises(JournalError, match="already exists"):
            j.create_campaign("cm", "colour match", program)
        with pytest.raises(CampaignMismatch, match="different program"):
            j.create_campaign("cm", "colour match", {"budget": 31}, exist_ok=True)
        with pytest.raises(CampaignMismatch, match="different name"):
            j.create_campaign("cm", "other", program, exist_ok=True)
        assert [c.id for c in j.campaigns()] == ["cm"]
        j.set_campaign_state("cm", "paused", reason="operator")
        assert j.campaign("cm").state == "paused"
        with pytest.raises(ValueError, match="unknown campaign state"):
            j.set_campaign_state("cm", "sleeping")
        with pytest.raises(UnknownCampaign):
            j.campaign("nope")
        with pytest.raises(UnknownCampaign):
            j.propose("nope", {}, "optimizer")


# ------------------------------------------------------------- state machine
def test_legal_path_writes_row_and_log(journal: Journal) -> None:
    eid = journal.propose("c", {"red": np.float64(0.4), "n": np.int64(3)}, "optimizer:random")
    assert eid == "c-0001"
    assert journal.propose("c", {}, "optimizer") == "c-0002"
    journal.transition(eid, "checked", recipe=[{"op": "dispense", "pump": "red", "volume_ml": 0.4}])
    journal.transition(eid, "queued", station="bench-a")
    journal.transition(eid, "running")
    journal.step_started(eid, 0, {"op": "dispense"})
    journal.step_done(eid, 0, {"dispensed_ml": 0.4})
    journal.step_started(eid, 1, {"op": "measure"})
    journal.step_done(eid, 1)
    tid = journal.finish(
        eid, {"lab": np.array([50.0, 1.0, 2.0])}, 3.5, verified=True, optimizer_state={"n": 1}
    )
    e = journal.experiment(eid)
    assert (e.state, e.station, e.step, e.objective, e.verified) == (
        "done",
        "bench-a",
        1,
        3.5,
        True,
    )
    assert e.params == {"red": 0.4, "n": 3} and e.result == {"lab": [50.0, 1.0, 2.0]}
    assert e.recipe[0]["pump"] == "red"
    assert journal.campaign("c").optimizer_state == {"n": 1}
    log = journal.transitions(eid)
    assert [(t.event, t.state, t.step) for t in log] == [
        ("state", "proposed", None),
        ("state", "checked", None),
        ("state", "queued", None),
        ("state", "running", None),
        ("step_started", "running", 0),
        ("step_done", "running", 0),
        ("step_started", "running", 1),
        ("step_done", "running", 1),
        ("state", "done", None),
    ]
    assert log[-1].id == tid and log[-1].data is not None and log[-1].data["objective"] == 3.5
    assert log[0].data == {"params": {"red": 0.4, "n": 3}, "proposer": "optimizer:random"}
    assert [t.id for t in log] == sorted(t.id for t in log)
    journal.mark_verified(eid, False, reason="camera fill level disagrees")
    assert journal.experiment(eid).trusted is False
    assert [e.id for e in journal.experiments("c", "done")] == [eid]
    assert [e.id for e in journal.experiments("c", ["proposed", "done"])] == [eid, "c-0002"]


def test_every_illegal_transition_is_refused_and_changes_nothing(journal: Journal) -> None:
    legal = illegal = 0
    for start in EXPERIMENT_STATES:
        for target in EXPERIMENT_STATES:
            if target in ("done", "awaiting-approval"):
                continue  # only through finish() and await_approval(): checked below
            eid = drive(journal, start)
            if start == "awaiting-approval" and target == "checked":
                journal.decide(eid, True, "ana", "checked by hand")  # else refused: below
            before = journal.transitions(eid)
            reason = "why" if target in ("failed", "interrupted", "rejected") else None
            if target in NEXT_STATES[start]:
                journal.transition(eid, target, reason=reason, station="bench-b")
                assert journal.experiment(eid).state == target
                legal += 1
            else:
                with pytest.raises(IllegalTransition) as err:
                    journal.transition(eid, target, reason=reason)
                assert f"'{start}' -> '{target}'" in str(err.value) and eid in str(err.value)
                assert (err.value.from_state, err.value.to_state) == (start, target)
                assert journal.experiment(eid).state == start
                assert journal.transitions(eid) == before  # rolled back, no log row
                illegal += 1
    assert legal == sum(len(v - {"done", "awaiting-approval"}) for v in NEXT_STATES.values())
    assert illegal > 50
    for start in EXPERIMENT_STATES:
        eid = drive(journal, start)
        if start == "running":
            continue
        with pytest.raises(IllegalTransition, match=f"'{start}' -> 'done'"):
            journal.finish(eid, {}, 1.0)
    with pytest.raises(JournalError, match="finish"):
        journal.transition(drive(journal, "running"), "done")
    with pytest.raises(JournalError, match="await_approval"):
        journal.transition(drive(journal, "proposed"), "awaiting-approval")
    for start in EXPERIMENT_STATES:
        eid = drive(journal, start)
        if start == "proposed":
            continue
        with pytest.raises(IllegalTransition, match=f"'{start}' -> 'awaiting-approval'"):
            journal.await_approval(eid, ["a rule asked"], time.time() + 60)
    waiting = drive(journal, "awaiting-approval")  # nothing runs that nobody approved
    with pytest.raises(IllegalTransition, match="nobody approved it"):
        journal.transition(waiting, "checked")
    journal.decide(waiting, False, "ana", "too hot")
    with pytest.raises(IllegalTransition, match="nobody approved it"):
        journal.transition(waiting, "checked")


def test_transition_arguments_are_validated(journal: Journal) -> None:
    eid = drive(journal, "proposed")
    with pytest.raises(ValueError, match="unknown experiment state 'bogus'"):
        journal.transition(eid, "bogus")
    with pytest.raises(ValueError, match="needs a reason"):
        journal.transition(eid, "rejected")
    with pytest.raises(ValueError, match="at least one reason"):
        journal.reject(eid, [])
    with pytest.raises(UnknownExperiment):
        journal.transition("c-9999", "checked")
    with pytest.raises(ValueError, match="proposer"):
        journal.propose("c", {}, "somebody")
    with pytest.raises(ValueError, match="proposer"):
        journal.propose("c", {}, "agent:")
    with pytest.raises(TypeError, match="mapping"):
        journal.propose("c", [1, 2], "optimizer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        journal.propose("c", {"x": object()}, "optimizer")
    journal.transition(eid, "checked")
    journal.transition(eid, "queued")  # no station yet
    with pytest.raises(JournalError, match="needs the station"):
        journal.transition(eid, "running")
    journal.transition(eid, "running", station="bench-c")
    assert journal.experiment(eid).station == "bench-c"
    with pytest.raises(ValueError, match="not finite"):
        journal.finish(eid, {}, float("nan"))
    rid = drive(journal, "proposed")
    journal.reject(rid, ["step 2: heater without stirring", "step 0: dyes total 3.1 mL > 2.8"])
    r = journal.experiment(rid)
    assert r.reason is not None and "3.1 mL" in r.reason
    logged = journal.transitions(rid)[-1].data
    assert logged is not None and logged["reasons"][0].startswith("step 2")


def test_steps_are_never_started_twice(journal: Journal) -> None:
    eid = drive(journal, "running")
    with pytest.raises(StepOrderError, match="last step event is none"):
        journal.step_done(eid, 0)
    journal.step_started(eid, 0, {"op": "dispense"})
    with pytest.raises(StepOrderError, match="not recorded done"):
        journal.step_started(eid, 1)
    with pytest.raises(StepOrderError, match="not recorded done"):
        journal.finish(eid, {}, 1.0)
    with pytest.raises(StepOrderError):
        journal.step_done(eid, 1)
    journal.step_done(eid, 0)
    with pytest.raises(StepOrderError):
        journal.step_done(eid, 0)
    with pytest.raises(StepOrderError, match="never run twice"):
        journal.step_started(eid, 0)
    journal.step_started(eid, 2)  # a recipe may skip a step index; never go back
    with pytest.raises(ValueError, match="int >= 0"):
        journal.step_started(eid, -1)
    journal.fail(eid, "pump stalled")  # a step in progress may fail
    with pytest.raises(IllegalTransition, match="'failed' -> 'running'"):
        journal.step_started(eid, 3)
    queued = drive(journal, "queued")
    with pytest.raises(IllegalTransition, match="'queued' -> 'running'"):
        journal.step_started(queued, 0)


def test_write_all_is_one_transaction_all_or_nothing(journal: Journal) -> None:
    eid = drive(journal, "running")
    commits = journal.commit_stats()["count"]
    ids = journal.write_all(
        [
            ("step_started", (eid, 0, {"op": "read"}), {}),
            ("step_started", (eid, 1), {"done": (0, {"x": 1})}),
        ]
    )
    assert len(ids) == 2 and journal.commit_stats()["count"] == commits + 1  # one commit
    before = journal.transitions(eid)
    with pytest.raises(StepOrderError, match="step 2 started and is not recorded done"):
        journal.write_all(
            [
                ("step_started", (eid, 2), {"done": (1, {})}),
                ("step_started", (eid, 0), {}),
            ]
        )
    assert journal.transitions(eid) == before  # the second refused: the first rolled back
    with pytest.raises(ValueError, match="write 0 names 'write_all', not a journal method"):
        journal.write_all([("write_all", ([],), {})])
    journal.write_all([("step_done", (eid, 1, {"y": 2}), {})])
    steps = [(t.event, t.step) for t in journal.transitions(eid) if t.event.startswith("step")]
    assert steps == [("step_started", 0), ("step_done", 0), ("step_started", 1), ("step_done", 1)]


def test_optimizer_state_is_saved_atomically_with_the_transition(journal: Journal) -> None:
    eid = drive(journal, "running")
    journal.save_optimizer_state("c", {"told": 0})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        journal.finish(eid, {"de": 2.0}, 2.0, optimizer_state={"model": object()})
    e = journal.experiment(eid)  # the whole transaction rolled back: no result, still running
    assert (e.state, e.result, e.objective) == ("running", None, None)
    assert journal.campaign("c").optimizer_state == {"told": 0}
    journal.finish(eid, {"de": 2.0}, 2.0, optimizer_state={"told": 1, "ids": [eid]})
    assert journal.campaign("c").optimizer_state == {"told": 1, "ids": [eid]}
    bad = drive(journal, "proposed")
    journal.reject(bad, ["unsafe"], optimizer_state={"told": 2, "ids": [eid, bad]})
    assert journal.campaign("c").optimizer_state == {"told": 2, "ids": [eid, bad]}


# ---------------------------------------------------------------------- resume
def test_resume_marks_running_interrupted_and_requeues_unstarted(journal: Journal) -> None:
    done = drive(journal, "done")
    failed = drive(journal, "failed")
    rejected = drive(journal, "rejected")
    proposed = drive(journal, "proposed")
    checked = drive(journal, "checked")
    queued = drive(journal, "queued", station="bench-b")
    mid_step = drive(journal, "running")
    journal.step_started(mid_step, 0, {"op": "dispense", "pump": "red"})
    journal.step_done(mid_step, 0)
    journal.step_started(mid_step, 1, {"op": "heat", "setpoint_c": 60})
    between = drive(journal, "running", station="bench-b")
    journal.step_started(between, 0, {"op": "dispense"})
    journal.step_done(between, 0)
    no_step = drive(journal, "running", station="bench-c")
    journal.save_optimizer_state("c", {"told": [done]})

    info = journal.resume("c")
    assert [e.id for e in info.finished] == [done]
    assert info.finished[0].result == {"de": 1.0}
    assert [e.id for e in info.failed] == [failed]
    assert [e.id for e in info.rejected] == [rejected]
    assert [e.id for e in info.requeued] == [checked, queued]
    assert [e.id for e in info.pending_proposals] == [proposed, checked, queued]
    assert all(e.station is None for e in info.pending_proposals)
    assert info.optimizer_state == {"told": [done]}
    assert info.next_seq == 10
    by_id = {i.experiment.id: i for i in info.interrupted}
    assert list(by_id) == [mid_step, between, no_step]
    m = by_id[mid_step]
    assert (m.station, m.last_step_started, m.last_step_done, m.steps_done, m.marked_now) == (
        "bench-a",
        1,
        False,
        (0,),
        True,
    )
    assert m.last_step == {"op": "heat", "setpoint_c": 60}
    assert m.experiment.state == "interrupted"
    assert m.experiment.reason is not None and "step 1 was in progress" in m.experiment.reason
    b = by_id[between]
    assert (b.station, b.last_step_started, b.last_step_done) == ("bench-b", 0, True)
    n = by_id[no_step]
    assert (n.last_step_started, n.last_step_done, n.last_step) == (None, False, None)
    assert journal.experiments("c", ["running", "queued", "checked"]) == []

    # idempotent: a second resume changes nothing and still reports the unresolved ones
    log_before = journal.campaign_log("c")
    again = journal.resume("c")
    assert [i.experiment.id for i in again.interrupted] == [mid_step, between, no_step]
    assert not any(i.marked_now for i in again.interrupted)
    assert again.interrupted[0].last_step_started == 1
    assert len(journal.campaign_log("c")) == len(log_before) + 1  # only the 'resumed' event

    # an interrupted experiment is never run again; it is resolved as failed after a check
    with pytest.raises(IllegalTransition, match="'interrupted' -> 'running'"):
        journal.transition(mid_step, "running")
    with pytest.raises(IllegalTransition):
        journal.step_started(mid_step, 2)
    journal.fail(mid_step, "interrupted at step 1 (heat): station safe-stated and checked")
    assert [i.experiment.id for i in journal.resume("c").interrupted] == [between, no_step]
    # the requeued proposal is dry-run again and runs normally
    journal.transition(queued, "checked")
    journal.transition(queued, "queued", station="bench-a")
    journal.transition(queued, "running")


def test_what_a_run_measured_goes_with_its_last_step_and_resume_recovers_it(
    journal: Journal,
) -> None:
    """``step_done(measured=...)`` on the recipe's last step keeps the run's result and JPEGs
    in that step's transaction; the outcome recorded later adds to it (the verification);
    resume returns a measured run without an outcome in ``recovered``."""
    recipe = {"name": "r", "params": {}, "steps": [{"kind": "read"}, {"kind": "compute"}]}
    eid = journal.propose("c", {"red": 0.5}, "optimizer", recipe=recipe)
    for state in ("checked", "queued", "running"):
        journal.transition(eid, state, station="bench-a" if state == "queued" else None)
    measured = {"ok": True, "measurements": {"de": 1.5}, "audit": [{"rule": None}]}
    jpeg = b"\xff\xd8 a frame \xff\xd9"
    journal.step_started(eid, 0)
    with pytest.raises(JournalError, match="goes with its last step \\(1\\), not step 0"):
        journal.step_done(eid, 0, measured=measured)
    with pytest.raises(ValueError, match="images go with measured= only"):
        journal.step_done(eid, 0, images={"outcome": jpeg})
    assert journal.measured(eid) is None  # refused whole: the step is still open
    journal.step_done(eid, 0)
    journal.step_started(eid, 1)
    journal.step_done(eid, 1, {"de": 1.5}, measured=measured, images={"outcome": jpeg})
    assert journal.measured(eid) == measured and journal.outcome(eid) is None
    assert journal.outcome_images(eid) == {"outcome": jpeg}

    other = drive(journal, "running", station="bench-b")  # a step open: interrupted
    journal.step_started(other, 0)
    info = journal.resume("c")
    assert [(r.experiment.id, r.outcome, r.images) for r in info.recovered] == [
        (eid, measured, {"outcome": jpeg})
    ]
    assert info.completed == [] and [i.experiment.id for i in info.interrupted] == [other]
    assert journal.experiment(eid).state == "running"
    (row,) = [t.data for t in journal.campaign_log("c") if (t.data or {}).get("resumed")]
    assert row["recovered"] == [eid] and row["interrupted"] == [other]

    with pytest.raises(JournalError, match="another content"):
        journal.record_outcome(eid, {}, images={"outcome": b"another frame"})
    added = {"verification": {"verified": True}, "ok": "as given"}
    journal.record_outcome(eid, added, images={"outcome": jpeg})  # kept already: once
    (event,) = [t for t in journal.transitions(eid) if t.event == "outcome"]
    assert event.data == {"data": added}
    outcome = {**measured, **added}  # what the outcome adds, over what was measured
    assert journal.outcome(eid) == outcome
    info = journal.resume("c")  # now a journaled outcome: recorded as it is
    assert [r.experiment.id for r in info.completed] == [eid] and info.recovered == []
    assert info.completed[0].outcome == outcome
    journal.finish(eid, {"de": 1.5}, 1.5)
    assert journal.outcome_images(eid) == {}  # final: on disk now


def test_to_rows_is_flat_with_the_same_keys_everywhere(journal: Journal) -> None:
    a = journal.propose("c", {"red": 0.1, "temp_c": 40}, "optimizer")
    b = journal.propose("c", {"red": 0.2, "hold_s": 30}, "agent:a1")
    for eid in (a, b):
        journal.transition(eid, "checked")
        journal.transition(eid, "queued", station="s1")
        journal.transition(eid, "running")
    journal.finish(a, {"de": 4.2, "lab": [50, 2, 3]}, 4.2)
    journal.fail(b, "sensor dropout")
    rows = journal.to_rows("c")
    assert [r["experiment"] for r in rows] == [a, b]
    assert all(list(r) == list(rows[0]) for r in rows)
    assert rows[0]["param.temp_c"] == 40 and rows[0]["param.hold_s"] is None
    assert rows[0]["result.de"] == 4.2 and rows[0]["result.lab"] == "[50,2,3]"
    assert rows[1]["state"] == "failed" and rows[1]["reason"] == "sensor dropout"
    assert rows[1]["proposer"] == "agent:a1" and rows[1]["result.de"] is None
    with pytest.raises(UnknownCampaign):
        journal.to_rows("nope")


# ------------------------------------------------------------------ async
async def test_async_journal_runs_on_one_thread_in_call_order(tmp_path: Path) -> None:
    async with await AsyncJournal.open(tmp_path / "a.db") as aj:
        assert (await aj.call(Journal.settings))["synchronous"] == "FULL"
        await aj.call(Journal.create_campaign, "c", "n", {}, exist_ok=True)
        ids = await asyncio.gather(
            *(aj.call(Journal.propose, "c", {"i": i}, "optimizer") for i in range(20))
        )
        assert ids == [f"c-{i:04d}" for i in range(1, 21)]
        assert [e.params["i"] for e in await aj.call(Journal.experiments, "c")] == list(range(20))
        await aj.call(Journal.transition, ids[0], "checked")
        await aj.call(Journal.transition, ids[0], "queued", station="s")
        await aj.call(Journal.transition, ids[0], "running")
        await aj.call(Journal.step_started, ids[0], 0, {"op": "hold"})
        info = await aj.call(Journal.resume, "c")
        assert info.interrupted[0].last_step_started == 0
        assert [t.name for t in threading.enumerate() if t.name.startswith("journal")]
        with pytest.raises(IllegalTransition):
            await aj.call(Journal.transition, ids[1], "running")
        # only the journal's API is forwarded: not close(), not a private helper
        with pytest.raises(ValueError, match="not a journal method"):
            aj.call(Journal.close)
        with pytest.raises(ValueError, match="not a journal method"):
            aj.call(Journal._db)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("journal")]
    await aj.aclose()  # idempotent
    with pytest.raises(JournalError, match="closed"):
        await aj.call(Journal.campaign, "c")
    with pytest.raises(JournalError, match="not durable"):
        await AsyncJournal.open(":memory:")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("journal")]


def test_the_journal_api_is_every_public_journal_method_but_close() -> None:
    public = {n for n in dir(Journal) if not n.startswith("_") and callable(getattr(Journal, n))}
    assert public - JOURNAL_API == {"close"}
    assert {"propose", "transition", "finish", "resume", "to_rows"} <= JOURNAL_API


# ------------------------------------------------------------------- kill -9
CHILD = r"""
import sys, time
from loops.journal import Journal

path, step_s = sys.argv[1], float(sys.argv[2])
j = Journal(path)
j.create_campaign("crash", "kill -9 test", {"objective": "y"}, exist_ok=True)
info = j.resume("crash")

def log(tid, eid, event, state, step=None):
    print("T", tid, eid, event, state, "-" if step is None else step, flush=True)

for it in info.interrupted:  # here the station would be safe-stated and checked
    log(j.fail(it.experiment.id, "interrupted: station checked, not re-run"),
        it.experiment.id, "state", "failed")
pending = [e.id for e in info.pending_proposals]
n_done = len(info.finished)
print("READY", info.next_seq, flush=True)
while True:
    if pending:
        eid = pending.pop(0)
    else:
        eid = j.propose("crash", {"x": n_done * 0.1}, "optimizer")
        log(j.transitions(eid)[-1].id, eid, "state", "proposed")
    seq = int(eid.rsplit("-", 1)[1])
    if seq % 7 == 0:
        log(j.reject(eid, ["step 0: too much dye"]), eid, "state", "rejected")
        continue
    log(j.transition(eid, "checked", recipe=[{"op": f"op{i}"} for i in range(4)]),
        eid, "state", "checked")
    log(j.transition(eid, "queued", station="bench-a"), eid, "state", "queued")
    log(j.transition(eid, "running"), eid, "state", "running")
    failed = False
    for i in range(4):
        log(j.step_started(eid, i, {"op": f"op{i}"}), eid, "step_started", "running", i)
        time.sleep(step_s)  # the physical step
        if seq % 5 == 0 and i == 1:
            log(j.fail(eid, "pump stalled"), eid, "state", "failed")
            failed = True
            break
        log(j.step_done(eid, i, {"i": i}), eid, "step_done", "running", i)
    if failed:
        continue
    n_done += 1
    tid = j.finish(eid, {"seq": seq, "y": seq * 0.5}, seq * 0.5,
                   optimizer_state={"told": n_done, "last": eid})
    log(tid, eid, "state", "done")
"""


def _read_lines(
    proc: subprocess.Popen[bytes], buf: bytearray, until: Any, deadline: float
) -> list[str]:
    """Read complete stdout lines from the child until ``until(line)`` is true."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"journal child exited early (rc={proc.wait()}): {err}")
        buf.extend(chunk)
        while b"\n" in buf:
            raw, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            line = raw.decode()
            lines.append(line)
            if until(line):
                return lines
    raise AssertionError(f"journal child: no expected line before the deadline; got {lines[-3:]}")


def _parse(lines: list[str]) -> list[tuple[int, str, str, str, int | None]]:
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 6 and parts[0] == "T":
            step = None if parts[5] == "-" else int(parts[5])
            out.append((int(parts[1]), parts[2], parts[3], parts[4], step))
    return out


def _check_after_kill(
    db: Path, reported: dict[int, tuple[str, str, str, int | None]], context: str
) -> int:
    """Invariants after a SIGKILL; returns how many experiments resume marked interrupted."""
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)], context
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == [], context
    finally:
        raw.close()
    with Journal(db) as j:
        log = {t.id: t for t in j.campaign_log("crash")}
        for tid, (eid, event, state, step) in reported.items():
            assert tid in log, f"{context}: reported transition {tid} ({eid} {state}) lost"
            t = log[tid]
            assert (t.experiment_id, t.event, t.state, t.step) == (eid, event, state, step), context
        info = j.resume("crash")
        exps = {e.id: e for e in j.experiments("crash")}
        assert not [e.id for e in exps.values() if e.state in ("checked", "queued", "running")]
        # every finished result kept, exactly as written
        finished = {e.id: e for e in info.finished}
        reported_done = {eid for eid, ev, st, _ in reported.values() if st == "done"}
        assert reported_done <= set(finished), context
        for e in finished.values():
            assert e.result == {"seq": e.seq, "y": e.seq * 0.5} and e.objective == e.seq * 0.5
        # the optimizer state was saved in the same transaction as the last finish
        done_log = [t for t in log.values() if t.event == "state" and t.state == "done"]
        if done_log:
            assert info.optimizer_state is not None
            assert info.optimizer_state["told"] == len(finished), context
            assert info.optimizer_state["last"] == max(done_log, key=lambda t: t.id).experiment_id
        # nothing ran twice; interrupted experiments only ever go on to 'failed'
        per_exp: dict[str, list[Any]] = {}
        for t in sorted(log.values(), key=lambda t: t.id):
            if t.experiment_id is not None:
                per_exp.setdefault(t.experiment_id, []).append(t)
        for eid, ts in per_exp.items():
            started = [t.step for t in ts if t.event == "step_started"]
            assert started == sorted(set(started)), f"{context}: {eid} steps {started}"
            assert sum(1 for t in ts if t.event == "state" and t.state == "running") <= 1
            states = [t.state for t in ts if t.event == "state"]
            if "interrupted" in states:
                assert states[states.index("interrupted") + 1 :] in ([], ["failed"]), states
        # each interrupted experiment carries its last started step, as the log has it
        for it in info.interrupted:
            ts = per_exp[it.experiment.id]
            started = [t.step for t in ts if t.event == "step_started"]
            last = started[-1] if started else None
            assert it.last_step_started == last, context
            assert it.last_step_done == any(
                t.event == "step_done" and t.step == last for t in ts
            ), context
            if last is not None:
                assert it.last_step == {"op": f"op{last}"}
        # the experiment the child last reported as mid-step is interrupted at that step or later
        if reported:
            eid = reported[max(reported)][0]
            events = [(ev, s) for _, (e, ev, _, s) in sorted(reported.items()) if e == eid]
            last_started = [s for ev, s in events if ev == "step_started" and s is not None]
            if events[-1][0] == "step_started" and exps[eid].state == "interrupted":
                it = next(i for i in info.interrupted if i.experiment.id == eid)
                assert it.last_step_started is not None
                assert it.last_step_started >= last_started[-1], context
        return sum(1 for i in info.interrupted if i.marked_now)


@pytest.mark.timeout(60)
def test_kill9_at_random_points_loses_nothing_and_reruns_nothing(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    db = tmp_path / "crash.db"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    reported: dict[int, tuple[str, str, str, int | None]] = {}
    interrupted = 0
    began = time.monotonic()
    for kill in range(5):
        context = f"seed {seed}, kill {kill}"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), "0.004"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            buf = bytearray()
            lines = _read_lines(proc, buf, lambda s: s.startswith("READY"), time.monotonic() + 20)
            time.sleep(rng.uniform(0.05, 0.5))
            if kill % 2:  # kill right after a physical step was reported started
                lines += _read_lines(
                    proc, buf, lambda s: " step_started " in s, time.monotonic() + 10
                )
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        assert proc.returncode == -signal.SIGKILL, context
        text = bytes(buf) + out
        complete = text[: text.rfind(b"\n") + 1].decode().splitlines()  # drop a torn last line
        for tid, eid, event, state, step in _parse(lines + complete):
            reported[tid] = (eid, event, state, step)
        interrupted += _check_after_kill(db, reported, context)
    assert sum(1 for v in reported.values() if v[2] == "done") >= 1, f"seed {seed}"
    assert interrupted >= 1, f"seed {seed}: no kill landed inside a running experiment"
    assert time.monotonic() - began < 30
