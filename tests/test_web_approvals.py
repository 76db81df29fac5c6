"""Approving agents' proposals from the lab page (issues 14 and 15), in a real headless
browser (Debian's Chromium, driven by Playwright) on a simulated lab served by a
:class:`~bridge.service.LabService` (the session's Ray, the simulated bench at speed 500).

One browser, two pages side by side (ben, a viewer; ana, an operator) on a campaign
whose program says ``approval: human`` (paused but while the approved proposal runs): an agent's proposal appears on both without a
reload, with who proposed it, its parameters in words with units, the dry run's verdict,
the rule that asked and when it expires; ben has no approve button and the API refuses
him (403), and anyone not logged in (401); ana approves one in the browser and it runs
(the journal names her and her reason; its volumes on the pumps' wire), denies another
(rejected "denied by ana: ..." in the journal, nothing on the wire); a third, of an agent
whose lab.yaml policy expires in seconds, expires and the page shows it refused, live.
Deciding again is refused in one line; a decision on a stopped campaign is journaled
and applies when it runs again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from test_approval import DENIED, EXPIRED, HOT, dispensed, volumes
from test_mqtt_api import small_program
from webtesting import PASSWORDS, browser, shot, web_lab

from loops.journal import FINAL_STATES

#: how long the page may take to show something the lab did (generous: a loaded 2-core CI)
SEEN_MS = 30_000
CID = "appr-web"
#: alice proposes under the program's policy (human, 1 h); bob's own (lab.yaml) expires in 3 s
AGENTS = """
agents:
  alice: {propose: ["appr-*"], stations: [bench-a]}
  bob:
    propose: ["appr-*"]
    stations: [bench-a]
    approval: {human_when: "temperature_c > 0", expires: 3s}
