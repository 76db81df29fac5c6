"""``labbridge export``: a campaign's journal as flat tables, CSV or Parquet.

Three tables per campaign, written to ``out_dir`` as ``<campaign>-<table>.csv``
(or ``.parquet``):

* **experiments**: one row per experiment (seq order): ``experiment_id``,
  ``seq``, ``state``, ``proposer``, ``station``, one ``param.<name>`` column per
  parameter, ``objective``, ``verified``, ``reason``, ``elapsed_s``, one
  ``measure.<key>`` column per scalar measurement (nested mappings flattened
  with dots: ``measure.dispensed_ml.red``; lists of numbers with their index:
  ``measure.lab.0``; lists of strings joined with ``"; "``), the verification's
  numbers as ``check.<check>.<key>`` (``check.fill.value``, ``check.fill.ok``,
  ``check.fill.values.camera.fill_ml``, ...), one ``image.<role>`` column per image role
  (the path as stored) and ``created``/``updated`` (seconds since the epoch, UTC).
* **transitions**: the campaign's whole journal log, oldest first: ``id``,
  ``experiment_id`` (empty for campaign-level events), ``t``, ``event``,
  ``state``, ``step``, ``reason``, ``data`` (the event's data as JSON text).
* **verdicts**: every safety verdict on the campaign's commands: ``id``,
  ``experiment_id``, ``station``, ``t``, ``who``, ``instrument``, ``action``,
  ``params`` (JSON), ``allowed``, ``rule``, ``reason``, ``values`` (JSON).

Every row of a table has the same columns. CSV is written with the standard
:mod:`csv` module (an empty field is a missing value; booleans are ``True`` /
``False``; floats in Python's shortest round-trip form). Parquet needs
``pyarrow`` (an optional dependency): numbers keep their types (int64,
float64, bool), text is UTF-8, and the file's metadata names the campaign.

This module also holds what ``labbridge report`` shares: finding the journal
(``runs/<campaign>/journal.db`` by default), opening it only if it is a
labbridge journal, and the clear errors (:class:`CampaignDataError`) that name
what is missing and list the campaigns the journal has.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sqlite3
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loops.journal import Campaign, Experiment, Journal, JournalError, UnknownCampaign

__all__ = [
    "FORMATS",
    "CampaignDataError",
    "Table",
    "add_export_parser",
    "add_journal_arguments",
    "experiments_table",
    "export",
    "export_command",
    "open_campaign",
    "open_journal",
    "resolve_journal",
    "safe_name",
    "transitions_table",
    "verdicts_table",
]

FORMATS = ("csv", "parquet")
#: the format of our Parquet files' metadata (``labbridge.export`` key)
EXPORT_FORMAT = "labbridge.export/1"


class CampaignDataError(Exception):
    """No such journal, not a labbridge journal, no such campaign, or an unusable output
    folder; the message says which, with the path (and the campaigns the journal has)."""


# ------------------------------------------------------------------ journal
def open_journal(path: str | Path) -> Journal:
    """Open an existing labbridge journal for reading.

    Unlike ``Journal(path)`` this never creates a file: a missing path, a
    folder, a file that is not SQLite and an SQLite file that is not a
    labbridge journal are each refused with a :class:`CampaignDataError`
    that says which.
    """
    p = Path(path)
    if not p.exists():
        raise CampaignDataError(f"no journal at {p} (no such file)")
    if p.is_dir():
        hint = " (it has a journal.db: pass that)" if (p / "journal.db").is_file() else ""
        raise CampaignDataError(f"journal {p} is a folder, not a journal file{hint}")
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CampaignDataError(f"cannot open journal {p}: {exc}") from None
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise CampaignDataError(f"{p} is not a labbridge journal ({exc})") from None
    finally:
        conn.close()
    missing = {"schema_version", "campaigns", "experiments", "transitions"} - tables
    if missing:
        raise CampaignDataError(
            f"{p} is an SQLite database but not a labbridge journal "
            f"(no table {', '.join(sorted(missing))})"
        )
    try:
        return Journal(p)
    except JournalError as exc:
        raise CampaignDataError(str(exc)) from None


def open_campaign(journal: Journal, campaign_id: str) -> Campaign:
    """The campaign row, or a :class:`CampaignDataError` listing the campaigns the journal has."""
    try:
        return journal.campaign(campaign_id)
    except UnknownCampaign:
        known = [c.id for c in journal.campaigns()]
        listing = (
            f"it has {len(known)}: {', '.join(known)}" if known else "it has no campaigns at all"
        )
        raise CampaignDataError(
            f"no campaign {campaign_id!r} in journal {journal.path}; {listing}"
        ) from None


def safe_name(text: str) -> str:
    """``text`` usable as (part of) a file name: anything but letters, digits, ``.-_`` -> ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".")
    return name or "campaign"


