"""An asyncio lock whose urgent waiters go first: :class:`UrgentLock`.

The campaign's lock serializes claims (the optimizer's ask, which can take a while),
records (a finished experiment's tell and journal writes, which are short) and state
saves. With ``asyncio.Lock`` (first come, first served) a station's finished experiment
waits behind every claim queued before it, each with its ask: on K stations the record,
and so the station's next experiment, waits for up to K asks. Here a record
(:meth:`UrgentLock.urgent`) goes before every claim still waiting; it still waits for
the one holding the lock (an ask in progress is not interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["UrgentLock"]


class UrgentLock:
    """A lock for one event loop: ``async with lock`` (in turn) or ``async with
    lock.urgent()`` (before every ordinary waiter); not reentrant."""

    def __init__(self) -> None:
        self._locked = False
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._locked

    async def acquire(self, *, urgent: bool = False) -> None:
        if not self._locked:
            self._locked = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._urgent if urgent else self._normal
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed the lock: pass it on
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
            raise

    def release(self) -> None:
        """Hand the lock to the first urgent waiter, else the first other one, else free it."""
        if not self._locked:
            raise RuntimeError("release of an UrgentLock that is not locked")
        for queue in (self._urgent, self._normal):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # it holds the lock now
                    return
        self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    @contextlib.asynccontextmanager
    async def urgent(self) -> AsyncIterator[None]:
        """Hold the lock, taking it before every ordinary waiter."""
        await self.acquire(urgent=True)
        try:
            yield
        finally:
            self.release()
