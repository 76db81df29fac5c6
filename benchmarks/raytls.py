"""What Ray's TLS costs a station call: round trips on a Ray head with token auth, without and with TLS.

For each mode a Ray head starts on 127.0.0.1 (``ray start --head``, a token file, one
``station:bench-a`` unit; with TLS: ``RAY_USE_TLS=1`` and a throw-away CA and certificate
for 127.0.0.1, :func:`simulators.brokercerts.make_test_certificates`), then a driver joins
it through :func:`loops.raylinks.init_ray` (the probe and token check of every join),
places an actor on ``station:bench-a`` and times ``--calls`` sequential calls of a method
that takes and returns a station status's worth of data (about 300 bytes), after 20 calls
of warm-up. Prints the join time and the calls' median and p99 in milliseconds::

    nice -n 10 python -m benchmarks.raytls --calls 300

docs/cluster.md ("TLS between machines") quotes the numbers. A station's own work per call
(its instruments, its journal) is the same with or without TLS, so it is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.rayhead import ray_head

ROOT = Path(__file__).resolve().parents[1]
START_S = 120.0
WARM_UP = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(folder: Path, tls: bool) -> dict[str, str]:
    """This mode's environment for the head and the driver alike: no Ray setting of the
    caller's, the token file, loopback only; with ``tls``, Ray's TLS variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(folder / "home"),
        PYTHONPATH=str(ROOT),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(folder / "ray-token"),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    if tls:
        env.update(
            RAY_USE_TLS="1",
            RAY_TLS_SERVER_CERT=str(folder / "server.crt"),
            RAY_TLS_SERVER_KEY=str(folder / "server.key"),
            RAY_TLS_CA_CERT=str(folder / "ca.crt"),
        )
    return env


def measure(calls: int, tls: bool, folder: Path) -> dict[str, Any]:
    """One mode: start its head, run the driver (:func:`driver`) in a process of its own,
    stop the head; the driver's figures."""
    port = _free_port()
    env = _env(folder, tls)
    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths
    log = folder / f"head-{'tls' if tls else 'plain'}.log"
    try:
        with ray_head(
            port=port,
            env=env,
            temp=temp,
            log=log,
            resources={"station:bench-a": 1},
            start_s=START_S,
        ):
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.raytls", "--driver", f"127.0.0.1:{port}"]
                + ["--calls", str(calls)],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=START_S + calls,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"the driver failed:\n{done.stderr[-2000:]}")
            return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def driver(address: str, calls: int) -> dict[str, Any]:
    """Join ``address`` (``init_ray``), time ``calls`` round trips to an actor on
    ``station:bench-a``; returns the figures (ms)."""
    import ray

    from loops.raylinks import init_ray

    t0 = time.perf_counter()
    init_ray(address)
    joined = time.perf_counter() - t0

    @ray.remote(num_cpus=0, resources={"station:bench-a": 1})
    class Station:
        async def status(self, ask: dict[str, Any]) -> dict[str, Any]:
            return {"station": "bench-a", "open": True, "busy": False, "runs": 1, **ask}

    station = Station.remote()  # type: ignore[attr-defined]
    ask = {"experiment": "color-1-0042", "trip": None, "readings": {"plate_c": 24.9}}
    ask["note"] = "x" * 200
    for _ in range(WARM_UP):
        ray.get(station.status.remote(ask), timeout=60)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        ray.get(station.status.remote(ask), timeout=60)
        times.append((time.perf_counter() - t) * 1e3)
    ray.shutdown()
    times.sort()
    return {
        "join_s": round(joined, 2),
        "calls": calls,
        "median_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
        "load": round(os.getloadavg()[0], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raytls", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per mode")
    parser.add_argument("--driver", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        print(json.dumps(driver(args.driver, args.calls)))
        return 0
    from simulators.brokercerts import make_test_certificates

    folder = Path(tempfile.mkdtemp(prefix="raytls-"))
    try:
        (folder / "home").mkdir()
        token = folder / "ray-token"
        token.write_text(secrets.token_hex(32) + "\n")
        token.chmod(0o600)
        make_test_certificates(folder, ("127.0.0.1",), client_auth=True)
        print("mode   join s  calls  median ms  p99 ms  load")
        for tls in (False, True):
            r = measure(args.calls, tls, folder)
            print(
                f"{'TLS' if tls else 'plain':<6} {r['join_s']:>6.2f}  {r['calls']:>5}  "
                f"{r['median_ms']:>9.3f}  {r['p99_ms']:>6.3f}  {r['load']:>4}"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
