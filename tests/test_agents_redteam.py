"""Red team for agents (issue 14): quotas on every channel, and a flood that stays bounded.

A simulated lab served like ``labbridge serve --mcp-http``: the MQTT API on mosquitto with
the docs' ACL and passwords, and the MCP server on a real socket on 127.0.0.1, both over one
:class:`~bridge.service.LabService`; agents are SDK MCP clients with bearer tokens and plain
paho clients. What tests/test_mcp.py (scopes, forged identities in the payload, revoked and
unknown tokens) and tests/test_mqtt_api.py (the ACL: nobody publishes as somebody else,
payload fields naming someone) already attack is not repeated; this file adds:

* quotas: one agent's proposals over MCP and over MQTT count against its one lab.yaml
  quota (``agent:alice`` either way); over it a proposal is refused, naming the quota, the
  count and when it frees up, before it is journaled or dry-run (nothing reaches a wire);
  an MQTT user not listed in lab.yaml gets ``default_quota``; a budget share counts what
  the agent's own experiments consumed on the station (the optimizer's not);
* a flood: one agent sends hundreds of tool calls at once; its rate and its queue bound
  refuse them at once, while another agent is answered, an MQTT user's request is worked
  before the flooder's (fair queue), and an e-stop puts the station in its safe state on
  the wire; the flooder's revoked token is refused from its next request on.

Behaviour is asserted, never wall-clock times. Real Ray (the session's), speed 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from test_mcp import GOOD, OVERFILL, call, http_agent, refused, relaxed_program
from test_mqtt_api import (
    PASSWORDS,
    SERVICE_PASSWORD_ENV,
    DocsBroker,
    actuations,
    client,
    docs_broker,  # noqa: F401  (the fixture: mosquitto with the docs' ACL and passwords)
    full_storm,
    lab_text,
    safe_state_storm,
    validate,
)

from bridge.agentcli import main as agents_main
from bridge.labconfig import load_lab
from bridge.mcpserver import HttpBind, mcp_http
from bridge.mqttapi import MqttApi, mqtt_settings
from bridge.service import LabService
from loops.journal import Journal
from simulators.bench import SimulatedLab

SPEED = 500.0


@dataclasses.dataclass
class Lab:
    sim: SimulatedLab
    path: Path
    service: LabService
    api: MqttApi
    url: str
    root: str
    tokens: dict[str, str]


@contextlib.asynccontextmanager
async def served_lab(
    tmp_path: Path, broker: DocsBroker, monkeypatch: pytest.MonkeyPatch, agents: str
) -> AsyncIterator[Lab]:
    """A simulated lab, its MQTT API and its MCP server on one service; ``agents``: the
    lab.yaml text of its agents (and quotas); each listed agent gets a token."""
    monkeypatch.setenv(SERVICE_PASSWORD_ENV, PASSWORDS["labbridge"])
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(lab_text(sim, tmp_path, broker, "lab-rt") + agents)
        lab = load_lab(path)
        store = lab.agents.store()
        tokens = {name: store.issue(name, who="test") for name in lab.agents.agents}
        api = MqttApi(mqtt_settings(lab), lab.bridge_id)
        await api.connect()
        try:
            async with LabService(lab) as service:
                await api.attach(service)
                async with mcp_http(service, HttpBind("127.0.0.1", 0)) as url:
                    yield Lab(sim, path, service, api, url, api.root, tokens)
                await api.detach()
        finally:
            await api.close("test over")


async def paused_campaign(service: LabService, cid: str, budget: int) -> None:
    """A running campaign whose optimizer has not claimed anything: paused before its
    workers first run (start_campaign returns with the runner running; nothing is awaited
    before the pause), so the station stays idle and proposals wait in its queue."""
    started = await service.start_campaign(cid, relaxed_program(budget), who="operator:ana")
    assert started.accepted, started
    await service.control(cid, "pause", who="ana")
    assert service.campaign_status(cid)["progress"]["in_flight"] == 0


def journaled(store: Path, cid: str) -> list[Any]:
    with Journal(store) as j:
        return j.experiments(cid)


async def mqtt_propose(c: Any, root: str, cid: str, params: dict[str, Any], tag: str) -> Any:
    c.publish(
        f"{root}/campaigns/{cid}/proposals/{c.user}",
        {"params": params},
        response_topic=f"{root}/replies/{c.user}/{tag}",
    )
    _, reply, _ = await c.get(lambda t, d: t.endswith(f"/{tag}"), timeout=30)
    validate("reply", reply)
    return reply


QUOTAS = """
default_quota: {proposals_per_hour: 1}
agents:
  alice:
    read: "*"
    propose: [rt-*]
    stations: [bench-a]
    quota: {proposals_per_hour: 3, experiments_per_day: 5, budgets: {dye_ml_per_day: 20}}
