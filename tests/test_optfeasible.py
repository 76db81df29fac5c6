"""Learned feasibility (loops/optfeasible.py and its hooks in the strategies): refusals by
rule, trips and unverified results make a classifier per cause; the acquisition is weighted
by the probability of no trouble, so proposals stay out of the region; predictions are
explained per rule and survive a save/restore (rebuilt from the observations).

Unit tier: pure computation on small spaces, seeded, a few seconds in all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from loops.optbaselines import RandomSearch
from loops.optbayes import BayesOptimizer
from loops.optfeasible import FeasibilityModel, Labelled, causes_of, weigh
from loops.optimizer import optimizer_from_state
from loops.optmulti import ParetoOptimizer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import feasibility as feasibility_bench  # noqa: E402

SQUARE = {"x": (0.0, 1.0, float), "y": (0.0, 1.0, float)}


def grid_points(status_of) -> list[Labelled]:
    pts = []
    for x in np.linspace(0.05, 0.95, 7):
        for y in np.linspace(0.05, 0.95, 7):
            status, rules = status_of(x, y)
            pts.append(Labelled(np.array([x, y]), status, causes_of(status, rules)))
    return pts


def test_causes_of_each_status() -> None:
    assert causes_of("ok") == ()
    assert causes_of("infeasible") == ("refused",)
    assert causes_of("infeasible", ["a.max", "b.min", "a.max"]) == (
        "refused:a.max",
        "refused:b.min",
    )
    assert causes_of("failed", ["ignored"]) == ("failed",)
    assert causes_of("untrusted") == ("untrusted",)


def test_model_learns_each_rule_and_trips_apart() -> None:
    """Refusals by two rules in two corners and trips in a third: one classifier per cause,
    each high in its own corner only; the weight is low in all three, high in the middle."""

    def status_of(x: float, y: float) -> tuple[str, list[str]]:
        if x > 0.7 and y > 0.7:
            return "infeasible", ["heater.max_power"]
        if x < 0.3 and y > 0.7:
            return "infeasible", ["pump.max_rate"]
        if x > 0.7 and y < 0.3:
            return "failed", []
        return "ok", []

    m = FeasibilityModel(grid_points(status_of))
    assert set(m.models) == {"refused:heater.max_power", "refused:pump.max_rate", "failed"}
    corners = np.array([[0.9, 0.9], [0.1, 0.9], [0.9, 0.1], [0.5, 0.4]])
    p = m.probabilities(corners)
    assert p["refused:heater.max_power"][0] > 0.5 > p["refused:heater.max_power"][1]
    assert p["refused:pump.max_rate"][1] > 0.5 > p["refused:pump.max_rate"][0]
    assert p["failed"][2] > 0.5 > p["failed"][0]
    w = m.weight(corners)
    assert w[3] > 0.5 and max(w[:3]) < 0.5
    e = m.explain(np.array([0.9, 0.9]))
    assert e["rule"] == "heater.max_power" and e["p_refused"] > 0.5
    assert set(e["by_rule"]) == {"heater.max_power", "pump.max_rate"}
    assert e["learned_from"] == 49
    json.dumps(e)  # journaled as is


def test_failures_learn_only_from_points_that_ran() -> None:
    """A refused point never ran: it says nothing about trips (not in the 'failed' model's
    data), and a cause with only trouble in its data has no model (nothing to tell apart)."""
    pts = [
        Labelled(np.array([0.1, 0.1]), "infeasible", ("refused",)),
        Labelled(np.array([0.9, 0.9]), "failed", ("failed",)),
    ]
    m = FeasibilityModel(pts)
    assert m.support == {"refused": (2, 1), "failed": (1, 1)}
    assert set(m.models) == {"refused"}


def test_nothing_learned_weighs_one() -> None:
    m = FeasibilityModel([Labelled(np.array([0.5, 0.5]), "ok", ())])
    assert m.empty
    assert m.weight(np.random.default_rng(0).uniform(size=(5, 2))).tolist() == [1.0] * 5
    assert m.explain(np.array([0.5, 0.5]))["p_feasible"] == 1.0
    with pytest.raises(ValueError, match="max_points"):
        FeasibilityModel([], max_points=1)


def test_weigh_ranks_likely_trouble_worse() -> None:
    """Minimised values: -EI shrinks towards 0, a positive value grows; weight 1 is neutral."""
    v = np.array([-2.0, -2.0, 3.0, 3.0])
    w = np.array([1.0, 0.25, 1.0, 0.5])
    assert weigh(v, w).tolist() == [-2.0, -0.5, 3.0, 6.0]


def test_strategy_weight_rules_and_state_round_trip() -> None:
    """A strategy told refusals by rule predicts them, says so per proposal, and a restored
    one (the model rebuilt from the saved observations and rules) predicts the same."""
    opt = RandomSearch(SQUARE, seed=3)
    X = np.array([[0.9, 0.5], [0.1, 0.5]])
    assert opt.acquisition_weight(X).tolist() == [1.0, 1.0]
    for x in np.linspace(0.05, 0.95, 10):
        for y in (0.2, 0.8):
            if x > 0.6:
                opt.tell({"x": x, "y": y}, None, status="infeasible", rules=["stirrer.max_rpm"])
            else:
                opt.tell({"x": x, "y": y}, float(x + y))
    w = opt.acquisition_weight(X)
    assert w[0] < 0.5 < w[1]
    pred = opt.feasibility({"x": 0.9, "y": 0.5})
    assert pred["rule"] == "stirrer.max_rpm" and pred["p_refused"] > 0.5
    state = json.loads(json.dumps(opt.state()))
    assert state["rules"] and state["learn_feasibility"] is True
    back = optimizer_from_state(SQUARE, state)
    assert back.feasibility({"x": 0.9, "y": 0.5}) == pred
    np.testing.assert_allclose(back.acquisition_weight(X), w)
    back.learn_feasibility = False
    assert back.acquisition_weight(X).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="rules must be"):
        opt.tell({"x": 0.5, "y": 0.5}, None, status="infeasible", rules="stirrer.max_rpm")


class _SteeredBayes(BayesOptimizer):
    """The Bayesian strategy with a fixed weight in place of the learned one: 0.05 on one
    half of the square (the hook's contract, without the classifier's fit)."""

    low_left = True

    def acquisition_weight(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        low = X[:, 0] < 0.5 if self.low_left else X[:, 0] > 0.5
        return np.where(low, 0.05, 1.0)


@pytest.mark.parametrize("low_left", [True, False])
def test_bayes_acquisition_is_weighted(low_left: bool) -> None:
    """Symmetric data (the best values at both edges): the proposals go to the side the
    weight favours, pending points included."""
    opt = _SteeredBayes(SQUARE, direction="maximize", seed=0, initial_points=0)
    opt.low_left = low_left
    for x in np.linspace(0.1, 0.9, 5):
        for y in np.linspace(0.1, 0.9, 3):
            opt.tell({"x": x, "y": y}, float((x - 0.5) ** 2))
    xs = [float(opt.ask().params["x"]) for _ in range(3)]
    assert all((x > 0.5) == low_left for x in xs), xs


def test_pareto_passes_rules_and_weight_through() -> None:
    inner = BayesOptimizer(SQUARE, direction="minimize", seed=1, initial_points=3)
    opt = ParetoOptimizer(inner, ["minimize", "minimize"], seed=1)
    for x in np.linspace(0.05, 0.95, 8):
        if x > 0.6:
            opt.tell({"x": x, "y": 0.5}, None, status="infeasible", rules=["oven.max_temp"])
        else:
            opt.tell({"x": x, "y": 0.5}, [x, 1 - x])
    assert opt.feasibility({"x": 0.9, "y": 0.5})["rule"] == "oven.max_temp"
    p = opt.ask()  # rebuilt inner strategy keeps the rules (and the fitted model)
    assert opt.inner._rules and opt.acquisition_weight(np.array([[0.95, 0.5]]))[0] < 0.5
    assert float(p.params["x"]) <= 0.6 + 0.05


def test_benchmark_problem_and_one_short_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/feasibility.py: the trouble region as documented, and a short run of both
    arms that prints and writes what it counted (the full run's numbers: docs/optimizer.md)."""
    names = [f"x{i}" for i in range(1, 7)]
    assert feasibility_bench.trouble(dict.fromkeys(names, 0.5)) is None
    assert feasibility_bench.trouble({**dict.fromkeys(names, 0.5), "x1": 0.7, "x2": 0.7}) == (
        "refused"
    )
    local = dict(zip(names, feasibility_bench._LOCAL.tolist(), strict=True))
    assert feasibility_bench.trouble(local) == "failed"
    out = tmp_path / "feasibility.json"
    assert feasibility_bench.main(["--seeds", "1", "--evals", "13", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "learned" in printed and "off" in printed
    doc = json.loads(out.read_text())
    assert doc["versions"]["scikit-learn"] and len(doc["runs"]) == 2
    for run in doc["runs"]:
        assert run["design_trouble"] + run["model_trouble"] == run["refused"] + run["failed"]
        assert run["best"] >= feasibility_bench.HARTMANN6.minimum
    with pytest.raises(SystemExit):
        feasibility_bench.main(["--evals", "12"])  # no model phase: refused by name
    assert "--evals > 12" in capsys.readouterr().err


def test_window_keeps_old_trouble_and_bounds_the_fit() -> None:
    """Past ``max_points`` a classifier keeps the troubled points (up to half of it) and the
    most recent others: an early refusal is not forgotten after many clean points."""
    early = [Labelled(np.array([0.95, 0.95]), "infeasible", ("refused:r",))]
    clean = [
        Labelled(np.array([x, y]), "ok", ())
        for x in np.linspace(0.0, 0.7, 6)
        for y in np.linspace(0.0, 0.7, 5)
    ]
    m = FeasibilityModel(early + clean, max_points=10)
    assert m.support["refused:r"] == (10, 1)
    assert m.probabilities(np.array([[0.95, 0.95]]))["refused:r"][0] > 0.5


def test_a_classifier_that_cannot_be_fitted_weighs_nothing_and_says_why() -> None:
    """A fit that fails (here: a non-finite point) leaves that cause without a model, named
    in every prediction, instead of failing the ask."""
    pts = [
        Labelled(np.array([np.nan, 0.5]), "failed", ("failed",)),
        Labelled(np.array([0.5, 0.5]), "ok", ()),
    ]
    m = FeasibilityModel(pts)
    assert m.empty and "failed" in m.unfitted
    assert m.weight(np.array([[0.2, 0.2]])).tolist() == [1.0]
    assert "failed" in m.explain(np.array([0.2, 0.2]))["not_fitted"]
