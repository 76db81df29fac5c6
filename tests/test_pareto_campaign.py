"""The Pareto example (examples/color-match-pareto): two objectives, a categorical and an
ordinal parameter, and a region the program does not declare but the bench refuses, run
as a campaign on the simulated bench in this process, resumed from its journal, and
reported with its front."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from reference import local_bench

from bridge.report import write_report
from bridge.reportpareto import PARETO
from loops.campaign import CampaignRunner
from loops.journal import Journal
from loops.optmulti import ParetoOptimizer
from loops.pareto import dominates, min_frame
from loops.program import load_program

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match-pareto" / "program.md"


@pytest.mark.timeout(240)
async def test_the_pareto_example_runs_on_the_simulated_bench_to_a_front_in_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = load_program(EXAMPLE)
    assert base.multi and [p.type for p in base.parameters][-2:] == ["categorical", "ordinal"]
    program = dataclasses.replace(
        base, budget=dataclasses.replace(base.budget, experiments=6), initial_points=4
    )
    events: list[dict[str, Any]] = []
    async with local_bench(tmp_path, monkeypatch) as b:
        runner = CampaignRunner(
            program,
            b.journal,
            {"bench-a": b.station},
            campaign_id="pareto",
            clock_now=b.now,
            on_event=events.append,
        )
        summary = await runner.run()
        store = b.lab.store
    assert summary.state == "done" and summary.counts["run"] == 6, summary
    opt = runner.optimizer
    assert isinstance(opt, ParetoOptimizer)
    j = Journal(store)
    try:
        exps = j.experiments("pareto")
        saved = j.campaign("pareto").optimizer_state
    finally:
        j.close()
    done = [e for e in exps if e.state == "done"]
    assert len(done) == 6
    for e in done:  # both objectives measured; the categorical value as listed
        m = e.result["measurements"]
        assert e.objective == m["delta_e2000"] and 0.0 < m["dye_ml"] <= 2.8
        assert e.params["heating"] in ("none", "gentle", "strong")
        assert e.params["hold_s"] in (30, 120, 300)
    # the bench refused the vial's limit the program does not declare (seed 3's design
    # has one point there): journaled with the rule, told to the optimizer as infeasible
    rejected = [e for e in exps if e.state == "rejected"]
    assert rejected and all(
        e.params["red_ml"] + e.params["green_ml"] + e.params["blue_ml"] > 2.8 for e in rejected
    )
    assert any("vial.volume" in (e.reason or "") for e in rejected)
    statuses = {o.id: o.status for o in opt.observations()}
    assert sorted(statuses.values()).count("infeasible") == len(rejected)
    # the optimizer's front is the journal's: no done result dominates a front point
    front = opt.front()
    vectors = [
        (e.result["measurements"]["delta_e2000"], e.result["measurements"]["dye_ml"]) for e in done
    ]
    assert front and {tuple(v) for _, v in front} <= set(vectors)
    directions = ["minimize", "minimize"]
    for _, v in front:
        assert not any(
            dominates(min_frame([w], directions)[0], min_frame([v], directions)[0]) for w in vectors
        )
    # the saved state restores to the same optimizer: same next proposal
    assert saved is not None and saved["optimizer"]["strategy"] == "pareto"
    again = ParetoOptimizer.from_state(
        opt.space, saved["optimizer"], inner=type(opt.inner), constraints=opt.constraints
    )
    assert again.ask().params == opt.ask().params

    page = write_report(store, "pareto", tmp_path / "report").read_text()
    assert (tmp_path / "report" / PARETO).stat().st_size > 0
    assert '<h2 id="pareto">Pareto front</h2>' in page
    shown = re.search(r"(\d+) of (\d+) trusted results are on the Pareto front", page)
    assert shown is not None and shown.groups() == (str(len(front)), "6")
    assert re.search(
        r"Hypervolume after 6 experiments: [0-9.e+-]+, from the reference point "
        r"delta_e2000 6 \(its threshold\), dye_ml 2\.6 \(its threshold\)",
        page,
    ), page
    for params, _ in front:
        assert f"heating={params['heating']}" in page