"""


@pytest.mark.timeout(120)
async def test_an_agents_quota_holds_over_mcp_and_mqtt_and_refusals_never_reach_a_wire(
    ray_session: Any,
    docs_broker: DocsBroker,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    async with served_lab(tmp_path, docs_broker, monkeypatch, QUOTAS) as lab:
        await paused_campaign(lab.service, "rt-1", budget=1)
        t0 = time.monotonic()
        with (
            client(docs_broker, "alice", loop=loop) as alice_mqtt,
            client(docs_broker, "lims", loop=loop) as lims,
        ):
            alice_mqtt.subscribe(f"{lab.root}/replies/alice/#")
            lims.subscribe(f"{lab.root}/replies/lims/#")
            async with http_agent(lab.url, lab.tokens["alice"]) as alice:
                # three proposals of agent:alice, over both channels: one quota
                unsafe = await call(alice, "propose", campaign_id="rt-1", params=OVERFILL)
                assert not unsafe["accepted"], unsafe  # refused by the safety layer: counts
                good = await call(alice, "propose", campaign_id="rt-1", params=GOOD)
                assert good["accepted"] and good["proposer"] == "agent:alice", good
                third = await mqtt_propose(alice_mqtt, lab.root, "rt-1", OVERFILL, "p3")
                assert not third["accepted"] and third["proposer"] == "agent:alice", third
                assert "quota" not in third and third["reasons"], third
                # the fourth: refused for the quota, over either channel, naming it
                over = await mqtt_propose(alice_mqtt, lab.root, "rt-1", GOOD, "p4")
                assert not over["ok"] and "experiment_id" not in over, over
                (text,) = over["errors"]
                assert text.startswith(
                    "quota of agent:alice: proposals_per_hour 3 (lab.yaml agents.alice.quota): "
                    "3 proposals journaled in the last hour; the next is allowed at "
                ), text
                assert over["quota"]["quota"] == "proposals_per_hour", over
                assert over["quota"]["used"] == 3 and over["quota"]["limit"] == 3, over
                assert 3500 < over["retry_after_s"] <= 3600, over
                mcp_text = await refused(alice, "propose", campaign_id="rt-1", params=GOOD)
                assert "quota of agent:alice: proposals_per_hour 3 (lab.yaml" in mcp_text, mcp_text
                verdict = await call(alice, "dry_run", campaign_id="rt-1", params=GOOD)
                assert not verdict["ok"] and verdict["quota"].startswith("quota of agent:alice")
                assert verdict["stations"]["bench-a"]["ok"], verdict  # the point itself is fine
                # an MQTT user not listed in lab.yaml: default_quota
                first = await mqtt_propose(lims, lab.root, "rt-1", OVERFILL, "l1")
                assert first["ok"] is False and first["experiment_id"], first
                second = await mqtt_propose(lims, lab.root, "rt-1", GOOD, "l2")
                assert second["quota"]["quota"] == "proposals_per_hour", second
                assert "(lab.yaml default_quota): 1 proposals journaled" in second["errors"][0]
                assert actuations(lab.sim, t0) == []  # nothing refused reached a wire
                rows = journaled(tmp_path / "journal.db", "rt-1")
                assert [e.proposer for e in rows] == ["agent:alice"] * 3 + ["agent:lims"]
                you = (await call(alice, "lab"))["you"]
                assert you["quota"]["proposals_per_hour"] == 3, you
                used = {u["quota"]: u for u in you["quota_used"]}
                assert (
                    used["proposals_per_hour"]["used"] == 3 and not used["proposals_per_hour"]["ok"]
                )
                assert used["experiments_per_day"]["used"] == 1  # accepted, waiting to run
                assert used["budgets.dye_ml_per_day"]["used"] == 0
                # alice's accepted point runs (the campaign's one experiment)
                await lab.service.control("rt-1", "resume", who="ana")
                done = await call(
                    alice, "wait_for_experiment", experiment_id=good["experiment_id"], timeout_s=90
                )
                assert done["state"] == "done" and done["proposer"] == "agent:alice", done
                await lab.service.wait_campaign("rt-1")
                used = {u["quota"]: u for u in (await call(alice, "lab"))["you"]["quota_used"]}
                # the dyes alice's experiment put in the vial, from the station's budget
                # ledger in the journal (tests/test_quotas.py: others' are not hers)
                dispensed = sum(done["measurements"]["dispensed_ml"].values())
                assert used["budgets.dye_ml_per_day"]["used"] == pytest.approx(dispensed, abs=0.01)
                assert used["experiments_per_day"]["used"] == 1


FLOOD = """
agents:
  alice: {read: "*", propose: [rt-*], stations: [bench-a]}
  mallet:
    read: "*"
    propose: [rt-*]
    stations: [bench-a]
    quota: {queued_per_campaign: 2, tool_calls_per_s: 5, tool_call_burst: 8}
