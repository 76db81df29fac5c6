"""Several objectives: the front and hypervolume (loops/pareto.py), the ParEGO optimizer
(loops/optmulti.py), program.md's objectives and Pareto stop rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loops.optehvi import ehvi_scorer, hvi2
from loops.optgp import FAST_TUNING, matern
from loops.optimizer import BayesOptimizer, Exhausted, GridSearch, RandomSearch
from loops.optmulti import ParetoOptimizer
from loops.pareto import chebyshev, hypervolume, min_frame, nondominated, reference_point
from loops.program import ProgramError, load_program

SPACE = {"x": (0.0, 1.0, float), "y": (0.0, 1.0, float), "c": ("categorical", ["a", "b"])}
MIN2 = ["minimize", "minimize"]


def two(p: dict) -> list[float]:
    """A front f2 = (1 - f1)^2 at y = 0 and c = a; c = b is worse on both."""
    pen = 0.0 if p["c"] == "a" else 0.3
    return [p["x"] + pen, (1.0 - p["x"]) ** 2 + p["y"] + pen]


def test_front_and_hypervolume_are_exact() -> None:
    y = min_frame([[2.1, 0.9], [1.5, 1.4], [3.0, 1.0]], MIN2)
    assert nondominated(y).tolist() == [True, True, False]
    assert hypervolume(y, [4.0, 2.0]) == pytest.approx(2.5 * 0.6 + 1.9 * 0.5)
    assert hypervolume(y, [1.0, 1.0]) == 0.0  # nothing better than the reference
    # maximised objectives are negated; 3-D: unit cubes stacked in a staircase
    assert min_frame([[1.0, 2.0]], ["maximize", "minimize"]).tolist() == [[-1.0, 2.0]]
    cubes = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [2.0, 2.0, 0.0]])
    assert hypervolume(cubes, [3.0, 3.0, 3.0]) == pytest.approx(
        3 * 2 * 1 + 2 * 3 * 1 - 2 * 2 * 1 + 1 * 1 * 2
    )
    assert reference_point(y, [None, 1.5]).tolist() == pytest.approx([3.0 + 0.15, 1.5])
    # Chebyshev: a point that is best on the weighted objective wins
    assert np.argmin(chebyshev([[0.0, 1.0], [1.0, 0.0]], [0.9, 0.1])) == 0


def test_the_pareto_optimizer_beats_random_search_on_hypervolume() -> None:
    def hv(opt: ParetoOptimizer) -> float:
        for _ in range(22):
            q = opt.ask()
            opt.tell(q.id, two(q.params))
        return hypervolume(min_frame([v for _, v in opt.front()], MIN2), [1.5, 2.5])

    bayes = ParetoOptimizer(BayesOptimizer(SPACE, seed=1, initial_points=6), MIN2, seed=1)
    rnd = ParetoOptimizer(RandomSearch(SPACE, 1), MIN2, seed=1)
    got, baseline = hv(bayes), hv(rnd)
    assert got > baseline
    assert all(p["c"] == "a" for p, _ in bayes.front())  # c = b is dominated everywhere


def test_pending_statuses_and_state_round_trip() -> None:
    opt = ParetoOptimizer(BayesOptimizer(SPACE, seed=2, initial_points=3), MIN2, seed=2)
    first = [opt.ask() for _ in range(3)]
    assert len({json.dumps(p.params, sort_keys=True) for p in first}) == 3
    opt.tell(first[0].id, two(first[0].params))
    opt.tell(first[1].id, None, status="infeasible")
    opt.tell(first[2].id, [9.0, 9.0], status="untrusted")
    with pytest.raises(ValueError, match="status 'ok' needs 2 finite values"):
        opt.tell({"x": 0.5, "y": 0.5, "c": "a"}, [1.0, float("nan")])
    with pytest.raises(ValueError, match="value has 3 numbers, the campaign 2 objectives"):
        opt.tell({"x": 0.5, "y": 0.5, "c": "a"}, [1.0, 2.0, 3.0])
    pending = [opt.ask() for _ in range(4)]  # model-based with pending points: distinct
    assert len({json.dumps(p.params, sort_keys=True) for p in pending}) == 4
    for p in pending[:2]:
        opt.tell(p.id, two(p.params))
    state = json.loads(json.dumps(opt.state()))
    again = ParetoOptimizer.from_state(SPACE, state, inner=BayesOptimizer)
    assert [o.status for o, _ in again.outcomes()] == [o.status for o, _ in opt.outcomes()]
    assert again.front() == opt.front()
    assert again.ask().params == opt.ask().params
    with pytest.raises(ValueError, match="not a 'pareto' state"):
        ParetoOptimizer.from_state(SPACE, opt.inner.state(), inner=BayesOptimizer)
    grid = ParetoOptimizer(GridSearch({"c": ("categorical", ["a", "b"])}, 2), MIN2)
    grid.tell(grid.ask().id, [1.0, 2.0])
    grid.tell(grid.ask().id, [2.0, 1.0])
    with pytest.raises(Exhausted):
        grid.ask()
    assert len(grid.front()) == 2


def test_a_cost_model_stays_on_the_inner_strategy_across_asks() -> None:
    """ParEGO rebuilds its inner strategy from its state at every ask; the cost model (the
    runner's, not part of the state) goes with it."""
    from loops.optcost import CostModel, CostSpec

    inner = RandomSearch(SPACE, 3)
    cost = CostModel(inner.space, lambda p: 1.0 + 16.0 * float(p["x"]), CostSpec("duration"))
    inner.cost_model = cost
    opt = ParetoOptimizer(inner, MIN2, seed=3)
    for _ in range(3):
        p = opt.ask()
        opt.tell(p.id, [float(p.params["x"]), float(p.params["y"])])
    opt.ask()
    assert opt.inner is not inner and opt.inner.cost_model is cost


def test_hypervolume_improvement_is_exact() -> None:
    rng = np.random.RandomState(0)
    front = rng.uniform(size=(7, 2))
    ref = np.array([1.1, 1.2])
    points = np.vstack([rng.uniform(-0.2, 1.3, size=(40, 2)), front[:2]])
    got = hvi2(points, front, ref)
    want = [hypervolume(np.vstack([front, p]), ref) - hypervolume(front, ref) for p in points]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-2:].tolist() == [0.0, 0.0]  # a front point adds nothing
    assert hvi2(np.array([[0.5, 0.5]]), np.empty((0, 2)), ref)[0] == pytest.approx(0.6 * 0.7)


