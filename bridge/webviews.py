"""What the lab page shows, as plain data: the lab, a campaign and its proposals awaiting
approval, an experiment, the cameras, the history (the routes are :mod:`bridge.webapp`'s).

Labels are words with units, not identifiers: a channel ``hotplate.liquid_c`` is shown as
"hotplate: liquid temperature" in °C (:func:`channel_words`), a parameter by its program
``doc`` and ``unit``, an objective by :data:`MEASURE_WORDS` or its name in words.
Campaign data come from the journal (SQLite, read on a worker thread, as ``labbridge
report`` reads it: :func:`bridge.reportdata.read_report_data`) and from the service's live
campaigns; an experiment's record is the service's (:meth:`~bridge.service.LabService.
experiment_record`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bridge.export import CampaignDataError, open_journal
from bridge.labdescribe import describe_station
from bridge.reportdata import ReportData, best_result, read_report_data
from bridge.service import LabService
from bridge.webevents import plain
from instruments.colour import lab_to_srgb
from loops.journal import Experiment
from loops.program import load_program

__all__ = [
    "MAX_DRY_RUNS",
    "MEASURE_WORDS",
    "approvals_view",
    "campaign_view",
    "channel_words",
    "history_view",
    "read_campaign",
    "srgb_hex",
    "station_limits",
]

#: unit suffixes of channel names -> (the quantity in words, its unit)
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    ("_ml_min", "rate", "mL/min"),
    ("_rpm", "speed", "rpm"),
    ("_ml", "volume", "mL"),
    ("_c", "temperature", "°C"),
    ("_ms", "", "ms"),
    ("_s", "", "s"),
    ("_mg", "mass", "mg"),
    ("_percent", "", "%"),
    ("_pct", "", "%"),
)
#: objectives the bundled programs use, in words (others: their name in words)
MEASURE_WORDS = {
    "delta_e2000": ("colour difference to the target (CIEDE2000 ΔE)", ""),
    "ph_error": ("distance from the target pH", "pH units"),
}
_UNITS = {"degC": "°C", "degc": "°C", "ml": "mL", "ml/min": "mL/min"}
#: experiments listed in a campaign's view (the report and the exports have all)
MAX_ROWS = 2000
#: proposals awaiting approval dry-run again for one listing (program.md bounds how many wait)
MAX_DRY_RUNS = 32
#: the verdict a waiting proposal had: it waits only after its dry run passed
_PASSED_WHEN_PROPOSED: Mapping[str, Any] = {"when": "proposed", "ok": True, "reasons": []}


def unit_words(unit: str) -> str:
    return _UNITS.get(unit, unit)


def channel_words(channel: str) -> dict[str, str]:
    """``instrument.channel`` -> ``{"label", "unit"}`` in words (``hotplate.liquid_c`` ->
    "hotplate: liquid temperature", "°C")."""
    instrument, _, name = channel.rpartition(".")
    label, unit = name, ""
    for suffix, quantity, u in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)].replace("_", " ")
            repeated = not quantity or stem == quantity or stem.endswith(f" {quantity}")
            label = stem if repeated else f"{stem} {quantity}"
            unit = u
            break
    else:
        label = name.replace("_", " ")
    return {"label": f"{instrument}: {label}" if instrument else label, "unit": unit}


def measure_words(measure: str) -> dict[str, str]:
    """An objective in words: ``label`` and ``unit`` (:data:`MEASURE_WORDS`, else the name
    read like a channel's) and a ``short`` label for small plots."""
    if measure in MEASURE_WORDS:
        label, unit = MEASURE_WORDS[measure]
    else:
        words = channel_words(measure)
        label, unit = words["label"], words["unit"]
    return {"label": label, "unit": unit, "short": measure}


def srgb_hex(lab: Any) -> str | None:
    """A CIELAB colour ``[L, a, b]`` as ``#rrggbb`` (clipped to sRGB), or None."""
    if not isinstance(lab, Sequence) or len(lab) != 3:
        return None
    try:
        r, g, b = lab_to_srgb([float(v) for v in lab], clip=True)
    except (TypeError, ValueError):
        return None
    return "#" + "".join(f"{round(255 * c):02x}" for c in (r, g, b))


def station_limits(service: LabService, station: str) -> dict[str, Any]:
    """The station's envelope as the page shows it beside the readings: each bounded
    channel (in words, how it is bounded), vessels, rules and monitors."""
    d = describe_station(service.lab.stations[station])
    limits = {
        ch: {**channel_words(ch), "how": info["how"], "bounded": info["bounded"]}
        for ch, info in d["limits"].items()
    }
    for name, v in d["vessels"].items():
        unit = unit_words(v.get("unit") or "")
        limits[f"{name}.volume"] = {
            "label": f"{name}: volume",
            "unit": unit,
            "how": f"<= {v['max']:g} {unit} (holds {v['capacity']:g})",
            "bounded": True,
        }
    return plain(
        {
            "limits": limits,
            "rules": d["rules"],
            "monitors": d["monitors"],
        }
    )


# ---------------------------------------------------------------- campaigns
def read_campaign(store: Path, campaign_id: str) -> ReportData:
    """The campaign as its report reads it (call on a worker thread)."""
    journal = open_journal(store)
    try:
        return read_report_data(journal, campaign_id)
    finally:
        journal.close()


def _row(e: Experiment, data: ReportData) -> dict[str, Any]:
    result = e.result if isinstance(e.result, Mapping) else {}
    images = data.images.get(e.id, {})
    return {
        "experiment_id": e.id,
        "seq": e.seq,
        "station": e.station,
        "proposer": e.proposer,
        "state": e.state,
        "params": e.params,
        "objective": e.objective,
        "verified": e.verified,
        "reason": "; ".join(data.rejections[e.id]) if e.id in data.rejections else e.reason,
        "created": e.created,
        "updated": e.updated,
        "images": sorted(images),
        "colour": srgb_hex((result.get("measurements") or {}).get("lab")),
    }


def _best(data: ReportData) -> Experiment | None:
    """The best verified result (when nothing is checked, verification off: the best result)."""
    verified = [e for e in data.experiments if e.state == "done" and e.verified is True]
    if verified:
        sub = ReportData(**{**data.__dict__, "experiments": verified})
        return best_result(sub)
    if any(e.verified is False for e in data.experiments):
        return None
    return best_result(data)


def parameter_rows(service: LabService, data: ReportData) -> list[dict[str, Any]]:
    """The campaign's parameters in words: the program's ``doc`` (else the name), the unit
    and the bounds."""
    handle = service.campaigns.get(data.campaign.id)
    docs = {p.name: p.doc for p in handle.program.parameters} if handle is not None else {}
    if handle is None:
        with contextlib.suppress(Exception):  # an old or foreign program: names will do
            program = load_program(data.campaign.program)
            docs = {p.name: p.doc for p in program.parameters}
    return [
        {
            "name": p.name,
            "label": docs.get(p.name) or p.name.replace("_", " "),
            "unit": unit_words(p.unit),
            "low": p.low,
            "high": p.high,
        }
        for p in data.params
    ]


def campaign_view(service: LabService, data: ReportData) -> dict[str, Any]:
    """A campaign for the page: its state, program (parameters and objective in words),
    progress, best verified result and every experiment (the queue among them)."""
    c = data.campaign
    handle = service.campaigns.get(c.id)
    status = handle.status() if handle is not None else None
    best = _best(data)
    target_lab = list(data.target_lab) if data.target_lab is not None else None
    params = parameter_rows(service, data)
    rows = [_row(e, data) for e in data.experiments[-MAX_ROWS:]]
    out: dict[str, Any] = {
        "campaign_id": c.id,
        "name": c.name,
        "state": status["state"] if status else c.state,
        "reason": (status or {}).get("reason"),
        "live": handle is not None and handle.active,
        "in_this_service": handle is not None,
        "created": c.created,
        "updated": c.updated,
        "objective": {
            "measure": data.measure,
            **measure_words(data.measure),
            "direction": data.direction,
            "target": data.target,
            "target_colour": srgb_hex(target_lab),
            "target_lab": target_lab,
        },
        "budget": data.budget,
        "strategy": data.strategy,
        "parameters": params,
        "progress": (status or {}).get("progress"),
        "stations": (status or {}).get("stations") or [],
        "started_by": (status or {}).get("started_by"),
        "best": None if best is None else _row(best, data),
        "experiments": rows,
        "more": max(0, len(data.experiments) - len(rows)),
    }
    return plain(out)


async def _program_parameters(service: LabService, campaign_id: str) -> dict[str, Any]:
    """The campaign's parameters by name (its program: live here, else the journal's);
    :class:`CampaignDataError` if the journal has no such campaign."""
    handle = service.campaigns.get(campaign_id)
    if handle is not None:
        return {p.name: p for p in handle.program.parameters}
    row = next((c for c in await service.stored_campaigns() if c.id == campaign_id), None)
    if row is None:
        raise CampaignDataError(f"no campaign {campaign_id!r} in the journal {service.lab.store}")
    with contextlib.suppress(Exception):  # an old or foreign program: names will do
        return {p.name: p for p in load_program(row.program).parameters}
    return {}


async def _dry_run(service: LabService, campaign_id: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict on a waiting proposal: dry-run again now when its campaign runs here
    (its stations' current state), else the one it passed when proposed (a proposal waits
    for a human only after the program's constraints and the safety layer's dry run
    passed: :meth:`~loops.campaign.CampaignRunner.propose`)."""
    handle = service.campaigns.get(campaign_id)
    if handle is None or not handle.active:
        return dict(_PASSED_WHEN_PROPOSED)
    try:
        verdict = await service.dry_run(campaign_id, row["params"], str(row["proposer"]))
    except Exception as exc:  # the campaign ended meanwhile, a station went: said, not fatal
        return {"when": "now", "ok": None, "reasons": [f"could not dry-run it now: {exc}"]}
    return {"when": "now", "ok": bool(verdict["ok"]), "reasons": list(verdict["reasons"])}


async def approvals_view(service: LabService, campaign_id: str) -> dict[str, Any]:
    """The campaign's proposals awaiting a human's approval, oldest first: who proposed
    each, its parameters in words with units, the dry run's verdict, the rules that asked
    for a human, when it expires, and a decision recorded but not applied yet (the
    campaign is not running here)."""
    params = await _program_parameters(service, campaign_id)
    rows = await service.approvals(campaign_id)
    verdicts = await asyncio.gather(
        *(_dry_run(service, campaign_id, r) for r in rows[:MAX_DRY_RUNS])
    )
    now = time.time()
    out = []
    for i, r in enumerate(rows):
        shown = []
        for name, value in dict(r["params"]).items():
            p = params.get(name)
            shown.append(
                {
                    "name": name,
                    "label": (p.doc if p is not None else "") or name.replace("_", " "),
                    "unit": unit_words(p.unit) if p is not None else "",
                    "value": value,
                }
            )
        dry = verdicts[i] if i < len(verdicts) else dict(_PASSED_WHEN_PROPOSED)
        out.append(
            {
                "experiment_id": r["experiment_id"],
                "proposer": r["proposer"],
                "params": shown,
                "dry_run": dry,
                "rules": list(r["rules"]),
                "requested": r["requested"],
                "expires": r["expires"],
                "expires_in_s": max(0.0, float(r["expires"]) - now),
                "decision": r["decision"],
                "who": r["who"],
                "reason": r["reason"],
            }
        )
    return plain({"campaign_id": campaign_id, "t": now, "approvals": out})


async def history_view(service: LabService) -> list[dict[str, Any]]:
    """Every campaign of the lab's journal, newest first, with what this service runs."""
    rows = await service.stored_campaigns()
    out = []
    for c in reversed(rows):
        handle = service.campaigns.get(c.id)
        out.append(
            {
                "campaign_id": c.id,
                "name": c.name,
                "state": handle.status()["state"] if handle is not None else c.state,
                "live": handle is not None and handle.active,
                "created": c.created,
                "updated": c.updated,
            }
        )
    return plain(out)


async def latest_frames(service: LabService, seen: Mapping[str, Any]) -> dict[str, Any]:
    """The newest outcome frame of each station: those the page saw finish, else the newest
    in the journal's most recent campaigns (up to five looked at)."""
    frames = {k: dict(v) for k, v in seen.items() if k in service.stations}
    missing = [s for s in service.stations if s not in frames]
    if missing:
        rows = await service.stored_campaigns()
        for c in list(reversed(rows))[:5]:
            try:
                data = await asyncio.to_thread(read_campaign, service.lab.store, c.id)
            except CampaignDataError:
                continue
            for e in reversed(data.experiments):
                if e.station in missing and "outcome" in data.images.get(e.id, {}):
                    frames[e.station] = {"experiment_id": e.id, "campaign_id": c.id, "t": e.updated}
                    missing.remove(e.station)
            if not missing:
                break
    return plain(frames)


# --------------------------------------------------------------- experiments
_HIDDEN = ("image_sha256", "image_bytes", "reference_sha256")


def _step_text(step: Mapping[str, Any]) -> str:
    """A recipe step in a line: ``red.dispense(volume_ml=0.35, rate_ml_min=5)``."""
    kind = step.get("kind")
    args = step.get("args") or {}
    shown = ", ".join(f"{k}={_short(v)}" for k, v in args.items())
    if kind == "call":
        text = f"{step.get('instrument')}.{step.get('command')}({shown})"
        return text + (f" into {step['into']}" if step.get("into") else "")
    if kind == "wait":
        return f"wait until {step.get('condition')}"
    if kind == "capture":
        return f"camera frame: {step.get('role')}"
    if kind == "read":
        values = step.get("values") or {}
        return "read " + ", ".join(f"{k} = {v}" for k, v in values.items())
    if kind == "compute":
        return f"{step.get('into')} = {step.get('function')}(...)"
    if kind == "hold":
        return f"hold {_short(step.get('seconds') or step.get('s'))} s"
    if kind == "ramp":
        return f"ramp {step.get('instrument')}.{step.get('command')} to {_short(step.get('to'))}"
    return ", ".join(f"{k}={_short(v)}" for k, v in step.items() if k != "kind") or str(kind)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def measurements_view(measurements: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An experiment's measurements as rows in words: label, value (text) and unit."""
    rows = []
    for key, value in measurements.items():
        if key in _HIDDEN:
            continue
        if key == "lab" and isinstance(value, list) and len(value) == 3:
            rows.append(
                {
                    "label": "measured colour (CIELAB L*, a*, b*)",
                    "value": ", ".join(_short(v) for v in value),
                    "unit": "",
                    "colour": srgb_hex(value),
                }
            )
            continue
        words = MEASURE_WORDS.get(key)
        label, unit = words if words else (channel_words(key)["label"], channel_words(key)["unit"])
        text = (
            ", ".join(f"{k} {_short(v)}" for k, v in value.items())
            if isinstance(value, Mapping)
            else _short(value)
        )
        rows.append({"label": label, "value": text, "unit": unit})
    return rows


def checks_view(verification: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The verification's checks in words: passed, the value against its bound, the values
    compared (the camera's and the instruments')."""
    rows = []
    for name, check in (verification.get("checks") or {}).items():
        if not isinstance(check, Mapping):
            continue
        bounds = []
        if check.get("within") is not None:
            bounds.append(f"within ±{_short(check['within'])}")
        if check.get("min") is not None:
            bounds.append(f">= {_short(check['min'])}")
        if check.get("max") is not None:
            bounds.append(f"<= {_short(check['max'])}")
        compared = "; ".join(f"{k} = {_short(v)}" for k, v in (check.get("values") or {}).items())
        rows.append(
            {
                "check": name,
                "ok": check.get("ok"),
                "value": _short(check.get("value")),
                "bound": ", ".join(bounds),
                "compared": compared,
            }
        )
    return rows


def steps_view(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The recipe's steps with when each started and ended, how long it took (the lab's
    clock: simulated seconds on a simulated bench), what it returned and the safety
    verdicts of its commands (matched by time)."""
    recipe = record.get("recipe") if isinstance(record.get("recipe"), Mapping) else {}
    planned = list((recipe or {}).get("steps") or [])
    steps: dict[int, dict[str, Any]] = {}
    for t in record.get("log") or []:
        k, data = t.get("step"), t.get("data") or {}
        if not isinstance(k, int):
            continue
        row = steps.setdefault(
            k,
            {
                "index": k,
                "text": _step_text(planned[k]) if k < len(planned) else "",
                "verdicts": [],
            },
        )
        if t.get("event") == "step_started":
            row["started"] = t.get("t")
            if isinstance(data.get("step"), Mapping):
                row["text"] = _step_text(data["step"])
        elif t.get("event") in ("step_done", "step_failed"):
            row["ended"] = t.get("t")
            found = data.get("data")
            out: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
            row["duration_s"] = out.get("duration_s")
            row["result"] = ", ".join(
                f"{k} = {_short(v)}"
                for k, v in out.items()
                if k != "duration_s" and k not in _HIDDEN
            )
            if t.get("event") == "step_failed" or data.get("error"):
                row["error"] = str(data.get("error") or data.get("reason") or "failed")
    ordered = [steps[k] for k in sorted(steps)]
    for v in record.get("verdicts") or []:
        t = v.get("t") or 0.0
        for row in ordered:
            if row.get("started", float("inf")) <= t <= row.get("ended", float("inf")):
                row["verdicts"].append(v)
                break
    for row in ordered:
        vs = row.pop("verdicts")
        refused = [f"{v.get('rule') or '?'}: {v.get('reason')}" for v in vs if not v.get("allowed")]
        row["allowed"] = sum(1 for v in vs if v.get("allowed"))
        row["refused"] = refused
    return ordered
