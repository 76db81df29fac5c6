"""Level-triggered station monitors with hysteresis (bluesky ``suspenders.py`` style).

A monitor looks at a station's state, flat ``instrument.channel`` names (see
:class:`~safety.model.StationState`): ``view`` maps names to values (measured
values win over commanded ones of the same name), ``ages`` maps measured names
to the *real* seconds since they were read (network timing does not follow a
simulated clock). ``evaluate(view, ages)`` returns a :class:`MonitorResult`:

* ``tripped``: the unsafe condition holds now (level, not edge);
* ``cleared``: the condition is gone *with margin* (hysteresis), so a latched
  trip may be reset. Between the two (e.g. liquid at 77 degC after tripping
  above 80 and clearing below 75) a monitor is neither;
* ``reason``: names the monitor, the channel and the values
  (for example ``liquid-overtemp: hotplate.liquid_c=83.2 > 80.0``).

A value that is missing (never read, ``None``, not a number) is *unknown*:
neither tripped nor cleared, except for :class:`Staleness`/:class:`Heartbeat`,
whose job is to notice missing readings: they trip once ``grace_s`` has passed
since they were armed without any reading.

Kinds: :class:`Threshold` (trip above/below, clear with hysteresis),
:class:`Staleness` (a reading older than ``max_age_s``), :class:`Heartbeat` (a
device-reported age plus the reading's own age), :class:`Interlock` (a
condition in the envelope's rule language that trips while it holds, or a
small callable). A monitor instance keeps its arming time, so it belongs to
one supervisor.

A bench declares its monitors in its envelope (the ``monitors:`` section,
loaded by :mod:`safety.monitorspec`); nothing here knows an instrument.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from safety.expr import EvaluationError, Expression, parse
from safety.model import StationState


@dataclass(frozen=True)
class MonitorResult:
    """One evaluation of one monitor (see the module docstring)."""

    tripped: bool
    cleared: bool
    reason: str
    monitor: str = ""
    values: Mapping[str, Any] = field(default_factory=dict)
    #: real seconds left of a grace period this result waits in (no reading yet): neither
    #: tripped nor cleared until the first reading or the grace's end, whichever comes first
    grace_left_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "tripped": self.tripped,
            "cleared": self.cleared,
            "reason": self.reason,
            "values": dict(self.values),
        }


def fmt(value: Any) -> str:
    """A value as it appears in a reason: floats to 3 decimals (``83.2``, ``80.0``), strings quoted."""
    if isinstance(value, float) and math.isfinite(value):
        return repr(round(value, 3))
    return repr(value)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, bool, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


class Monitor(abc.ABC):
    """Base class: a named, level-triggered check over a station's state."""

    def __init__(self, name: str, channels: Iterable[str]) -> None:
        if not name or not name.strip():
            raise ValueError("a monitor needs a name")
        self.name = name
        #: the ``instrument.channel`` names this monitor reads
        self.channels: tuple[str, ...] = tuple(channels)
        for ch in self.channels:
            if "." not in ch:
                raise ValueError(f"monitor {name}: channel {ch!r} is not 'instrument.channel'")

    @property
    def instruments(self) -> set[str]:
        """Instrument names whose readings this monitor needs."""
        return {ch.split(".", 1)[0] for ch in self.channels}

    def arm(self, now: float | None = None) -> None:  # noqa: B027 - optional hook
        """Called when a supervisor starts watching (monotonic ``now``); starts grace periods."""

    @abc.abstractmethod
    def evaluate(self, view: Mapping[str, Any], ages: Mapping[str, float]) -> MonitorResult: ...

    def _result(self, tripped: bool, cleared: bool, reason: str, **values: Any) -> MonitorResult:
        return MonitorResult(tripped, cleared, f"{self.name}: {reason}", self.name, values)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {', '.join(self.channels)}>"


