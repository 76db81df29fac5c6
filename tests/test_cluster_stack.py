"""The stack out of the way (issue 17): a station's next proposal claimed while it runs one
(loops/campaignahead.py), the journal records of steps that only look sent without
waiting (loops/stationrun.py), and the per-experiment stack timers (loops/stacktime.py)
that benchmarks/scale.py reads; the bench-time model of benchmarks/scale.py.

On one simulated bench in this process (tests/reference.py ``local_bench``): real drivers,
guard and journal.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from reference import local_bench

from benchmarks.scale import bench_model
from benchmarks.scaletables import where
from loops.campaign import CampaignRunner
from loops.checks import run_checks
from loops.journal import AsyncJournal, Journal, StaleOwner, StepOrderError
from loops.program import load_program
from loops.recipe import Result, build_recipe
from loops.stacktime import StackTimer, cpu_part, current_timer, timing
from loops.stationrun import step_acts, step_waits
from loops.stationverify import EarlyVerification
from loops.stationwrites import StepWrites
from loops.urgentlock import UrgentLock

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
PARAMS = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 30.0, "hold_s": 30}


@pytest.mark.timeout(120)
async def test_the_next_proposal_is_claimed_while_the_station_runs_and_every_step_is_journaled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = load_program(EXAMPLE)
    program = dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=3),
        stop=dataclasses.replace(base.stop, target=None),
    )
    events: list[dict[str, Any]] = []
    async with local_bench(tmp_path, monkeypatch) as b:
        runner = CampaignRunner(
            program,
            b.journal,
            {"bench-a": b.station},
            campaign_id="ahead",
            clock_now=b.now,
            on_event=events.append,
        )
        runner.claim_ahead = True
        summary = await runner.run()
        station = b.station.actor._require()
        recipe = build_recipe(program, PARAMS)
        acts = [step_acts(station, s, "optimizer") for s in recipe.steps]
        waits = {
            (s.kind, s.params.get("command"), str(s.params.get("args"))): step_waits(
                station, s, "optimizer", ()
            )
            for s in recipe.steps
        }
    assert summary.counts["done"] == 3 and summary.counts["cancelled"] == 0, summary.counts
    with Journal(b.lab.store) as j:
        exps = j.experiments("ahead")
        logs = {e.id: j.transitions(e.id) for e in exps}
    assert [e.state for e in exps] == ["done"] * 3  # never more claimed than the budget allows
    at = {eid: {t.state: t.t for t in log if t.event == "state"} for eid, log in logs.items()}
    for before, after in zip(exps, exps[1:], strict=False):
        # claimed ahead: proposed and dry-run while the one before still ran
        assert at[after.id]["checked"] < at[before.id]["done"], (at[before.id], at[after.id])
        assert at[after.id]["running"] > at[before.id]["done"]
    for e in exps:
        states = [t.state for t in logs[e.id] if t.event == "state"]
        assert states == ["proposed", "checked", "queued", "running", "done"], states
        steps = [(t.event, t.step) for t in logs[e.id] if t.event.startswith("step")]
        n = len(e.recipe["steps"])
        # every step started in order, each done with the next one's start (the last alone)
        assert [s for ev, s in steps if ev == "step_started"] == list(range(n)), steps
        assert steps[-1] == ("step_done", n - 1), steps
    # the steps that act are the calls that send something and the ramp; reads, waits,
    # holds, captures and computations only look
    kinds = {(s.kind, s.params.get("command")): a for s, a in zip(recipe.steps, acts, strict=True)}
    assert kinds[("call", "dispense")] and kinds[("call", "set_heater")]
    assert kinds[("call", "withdraw")] and kinds[("ramp", "set_heater")]
    assert not kinds[("call", "measure")] and not kinds[("call", "wait_until_stopped")]
    for kind in ("read", "wait", "hold", "capture", "compute"):
        assert not kinds[(kind, None)], kind
    # of the steps that act, those that only make the bench safer are not waited for
    assert not waits[("call", "set_heater", "{'on': False}")]
    assert waits[("call", "set_stirrer", "{'on': False}")]  # the guard does not class it safer
    assert not waits[("call", "set_light", "{'on': False}")]
    on = [k for k in waits if k[1] == "set_light" and "'on': True" in k[2]]
    assert len(on) == 1 and waits[on[0]]
    assert waits[("ramp", "set_heater", "{'on': True}")]
    assert [k for k, w in waits.items() if w and k[0] != "call"] == [
        ("ramp", "set_heater", "{'on': True}")
    ]
    # each finished event says where its stack time went: the station's run (its bench
    # time among it), the tell; the proposals claimed ahead under ahead:
    finished = [e for e in events if e["event"] == "finished"]
    assert len(finished) == 3
    for i, event in enumerate(finished):
        stack = event["stack"]
        assert stack["station:bench"]["wall_s"] > 0 and stack["station:run"]["count"] == 1
        assert stack["station:bench"]["wall_s"] < stack["station:run"]["wall_s"]
        assert stack["tell"]["count"] == 1 and stack["station:dry_run"]["cpu_s"] > 0
        assert ("ahead:ask" in stack) == (i > 0), stack.keys()


@pytest.mark.timeout(120)
async def test_a_proposal_claimed_ahead_that_never_runs_is_closed_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = load_program(EXAMPLE)
    program = dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=5),
        stop=dataclasses.replace(base.stop, target=None),
    )
    async with local_bench(tmp_path, monkeypatch) as b:
        runner = CampaignRunner(
            program,
            b.journal,
            {"bench-a": b.station},
            campaign_id="stop",
            clock_now=b.now,
            # told to stop as its first experiment starts: the one claimed ahead never runs
            on_event=lambda e: e["event"] == "started" and runner.stop("enough"),
        )
        runner.claim_ahead = True
        summary = await runner.run()
    assert summary.counts["done"] == 1, summary.counts
    with Journal(b.lab.store) as j:
        exps = j.experiments("stop")
        state = j.campaign("stop").optimizer_state
    assert [e.state for e in exps][0] == "done"
    cancelled = [e for e in exps if e.state == "cancelled"]
    assert len(exps) <= 2 and len(cancelled) == len(exps) - 1, [(e.id, e.state) for e in exps]
    for e in cancelled:
        assert e.reason == "campaign ended before it ran (enough)", e.reason
    assert state is not None and not state["pending"], state  # the optimizer forgot it


def test_the_bench_time_model_and_the_stack_parts() -> None:
    # three experiments of 10, 20 and 5 s on two stations: 10 | 20, then 5 on the first
    benches = [("a", 10.0, 9.0), ("b", 20.0, 8.0), ("c", 5.0, 1.0)]
    assert bench_model(benches, 2, target=2.0) == 15.0
    assert bench_model(benches, 2, target=None) == 20.0  # no target: the last one done
    assert bench_model(benches, 1, target=8.5) == 30.0
    assert bench_model(benches, 3, target=0.5) == 20.0  # never reached: to the end
    timer = StackTimer()
    timer.add("journal.finish", 0.004)
    timer.add("station.run", 1.0)
    timer.merge(
        {
            "run": {"count": 1, "wall_s": 0.95, "cpu_s": 0.0},
            "bench": {"count": 20, "wall_s": 0.9, "cpu_s": 0.0},
            "journal.step_started": {"count": 10, "wall_s": 0.03, "cpu_s": 0.0},
            "dry_run": {"count": 1, "wall_s": 0.002, "cpu_s": 0.002},
        },
        "station:",
    )
    parts = where(timer.as_dict(), idle_s=0.11)
    assert parts["journal"] == pytest.approx((0.034, 0.0, 11))
    assert parts["ray"][0] == pytest.approx(0.05)  # the run call beyond the station's run
    assert parts["station"][0] == pytest.approx(0.95 - 0.9 - 0.03 - 0.002)
    assert parts["dry run"][1] == pytest.approx(0.004)  # the check's and the run's
    assert sum(v[0] for k, v in parts.items() if k != "overlapped") == pytest.approx(0.11)


async def test_a_timer_counts_what_its_task_and_threads_do_and_nothing_outside() -> None:
    assert current_timer() is None
    assert cpu_part("x", sum, [1, 2]) == 3  # no timer: nothing recorded, nothing raised
    with timing() as timer:
        await asyncio.to_thread(cpu_part, "ask", sum, range(100_000))
        await asyncio.create_task(asyncio.sleep(0))
        assert current_timer() is timer
    assert current_timer() is None
    ask = timer.as_dict()["ask"]
    assert ask["count"] == 1 and ask["cpu_s"] > 0 and ask["wall_s"] > 0


async def test_an_urgent_waiter_takes_the_campaign_lock_before_the_claims_waiting() -> None:
    lock = UrgentLock()
    order: list[str] = []

    async def take(name: str, urgent: bool = False) -> None:
        async with lock.urgent() if urgent else lock:
            order.append(name)
            await asyncio.sleep(0)

    await lock.acquire()  # an ask in progress
    tasks = [asyncio.create_task(take("claim-1")), asyncio.create_task(take("claim-2"))]
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(take("claim-cancelled"))
    await asyncio.sleep(0)
    cancelled.cancel()  # a waiter that gives up is skipped
    tasks.append(asyncio.create_task(take("record", urgent=True)))
    await asyncio.sleep(0)
    assert order == [] and lock.locked()
    lock.release()
    await asyncio.gather(*tasks)
    assert cancelled.cancelled()
    assert order == ["record", "claim-1", "claim-2"]
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="not locked"):
        lock.release()


class HeldJournal:
    """A journal link whose call that starts with the step in ``held`` is held until
    ``release`` is set: before it reaches the journal, or (``after``) once committed,
    before the caller hears; ``sent``: each call's writes (method, step or state)."""

    def __init__(self, link: AsyncJournal) -> None:
        self.link = link
        self.held: int | None = None
        self.release = asyncio.Event()
        self.after = False
        self.sent: list[list[Any]] = []
        self.arrived = asyncio.Event()  # set at each call

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if fn is Journal.write_all else [(fn.__name__, args, kwargs)]
        self.sent.append([(w[0], w[1][1]) for w in batch])
        self.arrived.set()
        hold = self.held is not None and batch[0][1][1] == self.held
        if hold and not self.after:
            await self.release.wait()
        out = await self.link.call(fn, *args, **kwargs)
        if hold:
            await self.release.wait()
        return out


