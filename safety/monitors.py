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
  (``liquid-overtemp: hotplate.liquid_c=83.2 > 80.0``).

A value that is missing (never read, ``None``, not a number) is *unknown*:
neither tripped nor cleared, except for :class:`Staleness`/:class:`Heartbeat`,
whose job is to notice missing readings: they trip once ``grace_s`` has passed
since they were armed without any reading.

Kinds: :class:`Threshold` (trip above/below, clear with hysteresis),
:class:`Staleness` (a reading older than ``max_age_s``), :class:`Heartbeat` (a
device-reported age plus the reading's own age), :class:`Interlock` (``when``
channel values -> ``require`` channel values, or a small callable). A monitor
instance keeps its arming time, so it belongs to one supervisor.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safety.model import StationState


@dataclass(frozen=True)
class MonitorResult:
    """One evaluation of one monitor (see the module docstring)."""

    tripped: bool
    cleared: bool
    reason: str
    monitor: str = ""
    values: Mapping[str, Any] = field(default_factory=dict)

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


def _same(actual: Any, expected: Any) -> bool:
    """Equality that does not confuse ``True`` with ``1``."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual is expected
    return bool(actual == expected)


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
        return self._result(False, False, f"{what} yet (grace {fmt(self.grace_s)} s)")

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
    """Trip when a device-reported age (``enclosure.heartbeat_age_s``) exceeds ``max_age_s``.

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
    """An interlock input: a combination of channel values that must not occur.

    Declarative: ``when`` maps channels to values, *any* of which makes the
    interlock active; while active every ``require`` channel must have its
    value, else it trips (with no ``require``, being active trips)::

        Interlock("lid-open-while-heating",
                  when={"hotplate.heating": True, "hotplate.heater": True},
                  require={"enclosure.lid": "closed"})
        Interlock("enclosure-offline", when={"enclosure.online": False})

    Cleared when inactive, or active with every requirement met. A required
    value that is missing while active is unknown (neither). Or a callable:
    ``condition(view)`` returns a text describing the violation, or None (then
    cleared); give ``channels`` so the supervisor polls them.
    """

    def __init__(
        self,
        name: str,
        condition: InterlockCondition | None = None,
        *,
        when: Mapping[str, Any] | None = None,
        require: Mapping[str, Any] | None = None,
        channels: Iterable[str] = (),
    ) -> None:
        if condition is None and not when:
            raise ValueError(f"interlock {name}: give a condition callable or when={{...}}")
        if condition is not None and (when or require):
            raise ValueError(f"interlock {name}: give either a condition callable or when/require")
        self.condition = condition
        self.when: dict[str, Any] = dict(when or {})
        self.require: dict[str, Any] = dict(require or {})
        super().__init__(name, [*self.when, *self.require, *channels])

    def evaluate(self, view: Mapping[str, Any], ages: Mapping[str, float]) -> MonitorResult:
        if self.condition is not None:
            violation = self.condition(view)
            if violation:
                return self._result(True, False, violation)
            return self._result(False, True, "condition holds")
        active = {ch: view.get(ch) for ch, want in self.when.items() if _same(view.get(ch), want)}
        if not active:
            shown = ", ".join(f"{ch}={fmt(view.get(ch))}" for ch in self.when)
            return self._result(False, True, f"inactive ({shown})")
        cause = " and ".join(f"{ch}={fmt(v)}" for ch, v in active.items())
        if not self.require:
            return self._result(True, False, cause, **active)
        missing = [ch for ch in self.require if view.get(ch) is None]
        wrong = {
            ch: view.get(ch)
            for ch, want in self.require.items()
            if ch not in missing and not _same(view.get(ch), want)
        }
        if wrong:
            bad = ", ".join(f"{ch}={fmt(v)}" for ch, v in wrong.items())
            need = ", ".join(f"{ch}={fmt(self.require[ch])}" for ch in wrong)
            return self._result(
                True, False, f"{bad} while {cause} (requires {need})", **active, **wrong
            )
        if missing:
            return self._result(
                False, False, f"{', '.join(missing)} unknown while {cause}", **active
            )
        return self._result(False, True, f"requirements met while {cause}", **active)


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


def reference_monitors(
    *,
    hotplate: str = "hotplate",
    enclosure: str = "enclosure",
    liquid_trip_c: float = 80.0,
    liquid_clear_c: float = 75.0,
    plate_max_age_s: float = 2.0,
    heartbeat_max_age_s: float = 2.0,
    grace_s: float = 5.0,
) -> list[Monitor]:
    """The reference bench's monitors (DESIGN.md safety facts). Ages in real seconds.

    * ``liquid-overtemp``: ``hotplate.liquid_c`` > 80 degC trips, clears < 75 degC;
    * ``hotplate-reading-stale``: ``hotplate.plate_c`` older than 2 s (the hotplate stopped answering);
    * ``enclosure-heartbeat-stale``: ``enclosure.heartbeat_age_s`` > 2 s (heartbeat every 0.5 s);
    * ``enclosure-offline``: ``enclosure.online`` is False (the device's Last Will);
    * ``lid-open-while-heating``: the lid is not closed while the hotplate heats (measured
      ``heating`` / ``heater_enabled``) or the heater is commanded on (``hotplate.heater``).
    """
    hp, enc = hotplate, enclosure
    return [
        Threshold(
            "liquid-overtemp",
            f"{hp}.liquid_c",
            trip_above=liquid_trip_c,
            clear_below=liquid_clear_c,
        ),
        Staleness("hotplate-reading-stale", f"{hp}.plate_c", plate_max_age_s, grace_s=grace_s),
        Heartbeat(
            "enclosure-heartbeat-stale",
            f"{enc}.heartbeat_age_s",
            heartbeat_max_age_s,
            grace_s=grace_s,
        ),
        Interlock("enclosure-offline", when={f"{enc}.online": False}),
        Interlock(
            "lid-open-while-heating",
            when={f"{hp}.heating": True, f"{hp}.heater_enabled": True, f"{hp}.heater": True},
            require={f"{enc}.lid": "closed"},
        ),
    ]


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
    "reference_monitors",
]
