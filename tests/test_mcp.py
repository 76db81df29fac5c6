"""Agents over MCP: tokens, lab.yaml scopes, and whole agent sessions on a simulated lab.

An MCP client from the official SDK runs an agent's session over stdio (``labbridge mcp``
as a subprocess that opens the lab itself, the token in its environment) and over
streamable HTTP (a real socket on 127.0.0.1, the MCP server hosted by ``labbridge serve``
next to the MQTT API on one lab service): it reads the lab, dry-runs, proposes and waits
for the result, which the journal attributes to the token's agent. Red team: wrong,
revoked and unlisted tokens, proposals and controls outside an agent's scope, a payload
claiming another identity, oversized or malformed arguments, a second owner of the lab --
each refused, and nothing reaches a wire (the simulators' wire logs). Real Ray (the
session's), the simulated bench at speed 500, a real mosquitto for ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from docpages import blocks, run_script, strays, write_files
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from test_mqtt_api import actuations

from bridge.agentcli import TOKEN_ENV
from bridge.agentcli import main as agents_main
from bridge.agenttokens import TokenStore
from bridge.labconfig import LabConfigError, load_lab
from bridge.mcpserver import HttpBind, McpError, mcp_http, parse_bind
from bridge.mqttapi import mqtt_settings
from bridge.mqttserve import serve
from bridge.service import LabService, ServiceError
from bridge.simbench import sim_lab_yaml
from loops.journal import Journal
from loops.program import builtin_program, load_program
from simulators.bench import SimulatedLab

ROOT = Path(__file__).resolve().parents[1]
SPEED = 500.0
GOOD = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 40.0, "hold_s": 60}
#: inside the program's bounds (no constraint caps the total here) but 3.6 mL > the vial's 2.8
OVERFILL = {"red_ml": 1.2, "green_ml": 1.2, "blue_ml": 1.2, "temperature_c": 40.0, "hold_s": 60}
AGENTS = """
agent_tokens: secrets/agents.tokens
agents:
  alice: {read: "*", propose: [color-*], start: [color-*], control: [color-*], stations: [bench-a]}
  bob:
    read: [other-*]
    propose: other-*
    start: [other-*]
    control: [other-*]
    stations: bench-*
  carol: {read: "*", stations: [bench-a]}
"""
TOOLS = {
    "lab",
    "readings",
    "campaigns",
    "campaign",
    "results",
    "experiment",
    "why_refused",
    "wait_for_experiment",
    "dry_run",
    "propose",
    "start_campaign",
    "control",
}


def relaxed_program(budget: int) -> str:
    """The colour match without its cap on the total volume or its target: the safety layer
    is what refuses an overfill. (Its floor stays: below 0.6 mL the liquid probe is out of
    the liquid, the hold's temperature check fails and the station trips.)"""
    base = load_program(builtin_program("color-match"))
    prog = dataclasses.replace(
        base,
        constraints=tuple(c for c in base.constraints if ">=" in c.text),
        budget=dataclasses.replace(base.budget, experiments=budget),
        stop=dataclasses.replace(base.stop, target=None, no_improvement=None),
        initial_points=1,
    )
    return prog.to_markdown()


@dataclasses.dataclass
class AgentLab:
    sim: SimulatedLab
    path: Path
    tokens: dict[str, str]

    def lab(self) -> Any:
        return load_lab(self.path)


@contextlib.asynccontextmanager
async def agent_lab(tmp_path: Path, extra: str = "") -> AsyncIterator[AgentLab]:
    """A simulated lab with agents alice, bob, carol (revoked) and mallory (not in lab.yaml)."""
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db") + AGENTS + extra)
        store = load_lab(path).agents.store()
        tokens = {a: store.issue(a, who="test") for a in ("alice", "bob", "carol", "mallory")}
        yield AgentLab(sim, path, tokens)


async def call(client: Client, tool: str, /, **args: Any) -> dict[str, Any]:
    """A tool's structured result; AssertionError with its text if the tool refused."""
    res = await client.call_tool(tool, args)
    assert not res.is_error, f"{tool}: {res.content[0].text}"  # type: ignore[union-attr]
    out: dict[str, Any] = res.structured_content or {}
    return out


async def refused(client: Client, tool: str, /, **args: Any) -> str:
    """A tool's refusal: one line, no traceback."""
    res = await client.call_tool(tool, args)
    text: str = res.content[0].text  # type: ignore[union-attr]
    assert res.is_error, f"{tool} was not refused: {text}"
    assert "\n" not in text and "Traceback" not in text, text
    return text


async def until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.05)