class Threshold(Monitor):
    """Trip when ``channel`` goes above ``trip_above`` (and/or below ``trip_below``).

    Cleared only below ``clear_below`` (above ``clear_above``): the hysteresis
    of bluesky's ``SuspendFloor``/``SuspendCeil`` resume thresholds.
    Comparisons are strict: ``trip_above=80`` trips at 80.1, not at 80.0;
    ``clear_below=75`` clears at 74.9, not at 75.0. Without a clear level
    there is no hysteresis: cleared whenever not tripped.
    """

    def __init__(
        self,
        name: str,
        channel: str,
        *,
        trip_above: float | None = None,
        clear_below: float | None = None,
        trip_below: float | None = None,
        clear_above: float | None = None,
    ) -> None:
        super().__init__(name, [channel])
        if trip_above is None and trip_below is None:
            raise ValueError(f"threshold {name}: give trip_above and/or trip_below")
        if trip_above is None and clear_below is not None:
            raise ValueError(f"threshold {name}: clear_below needs trip_above")
        if trip_below is None and clear_above is not None:
            raise ValueError(f"threshold {name}: clear_above needs trip_below")
        if trip_above is not None and clear_below is not None:
            if clear_below > trip_above:
                raise ValueError(
                    f"threshold {name}: clear_below {clear_below} is above trip_above {trip_above}"
                )
        if trip_below is not None and clear_above is not None:
            if clear_above < trip_below:
                raise ValueError(
                    f"threshold {name}: clear_above {clear_above} is below trip_below {trip_below}"
                )
        if trip_above is not None and trip_below is not None and trip_below >= trip_above:
            raise ValueError(
                f"threshold {name}: trip_below {trip_below} must be below trip_above {trip_above}"
            )
        self.channel = channel
        self.trip_above = trip_above
        self.clear_below = clear_below
        self.trip_below = trip_below
        self.clear_above = clear_above

    def evaluate(self, view: Mapping[str, Any], ages: Mapping[str, float]) -> MonitorResult:
        ch = self.channel
        raw = view.get(ch)
        value = _number(raw)
        if value is None:
            what = "has no value yet" if raw is None else f"={fmt(raw)} is not a number"
            return self._result(False, False, f"{ch} {what}", **{ch: raw})
        shown = f"{ch}={fmt(value)}"
        if self.trip_above is not None and value > self.trip_above:
            return self._result(True, False, f"{shown} > {fmt(self.trip_above)}", **{ch: value})
        if self.trip_below is not None and value < self.trip_below:
            return self._result(True, False, f"{shown} < {fmt(self.trip_below)}", **{ch: value})
        if self.clear_below is not None and not value < self.clear_below:
            return self._result(
                False,
                False,
                f"{shown} is not yet below {fmt(self.clear_below)} (tripped above {fmt(self.trip_above)})",
                **{ch: value},
            )
        if self.clear_above is not None and not value > self.clear_above:
            return self._result(
                False,
                False,
                f"{shown} is not yet above {fmt(self.clear_above)} (tripped below {fmt(self.trip_below)})",
                **{ch: value},
            )
        return self._result(False, True, f"{shown} within limits", **{ch: value})


