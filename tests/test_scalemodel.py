"""benchmarks/scalemodel.py: the optimizer's own speed-up on the colour match's bench-time model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks import campaign
from benchmarks.scalemodel import ModelRow, model_rows, model_table

pytestmark = pytest.mark.timeout(120)


def test_rows_are_the_campaign_simulation_per_seed() -> None:
    rows = model_rows([1, 2], 1, target=12.0, cap=12)
    assert [r.stations for r in rows] == [1, 2]
    for row in rows:
        problem = replace(campaign.make_problem("colour-match"), target=12.0)
        trace = campaign.simulate_campaign(
            campaign.make_strategy(problem, "bayes", 0),
            problem,
            stations=row.stations,
            max_experiments=12,
            seed=0,
            strategy="bayes",
        )
        assert row.time_s == (trace.time_to_target(),)
        assert row.experiments == (trace.experiments_to_target(),)
    assert rows[0].time_s[0] is not None and rows[0].time_s[0] > 0


def test_the_table_gives_speed_ups_and_experiment_ratios() -> None:
    rows = [
        ModelRow(1, (100.0, 300.0, 200.0), (10, 30, 20)),
        ModelRow(4, (25.0, 60.0, None), (12, 25, None)),
    ]
    text = model_table(rows, target=4.0)
    assert "ΔE 4" in text and "3 seeds" in text
    # medians: 1 station 200 s, 20 exps; 4 stations 60 s (a miss counts as never), 25 exps
    assert "| 1 | 200 | 1.00x | 1.00x | 20 | 1.00x | 3/3 |" in text
    # per seed 100/25 = 4 and 300/60 = 5: median 4.5; the miss has no ratio
    assert "| 4 | 60 | 3.33x | 4.50x | 25 | 1.25x | 2/3 |" in text


def test_no_seeds_is_an_error() -> None:
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        model_rows([1], 0, target=4.0)
