"""Smoke tests of benchmarks/campaign.py's helpers: the colour and buffer models, the
discrete-event campaign, the censoring-aware statistics, and one tiny end-to-end run of the
sections."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.buffer_model import SORENSEN_POINT, BufferModel, BufferObjective  # noqa: E402
from benchmarks.campaign import (  # noqa: E402
    Outcome,
    Problem,
    Progress,
    SectionReport,
    Settings,
    Trace,
    bootstrap_ratio,
    censored_median,
    geometric_median,
    main,
    make_problem,
    make_strategy,
    optimizer_section,
    parse_args,
    reference_section,
    run_sections,
    simulate_campaign,
    suggest_section,
    summarise,
)
from benchmarks.colour_model import (  # noqa: E402
    REFERENCE_POINT,
    ColourMatchObjective,
    ManualClock,
)
from instruments.errors import ModbusExceptionError, ProbeNotImmersedError  # noqa: E402
from loops.optimizer import BayesOptimizer, Proposal, RandomSearch  # noqa: E402
from loops.testfunctions import BRANIN, run_values  # noqa: E402
from simulators.buffer_world import STOCKS, BufferWorld  # noqa: E402


@pytest.fixture(scope="module")
def objective() -> ColourMatchObjective:
    return ColourMatchObjective()


@pytest.fixture(scope="module")
def buffer() -> BufferObjective:
    return BufferObjective()


# ------------------------------------------------------------------ colour model
def test_reference_point_reproduces_the_stack_measured_target(
    objective: ColourMatchObjective,
) -> None:
    # program.md's target_lab was measured through the whole simulated stack at this point
    results = [objective(REFERENCE_POINT, seed=s) for s in range(5)]
    assert all(r.status == "ok" for r in results)
    des = [r.delta_e for r in results]
    assert all(d is not None and d < 1.0 for d in des), des
    assert len({round(d or 0.0, 9) for d in des}) == 5  # the sensor noise differs per seed


def test_bench_time_follows_the_recipe(objective: ColourMatchObjective) -> None:
    r = objective(REFERENCE_POINT, seed=0)
    steps = r.steps_s
    # the dye pumps run together (the slowest: 0.75 mL at 5 mL/min = 9 s), then the drain
    # (1.75 mL at 20 mL/min = 5.25 s), each waited for with polls every bench second
    assert steps["call wait_until_stopped"] == pytest.approx(9.0 + 6.0, abs=1.0)
    assert steps["ramp"] == pytest.approx(150.0)  # 25 -> 50 degC at 10 degC/min, 10 s steps
    assert steps["hold"] == pytest.approx(120.0)
    assert steps["wait"] == 0.0  # a fresh world: the plate is cold already
    # the next experiment waits for the plate: from ~50 degC to below 28 (tau 40 s), 5 s polls
    assert 30.0 < steps["next experiment's wait"] < 120.0
    assert r.duration_s == pytest.approx(sum(steps.values()))
    assert 40.0 < r.liquid_c < 50.0  # the liquid lags the plate


def test_colour_depends_on_temperature_and_hold(objective: ColourMatchObjective) -> None:
    cold = objective({**REFERENCE_POINT, "temperature_c": 25.0, "hold_s": 30}, seed=0)
    hot = objective({**REFERENCE_POINT, "temperature_c": 75.0, "hold_s": 600}, seed=0)
    assert cold.lab is not None and hot.lab is not None
    assert cold.delta_e is not None and hot.delta_e is not None
    assert hot.lab[2] > cold.lab[2] + 10.0  # blue converted to the yellow-brown product
    assert cold.delta_e > 2.0 and hot.delta_e > 2.0
    assert hot.duration_s > cold.duration_s + 600.0


def test_infeasible_proposal_is_refused_with_the_rule(objective: ColourMatchObjective) -> None:
    low = {**REFERENCE_POINT, "red_ml": 0.1, "green_ml": 0.1, "blue_ml": 0.1}
    assert not objective.feasible(low)
    with pytest.raises(ValueError, match=r"red_ml \+ green_ml \+ blue_ml >= 0.6"):
        objective(low)


def test_manual_clock_only_moves_forward() -> None:
    clock = ManualClock()
    assert clock.now() == 0.0
    assert clock.advance(2.5) == 2.5
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1.0)


# ------------------------------------------------------------------ buffer model
def test_buffer_setup_calibrates_the_transmitter(buffer: BufferObjective) -> None:
    # the two-point calibration finds the electrode's real offset (+7.5 mV) and slope (98.5 %)
    cal = buffer.station.calibration
    assert cal.zero_mv == pytest.approx(7.5, abs=0.1)
    assert cal.slope == pytest.approx(0.985, abs=0.002)
    assert sorted(cal.points) == [4010, 7000]
    assert buffer.station.compensation == 1 and buffer.station.damping_s == 2
    assert buffer.kept == {"calibration_due": False, "beaker_g": pytest.approx(52.3817, abs=1e-3)}
    assert buffer.setup_steps_s["call calibrate"] == pytest.approx(30.0, abs=1.0)  # 2 x 15 s


def test_buffer_model_reads_the_chemistry_ph(buffer: BufferObjective) -> None:
    r = buffer(SORENSEN_POINT, seed=0)
    assert r.status == "ok" and r.reasons == () and r.error is None
    assert r.ph is not None and r.true_ph is not None and r.ph_error is not None
    assert r.ph_error == pytest.approx(abs(r.ph - 7.40), abs=1e-9)
    assert abs(r.ph - r.true_ph) < 0.01  # calibrated transmitter vs the liquid's own pH
    assert abs(r.ph - 7.40) < 0.06  # Sørensen's table: pH 7.4 at 25 degC (here ~23 degC)
    # the same liquid made by hand in the full simulator, at the temperature the probe read
    world = BufferWorld(seed=5)
    d = r.measurements["dispensed_ml"]
    for stock in ("acid", "base", "water"):
        world.add(stock, d[stock])
    world.hotplate.liquid_c = r.measurements["temperature_c"]
    hand = world.mixed_ph()
    assert hand is not None and abs(r.ph - hand) < 0.01
    # the gravimetric check: the balance saw what the pumps reported
    expected = sum(d[s] * STOCKS[s].density_g_ml for s in ("acid", "base", "water"))
    assert r.measurements["weighed"]["value"] == pytest.approx(expected, abs=0.01)
    assert r.measurements["weighed"]["stable"] is True


def test_buffer_ph_follows_the_ratio(buffer: BufferObjective) -> None:
    phs = [buffer({"acid_ml": a, "base_ml": b}, seed=1).ph for a, b in ((30, 5), (15, 15), (4, 30))]
    assert all(p is not None for p in phs)
    low, mid, high = (float(p or 0.0) for p in phs)
    assert low < 6.3 < mid < 7.0 < 7.5 < high  # pKa2 ~6.8 at this ionic strength


def test_buffer_bench_time_follows_the_recipe(buffer: BufferObjective) -> None:
    r = buffer({"acid_ml": 10.0, "base_ml": 20.0}, seed=2)
    steps = r.steps_s
    # acid 10 mL and base 20 mL at 20 mL/min, water 30 mL at 30 mL/min, the drain of 62 mL
    # at 30 mL/min, each waited for with polls every bench second
    pumping = 30.0 + 60.0 + 60.0 + 124.0
    assert steps["call wait_until_stopped"] == pytest.approx(pumping, abs=4.0)
    assert steps["hold"] == pytest.approx(60.0 + 10.0 + 5.0)  # mix, steady, settle
    assert r.duration_s == pytest.approx(sum(steps.values()))


def test_clogged_acid_pump_shows_on_the_balance(buffer: BufferObjective) -> None:
    clean = buffer(SORENSEN_POINT, seed=3)
    clogged = buffer(SORENSEN_POINT, seed=3, faults={"clogged-pump": {"pump": "acid"}})
    assert clogged.status == "untrusted"
    assert any(reason.startswith("gravimetric") for reason in clogged.reasons)
    m = clogged.measurements
    assert m["dispensed_ml"]["acid"] == pytest.approx(5.7)  # the pump reports it all
    missing = 0.6 * 5.7 * STOCKS["acid"].density_g_ml  # it delivered 40 %
    assert m["weighed"]["value"] - m["expected_g"] == pytest.approx(-missing, abs=0.02)
    assert clean.ph is not None and clogged.ph is not None
    assert clogged.ph > clean.ph + 0.1  # less acid: a more basic buffer


def test_buffer_probe_out_fails_the_experiment(buffer: BufferObjective) -> None:
    r = buffer(SORENSEN_POINT, seed=4, faults={"probe-out": {}})
    assert r.status == "failed" and r.ph_error is None
    assert r.error is not None and "ProbeNotImmersedError" in r.error


def test_buffer_model_ph_handle_is_the_driver_on_the_registers() -> None:
    clock = ManualClock()
    model = BufferModel(BufferWorld(clock=clock), clock)
    ph = model.handle("ph")

    async def run() -> None:
        with pytest.raises(ProbeNotImmersedError):  # an empty beaker: the driver refuses
            await ph.read()
        with pytest.raises(ModbusExceptionError) as exc:  # not a buffer: the unit refuses
            await model.bus.write_register(10, 1234)
        assert exc.value.exception_code == 3
        with pytest.raises(ModbusExceptionError) as exc:  # outside the register map
            await model.bus.read_input_registers(2, 5)
        assert exc.value.exception_code == 2
        await ph.set_damping(seconds=4)
        assert model.transmitter.damping_s == 4 and model.state().damping_s == 4
        with pytest.raises(AttributeError, match=r"cannot run ph.dispense"):
            await ph.dispense(volume_ml=1.0, rate_ml_min=1.0)

    asyncio.run(run())


def test_buffer_problem_uses_the_program(buffer: BufferObjective) -> None:
    problem = make_problem("buffer")
    assert problem.target == 0.02 and problem.initial_points == 6
    assert set(problem.space) == {"acid_ml", "base_ml"}
    opt = make_strategy(problem, "random", 0)
    for _ in range(50):
        p = opt.ask()
        assert p.params["acid_ml"] + p.params["base_ml"] <= 60.0
        opt.cancel(p.id)
    with pytest.raises(ValueError, match=r"acid_ml \+ base_ml <= total_ml"):
        buffer({"acid_ml": 40.0, "base_ml": 40.0})
    out = problem.evaluate(SORENSEN_POINT, 0)
    assert out.status == "ok" and out.value is not None and out.value < 0.06
    assert out.duration_s > 300.0


# ------------------------------------------------------------------ discrete events
class _Recorder:
    """Wraps a strategy; records how many points were pending at each ask."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pending_at_ask: list[int] = []
        self.told: list[str] = []

    def ask(self) -> Proposal:
        self.pending_at_ask.append(len(self.inner.pending()))
        return self.inner.ask()

    def tell(self, proposal: str | Mapping[str, Any], value: float | None, **kw: Any) -> Any:
        assert isinstance(proposal, str)
        self.told.append(proposal)
        return self.inner.tell(proposal, value, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _timed_problem(target: float) -> Problem:
    """x in [0, 1]: value x, duration 1 + 10 x (small values finish first)."""

    def evaluate(params: Mapping[str, Any], noise_seed: int) -> Outcome:
        x = float(params["x"])
        return Outcome(x, 1.0 + 10.0 * x)

    return Problem("timed", {"x": (0.0, 1.0, float)}, target, evaluate)


def test_stations_run_asynchronously_with_points_pending() -> None:
    problem = _timed_problem(target=-1.0)  # never reached
    opt = _Recorder(RandomSearch(problem.space, 3))
    trace = simulate_campaign(opt, problem, stations=3, max_experiments=12, seed=0)
    assert trace.experiments_to_target() is None
    assert len(trace.values) == 12 and trace.started == 12
    assert opt.pending_at_ask[:3] == [0, 1, 2]  # three stations filled at time 0
    assert all(n == 2 for n in opt.pending_at_ask[3:])  # a freed station asks, 2 still running
    assert trace.finish_s == sorted(trace.finish_s)
    # each result finishes its own duration after it started: replay the schedule
    durations = {o.id: 1.0 + 10.0 * float(o.params["x"]) for o in opt.inner.observations()}
    free = [0.0, 0.0, 0.0]
    starts: dict[str, float] = {}
    for pid in sorted(durations, key=lambda i: int(i[1:])):  # ask order: p1, p2, ...
        t = min(free)
        starts[pid] = t
        free[free.index(t)] = t + durations[pid]
    expected = sorted(starts[p] + durations[p] for p in durations)
    assert trace.finish_s == pytest.approx(expected)


def test_stops_at_the_first_result_within_target() -> None:
    problem = _timed_problem(target=0.3)
    trace = simulate_campaign(
        RandomSearch(problem.space, 1), problem, stations=2, max_experiments=500, seed=0
    )
    n = trace.experiments_to_target()
    assert n is not None and n == len(trace.values)
    value = trace.values[-1]
    assert value is not None and value <= 0.3
    assert all(v is not None and v > 0.3 for v in trace.values[:-1])
    assert trace.time_to_target() == trace.finish_s[-1]
    assert trace.started >= len(trace.values)


def test_equal_durations_match_run_values_with_batch() -> None:
    # one time unit per evaluation: the same schedule as loops.testfunctions.run_values(batch=K)
    problem = make_problem("branin")

    def make() -> BayesOptimizer:
        return BayesOptimizer(BRANIN.space, direction="minimize", seed=4, initial_points=3)

    trace = simulate_campaign(make(), problem, stations=2, max_experiments=7, seed=0)
    assert trace.values == pytest.approx(run_values(make, BRANIN, 7, batch=2, stop_at=0.5))
    assert trace.finish_s == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0][: len(trace.values)]


