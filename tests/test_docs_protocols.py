"""docs/*.md run as written: every fenced block of each page below is written or run here
(tests/docpages.py: ``file=`` blocks are saved into the page's folder, ``python`` blocks run
in their own interpreter there and pass when they exit 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
from docpages import Block, blocks, run_script, strays, write_files

#: page -> the fewest blocks it must have (a page that lost its examples fails)
PAGES = {"protocols.md": 6, "extending.md": 8}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_code_block_is_one_the_harness_runs(page: str) -> None:
    found = blocks(page)
    assert len(found) >= PAGES[page], f"{page}: expected its examples, found {len(found)} blocks"
    assert not strays(page), (
        f"blocks this harness does not run (make them python or file=..., or teach it): "
        f"{strays(page)}"
    )


def _scripts() -> list[Block]:
    return [b for page in sorted(PAGES) for b in blocks(page) if b.file is None]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"{b.page}-line{b.line}") for b in _scripts()]
)
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    folder = tmp_path if write_files(block.page, tmp_path) else None
    run_script(block, folder)
