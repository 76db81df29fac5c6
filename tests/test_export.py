"""``labbridge export`` (bridge/export.py): a campaign's journal as CSV or Parquet tables.

The campaign is written through the journal exactly as the campaign runner
writes it (see ``build_campaign`` in test_report.py: verified, unverified and
failed experiments, a rejected agent proposal, refused guard verdicts, images
by hash); every exported row and column is checked against the journal.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from test_report import Built, Scenes, build_campaign, make_scenes

from bridge.export import (
    CampaignDataError,
    add_export_parser,
    export,
    export_command,
    safe_name,
)
from loops.journal import Journal

PARAMETERS = ("red_ml", "green_ml", "blue_ml", "temperature_c", "hold_s")


@pytest.fixture(scope="module")
def scenes() -> Scenes:
    return make_scenes()


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, scenes: Scenes) -> Built:
    return build_campaign(tmp_path_factory.mktemp("runs"), scenes, "exp/1")


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def as_text(value: Any) -> str:
    """How the csv module writes a journal value (None -> empty)."""
    return "" if value is None else str(value)


def test_csv_has_one_row_per_experiment_transition_and_verdict(
    campaign: Built, tmp_path: Path
) -> None:
    paths = export(campaign.journal, campaign.campaign_id, "csv", tmp_path / "out")
    assert [p.name for p in paths] == [
        "exp_1-experiments.csv",
        "exp_1-transitions.csv",
        "exp_1-verdicts.csv",
    ]
    j = Journal(campaign.journal)
    try:
        exps = j.experiments(campaign.campaign_id)
        log = j.campaign_log(campaign.campaign_id)
        verdicts = j.verdicts(campaign.campaign_id)
        images = {e.id: j.images(e.id) for e in exps}
    finally:
        j.close()

    columns, rows = read_csv(paths[0])
    assert len(rows) == len(exps) == 9
    assert columns[:5] == ["experiment_id", "seq", "state", "proposer", "station"]
    assert columns[5:10] == [f"param.{p}" for p in PARAMETERS]  # the program's order
    for needed in (
        "objective",
        "verified",
        "reason",
        "elapsed_s",
        "measure.delta_e2000",
        "measure.dispensed_ml.red",
        "measure.lab.0",
        "measure.counts.status",
        "check.fill.value",
        "check.fill.values.camera.fill_ml",
        "check.fill.ok",
        "check.colour.value",
        "check.scene.ok",
        "image.outcome",
        "image.reference",
        "created",
        "updated",
    ):
        assert needed in columns, needed
    assert len(set(columns)) == len(columns)
    for e, row in zip(exps, rows, strict=True):
        assert row["experiment_id"] == e.id and row["seq"] == str(e.seq)
        assert row["state"] == e.state and row["proposer"] == e.proposer
        assert row["station"] == as_text(e.station)
        for p in PARAMETERS:
            assert row[f"param.{p}"] == str(e.params[p])
        assert row["objective"] == as_text(e.objective)
        if e.objective is not None:
            assert float(row["objective"]) == e.objective  # round-trips exactly
        assert row["verified"] == as_text(e.verified) and row["reason"] == as_text(e.reason)
        result = e.result or {}
        measurements = result.get("measurements", {})
        assert row["measure.delta_e2000"] == as_text(measurements.get("delta_e2000"))
        dispensed = measurements.get("dispensed_ml", {})
        assert row["measure.dispensed_ml.red"] == as_text(dispensed.get("red"))
        assert row["measure.lab.2"] == as_text((measurements.get("lab") or [None] * 3)[2])
        fill = (result.get("verification") or {}).get("checks", {}).get("fill", {})
        assert row["check.fill.value"] == as_text(fill.get("value"))
        assert row["check.fill.ok"] == as_text(fill.get("ok"))
        assert row["image.outcome"] == as_text(images[e.id].get("outcome", {}).get("path"))
        assert float(row["created"]) == e.created
    states = [r["state"] for r in rows]
    assert states.count("rejected") == 1 and states.count("failed") == 1
    assert [r["verified"] for r in rows].count("False") == 2  # the clogged pump's

    columns, rows = read_csv(paths[1])
    assert columns == ["id", "experiment_id", "t", "event", "state", "step", "reason", "data"]
    assert len(rows) == len(log)
    for t, row in zip(log, rows, strict=True):
        assert row["id"] == str(t.id) and row["experiment_id"] == as_text(t.experiment_id)
        assert (row["event"], row["state"], row["step"]) == (t.event, t.state, as_text(t.step))
        assert json.loads(row["data"]) == t.data if t.data is not None else row["data"] == ""
    assert campaign.stop_reason in [r["reason"] for r in rows if r["event"] == "campaign"]
    assert sorted(r["reason"] for r in rows if r["state"] == "failed") == sorted(
        campaign.failure_reasons
    )

    columns, rows = read_csv(paths[2])
    assert columns[:7] == ["id", "experiment_id", "station", "t", "who", "instrument", "action"]
    assert len(rows) == len(verdicts)
    refused = [r for r in rows if r["allowed"] == "False"]
    assert [r["reason"] for r in refused] == campaign.refusal_reasons
    assert {(r["instrument"], r["action"], r["rule"]) for r in refused} == {
        ("hotplate", "set_heater", "heater-needs-stirring-and-closed-lid")
    }
    assert json.loads(refused[0]["params"]) == {"on": True, "setpoint_c": 60.0}


def test_parquet_round_trips_with_pyarrow(campaign: Built, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    csv_paths = export(campaign.journal, campaign.campaign_id, "csv", tmp_path / "csv")
    pq_paths = export(campaign.journal, campaign.campaign_id, "parquet", tmp_path / "pq")
    assert [p.suffix for p in pq_paths] == [".parquet"] * 3
    for csv_path, pq_path in zip(csv_paths, pq_paths, strict=True):
        table = pq.read_table(pq_path)
        columns, rows = read_csv(csv_path)
        assert table.column_names == columns
        assert table.num_rows == len(rows)
        meta = table.schema.metadata
        assert meta[b"labbridge.campaign"] == b"exp/1"
        assert meta[b"labbridge.table"] == csv_path.stem.split("-", 1)[1].encode()
        for pq_row, csv_row in zip(table.to_pylist(), rows, strict=True):
            for column in columns:  # the same values, typed
                value = pq_row[column]
                text = csv_row[column]
                if isinstance(value, float):
                    assert (math.isnan(value) and text == "nan") or float(text) == value, column
                else:
                    assert as_text(value) == text, (column, value, text)
    experiments = pq.read_table(pq_paths[0])
    types = {f.name: str(f.type) for f in experiments.schema}
    assert types["seq"] == "int64" and types["param.hold_s"] == "int64"
    assert types["objective"] == "double" and types["param.red_ml"] == "double"
    assert types["verified"] == "bool" and types["check.fill.ok"] == "bool"
    assert types["state"] == "string" and types["image.outcome"] == "string"
    objective = experiments.column("objective").to_pylist()
    assert objective.count(None) == 2  # rejected and failed: no objective, not 0


def test_parquet_without_pyarrow_is_a_clear_error_and_writes_nothing(
    campaign: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        CampaignDataError, match="Parquet export needs pyarrow.*pip install pyarrow"
    ):
        export(campaign.journal, campaign.campaign_id, "parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_campaign_without_experiments_exports_headers_only(
    tmp_path: Path, scenes: Scenes
) -> None:
    built = build_campaign(
        tmp_path, scenes, "empty", done=0, unverified=0, failed=0, rejected=0, refusals=0
    )
    paths = export(built.journal, "empty", "csv", tmp_path / "out")
    columns, rows = read_csv(paths[0])
    assert rows == [] and columns[:5] == ["experiment_id", "seq", "state", "proposer", "station"]
    assert columns[5:10] == [f"param.{p}" for p in PARAMETERS]  # the program's, still
    assert not any(c.startswith(("measure.", "check.", "image.")) for c in columns)
    _, log = read_csv(paths[1])
    assert [r["state"] for r in log] == ["running", "stopped"]  # created, then stopped
    assert read_csv(paths[2])[1] == []


def test_errors_name_the_problem(campaign: Built, tmp_path: Path) -> None:
    with pytest.raises(
        CampaignDataError, match="unknown export format 'xlsx'; one of csv, parquet"
    ):
        export(campaign.journal, campaign.campaign_id, "xlsx", tmp_path)
    with pytest.raises(CampaignDataError, match=r"no journal at .*missing\.db"):
        export(tmp_path / "missing.db", "x", "csv", tmp_path)
    with pytest.raises(CampaignDataError, match=r"no campaign 'x' in journal .*; it has 1: exp/1"):
        export(campaign.journal, "x", "csv", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CampaignDataError, match="cannot create the output folder"):
        export(campaign.journal, campaign.campaign_id, "csv", blocker / "sub")
    assert safe_name("a/b c:d") == "a_b_c_d" and safe_name("..") == "campaign"


# ------------------------------------------------------------------------- CLI
def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labbridge")
    add_export_parser(parser.add_subparsers(dest="command"))
    return export_command(parser.parse_args(argv))


def test_cli_writes_next_to_the_journal_and_lists_the_files(
    tmp_path: Path, scenes: Scenes, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build_campaign(tmp_path, scenes, "c1", done=1, unverified=0, failed=0, rejected=0)
    assert cli(["export", "c1", "--format", "csv", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "c1" / "export"
    assert f"campaign c1: 3 csv files in {folder}" in out
    for table in ("experiments", "transitions", "verdicts"):
        path = folder / f"c1-{table}.csv"
        assert path.is_file() and str(path) in out
    assert cli(["export", "c1", "--format", "csv", "--journal", str(built.journal)]) == 0
    assert (
        cli(
            [
                "export",
                "c1",
                "--format",
                "csv",
                "--journal",
                str(built.journal),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 0
    )
    assert (tmp_path / "x" / "c1-verdicts.csv").is_file()


def test_cli_errors_exit_1_and_help(
    campaign: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["export", "ghost", "--format", "csv", "--runs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"labbridge export: no journal at {tmp_path / 'ghost' / 'journal.db'}" in err
    assert cli(["export", "ghost", "--format", "csv", "--journal", str(campaign.journal)]) == 1
    assert "no campaign 'ghost'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli(["export", "c", "--format", "xls"])
    assert info.value.code == 2 and "invalid choice: 'xls'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli(["export", "c"])
    assert info.value.code == 2 and "--format" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli(["export", "--help"])
    assert info.value.code == 0 and "--format {csv,parquet}" in capsys.readouterr().out