# ------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Table:
    """A flat table: ``columns`` in order and ``rows`` (each a dict with every column)."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Scalars as they are; mappings by key (``a.b``); lists of scalars: numbers by index,
    strings joined with ``"; "``. Anything else (lists of mappings) is left out."""
    if _scalar(value):
        out[prefix] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif isinstance(value, list | tuple) and all(_scalar(v) for v in value):
        if all(isinstance(v, str) for v in value):
            out[prefix] = "; ".join(value)
        else:
            for i, item in enumerate(value):
                out[f"{prefix}.{i}"] = item


def _ordered(keys: Iterable[str], first: Sequence[str] = ()) -> list[str]:
    seen: dict[str, None] = dict.fromkeys(k for k in first)
    for k in keys:
        seen.setdefault(k, None)
    return list(seen)


def _parameter_order(campaign: Campaign, experiments: Sequence[Experiment]) -> list[str]:
    """Parameter names: the program's order when it can be read, then any others seen."""
    first: list[str] = []
    try:
        from loops.program import load_program

        program = load_program(campaign.program) if campaign.program else None
        if program is not None:
            first = [p.name for p in program.parameters]
    except Exception:  # an old or foreign program: the experiments' own keys will do
        first = []
    return _ordered((k for e in experiments for k in e.params), first)


def experiments_table(journal: Journal, campaign_id: str) -> Table:
    """One row per experiment of the campaign (see the module docstring for the columns)."""
    campaign = open_campaign(journal, campaign_id)
    exps = journal.experiments(campaign_id)
    params = _parameter_order(campaign, exps)
    measures: dict[str, None] = {}
    checks: dict[str, None] = {}
    roles: dict[str, None] = {}
    flat: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    for e in exps:
        result = e.result if isinstance(e.result, Mapping) else {}
        m: dict[str, Any] = {}
        c: dict[str, Any] = {}
        measurements = result.get("measurements")
        if isinstance(measurements, Mapping):
            for key, value in measurements.items():
                _flatten(f"measure.{key}", value, m)
        verification = result.get("verification")
        if isinstance(verification, Mapping) and isinstance(verification.get("checks"), Mapping):
            for key, value in verification["checks"].items():
                _flatten(f"check.{key}", value, c)
        images = {
            f"image.{role}": str(img.get("path")) for role, img in journal.images(e.id).items()
        }
        measures.update(dict.fromkeys(m))
        checks.update(dict.fromkeys(c))
        roles.update(dict.fromkeys(images))
        flat.append((m, c, images))
    columns = (
        ["experiment_id", "seq", "state", "proposer", "station"]
        + [f"param.{p}" for p in params]
        + ["objective", "verified", "reason", "elapsed_s"]
        + list(measures)
        + list(checks)
        + sorted(roles)
        + ["created", "updated"]
    )
    rows = []
    for e, (m, c, images) in zip(exps, flat, strict=True):
        result = e.result if isinstance(e.result, Mapping) else {}
        elapsed = result.get("elapsed_s")
        row: dict[str, Any] = {
            "experiment_id": e.id,
            "seq": e.seq,
            "state": e.state,
            "proposer": e.proposer,
            "station": e.station,
        }
        for p in params:
            value = e.params.get(p)
            row[f"param.{p}"] = value if _scalar(value) else json.dumps(value)
        row.update(
            objective=e.objective,
            verified=e.verified,
            reason=e.reason,
            elapsed_s=elapsed if isinstance(elapsed, int | float) else None,
        )
        for key in measures:
            row[key] = m.get(key)
        for key in checks:
            row[key] = c.get(key)
        for key in roles:
            row[key] = images.get(key)
        row.update(created=e.created, updated=e.updated)
        rows.append(row)
    return Table("experiments", tuple(columns), tuple(rows))


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


