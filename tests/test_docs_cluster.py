"""docs/cluster.md runs as written (tests/docpages.py): its lab.yaml loads with the token file
it names, and its one-PC rehearsal starts a Ray head with a token, joins it with the token, is refused
with another one, and stops the head. Its TLS rehearsal makes a throwaway CA and certificate
(openssl), starts a head with the token and TLS, joins it with TLS (a task on the station's
resource), and a driver without TLS gets labbridge's one line at once.

The page's blocks run in one folder with an empty home and with this session's Ray settings
blanked (its token, its address), as on a reader's machine without Ray configured.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from docpages import Block, blocks, run_script, strays, write_files

from bridge.labconfig import load_lab

PAGE = "cluster.md"


def test_every_code_block_is_one_the_harness_runs() -> None:
    assert len(blocks(PAGE)) >= 3
    assert not strays(PAGE), strays(PAGE)


def reader_env(home: Path) -> dict[str, str]:
    """A reader's machine without Ray configured: an empty home, this session's Ray settings
    (its token, its address, any TLS) blanked."""
    home.mkdir()
    env = {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    env.update(dict.fromkeys(("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"), ""))
    env.update(dict.fromkeys(("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY"), ""))
    env["RAY_TLS_CA_CERT"] = ""
    return env


def is_tls(block: Block) -> bool:
    return "export RAY_USE_TLS=1" in block.code


@pytest.mark.timeout(240)
def test_cluster_page_runs_as_written(tmp_path: Path) -> None:
    env = reader_env(tmp_path / "home")
    write_files(PAGE, tmp_path)
    lab = load_lab(tmp_path / "lab.yaml")
    assert lab.ray_address == "10.0.0.5:6379"
    assert lab.ray_token_file == Path("/etc/labbridge/ray-token")
    assert lab.lease_s == 5.0  # the default
    assert load_lab(tmp_path / "restart-lab.yaml").lease_s == 30.0  # "When the service restarts"
    out: dict[str, str] = {}  # a script block's code -> what it printed
    for block in blocks(PAGE):
        if block.file is None and not is_tls(block):
            done = run_script(block, tmp_path, timeout=200, env=env)
            out[block.code] = done.stdout + done.stderr
    rehearsal = next(o for code, o in out.items() if "another token: refused" in code)
    assert "joined; bench-a's node is " in rehearsal, rehearsal
    assert "not joined: the Ray cluster at 127.0.0.1:" in rehearsal, rehearsal
    assert "refused the token from $RAY_AUTH_TOKEN: use the cluster's token" in rehearsal


@pytest.mark.timeout(240)
def test_the_tls_rehearsal_runs_as_written(tmp_path: Path) -> None:
    """A head with the token and TLS: a driver with TLS joins and runs a task on the
    station's resource; one without TLS gets labbridge's one line at once."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS rehearsal makes its certificates with the openssl command")
    env = reader_env(tmp_path / "home")
    write_files(PAGE, tmp_path)
    [block] = [b for b in blocks(PAGE) if b.file is None and is_tls(b)]
    done = run_script(block, tmp_path, timeout=200, env=env)
    tls = done.stdout + done.stderr
    assert tls.count("joined; bench-a's node is ") == 1, tls
    assert (
        "not joined: the Ray cluster at 127.0.0.1:" in tls
        and "uses TLS and this process does not: set RAY_USE_TLS=1, RAY_TLS_SERVER_CERT" in tls
    ), tls
