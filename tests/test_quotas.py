"""Agents' quotas without a lab: lab.yaml's quota keys, the journal's counts per proposer,
the quota gate's refusals (which limit, how many, when it frees up), the token buckets and
the fair queue. A real SQLite journal in a temporary folder; clocks given explicitly.

The whole path on a simulated lab (MCP, MQTT, the wire) is tests/test_agents_redteam.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.labconfig import LabConfigError, load_lab
from bridge.quotaconfig import Quota, Quotas
from bridge.quotas import QuotaExceeded, QuotaGate
from bridge.ratelimit import FairQueue, RateLimiter
from loops.journal import Journal

BASE = (
    "stations:\n  bench-a:\n    instruments:\n"
    "      - {name: hp, kind: hotplate, url: 'modbus-tcp://127.0.0.1:5020'}\n"
)


# ------------------------------------------------------------------------ lab.yaml
def test_quotas_in_lab_yaml_apply_per_agent_and_default(tmp_path: Path) -> None:
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        BASE
        + "default_quota: {proposals_per_hour: 60}\n"
        + "agents:\n"
        + "  alice:\n    propose: [color-*]\n"
        + "    quota: {proposals_per_hour: 30, experiments_per_day: 20,"
        + " budgets: {dye_ml_per_day: 10}, queued_per_campaign: 2, tool_calls_per_s: 5}\n"
        + "  bob: {propose: [color-*]}\n"
    )
    quotas = load_lab(lab).quotas
    alice = quotas.for_proposer("agent:alice")
    assert alice is not None and alice.proposals_per_hour == 30
    assert alice.experiments_per_day == 20 and alice.budgets == {"dye_ml_per_day": 10.0}
    assert alice.queued_per_campaign == 2 and alice.tool_calls_per_s == 5.0
    assert alice.tool_call_burst == 40  # a key left out: the built-in default
    assert alice.where == "lab.yaml agents.alice.quota"
    # bob has no quota of his own, nor has an MQTT user not listed: the default
    for who in ("agent:bob", "agent:lims"):
        q = quotas.for_proposer(who)
        assert q is not None and q.proposals_per_hour == 60 and q.where == "lab.yaml default_quota"
    assert quotas.for_proposer("operator:ana") is None
    assert quotas.for_proposer("optimizer:bayes") is None
    (share,) = quotas.budgets["dye_ml_per_day"]  # the reference envelope's budget
    assert (share.station, share.resource, share.window, share.unit) == (
        "bench-a",
        "vial.added",
        "day",
        "mL",
    )
    lab.write_text(BASE)  # no quota anywhere: the built-in defaults, nothing counted
    none = load_lab(lab).quotas.for_proposer("agent:anyone")
    assert none == Quota() and none.queued_per_campaign == 4


@pytest.mark.parametrize(
    ("text", "line", "field", "problem"),
    [
        (
            "agents:\n  alice:\n    quota: {proposals_per_day: 3}\n",
            7,
            "agents.alice.quota.proposals_per_day",
            "unknown field 'proposals_per_day' (known: proposals_per_hour, experiments_per_day,",
        ),
        (
            "agents:\n  alice:\n    quota:\n      budgets: {dye_ml: 10}\n",
            8,
            "agents.alice.quota.budgets.dye_ml",
            "unknown budget 'dye_ml': a share names a budget of the stations' envelopes "
            "(budgets: dye_ml_per_day, experiments_per_hour)",
        ),
        (
            "agents:\n  alice:\n    quota: {proposals_per_hour: -1}\n",
            7,
            "agents.alice.quota.proposals_per_hour",
            "must be a whole number >= 0, got -1",
        ),
        (
            "agents:\n  alice:\n    quota: {budgets: {dye_ml_per_day: lots}}\n",
            7,
            "agents.alice.quota.budgets.dye_ml_per_day",
            "must be a number >= 0 (in the budget's unit), got 'lots'",
        ),
        (
            "default_quota: {queued_per_campaign: 0}\n",
            5,
            "default_quota.queued_per_campaign",
            "must be a whole number >= 1, got 0",
        ),
        ("default_quota: [30]\n", 5, "default_quota", "must be a mapping of proposals_per_hour"),
        (
            "agents:\n  alice:\n    quota: {tool_calls_per_s: 0}\n",
            7,
            "agents.alice.quota.tool_calls_per_s",
            "must be a number > 0, got 0",
        ),
    ],
)
def test_quota_mistakes_name_the_file_line_field_and_the_known_names(
    tmp_path: Path, text: str, line: int, field: str, problem: str
) -> None:
    lab = tmp_path / "lab.yaml"
    lab.write_text(BASE + text)
    with pytest.raises(LabConfigError) as err:
        load_lab(lab)
    message = str(err.value)
    assert f"lab.yaml:{line}: {field}: " in message and problem in message, message
    assert "\n" not in message


# ------------------------------------------------------------------- the journal
def _journal_call(j: Journal) -> Any:
    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(j, method)(*args, **kwargs)

    return call


def _run(j: Journal, eid: str, station: str, *, consumed: float, end: str | None) -> None:
    """What the campaign and the station write for one experiment: queued, running (with
    the experiments unit), a step that consumes, and its end."""
    j.transition(eid, "checked")
    j.transition(eid, "queued", station=station)
    now = time.time()
    j.transition(eid, "running", consumption=[("experiments", 1, 0.0, now)])
    j.step_started(eid, 0, {"kind": "call"})
    j.step_done(eid, 0, consumption=[("vial.added", consumed, 0.0, time.time())])
    if end == "done":
        j.finish(eid, {"ok": True}, 1.0)
    elif end == "failed":
        j.fail(eid, "tripped")


def test_the_journal_counts_one_proposers_proposals_runs_pending_and_consumption(
    tmp_path: Path,
) -> None:
    with Journal(tmp_path / "j.db") as j:
        j.create_campaign("c1", "c1", "program")
        t0 = time.time()
        mine = [j.propose("c1", {"x": i}, "agent:alice") for i in range(5)]
        other = j.propose("c1", {"x": 9}, "agent:bob")
        _run(j, mine[0], "bench-a", consumed=0.7, end="done")
        _run(j, other, "bench-a", consumed=2.0, end="done")  # bob's: not alice's
        _run(j, mine[1], "bench-a", consumed=0.5, end="failed")
        j.reject(mine[2], ["vial.volume 3.6 > 2.8"])
        j.transition(mine[3], "checked")  # accepted, waiting for a station
        j.record_consumption("bench-a", [("vial.added", 5.0, 0.0, time.time())])  # a set-up's
        got = j.proposer_usage(
            "agent:alice",
            proposals_since=t0 - 1,
            runs_since=t0 - 1,
            consumption=[("bench-a", "vial.added", t0 - 1), ("bench-a", "experiments", t0 - 1)],
        )
        assert len(got["proposals"]) == 5  # accepted and refused alike
        assert len(got["runs"]) == 2 and got["pending"] == 2  # mine[3] checked, mine[4] proposed
        assert [a for _, a in got["consumption"][("bench-a", "vial.added")]] == [0.7, 0.5]
        assert [a for _, a in got["consumption"][("bench-a", "experiments")]] == [1.0, 1.0]
        later = j.proposer_usage("agent:alice", proposals_since=time.time() + 1, runs_since=None)
        assert later["proposals"] == [] and later["runs"] == [] and later["pending"] == 0
        assert j.proposer_usage("agent:nobody", proposals_since=0, runs_since=0)["pending"] == 0


async def test_the_gate_refuses_naming_the_quota_the_count_and_when_it_frees_up(
    tmp_path: Path,
) -> None:
    with Journal(tmp_path / "j.db") as j:
        j.create_campaign("c1", "c1", "program")
        now = time.time()
        share = load_lab(_lab(tmp_path)).quotas.budgets["dye_ml_per_day"]
        quotas = Quotas(
            agents={
                "alice": Quota(proposals_per_hour=3, where="lab.yaml agents.alice.quota"),
                "bob": Quota(experiments_per_day=2, where="lab.yaml agents.bob.quota"),
                "carol": Quota(
                    budgets={"dye_ml_per_day": 1.0}, where="lab.yaml agents.carol.quota"
                ),
                "dave": Quota(queued_per_campaign=1, where="lab.yaml agents.dave.quota"),
            },
            budgets={"dye_ml_per_day": share},
        )
        gate = QuotaGate(quotas, _journal_call(j), speed=100.0)
        nothing_queued = lambda: 0  # noqa: E731

        async def admitted(who: str, queued: Any = nothing_queued) -> None:
            async with gate.admit(who, "c1", queued):
                pass

        for _ in range(3):
            await admitted("agent:alice")
            j.propose("c1", {}, "agent:alice")
        with pytest.raises(QuotaExceeded) as err:
            await admitted("agent:alice")
        text = str(err.value)
        assert text.startswith(
            "quota of agent:alice: proposals_per_hour 3 (lab.yaml agents.alice.quota): 3 "
            "proposals journaled in the last hour; the next is allowed at "
        ), text
        assert "(in 59 min" in text or "(in 1 h 0 min" in text, text
        use = err.value.use
        assert use.quota == "proposals_per_hour" and use.used == 3 and use.limit == 3
        assert use.frees_at is not None and 3599 < use.frees_at - now < 3601
        # experiments: the ones that ran and the ones accepted and waiting
        for _ in range(2):
            await admitted("agent:bob")
            j.transition(j.propose("c1", {}, "agent:bob"), "checked")
        with pytest.raises(
            QuotaExceeded,
            match=r"experiments_per_day 2 .*: 0 of its experiments "
            r"ran in the last 24 h and 2 wait to run; the next is allowed at",
        ):
            await admitted("agent:bob")
        # a budget share: what its experiments consumed, in the budget's window (a day on the
        # stations' clock: 864 s of real time at speed 100)
        await admitted("agent:carol")
        _run(j, j.propose("c1", {}, "agent:carol"), "bench-a", consumed=1.2, end="done")
        with pytest.raises(QuotaExceeded) as err:
            await admitted("agent:carol")
        assert (
            "budgets.dye_ml_per_day 1 mL (lab.yaml agents.carol.quota): its experiments "
            "consumed 1.2 mL of dye_ml_per_day in the last day; more is allowed at"
            in str(err.value)
        )
        assert err.value.use.frees_at is not None and 800 < err.value.use.frees_at - now < 900
        # the campaign's queue: proposals waiting per campaign (queued, or for approval)
        await admitted("agent:dave")
        with pytest.raises(
            QuotaExceeded,
            match=r"queued_per_campaign 1 .*: 1 of its proposals wait in campaign c1 \(queued, "
            r"or awaiting approval\); propose again once one of them has started or was decided",
        ):
            await admitted("agent:dave", lambda: 1)
        # operators and unlisted proposers without a default: nothing counted
        await admitted("operator:ana")
        await admitted("agent:erin")
        assert await gate.usage("agent:erin") == []


def _lab(tmp_path: Path) -> Path:
    lab = tmp_path / "lab.yaml"
    lab.write_text(BASE + "agents:\n  carol:\n    quota: {budgets: {dye_ml_per_day: 1}}\n")
    return lab


async def test_one_proposal_per_proposer_passes_the_gate_at_a_time(tmp_path: Path) -> None:
    """Two proposals of one agent cannot both pass a quota of one (check, then journal)."""
    with Journal(tmp_path / "j.db") as j:
        j.create_campaign("c1", "c1", "program")
        gate = QuotaGate(Quotas(agents={"alice": Quota(proposals_per_hour=1)}), _journal_call(j))
        inside: list[str] = []

        async def propose(who: str) -> str:
            try:
                async with gate.admit(who, "c1", lambda: 0):
                    inside.append(who)
                    await asyncio.sleep(0.01)  # the campaign checks the proposal meanwhile
                    j.propose("c1", {}, who)
                    return "accepted"
            except QuotaExceeded:
                return "refused"

        got = await asyncio.gather(
            *(propose("agent:alice") for _ in range(5)), propose("agent:bob")
        )
        assert sorted(got[:5]) == ["accepted", "refused", "refused", "refused", "refused"]
        assert got[5] == "accepted" and inside.count("agent:alice") == 1
        assert gate._turns == {}  # nobody waiting: no lock kept


# ------------------------------------------------------------- buckets and queues
def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    t = [0.0]
    limiter = RateLimiter(2.0, 3.0, clock=lambda: t[0])
    assert [limiter.admit("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.admit("b")  # another identity has its own bucket
    assert limiter.retry_after("a") == pytest.approx(0.5)
    t[0] = 0.5
    assert limiter.admit("a") and not limiter.admit("a")
    assert limiter.admit("c", rate=0.1, burst=1) and not limiter.admit("c", rate=0.1, burst=1)
    assert limiter.tell("a") and not limiter.tell("a")
    t[0] = 1.6
    assert limiter.tell("a")
    with pytest.raises(ValueError, match="rate > 0 and burst >= 1"):
        RateLimiter(0, 1)


async def test_the_fair_queue_serves_identities_in_turn_and_is_bounded() -> None:
    q: FairQueue[str] = FairQueue(8)
    for i in range(5):
        q.put_nowait(f"flood-{i}", key="flood")
    q.put_nowait("alice-0", key="alice")
    q.put_nowait("bob-0", key="bob")
    q.put_nowait("abort", key="bob", priority=0)
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait("one too many", key="carol")
    got = [await q.get() for _ in range(8)]
    assert got == [
        "abort",
        "flood-0",
        "alice-0",
        "bob-0",
        "flood-1",
        "flood-2",
        "flood-3",
        "flood-4",
    ]
    assert q.qsize() == 0
    waiter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    q.put_nowait("late", key="x")
    assert await waiter == "late"


# ------------------------------------------------------------ the campaign's queue
def test_queued_proposals_take_turns_and_the_optimizer_gets_its_share(tmp_path: Path) -> None:
    """The order stations claim queued proposals in: proposers in turn (the one served
    longest ago first), and after AGENT_RUN agents' experiments in a row the optimizer's
    next point (None: ask the optimizer). Nothing is called: the queue is plain data."""
    from loops.campaign import AGENT_RUN, CampaignRunner
    from loops.campaignbook import Item
    from loops.program import builtin_program, load_program

    with Journal(tmp_path / "j.db") as j:
        runner = CampaignRunner(
            load_program(builtin_program("color-match")),
            _journal_call(j),  # never called here
            {"bench-a": object()},  # type: ignore[dict-item]
            campaign_id="c1",
        )
    for i in range(4):
        runner._queue.append(Item(f"m{i}", None, {}, None, "agent:mallet", True))
    runner._queue.append(Item("a0", None, {}, None, "agent:alice", True))
    runner._queue.append(Item("a1", None, {}, None, "agent:alice", True))
    assert runner.queued_by("agent:mallet") == 4 and runner.queued_by("agent:alice") == 2
    order = []
    for _ in range(8):
        item = runner._next_queued()
        order.append(item.experiment_id if item is not None else "optimizer")
        if item is None:
            runner._agent_run = 0  # what a claim does when it asks the optimizer
    assert AGENT_RUN == 3
    assert order == ["m0", "a0", "m1", "optimizer", "a1", "m2", "m3", "optimizer"]
    assert runner._next_queued() is None and runner.queued_by("agent:mallet") == 0
