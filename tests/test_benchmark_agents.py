"""benchmarks/agents.py's quick form runs as a person runs it and prints its whole table.

The script joins the session's Ray (``RAY_ADDRESS``, as docs/cluster.md documents) instead
of starting its own; it starts its own mosquitto, simulated station, service, MCP servers
(HTTP in its process, stdio as a subprocess) and flooding agents. The figures are not
judged here (no wall-clock thresholds in tests): that every part ran and measured is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "agents.py"
NUMBER = r"\s+\d+\.\d"


@pytest.mark.timeout(420)
def test_the_quick_form_measures_every_call_and_estop(
    ray_session: Any, mosquitto_bin: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-5000:])
    assert "1. tool-call latency (10 calls of each" in out, out
    for tool in ("dry_run", "propose"):  # stdio, HTTP and Python: median and p99 each
        assert re.search(rf"^    {tool}\s+({NUMBER}+\s+){{6}}{NUMBER}+x{NUMBER}+x$", out, re.M), out
    assert "2. e-stop -> last safe-state command on the wire (3 + 3 e-stops" in out, out
    cases = ("quiet", "while a process burns a core", "while agent flood floods")
    for case in (*cases, "while agent flood-open floods"):
        assert re.search(rf"^    {case}.*({NUMBER}+\s+){{4}}{NUMBER}+x$", out, re.M), (case, out)
    # the rate-limited flooder was told busy; the other's proposals reached the campaign
    assert re.search(r"^    flood: .*busy \(rate\) \d+", out, re.M), out
    assert re.search(r"^    flood-open: .*refused \((safety|quota)\) \d+", out, re.M), out
    # counted, not judged: a simulator starved of CPU may miss one (benchmarks/api.py)
    assert "e-stops with safe-state commands missing on the wire: " in out, out
    assert "nan" not in out, out
