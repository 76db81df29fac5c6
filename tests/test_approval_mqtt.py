"""The approval gate over the MQTT API and MCP (issue 14), on one lab service.

A real mosquitto with the docs' ``docs/mosquitto/acl`` and passwords (as
``tests/test_mqtt_api.py``), real Ray, the simulated bench at speed 500, the MQTT API and
the MCP server (streamable HTTP) on the same :class:`~bridge.service.LabService`. An agent
proposes through MCP and over MQTT; both wait for a human; the agent sees it waiting
(MCP tools, the campaign's status and the approvals events) but cannot decide: the ACL
refuses its approval topics, the service refuses its own proposals' approval, a payload
naming another approver is refused; the operator (ana) approves one (it runs, the
journal names her) and denies the other (rejected, nothing on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from test_approval import RULE, dispensed, volumes
from test_mqtt_api import (  # noqa: F401  (docs_broker: the fixture)
    PASSWORDS,
    SERVICE_PASSWORD_ENV,
    DocsBroker,
    client,
    docs_broker,
    lab_text,
    validate,
)

from bridge.labconfig import load_lab
from bridge.mcpserver import HttpBind, mcp_http
from bridge.mqttapi import MqttApi, mqtt_settings
from bridge.service import LabService, ServiceError
from loops.journal import Journal
from loops.program import builtin_program
from simulators.bench import SimulatedLab

SPEED = 500.0
AGENTS = """
agent_tokens: agents.tokens
agents:
  alice: {read: "*", propose: [appr-*], stations: [bench-a]}
  dave:
    propose: [typo-*]
    stations: [bench-a]
    approval: {human_when: "temprature_c > 60"}