class Staleness(Monitor):
    """Trip when the reading of ``channel`` is older than ``max_age_s`` (real seconds).

    The watchdog on a reading: the instrument stopped answering. Cleared when
    the age is at most ``clear_age_s`` (default ``max_age_s``). With no reading
    at all: unknown during ``grace_s`` (default ``max_age_s``) after
    :meth:`arm`, tripped after it.
    """

    def __init__(
        self,
        name: str,
        channel: str,
        max_age_s: float,
        *,
        grace_s: float | None = None,
        clear_age_s: float | None = None,
    ) -> None:
        super().__init__(name, [channel])
        if not max_age_s > 0:
            raise ValueError(f"staleness {name}: max_age_s must be > 0, got {max_age_s!r}")
        self.channel = channel
        self.max_age_s = float(max_age_s)
        self.grace_s = self.max_age_s if grace_s is None else float(grace_s)
        self.clear_age_s = self.max_age_s if clear_age_s is None else float(clear_age_s)
        if self.clear_age_s > self.max_age_s:
            raise ValueError(f"staleness {name}: clear_age_s is above max_age_s")
        self._armed_at: float | None = None

    def arm(self, now: float | None = None) -> None:
        self._armed_at = time.monotonic() if now is None else now

    def _missing(self, what: str) -> MonitorResult:
        now = time.monotonic()
        if self._armed_at is None:
            self._armed_at = now
        waited = now - self._armed_at
        if waited > self.grace_s:
            return self._result(
                True, False, f"{what} for {waited:.1f} s (grace {fmt(self.grace_s)} s)"
            )
        waiting = self._result(False, False, f"{what} yet (grace {fmt(self.grace_s)} s)")
        return replace(waiting, grace_left_s=self.grace_s - waited)

    def _age(self, view: Mapping[str, Any], ages: Mapping[str, float]) -> float | None:
        return ages.get(self.channel)

    def _missing_text(self) -> str:
        return f"no reading of {self.channel}"

    def evaluate(self, view: Mapping[str, Any], ages: Mapping[str, float]) -> MonitorResult:
        age = self._age(view, ages)
        if age is None:
            return self._missing(self._missing_text())
        key = f"{self.channel}:age_s"
        if age > self.max_age_s:
            return self._result(
                True,
                False,
                f"{self.channel} is {age:.2f} s old > {fmt(self.max_age_s)} s",
                **{key: age},
            )
        if age > self.clear_age_s:
            return self._result(
                False,
                False,
                f"{self.channel} is {age:.2f} s old, not yet within {fmt(self.clear_age_s)} s",
                **{key: age},
            )
        return self._result(False, True, f"{self.channel} is {age:.2f} s old", **{key: age})


class Heartbeat(Staleness):
    """Trip when a device-reported age (e.g. ``enclosure.heartbeat_age_s``) exceeds ``max_age_s``.

    The effective age is the reported value plus the age of the reading that
    carried it, so a reading that stopped arriving still makes it grow.
    ``None`` (no heartbeat ever seen) counts as missing (tripped after ``grace_s``).
    """

    def _age(self, view: Mapping[str, Any], ages: Mapping[str, float]) -> float | None:
        reported = _number(view.get(self.channel))
        reading_age = ages.get(self.channel)
        if reported is None or reading_age is None:
            return None
        return reported + reading_age

    def _missing_text(self) -> str:
        return f"no heartbeat ({self.channel})"


InterlockCondition = Callable[[Mapping[str, Any]], str | None]


