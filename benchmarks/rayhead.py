"""One Ray head on 127.0.0.1 for a test or a benchmark: ``ray start --head --block``.

:func:`ray_head` starts it with the environment given (token, TLS: the caller's choice),
one CPU and the resources given, in a temp folder of its own, waits (bounded) until it
says it started, and stops it at the end (SIGTERM: it drains and stops every process it
started; SIGKILL of its process group if it does not within a minute). The two-node
cluster is :mod:`benchmarks.twonode`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"

__all__ = ["RAY", "ray_head"]


@contextlib.contextmanager
def ray_head(
    *,
    port: int,
    env: Mapping[str, str],
    temp: Path,
    log: Path,
    resources: Mapping[str, float],
    start_s: float = 90.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """The head's process, once its log says ``Ray runtime started`` (RuntimeError with the
    log's end when it exits or does not within ``start_s``). ``temp``: Ray's folder, short
    (its unix socket paths live under it, 108 bytes at most)."""
    argv = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=1",
        f"--resources={json.dumps(dict(resources))}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        f"--object-store-memory={80 * 1024 * 1024}",
    ]
    with log.open("w") as out:
        head = subprocess.Popen(
            argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + start_s
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield head
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