async def queued_experiment(aj: AsyncJournal) -> str:
    """Campaign ``c`` with one experiment queued on bench-a (its id)."""
    await aj.call(Journal.create_campaign, "c", "stack", {})
    eid = await aj.call(Journal.propose, "c", {"x": 1}, "optimizer")
    for state in ("checked", "queued"):
        await aj.call(Journal.transition, eid, state, station="bench-a")
    return str(eid)


async def test_step_records_not_waited_for_go_in_order_as_one_batch_with_the_next_waited_one(
    tmp_path: Path,
) -> None:
    async with await AsyncJournal.open(tmp_path / "journal.db") as aj:
        eid = await queued_experiment(aj)
        link = HeldJournal(aj)
        writes = StepWrites(link, coalesce_s=0)  # each record sent as soon as it may be
        writes.later(Journal.transition, eid, "running", station="bench-a")
        await writes.now(Journal.step_started, eid, 0, {"op": "set"})  # one transaction
        link.held = 1
        writes.later(Journal.step_started, eid, 1, done=(0, {}))  # on its way, held
        await asyncio.sleep(0)
        writes.later(Journal.step_started, eid, 2, done=(1, {}))  # queued behind it
        writes.later(Journal.step_started, eid, 3, done=(2, {}))
        acting = asyncio.create_task(writes.now(Journal.step_started, eid, 4, done=(3, {})))
        await asyncio.sleep(0.05)
        # a waited write is sent at once (the queued records with it, one round trip); it
        # arrived before the one on its way: refused, nothing of it written ...
        assert link.sent[1:] == [[("step_started", 1)], [("step_started", i) for i in (2, 3, 4)]]
        assert not acting.done()  # ... and it returns once every write before it has
        link.release.set()
        await acting
        assert link.sent[3:] == [[("step_started", i) for i in (2, 3, 4)]]  # sent again
        # the one on its way reaches the journal first (only its answer is late): the
        # waited one commits behind it, without waiting for that answer
        link.held, link.after = 5, True
        link.release.clear()
        writes.later(Journal.step_started, eid, 5, done=(4, {}))
        await asyncio.sleep(0.05)
        await writes.now(Journal.step_started, eid, 6, done=(5, {}))
        assert link.sent[4:] == [[("step_started", 5)], [("step_started", 6)]]
        link.release.set()
        await writes.flush()
        log = await aj.call(Journal.transitions, eid)
        assert [t.step for t in log if t.event == "step_started"] == [0, 1, 2, 3, 4, 5, 6]
        assert link.sent[0] == [("transition", "running"), ("step_started", 0)]
        # a write that fails: the writes after it are not sent, the next waited one raises
        writes.later(Journal.step_started, eid, 6, done=(6, {}))  # step 6 again: refused
        writes.later(Journal.step_started, eid, 8, done=(6, {}))
        with pytest.raises(StepOrderError, match="never run twice"):
            await writes.now(Journal.step_started, eid, 9)
        log = await aj.call(Journal.transitions, eid)
        assert [t.step for t in log if t.event == "step_started"] == [0, 1, 2, 3, 4, 5, 6]


