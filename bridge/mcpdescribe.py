"""What the MCP server tells agents: each tool's and resource's description, in the lab's
own words (its stations' envelopes: channels, units, rules, budgets), and the server built
from :class:`~bridge.mcptools.LabTools` with them."""

from __future__ import annotations

from typing import Any

from mcp.server.auth.provider import TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp_types import ToolAnnotations

from bridge.labdescribe import envelope_lines
from bridge.mcpcalls import LabMCP
from bridge.mcptools import CALLS, MAX_WAIT_S, LabTools
from bridge.service import CONTROL_ACTIONS

__all__ = ["build_server"]


def build_server(
    tools: LabTools,
    name: str = "labbridge",
    *,
    auth: AuthSettings | None = None,
    token_verifier: TokenVerifier | None = None,
) -> LabMCP:
    """The MCP server with every tool and resource, described from this lab (``auth`` and
    ``token_verifier``: the HTTP transport's, :func:`bridge.mcpserver.mcp_http`)."""
    lab = tools.lab_config
    limits = "\n".join(
        f"- station {s}: " + "; ".join(envelope_lines(lab.stations[s])) for s in tools.stations
    )
    checked = (
        "Checked like every proposal: the campaign's parameter bounds and constraints, "
        "then the safety layer's dry run of its recipe on each station the campaign runs "
        "on, from that station's current state. This lab's safety envelope (every command "
        f"is held to it):\n{limits}\nThe campaign tool gives the campaign's parameters "
        "(names, units, bounds) and constraints."
    )
    server = LabMCP(
        name,
        auth=auth,
        token_verifier=token_verifier,
        log_level="WARNING",  # the SDK's logging.basicConfig, should nobody have called it
        instructions=(
            f"labbridge lab {lab.bridge_id}: you propose physical experiments; labbridge "
            "decides what may touch the bench. Start with the lab and campaigns tools; "
            "dry_run a point before you propose it; no tool commands an instrument."
        ),
    )
    read = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    entries: list[tuple[Any, str, ToolAnnotations]] = [
        (
            tools.lab,
            "The lab: the stations you may use, their instruments and declared commands "
            "(parameters with units and device ranges, the channels they set), and each "
            "station's safety envelope in words: the channels it bounds and how (units), "
            "its rules and why, vessels (capacity), budgets and monitors. Also your scopes, "
            "your quota (proposals per hour, experiments per day, shares of budgets, "
            "proposals queued per campaign, tool calls per second) and how much is used.",
            read,
        ),
        (
            tools.readings,
            "Live readings of one station you may use: each measured channel's latest "
            "value (units as in its name: _c degC, _ml mL, _rpm rpm) and its age in s, "
            "the commanded targets, whether it is tripped and why, what it is running, its "
            "monitors. Nothing is commanded: this is what its supervisor last polled.",
            read,
        ),
        (
            tools.campaigns,
            "The campaigns you may read: state, stations, who started them, experiments "
            "done of the budget, best result so far.",
            read,
        ),
        (
            tools.campaign,
            "One campaign: state and reason, its program's parameters (names, units, "
            "bounds), constraints, objective (measure, direction, target), budget, fixed "
            "values, and its progress and best result.",
            read,
        ),
        (
            tools.results,
            "A campaign's experiments in order (seq > since_seq, at most limit): proposer, "
            "state, parameters, objective value, measurements, verified (camera vs "
            "instruments) with the verification, or why it failed or was refused.",
            read,
        ),
        (
            tools.experiment,
            "One experiment's journal: parameters, proposer, state, recipe, result, "
            "objective, verification; its log (each step started and done, each state); "
            "the safety verdicts of its commands; its camera images by SHA-256.",
            read,
        ),
        (
            tools.why_refused,
            "Why a proposal was refused: every reason (a parameter out of bounds, a "
            "constraint, a safety rule or limit of the envelope, a spent budget), each "
            "naming what it checked.",
            read,
        ),
        (
            tools.wait_for_experiment,
            f"Wait until an experiment is done, failed, rejected or cancelled (at most "
            f"timeout_s, <= {MAX_WAIT_S:g} s); returns it as results does.",
            read,
        ),
        (
            tools.dry_run,
            "Check a proposal for a running campaign you may propose to, without queuing "
            "or journaling anything: ok, and every reason it would be refused, your quota "
            "included (quota: why it would refuse one now). " + checked,
            read,
        ),
        (
            tools.propose,
            "Propose one experiment to a running campaign you may propose to. Over your "
            "quota it is refused at once, naming the quota and when it frees up (nothing "
            "journaled). Else it is journaled as yours (agent:<your name>, from your "
            "token), then checked; "
            "refused -> rejected with every reason (why_refused), else queued ahead of "
            "the optimizer's next point and run by the campaign's stations through the "
            "safety layer. Returns its experiment id (wait_for_experiment). If the "
            "campaign's or your approval policy asks for a human (e.g. above a "
            "temperature), it is not queued yet: the result says awaiting_approval, "
            "with the rules that asked and expires_t (Unix s); an operator approves it "
            "(then it runs) or denies it, or it expires (both: rejected, why_refused "
            "says by whom and why). You cannot approve it; its state shows in experiment "
            "and campaign (approvals). " + checked,
            ToolAnnotations(read_only_hint=False, destructive_hint=False),
        ),
        (
            tools.start_campaign,
            "Start a campaign (an id your start scope allows) from a program.md on "
            "stations you may use; idempotent by id (the same program again starts "
            "nothing). The resource labbridge://campaigns/<id>/program.md shows one.",
            ToolAnnotations(read_only_hint=False, destructive_hint=False),
        ),
        (
            tools.control,
            f"{' | '.join(CONTROL_ACTIONS)} a campaign you may control: pause and resume "
            "hold and release new experiments; stop lets the running ones finish; abort "
            "trips its stations into their safe state (an operator resets them).",
            ToolAnnotations(read_only_hint=False, destructive_hint=True),
        ),
    ]
    assert tuple(fn.__name__ for fn, _, _ in entries) == CALLS[:-2]
    for fn, description, hints in entries:
        server.add_tool(
            tools.gate.wrap(fn),
            name=fn.__name__,
            description=description,
            annotations=hints,
            structured_output=True,
        )
    server.resource(
        "labbridge://campaigns/{campaign_id}/program.md",
        name="program",
        description="A campaign's program.md: its parameters, constraints, objective, "
        "budget and recipe, and the Markdown that explains them.",
        mime_type="text/markdown",
    )(tools.gate.wrap(tools.program_md, resource=True))
    server.resource(
        "labbridge://campaigns/{campaign_id}/report.html",
        name="report",
        description="A campaign's HTML report (summary, convergence, parameters, camera "
        "contact sheet, safety verdicts), written from the journal when read.",
        mime_type="text/html",
    )(tools.gate.wrap(tools.report_html, resource=True))
    return server
