"""docs/optimizer.md runs as written (tests/docpages.py): its blocks run in a folder that
has the repository's examples/ and benchmarks/ (as the repository root has): the
`labbridge sim` line on the page's one-experiment copy of the Pareto example (on the
tests' Ray), the two-objective benchmark's quick form, and the Python examples (the
prior's program.md excerpt is indented: tests/test_campaign_learning.py runs a campaign
with a prior)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from docpages import ROOT, blocks, run_script, strays

PAGE = "optimizer.md"


def test_every_code_block_is_one_the_harness_runs() -> None:
    assert [b.lang for b in blocks(PAGE)][:2] == ["python", "sh"]
    assert [b.lang for b in blocks(PAGE)].count("python") == 5
    assert [b.lang for b in blocks(PAGE)].count("sh") == 2
    assert not strays(PAGE), strays(PAGE)


@pytest.mark.timeout(240)
def test_optimizer_page_runs_as_written(ray_session: Any, tmp_path: Path) -> None:
    for name in ("examples", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    out = [run_script(b, tmp_path, timeout=180, env=env) for b in blocks(PAGE)]
    text = [o.stdout + o.stderr for o in out]
    assert any("campaign sim-pareto: done: experiment budget spent: 1 of 1" in t for t in text)
    assert (tmp_path / "runs" / "sim-pareto" / "report" / "report.html").is_file()
    assert any("('delta_e2000', 'minimize', 6.0)" in t for t in text)
    assert any("[ True  True False]" in t for t in text)
    assert any("'rule': 'vial.volume.max'" in t for t in text)  # the learned feasibility's
    assert any(t.startswith("8.775\n") for t in text)  # the cost-aware asks' block
    assert any("'of': 'duration', 'unit': 'min'" in t for t in text)
    assert any("branin-currin (reference point (18.0, 6.0))" in t for t in text)
    assert (tmp_path / "runs" / "optpareto" / "optpareto.json").is_file()
