"""What a campaign learns beyond its declarations, on a simulated bench in this process (no
Ray): the dry run's refusals reach the optimizer with the rule that refused them, every
proposal is journaled with the feasibility model's prediction, and the report shows the
predictions against what happened.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from reference import local_bench

from bridge.report import write_report
from loops.campaign import CampaignRunner
from loops.journal import Journal
from loops.program import Program, load_program

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
RULE = "vial.volume.max"


def overfilling_program(experiments: int) -> Program:
    """The colour-match example with dye volumes 0.5-1.5 mL each and no constraint on their
    total: many points overfill the vial, which only the safety layer's dry run knows."""
    base = load_program(EXAMPLE)
    params = tuple(
        dataclasses.replace(p, low=0.5, high=1.5) if p.name.endswith("_ml") else p
        for p in base.parameters
    )
    return dataclasses.replace(
        base,
        parameters=params,
        constraints=(),
        initial_points=4,
        seed=3,
        budget=dataclasses.replace(base.budget, experiments=experiments),
        stop=dataclasses.replace(base.stop, target=None),
    )


@pytest.mark.timeout(120)
async def test_refusals_are_learned_by_rule_and_predictions_journaled_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with local_bench(tmp_path, monkeypatch) as b:
        runner = CampaignRunner(
            overfilling_program(3),
            b.journal,
            {"bench-a": b.station},
            campaign_id="learn",
            clock_now=b.now,
        )
        await runner.prepare()
        summary = await runner.run()
        state = runner.optimizer.state()
    assert summary.counts["rejected"] >= 1, summary
    refused = [o for o in state["observations"] if o["status"] == "infeasible"]
    assert refused and all(RULE in state["rules"][o["id"]] for o in refused), state["rules"]
    j = Journal(b.lab.store)
    try:
        exps = j.experiments("learn")
        predictions: dict[str, dict[str, Any]] = {}
        rules: dict[str, list[str]] = {}
        for e in exps:
            for t in j.transitions(e.id):
                data = t.data if isinstance(t.data, dict) else {}
                if t.state == "proposed" and "data" in data:
                    predictions[e.id] = data["data"]["feasibility"]
                if t.state == "rejected":
                    rules[e.id] = data["data"]["rules"]
    finally:
        j.close()
    assert set(predictions) == {e.id for e in exps}  # every proposal carries one
    assert all(rules[e.id] == [RULE] for e in exps if e.state == "rejected"), rules
    first_refusal = next(i for i, e in enumerate(exps) if e.state == "rejected")
    assert predictions[exps[0].id]["p_feasible"] == 1.0  # nothing learned yet
    later = [predictions[e.id] for e in exps[first_refusal + 1 :]]
    assert later and all(RULE in p["by_rule"] for p in later), later
    page = write_report(b.lab.store, "learn", tmp_path / "report").read_text()
    assert "Learned feasibility" in page
    assert f"refused by {RULE}" in page
