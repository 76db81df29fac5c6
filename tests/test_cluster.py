"""Issue 17: campaigns on a real two-node Ray cluster, and a node that dies under one.

One cluster for the module (benchmarks/twonode.py): a head and a bench node started with
``ray start`` and token authentication, the bench node in a network namespace of its own
joined to the head by a veth pair (10.77.N.1 / 10.77.N.2), each node offering the
``station:<name>`` resource of its bench, whose simulators run on that node (in its
namespace: bench-b's instruments answer on the namespace's loopback, so only an actor on
the bench node reaches them). Without namespaces (not root) the two nodes share this
machine's address (Ray lets no second node join over loopback) and the join test says so.

Drivers join from the head's side as a lab's would: ``$RAY_ADDRESS`` (a small driver),
lab.yaml ``ray.address`` (``labbridge run``, the node-death test) and ``--ray-address``
(``labbridge run``, a long test: the node-death test runs a campaign on both nodes too),
the token from the file lab.yaml names. The node-death test SIGKILLs the bench node's raylet while bench-b's
hotplate heats (seen on the hotplate's own Modbus wire), and checks the campaign: the
experiment on the dead node failed with the step in progress and never re-ran, the
station out with the reason, bench-a carried on, the hotplate switched itself off (its
device watchdog), and once the node is back the station was recovered and rejoined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_mosquitto

from benchmarks.twonode import RAY, HotplateProbe, TwoNodeCluster
from loops.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
#: simulated seconds per real second: an experiment takes a few real seconds
SPEED = 500.0
#: the node-death campaign's experiments: bench-a runs alone while the bench node restarts
#: (20-30 s on a loaded 2-core machine), bench-b gets some of the rest once it rejoined
BUDGET = 16
#: hotplate status bit4: the device watchdog switched heater and stirrer off
WATCHDOG_TRIPPED = 1 << 4


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodeCluster]:
    if not RAY.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    require_mosquitto()
    with TwoNodeCluster(1, 1, speed=SPEED) as c:
        yield c


def program(path: Path, experiments: int) -> Path:
    """The colour match with random proposals and only an experiment budget (a short run)."""
    text = EXAMPLE.read_text()
    for old, new in (
        ("budget: {experiments: 60, hours: 12}", f"budget: {{experiments: {experiments}}}"),
        ("strategy: bayes", "strategy: random"),
        ("initial_points: 8", "initial_points: 1"),
        ("  target: 2.0 ", "  target: null "),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def labbridge(*argv: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", *argv],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finished(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(
            f"labbridge did not end within {timeout} s:\n{log.read_text()}"
        ) from None
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


def stop(proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> str:
    """SIGTERM (an orderly stop), SIGKILL after ``timeout`` s; the process's log."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return log.read_text()