def test_ehvi_prefers_extending_the_front_and_knows_pending_points() -> None:
    # f1 = a + b, f2 = 1 - a + b: the front is b = 0; a gap at a = 0.5 between the results
    X = np.array([[a, b] for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) for b in (0.0, 0.5, 1.0)])
    Y = np.column_stack([X[:, 0] + X[:, 1], 1.0 - X[:, 0] + X[:, 1]])
    gap, behind = np.array([[0.5, 0.0]]), np.array([[0.5, 0.6]])
    kw = {"kernel": matern(2), "tuning": FAST_TUNING, "fantasies": 4}
    score, scales = ehvi_scorer(X, Y, np.empty((0, 2)), rng=np.random.RandomState(0), **kw)
    assert scales.shape == (2,)
    assert score(gap)[0] > score(behind)[0]  # the gap extends the front, b = 0.6 is dominated
    assert score(gap)[0] > -1000.0 > score(behind)[0]  # a dominated mean: below every EHVI
    pending, _ = ehvi_scorer(X, Y, gap, rng=np.random.RandomState(0), **kw)
    assert pending(gap)[0] < score(gap)[0]  # a pending point there fills the gap already
    # the optimizer (EHVI by default) proposes in the gaps of the front (b = 0, a = 0.1, 0.3..)
    space = {"a": (0.0, 1.0), "b": (0.0, 1.0)}
    opt = ParetoOptimizer(BayesOptimizer(space, seed=3, initial_points=0), MIN2)
    for x, y in zip(X, Y, strict=True):
        opt.tell({"a": x[0], "b": x[1]}, list(y))
    assert opt.method == "ehvi"
    asks = [opt.ask().params for _ in range(4)]  # pending-aware: 4 different gaps filled
    assert all(p["b"] < 0.05 for p in asks)
    mids = (0.1, 0.3, 0.5, 0.7, 0.9)
    gaps = {m for p in asks for m in mids if abs(p["a"] - m) < 0.05}
    assert len(gaps) == 4
    assert ParetoOptimizer(RandomSearch(SPACE, 1), MIN2).method == "parego"
    with pytest.raises(ValueError, match="'ehvi' needs the Bayesian inner strategy"):
        ParetoOptimizer(RandomSearch(SPACE, 1), MIN2, acquisition="ehvi")
    with pytest.raises(ValueError, match="acquisition must be one of auto, ehvi, parego"):
        ParetoOptimizer(BayesOptimizer(SPACE), MIN2, acquisition="qehvi")


