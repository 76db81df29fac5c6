"""Issue 17: Ray's TLS on the real two-node cluster (benchmarks/twonode.py with ``tls=True``).

The head and the bench node (in its network namespace, reached across the veth pair at a
lab network's address) run with the token and TLS: one throw-away lab CA, a certificate
naming both nodes' addresses. A driver with the same settings finds each bench on its own
node; one without TLS settings is refused in one line (loops/rayprobe.py). Long: a cluster
of its own. The short form is docs/cluster.md's TLS rehearsal (one node, 127.0.0.1,
tests/test_docs_cluster.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import require_mosquitto
from test_cluster import JOIN, ROOT, SPEED

from benchmarks.twonode import RAY, TwoNodeCluster


@pytest.mark.long  # a cluster of its own (30-70 s to start): the TLS rehearsal is the short form
@pytest.mark.timeout(400)
def test_a_driver_joins_a_tls_cluster_across_the_namespace_only_with_tls() -> None:
    """Both nodes and the driver with the token and Ray's TLS (one lab CA; the certificate names
    both nodes' addresses): a driver finds each bench on its own node, across the veth pair;
    without TLS settings it is refused in one line."""
    if not RAY.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    require_mosquitto()
    with TwoNodeCluster(1, 1, speed=SPEED, tls=True) as tls:
        env = {**tls.driver_env(), "RAY_ADDRESS": tls.address}
        argv = [sys.executable, "-c", JOIN, str(tls.token_file)]
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False
        )
        assert done.returncode == 0, done.stderr
        placed = json.loads(done.stdout.strip().splitlines()[-1])
        ips = {name: ip for name, (_, ip) in placed.items()}
        assert ips == {"bench-a": tls.nodes["head"].ip, "bench-b": tls.nodes["bench"].ip}
        plain = {k: v for k, v in env.items() if k not in tls.tls_env()}
        done = subprocess.run(
            argv, cwd=ROOT, env=plain, capture_output=True, text=True, timeout=90, check=False
        )
        assert done.returncode != 0
        assert (
            f"RayTlsError: the Ray cluster at {tls.address} uses TLS and this process does not"
            in done.stderr
        ), done.stderr
