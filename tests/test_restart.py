"""Issue 17: a station survives the service's restart (docs/cluster.md, "When the service
restarts").

A Ray head started with ``ray start`` (token authentication, one node on this machine:
benchmarks/twonode.py without its bench node) offers bench-a, whose simulators run beside
it. ``labbridge serve`` joins it as a subprocess (its station and journal actors are then
detached), a campaign of one experiment starts over MQTT, and the service is killed with
SIGKILL during the experiment's hold step:

- started again within the lease (lab.yaml ``ray.lease_s``), the service finds the station
  actor still running the experiment, takes its lease over and waits for its outcome: the
  experiment is journaled done once, each of its steps started once, and on the hotplate's
  own wire the heater stayed on through the restart (one heating period, its device
  watchdog never tripped);
- killed and left beyond the lease, the station trips on its own (heater off),
  and ``labbridge resume`` recovers it and closes the experiment failed, never re-run.

Both end with an orderly stop, which ends the detached actors (none is left in the lab's
namespace). Both are long tests (about 55 s and 30 s with the head's start): the short form
of the first is tests/test_takeover.py (the take-over and the adoption, on the session's
Ray, without ``ray start`` or the service).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_mosquitto
from test_cluster import labbridge, stop, wait_for

from benchmarks.twonode import RAY, HotplateProbe, TwoNodeCluster
from loops.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
#: simulated seconds per real second: the hold (1500-1600 simulated s) lasts 15-16 real s,
#: longer than the service takes to start again here (5-10 s)
SPEED = 100.0
#: lab.yaml ray.lease_s for the restart within the lease (real s)
LEASE_S = 40.0


@pytest.fixture(scope="module")
def head() -> Iterator[TwoNodeCluster]:
    if not RAY.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    require_mosquitto()
    with TwoNodeCluster(1, 0, speed=SPEED, bench_node=False) as c:
        yield c


def program_text() -> str:
    """The colour match: one experiment, random, with a long hold (the service dies in it)."""
    text = EXAMPLE.read_text()
    for old, new in (
        ("budget: {experiments: 60, hours: 12}", "budget: {experiments: 1}"),
        ("strategy: bayes", "strategy: random"),
        ("initial_points: 8", "initial_points: 1"),
        ("  target: 2.0 ", "  target: null "),
        ("{type: int, low: 30, high: 600, unit: s,", "{type: int, low: 1500, high: 1600, unit: s,"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    return text


def write_lab(cluster: TwoNodeCluster, tmp_path: Path, lease_s: float) -> Path:
    config = yaml.safe_load(
        cluster.lab_yaml(
            tmp_path / "journal.db", mqtt={"url": cluster.broker_url(), "status_interval_s": 0.5}
        )
    )
    config["ray"]["lease_s"] = lease_s
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump(config, sort_keys=False))
    return lab


def online(proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, log.read_text()  # it ended: say why, now
    return " online at " in log.read_text()


def start_campaign(lab: Path, campaign_id: str) -> dict[str, Any]:
    from bridge.labconfig import load_lab
    from bridge.labmqtt import mqtt_settings
    from bridge.mqttcli import request

    config = load_lab(lab)
    reply, _ = asyncio.run(
        request(
            mqtt_settings(config, None),
            config.bridge_id,
            "campaigns/start",
            {"id": campaign_id, "program": program_text()},
            timeout=30,
        )
    )
    assert reply is not None and reply.get("ok"), reply
    return reply


def read_journal(store: Path, campaign: str) -> tuple[list[Any], dict[str, list[Any]], list[Any]]:
    """The campaign's experiments, each one's transitions, and the campaign's log."""
    if not store.exists():
        return [], {}, []
    j = Journal(store)
    try:
        exps = j.experiments(campaign)
        return exps, {e.id: j.transitions(e.id) for e in exps}, j.campaign_log(campaign)
    finally:
        j.close()


def in_hold(store: Path, campaign: str) -> bool:
    _, transitions, _ = read_journal(store, campaign)
    return any(
        t.event == "step_started" and "hold" in json.dumps((t.data or {}).get("step"))
        for ts in transitions.values()
        for t in ts
    )


def killed_in_hold(
    serve: subprocess.Popen[bytes], log: Path, lab: Path, store: Path, campaign_id: str
) -> float:
    """Once ``serve`` is online: start the campaign over MQTT, wait for its hold step, kill -9
    the service there (no orderly stop, nothing released); the time of the kill."""
    wait_for("the service online", lambda: online(serve, log), 150)
    start_campaign(lab, campaign_id)
    wait_for("the hold step started", lambda: in_hold(store, campaign_id), 120)
    serve.kill()
    serve.wait(timeout=30)
    return time.monotonic()


NAMED = """
import json, sys
import ray
from loops.raylinks import init_ray, named_actors

init_ray(sys.argv[1], token_file=sys.argv[2])
print(json.dumps(named_actors(sys.argv[3])))
ray.shutdown()
"""