def test_failed_experiments_are_told_as_failed() -> None:
    def evaluate(params: Mapping[str, Any], noise_seed: int) -> Outcome:
        return Outcome(None, 1.0, "failed") if params["x"] > 0.5 else Outcome(1.0, 1.0)

    problem = Problem("flaky", {"x": (0.0, 1.0, float)}, 0.0, evaluate)
    opt = RandomSearch(problem.space, 0)
    trace = simulate_campaign(opt, problem, stations=1, max_experiments=20, seed=0)
    statuses = [o.status for o in opt.observations()]
    assert "failed" in statuses and "ok" in statuses
    assert [v is None for v in trace.values] == [s == "failed" for s in statuses]
    assert math.isinf(Trace("t", "", 1, 0, 0.0, [1.0], [None]).best_so_far()[0])


def test_colour_problem_uses_the_program_constraints() -> None:
    problem = make_problem("colour-match")
    assert problem.target == 2.0 and problem.initial_points == 8
    opt = make_strategy(problem, "random", 0)
    for _ in range(50):
        p = opt.ask()
        total = p.params["red_ml"] + p.params["green_ml"] + p.params["blue_ml"]
        assert 0.6 <= total <= 2.6
        opt.cancel(p.id)
    with pytest.raises(ValueError, match="unknown problem"):
        make_problem("rosenbrock")