"""
#: a fourth point, decided while the campaign is stopped
LATER = {"red_ml": 0.545, "green_ml": 0.165, "blue_ml": 0.635, "temperature_c": 45.0, "hold_s": 60}

#: a POST from the page's own session (its cookie and CSRF token), as the page's script sends
_POST = """async ([url, body]) => {
  const state = await (await fetch("/api/state")).json();
  const r = await fetch(url, { method: "POST", body: JSON.stringify(body), headers: {
    "Content-Type": "application/json", "X-CSRF-Token": state.you.csrf } });
  return [r.status, await r.json()];
}"""


def _program() -> str:
    """The colour match, a budget it will not reach (the test stops it), every agent's
    proposal waiting for a human."""
    text = small_program(30)
    assert text.startswith("---\n")
    return text.replace("---\n", "---\napproval: human\n", 1)


async def _visible(page: Any, selector: str, timeout_ms: int = SEEN_MS) -> Any:
    return await page.wait_for_selector(selector, state="visible", timeout=timeout_ms)


async def _login(page: Any, url: str, user: str) -> None:
    await page.goto(url + f"#/campaign/{CID}")
    await page.click("#login-open")
    await page.fill("#login input[name=user]", user)
    await page.fill("#login input[name=password]", PASSWORDS[user])
    await page.click("#login button[type=submit]")
    await _visible(page, f"#who:has-text('{user} (')")
    await _visible(page, f"h1:has-text('Campaign {CID}')")
    await page.evaluate("window.__loaded_once = true")  # gone if the page reloads


async def _final(service: Any, eid: str, timeout_s: float = 120) -> Any:
    """The experiment once it is done, failed, rejected or cancelled."""
    deadline = time.monotonic() + timeout_s
    while (exp := await service.experiment(eid)).state not in FINAL_STATES:
        assert time.monotonic() < deadline, f"{eid} is still {exp.state} after {timeout_s:g} s"
        await asyncio.sleep(0.1)
    return exp


async def _post(page: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, answer = await page.evaluate(_POST, [path, body])
    return int(status), dict(answer)


@pytest.mark.timeout(240)
async def test_an_operator_approves_and_denies_proposals_on_the_page_a_viewer_cannot(
    ray_session: Any, tmp_path: Path
) -> None:
    async with web_lab(tmp_path, extra=AGENTS) as web, browser() as b:
        service = web.service
        started = await service.start_campaign(CID, _program(), who="lims")
        assert started.accepted, started
        # paused but while the approved proposal runs: the bench runs what the test needs
        await service.control(CID, "pause", who="lims", reason="the test decides first")
        ben = await (await b.new_context(viewport={"width": 1280, "height": 900})).new_page()
        ana = await (await b.new_context(viewport={"width": 1400, "height": 900})).new_page()
        errors: list[str] = []
        for page in (ben, ana):
            page.on("pageerror", lambda e: errors.append(str(e)))
        await _login(ben, web.url, "ben")
        await _login(ana, web.url, "ana")
        await _visible(ana, "text=no proposal awaits approval")

        # --- an agent proposes: it waits, and both pages show it without a reload
        hot = await service.propose(CID, HOT, "agent:alice")
        assert hot.awaiting_approval and not hot.accepted, hot
        eid = hot.experiment_id
        row = f"#approvals tr[data-approval='{eid}']"
        for page in (ben, ana):
            await _visible(page, row)
            assert await page.evaluate("window.__loaded_once") is True
        shown = await ben.inner_text(row)
        assert "agent:alice" in shown, shown
        assert "red dye stock into the vial: 0.705 mL" in shown, shown  # words with units
        assert "hotplate setpoint after the ramp: 65 °C" in shown, shown
        assert "program.md approval: human (every agent proposal)" in shown, shown
        assert "passes now" in shown, shown  # dry-run again: the verdict now
        assert "in 60 min" in shown or "in 59 min" in shown, shown
        assert await ben.query_selector(f"{row} button") is None  # a viewer: no controls
        await _visible(ben, "text=ben may not approve or deny proposals.")
        await _visible(ana, f"{row} button:has-text('Approve')")
        # experiments table: the row is awaiting approval too
        await _visible(
            ana, f"#experiments tr[data-experiment='{eid}'][data-state=awaiting-approval]"
        )

        # --- the API: anyone reads the list; a viewer may not decide (403), nobody (401)
        path = f"/api/campaigns/{CID}/approvals"
        async with httpx2.AsyncClient(base_url=web.url, timeout=120) as http:
            listed = (await http.get(path)).json()
            nobody = await http.post(f"{path}/{eid}", json={"decision": "approve", "reason": "x"})
        (waiting,) = listed["approvals"]
        assert waiting["experiment_id"] == eid and waiting["proposer"] == "agent:alice"
        assert waiting["dry_run"] == {"when": "now", "ok": True, "reasons": []}
        assert waiting["rules"] == ["program.md approval: human (every agent proposal)"], waiting
        units = {p["name"]: p["unit"] for p in waiting["params"]}
        assert units["red_ml"] == "mL" and units["temperature_c"] == "°C", units
        assert nobody.status_code == 401
        assert nobody.json() == {"error": "log in to approve or deny proposals"}
        status, refused = await _post(ben, f"{path}/{eid}", {"decision": "approve", "reason": "ok"})
        assert status == 403, refused
        assert refused["error"].startswith("ben (viewer) may not approve or deny proposals"), (
            refused
        )
        assert (await service.approvals(CID))[0]["decision"] is None  # nothing recorded
        await shot(ana, tmp_path, "web-approvals.png", "#queue")

        # --- ana approves it in the browser: it runs, the journal names her and her reason
        await ana.fill(f"{row} input[name=reason]", "hot point checked with the bench")
        await ana.click(f"{row} button:has-text('Approve')")
        await _visible(ana, f"#notice:has-text('{eid} approved by ana: queued to run')")
        for page in (ben, ana):
            await page.wait_for_selector(row, state="detached", timeout=SEEN_MS)
        await service.control(CID, "resume", who="lims", reason="decided")
        ran = await _final(service, eid)  # the queue's first: the next experiment
        assert ran.state == "done", (ran.state, ran.reason)
        await service.control(CID, "pause", who="lims", reason="the test decides again")
        assert volumes(HOT) <= dispensed(web.sim)  # on the pumps' wire
        await _visible(ana, f"#experiments tr[data-experiment='{eid}'][data-state=done]", 90_000)
        row_j = await service.journal.approval.remote(eid)
        why = "hot point checked with the bench"
        assert (row_j["decision"], row_j["who"], row_j["via"], row_j["reason"]) == (
            "approve",
            "ana",
            "web",
            why,
        ), row_j
        log = (await service.experiment_record(await service.experiment(eid)))["log"]
        decided = {"decision": "approve", "who": "ana", "reason": why, "via": "web"}
        assert any(t["event"] == "approval" and t["data"] == decided for t in log), log
        assert any(
            t["state"] == "checked" and t["data"].get("reason") == f"approved by ana: {why}"
            for t in log
        ), log

        # --- bob's proposal expires (his lab.yaml policy: 3 s); the page shows it refused
        late = await service.propose(CID, EXPIRED, "agent:bob")
        assert late.awaiting_approval, late
        gone = f"#queue-refused tr[data-experiment='{late.experiment_id}']"
        await _visible(ana, gone)
        assert "approval expired after 3 s" in await ana.inner_text(gone)
        await ana.wait_for_selector(
            f"#approvals tr[data-approval='{late.experiment_id}']", state="detached"
        )
        status, said = await _post(
            ana, f"{path}/{late.experiment_id}", {"decision": "approve", "reason": "too late"}
        )
        assert (
            status == 409
            and "is not awaiting approval: it is rejected (approval expired" in (said["error"])
        ), said

        # --- alice's next one: ana denies it with a reason; journaled with who, never run
        no = await service.propose(CID, DENIED, "agent:alice")
        assert no.awaiting_approval, no
        row = f"#approvals tr[data-approval='{no.experiment_id}']"
        await ana.fill(f"{row} input[name=reason]", "too close to the last one")
        await ana.click(f"{row} button:has-text('Deny')")
        await _visible(ana, f"#notice:has-text('{no.experiment_id} denied by ana: rejected')")
        refused_row = f"#queue-refused tr[data-experiment='{no.experiment_id}']"
        await _visible(ben, refused_row)
        assert "denied by ana: too close to the last one" in await ben.inner_text(refused_row)
        denied = await service.experiment(no.experiment_id)
        assert denied.state == "rejected" and denied.reason == (
            "denied by ana: too close to the last one"
        ), denied
        row_j = await service.journal.approval.remote(no.experiment_id)
        assert (row_j["decision"], row_j["who"], row_j["via"]) == ("deny", "ana", "web"), row_j
        # deciding it again: refused in one line
        status, said = await _post(
            ana, f"{path}/{no.experiment_id}", {"decision": "approve", "reason": "changed mind"}
        )
        assert status == 409 and said["error"].startswith(
            f"experiment {no.experiment_id} is not awaiting approval: it is rejected (denied by ana"
        ), said
        status, said = await _post(ana, f"{path}/{no.experiment_id}", {"decision": "maybe"})
        assert (status, said) == (400, {"error": "decision must be approve or deny"})
        status, said = await _post(ana, f"{path}/{CID}-0999", {"decision": "deny", "reason": "?"})
        assert status == 404 and "appr-web-0999" in said["error"], (status, said)
        async with httpx2.AsyncClient(base_url=web.url, timeout=120) as http:
            unknown = await http.get("/api/campaigns/no-such/approvals")
        assert unknown.status_code == 404 and unknown.json()["error"].startswith(
            "no campaign 'no-such' in the journal"
        ), unknown.text

        # --- the campaign stops with one waiting: a decision is journaled, applied on resume
        await ben.click("header nav >> text=Lab")  # the lab view's alerts follow approvals
        later = await service.propose(CID, LATER, "agent:alice")
        assert later.awaiting_approval, later
        await _visible(
            ben,
            f".alerts li:has-text('proposal {later.experiment_id} by agent:alice "
            "awaits approval: program.md approval: human')",
        )
        expiry = f"proposal {late.experiment_id} by agent:bob: approval expired after 3 s"
        await _visible(ben, f".alerts li:has-text('{expiry}')")
        await service.control(CID, "stop", who="lims", reason="test over")
        await service.wait_campaign(CID)
        (left,) = await service.approvals(CID)
        assert left["experiment_id"] == later.experiment_id
        async with httpx2.AsyncClient(base_url=web.url, timeout=120) as http:
            (listed_now,) = (await http.get(path)).json()["approvals"]
        assert listed_now["dry_run"] == {"when": "proposed", "ok": True, "reasons": []}
        status, said = await _post(
            ana, f"{path}/{later.experiment_id}", {"decision": "approve", "reason": "fine"}
        )
        assert status == 200 and said["applied"] is False, said
        assert "applies when it runs again" in said["note"], said
        status, said = await _post(
            ana, f"{path}/{later.experiment_id}", {"decision": "deny", "reason": "no"}
        )
        assert status == 409 and "was approved already by ana" in said["error"], said
        assert "\n" not in said["error"]
        assert not (volumes(DENIED) | volumes(EXPIRED) | volumes(LATER)) & dispensed(web.sim)
        assert errors == [], errors
