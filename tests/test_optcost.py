"""Cost-aware asks (program.md ``cost:``): the plan's exact cost of a point
(loops/plancost.py, the colour-match program on the reference bench's declarations), the cost
model that stands in for it in the acquisition (loops/optcost.py), a cheaper region preferred
at equal improvement, the program key and its one-line errors, and a campaign on the
simulated bench that journals each proposal's predicted and exact cost and reports them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import local_bench
from test_program import BASE

from bridge.campaigns import plan_costs
from bridge.cli import main
from bridge.labconfig import load_lab
from bridge.reportdata import read_report_data
from bridge.reportlearned import cost_html
from loops.campaign import CampaignRunner, make_optimizer
from loops.campaignbook import attach_cost, restore_optimizer
from loops.journal import Journal
from loops.optbayes import BayesOptimizer
from loops.optcost import CostModel, CostSpec
from loops.optspace import ParamSpace
from loops.plancost import CostError, station_cost
from loops.program import Program, ProgramError, load_program

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import cost as cost_bench  # noqa: E402

EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
LAB = ROOT / "examples" / "lab-hardware.yaml"
POINT = {"red_ml": 0.5, "green_ml": 0.3, "blue_ml": 0.9, "temperature_c": 60.0, "hold_s": 300}


def colour_match(of: str | None, experiments: int = 60) -> Program:
    base = load_program(EXAMPLE)
    return dataclasses.replace(
        base,
        cost=None if of is None else CostSpec(of),
        initial_points=min(base.initial_points, experiments),
        budget=dataclasses.replace(base.budget, experiments=experiments),
        stop=dataclasses.replace(base.stop, target=None),
    )


def exact_cost(of: str) -> Any:
    st = next(iter(load_lab(LAB).stations.values()))
    return station_cost(colour_match(of), st.instruments, st.envelope_text, source="bench.yaml")


def test_the_cost_of_a_point_is_its_plans() -> None:
    """Duration by hand from the program's recipe: the dyes at 5 mL/min (together), the ramp
    from 25 degC at 10 degC/min, the hold, the drain of everything + 0.2 mL at 20 mL/min."""
    minutes = max(0.5, 0.3, 0.9) / 5.0 + (60.0 - 25.0) / 10.0 + 300 / 60 + (1.7 + 0.2) / 20.0
    assert exact_cost("duration")(POINT) == pytest.approx(minutes, abs=1e-9)
    assert exact_cost("blue.delivered")(POINT) == pytest.approx(0.9)
    assert exact_cost("vial.added")(POINT) == pytest.approx(1.7)
    assert exact_cost("waste.withdrawn")(POINT) == pytest.approx(1.9)
    # the program's constraints exclude it: no cost (never proposed, never costed)
    assert exact_cost("duration")({**POINT, "red_ml": 0.0, "green_ml": 0.0, "blue_ml": 0.1}) is None


def test_the_model_is_exact_at_costed_points_and_close_between() -> None:
    program = colour_match("duration")
    space = ParamSpace.of(program.space)
    exact = exact_cost("duration")
    model = CostModel(space, exact, CostSpec("duration"), seed=1)
    assert 20 <= model.design_points <= 28  # the Latin hypercube less what constraints exclude
    costed = [(x, c) for x, c in model._costed.values()]
    predicted = model.predict(np.vstack([x for x, _ in costed]))
    assert predicted == pytest.approx([c for _, c in costed], rel=1e-3)
    said = model.explain(POINT)  # predicted before it is costed, then costed exactly
    assert said["exact"] == pytest.approx(exact(POINT), abs=1e-4)
    assert abs(said["predicted"] - said["exact"]) < 0.1 * said["exact"], said
    assert model.costed == model.design_points + 1
    assert model.predict(space.to_unit(POINT)[None, :])[0] == pytest.approx(said["exact"], rel=1e-3)
    w = model.weight(np.vstack([x for x, _ in costed]))
    assert w.max() == pytest.approx(1.0) and w.min() > 0  # 1 at the cheapest costed point


def test_a_cheaper_region_is_preferred_at_equal_improvement() -> None:
    """The objective does not depend on x, the cost grows twentyfold along it: with the cost
    model the proposals after the design go to the cheap end more often and cost less in all
    (4 seeds x 4 proposals). Not every one: once the GP is sure of the bowl, log EI is so
    steep in y that the search's best y, not the cost, decides some proposals."""
    space = ParamSpace.of({"x": (0.0, 1.0), "y": (0.0, 1.0)})

    def proposals(cost: bool) -> list[float]:
        xs = []
        for seed in range(4):
            opt = BayesOptimizer(space, seed=seed, initial_points=4)
            if cost:
                opt.cost_model = CostModel(space, lambda p: 1 + 19 * p["x"], CostSpec("duration"))
            for i in range(8):
                q = opt.ask()
                if i >= 4:
                    xs.append(q.params["x"])
                opt.tell(q.id, (q.params["y"] - 0.3) ** 2)
        return xs

    def minutes(xs: list[float]) -> float:
        return sum(1 + 19 * x for x in xs)

    with_cost, without = proposals(cost=True), proposals(cost=False)
    cheap = sum(x < 0.1 for x in with_cost)
    assert cheap > sum(x < 0.1 for x in without), (with_cost, without)
    assert cheap >= 0.6 * len(with_cost), with_cost
    assert minutes(with_cost) < 0.8 * minutes(without), (with_cost, without)


