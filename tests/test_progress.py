"""The campaign's progress bar (issue 13, bridge/campaigns.py ``CampaignProgress``) on a real
text stream: the best value counts trusted results only, and ``close(summary)`` ends the bar
at the number of experiments run with the campaign's final state."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import tqdm

from bridge.campaigns import CampaignProgress
from loops.campaign import CampaignSummary
from loops.program import load_program

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"


@pytest.fixture(autouse=True)
def no_monitor_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """tqdm's monitor thread (it lives past the bar) would be a leak to tests/conftest.py."""
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def finished(eid: str, value: float, verified: bool | None, done: int) -> dict[str, object]:
    return {
        "event": "finished",
        "experiment_id": eid,
        "station": "bench-a",
        "objective": value,
        "verified": verified,
        "progress": {"experiments": done, "in_flight": 0},
    }


def test_best_is_trusted_results_only_and_close_ends_at_the_count_run() -> None:
    program = load_program(EXAMPLE)  # minimizes delta_e2000, budget 60 experiments
    assert program.objective.measure == "delta_e2000" and program.budget.experiments == 60
    stream = io.StringIO()
    bar = CampaignProgress(program, "color-1", stream=stream)
    bar(finished("e1", 4.0, True, 1))
    bar(finished("e2", 9.0, None, 2))  # no verification asked for: a result, not better
    # the lowest value is unverified: counted as run, never the best
    bar(finished("e3", 0.5, False, 3))
    bar({"event": "unverified", "station": "bench-a", "reason": "second reading disagrees"})
    shown = stream.getvalue()
    assert "delta_e2000=4" in shown and "delta_e2000=0.5" not in shown
    assert "unverified: bench-a: second reading disagrees" in shown  # a line above the bar
    assert "unverified=1" in shown
    assert "3/60" in shown
    summary = CampaignSummary(
        campaign_id="color-1",
        state="done",
        reason="target reached",
        best={"experiment_id": "e1", "value": 4.0},
        counts={"done": 3},
        elapsed_s=1.0,
        stations={},
    )
    bar.close(summary)
    last = stream.getvalue().split("\r")[-1]  # tqdm redraws the line in place
    assert last.startswith("color-1: done:"), last
    assert "3/3" in last and "100%" in last, last
    assert "delta_e2000=4" in last, last


def test_a_resumed_campaign_starts_the_bar_at_its_count_and_best() -> None:
    program = load_program(EXAMPLE)
    stream = io.StringIO()
    bar = CampaignProgress(program, "color-1", stream=stream)
    bar(
        {
            "event": "state",
            "state": "resumed",
            "progress": {"experiments": 7, "best": {"value": 2.5}},
        }
    )
    bar(finished("e8", 3.0, True, 8))  # worse than the best from before the stop
    bar.close(None)  # no summary (interrupted): the bar stays at the budget
    last = stream.getvalue().split("\r")[-1]
    assert "8/60" in last and "delta_e2000=2.5" in last, last