async def test_records_not_waited_for_wait_a_moment_for_the_next_waited_one_to_take_them(
    tmp_path: Path,
) -> None:
    """A row of quick steps that only look, then one that acts: one transaction, one round
    trip. A record that no waited write takes is sent on its own once the moment is over,
    without a flush."""
    async with await AsyncJournal.open(tmp_path / "journal.db") as aj:
        eid = await queued_experiment(aj)
        link = HeldJournal(aj)
        writes = StepWrites(link, coalesce_s=0.5)
        writes.later(Journal.transition, eid, "running", station="bench-a")
        writes.later(Journal.step_started, eid, 0, {"op": "read"})
        writes.later(Journal.step_started, eid, 1, {"op": "compute"}, done=(0, {}))
        await asyncio.sleep(0.05)
        assert link.sent == []  # still queued, for the step that acts
        await writes.now(Journal.step_started, eid, 2, {"op": "set"}, done=(1, {}))
        assert link.sent == [
            [("transition", "running"), ("step_started", 0), ("step_started", 1)]
            + [("step_started", 2)]
        ]
        writes.later(Journal.step_started, eid, 3, {"op": "read"}, done=(2, {}))
        t0 = asyncio.get_running_loop().time()
        link.arrived.clear()
        await asyncio.wait_for(link.arrived.wait(), 5)  # no waited write: sent after the moment
        assert asyncio.get_running_loop().time() - t0 >= 0.45
        assert link.sent[1] == [("step_started", 3)]
        writes.later(Journal.step_started, eid, 4, {"op": "read"}, done=(3, {}))
        await writes.flush()  # a flush does not wait for the moment
        assert link.sent[2] == [("step_started", 4)]
        await asyncio.sleep(0.6)  # and nothing is sent twice when it would have ended
        assert len(link.sent) == 3
        log = await aj.call(Journal.transitions, eid)
        assert [t.step for t in log if t.event == "step_started"] == [0, 1, 2, 3, 4]
        writes.later(Journal.step_started, eid, 5, {"op": "read"}, done=(4, {}))
        writes.abandon()  # a cancelled run: dropped, never sent
        await asyncio.sleep(0.6)
        assert len(link.sent) == 3


