"""benchmarks/optimizers.py and the peers behind labbridge's ask/tell contract: a seed's run
reproduces exactly, the undeclared failing region of Hartmann-6, the statistics, each
installed peer's pending/failed/constraint handling, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.optimizers import main  # noqa: E402
from benchmarks.optrun import (  # noqa: E402
    Run,
    bootstrap_median,
    h6_fails,
    make_problem,
    run_one,
    suggest_times,
    trace_digest,
)
from benchmarks.peers import PEERS, missing_peers  # noqa: E402
from loops.optimizer import Exhausted  # noqa: E402
from loops.testfunctions import HARTMANN6  # noqa: E402

MISSING = missing_peers()


def test_a_seed_run_twice_gives_the_same_trace() -> None:
    """Our strategy past its initial design (model-based asks), on the failing-region problem."""
    run = Run("hartmann6-constrained", "bayes", 1, 3, 16)
    first, second = run_one(run), run_one(run)
    assert len(first.values) == 16
    assert first.values == second.values and first.finish_s == second.finish_s
    assert trace_digest(first) == trace_digest(second)
    other = run_one(Run("hartmann6-constrained", "bayes", 1, 4, 16))
    assert trace_digest(other) != trace_digest(first)


def test_failing_region_is_undeclared_and_spares_the_optimum() -> None:
    pb = make_problem("hartmann6-constrained")
    assert pb.constraints is None  # the optimizer is not told
    names = list(HARTMANN6.space)
    best = dict(zip(names, HARTMANN6.argmin[0], strict=True))
    ok = pb.evaluate(best, 0)
    assert ok.status == "ok" and ok.value is not None and ok.value < pb.target
    local = dict(zip(names, (0.40465, 0.88244, 0.8461, 0.57399, 0.13893, 0.0385), strict=True))
    assert HARTMANN6(local) < pb.target  # a second way to the target, inside the region
    out = pb.evaluate(local, 0)
    assert out.status == "failed" and out.value is None
    assert h6_fails([0.9] * 6) and not h6_fails([0.1] * 6)


def test_bootstrap_median_interval() -> None:
    lo, hi = bootstrap_median([10.0] * 9)  # type: ignore[misc]
    assert lo == hi == 10.0
    ci = bootstrap_median([5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0])
    assert ci is not None and 5.0 <= ci[0] <= 9.5 <= ci[1] <= 14.0
    ci = bootstrap_median([None, None, None, 4.0])  # mostly censored: the upper end is inf
    assert ci is not None and math.isinf(ci[1])
    assert bootstrap_median([]) is None


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_honours_pending_failures_and_known_constraints(name: str) -> None:
    if name in MISSING:
        pytest.skip(MISSING[name])
    space = {"a": (0.0, 1.0, float), "n": (0, 4, int)}

    def allowed(p: dict) -> bool:
        return p["a"] + 0.1 * p["n"] <= 0.9

    opt = PEERS[name](space, 7, allowed)
    told = 0
    for i in range(12 if name != "bayes-opt" else 6):
        p = opt.ask()
        assert allowed(p.params) and isinstance(p.params["n"], int)
        if name != "bayes-opt" and i % 3 == 0:  # two in flight
            q = opt.ask()
            assert q.id != p.id and {x.id for x in opt.pending()} == {p.id, q.id}
            opt.cancel(q.id)
        status = "failed" if i == 4 else "ok"
        opt.tell(p.id, None if status == "failed" else (p.params["a"] - 0.3) ** 2, status=status)
        told += 1
    assert not opt.pending() and len(opt.observations()) == told
    best = opt.best()
    assert best is not None and allowed(best[0])
    if name == "bayes-opt":
        opt.ask()
        with pytest.raises(Exhausted, match="K = 1"):
            opt.ask()


def test_suggest_times_are_cpu_and_wall_seconds() -> None:
    times = suggest_times("bayes", 12, repeats=2, budget_s=60.0)
    assert len(times) == 2
    assert all(w > 0 and c > 0 for w, c in times)


def test_quick_run_prints_the_tables_and_records_versions_and_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--quick",
            "--workers",
            "1",
            "--strategies",
            "bayes,random",
            "--problems",
            "branin",
            "--cap",
            "25",
            "--stations",
            "2",
            "--suggest-sizes",
            "12",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "1. Experiments to target" in out and "2. 2 stations vs 1" in out
    assert "3. ask() seconds" in out and "goal no heavy tail" in out
    doc = json.loads((tmp_path / "optimizers.json").read_text())
    assert (tmp_path / "optimizers.txt").read_text().splitlines()[0] == out.splitlines()[0]
    assert doc["settings"]["seeds"] == [0]
    versions = doc["environment"]["versions"]
    for lib in ("numpy", "scipy", "scikit-learn", "bayesian-optimization"):
        assert versions[lib]
    runs = doc["to_target"]["branin"]["strategies"]
    assert set(runs) == {"bayes", "random"}
    assert len(runs["bayes"]["digests"]["0"]) == 16
    again = run_one(Run("branin", "bayes", 1, 0, 25))
    assert trace_digest(again) == runs["bayes"]["digests"]["0"]  # in-process == recorded
    assert np.isfinite(doc["suggest"]["bayes"]["12"]["cpu_p95"])


def test_bad_arguments_say_what_is_known(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--problems", "branin,rosenbrock"])
    assert "rosenbrock" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rerun", "branin:bayes:one:0"])
    assert "PROBLEM:STRATEGY:K:SEED" in capsys.readouterr().err


def test_two_objective_quick_run_records_hypervolumes_versions_and_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import optpareto

    code = optpareto.main(
        [
            "--quick",
            "--workers",
            "1",
            "--problems",
            "branin-currin",
            "--strategies",
            "pareto,random",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Hypervolume after 6 and 12 experiments" in out and "branin-currin" in out
    doc = json.loads((tmp_path / "optpareto.json").read_text())
    assert doc["seeds"] == [0] and doc["checkpoints"] == [6, 12]
    assert doc["versions"]["scikit-learn"] and doc["versions"]["numpy"]
    runs = doc["runs"]["branin-currin"]
    assert set(runs) == {"pareto", "random"} and len(runs["pareto"][0]) == 12
    # the same seed in the same environment gives the same values
    again = optpareto.run_one(optpareto.Run("branin-currin", "pareto", 0, 12))
    assert again == runs["pareto"][0]
    # hypervolume up to the reference point: (18, 6) - a single point (8, 1) -> 10 * 5
    assert optpareto.hv_after([[8.0, 1.0], None, [20.0, 0.0]], 3, (18.0, 6.0)) == 50.0
    assert optpareto.hv_after([[8.0, 1.0], [2.0, 4.0]], 1, (18.0, 6.0)) == 50.0


def test_two_objective_bad_arguments_name_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import optpareto

    with pytest.raises(SystemExit):
        optpareto.main(["--problems", "zdt9"])
    err = capsys.readouterr().err
    assert "zdt9" in err and "branin-currin" in err
