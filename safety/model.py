"""The data the safety layer speaks: commands, verdicts, the latch, typed refusals.

A :class:`Command` is data (STYLE habit 6): which instrument of a station,
which driver action, with which parameters, and who asked. Every check of a
command produces a :class:`Verdict` (allowed or refused, with the rule and the
values involved) that goes to the audit trail. A station's :class:`Latch` is
set by a trip or an e-stop and refuses every actuation until an explicit
``reset(who, why)`` that succeeds only once the condition has cleared.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Command:
    """One intended action on one instrument of a station.

    ``instrument`` is the instrument's name in the station (``hotplate``,
    ``acid``, ``enclosure``), ``action`` the driver method (``set_heater``,
    ``dispense``), ``params`` its keyword arguments in SI-ish units, ``who``
    the proposer (``optimizer``, ``agent:<id>``, ``operator:<name>``).
    """

    instrument: str
    action: str
    params: Mapping[str, Any] = field(default_factory=dict)
    who: str = "unknown"

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.instrument}.{self.action}({args})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "instrument": self.instrument,
            "action": self.action,
            "params": dict(self.params),
            "who": self.who,
        }


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one command. ``rule`` names what refused it (None if allowed)."""

    allowed: bool
    station: str
    command: Command
    reason: str
    rule: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    t: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "station": self.station,
            "command": self.command.as_dict(),
            "reason": self.reason,
            "rule": self.rule,
            "values": dict(self.values),
            "t": self.t,
        }


class SafetyError(Exception):
    """Base class of the safety layer's errors."""


class SafetyRefusal(SafetyError):
    """A command was refused; nothing reached the wire. ``verdict`` says why."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(f"{verdict.station}: refused {verdict.command}: {verdict.reason}")
        self.verdict = verdict


class StationTripped(SafetyRefusal):
    """Refused because the station is latched (tripped or e-stopped) and not yet reset."""


class ResetRefused(SafetyError):
    """``reset()`` was asked while the trip condition still holds (or without who/why)."""


AuditSink = Callable[[Verdict], None]


class AuditTrail:
    """Every verdict, in order, in memory, plus optional sinks (the store persists later layers').

    Thread-safe; sinks are called synchronously and must be quick (a queue put).
    """

    def __init__(self, sinks: list[AuditSink] | None = None) -> None:
        self._lock = threading.Lock()
        self._records: list[Verdict] = []
        self._sinks: list[AuditSink] = list(sinks or [])

    def add_sink(self, sink: AuditSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def record(self, verdict: Verdict) -> None:
        with self._lock:
            self._records.append(verdict)
            sinks = list(self._sinks)
        for sink in sinks:
            sink(verdict)

    def records(self, *, station: str | None = None, allowed: bool | None = None) -> list[Verdict]:
        with self._lock:
            return [
                v
                for v in self._records
                if (station is None or v.station == station)
                and (allowed is None or v.allowed == allowed)
            ]


@dataclass
class TripRecord:
    reason: str
    source: str  # monitor name, "estop", ...
    t: float = field(default_factory=time.time)


@dataclass
class ResetRecord:
    who: str
    why: str
    t: float = field(default_factory=time.time)


class Latch:
    """Latched trip state of one station. Thread-safe.

    ``trip()`` sets it (the first reason is kept; later trips are appended to
    ``history``). ``reset(who, why, cleared)`` clears it only when ``cleared``
    is true, i.e. the caller has checked that no trip condition still holds.
    """

    def __init__(self, station: str) -> None:
        self.station = station
        self._lock = threading.Lock()
        self._trip: TripRecord | None = None
        self.history: list[TripRecord | ResetRecord] = []

    @property
    def tripped(self) -> bool:
        with self._lock:
            return self._trip is not None

    @property
    def trip_record(self) -> TripRecord | None:
        with self._lock:
            return self._trip

    def trip(self, reason: str, source: str) -> bool:
        """Latch. Returns True if this call tripped it (False if it was already tripped)."""
        rec = TripRecord(reason, source)
        with self._lock:
            self.history.append(rec)
            if self._trip is not None:
                return False
            self._trip = rec
            return True

    def reset(self, who: str, why: str, *, cleared: bool, still: str = "") -> None:
        if not who.strip() or not why.strip():
            raise ResetRefused(f"{self.station}: a reset must say who resets it and why")
        with self._lock:
            if self._trip is None:
                return
            if not cleared:
                raise ResetRefused(
                    f"{self.station}: cannot reset, the trip condition still holds"
                    + (f": {still}" if still else "")
                )
            self._trip = None
            self.history.append(ResetRecord(who, why))


def describe_values(values: Mapping[str, Any]) -> str:
    """``a=1, b='x'`` for messages."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


class StationState:
    """What the safety layer knows about one station, as flat ``instrument.channel`` names.

    * ``commanded``: targets set by allowed commands (``hotplate.heater``,
      ``hotplate.setpoint_c``, ``hotplate.stirrer_rpm``, ``beaker.volume`` = mL
      in a vessel of the envelope, ...), updated by the guard
      after a command succeeded on the wire;
    * ``measured``: the latest readings (``hotplate.liquid_c``, ``enclosure.lid``,
      ...) with the monotonic time they were taken, updated by whoever polls
      the instruments (the station supervisor's monitor loop, or the guard's
      ``refresh()``).

    ``view()`` merges both (a name present in both takes the measured value
    only if ``prefer_measured``). Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.commanded: dict[str, Any] = {}
        self.measured: dict[str, tuple[Any, float]] = {}

    def set_commanded(self, updates: Mapping[str, Any]) -> None:
        with self._lock:
            self.commanded.update(updates)

    def set_measured(
        self, instrument: str, reading: Mapping[str, Any], t: float | None = None
    ) -> None:
        stamp = time.monotonic() if t is None else t
        with self._lock:
            for key, value in reading.items():
                self.measured[f"{instrument}.{key}"] = (value, stamp)

    def age(self, name: str) -> float | None:
        """Seconds since ``name`` was measured (None if never)."""
        with self._lock:
            entry = self.measured.get(name)
        return None if entry is None else time.monotonic() - entry[1]

    def view(self, *, prefer_measured: bool = False) -> dict[str, Any]:
        with self._lock:
            merged = {k: v for k, (v, _) in self.measured.items()}
            for key, value in self.commanded.items():
                if prefer_measured and key in merged:
                    continue
                merged[key] = value
            return merged
