"""Where an experiment's stack time goes: :class:`StackTimer`, one per experiment and process.

The stack is everything an experiment costs besides the bench's own time: Ray round
trips, journal transactions, the dry run, the optimizer's ask and tell, verification.
A timer is the current one of an asyncio task (a :mod:`contextvars` variable: a task
started from it, or a thread of ``asyncio.to_thread``, sees the same timer); the links
(:mod:`loops.raylinks`) add each call's wall time under its method's name when a timer is
current, and the code that does CPU work times it with :func:`cpu_part`. Nothing is
recorded, and nothing costs anything, while no timer is current.

Each part keeps its calls' count, wall seconds and, for CPU-bound work done on one
thread (ask, tell, dry run, verification), that thread's CPU seconds
(``time.thread_time``): on a loaded machine the wall time of such work mostly measures
the other processes, its CPU time does not. A round trip (a Ray call, a journal
transaction) has no CPU time of its own to speak of here: it is waiting.

The station's timer travels back with its run's outcome (``stack``) and the campaign
adds its own (:meth:`StackTimer.merge`); the campaign's ``finished`` event carries both
(``benchmarks/scale.py`` reads them).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["StackTimer", "cpu_part", "current_timer", "timed", "timing"]

_R = TypeVar("_R")

_CURRENT: contextvars.ContextVar[StackTimer | None] = contextvars.ContextVar(
    "labbridge_stack_timer", default=None
)


class StackTimer:
    """Named parts of one experiment's stack time (module docstring)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}  # name -> [count, wall_s, cpu_s]

    def add(self, name: str, wall_s: float, cpu_s: float = 0.0, count: int = 1) -> None:
        part = self.parts.setdefault(name, [0, 0.0, 0.0])
        part[0] += count
        part[1] += wall_s
        part[2] += cpu_s

    @contextlib.contextmanager
    def part(self, name: str, *, cpu: bool = False) -> Iterator[None]:
        """Time the block as ``name``: wall, and this thread's CPU if ``cpu`` (a block with
        no ``await`` in it: else the CPU of whatever else ran on the loop meanwhile)."""
        c0 = time.thread_time() if cpu else 0.0
        t0 = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            self.add(name, wall, time.thread_time() - c0 if cpu else 0.0)

    def merge(self, other: Mapping[str, Any], prefix: str = "") -> None:
        """Add another timer's :meth:`as_dict` (a station's, say) under ``prefix``."""
        for name, p in other.items():
            self.add(prefix + name, float(p["wall_s"]), float(p["cpu_s"]), int(p["count"]))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            name: {"count": int(c), "wall_s": w, "cpu_s": cpu}
            for name, (c, w, cpu) in self.parts.items()
        }


def current_timer() -> StackTimer | None:
    """The timer of this task's experiment, if one is being timed."""
    return _CURRENT.get()


@contextlib.contextmanager
def timing(timer: StackTimer | None = None) -> Iterator[StackTimer]:
    """Within the block, ``timer`` (a new one by default) is this task's current timer:
    what the task and the tasks and threads it starts meanwhile do is counted in it."""
    timer = StackTimer() if timer is None else timer
    token = _CURRENT.set(timer)
    try:
        yield timer
    finally:
        _CURRENT.reset(token)


async def timed(name: str, work: Awaitable[_R]) -> _R:
    """Await ``work``, its wall time added as ``name`` to the current timer (if any)."""
    timer = _CURRENT.get()
    if timer is None:
        return await work
    t0 = time.perf_counter()
    try:
        return await work
    finally:
        timer.add(name, time.perf_counter() - t0)


def cpu_part(name: str, fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """``fn(*args, **kwargs)``, its wall and this thread's CPU time added as ``name`` to the
    current timer (in a thread of ``asyncio.to_thread`` too: it copies the context)."""
    timer = _CURRENT.get()
    if timer is None:
        return fn(*args, **kwargs)
    with timer.part(name, cpu=True):
        return fn(*args, **kwargs)
