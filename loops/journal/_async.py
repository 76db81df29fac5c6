"""The journal's API awaited: :class:`JournalLink` (what a campaign or station needs) and
:class:`AsyncJournal`, its in-process implementation on one dedicated thread.

There is no second copy of the API: a caller names the :class:`Journal` method it
wants, ``await link.call(Journal.propose, campaign_id, params, proposer)``, and mypy
checks the arguments and the result against that method's own signature.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from loops.journal._model import JournalError
from loops.journal._store import Journal, api_name

_P = ParamSpec("_P")
_R = TypeVar("_R")


class JournalLink(Protocol):
    """A journal that some other process or thread owns; every call is one :class:`Journal` method.

    ``call(Journal.method, *args, **kwargs)`` submits the call at once (calls run one at
    a time, in the order they were made) and returns an awaitable of the method's
    result; a write has committed (fsync'ed) when that awaitable is done. Journal errors
    (IllegalTransition, StepOrderError, ...) arrive as exceptions of their own type.
    Implementations: :class:`AsyncJournal` (in-process), ``loops.raylinks.RayJournal``.
    """

    def call(
        self, fn: Callable[Concatenate[Journal, _P], _R], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Awaitable[_R]: ...


class AsyncJournal:
    """A :class:`Journal` whose connection lives on one dedicated thread, for slow disks and
    for async callers (the in-process :class:`JournalLink`).

    ``await aj.call(Journal.propose, ...)``: calls run one at a time in call order, so
    a write has committed when its await returns. A call cancelled while it runs still
    completes (a transaction is never cut in half); the caller got no answer and must
    not act on it. Open with ``await AsyncJournal.open(path)`` (or ``async with``),
    close with ``await aclose()`` (joins the thread).
    """

    def __init__(self, journal: Journal, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self._journal = journal
        self._executor: concurrent.futures.ThreadPoolExecutor | None = executor
        self.path = journal.path

    @classmethod
    async def open(cls, path: str | Path, *, busy_timeout_s: float = 10.0) -> AsyncJournal:
        """Open (create, migrate) the journal on its own thread."""
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        try:
            fut = executor.submit(Journal, path, busy_timeout_s=busy_timeout_s)
            journal = await asyncio.wrap_future(fut)
        except BaseException:
            executor.shutdown(wait=True)
            raise
        return cls(journal, executor)

    def call(
        self, fn: Callable[Concatenate[Journal, _P], _R], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> asyncio.Future[_R]:
        """Submit ``fn(journal, *args, **kwargs)`` to the journal's thread (see :class:`JournalLink`)."""
        api_name(fn)
        if self._executor is None:
            raise JournalError(f"journal {self.path} is closed")
        return asyncio.wrap_future(self._executor.submit(fn, self._journal, *args, **kwargs))

    async def aclose(self) -> None:
        """Close the connection on its thread and join the thread (idempotent)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.wrap_future(executor.submit(self._journal.close))
        finally:
            executor.shutdown(wait=True)  # the thread is idle by now: joins in microseconds

    async def __aenter__(self) -> AsyncJournal:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
