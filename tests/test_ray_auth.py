"""Ray's trust boundary (issue 13): a driver joins a cluster only with the cluster's token.

A real ``ray start --head --block`` with token authentication on 127.0.0.1 (its own temp
dir and port, stopped at the end), drivers in subprocesses (this process's Ray session, if
any, stays as it is): with the token (from a file, as lab.yaml ``ray.token_file`` names
it) a driver joins and runs a task on the head's ``station:`` resource; without a token,
or with another one, or with TLS settings the cluster does not use, ``labbridge serve
--ray-address`` exits with one line that says what to do. A head without authentication is refused, token or not. The local Ray ``init_ray``
starts asks for a token too (the session's, inherited).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.rayhead import ray_head
from bridge.labconfig import load_lab
from safety.yamldoc import ConfigError
from simulators.brokercerts import make_test_certificates

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "examples" / "lab-hardware.yaml"

DRIVER = """
import sys
import ray
from loops.raylinks import init_ray

init_ray(sys.argv[1], token_file=sys.argv[2] if len(sys.argv) > 2 else None)

@ray.remote(num_cpus=0, resources={"station:bench-t": 1})
def where() -> str:
    return "on the bench's node"

print("joined,", ray.get(where.remote(), timeout=60))
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(home: Path) -> dict[str, str]:
    """This environment without any Ray setting (nor this session's token) and with an
    empty home (no ``~/.ray/auth_token`` of the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=90, check=False
    )


@pytest.fixture
def token_head() -> Iterator[dict[str, Any]]:
    """A Ray head on 127.0.0.1 with token authentication and one ``station:bench-t`` unit."""
    with _head(auth=True) as head:
        yield head


@contextlib.contextmanager
def _head(*, auth: bool) -> Iterator[dict[str, Any]]:
    """``ray start --head --block`` on 127.0.0.1 in a temp dir of its own (token auth on or
    off), stopped (SIGTERM: it drains and stops every process it started) at the end."""
    # short: Ray's unix socket paths live under it (108 bytes at most)
    tmp = Path(tempfile.mkdtemp(prefix="rtk-", dir="/tmp"))
    home = tmp / "home"
    home.mkdir()
    token_file = tmp / "ray-token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    port = _free_port()
    env = {
        **_clean_env(home),
        "RAY_AUTH_MODE": "token" if auth else "disabled",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep every server on 127.0.0.1
    }
    try:
        with ray_head(
            port=port,
            env=env,
            temp=tmp / "ray",
            log=tmp / "head.log",
            resources={"station:bench-t": 1},
        ):
            yield {"address": f"127.0.0.1:{port}", "token_file": token_file, "home": home}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(240)
def test_a_driver_joins_a_token_cluster_only_with_its_token(token_head: dict[str, Any]) -> None:
    address, token_file = token_head["address"], token_head["token_file"]
    env = _clean_env(token_head["home"])

    done = _run([sys.executable, "-c", DRIVER, address, str(token_file)], env)
    assert done.returncode == 0, done.stderr
    assert "joined, on the bench's node" in done.stdout

    serve = [sys.executable, "-m", "bridge.cli", "serve", "--lab", str(LAB)]
    done = _run([*serve, "--ray-address", address], env)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "labbridge serve: joining a Ray cluster needs its token and none was found: save it "
        "in a file readable only by you and name that file in lab.yaml ray.token_file or "
        "$RAY_AUTH_TOKEN_PATH (print it on the head with ray get-auth-token), see "
        "docs/cluster.md"
    )

    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    done = _run([*serve, "--ray-address", address], wrong)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"labbridge serve: the Ray cluster at {address} refused the token from "
        "$RAY_AUTH_TOKEN: use the cluster's token (print it on the head with ray "
        "get-auth-token), see docs/cluster.md"
    )

    certs = token_head["home"].parent / "tls"  # TLS here, not on the cluster: one line at once
    certs.mkdir()
    ca, cert, key = make_test_certificates(certs, ("127.0.0.1",), client_auth=True)
    tls = {**env, "RAY_USE_TLS": "1", "RAY_TLS_CA_CERT": str(ca)}
    tls.update(RAY_TLS_SERVER_CERT=str(cert), RAY_TLS_SERVER_KEY=str(key))
    done = _run([*serve, "--ray-address", address], tls)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"labbridge serve: the Ray cluster at {address} does not use TLS and this process "
        "does (RAY_USE_TLS is set): unset RAY_USE_TLS, or restart the cluster's nodes with "
        "TLS, see docs/cluster.md"
    )

    missing = {**env, "RAY_AUTH_TOKEN_PATH": str(token_file.with_name("no-such-file"))}
    done = _run([*serve, "--ray-address", address], missing)
    assert done.returncode == 1
    assert done.stderr.strip().startswith(
        f"labbridge serve: cannot read the token file {token_file.with_name('no-such-file')} "
        "($RAY_AUTH_TOKEN_PATH): No such file or directory: save the cluster's Ray token there"
    ), done.stderr


@pytest.mark.timeout(120)
def test_the_local_ray_asks_for_a_token_too(ray_session: Any, tmp_path: Path) -> None:
    """The session's Ray (``init_ray``, loopback) is reachable by every local user: it has
    token authentication on; a driver with the inherited token joins, one without cannot."""
    assert os.environ["RAY_AUTH_MODE"] == "token"
    address = ray_session.get_runtime_context().gcs_address
    env = _clean_env(tmp_path)
    probe = "import sys; from loops.raylinks import init_ray; init_ray(sys.argv[1]); print('in')"

    done = _run([sys.executable, "-c", probe, address], env)
    assert done.returncode == 1
    assert "RayAuthError: joining a Ray cluster needs its token and none was found" in done.stderr

    inherited = {**env, **{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}}
    if not ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ)):
        # the user's ~/.ray/auth_token (Ray's default file: a plain ray.init() writes one)
        # is what the session's Ray took: a driver of this user finds it there
        inherited["RAY_AUTH_TOKEN_PATH"] = str(Path.home() / ".ray" / "auth_token")
    done = _run([sys.executable, "-c", probe, address], inherited)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "in"


def test_lab_yaml_names_the_token_file_not_the_token(tmp_path: Path) -> None:
    text = """\
