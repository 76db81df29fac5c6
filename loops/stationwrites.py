"""A running experiment's journal writes, in order, as few round trips as they allow:
:class:`StepWrites` (used by :class:`~loops.stationrun.StationRuns`).

A write that must be on disk before the station acts is waited for (:meth:`StepWrites.now`);
a write that need not be (the start of a step that only looks, or only makes the bench
safer: :func:`~loops.stationrun.step_waits`) is queued (:meth:`StepWrites.later`) and
sent :data:`COALESCE_S` later (once the write before it has committed), with every write
queued meanwhile, in one transaction (:meth:`Journal.write_all
<loops.journal.Journal.write_all>`). A write that is waited for carries every write still
queued in its own transaction, after them: the records of a row of quick steps that only
look go with the next step that acts, one transaction and one round trip, and that step's
write does not queue in the journal behind a batch of its own (``benchmarks/scale.py``, 1
station: 75-86 ms of stack time per experiment against 96-114, in alternating runs).
So the writes reach the journal in the order they were made (a Ray actor does not keep
the order of one caller's calls: one batch is on its way at a time), a write waited for
returns once it and every write before it have committed, and a row of quick steps that
only look costs one round trip, not one each. A write waited for while a batch is on its
way is sent at once when the journal itself refuses it unless that batch has committed
(a step's record chained to the previous step's: :func:`_chained`); refused (it arrived
first: :class:`~loops.journal.StepOrderError`, nothing of it written), it is sent again
once that batch has committed. Either way it has committed only after every write before
it.

Timing (:mod:`loops.stacktime`): a write waited for is the run's ``journal.<method>``
(``journal.write_all`` when it carries queued ones); the batches not waited for are
``behind:journal.<method>`` (they overlap the bench's work) -- unless a write that is
waited for has to wait for one: that wait is counted as ``journal.behind``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loops.journal import Journal, JournalLink, StepOrderError, api_name
from loops.stacktime import StackTimer, current_timer, timing

__all__ = ["StepWrites"]

#: one write: a :class:`~loops.journal.Journal` method's name, its args and kwargs
Write = tuple[str, tuple[Any, ...], dict[str, Any]]
#: sends ``write(epoch)`` with the run's epoch, again with a new one after a take-over
#: (:meth:`StationRuns._fenced <loops.stationrun.StationRuns._fenced>`)
Fenced = Callable[[Callable[[int | None], Awaitable[Any]]], Awaitable[Any]]
#: how long a record not waited for stays queued for a write that is waited for to take it
#: along (real s): short next to a person watching the journal, long next to the quick
#: steps between two that act (a read, a computation, a capture)
COALESCE_S = 0.05


def _chained(write: Write) -> bool:
    """Whether the journal refuses ``write`` (:class:`StepOrderError`) unless the step
    record before it has committed: a step's end (its start must be the last step event),
    or a step's start carrying the previous step's end."""
    name, _, kwargs = write
    return name == "step_done" or (name == "step_started" and kwargs.get("done") is not None)


class StepWrites:
    """The ordered journal writes of one run (module docstring). Use from one task's event
    loop; :meth:`flush` (or :meth:`abandon`) before letting go of it."""

    def __init__(
        self, journal: JournalLink, *, fenced: Fenced | None = None, coalesce_s: float = COALESCE_S
    ) -> None:
        self._journal = journal
        self._fenced = fenced
        self._coalesce_s = coalesce_s
        self._queued: list[Write] = []
        self._sending: asyncio.Task[None] | None = None  # the batch on its way
        self._soon: asyncio.TimerHandle | None = None  # sends what is queued, unless taken
        self._timer = current_timer()  # the run's (the batches' own tasks see it too)

    def later(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)`` (a :class:`Journal` method): sent ``coalesce_s``
        later, once the writes before it have committed, or with the next :meth:`now`; not
        waited for here. A failure surfaces at the next :meth:`now` or :meth:`flush`, and
        the writes after it are not sent."""
        self._queued.append((api_name(fn), args, kwargs))
        if self._coalesce_s <= 0:
            self._send_soon()
        elif self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(self._coalesce_s, self._send_soon)

    def _send_soon(self) -> None:
        self._soon = None
        if not self._queued:  # taken by now() or flush() meanwhile
            return
        sending = self._sending
        if sending is None or (
            sending.done() and not sending.cancelled() and sending.exception() is None
        ):  # (after a failed batch nothing more is sent: now() and flush() raise it)
            self._sending = asyncio.ensure_future(self._send_queued())

    async def now(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Write ``fn(*args, **kwargs)`` after every write made before it, and wait until it
        has committed (with the queued ones, in one transaction); returns its result."""
        batch, self._queued = [*self._queued, (api_name(fn), args, kwargs)], []
        self._cancel_soon()
        sending = self._sending
        if sending is not None and not sending.done() and _chained(batch[0]):
            try:  # sent at once, behind the batch on its way: the journal keeps the order
                return (await self._send(batch))[-1]
            except StepOrderError:
                pass  # it arrived first, and nothing of it was written: again, after that one
        await self._wait_sending()  # the batch on its way first (the queued ones go with this)
        return (await self._send(batch))[-1]

    async def flush(self) -> None:
        """Wait until every write made so far has committed (the first failure raises)."""
        batch, self._queued = self._queued, []
        self._cancel_soon()
        await self._wait_sending()
        if batch:
            await self._send(batch)

    def abandon(self) -> None:
        """Let go of the writes not committed yet (a cancelled run): the queued ones are
        dropped, the batch on its way reaches the journal or not, nothing waits for it."""
        self._queued.clear()
        self._cancel_soon()
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.cancel()

    def _cancel_soon(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None

    async def _wait_sending(self) -> None:
        sending = self._sending
        if sending is None:
            return
        if not sending.done() and self._timer is not None:
            t0 = time.perf_counter()
            try:
                await sending
            finally:
                self._timer.add("journal.behind", time.perf_counter() - t0, count=0)
        else:
            await sending  # a failed batch raises here
        self._sending = None

    async def _send_queued(self) -> None:
        """Send what is queued, one batch at a time, until nothing is (a failure: the
        writes queued after the failed batch are dropped, the failure kept for :meth:`now`)."""
        behind = StackTimer()
        try:
            with timing(behind):
                while self._queued:
                    batch, self._queued = self._queued, []
                    await self._send(batch)
        except BaseException:
            self._queued.clear()
            raise
        finally:
            if self._timer is not None:
                self._timer.merge(behind.as_dict(), "behind:")

    async def _send(self, batch: list[Write]) -> list[Any]:
        """One round trip: the write alone, or the batch in one transaction; with ``fenced``,
        each write's ``epoch`` is the one it gives (a batch refused as a stale owner's wrote
        nothing, and goes again whole with the epoch that took the lease over)."""
        fenced = self._fenced
        if fenced is None:
            return await self._send_as(batch)

        def with_epoch(epoch: int | None) -> Awaitable[list[Any]]:
            return self._send_as(
                [(n, a, {**k, "epoch": epoch} if "epoch" in k else k) for n, a, k in batch]
            )

        out: list[Any] = await fenced(with_epoch)
        return out

    async def _send_as(self, batch: list[Write]) -> list[Any]:
        if len(batch) == 1:
            name, args, kwargs = batch[0]
            method: Any = getattr(Journal, name)
            return [await self._journal.call(method, *args, **kwargs)]
        return await self._journal.call(Journal.write_all, batch)