"""
#: alice is not trusted by the program's rule: both wait (distinct volumes for the wire)
VIA_MCP = {"red_ml": 0.72, "green_ml": 0.11, "blue_ml": 0.74, "temperature_c": 40.0, "hold_s": 60}
VIA_MQTT = {
    "red_ml": 0.565,
    "green_ml": 0.145,
    "blue_ml": 0.665,
    "temperature_c": 40.0,
    "hold_s": 60,
}


def program(budget: int) -> str:
    """The colour match with the approval rule (alice is not in its trusted list)."""
    rule = RULE.replace("trusted: [alice]", "trusted: [lims]")
    text = builtin_program("color-match").read_text().replace("---\n", "---\n" + rule, 1)
    return (
        text.replace("experiments: 60", f"experiments: {budget}")
        .replace("target: 2.0", "target: 0.0")
        .replace("initial_points: 8", "initial_points: 1")
    )


@dataclasses.dataclass
class Served:
    sim: SimulatedLab
    lab: Any
    service: LabService
    api: MqttApi
    url: str
    token: str


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, broker: DocsBroker, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    monkeypatch.setenv(SERVICE_PASSWORD_ENV, PASSWORDS["labbridge"])
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(lab_text(sim, tmp_path, broker, "lab-approvals") + AGENTS)
        lab = load_lab(path, source="lab.yaml")
        token = lab.agents.store().issue("alice", who="test")
        api = MqttApi(mqtt_settings(lab), lab.bridge_id)
        await api.connect()
        try:
            async with (
                LabService(lab) as service,
                mcp_http(service, HttpBind("127.0.0.1", 0)) as url,
            ):
                await api.attach(service)
                yield Served(sim, lab, service, api, url, token)
                await api.detach()
        finally:
            await api.close("test over")


async def tool(agent: Client, name: str, **args: Any) -> dict[str, Any]:
    res = await agent.call_tool(name, args)
    assert not res.is_error, f"{name}: {res.content[0].text}"  # type: ignore[union-attr]
    return res.structured_content or {}


@pytest.mark.timeout(240)
async def test_an_operator_decides_over_mqtt_and_an_agent_can_neither_skip_nor_decide(
    ray_session: Any,
    docs_broker: DocsBroker,  # noqa: F811  (the fixture of tests/test_mqtt_api.py)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    async with serving(tmp_path, docs_broker, monkeypatch) as s:
        root, cid = s.api.root, "appr-1"
        # an agent's rule naming what a campaign it may propose to lacks: refused at start
        typo = await s.service.start_campaign("typo-1", program(4))
        assert not typo.accepted and re.match(
            r"lab.yaml:\d+: agents.dave.approval.human_when: unknown name 'temprature_c' in "
            r'"temprature_c > 60" for campaign typo-1',
            typo.errors[0],
        ), typo
        started = await s.service.start_campaign(cid, program(6))
        assert started.accepted, started
        with (
            client(docs_broker, "ana", loop=loop) as ana,
            client(docs_broker, "alice", loop=loop) as alice_mqtt,
        ):
            ana.subscribe(f"{root}/campaigns/{cid}/approvals", f"{root}/replies/ana/#")
            alice_mqtt.subscribe(f"{root}/campaigns/{cid}/approvals", f"{root}/replies/alice/#")

            async def ask(c: Any, topic: str, payload: dict[str, Any], tag: str) -> dict[str, Any]:
                reply = f"{root}/replies/{c.user}/{tag}"
                c.publish(f"{root}/{topic}/{c.user}", payload, response_topic=reply)
                _, data, _ = await c.get(lambda t, d: t == reply, timeout=30)
                return dict(data)

            async def event(c: Any, kind: str) -> dict[str, Any]:
                topic = f"{root}/campaigns/{cid}/approvals"
                _, data, _ = await c.get(lambda t, d: t == topic and d["event"] == kind, 30)
                return dict(data)

            # --- the agent proposes through MCP: it waits, and the agent sees it waiting
            async with (
                httpx2.AsyncClient(
                    headers={"Authorization": f"Bearer {s.token}"}, timeout=120
                ) as http,
                Client(
                    streamable_http_client(s.url, http_client=http), read_timeout_seconds=120
                ) as alice,
            ):
                names = {t.name for t in (await alice.list_tools()).tools}
                assert not {n for n in names if "approv" in n or "decide" in n}, names
                propose = next(t for t in (await alice.list_tools()).tools if t.name == "propose")
                assert "awaiting_approval" in (propose.description or "")
                receipt = await tool(alice, "propose", campaign_id=cid, params=VIA_MCP)
                assert receipt["awaiting_approval"] and not receipt["accepted"], receipt
                assert receipt["proposer"] == "agent:alice" and receipt["reasons"] == []
                assert "agent not in trusted" in receipt["approval"]["rules"][0]
                by_mcp = receipt["experiment_id"]
                waiting = await event(ana, "awaiting")
                validate("approval-event", waiting)
                assert (waiting["experiment_id"], waiting["proposer"]) == (by_mcp, "agent:alice")
                assert waiting["params"] == VIA_MCP and waiting["expires_t"] > 0
                exp = await tool(alice, "experiment", experiment_id=by_mcp)
                assert exp["state"] == "awaiting-approval", exp
                status = await tool(alice, "campaign", campaign_id=cid)
                assert [a["experiment_id"] for a in status["approvals"]] == [by_mcp]
                assert status["progress"]["awaiting_approval"] == 1

                # --- the same agent over MQTT (another channel): it waits as well
                reply = await ask(
                    alice_mqtt, f"campaigns/{cid}/proposals", {"params": VIA_MQTT}, "p"
                )
                assert reply["ok"] and reply["awaiting_approval"] and not reply["accepted"], reply
                validate("reply", reply)
                status = s.service.campaign_status(cid)
                validate("campaign-status", status)
                assert [a["experiment_id"] for a in status["approvals"]][:1] == [by_mcp]
                by_mqtt = reply["experiment_id"]
                # the same point as the one waiting: no way around the human either
                reply = await ask(
                    alice_mqtt, f"campaigns/{cid}/proposals", {"params": VIA_MCP}, "q"
                )
                assert reply["awaiting_approval"], reply
                again = reply["experiment_id"]

                # --- red team: the agent cannot decide, as itself or as the operator
                refused = [
                    alice_mqtt.puback(
                        alice_mqtt.publish(
                            f"{root}/campaigns/{cid}/approvals/{user}",
                            {"experiment_id": by_mcp, "decision": "approve", "reason": "mine"},
                        )
                    )
                    for user in ("alice", "ana")
                ]
                assert all(str(r) == "Not authorized" for r in refused), refused
                with pytest.raises(ServiceError, match="alice proposed experiment"):  # an ACL
                    await s.service.decide(cid, by_mcp, True, "alice", "mine")  # gone wrong
                # the approver is the topic's user: a payload naming another is refused
                reply = await ask(
                    ana,
                    f"campaigns/{cid}/approvals",
                    {"experiment_id": by_mcp, "decision": "approve", "reason": "x", "who": "bob"},
                    "w",
                )
                assert not reply["ok"] and "'who' was unexpected" in reply["errors"][0], reply
                assert await s.service.approvals(cid) != []

                # --- the operator decides
                reply = await ask(
                    ana,
                    f"campaigns/{cid}/approvals",
                    {"experiment_id": by_mcp, "decision": "approve", "reason": "40 degC is fine"},
                    "a",
                )
                assert reply["ok"] and reply["who"] == "ana" and reply["applied"], reply
                validate("reply", reply)
                assert reply["state"] in ("checked", "queued", "running"), reply
                approved = await event(alice_mqtt, "approved")
                validate("approval-event", approved)
                assert (approved["who"], approved["via"]) == ("ana", "mqtt"), approved
                for eid, why in ((by_mqtt, "not this one"), (again, "a duplicate")):
                    reply = await ask(
                        ana,
                        f"campaigns/{cid}/approvals",
                        {"experiment_id": eid, "decision": "deny", "reason": why},
                        f"d{eid}",
                    )
                    assert reply["ok"] and reply["state"] == "rejected", reply
                for eid, problem in (
                    (
                        by_mqtt,
                        f"experiment {by_mqtt} is not awaiting approval: it is rejected "
                        "(denied by ana: not this one)",
                    ),
                    (f"{cid}-9999", f"no experiment '{cid}-9999'"),
                ):
                    reply = await ask(
                        ana,
                        f"campaigns/{cid}/approvals",
                        {"experiment_id": eid, "decision": "approve", "reason": "late"},
                        f"late{eid}",
                    )
                    assert not reply["ok"] and reply["errors"][0].startswith(problem), reply
                    assert "\n" not in reply["errors"][0]
                why = await tool(alice, "why_refused", experiment_id=by_mqtt)
                assert why["refused"] and why["reasons"] == ["denied by ana: not this one"], why
                done = await tool(alice, "wait_for_experiment", experiment_id=by_mcp, timeout_s=120)
                assert done["state"] == "done" and done["proposer"] == "agent:alice", done
            await s.service.control(cid, "stop", who="ana")
            await s.service.wait_campaign(cid)
            # ana's 3 decisions and 3 refusals; alice's never reached the service (the ACL)
            assert s.api.counts.get("approval:ok") == 3, s.api.counts
            assert s.api.counts.get("approval:error") == 3, s.api.counts
            wire = dispensed(s.sim)
    assert volumes(VIA_MCP) <= wire and not volumes(VIA_MQTT) & wire
    j = Journal(tmp_path / "journal.db")
    try:
        log = j.transitions(by_mcp)
        exps = {e.id: e for e in j.experiments(cid)}
    finally:
        j.close()
    checked = next(t for t in log if t.state == "checked")
    assert checked.data is not None
    assert checked.data["data"] == {
        "approved_by": "ana",
        "reason": "40 degC is fine",
        "via": "mqtt",
    }
    assert exps[by_mcp].state == "done" and exps[by_mcp].proposer == "agent:alice"
    assert exps[by_mqtt].reason == "denied by ana: not this one"
    assert exps[again].reason == "denied by ana: a duplicate"