async def in_flight(agent: Client, cid: str) -> int:
    return int((await call(agent, "campaign", campaign_id=cid))["progress"]["in_flight"])


async def pause_when_idle(agent: Client, cid: str) -> None:
    """Pause the campaign once its optimizer's experiment runs, and wait for that one to end:
    then nothing runs on the station (a pause stops new claims, not one under way)."""

    async def running() -> bool:
        return await in_flight(agent, cid) > 0

    async def idle() -> bool:
        return await in_flight(agent, cid) == 0

    await until(running, 60, "the optimizer's first experiment")
    paused = await call(agent, "control", campaign_id=cid, action="pause", reason="my turn")
    assert paused["state"] == "paused"
    await until(idle, 60, "the optimizer's experiment to end")


async def agent_session(agent: Client, sim: SimulatedLab, cid: str, budget: int = 3) -> str:
    """An agent's whole session: read the lab, start a campaign, dry-run, propose (claiming
    another identity in the payload), wait for the result. Returns the experiment id."""
    tools = {t.name: t for t in (await agent.list_tools()).tools}
    assert set(tools) == TOOLS
    # the descriptions carry the lab's own limits, from its envelope
    assert "hotplate.setpoint_c: >= 0, <= 80, rises <= 10/min degC" in (
        tools["dry_run"].description or ""
    )
    assert "rule heater-needs-stirring-and-closed-lid" in (tools["propose"].description or "")
    lab = await call(agent, "lab")
    bench = lab["stations"]["bench-a"]
    assert bench["rules"][0]["name"] == "heater-needs-stirring-and-closed-lid"
    assert (
        "dispense(volume_ml: a number > 0 mL"
        in (bench["instruments"]["red"]["commands"]["dispense"]["signature"])
    )
    assert bench["limits"]["vial.volume"]["how"] == "<= 2.8 mL"
    assert lab["you"]["agent"] == "agent:alice"
    started = await call(agent, "start_campaign", campaign_id=cid, program=relaxed_program(budget))
    assert started["accepted"] and started["stations"] == ["bench-a"], started
    await pause_when_idle(agent, cid)
    status = await call(agent, "campaign", campaign_id=cid)
    assert status["program"]["parameters"]["temperature_c"] == {
        "type": "float",
        "low": 25,
        "high": 75,
        "unit": "degC",
        "doc": "hotplate setpoint after the ramp",
    }
    t0 = time.monotonic()
    verdict = await call(agent, "dry_run", campaign_id=cid, params=OVERFILL)
    assert not verdict["ok"] and verdict["stage"] == "safety", verdict
    assert any("vial.volume" in r and "2.8" in r for r in verdict["reasons"]), verdict
    assert (await call(agent, "dry_run", campaign_id=cid, params=GOOD))["ok"]
    rejected = await call(agent, "propose", campaign_id=cid, params=OVERFILL)
    assert not rejected["accepted"] and rejected["proposer"] == "agent:alice", rejected
    why = await call(agent, "why_refused", experiment_id=rejected["experiment_id"])
    assert why["refused"] and any("vial.volume" in r for r in why["reasons"]), why
    # the payload claims another identity: ignored, the token's agent proposes
    forged = await call(
        agent,
        "propose",
        campaign_id=cid,
        params=GOOD,
        agent="mallory",
        proposer="agent:mallory",
        note="from agent:mallory",
    )
    assert forged["accepted"] and forged["proposer"] == "agent:alice", forged
    assert actuations(sim, t0) == []  # dry runs and a refused proposal never reach a wire
    await call(agent, "control", campaign_id=cid, action="resume")
    outcome = await call(
        agent, "wait_for_experiment", experiment_id=forged["experiment_id"], timeout_s=120
    )
    assert outcome["state"] == "done" and outcome["proposer"] == "agent:alice", outcome
    assert outcome["objective"] is not None and outcome["verified"] is not None
    record = await call(agent, "experiment", experiment_id=forged["experiment_id"])
    assert record["proposer"] == "agent:alice" and record["params"] == GOOD
    assert any(e["event"] == "step_done" for e in record["log"]), record["log"]
    assert any(v["allowed"] and v["command"] for v in record["verdicts"]), record["verdicts"]
    assert all(len(i["sha256"]) == 64 for i in record["images"].values()) and record["images"]
    readings = await call(agent, "readings", station="bench-a")
    assert "hotplate.plate_c" in readings["measured"] and not readings["tripped"]
    results = await call(agent, "results", campaign_id=cid)
    assert forged["experiment_id"] in [e["experiment_id"] for e in results["experiments"]]
    program = await agent.read_resource(f"labbridge://campaigns/{cid}/program.md")
    assert program.contents[0].text.startswith("---\nname: color-match")  # type: ignore[union-attr]
    return str(forged["experiment_id"])


