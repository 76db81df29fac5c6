"""The results file a benchmark writes (``benchmarks/results/<name>.json``, and the printed
table next to it as ``<name>.txt``): its settings (seeds included), the machine it ran on
(CPUs, load average: the numbers of a shared machine are read with it), the versions of
every library that shapes a run, the summary and every run."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from benchmarks.peers import peer_versions

__all__ = ["machine", "write_results"]


def machine() -> dict[str, Any]:
    """Where and when a run happened: UTC date, Python, platform, CPUs, load average (1, 5,
    15 min, at the time of the call), this process's niceness (a niced run gets less CPU on a
    busy machine)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "nice": os.nice(0) if hasattr(os, "nice") else None,
    }


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def write_results(
    out: Path,
    args: Any,
    summary: dict[str, Any],
    runs: Sequence[Any],
    *,
    text: str | None = None,
    libraries: Sequence[str] = (),
) -> None:
    """Write ``out`` (JSON): ``settings`` (the parsed command line ``args``, seeds included),
    ``machine`` (:func:`machine`), ``versions`` (Python, the optimizer peers' libraries and
    the distributions named in ``libraries`` that are installed), ``summary`` and ``runs``
    (dataclasses or plain data). ``text``: the printed report, written next to it as
    ``out`` with the suffix ``.txt``."""
    versions = {"python": sys.version.split()[0], **peer_versions()}
    for dist in libraries:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    doc = {
        "settings": {k: _plain(v) for k, v in vars(args).items()},
        "machine": machine(),
        "versions": versions,
        "summary": summary,
        "runs": [asdict(r) if is_dataclass(r) and not isinstance(r, type) else r for r in runs],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    if text is not None:
        out.with_suffix(".txt").write_text(text if text.endswith("\n") else text + "\n")
