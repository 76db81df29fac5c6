"""What a campaign knows beyond its declarations, on a simulated bench in this process (no
Ray): the dry run's refusals reach the optimizer with the rule that refused them, every
proposal is journaled with the feasibility model's prediction, and the report shows the
predictions against what happened; a second campaign starts from the first one's results
(``prior:``), told before its first proposal and journaled as such, not as its experiments.
Plus the program keys (``prior``, ``feasibility``) and the prior's errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from reference import local_bench
from test_program import BASE

from bridge.report import write_report
from loops.campaign import CampaignRunner, make_optimizer
from loops.campaignprior import PriorError, read_prior
from loops.journal import AsyncJournal, Journal
from loops.optspace import ParamSpace
from loops.program import Program, ProgramError, load_program

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
        # a second campaign over a narrower space starts from the first one's results
        narrow = overfilling_program(1)
        narrow = dataclasses.replace(
            narrow,
            prior=("learn",),
            parameters=tuple(
                dataclasses.replace(p, high=1.0) if p.name == "red_ml" else p
                for p in narrow.parameters
            ),
        )
        with pytest.raises(PriorError, match="no campaign 'nope'.*it has: learn"):
            await CampaignRunner(
                dataclasses.replace(narrow, prior=("nope",)),
                b.journal,
                {"bench-a": b.station},
                campaign_id="typo",
                clock_now=b.now,
            ).prepare()
        second = CampaignRunner(
            narrow, b.journal, {"bench-a": b.station}, campaign_id="next", clock_now=b.now
        )
        await second.prepare()
        told_first = second.optimizer.observations()
        second_summary = await second.run()
    await check_prior(b.lab.store, tmp_path, told_first, second_summary.counts)
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


async def check_prior(store: Path, tmp_path: Path, told: list[Any], counts: dict[str, Any]) -> None:
    """The second campaign: the first one's points inside its space told before its first
    ask, the rest dropped and counted, one experiment of its own, all in the journal."""
    j = Journal(store)
    try:
        first = j.experiments("learn")
        mine = j.experiments("next")
        rows = [t for t in j.campaign_log("next") if t.event == "prior"]
        assert "typo" not in {c.id for c in j.campaigns()}  # an unknown prior created nothing
    finally:
        j.close()
    inside = [e for e in first if e.params["red_ml"] <= 1.0 and e.state in ("done", "rejected")]
    assert len(told) == len(inside) and len(inside) < len(first)
    assert len(mine) == 1 and counts["run"] == 1  # the prior results are not its experiments
    (row,) = rows
    assert row.data["prior"] == "learn" and row.data["told"] == len(inside)
    assert row.data["dropped"] == {"outside this space": len(first) - len(inside)}
    assert sorted(row.data["experiments"]) == sorted(e.id for e in inside)
    page = write_report(store, "next", tmp_path / "report-next").read_text()
    assert "Prior results" in page and "started from campaign learn" in page


async def test_prior_errors_name_what_is_wrong(tmp_path: Path) -> None:
    async with await AsyncJournal.open(tmp_path / "j.db") as journal:
        await journal.call(Journal.create_campaign, "old", "demo", "x")
        eid = await journal.call(Journal.propose, "old", {"a": 5.0}, "operator")
        await journal.call(Journal.reject, eid, ["too hot"])

        def outcome(m: Any) -> tuple[float | None, None]:
            return None, None

        space = ParamSpace.of({"a": (0.0, 1.0, float)})
        with pytest.raises(PriorError, match="shares no parameter.*its: a; this one's: b"):
            await read_prior(
                journal, "old", ParamSpace.of({"b": (0.0, 1.0)}), outcome, this_campaign="new"
            )
        with pytest.raises(PriorError, match="none of campaign 'old'.*1 outside this space"):
            await read_prior(journal, "old", space, outcome, this_campaign="new")
        with pytest.raises(PriorError, match="its own results"):
            await read_prior(journal, "old", space, outcome, this_campaign="old")
        wide = ParamSpace.of({"a": (0.0, 10.0, float)})
        prior = await read_prior(journal, "old", wide, outcome, this_campaign="new")
        assert [(p.params, p.status) for p in prior.points] == [({"a": 5.0}, "infeasible")]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("prior: []", "an empty list"),
        ("prior: [a, a]", "named twice"),
        ("prior: 7", "non-empty string"),
        ("feasibility: maybe", "one of learned, declared"),
    ],
)
def test_bad_program_keys_say_what_is_wrong(line: str, words: str) -> None:
    with pytest.raises(ProgramError, match=words) as info:
        load_program(BASE.replace("seed: 1", f"seed: 1\n{line}"), source="demo.md")
    assert info.value.field == line.split(":")[0]


def test_program_keys_prior_and_feasibility() -> None:
    text = BASE.replace("initial_points: 8\n", "").replace(
        "seed: 1", "seed: 1\nprior: old-run\nfeasibility: declared"
    )
    p = load_program(text, source="demo.md")
    assert p.prior == ("old-run",) and p.feasibility == "declared"
    assert p.initial_points == 0  # the prior's results are the design
    back = load_program(p.to_markdown())
    assert back.prior == ("old-run",) and back.feasibility == "declared"
    assert load_program(BASE).prior == () and load_program(BASE).feasibility == "learned"
    assert make_optimizer(p).learn_feasibility is False  # what the optimizer then does
    assert make_optimizer(load_program(BASE)).learn_feasibility is True
