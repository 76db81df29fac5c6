"""A run's verification, started as soon as what it reads has been measured:
:class:`EarlyVerification` (used by :class:`~loops.stationrun.StationRuns`).

Verification (:mod:`loops.checks`) is a function of the values of the names its
analyses and checks read (:func:`~loops.checks.verification_reads`: measurements, the
captures' images, the station's set-up, the recipe's inputs) and nothing else; it acts
on nothing. In a recipe whose outcome is captured before its last steps (switching off,
draining) those values are all there while the bench still works: verification runs
then, on a copy of them, in a thread, overlapping the bench. When the run ends, the
values it read are compared with the run's final ones: the same (every one), its
outcome is the run's; any different (a later step measured a name again), the run is
verified again on the final values. So the outcome is always that of the final values.

Timing (:mod:`loops.stacktime`): the early verification's work is ``behind:verify``
(CPU on its thread; it overlaps the bench); waiting for it at the run's end, or verifying
then, is ``verify``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from loops.checks import Verification, checks_scope, verification_reads, verify_scope
from loops.recipe import Result
from loops.stacktime import cpu_part, current_timer

log = logging.getLogger(__name__)

__all__ = ["EarlyVerification"]

_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # an array's elementwise ==, say: taken as changed (verified again)
        return False


class EarlyVerification:
    """One run's verification (module docstring): :meth:`offer` after each step,
    :meth:`outcome` at the end (:meth:`cancel` when the run fails)."""

    def __init__(self, checks: Mapping[str, Any], setup: Mapping[str, Any]) -> None:
        self._checks = checks
        self._setup = dict(setup)
        try:
            self._reads: frozenset[str] | None = verification_reads(checks)
        except Exception as exc:  # unparsable here: verified at the end, which reports it
            log.debug("verification reads not known (%s): verifying at the end", exc)
            self._reads = None
        self._read: dict[str, Any] | None = None  # the values the early one read
        self._early: asyncio.Future[Verification] | None = None

    def _scope(self, result: Result) -> dict[str, Any]:
        return checks_scope(
            result.measurements, self._checks.get("inputs") or {}, result.images, self._setup
        )

    def offer(self, result: Result) -> None:
        """Start verifying (in a thread) if every value it reads is there (not None)."""
        if self._early is not None or self._reads is None or not self._checks.get("checks"):
            return
        scope = self._scope(result)
        if any(scope.get(n) is None for n in self._reads):
            return
        self._read = {n: scope[n] for n in self._reads}
        self._early = asyncio.ensure_future(
            asyncio.to_thread(cpu_part, "behind:verify", verify_scope, self._checks, dict(scope))
        )

    async def outcome(self, result: Result) -> Verification:
        """The run's verification on its final values (the early one's when they are the
        values it read)."""
        early, read = self._early, self._read
        scope = self._scope(result)
        if early is not None and read is not None:
            if all(_same(scope.get(n, _MISSING), v) for n, v in read.items()):
                timer, t0 = current_timer(), time.perf_counter()
                try:
                    return await early
                finally:
                    if timer is not None:  # what is left of it at the run's end
                        timer.add("verify", time.perf_counter() - t0)
            early.cancel()  # the thread runs on; its outcome is not used
        return await asyncio.to_thread(cpu_part, "verify", verify_scope, self._checks, scope)

    def cancel(self) -> None:
        if self._early is not None:
            self._early.cancel()