def named_left(cluster: TwoNodeCluster, namespace: str) -> list[str]:
    """The named actors left in ``namespace`` (a small driver joins the head)."""
    done = subprocess.run(
        [sys.executable, "-c", NAMED, cluster.address, str(cluster.token_file), namespace],
        cwd=ROOT,
        env=cluster.driver_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def heating_periods(samples: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) of each run of samples with the heater on."""
    periods: list[tuple[float, float]] = []
    start: float | None = None
    for s in samples:
        if s["heater"] and start is None:
            start = s["t"]
        elif not s["heater"] and start is not None:
            periods.append((start, s["t"]))
            start = None
    if start is not None:
        periods.append((start, samples[-1]["t"]))
    return periods


@pytest.mark.long  # ~55 s with the head's start: its short form is tests/test_takeover.py
@pytest.mark.timeout(300)
def test_the_station_finishes_its_experiment_through_a_restart_of_the_service(
    head: TwoNodeCluster, tmp_path: Path
) -> None:
    lab = write_lab(head, tmp_path, LEASE_S)
    store, env = tmp_path / "journal.db", head.driver_env()
    probe = HotplateProbe(head, "bench-a", every_s=0.1)
    first_log, second_log = tmp_path / "serve-1.log", tmp_path / "serve-2.log"
    first = labbridge("serve", "--lab", str(lab), env=env, log=first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        t_kill = killed_in_hold(first, first_log, lab, store, "restart")
        second = labbridge("serve", "--lab", str(lab), env=env, log=second_log)
        wait_for("the service online again", lambda: online(second, second_log), 150)
        t_back = time.monotonic()
        assert t_back - t_kill < LEASE_S, (t_back - t_kill, second_log.read_text())
        print(f"the service was back online {t_back - t_kill:.1f} s after the kill")

        def campaign_done() -> bool:
            assert second is not None and second.poll() is None, second_log.read_text()
            exps, _, _ = read_journal(store, "restart")
            return bool(exps) and exps[0].state not in ("proposed", "queued", "running")

        wait_for("the experiment's outcome", campaign_done, 120)
    finally:
        text = stop(first, first_log)
        if second is not None:
            text += stop(second, second_log)
        samples = probe.samples()
        probe.close()
    assert second is not None and second.returncode == 0, text
    exps, transitions, log = read_journal(store, "restart")
    assert [e.state for e in exps] == ["done"], [(e.id, e.state, e.reason) for e in exps]
    (exp,) = exps
    steps = [t.step for t in transitions[exp.id] if t.event == "step_started"]
    assert steps == sorted(set(steps)), steps  # each step started once, in order
    done = [t for t in transitions[exp.id] if t.event == "state" and t.state == "done"]
    assert len(done) == 1, done
    taken = [r for r in log if r.event == "station" and r.data["station_state"] == "taken_over"]
    assert [r.data["station"] for r in taken] == ["bench-a"], [r.data for r in log]
    assert "carries on" in taken[0].data["reason"], taken[0].data
    assert not any(r.event == "station" and r.data["station_state"] == "recovered" for r in log), [
        r.data for r in log
    ]
    # the bench: heated once, without a gap through the restart, its watchdog never tripped
    periods = heating_periods(samples)
    assert len(periods) == 1, periods
    assert periods[0][0] < t_kill < t_back < periods[0][1], (periods, t_kill, t_back)
    assert not any(s["status"] & (1 << 4) for s in samples), "the hotplate's watchdog tripped"
    assert "resumed" in second_log.read_text() or "taken over" in second_log.read_text()
    assert named_left(head, "labbridge-" + yaml.safe_load(lab.read_text())["bridge_id"]) == []


@pytest.mark.long
@pytest.mark.timeout(300)
def test_beyond_the_lease_the_station_trips_and_resume_closes_the_experiment_failed(
    head: TwoNodeCluster, tmp_path: Path
) -> None:
    lab = write_lab(head, tmp_path, 3.0)
    store, env = tmp_path / "journal.db", head.driver_env()
    probe = HotplateProbe(head, "bench-a", every_s=0.1)
    serve_log, resume_log = tmp_path / "serve.log", tmp_path / "resume.log"
    serve = labbridge("serve", "--lab", str(lab), env=env, log=serve_log)
    resume: subprocess.Popen[bytes] | None = None
    try:
        t_kill = killed_in_hold(serve, serve_log, lab, store, "beyond")

        def heater_off() -> bool:
            return any(s["t"] > t_kill and not s["heater"] for s in probe.samples())

        wait_for("the station tripped on its lost lease", heater_off, 30)
        resume = labbridge(
            "resume",
            "beyond",
            "--lab",
            str(lab),
            "--no-progress",
            "--operator",
            "tester",
            env=env,
            log=resume_log,
        )
        resume.wait(timeout=200)
    finally:
        text = stop(serve, serve_log)
        if resume is not None:
            text += stop(resume, resume_log)
        probe.close()
    assert resume is not None and resume.returncode == 0, text
    exps, transitions, log = read_journal(store, "beyond")
    assert [e.state for e in exps] == ["failed"], [(e.id, e.state, e.reason) for e in exps]
    assert "interrupted" in (exps[0].reason or ""), exps[0].reason
    steps = [t.step for t in transitions[exps[0].id] if t.event == "step_started"]
    assert steps == sorted(set(steps)), steps  # never re-run
    recovered = [r for r in log if r.event == "station" and r.data["station_state"] == "recovered"]
    assert [r.data["station"] for r in recovered] == ["bench-a"], [r.data for r in log]
    assert named_left(head, "labbridge-" + yaml.safe_load(lab.read_text())["bridge_id"]) == []
