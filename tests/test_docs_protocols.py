"""docs/protocols.md runs as written: every fenced code block is a Python script, run here.

Each block runs in its own interpreter (``python -`` from the repository root), as a
reader pasting it would run it, so a block cannot lean on another's state and nothing it
starts (a pty, a Modbus server, a broker, an HTTP camera) outlives it. A block passes when
it exits 0: the blocks assert the bytes and payloads they show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocols.md"
FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```$", flags=re.S | re.M)
RUNNERS = {"python"}  # the languages this harness runs; any other fence fails the first test


def blocks() -> list[tuple[int, str, str]]:
    """``(line, language, code)`` of every fenced block of the page, in order."""
    text = DOC.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)
    ]


def test_every_code_block_is_one_the_harness_runs() -> None:
    found = blocks()
    assert len(found) >= 6, f"{DOC.name}: expected the protocol examples, found {len(found)} blocks"
    strays = [
        f"{DOC.name}:{line}: ```{lang or '(no language)'}"
        for line, lang, _ in found
        if lang not in RUNNERS
    ]
    assert not strays, f"blocks this test does not run (make them python, or teach it): {strays}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("line", "lang", "code"),
    [
        pytest.param(line, lang, code, id=f"{lang or 'plain'}-line{line}")
        for line, lang, code in blocks()
    ],
)
def test_block_runs_as_written(line: int, lang: str, code: str) -> None:
    if lang not in RUNNERS:
        pytest.fail(f"{DOC.name}:{line}: a ```{lang} block is not run by this harness")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-"],
        input=code,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, (
        f"{DOC.name}:{line}: the block failed\n{done.stdout}\n{done.stderr}"
    )
