"""What a trip did: :class:`TripReport` (one trip or re-assertion of a station's safe state)
and :class:`SafeOutcome` (what one instrument's ``safe_state()`` did in it).

Made by the station supervisor (:mod:`safety.supervisor`), returned by
``SafeStation.trip`` and the e-stop, kept in ``StationSupervisor.trips``; plain
data (``as_dict``) for the API, the audit and the campaign's failure records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SafeOutcome", "TripReport"]


@dataclass
class SafeOutcome:
    """What one instrument's ``safe_state()`` did in a trip. ``elapsed_s`` real seconds."""

    instrument: str
    ok: bool
    elapsed_s: float
    error: str | None = None
    timed_out: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "instrument": self.instrument,
            "ok": self.ok,
            "elapsed_s": self.elapsed_s,
            "error": self.error,
            "timed_out": self.timed_out,
        }


@dataclass
class TripReport:
    """One trip (or re-assertion) of a station's safe state.

    Times are ``time.monotonic()`` (the clock of ``StationState`` and of the
    simulators' wire log): ``t_reading`` when the reading that tripped was
    taken (for a staleness trip, an e-stop or an API trip: when it was
    detected), ``t_detected`` when the trip latched, ``t_done`` when the last
    safe-state action completed. ``already_tripped``: the station was latched
    already and no safe-state storm ran for this call.
    """

    station: str
    reason: str
    source: str
    kind: str = "trip"  # "trip" | "reassert"
    already_tripped: bool = False
    who: str | None = None
    t: float = field(default_factory=time.time)
    t_reading: float = field(default_factory=time.monotonic)
    t_detected: float = field(default_factory=time.monotonic)
    t_done: float | None = None
    outcomes: dict[str, SafeOutcome] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.t_done is not None

    @property
    def safe(self) -> list[str]:
        """Instruments that reached their safe state."""
        return [name for name, o in self.outcomes.items() if o.ok]

    @property
    def failed(self) -> list[str]:
        """Instruments whose safe state failed or timed out."""
        return [name for name, o in self.outcomes.items() if not o.ok]

    @property
    def ok(self) -> bool:
        return self.done and not self.failed

    @property
    def reaction_s(self) -> float | None:
        """Real seconds from the reading that tripped to the last safe-state action completing."""
        return None if self.t_done is None else self.t_done - self.t_reading

    def as_dict(self) -> dict[str, Any]:
        return {
            "station": self.station,
            "reason": self.reason,
            "source": self.source,
            "kind": self.kind,
            "already_tripped": self.already_tripped,
            "who": self.who,
            "t": self.t,
            "reaction_s": self.reaction_s,
            "safe": self.safe,
            "failed": self.failed,
            "outcomes": {k: o.as_dict() for k, o in self.outcomes.items()},
        }

    def summary(self) -> str:
        if self.already_tripped:
            return f"{self.station}: already tripped ({self.reason})"
        if not self.done:
            return f"{self.station}: safe state in progress ({self.reason})"
        text = f"{self.station}: {len(self.safe)}/{len(self.outcomes)} instruments safe"
        if self.failed:
            detail = "; ".join(f"{n}: {self.outcomes[n].error}" for n in self.failed)
            text += f", FAILED {detail}"
        return text
