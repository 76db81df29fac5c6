"""docs/optimizer.md runs as written (tests/docpages.py): its Python blocks run from the
repository root (the page's `labbridge sim` line is an indented example, a long run;
tests/test_pareto_campaign.py runs the same program in-process)."""

from __future__ import annotations

import pytest
from docpages import blocks, run_script, strays

PAGE = "optimizer.md"


def test_every_code_block_is_one_the_harness_runs() -> None:
    assert len(blocks(PAGE)) == 2
    assert not strays(PAGE), strays(PAGE)


@pytest.mark.timeout(120)
def test_optimizer_page_runs_as_written() -> None:
    scripts = [b for b in blocks(PAGE) if b.lang == "python"]
    assert len(scripts) == 2
    out = [run_script(b, None, timeout=100) for b in scripts]
    assert "('delta_e2000', 'minimize', 6.0)" in out[0].stdout
    assert "[ True  True False]" in out[1].stdout
