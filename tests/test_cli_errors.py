"""Errors, never tracebacks (issue 13): bad input and environment problems give one line saying
what is wrong and what to do; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.cliparser import build_parser
from loops.raylinks import RayUnreachable, check_ray_address

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
LAB = ROOT / "examples" / "lab-hardware.yaml"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def labbridge(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ("seed: " + "[" * 5000 + "]" * 5000, "front matter is nested more than 100 levels deep"),
        (
            "seed: 1\nx0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n"
            + "".join(
                f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)
            ),
            "front matter is too large: more than 100000 values",
        ),
    ],
)
def test_check_names_a_hostile_program_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], replace: str, message: str
) -> None:
    program = tmp_path / "program.md"
    program.write_text(EXAMPLE.read_text().replace("seed: 1", replace, 1))
    assert main(["check", str(LAB), "--program", str(program)]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and "RecursionError" not in err
    assert len(err.splitlines()) <= 2, err


def test_sim_with_a_broker_at_a_closed_port_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = closed_port()
    code = main(["sim", "--broker", f"mqtt://127.0.0.1:{port}", "--out", str(tmp_path / "r")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"labbridge sim: no MQTT broker answers at 127.0.0.1:{port} (connection refused): start "
        "it, fix --broker, or leave --broker out (labbridge sim then starts its own broker)"
    )


def test_an_unreachable_ray_address_is_refused_quickly() -> None:
    port = closed_port()
    with pytest.raises(RayUnreachable, match=rf"no Ray cluster answers at 127.0.0.1:{port}"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(RayUnreachable, match="is not host:port"):
        check_ray_address("127.0.0.1:six")


def test_serve_with_an_unreachable_ray_address_prints_one_line() -> None:
    port = closed_port()
    done = labbridge("serve", "--lab", str(LAB), "--ray-address", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"labbridge serve: no Ray cluster answers at 127.0.0.1:{port} (connection refused): "
        f"start its head there (ray start --head --port={port}), {FIX_ADDRESS}"
    )


FIX_ADDRESS = (
    "fix --ray-address, lab.yaml ray.address or $RAY_ADDRESS, or leave them out to run a local Ray"
)


def not_ray(address: str, why: str) -> str:
    return (
        f"no Ray cluster answers at {address} ({why}): give the Ray head's address and the "
        f"--port it was started with (ray start --head --port=...): {FIX_ADDRESS}"
    )


def in_own_group(*args: str) -> tuple[int, str]:
    """``labbridge ARGS`` (with a Ray token, as a real join has) in a process group of its own:
    its exit code and stderr, after checking that nothing of that group outlives it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_TOKEN": "ab" * 32}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(ProcessLookupError):  # no Ray process (nor any other) left behind
        os.killpg(proc.pid, 0)
    return proc.returncode, err


@pytest.fixture
def web_server() -> Iterator[str]:
    """A real server that is not Ray on 127.0.0.1 (HTTP/1.1: it answers Ray's gRPC with a 400)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_serve_with_a_silent_listener_as_ray_address_ends_in_one_line() -> None:
    """Something listens at the address and says nothing: ray.init would retry for ever,
    printing only rpc_client.h warnings; the join ends within the probe's 5 s."""
    with socket.socket() as silent:  # listening, never accepting: the kernel completes connects
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, err = in_own_group("serve", "--lab", str(LAB), "--ray-address", address)
        took = time.monotonic() - started
    assert code == 1
    assert err.strip() == "labbridge serve: " + not_ray(
        address, "something listens there but said nothing within 5 s"
    )
    assert took < 20, took


@pytest.mark.timeout(60)
def test_a_web_server_as_ray_address_ends_in_one_line(tmp_path: Path, web_server: str) -> None:
    """``run --ray-address`` and lab.yaml ``ray.address`` naming a port where a web server
    listens: one line, exit 1, nothing left running; ``--debug`` shows the traceback."""
    why = "something listens there but does not speak gRPC, as Ray does"
    code, err = in_own_group("run", str(EXAMPLE), "--lab", str(LAB), "--ray-address", web_server)
    assert code == 1
    assert err.strip() == f"labbridge run: RayUnreachable: {not_ray(web_server, why)}"
    lab = tmp_path / "lab.yaml"
    text = LAB.read_text()
    assert "  address: null" in text
    lab.write_text(text.replace("  address: null", f'  address: "{web_server}"', 1))
    code, err = in_own_group("--debug", "serve", "--lab", str(lab))  # (one line without)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.strip().endswith(f"loops.rayprobe.RayUnreachable: {not_ray(web_server, why)}")


@pytest.mark.timeout(120)
def test_sim_without_dbus_daemon_says_so_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with mosquitto but without dbus-daemon
    bin_dir.mkdir()
    mosquitto = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if mosquitto:
        (bin_dir / "mosquitto").symlink_to(mosquitto)
    args = ["sim", "--no-progress", "--out"]
    done = labbridge(*args, str(tmp_path / "a"), path=str(bin_dir))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("labbridge sim: the BLE simulator needs dbus-daemon (Linux)")
    assert "apt-get install dbus-daemon" in lines[-1]
    assert lines[-1].endswith("(BleSimulatorUnavailable; run with --debug for the traceback)")
    assert "Traceback" not in done.stderr
    debug = labbridge("--debug", *args, str(tmp_path / "b"), path=str(bin_dir))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "BleSimulatorUnavailable" in debug.stderr


HEAVY = ("ray", "bayes_opt", "scipy", "numpy", "cv2", "safety", "loops", "instruments", "paho")


def subcommands() -> list[str]:
    """Every ``labbridge`` subcommand, from the parser itself (a new one is in the list)."""
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_the_subcommand_list_is_the_parsers() -> None:
    assert {"sim", "serve", "agents", "mcp", "users", "drivers", "probe"} <= set(subcommands())


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help_loads_nothing_heavy(command: str | None) -> None:
    """``labbridge COMMAND --help`` once took 2-3 s: building the parser imported Ray, the
    optimizer (scipy) and the safety layer; ``report --help`` the plotting stack. (``report``
    and ``export`` read the journal, loops.journal: sqlite, nothing heavy.)"""
    heavy = [m for m in HEAVY if not (command in ("report", "export") and m == "loops")]
    args = [command, "--help"] if command else ["--help"]
    code = (
        "import contextlib, io, sys; from bridge.cliparser import build_parser\n"
        "with contextlib.redirect_stdout(io.StringIO()) as shown, "
        "contextlib.suppress(SystemExit):\n"
        f"    build_parser({command!r}).parse_args({args!r})\n"
        "assert 'usage: labbridge' in shown.getvalue(), shown.getvalue()\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