# ------------------------------------------------------------------ statistics
def test_censored_median_and_summary() -> None:
    assert censored_median([3.0, None, 1.0]) == (3.0, False)
    med, censored = censored_median([None, None, 1.0])
    assert censored and math.isnan(med)
    traces: list[Trace] = []
    for n, hit in ((4, True), (6, True), (10, False)):
        values: list[float | None] = [*([5.0] * (n - 1)), 0.0 if hit else 5.0]
        traces.append(Trace("p", "s", 1, len(traces), 1.0, [float(i) for i in range(n)], values))
    s = summarise(traces, cap=10)
    assert (s.runs, s.hits, s.median, s.censored) == (3, 2, 6.0, False)
    assert s.per_seed == [4, 6, None]
    assert math.isinf(s.q3) and s.q1 == 4.0


def test_geometric_median_and_bootstrap() -> None:
    assert geometric_median(0.5) == 1.0
    assert geometric_median(0.01) == 69.0  # ln 0.5 / ln 0.99 = 68.97
    assert math.isinf(geometric_median(0.0))
    ci = bootstrap_ratio([10.0, 12.0, 14.0], [2.0, 2.0, 2.0])
    assert ci is not None and 5.0 <= ci[0] <= 6.0 <= ci[1] <= 7.0
    ci = bootstrap_ratio([None, None, None], [2.0])
    assert ci is not None and math.isinf(ci[0])


