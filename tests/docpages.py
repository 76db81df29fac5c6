"""The one harness for docs/*.md: every fenced block of a page runs in the tests as written.

A block is either a **file** (its info string names one: ```` ```python file=tinylab/sim.py ````,
```` ```yaml file=lab.yaml ````): the page says "save this as ...", so the harness writes it,
under that name, into the page's working folder; or a **script** (```` ```python ````): it
runs in its own interpreter (``python -``, as a reader pasting it would run it) in that
folder, with the repository and the folder on ``PYTHONPATH``, after every file of the page
is written; or **commands** (```` ```sh ````): they run in ``bash`` with ``set -e -o
pipefail`` (each command must succeed) in that folder, with this interpreter's ``bin``
first on ``PATH`` (so ``labbridge`` and ``python`` are the ones under test). A page without
files runs its scripts from the repository root unless the test gives it a folder. A script
passes when it exits 0: the blocks assert what they show. Nothing a script starts outlives it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([\w+-]*)([^\n]*)\n(.*?)^```$", flags=re.S | re.M)
FILE_RE = re.compile(r"\s*file=(\S+)\s*")
RUNNERS = {"python", "sh"}  # the languages whose blocks run as scripts


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    file: str | None  # a file block: its path in the page's folder
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """Every fenced block of ``docs/<page>``, in order."""
    text = (DOCS / page).read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        info = m.group(2).strip()
        name = FILE_RE.fullmatch(info)
        if info and name is None:
            raise ValueError(f"{page}: ```{m.group(1)} {info}: only file=<path> is understood")
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(page, line, m.group(1), name.group(1) if name else None, m.group(3)))
    return out


def strays(page: str) -> list[str]:
    """Blocks the harness neither writes nor runs (each should be one or the other)."""
    return [
        f"{b.where}: ```{b.lang or '(no language)'}"
        for b in blocks(page)
        if b.file is None and b.lang not in RUNNERS
    ]


def write_files(page: str, folder: Path) -> list[Path]:
    """Write the page's file blocks into ``folder``; their paths."""
    written = []
    for b in blocks(page):
        if b.file is not None:
            path = folder / b.file
            if folder.resolve() not in path.resolve().parents:
                raise ValueError(f"{b.where}: file={b.file} is outside the page's folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.code, encoding="utf-8")
            written.append(path)
    return written


def run_script(
    block: Block,
    folder: Path | None,
    timeout: float = 80,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a script block in ``folder`` (None: the repository root), with ``env`` added to the
    environment; AssertionError if it fails. Returns the finished process (its output)."""
    cwd = folder if folder is not None else ROOT
    path = [
        str(ROOT),
        *([str(folder)] if folder is not None else []),
        os.environ.get("PYTHONPATH", ""),
    ]
    bin_dir = str(Path(sys.executable).parent)
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        **(env or {}),
    }
    if block.lang == "sh":
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
        stdin = ""
    else:
        argv, stdin = [sys.executable, "-"], block.code
    done = subprocess.run(
        argv,
        input=stdin,
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{block.where}: the block failed\n{done.stdout}\n{done.stderr}"
    return done
