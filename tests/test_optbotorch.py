"""``strategy: botorch`` (loops/optbotorch.py): the ask/tell contract of the ``bayes``
strategy over BoTorch's GP and qLogNEI. Tiny problems (2-D, a dozen asks): a model-based
ask costs ~0.3-4 s of torch. Without the extra: tests/test_optimizer.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("botorch")

from loops.optbotorch import BoTorchStrategy
from loops.optimizer import Exhausted, UnknownProposal, optimizer_from_state

ROOT = Path(__file__).resolve().parents[1]
SQUARE = {"x": (0.0, 1.0, float), "y": (0.0, 1.0, float)}
#: a lighter acquisition search than the default (10 restarts, 512 raw samples): these tests
#: check the contract, not the search, and each model-based ask costs ~4x less
LIGHT = {"num_restarts": 3, "raw_samples": 128}


def bowl(p: dict[str, Any]) -> float:
    return (float(p["x"]) - 0.3) ** 2 + (float(p["y"]) - 0.6) ** 2


def below_line(p: dict[str, Any]) -> bool:
    return float(p["x"]) + float(p["y"]) <= 1.1


def run(opt: Any, n: int, f: Any = bowl) -> None:
    for _ in range(n):
        p = opt.ask()
        opt.tell(p.id, f(p.params))


def test_k_asks_give_k_distinct_points_the_constraints_allow() -> None:
    opt = BoTorchStrategy(SQUARE, seed=3, initial_points=4, constraints=below_line, **LIGHT)
    run(opt, 5)  # 4 design points, then one model-based ask
    assert opt.last_suggest_seconds > 0
    agent = opt.add_pending({"x": 0.3, "y": 0.6})  # an agent's point is running too
    batch = [opt.ask() for _ in range(3)]
    assert len({p.id for p in batch}) == 3
    keys = {(p.params["x"], p.params["y"]) for p in batch} | {(0.3, 0.6)}
    assert len(keys) == 4  # distinct, and none is the agent's
    assert all(below_line(p.params) for p in batch)
    assert {p.id for p in opt.pending()} == {agent.id} | {p.id for p in batch}
    opt.cancel(batch[0].id)
    with pytest.raises(UnknownProposal):
        opt.tell(batch[0].id, 1.0)
    for p in batch[1:]:
        opt.tell(p.id, bowl(p.params))
    assert all(below_line(o.params) for o in opt.observations())
    assert opt.counts()["pending"] == 1 and opt.counts()["ok"] == 7


def test_a_saved_state_gives_the_same_next_ask_in_the_design_and_the_model_phase() -> None:
    opt = BoTorchStrategy(SQUARE, direction="maximize", seed=5, initial_points=4, **LIGHT)
    neg = lambda p: -bowl(p)  # noqa: E731
    run(opt, 2, neg)
    for phase in ("design", "model"):
        pending = opt.ask()  # one in flight when saved
        state = json.loads(json.dumps(opt.state()))  # plain JSON
        again = optimizer_from_state(SQUARE, state)
        assert isinstance(again, BoTorchStrategy) and again.state() == opt.state()
        a, b = opt.ask(), again.ask()
        assert a == b, phase
        for o in (opt, again):
            o.tell(pending.id, neg(pending.params))
            o.tell(a.id, neg(a.params))
        run(opt, 1, neg)
        run(again, 1, neg)
    assert opt.state() == again.state()
    best = opt.best()
    assert best is not None and best[1] == max(o.value or -math.inf for o in opt.observations())


def test_results_by_params_and_every_status() -> None:
    opt = BoTorchStrategy(SQUARE, seed=2, initial_points=3, **LIGHT)
    run(opt, 3)
    # a point nobody asked for, told by its params: a new observation
    obs = opt.tell({"x": 0.25, "y": 0.55}, 0.01)
    assert obs.status == "ok" and obs.id not in {p.id for p in opt.pending()}
    # params that match a pending point resolve it
    p = opt.ask()
    assert opt.tell(dict(p.params), bowl(p.params)).id == p.id and not opt.pending()
    bad = {"x": 0.9, "y": 0.1}
    opt.tell(bad, None, status="failed")
    opt.tell({"x": 0.95, "y": 0.05}, None, status="infeasible", rules=["vial.volume.max"])
    odd = {"x": 0.5, "y": 0.5}
    opt.tell(odd, 7.5, status="untrusted")
    X, Y, running = opt._model_data()
    # trusted results and the two penalised points are data, worse than every result
    assert len(X) == 7 and Y[-2:, 0].tolist() == [Y[:-2, 0].min() - 0.25 * np.ptp(Y[:-2, 0])] * 2
    assert running.tolist() == [[0.5, 0.5]]  # untrusted: treated as running, not data
    q = opt.ask()
    assert q.params not in (bad, odd)
    assert opt.best() == ({"x": 0.25, "y": 0.55}, 0.01)
    assert opt.counts() == {
        "ok": 5,
        "infeasible": 1,
        "failed": 1,
        "untrusted": 1,
        "pending": 1,
        "ids": opt._counter,
    }


def test_learned_trouble_keeps_proposals_away_from_a_failing_region() -> None:
    """The bowl's minimum (x = 0.1) is inside a region where experiments fail (x < 0.35):
    the learned feasibility weighs the choice, so the model-based asks stay out of it."""
    opt = BoTorchStrategy(SQUARE, seed=4, initial_points=0)
    f = lambda p: (p["x"] - 0.1) ** 2 + (p["y"] - 0.5) ** 2  # noqa: E731
    for x in np.linspace(0.0, 1.0, 6):
        for y in (0.2, 0.5, 0.8):
            params = {"x": float(x), "y": y}
            if x < 0.35:
                opt.tell(params, None, status="failed")
            else:
                opt.tell(params, f(params))
    assert opt.feasibility({"x": 0.1, "y": 0.5})["p_failed"] > 0.5
    asks = [opt.ask() for _ in range(2)]
    assert all(p.params["x"] >= 0.3 for p in asks), [p.params for p in asks]


def test_int_ordinal_and_categorical_parameters_and_a_space_used_up() -> None:
    space = {
        "stock": ("categorical", ["a", "b"]),
        "n": (1, 2, int),
        "hold": ("ordinal", [30, 120]),
    }
    score = {"a": 0.0, "b": 1.0}
    opt = BoTorchStrategy(space, seed=1, initial_points=3, **LIGHT)
    seen = set()
    for _ in range(8):  # every point of the 2 x 2 x 2 space, never one twice
        p = opt.ask()
        assert p.params["stock"] in ("a", "b") and p.params["hold"] in (30, 120)
        assert isinstance(p.params["n"], int) and 1 <= p.params["n"] <= 2
        key = tuple(p.params.values())
        assert key not in seen
        seen.add(key)
        opt.tell(p.id, score[str(p.params["stock"])] + int(p.params["n"]))
    with pytest.raises(Exhausted, match="botorch"):
        opt.ask()
    assert opt.state()["space"]["stock"] == ["categorical", ["a", "b"]]


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="num_restarts must be an int >= 1, got 0"):
        BoTorchStrategy(SQUARE, num_restarts=0)
    with pytest.raises(ValueError, match="initial_points must be an int >= 0"):
        BoTorchStrategy(SQUARE, initial_points=-1)
    state = BoTorchStrategy(SQUARE).state()
    with pytest.raises(ValueError, match="not a 'botorch' state"):
        BoTorchStrategy.from_state(SQUARE, {**state, "strategy": "bayes"})


def test_two_objectives_run_parego_over_it() -> None:
    from loops.optmulti import ParetoOptimizer

    inner = BoTorchStrategy(SQUARE, seed=6, initial_points=4, **LIGHT)
    opt = ParetoOptimizer(inner, ["minimize", "minimize"], seed=6)
    assert opt.method == "parego"
    with pytest.raises(ValueError, match="'ehvi' needs the Bayesian inner strategy"):
        ParetoOptimizer(inner, ["minimize", "minimize"], acquisition="ehvi")
    for _ in range(5):
        p = opt.ask()
        opt.tell(p.id, [bowl(p.params), float(p.params["x"])])
    a, b = opt.ask(), opt.ask()
    assert a.params != b.params and isinstance(opt.inner, BoTorchStrategy)
    assert opt.front()
    state = json.loads(json.dumps(opt.state()))
    again = ParetoOptimizer.from_state(SQUARE, state, inner=BoTorchStrategy)
    assert again.ask() == opt.ask()


def test_a_program_with_strategy_botorch_checks_and_builds_its_optimizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main
    from loops.campaign import make_optimizer
    from loops.campaignbook import restore_optimizer
    from loops.program import load_program

    text = (ROOT / "examples" / "color-match" / "program.md").read_text()
    assert "strategy: bayes\n" in text
    path = tmp_path / "program.md"
    path.write_text(text.replace("strategy: bayes\n", "strategy: botorch\n"))
    lab = ROOT / "examples" / "lab-hardware.yaml"
    assume = ["--assume", "enclosure.lid=closed", "--assume", "hotplate.setpoint_c=25"]
    assert main(["check", str(lab), "--program", str(path), *assume]) == 0
    assert "25 pass" in capsys.readouterr().out
    program = load_program(path)
    opt = make_optimizer(program)
    assert isinstance(opt, BoTorchStrategy) and opt.initial_points == program.initial_points
    p = opt.ask()
    total = sum(float(p.params[k]) for k in ("red_ml", "green_ml", "blue_ml"))
    assert 0.6 <= total <= 2.6  # the program's constraints
    again = restore_optimizer(make_optimizer(program), opt.state())
    assert again.ask() == opt.ask()
