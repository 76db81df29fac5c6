"""One station actor per bench: a lock on the actor's machine (:class:`BenchLock`).

A station actor holds its bench's lock from the moment it opens the instruments until
it closes them: a ``flock`` on ``<tmp>/labbridge-benches-<uid>/<station>-<key>.lock``
(``key``: a hash of the instruments' URLs, so two simulated benches that share a
station name do not share a lock, and a real bench is the same bench in every
process). The kernel drops the lock when the process dies (``kill -9`` included). The
lock files stay (deleting one on release would let a waiter lock a file nobody else
sees); they are a few bytes each, one per bench. The lock file holds the
holder's record (pid, host, station, its lease: owner, epoch, whether it is held),
rewritten as the lease changes.

A station actor whose lease is lost trips its station and closes it
(:mod:`loops.stationactor`): the instruments are released with the lock. So a new
actor (a resume, a restarted service, on a fresh Ray) that finds the lock held waits
for it up to :data:`WAIT_S` (an orphan of a dead owner lets go within the lease's
bound) and otherwise refuses to open the bench, naming the process that holds it:
two processes never drive one bench.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from loops.runfolder import system_temp
from loops.stationerrors import StationError
from loops.stationlease import LEASE_S, POLL_S

__all__ = ["WAIT_S", "BenchBusy", "BenchLock"]

#: how long a new actor waits for an older one to let its bench go: a lease's bound plus
#: the time an orphan takes to trip and close its instruments (real seconds)
WAIT_S = LEASE_S + 2 * POLL_S + 5.0


class BenchBusy(StationError):
    """Another live process holds the bench (its station actor has it open)."""


class BenchLock:
    """The lock of station ``station``'s bench (its instruments ``specs``); module docstring."""

    def __init__(self, station: str, specs: Sequence[Mapping[str, Any]]) -> None:
        self.station = station
        urls = sorted(str(s.get("url", "")) for s in specs)
        key = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in station)
        folder = system_temp() / f"labbridge-benches-{os.getuid()}"
        self.path = folder / f"{safe}-{key}.lock"
        self.urls = urls
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    async def acquire(self, wait_s: float = WAIT_S) -> None:
        """Take the lock, waiting up to ``wait_s`` for a holder to let go; raises
        :class:`BenchBusy` naming the holder otherwise."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise BenchBusy(
                            f"station {self.station}: its bench ({', '.join(self.urls)}) is held "
                            f"by {_describe(self.holder())} and was not let go within "
                            f"{wait_s:g} s: stop that process (or end its campaign) first"
                        ) from None
                    await asyncio.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.note(lease=None)

    def note(self, **fields: Any) -> None:
        """Rewrite the holder's record with ``fields`` (e.g. ``lease=``); no-op unless held."""
        if self._fd is None:
            return
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "station": self.station,
            "t": time.time(),
            **fields,
        }
        data = json.dumps(record, default=str).encode()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    def holder(self) -> dict[str, Any] | None:
        """The holder's record as it last wrote it (None: unreadable, e.g. mid-write)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def release(self) -> None:
        """Let the bench go (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def _describe(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "another process"
    lease = holder.get("lease") or {}
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if lease.get("owner"):
        state = "held" if lease.get("held") else f"ended: {lease.get('lost')}"
        text += f" (leased by {lease['owner']}, epoch {lease.get('epoch')}, {state})"
    else:
        text += " (no lease: open outside a campaign)"
    return text
