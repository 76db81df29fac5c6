"""Buffer points through the whole simulated buffer bench, to check the buffer model against.

:func:`run_points_on_stack` starts one simulated buffer station
(:class:`simulators.bench.SimulatedLab` with ``bench="buffer"``: pumps, the
shared RS-485 line with hotplate and pH transmitter, the balance, each on its
pty), opens it behind the safety layer with the bench's envelope
(``examples/buffer/envelope.yaml``), runs the set-up (``setup.yaml``: the
transmitter's two-point calibration through its driver) and then the
program's recipe for each point, as a campaign's station would, and returns
what the stack measured. ``benchmarks/campaign.py --check-stack`` prints these
next to :class:`benchmarks.buffer_model.BufferObjective` at the same points.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.buffer_model import DEFAULT_PROGRAM, DEFAULT_SETUP, SORENSEN_POINT
from loops.checks import run_checks
from loops.program import load_program
from loops.recipe import build_recipe, run_recipe
from loops.setup import load_setup
from safety import load_envelope, open_station
from simulators.bench import SimulatedLab

__all__ = ["DEFAULT_ENVELOPE", "STACK_POINTS", "run_points_on_stack"]

#: the buffer bench's envelope
DEFAULT_ENVELOPE = DEFAULT_PROGRAM.with_name("envelope.yaml")
#: the textbook point, a more acidic and a more basic mix
STACK_POINTS: tuple[dict[str, float], ...] = (
    dict(SORENSEN_POINT),
    {"acid_ml": 20.0, "base_ml": 10.0},
    {"acid_ml": 3.0, "base_ml": 35.0},
)


async def run_points_on_stack(
    points: Sequence[Mapping[str, Any]] = STACK_POINTS,
    *,
    speed: float = 20.0,
    program: Path = DEFAULT_PROGRAM,
    setup: Path = DEFAULT_SETUP,
    envelope: Path = DEFAULT_ENVELOPE,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the set-up, then the recipe at each of ``points``, on one simulated buffer
    station at ``speed`` x real time; one row per point: the point, the pH read, the
    objective, the gravimetric difference (g) and whether the program's checks passed."""
    prog = load_program(program)
    setup_recipe = load_setup(setup)
    rules = load_envelope(envelope)
    rows: list[dict[str, Any]] = []
    async with SimulatedLab(stations=1, speed=speed, bench="buffer") as lab:
        bench = lab.stations[0]
        clock = bench.world.clock
        specs = [spec.as_dict() for spec in bench.instruments()]
        options = {"device_time_scale": speed, "poll_interval": 0.1}
        async with open_station(
            bench.name, specs, rules, clock=clock.now, supervisor_options=options
        ) as station:
            if progress is not None:
                progress("whole buffer stack: set-up (pH calibration)")
            done = await run_recipe(
                setup_recipe.recipe,
                station,
                clock_sleep=clock.sleep,
                clock_now=clock.now,
                who="benchmark:setup",
            )
            kept = {k: done.measurements.get(k) for k in setup_recipe.keep}
            for i, point in enumerate(points):
                if progress is not None:
                    progress(f"whole buffer stack: point {i + 1}/{len(points)}")
                recipe = build_recipe(prog, point)
                res = await run_recipe(
                    recipe, station, clock_sleep=clock.sleep, clock_now=clock.now, who="benchmark"
                )
                m = res.measurements
                checks = recipe.verification
                verdict = run_checks(
                    checks, measurements=m, inputs=checks.get("inputs") or {}, setup=kept
                )
                rows.append(
                    {
                        "point": dict(point),
                        "stack_ph": m["ph"],
                        "stack_ph_error": m[prog.objective.measure],
                        "stack_gravimetric_g": m["weighed"]["value"] - m["expected_g"],
                        "stack_verified": verdict.verified,
                        "stack_temperature_c": m["temperature_c"],
                    }
                )
    return rows