def _multi(objectives: str, stop: str = "") -> str:
    return f"""---
name: t
parameters:
  dose_ml: {{type: float, low: 0, high: 1}}
objectives:
{objectives}
budget: {{experiments: 10}}
{stop}
recipe:
  - compute: a
    expr: dose_ml * 2
  - compute: b
    expr: 1 - dose_ml
---
"""


OBJ = """  - {measure: a, direction: minimize, threshold: 0.5}
  - {measure: b, direction: maximize, threshold: 0.6}"""


def test_program_md_several_objectives_and_pareto_stop_rules() -> None:
    program = load_program(_multi(OBJ, "stop: {at_thresholds: true, no_improvement: 2}"))
    assert program.multi and [o.measure for o in program.goals] == ["a", "b"]
    assert program.objective.measure == "a" and program.goals[1].threshold == 0.6
    assert program.objective_values({"a": 0.2, "b": {"x": 1}}) is None
    assert program.objective_values({"a": 0.2, "b": 0.9}) == (0.2, 0.9)
    assert load_program(program.to_markdown()).goals == program.goals
    rule = program.stop_reason
    assert rule([1.0, 0.4], vectors=[(1.0, 0.9), (0.4, 0.7)]) == "thresholds met: a=0.4, b=0.7"
    # (0.8, 0.2) joins the front, then two results it dominates: no new front point in 2
    assert rule([0.8, 0.9, 0.95], vectors=[(0.8, 0.2), (0.9, 0.1), (0.95, 0.2)]) == (
        "no new Pareto-optimal result in the last 2 experiments (1 on the front)"
    )
    assert rule([0.8, 0.7], vectors=[(0.8, 0.2), (0.7, 0.1)]) is None  # a trade-off: new
    assert rule([None] * 10, vectors=[None] * 10) == "experiment budget spent: 10 of 10"


@pytest.mark.parametrize(
    ("objectives", "stop", "message"),
    [
        ("  - {measure: a}", "", r"objectives: a list of two or more"),
        (OBJ, "stop: {target: 1.0}", r"stop.target: several objectives have no single target"),
        (
            "  - {measure: a}\n  - {measure: a}",
            "",
            r"objectives\[1\].measure: 'a' is already an objective",
        ),
        (
            "  - {measure: a}\n  - {measure: c}",
            "",
            r"objectives\[1\].measure: the recipe does not measure 'c'",
        ),
        ("  - {measure: a, treshold: 1}\n  - {measure: b}", "", r"unknown key 'treshold'"),
        (
            "  - {measure: a}\n  - {measure: b}",
            "stop: {at_thresholds: true}",
            r"at_thresholds needs",
        ),
    ],
)
def test_objective_mistakes_are_one_line_errors(objectives: str, stop: str, message: str) -> None:
    with pytest.raises(ProgramError, match=message):
        load_program(_multi(objectives, stop))


def test_one_objective_has_no_threshold_and_objective_and_objectives_exclude() -> None:
    text = _multi(OBJ).replace("objectives:\n" + OBJ, "objective: {measure: a, threshold: 1}")
    with pytest.raises(ProgramError, match="a single objective has no threshold"):
        load_program(text)
    both = _multi(OBJ).replace("objectives:", "objective: {measure: a}\nobjectives:")
    with pytest.raises(ProgramError, match="give 'objective' \\(one\\) or 'objectives'"):
        load_program(both)