def test_the_weight_reaches_the_strategy_also_restored_and_with_several_objectives() -> None:
    """The campaign attaches the model to the strategy whose acquisition it weighs (the inner
    one with several objectives) and keeps it across a restore (it is not in the state)."""
    for path in (EXAMPLE, ROOT / "examples" / "color-match-pareto" / "program.md"):
        program = load_program(path)
        opt = make_optimizer(program)
        space = ParamSpace.of(program.space)
        model = CostModel(space, lambda p: 1.0 + p["hold_s"] / 60, CostSpec("duration"))
        attach_cost(opt, model)
        short = {p.name: p.middle() for p in program.parameters}
        quick, slow = (
            space.to_unit({**short, "hold_s": 30}),
            space.to_unit({**short, "hold_s": 300}),
        )
        restored = restore_optimizer(opt, opt.state())
        assert restored is not opt
        for strategy in (opt, restored):
            w = strategy.acquisition_weight(np.vstack([quick, slow]))
            assert w[0] > 3 * w[1], (path.name, w)


def test_program_key_round_trips() -> None:
    p = load_program(BASE.replace("seed: 1", "seed: 1\ncost: duration"), source="demo.md")
    assert p.cost == CostSpec("duration") and p.cost.unit == "min"
    assert load_program(p.to_markdown()).cost == p.cost
    text = BASE.replace("seed: 1", "seed: 1\ncost: {of: red.delivered, power: 0.5}")
    q = load_program(text, source="demo.md")
    assert q.cost == CostSpec("red.delivered", 0.5) and q.cost.unit == "mL"
    assert load_program(q.to_markdown()).cost == q.cost
    assert load_program(BASE).cost is None


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("cost: durration", "must be duration, or <pump>.delivered"),
        ("cost: dye.delivered", "the recipe calls no instrument 'dye'"),
        ("cost: {of: duration, powr: 2}", r"unknown key 'powr' \(known: of, power\)"),
        ("cost: {of: duration, power: 0}", "must be > 0"),
        ("cost: {power: 2}", "needs of: duration"),
    ],
)
def test_a_typo_is_a_one_line_error(line: str, words: str) -> None:
    with pytest.raises(ProgramError, match=words) as info:
        load_program(BASE.replace("seed: 1", f"seed: 1\n{line}"), source="demo.md")
    assert "\n" not in str(info.value)
    if "of:" not in line and "power" not in line:  # the choices, with the recipe's instruments
        assert "the recipe calls: blue, color, green, hotplate, red)" in str(info.value)