ray: {address: "10.0.0.5:6379", token_file: secrets/ray-token}
stations:
  bench-a:
    envelope: reference
    instruments:
      - {name: red, kind: syringe-pump, url: "serial:///dev/ttyUSB0", options: {address: 0}}
"""
    (tmp_path / "lab.yaml").write_text(text)
    lab = load_lab(tmp_path / "lab.yaml")
    assert lab.ray_token_file == tmp_path.resolve() / "secrets" / "ray-token"

    token = secrets.token_hex(32)
    (tmp_path / "lab.yaml").write_text(text.replace("secrets/ray-token", token))
    with pytest.raises(ConfigError, match=r"ray\.token_file: looks like a Ray token itself") as e:
        load_lab(tmp_path / "lab.yaml")
    assert token not in str(e.value)


@pytest.mark.timeout(180)
def test_a_cluster_without_authentication_is_refused(tmp_path: Path) -> None:
    """A head started without ``RAY_AUTH_MODE=token`` lets anyone in: labbridge does not join."""
    with _head(auth=False) as head:
        address, token_file = head["address"], head["token_file"]
        done = _run([sys.executable, "-c", DRIVER, address, str(token_file)], _clean_env(tmp_path))
    assert done.returncode == 1
    assert (
        f"RayAuthError: the Ray cluster at {address} does not require a token (anyone who "
        "reaches it can run code on every station): restart its head and nodes with "
        "RAY_AUTH_MODE=token and a token, see docs/cluster.md"
    ) in done.stderr, done.stderr
