"""The approval gate (issue 14): agents' proposals that wait for a human.

Policies (program.md ``approval:``, lab.yaml ``agents.<name>.approval:``) validated at
load; the journal's ``awaiting-approval`` state and its decisions; a campaign on the
simulated bench in this process (a real station actor, drivers and simulators, the
journal through an :class:`~loops.journal.AsyncJournal`) where proposals wait while the
station runs the optimizer's points, are approved (and run, the journal naming the
approver), denied or expire (rejected, nothing on the wire, the optimizer not told they
were infeasible), and wait again after a restart. ``tests/test_approval_mqtt.py`` has
the MQTT API, the ACL and MCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from reference import local_bench

from bridge.campaigns import agent_approvals
from bridge.cli import main as cli
from bridge.labconfig import LabConfigError, load_lab
from loops.approval import ApprovalPolicy, approval_needed, parse_approval
from loops.campaign import CampaignRunner
from loops.journal import (
    ApprovalError,
    AsyncJournal,
    IllegalTransition,
    Journal,
    UnknownExperiment,
)
from loops.program import (
    Budget,
    Program,
    ProgramError,
    StopRules,
    builtin_program,
    load_program,
)
from loops.stations import LocalStation
from safety.yamldoc import ConfigError, YamlDoc
from simulators.bench import SimulatedLab

SPEED = 500.0
RULE = """approval:
  human_when: "temperature_c > 60 or agent not in trusted"
  trusted: [alice]
  expires: 2h
  max_awaiting: 3