def wait_for(what: str, check: Any, timeout: float, every: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")


def journal_log(store: Path, campaign: str) -> list[Any]:
    if not store.exists():
        return []
    j = Journal(store)
    try:
        return j.campaign_log(campaign)
    finally:
        j.close()


JOIN = """
import json, sys
import ray
from loops.raylinks import init_ray

init_ray(token_file=sys.argv[1])  # the address from $RAY_ADDRESS

@ray.remote(num_cpus=0)
def where() -> list[str]:
    return [ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()]

print(json.dumps({n: ray.get(where.options(resources={f"station:{n}": 1}).remote(), timeout=60)
                  for n in ("bench-a", "bench-b")}))
ray.shutdown()
"""


@pytest.mark.timeout(300)  # the module's cluster starts in its set-up (30-70 s, 240 s at most)
def test_a_driver_joins_with_ray_address_and_finds_each_bench_on_its_own_node(
    cluster: TwoNodeCluster,
) -> None:
    env = {**cluster.driver_env(), "RAY_ADDRESS": cluster.address}
    done = subprocess.run(
        [sys.executable, "-c", JOIN, str(cluster.token_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    assert placed["bench-a"][0] != placed["bench-b"][0], placed  # two nodes
    ips = {name: ip for name, (_, ip) in placed.items()}
    assert ips == {"bench-a": cluster.nodes["head"].ip, "bench-b": cluster.nodes["bench"].ip}
    if cluster.netns_skipped is None:
        assert not ips["bench-b"].startswith("127."), ips  # a lab network's address
    else:
        print(f"the bench node shares this machine's address: {cluster.netns_skipped}")


@pytest.mark.long  # CI time: the node-death test below runs a campaign across both nodes too
@pytest.mark.timeout(240)
def test_a_campaign_runs_across_both_nodes(cluster: TwoNodeCluster, tmp_path: Path) -> None:
    """``labbridge run --lab --ray-address``: both benches run experiments, each on its own
    node (bench-b's instruments answer only inside the bench node's namespace)."""
    store = tmp_path / "journal.db"
    lab = tmp_path / "lab.yaml"
    lab.write_text(cluster.lab_yaml(store, with_address=False))
    prog = program(tmp_path / "program.md", 4)
    log = tmp_path / "run.log"
    run = labbridge(
        "run",
        str(prog),
        "--lab",
        str(lab),
        "--campaign-id",
        "across",
        "--no-progress",
        "--ray-address",
        cluster.address,
        env=cluster.driver_env(),
        log=log,
    )
    text = finished(run, log, 200)
    assert "campaign across: done: experiment budget spent: 4 of 4" in text, text
    j = Journal(store)
    try:
        exps = j.experiments("across")
    finally:
        j.close()
    assert [e.state for e in exps] == ["done"] * 4, exps
    assert {e.station for e in exps} == {"bench-a", "bench-b"}, [e.station for e in exps]


@pytest.mark.timeout(300)
def test_a_node_dies_mid_campaign_and_its_station_rejoins_when_it_is_back(
    cluster: TwoNodeCluster, tmp_path: Path
) -> None:
    store = tmp_path / "journal.db"
    lab = tmp_path / "lab.yaml"
    lab.write_text(cluster.lab_yaml(store))  # ray.address: the head
    prog = program(tmp_path / "program.md", BUDGET)
    log = tmp_path / "run.log"
    probe = HotplateProbe(cluster, "bench-b")
    try:
        run = labbridge(
            "run",
            str(prog),
            "--lab",
            str(lab),
            "--campaign-id",
            "death",
            "--no-progress",
            "--rejoin",
            "--operator",
            "tester",
            env=cluster.driver_env(),
            log=log,
        )
        try:
            # bench-b's hotplate heats (on its wire): its node dies now
            wait_for(
                "bench-b's heater on",
                lambda: any(s["heater"] for s in probe.samples()),
                150,
            )
            t_kill = time.monotonic()
            cluster.kill_node("bench")

            # the bench fails safe on its own: its device watchdog (nobody writes any more)
            def watchdog_off() -> dict[str, Any] | None:
                after = [s for s in probe.samples() if s["t"] > t_kill]
                off = [s for s in after if not s["heater"] and s["status"] & WATCHDOG_TRIPPED]
                return off[0] if off else None

            off = wait_for("the hotplate's watchdog switched it off", watchdog_off, 30)
            assert not off["stirrer"], off

            # the campaign: bench-b out with the reason, its experiment failed mid-step
            def failed_on_b() -> Any:
                rows = journal_log(store, "death")
                return next(
                    (
                        r
                        for r in rows
                        if r.event == "state"
                        and r.state == "failed"
                        and "bench-b" in str((r.data or {}).get("reason"))
                    ),
                    None,
                )

            failed = wait_for("bench-b's experiment journaled failed", failed_on_b, 60, 0.5)
            reason = failed.data["reason"]
            assert "died" in reason and "during step" in reason, reason
            cluster.restart_node("bench")  # the bench PC is back

            def rejoined() -> Any:
                rows = journal_log(store, "death")
                return next(
                    (
                        r
                        for r in rows
                        if r.event == "station"
                        and (r.data or {}).get("station_state") == "rejoined"
                    ),
                    None,
                )

            back = wait_for("bench-b rejoined", rejoined, 120, 0.5)
            assert "recovered by tester" in back.data["reason"], back.data
            assert f"back on node {cluster.nodes['bench'].ip}" in back.data["reason"], back.data
            text = finished(run, log, 200)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(timeout=30)
    finally:
        probe.close()
    assert f"campaign death: done: experiment budget spent: {BUDGET} of {BUDGET}" in text, text

    j = Journal(store)
    try:
        exps = j.experiments("death")
        rows = j.campaign_log("death")
        steps = {
            e.id: [t.step for t in j.transitions(e.id) if t.event == "step_started"] for e in exps
        }
    finally:
        j.close()
    dead = failed.experiment_id
    outs = [r for r in rows if r.event == "station" and r.data["station_state"] == "out"]
    assert [r.data["station"] for r in outs] == ["bench-b"], outs
    assert "died" in outs[0].data["reason"], outs[0].data
    by_id = {e.id: e for e in exps}
    assert by_id[dead].state == "failed" and by_id[dead].station == "bench-b"
    assert sum(e.state == "failed" for e in exps) == 1, [(e.id, e.state, e.reason) for e in exps]
    assert sum(e.state == "done" for e in exps) == BUDGET - 1
    for eid, started in steps.items():  # nothing re-run: each step started once
        assert len(started) == len(set(started)), (eid, started)
    # bench-a carried on while bench-b was down; bench-b ran again after it rejoined
    after_kill = [e for e in exps if e.created > failed.t and e.state == "done"]
    assert any(e.station == "bench-a" and e.created < back.t for e in after_kill), exps
    assert any(e.station == "bench-b" and e.created > back.t for e in exps), exps


def retained(lab: Path, env: dict[str, str], *campaigns: str) -> dict[str, Any]:
    """The service's retained messages (``labbridge status --json``): ``status`` and
    ``campaign:<id>`` for each of ``campaigns``; {} before it serves."""
    also = [a for c in campaigns for a in ("--campaign", c)]
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "status", "--lab", str(lab), "--json", *also],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return dict(json.loads(done.stdout)) if done.stdout.strip() else {}


def status(lab: Path, env: dict[str, str]) -> dict[str, Any]:
    """The service's retained status, {} before it serves."""
    return dict(retained(lab, env).get("status") or {})


@contextlib.contextmanager
def serving(
    cluster: TwoNodeCluster, tmp_path: Path, *options: str
) -> Iterator[tuple[Path, dict[str, str], subprocess.Popen[bytes], Path]]:
    """``labbridge serve --lab`` on the head's side with both stations online: yields (lab.yaml,
    env, the process, its log); terminated on exit (it must stop in order: exit code 0)."""
    cluster.ensure_up()
    lab = tmp_path / "lab.yaml"
    mqtt = {"url": cluster.broker_url(), "status_interval_s": 0.5}
    lab.write_text(cluster.lab_yaml(tmp_path / "journal.db", mqtt=mqtt))
    env = cluster.driver_env()
    log = tmp_path / "serve.log"
    serve = labbridge("serve", "--lab", str(lab), *options, env=env, log=log)
    try:

        def both_ok() -> bool:
            assert serve.poll() is None, log.read_text()  # it ended: say why, now
            st = status(lab, env)
            stations = st.get("stations") or {}
            return st.get("state") == "online" and all(
                stations.get(n, {}).get("ok") for n in ("bench-a", "bench-b")
            )

        wait_for("the service online with both stations", both_ok, 150, 0.5)
        yield lab, env, serve, log
        assert serve.poll() is None, log.read_text()  # still serving
    finally:
        text = stop(serve, log, timeout=60)
    assert serve.returncode == 0, text


def b_died(st: dict[str, Any]) -> bool:
    """Whether the service's status names bench-b's death: first "not answering"
    (ActorUnavailableError) while Ray's health checks run, then "died" once the node is
    declared dead."""
    b = (st.get("stations") or {}).get("bench-b") or {}
    return bool(b) and not b.get("ok") and "died" in b.get("error", "")


@pytest.mark.timeout(240)
def test_the_service_survives_a_station_nodes_death_and_reports_it(
    cluster: TwoNodeCluster, tmp_path: Path
) -> None:
    """``labbridge serve`` on the head holds both stations; the bench node dies: the service
    stays online, its status names bench-b's death, and an e-stop still trips bench-a (and
    reports bench-b's error instead of hanging on it)."""
    with serving(cluster, tmp_path) as (lab, env, _, _):
        cluster.kill_node("bench")
        st = wait_for(
            "bench-b's death in the service's status",
            lambda: (st := status(lab, env)) and b_died(st) and st,
            90,
            0.5,
        )
        assert st["state"] == "online", st
        assert st["stations"]["bench-a"]["ok"], st["stations"]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bridge.cli",
                "estop",
                "--lab",
                str(lab),
                "--json",
                "--reason",
                "test: after a node died",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        reply = json.loads(done.stdout)
        assert reply["stations"]["bench-a"]["ok"], reply
        assert "error" in reply["stations"]["bench-b"], reply


@pytest.mark.timeout(300)
def test_serve_rejoin_brings_a_dead_nodes_station_back_into_its_campaign(
    cluster: TwoNodeCluster, tmp_path: Path
) -> None:
    """``labbridge serve --rejoin``: a campaign started over MQTT on both benches; the bench
    node dies while bench-b runs an experiment: the campaign's retained status shows bench-b
    out (died) and the service's status its death; the node comes back: bench-b is
    recovered in the --operator's name, the campaign's status shows it rejoined (the node's
    address) and it takes work again, the service's status sees the new actor, and the
    journal has the station's out and rejoined events."""
    from bridge.labconfig import load_lab
    from bridge.labmqtt import mqtt_settings
    from bridge.mqttcli import request

    with serving(cluster, tmp_path, "--rejoin", "--operator", "tester") as (lab, env, _, _):
        config = load_lab(lab)
        start = {
            "id": "svc",
            "program": program(tmp_path / "program.md", 200)
            .read_text()
            .replace("no_improvement: 20", "no_improvement: 200"),  # runs until stopped
            "lab": {"stations": ["bench-a", "bench-b"]},
        }
        reply, _ = asyncio.run(
            request(mqtt_settings(config), config.bridge_id, "campaigns/start", start, timeout=30)
        )
        assert reply is not None and reply["ok"], reply

        def b_is(pred: Any) -> Any:
            """bench-b in the campaign's status (its progress) and the service's: pred(b, s)."""

            def check() -> Any:
                found = retained(lab, env, "svc")
                cs = found.get("campaign:svc") or {}
                b = ((cs.get("progress") or {}).get("stations") or {}).get("bench-b")
                st = ((found.get("status") or {}).get("stations") or {}).get("bench-b")
                return b if b and st and pred(b, st) else None

            return check

        wait_for("bench-b running an experiment", b_is(lambda b, _: b["state"] == "busy"), 90, 0.5)
        cluster.kill_node("bench")
        wait_for(
            "bench-b out (died) in the campaign's status, dead in the service's",
            b_is(lambda b, st: b["state"] == "out" and "died" in b["reason"] and not st["ok"]),
            60,
            0.5,
        )
        cluster.restart_node("bench")  # the bench PC is back
        b = wait_for(
            "bench-b rejoined in the campaign's status",
            b_is(lambda b, _: b["state"] != "out" and b["rejoined"]),
            90,
            0.5,
        )
        assert "recovered by tester (trip, reset, drain)" in b["rejoined"], b
        assert f"back on node {cluster.nodes['bench'].ip}" in b["rejoined"], b
        wait_for(  # it takes work again, and the service's own calls reach its new actor
            "bench-b running again and answering the service",
            b_is(lambda now, st: (now["runs"] > b["runs"] or now["state"] == "busy") and st["ok"]),
            60,
            0.5,
        )
    rows = journal_log(tmp_path / "journal.db", "svc")
    events = [(r.data["station"], r.data["station_state"]) for r in rows if r.event == "station"]
    assert events[:2] == [("bench-b", "out"), ("bench-b", "rejoined")], events
