"""Suite-wide fixtures: leak checks on every test, the mosquitto broker, helpers.

Every test fails if it leaves behind a running asyncio task, a thread, or an
open socket / pty file descriptor. Every test has a timeout (pytest-timeout,
``timeout`` in pyproject; override with ``@pytest.mark.timeout(N)``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

# Threads that belong to the interpreter or to libraries' process-wide pools,
# not to a test. Anything else alive after a test is a leak.
_ALLOWED_THREAD_PREFIXES = (
    "MainThread",
    "pytest_timeout",
    "ray_",  # Ray's session-wide threads (started once per session by its fixture)
    "Thread-",  # unnamed threads are checked separately below
)


def _fd_targets() -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except FileNotFoundError:  # not Linux: no fd accounting
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


def _leaky_fds() -> set[tuple[int, str]]:
    """Open sockets and ptys (what a leaked connection or simulator holds)."""
    return {
        (fd, target)
        for fd, target in _fd_targets().items()
        if target.startswith("socket:") or target.startswith("/dev/pts/") or target == "/dev/ptmx"
    }


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaked_threads_or_fds(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a thread or a socket/pty fd behind."""
    threads_before = _threads()
    fds_before = _leaky_fds()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    deadline = time.monotonic() + 3.0
    while True:
        leaked_threads = [
            t
            for t in _threads() - threads_before
            if not t.name.startswith(("ray_",)) and t.is_alive()
        ]
        leaked_fds = _leaky_fds() - fds_before
        if not leaked_threads and not leaked_fds:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    problems = []
    if leaked_threads:
        problems.append(
            "threads still running: " + ", ".join(sorted(t.name for t in leaked_threads))
        )
    if leaked_fds:
        problems.append(
            "file descriptors still open: "
            + ", ".join(f"{fd}->{t}" for fd, t in sorted(leaked_fds))
        )
    pytest.fail("leak after test: " + "; ".join(problems))


@pytest.fixture(autouse=True)
async def no_leaked_tasks(no_leaked_threads_or_fds: None) -> AsyncIterator[None]:
    """Fail the test if an asyncio task it started is still pending at the end.

    Runs in the test's event loop (asyncio_mode=auto); async fixtures that the
    test uses are torn down before this check runs, so their tasks must be gone.
    """
    me = asyncio.current_task()
    before = asyncio.all_tasks() - {me}
    yield
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()  # teardown may run in another task than setup
    deadline = loop.time() + 2.0
    while True:
        pending = [t for t in asyncio.all_tasks() - before - {me} if not t.done()]
        if not pending or loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    # The default executor's threads belong to this loop: join them so the thread check is fair.
    await loop.shutdown_default_executor()
    if pending:
        for t in pending:
            t.cancel()
        names = ", ".join(sorted(f"{t.get_name()}({t.get_coro()!r})" for t in pending))
        pytest.fail(f"asyncio tasks still pending after test: {names}")


# --------------------------------------------------------------------- broker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_hw = pytest.mark.skip(reason="hardware test: set LABBRIDGE_LAB=path/to/lab.yaml to run")
    skip_long = pytest.mark.skip(reason="long test (minutes): set LABBRIDGE_LONG=1 to run")
    for item in items:
        if "hardware" in item.keywords and not os.environ.get("LABBRIDGE_LAB"):
            item.add_marker(skip_hw)
        if "long" in item.keywords and os.environ.get("LABBRIDGE_LONG") != "1":
            item.add_marker(skip_long)


# ------------------------------------------------------------------ mosquitto
def require_mosquitto() -> None:
    """Skip (or, with CI=true, fail) when the mosquitto binary is not installed."""
    from simulators.broker import mosquitto_binary

    if mosquitto_binary() is None:
        reason = "mosquitto is not installed (apt-get install mosquitto); looked on PATH and in /usr/sbin"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(reason + " -- CI=true requires it")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """Path of the mosquitto binary (skips, or fails with CI=true, when not installed)."""
    from simulators.broker import mosquitto_binary

    require_mosquitto()
    path = mosquitto_binary()
    assert path is not None
    return path


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[object]:
    """One plain (anonymous, loopback, no persistence) mosquitto for the session. Do not restart it."""
    require_mosquitto()
    from simulators.broker import MosquittoBroker

    broker = MosquittoBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def fresh_mosquitto() -> Iterator[object]:
    """A mosquitto of this test's own, for tests that restart or stop it."""
    require_mosquitto()
    from simulators.broker import MosquittoBroker

    broker = MosquittoBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# ------------------------------------------------------------------------ ray
@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """One local, loopback-only Ray for the whole session (started on first use, ~3 s), with
    one ``station:<name>`` resource per simulated bench (bench-a, bench-b, bench-c).

    Session-scoped, so Ray's threads and driver sockets exist before every test's leak
    baseline. Tests that do not request it never start Ray.
    """
    ray = pytest.importorskip("ray")
    from loops.raylinks import init_ray

    if ray.is_initialized():  # someone else started it: use it as it is
        yield ray
        return
    init_ray(stations=("bench-a", "bench-b", "bench-c"), local=True, log_to_driver=False)
    try:
        # The first actor this driver owns makes the GCS open a connection back to the
        # driver's gRPC server (measured: one socket, gcs_server -> driver, kept for the
        # session). Create it here, before any test's leak baseline, with a throwaway actor.
        @ray.remote(num_cpus=0)
        class _WarmUp:
            def ping(self) -> int:
                return 1

        warm = _WarmUp.remote()  # type: ignore[attr-defined]
        assert ray.get(warm.ping.remote(), timeout=60) == 1
        ray.kill(warm)
        yield ray
    finally:
        ray.shutdown()
