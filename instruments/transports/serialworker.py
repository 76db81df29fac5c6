"""The serial line's worker thread and its re-entrant lock (no pyserial here).

:class:`LineWorker` runs a line's pyserial calls on one thread, in order;
:class:`TaskLock` is the line's lock, which the task holding it may re-enter.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from instruments.errors import TransportError

T = TypeVar("T")


class TaskLock:
    """An asyncio lock that the task holding it may re-enter.

    A driver can hold ``transport.lock`` around a multi-step exchange and still
    call ``transaction()`` (which takes the lock too) inside it.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is not None and self._owner is task:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner = task
        self._depth = 1

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


class LineWorker:
    """The line's dedicated thread (``lb-serial-<port>``): pyserial calls, one at a time, in order.

    The contract of :class:`~instruments.transports.base.DeviceWorker`, with a
    cheaper hop per call: the thread takes jobs from a ``queue.SimpleQueue``,
    hands each result back with one ``loop.call_soon_threadsafe`` and blocks
    again at once. ``run_in_executor`` chains a concurrent future to an asyncio
    one and runs the executor's bookkeeping (locks, a condition, an idle
    semaphore) around each call, on both threads. Measured on a 2-core VM, a
    bare round trip costs ~20-40 us here against ~50-65 us through
    ``run_in_executor``: on a serial query that is most of our overhead over raw
    pyserial. A job whose awaiting
    task was cancelled before it started is skipped; one already running
    finishes on the thread and its result is dropped. Deadlines are enforced by
    the jobs themselves (reads poll every
    :data:`~instruments.transports.serialline.POLL_S`; writes have pyserial's
    write timeout).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _start(self) -> threading.Thread:
        thread = threading.Thread(
            target=_worker_main, args=(self._queue,), name=f"lb-{self.name}", daemon=True
        )
        thread.start()
        # A worker dropped without close() still ends its thread (the thread holds only the queue).
        weakref.finalize(self, self._queue.put, None)
        self._thread = thread
        return thread

    async def run(self, fn: Callable[..., T], *args: Any, url: str = "") -> T:
        """Run ``fn(*args)`` on the line's thread and return its result (or raise its error)."""
        if self._closed:
            raise TransportError(url or self.name, "device worker is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._thread is None:
            self._start()
        self._queue.put((fut, fn, args))
        return await fut

    def _cancel_pending(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _hand_back(job[0], None, None, cancel=True)

    def close(self) -> None:
        """Stop the thread (idempotent), joining it after the running call; queued calls are cancelled."""
        if self._closed:
            return
        self._closed = True
        self._cancel_pending()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    async def aclose(self) -> None:
        """Like :meth:`close`, waiting for the running call without blocking the event loop."""
        if self._closed:
            return
        self._closed = True
        self._cancel_pending()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put((done, _stop, ()))
        await asyncio.shield(done)
        thread.join()  # the thread has handed back its last result: it is ending


#: (future to settle, function, arguments)
_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _stop() -> None:
    """The last job of a worker thread (see ``LineWorker.aclose``)."""


def _worker_main(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        fut, fn, args = job
        del job
        if fut.cancelled():  # its task gave up while it was queued: never touch the port for it
            continue
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            _hand_back(fut, None, exc)
        else:
            _hand_back(fut, result, None)
        if fn is _stop:
            return
        del fut, fn, args


def _hand_back(
    fut: asyncio.Future[Any], result: Any, exc: BaseException | None, *, cancel: bool = False
) -> None:
    """Settle ``fut`` on its own loop (from the worker thread, or to cancel a queued job)."""
    try:
        fut.get_loop().call_soon_threadsafe(_settle, fut, result, exc, cancel)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None, cancel: bool) -> None:
    if fut.done():
        return
    if cancel:
        fut.cancel()
    elif exc is not None:
        if isinstance(exc, StopIteration):  # a future refuses it (TypeError: never settled)
            exc = RuntimeError(f"worker call raised {exc!r}")
        fut.set_exception(exc)
    else:
        fut.set_result(result)


__all__ = ["LineWorker", "TaskLock"]
