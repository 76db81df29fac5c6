"""docs/campaigns.md, docs/reports.md and docs/vision.md run as written (tests/docpages.py).

campaigns.md's blocks run in order in one folder, as a reader follows the page: a short
copy of the colour match (``quick.md``), ``labbridge sim``, ``labbridge run`` and ``labbridge
resume`` on it, the journal's state machine, an agent's proposals. reports.md's blocks then
run in that same folder, on the campaign ``quick`` the page before ran (report, exports, the
error for a campaign the journal does not have, the Python API). vision.md's blocks run from
the repository root. The commands join the session's Ray through ``RAY_ADDRESS`` (the
variable the pages document) instead of each starting one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from docpages import Block, blocks, run_script, strays

from loops.journal import Journal

#: page -> the fewest blocks it must have (a page that lost its examples fails)
PAGES = {"campaigns.md": 6, "reports.md": 4, "vision.md": 2}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_code_block_is_one_the_harness_runs(page: str) -> None:
    found = blocks(page)
    assert len(found) >= PAGES[page], f"{page}: expected its examples, found {len(found)} blocks"
    assert not strays(page), (
        f"blocks this harness does not run (make them python, sh or file=..., or teach it): "
        f"{strays(page)}"
    )


def _run_page(page: str, folder: Path | None, env: dict[str, str]) -> list[str]:
    """Run every block of ``page`` in order in ``folder``; each block's stdout + stderr."""
    out = []
    for block in blocks(page):
        assert block.file is None, f"{block.where}: these pages have no file blocks"
        done = run_script(block, folder, timeout=90, env=env)
        out.append(done.stdout + done.stderr)
    return out


def _ray_env(ray_session: Any) -> dict[str, str]:
    return {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


@pytest.mark.timeout(60)
def test_vision_page_runs_as_written() -> None:
    ran = _run_page("vision.md", None, {})
    assert any("mL, Lab" in out for out in ran), ran  # the example's own line
    assert any("goals:" in out for out in ran), ran  # the benchmark's summary


@pytest.mark.timeout(420)
def test_campaigns_then_reports_pages_run_as_written(ray_session: Any, tmp_path: Path) -> None:
    env = _ray_env(ray_session)
    ran = _run_page("campaigns.md", tmp_path, env)
    assert any("campaign quick: done: experiment budget spent: 2 of 2" in o for o in ran), ran
    j = Journal(tmp_path / "runs" / "quick" / "journal.db")
    try:
        assert j.campaign("quick").state == "done"
        assert [e.state for e in j.experiments("quick")] == ["done", "done"]
    finally:
        j.close()
    j = Journal(tmp_path / "runs" / "agents" / "journal.db")
    try:
        proposers = [(e.proposer, e.state) for e in j.experiments("agents")]
    finally:
        j.close()
    assert proposers[:2] == [("agent:alice", "rejected"), ("agent:alice", "done")], proposers
    assert (tmp_path / "runs" / "sim-quick" / "report" / "report.html").is_file()

    _run_page("reports.md", tmp_path, env)
    assert (tmp_path / "runs" / "quick" / "report" / "report.html").is_file()
    assert (tmp_path / "runs" / "quick" / "export" / "quick-experiments.csv").is_file()


def test_sh_blocks_stop_at_the_first_failing_command(tmp_path: Path) -> None:
    """The harness's own check: a command that fails fails its block (``set -e``)."""
    block = Block("test", 1, "sh", None, "false\ntouch ran-on\n")
    with pytest.raises(AssertionError, match="test:1: the block failed"):
        run_script(block, tmp_path)
    assert not (tmp_path / "ran-on").exists()