def test_a_channel_the_station_has_not_names_those_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CostError) as info:
        exact_cost("hotplate.delivered")
    assert "\n" not in str(info.value)
    assert "choose one of: duration, blue.delivered, vial.added" in str(info.value)
    with pytest.raises(ValueError, match="needs the plan's costs on a station"):
        CampaignRunner(colour_match("duration"), None, {"a": None}, campaign_id="x")  # type: ignore[arg-type]
    # labbridge check --program says so before a campaign starts
    text = EXAMPLE.read_text().replace("seed: 1\n", "seed: 1\ncost: hotplate.delivered\n")
    (tmp_path / "program.md").write_text(text)
    assert main(["check", str(LAB), "--program", str(tmp_path / "program.md")]) != 0
    said = capsys.readouterr()
    assert "cost: 'hotplate.delivered' is not a cost of this station" in said.out + said.err


@pytest.mark.timeout(120)
async def test_a_campaign_journals_predicted_costs_and_reports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = colour_match("duration", experiments=3)  # short plans: a few bench minutes each
    narrow = {"temperature_c": (25.0, 40.0), "hold_s": (30, 60)}
    program = dataclasses.replace(
        short,
        initial_points=2,
        parameters=tuple(
            dataclasses.replace(p, low=narrow[p.name][0], high=narrow[p.name][1])
            if p.name in narrow
            else p
            for p in short.parameters
        ),
    )
    async with local_bench(tmp_path, monkeypatch) as b:
        runner = CampaignRunner(
            program,
            b.journal,
            {"bench-a": b.station},
            campaign_id="costly",
            clock_now=b.now,
            cost=plan_costs(b.lab, program, ["bench-a"]),
        )
        await runner.prepare()
        summary = await runner.run()
    assert summary.counts["done"] + summary.counts["failed"] == 3, summary
    j = Journal(b.lab.store)
    try:
        costs = {}
        for e in j.experiments("costly"):
            for t in j.transitions(e.id):
                if t.state == "proposed":
                    costs[e.id] = t.data["data"]["cost"]  # type: ignore[index]
        assert len(costs) == 3
        for e in j.experiments("costly"):
            c = costs[e.id]
            assert c["of"] == "duration" and c["unit"] == "min", c
            assert c["exact"] == pytest.approx(exact_cost("duration")(e.params), abs=1e-4), c
            assert abs(c["predicted"] - c["exact"]) < 0.25 * c["exact"], (e.id, c)
        # the report's part (bridge/report.py puts it under "Cost spent against improvement";
        # the whole page draws plots for seconds: test_report.py)
        part = "".join(cost_html(read_report_data(j, "costly")))
    finally:
        j.close()
    total = sum(c["exact"] for c in costs.values())
    assert f"3 experiments ran for {total:.4g} min in total" in part, part
    assert "within" in part and "% of the plan's exact cost (median)" in part
    assert part.count("<tr>") >= 2, part  # the header and at least the final row


def test_benchmark_problems_and_one_short_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/cost.py: the problems as documented, and a short run of both arms that
    prints and writes what it counted (the full run's numbers: docs/optimizer.md)."""
    assert cost_bench.minutes({"x": 0.0, "y": 0.5}) == 1.0
    assert cost_bench.minutes({"x": 1.0, "y": 0.5}) == 17.0
    two = cost_bench.PROBLEMS["two-basins"]
    assert two({"x": 0.15, "y": 0.7}) == two({"x": 0.85, "y": 0.3}) == -1.0
    assert two({"x": 0.5, "y": 0.5}) > cost_bench.TARGET
    out = tmp_path / "cost.json"
    argv = ["--seeds", "1", "--evals", "6", "--problem", "two-basins", "--out", str(out)]
    assert cost_bench.main(argv) == 0
    assert "two-basins     duration" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["versions"]["scikit-learn"] and len(doc["runs"]) == 2
    for run in doc["runs"]:
        assert 1.0 * run["experiments"] <= run["minutes"] <= 17.0 * run["experiments"]
    with pytest.raises(SystemExit):
        cost_bench.main(["--evals", "4"])  # no model phase: refused by name
    assert "--evals > 4" in capsys.readouterr().err
