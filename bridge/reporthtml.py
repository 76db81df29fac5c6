"""The HTML of a campaign report: its summary, safety and experiments sections, the table
and text helpers they share, and the page's CSS (:mod:`bridge.report` puts them together).
"""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from bridge.reportdata import (
    ReportData,
    ReportParam,
    as_mapping,
    fmt_num,
    verification_text,
)
from instruments.colour import lab_to_srgb
from loops.journal import Experiment

__all__ = [
    "CSS",
    "MAX_TABLE_ROWS",
    "esc",
    "experiments_html",
    "html_table",
    "safety_html",
    "summary_html",
]


#: experiments listed one by one in the HTML tables (the export has all of them)
MAX_TABLE_ROWS = 2000
_ENDED = ("done", "stopped", "aborted")


def esc(value: Any) -> str:
    """``value`` as HTML text (quotes escaped too)."""
    return html.escape(str(value), quote=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _when(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _params_text(params: Mapping[str, Any], info: Sequence[ReportParam] = ()) -> str:
    units = {p.name: p.unit for p in info}
    parts = []
    for k, v in params.items():
        unit = f" {units[k]}" if units.get(k) else ""
        parts.append(f"{k}={fmt_num(v)}{unit}")
    return ", ".join(parts)


def _swatch(lab: Sequence[float] | None) -> str:
    if lab is None:
        return ""
    r, g, b = lab_to_srgb(lab, clip=True)
    colour = f"rgb({round(255 * r)}, {round(255 * g)}, {round(255 * b)})"
    return f'<span class="swatch" style="background: {colour}"></span>'


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (the caller escaped them)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else esc(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; }
.state { font-weight: bold; } .bad { color: #b00; } .good { color: #070; } .muted { color: #666; }
.swatch { display: inline-block; width: 1.4em; height: 1em; border: 1px solid #444;
          vertical-align: middle; margin-right: 0.3em; }
img { max-width: 100%; border: 1px solid #ccc; }
nav a { margin-right: 1em; }
.note { background: #fff6dd; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
"""


def summary_html(data: ReportData, best: Experiment | None) -> list[str]:
    c = data.campaign
    exps = data.experiments
    out: list[str] = []
    reason = None
    for t in reversed(data.events):
        if (
            t.event == "campaign"
            and isinstance(t.data, Mapping)
            and t.data.get("reason")
            and t.state == c.state
        ):
            reason = str(t.data["reason"])
            break
    state_cls = "good" if c.state == "done" else ("bad" if c.state == "aborted" else "")
    out.append(
        f'<p>State: <span class="state {state_cls}">{esc(c.state)}</span>'
        + (f" — {esc(reason)}" if reason else "")
        + "</p>"
    )
    if c.state not in _ENDED:
        out.append(
            '<p class="note">The campaign has not ended: it is running, paused, or its process '
            f"was stopped or killed (<code>labbridge resume {esc(c.id)}</code> carries on). "
            "This report shows the journal as it was when the report was written.</p>"
        )
    if data.program_note:
        out.append(f'<p class="note">{esc(data.program_note)}</p>')
    objective = esc(f"{data.measure}, {data.direction}")
    if data.target is not None:
        objective += esc(f", stop at {data.target:g}")
    if data.target_lab is not None:
        lab = ", ".join(f"{v:g}" for v in data.target_lab)
        objective += f" (target colour {_swatch(data.target_lab)}L*a*b* {esc(lab)})"
    rows: list[Sequence[str]] = [
        ("campaign", esc(c.id) + (f" ({esc(c.name)})" if c.name and c.name != c.id else "")),
        ("journal", esc(data.journal_path)),
        ("objective", objective),
        ("budget", esc(data.budget or "—")),
        ("strategy", esc(data.strategy or "—")),
        ("started", esc(_when(c.created))),
        (
            "last change",
            esc(f"{_when(c.updated)} ({_duration(c.updated - c.created)} after the start)"),
        ),
        ("report written", esc(_when(time.time()))),
    ]
    out.append(html_table(("", ""), rows, raw=True))

    states = Counter(e.state for e in exps)
    done = [e for e in exps if e.state == "done"]
    verified = Counter(
        "verified" if e.verified else ("unverified" if e.verified is False else "not checked")
        for e in done
    )
    proposers = Counter(e.proposer for e in exps)
    stations = Counter(e.station for e in exps if e.station)
    out.append("<h3>Counts</h3>")
    if not exps:
        out.append(
            '<p class="note">This campaign has no experiments (yet): nothing was proposed.</p>'
        )
        return out
    count_rows = [("experiments proposed", str(len(exps)))]
    for state in (
        "done",
        "failed",
        "rejected",
        "cancelled",
        "interrupted",
        "running",
        "queued",
        "checked",
        "awaiting-approval",
        "proposed",
    ):
        if states.get(state):
            count_rows.append((f"  {state}", str(states[state])))
    for label in ("verified", "unverified", "not checked"):
        if verified.get(label):
            count_rows.append((f"results {label}", str(verified[label])))
    for who, n in sorted(proposers.items()):
        count_rows.append((f"proposed by {who}", str(n)))
    for station, n in sorted(stations.items()):
        count_rows.append((f"ran on {station}", str(n)))
    refused = sum(1 for v in data.verdicts if not v["allowed"])
    count_rows.append(("safety verdicts (refused)", f"{len(data.verdicts)} ({refused})"))
    out.append(html_table(("", "count"), count_rows))

    out.append("<h3>Best result</h3>")
    if best is None:
        out.append(
            "<p>No trusted result: no experiment finished with a verified (or unchecked) result.</p>"
        )
    else:
        measurements = as_mapping(as_mapping(best.result).get("measurements"))
        out.append(
            f"<p><b>{esc(best.id)}</b>: {esc(data.measure)} = <b>{esc(fmt_num(best.objective))}</b> "
            f"({esc(verification_text(best))}; proposed by {esc(best.proposer)}, "
            f"ran on {esc(best.station or '—')})"
            + (
                f"; measured colour {_swatch(measurements.get('lab'))}"
                if isinstance(measurements.get("lab"), list) and len(measurements["lab"]) == 3
                else ""
            )
            + "</p>"
        )
        units = {p.name: p for p in data.params}
        prow = []
        for k, v in best.params.items():
            p = units.get(k)
            bounds = f"{fmt_num(p.low)} – {fmt_num(p.high)}" if p and p.low is not None else ""
            prow.append((k, fmt_num(v), p.unit if p else "", bounds))
        out.append(html_table(("parameter", "value", "unit", "bounds"), prow))
        better_untrusted = [
            e
            for e in done
            if e.verified is False
            and e.objective is not None
            and data.better(e.objective, float(best.objective or 0.0))
        ]
        if better_untrusted:
            out.append(
                '<p class="note">Not trusted, so not the best: '
                + ", ".join(
                    f"{esc(e.id)} ({esc(fmt_num(e.objective))}, unverified)"
                    for e in better_untrusted
                )
                + " had a better objective but the camera disagreed with the instruments.</p>"
            )
    return out


def _command_text(command: Any) -> str:
    if not isinstance(command, Mapping):
        return str(command)
    params = command.get("params")
    args = ", ".join(f"{k}={v!r}" for k, v in params.items()) if isinstance(params, Mapping) else ""
    return f"{command.get('instrument')}.{command.get('action')}({args})"


def safety_html(data: ReportData) -> list[str]:
    out: list[str] = []
    verdicts = data.verdicts
    refused = [v for v in verdicts if not v["allowed"]]
    out.append(
        f"<p>{len(verdicts)} commands were checked by the safety layer: "
        f"{len(verdicts) - len(refused)} allowed, {len(refused)} refused. "
        f"{sum(e.state == 'rejected' for e in data.experiments)} proposals were rejected by the "
        "checks (the program's constraints, the safety layer's dry run) before they acted.</p>"
    )
    if verdicts:
        by_rule: dict[str, list[int]] = {}
        for v in verdicts:
            key = v["rule"] or v["reason"] or "(no rule)"
            by_rule.setdefault(key, [0, 0])[0 if v["allowed"] else 1] += 1
        out.append(
            "<h3>Verdicts by rule</h3><p class='muted'>Allowed commands that no rule had to "
            "judge are counted by their reason.</p>"
        )
        out.append(
            html_table(
                ("rule", "allowed", "refused"),
                [
                    (r, str(a), str(f))
                    for r, (a, f) in sorted(by_rule.items(), key=lambda kv: -sum(kv[1]))
                ],
            )
        )
        by_command: dict[str, list[int]] = {}
        for v in verdicts:
            cmd = v["command"] if isinstance(v["command"], Mapping) else {}
            key = f"{cmd.get('instrument')}.{cmd.get('action')}"
            by_command.setdefault(key, [0, 0])[0 if v["allowed"] else 1] += 1
        out.append("<h3>Verdicts by command</h3>")
        out.append(
            html_table(
                ("command", "allowed", "refused"),
                [
                    (c, str(a), str(f))
                    for c, (a, f) in sorted(by_command.items(), key=lambda kv: -sum(kv[1]))
                ],
            )
        )
    out.append(f'<h3 id="refusals">Refusals ({len(refused)})</h3>')
    if refused:
        rows: list[Sequence[str]] = [
            (
                _when(v["t"]),
                v["experiment_id"] or "",
                v["station"],
                v["who"] or "",
                _command_text(v["command"]),
                v["rule"] or "",
                v["reason"],
            )
            for v in refused[:MAX_TABLE_ROWS]
        ]
        out.append(
            html_table(("time", "experiment", "station", "who", "command", "rule", "reason"), rows)
        )
        if len(refused) > MAX_TABLE_ROWS:
            out.append(
                f"<p class='note'>{len(refused) - MAX_TABLE_ROWS} more refusals are not listed here; "
                "<code>labbridge export</code> writes all of them.</p>"
            )
    else:
        out.append("<p>No command was refused.</p>")
    rejected = [e for e in data.experiments if e.state == "rejected"]
    out.append(f'<h3 id="rejected">Rejected proposals ({len(rejected)})</h3>')
    if rejected:
        rows = []
        for e in rejected:
            reasons = data.rejections.get(e.id) or ([e.reason] if e.reason else [])
            items = "".join(f"<li>{esc(r)}</li>" for r in reasons)
            rows.append(
                (
                    esc(e.id),
                    esc(e.proposer),
                    esc(_params_text(e.params, data.params)),
                    f"<ul>{items}</ul>",
                )
            )
        out.append(html_table(("experiment", "proposer", "parameters", "reasons"), rows, raw=True))
    else:
        out.append("<p>No proposal was rejected.</p>")
    trips = [
        v
        for v in verdicts
        if isinstance(v["command"], Mapping) and v["command"].get("action") in ("trip", "estop")
    ]
    problems = [e for e in data.experiments if e.state in ("failed", "interrupted", "cancelled")]
    out.append(
        f'<h3 id="failures">Trips and failures ({_plural(len(problems), "experiment")}, '
        f"{_plural(len(trips), 'trip')})</h3>"
    )
    if problems:
        rows = []
        for e in problems:
            detail = as_mapping(data.failures.get(e.id, {}).get("data"))
            trip = detail.get("trip") if isinstance(detail.get("trip"), Mapping) else None
            trip_text = ""
            if trip is not None:
                safe = ", ".join(str(s) for s in trip.get("safe") or [])
                failed = ", ".join(str(s) for s in trip.get("failed") or [])
                trip_text = f"tripped: {trip.get('reason', '')}; safe state: {safe or '—'}"
                if failed:
                    trip_text += f"; NOT safe-stated: {failed}"
                if isinstance(trip.get("reaction_s"), int | float):
                    trip_text += f"; reaction {1000 * trip['reaction_s']:.1f} ms"
            rows.append((e.id, e.state, e.station or "", e.proposer, e.reason or "", trip_text))
        out.append(
            html_table(("experiment", "state", "station", "proposer", "reason", "trip"), rows)
        )
    else:
        out.append("<p>No experiment failed, was interrupted or was cancelled.</p>")
    if trips:
        rows = [
            (_when(v["t"]), v["station"], v["experiment_id"] or "", v["rule"] or "", v["reason"])
            for v in trips
        ]
        out.append("<p>Trips recorded by the safety layer:</p>")
        out.append(html_table(("time", "station", "experiment", "source", "reason"), rows))
    if data.events:
        out.append("<h3>Campaign and station events</h3>")
        rows = []
        for t in data.events:
            d = t.data if isinstance(t.data, Mapping) else {}
            text = d.get("reason") or ("created" if d.get("created") else "")
            if d.get("resumed"):
                text = "resumed: " + ", ".join(
                    f"{k} {', '.join(d.get(k) or []) or 'none'}"
                    for k in ("interrupted", "recovered", "requeued")
                )
            rows.append((_when(t.t), t.state, str(text)))
        out.append(html_table(("time", "state", "why"), rows))
    return out


def experiments_html(data: ReportData) -> list[str]:
    exps = data.experiments
    if not exps:
        return ["<p>No experiments.</p>"]
    names = [p.name for p in data.params]
    rows: list[Sequence[str]] = []
    for e in exps[:MAX_TABLE_ROWS]:
        cls = "bad" if (e.state != "done" or e.verified is False) else ""
        rows.append(
            [
                str(e.seq),
                esc(e.id),
                f'<span class="{cls}">{esc(e.state)}</span>',
                esc(e.proposer),
                esc(e.station or ""),
            ]
            + [esc(fmt_num(e.params.get(n))) for n in names]
            + [esc(fmt_num(e.objective)), esc(verification_text(e))]
        )
    out = [
        html_table(
            [
                "seq",
                "experiment",
                "state",
                "proposer",
                "station",
                *names,
                data.measure,
                "verification / reason",
            ],
            rows,
            raw=True,
        )
    ]
    if len(exps) > MAX_TABLE_ROWS:
        out.append(
            f"<p class='note'>{len(exps) - MAX_TABLE_ROWS} more experiments are not listed; "
            "<code>labbridge export</code> writes all of them.</p>"
        )
    return out
