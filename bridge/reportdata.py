"""What a campaign report shows, read from the journal once (:func:`read_report_data`), and
the few ways its values are written in text (:func:`fmt_num`, :func:`verification_text`).

Used by :mod:`bridge.report` and its parts (:mod:`bridge.reportplots`,
:mod:`bridge.reportsheet`, :mod:`bridge.reporthtml`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.export import open_campaign
from loops.journal import Campaign, Experiment, Journal, Transition

__all__ = [
    "ReportData",
    "ReportParam",
    "as_mapping",
    "best_result",
    "fmt_num",
    "is_trusted",
    "proposer_kind",
    "read_report_data",
    "verification_text",
]


@dataclass(frozen=True)
class ReportParam:
    name: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    #: a categorical/ordinal parameter's choices (plotted at their index)
    choices: tuple[Any, ...] = ()


@dataclass
class ReportData:
    """Everything the report shows, read from the journal once."""

    campaign: Campaign
    journal_path: Path
    direction: str
    measure: str
    target: float | None
    target_lab: tuple[float, float, float] | None
    budget: str
    strategy: str | None
    program_note: str | None
    params: list[ReportParam]
    experiments: list[Experiment]
    verdicts: list[dict[str, Any]]
    events: list[Transition]
    rejections: dict[str, list[str]]
    failures: dict[str, dict[str, Any]]
    images: dict[str, dict[str, dict[str, Any]]]
    stations_with_calibration: dict[str, Path] = field(default_factory=dict)
    #: several objectives: each one's measure, direction and threshold (() for one)
    goals: tuple[Any, ...] = ()
    #: several objectives: every trusted result's objective values, by experiment id
    vectors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: the learned feasibility's prediction journaled with each proposal, by experiment id
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the dry run's refusing rules of each rejected proposal, by experiment id
    refusing_rules: dict[str, list[str]] = field(default_factory=dict)

    @property
    def minimize(self) -> bool:
        return self.direction != "maximize"

    def better(self, a: float, b: float) -> bool:
        return a < b if self.minimize else a > b


def read_report_data(journal: Journal, campaign_id: str) -> ReportData:
    """Everything the report shows, read from ``journal`` once (a program the journal holds
    but that cannot be read any more gives a note, not an error)."""
    campaign = open_campaign(journal, campaign_id)
    exps = journal.experiments(campaign_id)
    direction, measure, target, target_lab = "minimize", "objective", None, None
    budget, strategy, note = "", None, None
    params: list[ReportParam] = []
    try:
        from loops.program import load_program

        program = load_program(campaign.program)
    except Exception as exc:  # an old or foreign program: report what the journal has
        program = None
        note = f"the campaign's program could not be read ({exc}); objective direction assumed minimize"
    if program is not None:
        direction = program.objective.direction
        measure = program.objective.measure
        target = program.stop.target
        lab = program.fixed.get("target_lab")  # a colour target, drawn as a swatch
        if isinstance(lab, list) and len(lab) == 3 and all(isinstance(v, int | float) for v in lab):
            target_lab = (float(lab[0]), float(lab[1]), float(lab[2]))
        strategy = program.strategy
        parts = []
        if program.budget.experiments is not None:
            parts.append(f"{program.budget.experiments} experiments")
        if program.budget.hours is not None:
            parts.append(f"{program.budget.hours:g} h")
        budget = ", ".join(parts)
        params = [
            ReportParam(p.name, p.unit, float(p.low), float(p.high), tuple(p.choices))
            for p in program.parameters
        ]
    known = {p.name for p in params}
    for e in exps:
        for name in e.params:
            if name not in known:
                known.add(name)
                params.append(ReportParam(name))
    events: list[Transition] = []
    rejections: dict[str, list[str]] = {}
    failures: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, Any]] = {}
    refusing_rules: dict[str, list[str]] = {}
    for t in journal.campaign_log(campaign_id):
        if t.experiment_id is None:
            events.append(t)
        elif t.event == "state" and t.state == "proposed" and isinstance(t.data, Mapping):
            prediction = as_mapping(as_mapping(t.data.get("data")).get("feasibility"))
            if prediction:
                predictions[t.experiment_id] = dict(prediction)
        elif t.event == "state" and t.state == "rejected" and isinstance(t.data, Mapping):
            reasons = t.data.get("reasons")
            if isinstance(reasons, list):
                rejections[t.experiment_id] = [str(r) for r in reasons]
            rules = as_mapping(t.data.get("data")).get("rules")
            if isinstance(rules, list):
                refusing_rules[t.experiment_id] = [str(r) for r in rules]
        elif t.event == "state" and t.state == "failed" and isinstance(t.data, Mapping):
            failures[t.experiment_id] = dict(t.data)
    goals: tuple[Any, ...] = ()
    vectors: dict[str, tuple[float, ...]] = {}
    if program is not None and program.multi:
        goals = program.goals
        for e in exps:
            measurements = as_mapping(as_mapping(e.result).get("measurements"))
            vector = program.objective_values(measurements) if is_trusted(e) else None
            if vector is not None:
                vectors[e.id] = vector
    images = {e.id: journal.images(e.id) for e in exps}
    folder = journal.path.parent
    calibrations = {}
    for station in {e.station for e in exps if e.station}:
        path = folder / "setup" / f"{station}.yaml"  # the set-up results of a run folder
        if path.is_file():
            calibrations[station] = path
    return ReportData(
        campaign=campaign,
        journal_path=journal.path,
        direction=direction,
        measure=measure,
        target=target,
        target_lab=target_lab,
        budget=budget,
        strategy=strategy,
        program_note=note,
        params=params,
        experiments=exps,
        verdicts=journal.verdicts(campaign_id),
        events=events,
        rejections=rejections,
        failures=failures,
        images=images,
        stations_with_calibration=calibrations,
        goals=goals,
        vectors=vectors,
        predictions=predictions,
        refusing_rules=refusing_rules,
    )


def is_trusted(e: Experiment) -> bool:
    """A finished result with an objective that the verification did not refute."""
    return e.state == "done" and e.objective is not None and e.verified is not False


def best_result(data: ReportData) -> Experiment | None:
    """The best trusted result in the campaign's direction, or None."""
    best: Experiment | None = None
    best_value = math.nan
    for e in data.experiments:
        if is_trusted(e) and e.objective is not None:
            if best is None or data.better(e.objective, best_value):
                best, best_value = e, e.objective
    return best


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def proposer_kind(proposer: str) -> str:
    """``optimizer``, ``agent`` or ``operator`` (a proposer is ``<kind>[:<id>]``)."""
    return proposer.split(":", 1)[0]


def fmt_num(value: Any, digits: int = 4) -> str:
    """A value for a table or a caption: ``digits`` significant digits, yes/no, "" for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def verification_text(e: Experiment) -> str:
    if e.state != "done":
        return f"{e.state}: {e.reason}" if e.reason else f"no result ({e.state})"
    if e.verified is False:
        return e.reason or "unverified"
    text = "verified" if e.verified is True else "not checked (verification off)"
    return f"{text} ({e.reason})" if e.reason else text  # recovered on resume
