"""docs/cluster.md runs as written (tests/docpages.py): its lab.yaml loads with the token file
it names, and its one-PC rehearsal starts a Ray head with a token, joins it with the token, is refused
with another one, and stops the head.

The page's blocks run in one folder with an empty home and with this session's Ray settings
blanked (its token, its address), as on a reader's machine without Ray configured.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from docpages import blocks, run_script, strays, write_files

from bridge.labconfig import load_lab

PAGE = "cluster.md"


def test_every_code_block_is_one_the_harness_runs() -> None:
    assert len(blocks(PAGE)) >= 3
    assert not strays(PAGE), strays(PAGE)


@pytest.mark.timeout(240)
def test_cluster_page_runs_as_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(dict.fromkeys(("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"), ""))
    env["RAY_ADDRESS"] = ""
    write_files(PAGE, tmp_path)
    lab = load_lab(tmp_path / "lab.yaml")
    assert lab.ray_address == "10.0.0.5:6379"
    assert lab.ray_token_file == Path("/etc/labbridge/ray-token")
    assert lab.lease_s == 5.0  # the default
    assert load_lab(tmp_path / "restart-lab.yaml").lease_s == 30.0  # "When the service restarts"
    out = []
    for block in blocks(PAGE):
        if block.file is None:
            done = run_script(block, tmp_path, timeout=200, env=env)
            out.append(done.stdout + done.stderr)
    rehearsal = out[-1]
    assert "joined; bench-a's node is " in rehearsal, rehearsal
    assert "not joined: the Ray cluster at 127.0.0.1:" in rehearsal, rehearsal
    assert "refused the token from $RAY_AUTH_TOKEN: use the cluster's token" in rehearsal