# ------------------------------------------------------------------ end to end
@pytest.mark.timeout(240)  # ~25 s alone; minutes on a loaded 2-core machine
def test_sections_write_the_table_data_and_the_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    settings = Settings(
        seeds=1,
        random_seeds=1,
        cap=25,
        random_cap=15,
        stations=2,
        workers=1,
        mc={"colour-match": 20, "branin": 500, "hartmann6": 500},
        suggest_sizes=(12,),
        suggest_repeats=1,
        reference_seeds=2,
        out=tmp_path,
        problems=("colour-match", "branin", "hartmann6"),  # buffer: test_buffer_only_sections
    )
    progress = Progress(stream=open(tmp_path / "progress.txt", "w"), every_s=0.0)
    try:
        reports = run_sections(
            settings, [reference_section, optimizer_section, suggest_section], progress
        )
    finally:
        progress.stream.close()
    names = [r.name for r in reports]
    assert names == ["reference", "optimizer", "suggest"]
    opt = reports[1].data
    assert [row["problem"] for row in opt["acceleration"]] == [
        "colour-match",
        "branin",
        "hartmann6",
    ]
    assert opt["stations"]["stations"] == 2
    assert reports[2].data["rows"][0]["observations"] == 12
    png = tmp_path / "campaign-colour-match+branin+hartmann6_convergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tasks" in (tmp_path / "progress.txt").read_text()
    text = "\n".join(line for r in reports for line in r.lines)
    assert "AF" in text and "wall-clock" in text and "package/ours" in text


