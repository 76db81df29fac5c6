"""Stations: one :class:`StationActor` per physical bench owns its guarded instruments.

:class:`StationActor` is the one definition of a station's API. It runs as a Ray
actor (``loops.raylinks``: placed on the machine that offers the Ray custom
resource ``station:<name>``; locally ``init_ray`` provides it, on a lab network
each bench PC runs ``ray start --resources '{"station:bench-a": 1}'``) or in
the campaign's own process (:class:`LocalStation`, for tests and benchmarks).
Either way only data crosses: recipe dicts in, result / violation / status
dicts out; device handles never leave the station (STYLE.md habit "Ray
workers pass data"). The campaign reaches a station through a
:class:`StationLink`: ``await link.call(StationActor.run, eid, recipe, who)``.

The journal is reached through a :class:`~loops.journal.JournalLink` (the Ray
journal actor, or an in-process :class:`~loops.journal.AsyncJournal`). A
station journals each step BEFORE it acts: ``on_step`` awaits
``journal.call(Journal.step_started, ...)``, so a crash at any instant leaves
the journal knowing which physical step may have started.

Who writes what: the station moves an experiment ``queued -> running``
(``mark_running=True``), writes its ``step_started``/``step_done`` events (the last
``step_done`` with what the run measured) and, when the recipe ran to its end, the
run's outcome (``record_outcome``, before it returns it); the campaign writes the
result (``finish``/``fail``, with the optimizer's state in the same transaction) from
the dict :meth:`StationActor.run` returns, or on resume if its process died first from
the journaled outcome (one that was only measured is verified by the station first:
:meth:`StationActor.recover_outcome`).
A failed run trips the station (latched safe state: an operator checks it and
calls ``reset``); nothing is retried. Ray actors are created with
``max_restarts=0``/``max_task_retries=0``: a station that crashed is reported
(:class:`StationLost`), never silently reopened or re-run on hardware.

Clocks: on a simulated bench the guard and the recipe's durations run on the
simulator's accelerated clock; the actor rebuilds it from a :class:`ClockSpec`
(``time.monotonic`` is system-wide on Linux, so one ``(sim, real)`` pair and
the speed define the same clock in every process of the machine).

This module is the station as the campaign sees it (:class:`StationLink`,
:class:`LocalStation`, the Ray resource that places it); the actor is in
:mod:`loops.stationactor`, the clock in :mod:`loops.stationclock`, the errors
that cross Ray in :mod:`loops.stationerrors` (all re-exported here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from loops.stationactor import StationActor
from loops.stationclock import ClockSpec, ScaledClock
from loops.stationerrors import (
    ExperimentStopped,
    PortableIllegalTransition,
    StationBusy,
    StationError,
    StationLost,
    StationNotOpen,
)

__all__ = [
    "ClockSpec",
    "ExperimentStopped",
    "LocalStation",
    "PortableIllegalTransition",
    "ScaledClock",
    "StationActor",
    "StationBusy",
    "StationError",
    "StationLink",
    "StationLost",
    "StationNotOpen",
    "station_resource",
]

#: Ray resource a station's actor requires: ``station:<name>`` (one per bench)
RESOURCE_PREFIX = "station:"


def station_resource(name: str) -> str:
    """The Ray custom resource that pins station ``name``'s actor: ``station:<name>``."""
    return f"{RESOURCE_PREFIX}{name}"


# ------------------------------------------------------------------------- links
_P = ParamSpec("_P")
_R = TypeVar("_R")


class StationLink(Protocol):
    """A station as the campaign sees it: every call is one :class:`StationActor` method.

    ``call(StationActor.method, *args, **kwargs)`` starts the call at once and returns
    an awaitable of its result; a station whose process died raises
    :class:`StationLost`. Implementations: :class:`LocalStation` (in-process),
    ``loops.raylinks.RayStation`` (a Ray actor).
    """

    name: str

    def call(
        self,
        fn: Callable[Concatenate[StationActor, _P], Awaitable[_R]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> Awaitable[_R]: ...


class LocalStation:
    """A :class:`StationActor` in this process and event loop (the in-process :class:`StationLink`)."""

    def __init__(self, actor: StationActor) -> None:
        self.actor = actor
        self.name = actor.name

    def call(
        self,
        fn: Callable[Concatenate[StationActor, _P], Awaitable[_R]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> asyncio.Future[_R]:
        """Start ``fn(actor, *args, **kwargs)`` as a task of the running loop."""
        station_method(fn)
        return asyncio.ensure_future(fn(self.actor, *args, **kwargs))


def station_method(fn: Callable[..., Any]) -> str:
    """The name of ``fn`` if it is a public method of :class:`StationActor`; raises
    ValueError otherwise (a link forwards the station's API, nothing else)."""
    name = getattr(fn, "__name__", "")
    if name.startswith("_") or getattr(StationActor, name, None) is not fn:
        raise ValueError(f"{fn!r} is not a StationActor method (StationActor.run, .dry_run, ...)")
    return name