async def test_verification_starts_once_what_it_reads_is_measured_and_ends_on_the_final_values() -> (
    None
):
    checks = {
        "analyses": [],
        "checks": [{"name": "fill", "expr": "camera_ml - dispensed_ml.red", "within": 0.1}],
    }
    result = Result()
    early = EarlyVerification(checks, {})
    with timing() as timer:
        result.measurements["dispensed_ml"] = {"red": 1.0}
        early.offer(result)  # camera_ml not measured yet: not started
        assert early._early is None
        result.measurements["camera_ml"] = 1.05
        early.offer(result)  # every name it reads is there: started, overlapping the bench
        assert early._early is not None
        result.measurements["drained_ml"] = 1.2  # a later step: not read by the checks
        verified = await early.outcome(result)
    assert verified.verified is True and verified == run_checks(
        checks, measurements=result.measurements
    )
    assert "behind:verify" in timer.as_dict()  # its CPU overlapped the bench
    # a later step measured a name it reads again: verified again on the final values
    result.measurements["camera_ml"] = 1.5
    early = EarlyVerification(checks, {})
    early.offer(Result(measurements={"dispensed_ml": {"red": 1.0}, "camera_ml": 1.05}))
    verified = await early.outcome(result)
    assert verified.verified is False and "fill" in verified.reasons[0]


async def test_a_batch_refused_as_the_old_owners_goes_again_whole_with_the_new_epoch(
    tmp_path: Path,
) -> None:
    """A restarted owner takes the campaign's next epoch while records of the run are
    queued: the batch is refused as the old epoch's (nothing of it written) and, once the
    station's lease is taken over, sent again whole with the new epoch (StationRuns._fenced
    does the waiting; here a stand-in that knows the new epoch)."""
    async with await AsyncJournal.open(tmp_path / "journal.db") as aj:
        await aj.call(Journal.create_campaign, "c", "stack", {})
        old = await aj.call(Journal.take_ownership, "c", "owner-1")
        eid = await aj.call(Journal.propose, "c", {"x": 1}, "optimizer")
        for state in ("checked", "queued"):
            await aj.call(Journal.transition, eid, state, station="bench-a", epoch=old)
        epochs: list[int | None] = []
        current = {"epoch": old}

        async def fenced(write: Any) -> Any:
            try:
                epochs.append(current["epoch"])
                return await write(current["epoch"])
            except StaleOwner:
                current["epoch"] = new  # the take-over came
                epochs.append(new)
                return await write(new)

        writes = StepWrites(aj, fenced=fenced)
        writes.later(Journal.transition, eid, "running", station="bench-a", epoch=old)
        await writes.now(Journal.step_started, eid, 0, {"op": "set"}, epoch=old)
        new = await aj.call(Journal.take_ownership, "c", "owner-2")
        writes.later(Journal.step_started, eid, 1, {"op": "read"}, done=(0, {}), epoch=old)
        await writes.now(Journal.step_started, eid, 2, {"op": "set"}, done=(1, {}), epoch=old)
        assert epochs == [old, old, new], epochs  # the second batch: refused, then again
        log = await aj.call(Journal.transitions, eid)
        assert [t.step for t in log if t.event == "step_started"] == [0, 1, 2]
        # without a take-over the old epoch's write stays refused
        with pytest.raises(StaleOwner):
            await StepWrites(aj).now(
                Journal.step_started, eid, 3, {"op": "set"}, done=(2, {}), epoch=old
            )