"""
#: what alice may run without a human: below 60 degC
COOL = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 40.0, "hold_s": 60}
#: above 60 degC: a human decides (distinct volumes: each is recognisable on the pumps' wire)
HOT = {"red_ml": 0.705, "green_ml": 0.105, "blue_ml": 0.745, "temperature_c": 65.0, "hold_s": 60}
DENIED = {"red_ml": 0.555, "green_ml": 0.155, "blue_ml": 0.655, "temperature_c": 45.0, "hold_s": 60}
CRASHED = {
    "red_ml": 0.525,
    "green_ml": 0.175,
    "blue_ml": 0.685,
    "temperature_c": 45.0,
    "hold_s": 60,
}
EXPIRED = {
    "red_ml": 0.615,
    "green_ml": 0.135,
    "blue_ml": 0.695,
    "temperature_c": 45.0,
    "hold_s": 60,
}


def colour_match(front: str = RULE, **changes: Any) -> Program:
    """The colour match that ships with labbridge, with ``front`` added to its front matter,
    no target and a small budget (``experiments``)."""
    text = builtin_program("color-match").read_text().replace("---\n", "---\n" + front, 1)
    base = load_program(text, source="program.md")
    return dataclasses.replace(
        base,
        budget=Budget(experiments=changes.pop("experiments", 3)),
        stop=StopRules(),
        initial_points=1,
        **changes,
    )


def program_error(front: str) -> str:
    with pytest.raises(ProgramError) as info:
        colour_match(front)
    text = str(info.value)
    assert "\n" not in text and text.startswith("program.md:"), text
    return text


# ------------------------------------------------------------------------ policies
def test_a_campaign_policy_is_validated_at_load_naming_the_line_and_field() -> None:
    prog = colour_match()
    policy = prog.approval
    assert policy is not None and policy.text == "temperature_c > 60 or agent not in trusted"
    assert policy.trusted == ("alice",) and policy.expires_s == 7200 and policy.max_awaiting == 3
    again = load_program(prog.to_markdown())  # written back from the policy, read back the same
    assert again.approval is not None and again.approval.text == policy.text
    assert again.approval is not None and again.approval.text == policy.text
    assert (again.approval.trusted, again.approval.expires_s, again.approval.max_awaiting) == (
        ("alice",),
        7200,
        3,
    )
    assert colour_match("approval: auto\n").approval is None
    human = colour_match("approval: human\n").approval
    assert human is not None and human.rule is None and human.expires_s == 3600
    # a policy set in code (not read from text) is written out too, and reads back the same
    plain = colour_match("approval: auto\n")
    for set_in_code in (human, policy, dataclasses.replace(human, expires_s=90.0)):
        made = dataclasses.replace(plain, approval=set_in_code)
        back = load_program(made.to_markdown()).approval
        every = ("human", "true")  # no rule: every proposal asks (written "true" with options)
        assert back is not None, made.to_markdown()
        assert back.text == set_in_code.text or {back.text, set_in_code.text} <= set(every)
        assert (back.trusted, back.expires_s, back.max_awaiting) == (
            set_in_code.trusted,
            set_in_code.expires_s,
            set_in_code.max_awaiting,
        )
    for front, problem in (
        (
            'approval:\n  human_when: "temprature_c > 60"\n',
            "program.md:3: approval.human_when: unknown name 'temprature_c'",
        ),
        (
            'approval:\n  human_when: "agent not in trustd"\n',
            "program.md:3: approval.human_when: 'trustd' is not a list",
        ),
        (
            'approval:\n  human_when: "trusted == 2"\n',
            "program.md:3: approval.human_when: 'trusted' is a list: use it after 'in'",
        ),
        (
            'approval:\n  human_when: "temperature_c >> 60"\n',
            "program.md:3: approval.human_when: unexpected token '>' in rule",
        ),
        (
            'approval:\n  human_when: "temperature_c > 60"\n  expires: 9d\n',
            "program.md:4: approval.expires: must be from 1 s to 7 days",
        ),
        (
            'approval:\n  human_when: "temperature_c > 60"\n  expires: soon\n',
            "program.md:4: approval.expires: a duration is like 30s, 15m, 2h or 1d",
        ),
        (
            'approval:\n  human_when: "temperature_c > 60"\n  expires: 1h\n  expires_s: 60\n',
            "program.md:5: approval.expires_s: give expires or expires_s, not both",
        ),
        (
            'approval:\n  human_when: "temperature_c > 60"\n  max_awaiting: 0\n',
            "program.md:4: approval.max_awaiting: must be an integer from 1 to 1000",
        ),
        (
            'approval:\n  human_whn: "temperature_c > 60"\n',
            "program.md:3: approval.human_whn: unknown key 'human_whn'",
        ),
        ("approval:\n  trusted: [alice]\n", "program.md:2: approval: missing 'human_when'"),
        ("approval: sometimes\n", "program.md:2: approval: must be auto, human, or a mapping"),
    ):
        text = program_error(front)
        assert text.startswith(problem), (text, problem)


def test_an_agent_policy_is_validated_with_lab_yaml_and_its_names_when_a_campaign_starts(
    tmp_path: Path,
) -> None:
    base = (
        "stations:\n  bench-a:\n    instruments:\n"
        "      - {name: hp, kind: hotplate, url: 'modbus-tcp://127.0.0.1:5020'}\n"
        "agents:\n"
        "  alice:\n"
        "    propose: [color-*]\n"
        "    stations: [bench-a]\n"
    )

    def lab(policy: str) -> Any:
        path = tmp_path / "lab.yaml"
        path.write_text(base + policy)
        return load_lab(path, source="lab.yaml")

    assert lab("").agents.agents["alice"].approval is None
    for policy, problem in (
        ("    approval: {human_when: 'x >', expires: 30m}\n", "unexpected end of rule"),
        ("    approval: {human_when: 'x > 1', max_awaiting: 3}\n", "max_awaiting is a campaign"),
        ("    approval: {human_when: 'x > 1', expires_s: 0}\n", "must be from 1 s to 7 days"),
        ("    approval: never\n", "must be auto, human, or a mapping"),
    ):
        with pytest.raises(LabConfigError) as info:
            lab(policy)
        text = str(info.value)
        assert text.startswith("lab.yaml:9: agents.alice.approval") and problem in text, text
    # the names of an agent's rule are the campaign's: checked when one it may propose to starts
    typo = lab("    approval:\n      human_when: 'temprature_c > 60'\n      expires: 30m\n")
    policy = typo.agents.agents["alice"].approval
    assert policy is not None and policy.expires_s == 1800
    with pytest.raises(ConfigError) as info:
        agent_approvals(typo, colour_match(), "color-1")
    assert str(info.value).startswith(
        "lab.yaml:10: agents.alice.approval.human_when: unknown name 'temprature_c' in "
        '"temprature_c > 60" for campaign color-1'
    ), info.value
    # a campaign alice may not propose to keeps it: evaluated there, it asks a human
    assert agent_approvals(typo, colour_match(), "other-1") == {"alice": policy}
    good = lab("    approval: {human_when: 'temperature_c > 50 and agent in trusted'}\n")
    assert agent_approvals(good, colour_match(), "color-1")["alice"].text.startswith("temp")


def test_who_needs_a_human() -> None:
    campaign = colour_match().approval
    doc = YamlDoc("lab.yaml")
    agent = parse_approval(
        {"human_when": "hold_s > 100", "expires": "30s"},
        doc,
        ("agents", "bob", "approval"),
        where="lab.yaml agents.bob.approval",
        known=None,
        campaign=False,
    )
    fixed: dict[str, Any] = {}
    policies: list[ApprovalPolicy | None] = [campaign, agent]
    for proposer in ("optimizer:bayes", "operator:ana", "operator"):  # never gated
        assert approval_needed(policies, HOT, fixed, proposer) is None
    assert approval_needed(policies, COOL, fixed, "agent:alice") is None
    need = approval_needed(policies, HOT, fixed, "agent:alice")
    assert need is not None and need.expires_s == 7200
    assert need.rules == (
        "program.md approval: temperature_c > 60 or agent not in trusted "
        "(temperature_c=65.0, agent='alice')",
    )
    need = approval_needed(policies, {**COOL, "hold_s": 120}, fixed, "agent:bob")
    assert need is not None and len(need.rules) == 2 and need.expires_s == 30  # the shorter
    assert need.rules[1] == "lab.yaml agents.bob.approval: hold_s > 100 (hold_s=120)"
    # a rule that cannot be evaluated for a proposal asks a human (fails closed)
    odd = parse_approval(
        {"human_when": "volume > 1"}, doc, ("approval",), where="x", known=None, campaign=False
    )
    need = approval_needed([odd], COOL, fixed, "agent:alice")
    assert need is not None and "unknown name 'volume'" in need.rules[0], need
    assert "a human decides" in need.rules[0]


def test_the_journal_keeps_the_decisions_and_refuses_what_cannot_be_decided(
    tmp_path: Path,
) -> None:
    with Journal(tmp_path / "j.db") as j:
        j.create_campaign("c", "n", {})
        j.create_campaign("d", "n", {})
        waiting = j.propose("c", HOT, "agent:alice")
        j.await_approval(waiting, ["program.md approval: human"], time.time() + 60)
        late = j.propose("c", HOT, "agent:bob")
        j.await_approval(late, ["program.md approval: human"], time.time() - 1)
        plain = j.propose("c", COOL, "agent:alice")
        other = j.propose("d", COOL, "agent:carol")
        j.await_approval(other, ["program.md approval: human"], time.time() + 60)
        assert [r["experiment_id"] for r in j.approvals()] == [waiting, late, other]
        assert [r["experiment_id"] for r in j.approvals("c")] == [waiting, late]
        for args, problem in (
            ((waiting, True, "alice", "fine"), "alice proposed experiment c-0001: nobody"),
            ((waiting, True, "ana", "  "), "give a reason"),
            ((waiting, True, "", "fine"), "say who decides"),
            ((late, True, "ana", "fine"), "its approval expired at"),
            ((plain, True, "ana", "fine"), "c-0003 is proposed and never awaited approval"),
        ):
            with pytest.raises(ApprovalError, match=problem):
                j.decide(*args)
        with pytest.raises(ApprovalError, match="is campaign d's, not c's"):
            j.decide(other, True, "ana", "fine", campaign_id="c")
        with pytest.raises(UnknownExperiment, match="no experiment 'c-0404'"):
            j.decide("c-0404", True, "ana", "fine")
        row = j.decide(waiting, False, "ana", "too hot for today", via="cli")
        assert (row["decision"], row["who"], row["reason"], row["via"]) == (
            "deny",
            "ana",
            "too hot for today",
            "cli",
        )
        with pytest.raises(ApprovalError, match="was denied already by ana"):
            j.decide(waiting, True, "ben", "changed my mind")
        with pytest.raises(IllegalTransition, match="nobody approved it"):
            j.transition(waiting, "checked")  # a denial is no approval
        j.reject(waiting, ["denied by ana: too hot for today"])
        with pytest.raises(ApprovalError, match="not awaiting approval: it is rejected"):
            j.decide(waiting, True, "ben", "changed my mind")
        log = [(t.event, t.state) for t in j.transitions(waiting)]
        assert log == [
            ("state", "proposed"),
            ("state", "awaiting-approval"),
            ("approval", "awaiting-approval"),
            ("state", "rejected"),
        ]
        assert j.approval(waiting) is not None and j.approval(plain) is None


def test_the_cli_lists_and_decides_on_the_journal_and_says_in_one_line_what_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "j.db"
    with Journal(path) as j:
        j.create_campaign("c", "n", {})
        waiting = j.propose("c", HOT, "agent:alice")
        j.await_approval(waiting, ["program.md approval: human"], time.time() + 600)
        plain = j.propose("c", COOL, "agent:alice")
    assert cli(["approvals", "--journal", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{waiting}  agent:alice  expires in 10 min  red_ml=0.705"), out
    assert "    asked by program.md approval: human\n" in out, out
    assert cli(["approvals", "--journal", str(path), "--campaign", "other"]) == 0
    assert capsys.readouterr().out == "no proposal awaits approval in campaign other\n"
    for argv, problem in (
        (["approve", plain, "--reason", "ok"], f"{plain} is proposed and never awaited approval"),
        (["deny", "c-0404", "--reason", "no"], "no experiment 'c-0404'"),
        (["approve", waiting, "--reason", " "], "give a reason (it is journaled)"),
    ):
        assert cli([*argv, "--journal", str(path), "--wait", "0"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"labbridge {argv[0]}: ") and problem in err, err
        assert err.count("\n") == 1, err
    assert cli(["deny", waiting, "--reason", "no", "--journal", str(tmp_path / "none.db")]) == 1
    assert "no journal at" in capsys.readouterr().err
    # nothing runs the campaign: the decision is journaled, to be applied when it runs
    assert cli(["deny", waiting, "--reason", "too hot", "--journal", str(path), "--wait", "0"]) == 0
    assert "(journaled); campaign c did not apply it within 0 s" in capsys.readouterr().out
    assert cli(["approvals", "--journal", str(path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["decision"], row["who"], row["via"]) == ("deny", getpass.getuser(), "cli")


# ------------------------------------------------------------------------ campaigns
@dataclass
class Bench:
    sim: SimulatedLab
    lab: Any
    journal: AsyncJournal
    station: LocalStation
    now: Any

    def runner(self, program: Program, cid: str, events: list[dict[str, Any]], **kw: Any) -> Any:
        return CampaignRunner(
            program,
            self.journal,
            {"bench-a": self.station},
            campaign_id=cid,
            clock_now=self.now,
            on_event=events.append,
            approval_poll_s=0.1,
            **kw,
        )


@contextlib.asynccontextmanager
async def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bench]:
    """The simulated bench with its station actor and the journal in this process (no Ray)."""
    async with local_bench(tmp_path, monkeypatch, speed=SPEED, relaxed=True) as b:
        yield Bench(b.sim, b.lab, b.journal, b.station, b.now)


_VOL = re.compile(r"^([0-2])VOL([0-9.]+)ML$")


def dispensed(sim: SimulatedLab) -> set[tuple[str, float]]:
    """(pump, mL) of every volume the dye pumps (addresses 0-2) were set to, on the wire."""
    out = set()
    for r in sim.stations[0].world.wire.entries("pumps"):
        m = _VOL.match(str(r.data).strip())
        if m and not r.note:
            out.add(("rgb"[int(m.group(1))], round(float(m.group(2)), 3)))
    return out


def volumes(params: dict[str, Any]) -> set[tuple[str, float]]:
    return {(k[0], round(float(params[k]), 3)) for k in ("red_ml", "green_ml", "blue_ml")}


async def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(120)
async def test_a_proposal_waits_while_the_station_runs_others_and_runs_once_a_human_approves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events: list[dict[str, Any]] = []
    carol = ApprovalPolicy("lab.yaml agents.carol.approval", expires_s=1.0)  # human, 1 s
    async with bench(tmp_path, monkeypatch) as b:
        runner = b.runner(
            colour_match(experiments=4), "wait", events, agent_approvals={"carol": carol}
        )
        await runner.prepare()
        hot = await runner.propose(HOT, "agent:alice")  # alice is trusted, but above 60 degC
        assert not hot.accepted and hot.awaiting_approval and hot.reasons == ()
        assert hot.as_dict()["approval"]["rules"] == [
            "program.md approval: temperature_c > 60 or agent not in trusted "
            "(temperature_c=65.0, agent='alice')"
        ]
        denied = await runner.propose(DENIED, "agent:bob")  # bob is not trusted
        expiring = await runner.propose(EXPIRED, "agent:carol")  # carol's own policy: 1 s
        assert denied.awaiting_approval and expiring.awaiting_approval
        assert expiring.as_dict()["approval"]["expires_in_s"] == 1.0
        # the optimizer holds them as pending points: it proposes elsewhere meanwhile
        pending = [p.params for p in runner.optimizer.pending()]
        assert [HOT, DENIED, EXPIRED] == [{k: p[k] for k in HOT} for p in pending], pending
        # red team: the same point again (or a fourth) does not skip the queue for a human
        again = await runner.propose(HOT, "agent:alice")
        assert not again.accepted and not again.awaiting_approval
        assert again.reasons[0].startswith("3 proposals of campaign wait await approval already")
        assert runner.progress()["awaiting_approval"] == 3
        assert [a["experiment_id"] for a in runner.awaiting()] == [
            hot.experiment_id,
            denied.experiment_id,
            expiring.experiment_id,
        ]
        with pytest.raises(ApprovalError, match="alice proposed experiment wait-0001"):
            await runner.decide(hot.experiment_id, True, "alice", "I trust myself")
        task = asyncio.create_task(runner.run())
        # the station works on the optimizer's points while they wait: one ends ...
        await wait_for(lambda: any(e["event"] == "finished" for e in events), 60, "a result")
        await wait_for(  # ... and carol's expires by itself, the others waiting still
            lambda: any(e.get("decision") == "expired" for e in events), 30, "the expiry"
        )
        # bob's is denied from another process through the journal file (labbridge deny)
        code = await asyncio.to_thread(
            cli,
            [
                "deny",
                denied.experiment_id,
                "--reason",
                "not on my bench",
                "--journal",
                str(b.lab.store),
                "--wait",
                "30",
            ],
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"{denied.experiment_id} denied by {getpass.getuser()}: rejected" in out, out
        row = await runner.decide(hot.experiment_id, True, "ana", "hood checked, lid closed")
        assert row["state"] == "checked" and row["who"] == "ana" and row["via"] == "api"
        outcome = await asyncio.wait_for(runner.wait_for(hot.experiment_id), 60)
        summary = await task
        observations = runner.optimizer.observations()
        wire = dispensed(b.sim)
    assert outcome["event"] == "finished" and outcome["proposer"] == "agent:alice", outcome
    assert summary.state == "done" and summary.counts["done"] == 4, summary
    j = Journal(b.lab.store)
    try:
        exps = {e.id: e for e in j.experiments("wait")}
        hot_log = j.transitions(hot.experiment_id)
    finally:
        j.close()
    states = [t.state for t in hot_log if t.event == "state"]
    assert states == ["proposed", "awaiting-approval", "checked", "queued", "running", "done"]
    approved = next(t for t in hot_log if t.state == "checked")
    assert approved.data is not None
    assert approved.data["reason"] == "approved by ana: hood checked, lid closed"
    assert approved.data["data"] == {
        "approved_by": "ana",
        "reason": "hood checked, lid closed",
        "via": "api",
    }
    assert exps[hot.experiment_id].proposer == "agent:alice"
    # the station did not wait for the human: the optimizer's points ran meanwhile
    order = [(e["event"], e.get("decision"), e.get("proposer")) for e in events]
    first_result = next(i for i, e in enumerate(order) if e[0] == "finished")
    assert order[first_result][2].startswith("optimizer"), order
    assert first_result < order.index(("approval", "approved", "agent:alice")), order
    started = [e["proposer"] for e in events if e["event"] == "started"]
    assert started[0].startswith("optimizer") and "agent:alice" in started, started
    assert exps[denied.experiment_id].state == "rejected"
    assert exps[denied.experiment_id].reason == f"denied by {getpass.getuser()}: not on my bench"
    assert exps[expiring.experiment_id].state == "rejected"
    assert exps[expiring.experiment_id].reason == (  # both policies asked; carol's expired it
        "approval expired after 1 s with no decision (asked by program.md approval: "
        "temperature_c > 60 or agent not in trusted (temperature_c=45.0, agent='carol'); "
        "lab.yaml agents.carol.approval: human (every agent proposal))"
    )
    assert exps[again.experiment_id].state == "rejected"
    for eid in (denied.experiment_id, expiring.experiment_id):  # never went near a station
        assert exps[eid].station is None and exps[eid].recipe is not None
    # a human's no and an expiry say nothing about the point: the optimizer is not told
    # (no observation of it, nothing infeasible) and it never reached a wire
    for params in (DENIED, EXPIRED):
        assert not any({k: o.params[k] for k in params} == params for o in observations)
        assert not volumes(params) & wire, params
    assert not any(o.status == "infeasible" for o in observations), observations
    mine = [o for o in observations if {k: o.params[k] for k in HOT} == HOT]
    assert [o.status for o in mine] == ["ok"]
    assert volumes(HOT) <= wire, wire
    kinds = [(e["event"], e.get("decision")) for e in events if "approval" in e["event"]]
    assert kinds.count(("awaiting_approval", None)) == 3
    assert {("approval", "approved"), ("approval", "denied"), ("approval", "expired")} <= set(kinds)


@pytest.mark.timeout(120)
async def test_proposals_awaiting_approval_survive_a_restart_and_are_approved_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped (as Ctrl-C or a shutdown stop a campaign) with three proposals waiting: one
    is approved from the CLI while nothing runs the campaign, one expires meanwhile; the
    resume keeps the third waiting as a pending point, applies the approval, rejects the
    expired one, and an approval after the resume works."""
    events: list[dict[str, Any]] = []
    carol = ApprovalPolicy("lab.yaml agents.carol.approval", expires_s=1.0)
    async with bench(tmp_path, monkeypatch) as b:
        prog = colour_match(experiments=2)
        first = b.runner(prog, "restart", events, agent_approvals={"carol": carol})
        await first.prepare()
        kept = (await first.propose(HOT, "agent:alice")).experiment_id
        decided = (await first.propose(DENIED, "agent:bob")).experiment_id
        expired = (await first.propose(EXPIRED, "agent:carol")).experiment_id
        first.stop("stopped by the operator")
        summary = await first.run()
        assert summary.state == "stopped" and summary.counts["done"] == 0, summary
        assert [a["experiment_id"] for a in first.awaiting()] == [kept, decided, expired]
        # while nothing runs the campaign: bob's is approved through the journal file ...
        code = await asyncio.to_thread(
            cli,
            [
                "approve",
                decided,
                "--reason",
                "fine by me",
                "--lab",
                str(b.lab.source),
                "--wait",
                "0",
            ],
        )
        out = capsys.readouterr().out
        assert code == 0 and f"{decided} approved by {getpass.getuser()} (journaled)" in out, out
        assert "it does when it runs (labbridge resume restart" in out, out
        listed = await asyncio.to_thread(cli, ["approvals", "--lab", str(b.lab.source)])
        out = capsys.readouterr().out
        assert listed == 0 and f"{kept}  agent:alice  expires in" in out, out
        assert f"approved by {getpass.getuser()}: fine by me" in out, out
        # ... and carol's runs out of time
        await asyncio.sleep(1.2)
        # and an agent's proposal journaled just before a crash, before the policy was asked
        crashed = await b.journal.call(Journal.propose, "restart", CRASHED, "agent:bob")
        second = b.runner(prog, "restart", events, agent_approvals={"carol": carol})
        await second.prepare(resume=True, operator="tester")
        assert [a["experiment_id"] for a in second.awaiting()] == [kept]
        pending = [{k: p.params[k] for k in HOT} for p in second.optimizer.pending()]
        assert HOT in pending and DENIED in pending and EXPIRED not in pending, pending
        row = await second.decide(kept, True, "ana", "after the restart")
        assert row["state"] == "checked"
        summary = await second.run()
        wire = dispensed(b.sim)
    assert summary.state == "done" and summary.counts["done"] == 2, summary
    j = Journal(b.lab.store)
    try:
        exps = {e.id: e for e in j.experiments("restart")}
        logs = {eid: [t.state for t in j.transitions(eid) if t.event == "state"] for eid in exps}
    finally:
        j.close()
    assert exps[kept].state == exps[decided].state == "done"
    assert exps[kept].proposer == "agent:alice" and exps[decided].proposer == "agent:bob"
    assert logs[kept] == ["proposed", "awaiting-approval", "checked", "queued", "running", "done"]
    assert exps[expired].state == "rejected"
    assert (exps[expired].reason or "").startswith("approval expired after 1 s"), exps[expired]
    # the one journaled before the crash met the policy when claimed: it waited, and was
    # cancelled when the campaign ended by its budget; it never ran
    assert logs[crashed] == ["proposed", "awaiting-approval", "cancelled"], logs[crashed]
    assert (exps[crashed].reason or "").startswith("campaign ended before a decision")
    assert {e.proposer for e in exps.values()} == {"agent:alice", "agent:bob", "agent:carol"}
    assert volumes(HOT) | volumes(DENIED) <= wire
    assert not volumes(EXPIRED) & wire and not volumes(CRASHED) & wire