def journal_experiments(store: Path, cid: str) -> list[Any]:
    j = Journal(store)
    try:
        return j.experiments(cid)
    finally:
        j.close()


# ------------------------------------------------------------------------ stdio
def _mcp_cli(lab: Path, token: str | None, gcs: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    argv = [sys.executable, "-m", "bridge.agentcli", "mcp", "--lab", str(lab)]
    return subprocess.run(
        [*argv, "--ray-address", gcs],
        env=env,
        cwd=ROOT,
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(180)
async def test_an_agent_session_over_stdio_is_attributed_to_the_token_and_bad_tokens_never_start(
    ray_session: Any, tmp_path: Path
) -> None:
    gcs = ray_session.get_runtime_context().gcs_address
    async with agent_lab(tmp_path) as alab:
        store = alab.lab().agents.store()
        store.revoke("carol")
        t0 = time.monotonic()
        for token, problem in (
            (None, f"no agent token: set {TOKEN_ENV}"),
            ("lbt_" + "x" * 43, "the token is not valid"),
            (alab.tokens["carol"], "the token is not valid (unknown, revoked or replaced)"),
            (alab.tokens["mallory"], "agent 'mallory' is not in"),
        ):
            done = await asyncio.to_thread(_mcp_cli, alab.path, token, gcs)
            assert done.returncode == 1 and problem in done.stderr, done.stderr
            assert "Traceback" not in done.stderr and done.stdout == ""
        assert actuations(alab.sim, t0) == []
        server = StdioServerParameters(
            command=sys.executable,
            args=["-m", "bridge.agentcli", "mcp", "--lab", str(alab.path), "--ray-address", gcs],
            env={**os.environ, TOKEN_ENV: alab.tokens["alice"]},
            cwd=ROOT,
        )
        async with Client(server, read_timeout_seconds=120) as agent:
            eid = await agent_session(agent, alab.sim, "color-1")
            text = await refused(agent, "propose", campaign_id="other-1", params=GOOD)
            assert "agent alice may not propose campaign 'other-1'" in text, text
            store.revoke("alice")  # the stdio token is checked on every call
            text = await refused(agent, "lab")
            assert "the token is not valid" in text, text
    exps = {e.id: e for e in journal_experiments(tmp_path / "journal.db", "color-1")}
    assert exps[eid].proposer == "agent:alice" and exps[eid].state == "done"
    assert {e.proposer for e in exps.values()} <= {"agent:alice", "optimizer:bayes"}
    j = Journal(tmp_path / "journal.db")
    try:
        assert j.campaign("color-1").state in ("done", "aborted", "stopped")
    finally:
        j.close()


# ------------------------------------------------------------------------- HTTP
@contextlib.asynccontextmanager
async def served(alab: AgentLab, broker: Any) -> AsyncIterator[tuple[str, LabService]]:
    """``labbridge serve`` on the lab with MCP hosted on the same service (--mcp-http)."""
    text = alab.path.read_text() + f"mqtt:\n  url: {broker.url}\n  status_interval_s: 0.5\n"
    alab.path.write_text(text)
    lab = alab.lab()
    stop = asyncio.Event()
    online: asyncio.Future[tuple[str, LabService]] = asyncio.get_running_loop().create_future()

    @contextlib.asynccontextmanager
    async def hosted(service: LabService) -> AsyncIterator[str]:
        async with mcp_http(service, HttpBind("127.0.0.1", 0)) as url:
            online.set_result((url, service))
            yield url

    task = asyncio.create_task(
        serve(
            lab,
            mqtt_settings(lab),
            stop=stop,
            handle_signals=False,
            on_online=lambda api, service: None,
            hosted=[hosted],
        )
    )
    try:
        done, _ = await asyncio.wait({task, online}, timeout=90, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        assert online in done, "serve --mcp-http did not come online"
        yield online.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 90)


@contextlib.asynccontextmanager
async def http_agent(url: str, token: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http,
        Client(streamable_http_client(url, http_client=http), read_timeout_seconds=120) as agent,
    ):
        yield agent


@pytest.mark.timeout(180)
async def test_an_agent_session_over_http_hosted_by_serve_and_the_red_team_is_refused(
    ray_session: Any, mosquitto: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent_lab(tmp_path) as alab, served(alab, mosquitto) as (url, service):
        assert url.startswith("http://127.0.0.1:")
        with pytest.raises(ServiceError, match="open in another labbridge process"):
            await LabService(alab.lab()).open()  # one owner: MCP shares serve's service
        async with http_agent(url, alab.tokens["alice"]) as alice:
            eid = await agent_session(alice, alab.sim, "color-2", budget=5)
            report = await alice.read_resource("labbridge://campaigns/color-2/report.html")
            assert "<h1>Campaign color-2</h1>" in report.contents[0].text  # type: ignore[union-attr]
            await pause_when_idle(alice, "color-2")
            t0 = time.monotonic()
            # oversized and malformed arguments: one line naming the field
            too_many = {f"p{i}": 1.0 for i in range(65)}
            text = await refused(alice, "propose", campaign_id="color-2", params=too_many)
            assert "params: Dictionary should have at most 64 items" in text, text
            text = await refused(alice, "propose", campaign_id="color-2", params={"red_ml": "1"})
            assert "params.red_ml" in text and "valid number" in text, text
            text = await refused(alice, "dry_run", campaign_id="c" * 65, params=GOOD)
            assert "campaign_id: String should have at most 64 characters" in text, text
            text = await refused(alice, "propose", campaign_id="color-404", params=GOOD)
            assert "no campaign 'color-404' in this service" in text, text
            text = await refused(alice, "propose", campaign_id="other-1", params=GOOD)
            assert "agent alice may not propose campaign 'other-1'" in text, text
            text = await refused(alice, "readings", station="bench-b")
            assert "may not use station bench-b" in text, text
        async with http_agent(url, alab.tokens["bob"]) as bob:
            for tool, args, problem in (
                ("propose", {"params": GOOD}, "agent bob may not propose campaign 'color-2'"),
                ("dry_run", {"params": GOOD}, "agent bob may not propose campaign 'color-2'"),
                ("control", {"action": "abort"}, "agent bob may not control campaign 'color-2'"),
                ("campaign", {}, "agent bob may not read campaign 'color-2'"),
                ("results", {}, "agent bob may not read campaign 'color-2'"),
            ):
                text = await refused(bob, tool, campaign_id="color-2", **args)
                assert problem in text, (tool, text)
            text = await refused(bob, "experiment", experiment_id=eid)
            assert "agent bob may not read campaign 'color-2'" in text, text
            text = await refused(
                bob, "start_campaign", campaign_id="color-3", program=relaxed_program(1)
            )
            assert "agent bob may not start campaign 'color-3'" in text, text
            assert (await call(bob, "campaigns"))["campaigns"] == {}
            with pytest.raises(MCPError, match="agent bob may not read campaign 'color-2'"):
                await bob.read_resource("labbridge://campaigns/color-2/program.md")
        async with http_agent(url, alab.tokens["carol"]) as carol:
            assert (await call(carol, "lab"))["you"]["agent"] == "agent:carol"
            text = await refused(carol, "propose", campaign_id="color-2", params=GOOD)
            assert "agent carol may not propose campaign 'color-2'" in text, text
            assert agents_main(["agents", "revoke", "carol", "--lab", str(alab.path)]) == 0
            with pytest.raises(MCPError):  # the next request of a revoked token: 401
                await carol.call_tool("lab", {})
        # no session at all without a valid token
        async with httpx2.AsyncClient(timeout=120) as http:
            ping = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
            bad = (alab.tokens["carol"], alab.tokens["mallory"], "lbt_nope", "x" * 10_000)
            for headers in [{"Authorization": f"Bearer {t}"} for t in bad] + [{}]:
                r = await http.post(url, json=ping, headers=headers)
                assert r.status_code == 401 and r.json()["error"] == "invalid_token", r.text
        assert actuations(alab.sim, t0) == []  # nothing refused reached a wire
        await service.control("color-2", "resume", who="test")
        await service.wait_campaign("color-2")
    exps = journal_experiments(tmp_path / "journal.db", "color-2")
    assert {e.proposer for e in exps} == {"agent:alice", "optimizer:bayes"}
    assert [e.state for e in exps if e.id == eid] == ["done"]
    capsys.readouterr()


# -------------------------------------------------------------------------- CLI
BASE = (
    "stations:\n  bench-a:\n    instruments:\n"
    "      - {name: hp, kind: hotplate, url: 'modbus-tcp://127.0.0.1:5020'}\n"
)


def test_agents_issue_list_and_revoke_keep_only_hashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        BASE + "agents:\n  alice: {read: '*', propose: [color-*], stations: [bench-a]}\n"
    )
    argv = ["--lab", str(lab)]
    assert agents_main(["agents", "issue", "alice", *argv, "--scope", "read,propose"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("lbt_") and len(token) == 47 and "\n" not in token
    assert "shown once" in out.err and token not in out.err
    tokens = tmp_path / "agents.tokens"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert token not in tokens.read_text()
    record = TokenStore(tokens).lookup(token)
    assert record is not None and record.scopes == ("read", "propose")
    assert agents_main(["agents", "list", *argv, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert token not in json.dumps(listed)
    assert listed["agents"][0]["token"]["actions"] == ["read", "propose"]
    assert listed["agents"][0]["scopes"]["propose"] == ["color-*"]
    assert agents_main(["agents", "issue", "alice", *argv]) == 0  # a new one replaces it
    second = capsys.readouterr().out.strip()
    assert TokenStore(tokens).lookup(token) is None and TokenStore(tokens).lookup(second)
    assert agents_main(["agents", "revoke", "alice", *argv]) == 0
    assert "revoked" in capsys.readouterr().out
    assert TokenStore(tokens).lookup(second) is None
    assert agents_main(["agents", "revoke", "alice", *argv]) == 1
    assert "has no token" in capsys.readouterr().err
    assert agents_main(["agents", "issue", "mallory", *argv]) == 1
    assert "no agent 'mallory' in" in capsys.readouterr().err
    tokens.chmod(0o644)  # readable by others: refused, as ssh refuses such a key
    assert agents_main(["agents", "list", *argv]) == 1
    assert f"chmod 600 {tokens}" in capsys.readouterr().err
    tokens.chmod(0o600)
    assert agents_main(["agents", "list", *argv]) == 0
    assert (
        "alice: read: *; propose: color-*; stations: bench-a; no token" in capsys.readouterr().out
    )
    # `labbridge mcp` over stdio refuses to start without a token, before opening anything
    env_token = os.environ.pop(TOKEN_ENV, None)
    try:
        assert agents_main(["mcp", *argv]) == 1
    finally:
        if env_token is not None:
            os.environ[TOKEN_ENV] = env_token
    assert f"no agent token: set {TOKEN_ENV}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("agents", "line", "field", "problem"),
    [
        ("  alice: {read: '*', write: '*'}\n", 6, "agents.alice.write", "unknown field 'write'"),
        ("  alice: {propose: 3}\n", 6, "agents.alice.propose", "must be a pattern or a list"),
        ("  alice: {propose: [ok, 'a b']}\n", 6, "agents.alice.propose[1]", "not a name pattern"),
        ("  alice: {stations: [bench-z]}\n", 6, "agents.alice.stations[0]", "matches no station"),
        ("  alice: {stations: 'bench-?x'}\n", 6, "agents.alice.stations", "matches no station"),
        ("  'al ice': {}\n", 6, "agents.al ice", "not an agent name"),
        ("  alice: [read]\n", 6, "agents.alice", "must be a mapping"),
    ],
)
def test_lab_yaml_agent_scope_errors_name_the_file_line_and_field(
    tmp_path: Path, agents: str, line: int, field: str, problem: str
) -> None:
    lab = tmp_path / "lab.yaml"
    lab.write_text(BASE + "agents:\n" + agents)
    with pytest.raises(LabConfigError) as err:
        load_lab(lab)
    assert f"lab.yaml:{line}: {field}: " in str(err.value) and problem in str(err.value), err.value
    lab.write_text(BASE + "agent_tokens: lbt_abc\n")
    with pytest.raises(LabConfigError, match="agent_tokens: looks like a token itself"):
        load_lab(lab)
    lab.write_text(BASE + "agents:\n  alice:\n")  # listed, granted nothing: deny by default
    alice = load_lab(lab).agents.agents["alice"]
    assert not alice.may("read", "x") and not alice.may_use("bench-a")


def test_http_binds_beyond_loopback_need_tls() -> None:
    assert parse_bind("127.0.0.1:8765").loopback and parse_bind("[::1]:0").loopback
    with pytest.raises(McpError, match="not a loopback address: bearer tokens would cross"):
        parse_bind("0.0.0.0:8765")
    with pytest.raises(McpError, match="TLS needs both a certificate and a key"):
        parse_bind("127.0.0.1:8765", certfile=Path("cert.pem"))
    with pytest.raises(McpError, match="cannot load the TLS certificate and key"):
        parse_bind("192.0.2.1:8765", Path("/nonexistent.pem"), Path("/nonexistent.key"))
    with pytest.raises(McpError, match="is not HOST:PORT"):
        parse_bind("8765")


def test_serve_refuses_an_mcp_http_bind_beyond_loopback_without_tls_before_opening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main

    lab = tmp_path / "lab.yaml"
    lab.write_text(BASE)
    argv = ["serve", "--lab", str(lab), "--broker", "mqtt://127.0.0.1:9", "--mcp-http"]
    assert main([*argv, "0.0.0.0:8765"]) == 1
    assert "not a loopback address" in capsys.readouterr().err
    assert main([*argv, "127.0.0.1:8765", "--mcp-tls-cert", "c.pem"]) == 1
    assert "--mcp-tls-cert and --mcp-tls-key" in capsys.readouterr().err


# ------------------------------------------------------------------------- docs
@pytest.mark.timeout(420)
def test_the_agents_page_runs_as_written(ray_session: Any, tmp_path: Path) -> None:
    page = "agents.md"
    assert not strays(page), strays(page)
    written = {p.name for p in write_files(page, tmp_path)}
    assert written == {"agents.yaml", "agentlab.py", "mcp.json", "hot-approval.yaml"}, written
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    out = []
    for block in blocks(page):
        if block.file is None:
            done = run_script(block, tmp_path, timeout=180, env=env)
            out.append(done.stdout + done.stderr)
    assert len(out) == 5, out
    tokens = load_lab(tmp_path / "runs" / "agents" / "lab.yaml").agents.store()
    assert set(tokens.records()) == {"alice"}  # bob's was revoked at the end
    assert "agent:alice" in out[1] and " done agent:alice " in out[1], out[1]
    assert "rule: hotplate.heater -> hotplate.stirrer_rpm >= 100" in out[1], out[1]
    # alice's quota: a second proposal waiting is refused; her use of it, from the journal
    assert "quota of agent:alice: queued_per_campaign 1 (lab.yaml agents.alice.quota)" in out[1]
    assert "proposals_per_hour: 1 of 30 proposals" in out[1], out[1]
    assert "experiments_per_day: 1 of 20 experiments" in out[1], out[1]
    assert "budgets.dye_ml_per_day: 1.55 of 10 mL" in out[1], out[1]
    assert "was issued for read only, not propose" in out[2], out[2]
    # approval: the hot point waited, the operator approved it from the shell, it ran
    assert 'waits: ["program.md approval: temperature_c > 60 or agent not in trusted' in out[4]
    assert "awaiting-approval\n" in out[4] and "agent:alice  expires in" in out[4], out[4]
    assert "approved by" in out[4] and ": queued to run (approved by" in out[4], out[4]
    assert " done agent:alice" in out[4], out[4]
    assert "'checked', 'approved by" in out[4] and "fume hood on, lid closed" in out[4], out[4]
    exps = journal_experiments(tmp_path / "runs" / "agents" / "journal.db", "color-agent")
    assert "agent:alice" in {e.proposer for e in exps}
