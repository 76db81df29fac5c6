"""The report's parts on what the optimizer knew beyond the program's declarations.

Prior results (``prior:`` in program.md, :mod:`loops.campaignprior`): :func:`prior_html`
says which campaigns' results were told before the first proposal, how many, and what was
dropped (from the journal's ``prior`` rows).

Learned feasibility: what the optimizer's feasibility model (:mod:`loops.optfeasible`)
predicted for each proposal, journaled with it, against what happened to it (refused by
which rule, failed, unverified, ran). :func:`feasibility_rows` pairs each predicted
proposal with its outcome; :func:`feasibility_html` writes the part (a summary of how well
the predictions told trouble apart, and the table).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.reportdata import ReportData, as_mapping, fmt_num
from bridge.reporthtml import MAX_TABLE_ROWS, esc, html_table
from loops.journal import Experiment

__all__ = [
    "PredictedProposal",
    "feasibility_html",
    "feasibility_rows",
    "outcome_text",
    "prior_html",
]


@dataclass(frozen=True)
class PredictedProposal:
    experiment: Experiment
    prediction: Mapping[str, Any]
    outcome: str
    #: the proposal came to trouble: refused by the dry run, failed, or an unverified result
    trouble: bool


def prior_html(data: ReportData) -> list[str]:
    """The prior campaigns' results told before the first proposal (empty without any)."""
    rows = [t for t in data.events if t.event == "prior"]
    if not rows:
        return []
    out = [
        "<p>This campaign started from earlier results (program.md <code>prior:</code>): "
        "told to the optimizer before its first proposal, not counted as this campaign's "
        "experiments, budget or stop rules.</p>"
    ]
    table: list[Sequence[str]] = []
    for t in rows:
        d = as_mapping(t.data)
        by_status, dropped = as_mapping(d.get("by_status")), as_mapping(d.get("dropped"))
        table.append(
            (
                str(d.get("prior", "")),
                fmt_num(d.get("told")),
                ", ".join(f"{n} {s}" for s, n in by_status.items()),
                ", ".join(f"{n} {why}" for why, n in dropped.items()) or "none",
                fmt_num(d.get("skipped")),
            )
        )
    out.append(html_table(("campaign", "results told", "by status", "dropped", "never ran"), table))
    return out


def outcome_text(data: ReportData, e: Experiment) -> tuple[str, bool]:
    """What happened to a proposal, in words, and whether that was trouble."""
    if e.state == "rejected":
        rules = data.refusing_rules.get(e.id)
        return (f"refused by {', '.join(rules)}" if rules else "refused"), True
    if e.state == "failed":
        return "failed", True
    if e.state == "done" and e.verified is False:
        return "unverified", True
    return e.state, False


def feasibility_rows(data: ReportData) -> list[PredictedProposal]:
    """Every experiment with a journaled prediction, in experiment order."""
    rows = []
    for e in data.experiments:
        p = data.predictions.get(e.id)
        if p is not None:
            text, trouble = outcome_text(data, e)
            rows.append(PredictedProposal(e, p, text, trouble))
    return rows


def _p(prediction: Mapping[str, Any], key: str) -> float | None:
    v = prediction.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _mean_trouble(rows: Sequence[PredictedProposal]) -> str:
    ps = [1.0 - v for r in rows if (v := _p(r.prediction, "p_feasible")) is not None]
    return f"{statistics.fmean(ps):.2f}" if ps else "—"


def feasibility_html(data: ReportData) -> list[str]:
    """The section's body (empty when no proposal carries a prediction)."""
    rows = feasibility_rows(data)
    if not rows:
        return []
    trouble = [r for r in rows if r.trouble]
    fine = [r for r in rows if not r.trouble and r.experiment.state == "done"]
    out = [
        f"<p>{len(rows)} proposals carry the optimizer's prediction, made when it proposed "
        "them from what the campaign had run into so far (refusals of the dry run per rule, "
        "failures and trips, unverified results; the acquisition was weighted by the "
        "probability of no trouble). "
        f"{len(trouble)} came to trouble: mean predicted probability of trouble "
        f"{_mean_trouble(trouble)}, against {_mean_trouble(fine)} for the {len(fine)} that ran "
        "to a trusted result.</p>"
    ]
    table: list[Sequence[str]] = []
    for r in rows[:MAX_TABLE_ROWS]:
        p = r.prediction
        rule = p.get("rule")
        refused = fmt_num(_p(p, "p_refused"), 2) + (f" ({rule})" if rule else "")
        table.append(
            (
                esc(r.experiment.id),
                f'<span class="{"bad" if r.trouble else ""}">{esc(r.outcome)}</span>',
                esc(fmt_num(_p(p, "p_feasible"), 2)),
                esc(refused),
                esc(fmt_num(_p(p, "p_failed"), 2)),
                esc(fmt_num(_p(p, "p_untrusted"), 2)),
                esc(fmt_num(p.get("learned_from"))),
            )
        )
    out.append(
        html_table(
            (
                "experiment",
                "outcome",
                "P(no trouble)",
                "P(refused) (likeliest rule)",
                "P(failed)",
                "P(unverified)",
                "learned from",
            ),
            table,
            raw=True,
        )
    )
    if len(rows) > MAX_TABLE_ROWS:
        out.append(
            f"<p class='note'>{len(rows) - MAX_TABLE_ROWS} more predictions are not listed; "
            "<code>labbridge export</code> writes the journal's proposal records.</p>"
        )
    return out