def transitions_table(journal: Journal, campaign_id: str) -> Table:
    """The campaign's journal log, one row per transition (campaign events included)."""
    open_campaign(journal, campaign_id)
    rows = []
    for t in journal.campaign_log(campaign_id):
        data = t.data if isinstance(t.data, Mapping) else None
        reason = data.get("reason") if data is not None else None
        rows.append(
            {
                "id": t.id,
                "experiment_id": t.experiment_id,
                "t": t.t,
                "event": t.event,
                "state": t.state,
                "step": t.step,
                "reason": reason if isinstance(reason, str) else None,
                "data": _json(t.data),
            }
        )
    columns = ("id", "experiment_id", "t", "event", "state", "step", "reason", "data")
    return Table("transitions", columns, tuple(rows))


def verdicts_table(journal: Journal, campaign_id: str) -> Table:
    """Every safety verdict recorded for the campaign's experiments, oldest first."""
    open_campaign(journal, campaign_id)
    rows = []
    for v in journal.verdicts(campaign_id):
        raw = v.get("command")
        command: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        rows.append(
            {
                "id": v["id"],
                "experiment_id": v["experiment_id"],
                "station": v["station"],
                "t": v["t"],
                "who": v["who"],
                "instrument": command.get("instrument"),
                "action": command.get("action"),
                "params": _json(command.get("params")),
                "allowed": v["allowed"],
                "rule": v["rule"],
                "reason": v["reason"],
                "values": _json(v.get("values")),
            }
        )
    columns = (
        "id",
        "experiment_id",
        "station",
        "t",
        "who",
        "instrument",
        "action",
        "params",
        "allowed",
        "rule",
        "reason",
        "values",
    )
    return Table("verdicts", columns, tuple(rows))


# ------------------------------------------------------------------ writers
def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # nan, inf: the csv module would write them the same way
    return value


def _write_csv(table: Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow([_csv_value(row[c]) for c in table.columns])
    os.replace(tmp, path)


def _arrow_type(values: Sequence[Any], pa: Any) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return pa.string()
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def _arrow_values(values: Sequence[Any], kind: Any, pa: Any) -> list[Any]:
    if kind == pa.float64():
        return [None if v is None else float(v) for v in values]
    if kind == pa.string():
        return [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values]
    return list(values)


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CampaignDataError(
            "Parquet export needs pyarrow, which is not installed: pip install pyarrow "
            "(or use --format csv)"
        ) from None
    return pa, pq


def _write_parquet(table: Table, path: Path, campaign_id: str) -> None:
    pa, pq = _pyarrow()
    arrays = []
    fields = []
    for column in table.columns:
        values = [row[column] for row in table.rows]
        kind = _arrow_type(values, pa)
        arrays.append(pa.array(_arrow_values(values, kind, pa), type=kind))
        fields.append(pa.field(column, kind))
    metadata = {
        "labbridge.export": EXPORT_FORMAT,
        "labbridge.campaign": campaign_id,
        "labbridge.table": table.name,
    }
    arrow = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=metadata))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(arrow, tmp)
    os.replace(tmp, path)


