"""benchmarks/api.py's report (benchmarks/apireport.py) and results file, from made-up
measurements (the benchmark itself runs in CI as ``python benchmarks/api.py --quick``:
.ci/run; its full form's numbers are in benchmarks/results/api.txt and docs/mqtt-api.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import apireport as api_bench  # noqa: E402
from benchmarks.resultsfile import write_results  # noqa: E402


def _runs(case: str, wire_ms: list[float]) -> list[api_bench.EStopRun]:
    out = []
    for i, w in enumerate(wire_ms):
        for via, scale in (("mqtt", 1.0), ("direct", 0.8)):
            hops = {"rx": 0.5, "handler": 0.8, "wire_last": w * scale} if via == "mqtt" else {}
            out.append(
                api_bench.EStopRun(
                    case, via, w * scale / 1e3, w * scale / 1e3 + 0.002, 12, [], [], hops, seq=i
                )
            )
    return out


def test_report_and_results_file_carry_every_case_the_load_and_the_run_time(
    tmp_path: Path,
) -> None:
    ns = argparse.Namespace(
        starts=1, estops=4, warmup=2, results=10, speed=1000.0, flood_rate=1000.0,
        storm_mb=10.0, storm_rate=2.0, out=tmp_path / "api.json", quick=False, verbose=False,
    )  # fmt: skip
    start = api_bench.Start("mqtt", "c-1", 0.0, 0.0, 0.04, 0.06, 0.003)
    r = api_bench.Results(
        [start, api_bench.Start("direct", "c-2", 0.0, 0.0, None, 0.05, 0.003)],
        _runs("quiet", [5, 6, 7, 40]),
        2000.0,
        6000.0,
        9.5,
        {
            "flood": (_runs("flood", [6, 6, 8, 9]), 10_000, 10.0),
            "storm": (_runs("storm", [7, 7, 9, 60]), 21, 10.0),
        },
        "mosquitto version 2.0.18",
    )
    summary = api_bench.summarize(ns, r, 61.4)
    assert summary["estop_goal_p99_ms"] == {"quiet": 40.0, "flood": 9.0, "storm": 60.0}
    assert not summary["estop_goal_met"]
    assert summary["estop"]["quiet"]["mqtt"]["wire"] == {
        "n": 4, "p50": 6.0, "p95": 40.0, "p99": 40.0, "max": 40.0
    }  # fmt: skip
    assert summary["estop"]["flood"]["load_msgs_per_s"] == 1000.0
    text = api_bench.report(ns, r, summary)
    # the run's own length, not a load client's (a loop variable once shadowed it)
    assert "(run took 61 s; load average" in text
    assert "flood  mqtt        4      6.0      9.0      9.0      9.0      1.00x      0.23x" in text
    assert "storm: under a 10 MB payload storm on campaigns/start (2.1 msg/s)" in text
    assert "storm  mqtt" in text and "storm #3" in text  # the slowest one, hop by hop
    assert "e-stop over MQTT -> last wire cmd, p99, storm     < 50 ms     60.0 ms  NO" in text

    runs = [*r.estops, *(e for x, _, _ in r.loaded.values() for e in x)]
    write_results(ns.out, ns, summary, runs, text=text, libraries=("paho-mqtt",))
    doc = json.loads(ns.out.read_text())
    assert doc["settings"]["estops"] == 4 and doc["settings"]["out"] == str(ns.out)
    assert len(doc["machine"]["load_avg"]) == 3 and doc["machine"]["cpus"] >= 1
    assert doc["versions"]["paho-mqtt"] and doc["summary"] == json.loads(json.dumps(summary))
    assert len(doc["runs"]) == 24 and doc["runs"][0]["hops"]["rx"] == 0.5
    assert (tmp_path / "api.txt").read_text() == text + "\n"
