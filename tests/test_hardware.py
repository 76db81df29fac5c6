"""Hardware tier: probe every instrument of a real bench (skipped unless LABBRIDGE_LAB is set).

``LABBRIDGE_LAB`` names a YAML/JSON file with ``stations: {NAME: {instruments: [{name, kind,
url, options}]}}`` — the shape of ``lab.yaml`` (``labbridge sim`` writes one), so the tier can be
tried against a simulated lab too. Each instrument is connected, described, read once and put
in its safe state; nothing is actuated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

import instruments


def _lab_instruments() -> list[tuple[str, dict[str, Any]]]:
    path = os.environ.get("LABBRIDGE_LAB")
    if not path:
        return []
    lab = yaml.safe_load(Path(path).read_text())
    return [
        (f"{station}/{spec['name']}", spec)
        for station, body in lab["stations"].items()
        for spec in body["instruments"]
    ]


@pytest.mark.hardware
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("label", "spec"), _lab_instruments() or [("no-lab", {})])
async def test_instrument_answers_and_goes_safe(label: str, spec: dict[str, Any]) -> None:
    async with instruments.connect(spec["kind"], spec["url"], **spec.get("options", {})) as driver:
        description = driver.describe()
        assert description["kind"] == spec["kind"]
        reading = await driver.read()
        assert isinstance(reading, dict) and reading, f"{label}: empty reading"
        await driver.safe_state()
        await driver.safe_state()  # idempotent