def test_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--seeds", "0"])
    assert "--seeds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--stations", "1"])
    assert "--stations must be >= 2" in capsys.readouterr().err


def test_main_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def tiny(settings: Settings, progress: Progress) -> SectionReport:
        assert settings.quick and settings.seeds == 2 and settings.out == tmp_path
        return SectionReport("tiny", ["a line"], {"x": math.inf, "y": math.nan})

    assert main(["--quick", "--workers", "1", "--out", str(tmp_path)], sections=[tiny]) == 0
    assert "a line" in capsys.readouterr().out
    doc = json.loads((tmp_path / "campaign.json").read_text())
    assert doc["quick"] is True and doc["tiny"] == {"x": "inf", "y": None}
    assert doc["settings"]["targets"] == {
        "colour-match": 2.0,
        "buffer": 0.02,
        "branin": 0.5,
        "hartmann6": -3.0,
    }


def test_problems_option_selects_and_names_the_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = parse_args(["--quick", "--problems", "buffer"])
    assert settings.problems == ("buffer",) and settings.stem == "campaign-buffer"
    assert settings.mc["buffer"] >= 1
    assert parse_args(["--problems", "buffer", "--hit-draws", "7"]).mc["buffer"] == 7
    assert parse_args([]).stem == "campaign"
    with pytest.raises(SystemExit):
        parse_args(["--problems", "buffer,rosenbrock"])
    assert "unknown 'rosenbrock'" in capsys.readouterr().err

    def tiny(settings: Settings, progress: Progress) -> SectionReport:
        return SectionReport("tiny", ["a line"], {})

    argv = ["--quick", "--problems", "buffer", "--workers", "1", "--out", str(tmp_path)]
    assert main(argv, sections=[tiny]) == 0
    doc = json.loads((tmp_path / "campaign-buffer.json").read_text())
    assert doc["settings"]["problems"] == ["buffer"]


def test_buffer_only_sections(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    settings = Settings(
        seeds=1,
        random_seeds=1,
        cap=3,
        random_cap=3,
        workers=1,
        mc={"buffer": 3},
        reference_seeds=1,
        out=tmp_path,
        problems=("buffer",),
    )
    progress = Progress(stream=open(tmp_path / "progress.txt", "w"), every_s=0.0)
    try:
        reports = run_sections(settings, [reference_section, optimizer_section], progress)
    finally:
        progress.stream.close()
    ref, opt = reports[0].data, reports[1].data
    assert set(ref) == {"buffer"}  # no colour reference
    assert ref["buffer"]["ph_median"] == pytest.approx(7.43, abs=0.05)
    assert [row["problem"] for row in opt["acceleration"]] == ["buffer"]
    assert opt["stations"] is None  # K stations is colour-match's
    assert (tmp_path / "campaign-buffer_convergence.png").read_bytes()[:4] == b"\x89PNG"
    row = opt["acceleration"][0]
    assert row["ours"]["runs"] == 1 and row["random_hit_rate_draws"] == 3
    text = "\n".join(line for r in reports for line in r.lines)
    assert "Sørensen" in text and "AF" in text and "stations vs 1" not in text