"""


async def flood(agent: Client, stop: asyncio.Event, answers: list[str], limit: int) -> None:
    """Tool calls as fast as 25 at a time go, until ``stop`` or ``limit`` calls: proposals
    the station would run, proposals its safety layer refuses, dry runs."""
    kinds = [("propose", GOOD), ("propose", OVERFILL), ("dry_run", GOOD)]
    sent = 0

    async def one(i: int) -> None:
        tool, params = kinds[i % len(kinds)]
        try:
            res = await agent.call_tool(tool, {"campaign_id": "rt-2", "params": params})
        except MCPError as exc:  # past twice its rate: HTTP 429, refused unread
            answers.append("HTTP 429" if "error response" in str(exc) else f"error: {exc}")
            return
        text = res.content[0].text if res.is_error else ""  # type: ignore[union-attr]
        data = res.structured_content or {}
        answers.append(text or ("accepted" if data.get("accepted") else f"{tool} answered"))

    while not stop.is_set() and sent < limit:
        batch = range(sent, min(sent + 25, limit))
        sent += len(batch)
        await asyncio.gather(*(one(i) for i in batch))


@contextlib.asynccontextmanager
async def flooding(
    agent: Client, answers: list[str], limit: int
) -> AsyncIterator[asyncio.Task[None]]:
    """:func:`flood` in a task while the block runs; it ends with the block (its last batch
    answered; cancelled if the block failed)."""
    stop = asyncio.Event()
    task = asyncio.create_task(flood(agent, stop, answers, limit))
    try:
        yield task
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    stop.set()
    await task


@pytest.mark.timeout(120)
async def test_a_flood_is_bounded_while_another_agent_and_an_estop_stay_responsive(
    ray_session: Any,
    docs_broker: DocsBroker,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    async with served_lab(tmp_path, docs_broker, monkeypatch, FLOOD) as lab:
        await paused_campaign(lab.service, "rt-2", budget=3)
        answers: list[str] = []
        with (
            client(docs_broker, "lims", loop=loop) as lims,
            client(docs_broker, "alice", loop=loop) as alice_mqtt,
            client(docs_broker, "ana", loop=loop) as ana,
        ):
            ana.subscribe(f"{lab.root}/replies/#")  # the operator reads every reply, in order
            async with (
                http_agent(lab.url, lab.tokens["mallet"]) as mallet,
                http_agent(lab.url, lab.tokens["alice"]) as alice,
            ):
                t0 = time.monotonic()
                # the campaign's queue holds two of its accepted proposals, no more
                for _ in range(2):
                    queued = await call(mallet, "propose", campaign_id="rt-2", params=GOOD)
                    assert queued["accepted"], queued
                text = await refused(mallet, "propose", campaign_id="rt-2", params=GOOD)
                assert (
                    "quota of agent:mallet: queued_per_campaign 2 (lab.yaml agents.mallet"
                    ".quota): 2 of its proposals wait in campaign rt-2 (queued" in text
                )
                async with flooding(mallet, answers, limit=2000) as flood_task:
                    while len(answers) < 50:  # the flood is on
                        assert not flood_task.done(), answers
                        await asyncio.sleep(0.01)
                    # another agent is answered meanwhile, and its own queue is its own
                    verdict = await call(alice, "dry_run", campaign_id="rt-2", params=GOOD)
                    assert verdict["ok"], verdict
                    mine = await call(alice, "propose", campaign_id="rt-2", params=GOOD)
                    assert mine["accepted"] and mine["proposer"] == "agent:alice", mine
                    # over MQTT, one user's burst waits behind its own requests, not another's
                    for i in range(30):
                        lims.publish(
                            f"{lab.root}/campaigns/rt-2/proposals/lims",
                            {"params": OVERFILL},
                            response_topic=f"{lab.root}/replies/lims/burst",
                            correlation=str(i).encode(),
                        )
                    alice_mqtt.publish(
                        f"{lab.root}/campaigns/rt-2/proposals/alice",
                        {"params": OVERFILL},
                        response_topic=f"{lab.root}/replies/alice/one",
                    )
                    before = 0  # lims's replies before alice's, in the order they were sent
                    while True:
                        topic, reply, _ = await ana.get(
                            lambda t, d: t.endswith(("/burst", "/one")), timeout=30
                        )
                        if topic.endswith("/one"):
                            break
                        before += 1
                    assert reply["proposer"] == "agent:alice" and not reply["accepted"], reply
                    # first in, first out, alice's would come after lims's 30: they take turns
                    assert before <= 10, f"{before} of lims's 30 were worked before alice's one"
                    assert actuations(lab.sim, t0) == []  # a paused campaign: nothing ran
                    # the e-stop: every station to its safe state on the wire, during the flood
                    assert not flood_task.done()
                    t_estop = time.monotonic()
                    ana.publish(
                        f"{lab.root}/estop/ana",
                        {"reason": "red team"},
                        response_topic=f"{lab.root}/replies/ana/e",
                    )
                    _, report, _ = await ana.get(lambda t, d: t.endswith("/e"), timeout=30)
                    assert report["ok"] and report["stations"]["bench-a"]["failed"] == [], report
                    assert report["campaigns_aborted"] == ["rt-2"], report

                    await asyncio.sleep(0.1)  # the last command's arrival is logged
                    assert full_storm(safe_state_storm(lab.sim, t_estop))  # on the devices' side
                    for _ in range(6000):  # it ignores "busy": refused unread, soon
                        if "HTTP 429" in answers or flood_task.done():
                            break
                        await asyncio.sleep(0.01)
                # the flooder's token, revoked, is refused from its next request on (401, not
                # the 429 of its flood: an unknown token is never counted as anyone's)
                assert agents_main(["agents", "revoke", "mallet", "--lab", str(lab.path)]) == 0
                async with httpx2.AsyncClient(timeout=120) as http:
                    r = await http.post(
                        lab.url,
                        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                        headers={"Authorization": f"Bearer {lab.tokens['mallet']}"},
                    )
                assert r.status_code == 401 and r.json()["error"] == "invalid_token", r.text
                with pytest.raises(MCPError):
                    await mallet.call_tool("lab", {})
        busy = [a for a in answers if "busy: agent mallet made more than 5 tool calls" in a]
        assert busy and "accepted" not in answers, sorted(set(answers))  # its queue was full
        assert "HTTP 429" in answers and not [a for a in answers if a.startswith("error")]
        assert len(answers) <= 2000
        assert all("\n" not in a and "Traceback" not in a for a in answers)
    rows = journaled(tmp_path / "journal.db", "rt-2")
    mallets = [e for e in rows if e.proposer == "agent:mallet"]
    # the two accepted ones never ran (the campaign was paused, then aborted); the flood's
    # proposals were refused before they were journaled (its queue was full)
    assert [e.state for e in mallets] == ["cancelled", "cancelled"], mallets
    assert [e.state for e in rows if e.id == mine["experiment_id"]] == ["cancelled"]