class Interlock(Monitor):
    """An interlock input: a condition over the station's channels that must not hold.

    Declarative: ``trip_when`` is a condition in the envelope's rule language
    (:mod:`safety.expr`; a text or a parsed :class:`~safety.expr.Expression`)::

        Interlock("lid-open-while-heating",
                  trip_when='(hotplate.heating or hotplate.heater) and enclosure.lid != "closed"')
        Interlock("device-offline", trip_when="enclosure.online == false")

    True trips, false clears. A condition that cannot be evaluated (a channel
    never read, ``None``, a value of the wrong type: the language is strict,
    so ``1`` is not ``true``) or that is not a boolean is unknown: neither
    tripped nor cleared, so it does not trip but a latched trip cannot be
    reset. ``and``/``or``/``->`` short-circuit, so a channel behind a false
    ``and`` is not needed (the lid does not matter while nothing heats).

    ``confirm``: trip only once a reading taken after the condition first held
    still shows it (until then neither tripped nor cleared). For conditions
    that mix what the guard commands (recorded when the command is sent) with
    what a device reports (seen at its next reading): a command that makes a
    device clear a flag would otherwise meet the flag's last, older reading.
    Measured channels only; a condition over commanded values alone trips at
    once.

    ``channels``: further channels to show in the reason (and to read on a reset).
    ``doc``: what the condition means, added to the reason when it trips (the
    device faults of :mod:`safety.devicefaults` carry their driver's sentence).

    Or a callable: ``condition(view)`` returns a text describing the violation,
    or None (then cleared); give ``channels`` so the supervisor polls them.
    """

    def __init__(
        self,
        name: str,
        condition: InterlockCondition | None = None,
        *,
        trip_when: str | Expression | None = None,
        confirm: bool = False,
        channels: Iterable[str] = (),
        doc: str = "",
    ) -> None:
        if (condition is None) == (trip_when is None):
            raise ValueError(f"interlock {name}: give a condition callable or trip_when=<rule>")
        if confirm and trip_when is None:
            raise ValueError(f"interlock {name}: confirm needs trip_when=<rule>")
        self.condition = condition
        self.confirm = bool(confirm)
        self.doc = doc
        #: monotonic time the condition was first seen holding (``confirm``), None while it does not
        self._holds_since: float | None = None
        self.trip_when: Expression | None = (
            parse(trip_when, source=f"monitor {name}") if isinstance(trip_when, str) else trip_when
        )
        names = self.trip_when.names_in_order() if self.trip_when is not None else []
        super().__init__(name, dict.fromkeys([*names, *channels]))

    def evaluate(self, view: Mapping[str, Any], ages: Mapping[str, float]) -> MonitorResult:
        if self.condition is not None:
            violation = self.condition(view)
            if violation:
                return self._result(True, False, violation)
            return self._result(False, True, "condition holds")
        assert self.trip_when is not None
        values = {ch: view.get(ch) for ch in self.channels}
        shown = ", ".join(f"{ch}={fmt(v)}" for ch, v in values.items())
        try:
            result = self.trip_when.evaluate(view)
        except EvaluationError as exc:
            self._holds_since = None
            return self._result(False, False, f"unknown ({exc}): {shown}", **values)
        if result is not True:
            self._holds_since = None
        elif self.confirm:
            now = time.monotonic()
            if self._holds_since is None:
                self._holds_since = now
            waited = now - self._holds_since
            stale = [ch for ch in self.channels if ch in ages and ages[ch] >= waited]
            if stale:
                return self._result(
                    False,
                    False,
                    f"{shown}; waiting for a reading of {', '.join(stale)} to confirm it",
                    **values,
                )
        if result is True:
            return self._result(
                True, False, f"{shown} ({self.doc})" if self.doc else shown, **values
            )
        if result is False:
            return self._result(False, True, f"inactive ({shown})", **values)
        return self._result(
            False, False, f"unknown (not true/false: {fmt(result)}): {shown}", **values
        )


# ----------------------------------------------------------------------- helpers
def measured_ages(state: StationState, now: float | None = None) -> dict[str, float]:
    """Real seconds since each measured channel of ``state`` was read."""
    t = time.monotonic() if now is None else now
    entries = dict(state.measured)  # a copy under the GIL; set_measured may run meanwhile
    return {name: t - stamp for name, (_, stamp) in entries.items()}


def evaluate_all(
    monitors: Iterable[Monitor], state: StationState, now: float | None = None
) -> dict[str, MonitorResult]:
    """Evaluate every monitor on ``state`` (measured values preferred); a monitor that raises trips."""
    view = state.view(prefer_measured=True)
    ages = measured_ages(state, now)
    out: dict[str, MonitorResult] = {}
    for monitor in monitors:
        try:
            out[monitor.name] = monitor.evaluate(view, ages)
        except Exception as exc:  # a broken monitor fails safe
            out[monitor.name] = MonitorResult(
                True, False, f"{monitor.name}: monitor failed: {exc!r}", monitor.name
            )
    return out


__all__ = [
    "Heartbeat",
    "Interlock",
    "InterlockCondition",
    "Monitor",
    "MonitorResult",
    "Staleness",
    "Threshold",
    "evaluate_all",
    "measured_ages",
]