def export(journal_path: str | Path, campaign_id: str, fmt: str, out_dir: str | Path) -> list[Path]:
    """Write the campaign's experiments, transitions and verdicts to ``out_dir``.

    ``fmt``: ``"csv"`` or ``"parquet"``. Files: ``<campaign>-experiments.<ext>``,
    ``<campaign>-transitions.<ext>``, ``<campaign>-verdicts.<ext>`` (the campaign
    id made file-name safe), each written to a temporary name and renamed, so a
    reader never sees half a file. Returns the paths written, in that order.
    Raises :class:`CampaignDataError` for a missing journal or campaign, an
    unknown format, pyarrow missing (Parquet) or an output folder that cannot
    be created.
    """
    if fmt not in FORMATS:
        raise CampaignDataError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    journal = open_journal(journal_path)
    try:
        open_campaign(journal, campaign_id)
        tables = [
            experiments_table(journal, campaign_id),
            transitions_table(journal, campaign_id),
            verdicts_table(journal, campaign_id),
        ]
    finally:
        journal.close()
    if fmt == "parquet":
        _pyarrow()  # fail before writing anything when pyarrow is missing
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CampaignDataError(f"cannot create the output folder {out}: {exc}") from None
    written = []
    for table in tables:
        path = out / f"{safe_name(campaign_id)}-{table.name}.{fmt}"
        try:
            if fmt == "csv":
                _write_csv(table, path)
            else:
                _write_parquet(table, path, campaign_id)
        except OSError as exc:
            raise CampaignDataError(f"cannot write {path}: {exc}") from None
        written.append(path)
    return written


# ---------------------------------------------------------------------- CLI
def add_journal_arguments(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """``CAMPAIGN [--runs DIR | --journal PATH] [--out DIR]`` (shared by report and export)."""
    parser.add_argument(
        "campaign", metavar="CAMPAIGN", help="the campaign id (as `labbridge run` printed it)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--runs",
        type=Path,
        default=None,
        metavar="DIR",
        help="run folders: the journal is DIR/<CAMPAIGN>/journal.db (default runs/)",
    )
    where.add_argument(
        "--journal",
        type=Path,
        default=None,
        metavar="PATH",
        help="the journal file itself (e.g. a lab's shared store)",
    )
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=out_help)


def resolve_journal(args: argparse.Namespace) -> Path:
    """The journal the arguments name: ``--journal``, else ``<--runs or runs>/<campaign>/journal.db``."""
    if args.journal is not None:
        return Path(args.journal)
    runs = Path(args.runs) if args.runs is not None else Path("runs")
    return runs / args.campaign / "journal.db"


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` to a ``parser.add_subparsers()`` object; returns its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="write a campaign's experiments, transitions and verdicts as CSV or Parquet",
        description=(
            "Export a campaign from its journal as three flat tables: experiments (one row each: "
            "state, proposer, station, one column per parameter, objective, verification, one "
            "column per scalar measurement, image paths), transitions (the journal log) and the "
            "safety verdicts. Files are <CAMPAIGN>-<table>.csv or .parquet (Parquet needs "
            "pyarrow). The journal is runs/<CAMPAIGN>/journal.db unless --runs or --journal "
            "says otherwise."
        ),
    )
    add_journal_arguments(parser, out_help="output folder (default: export/ next to the journal)")
    parser.add_argument(
        "--format", choices=FORMATS, required=True, help="csv (standard library) or parquet"
    )
    return parser


def export_command(args: argparse.Namespace) -> int:
    """Run ``labbridge export``: prints the files written; errors go to stderr with status 1."""
    journal = resolve_journal(args)
    out = Path(args.out) if args.out is not None else journal.parent / "export"
    try:
        paths = export(journal, args.campaign, args.format, out)
    except CampaignDataError as exc:
        print(f"labbridge export: {exc}", file=sys.stderr)
        return 1
    print(f"campaign {args.campaign}: {len(paths)} {args.format} files in {out}")
    for path in paths:
        print(f"  {path}")
    return 0
