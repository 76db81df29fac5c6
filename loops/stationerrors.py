"""A station's errors, as they cross Ray: every one pickles, so the campaign's process gets
the station's own exception (or :class:`StationError` with the original's ``Type: message``).

Raised by the station actor (:mod:`loops.stationactor`) and by a
:class:`~loops.stations.StationLink` call (:class:`StationLost`).
"""

from __future__ import annotations

import pickle
from typing import Any

from loops.journal import IllegalTransition, JournalError

__all__ = [
    "ExperimentStopped",
    "PortableIllegalTransition",
    "StationBusy",
    "StationError",
    "StationLost",
    "StationNotOpen",
    "cause_text",
    "portable_error",
]


class StationError(RuntimeError):
    """An error inside a station actor whose own type cannot cross Ray (its constructor
    does not take its ``args``): the message is the original's ``Type: message``."""


class StationNotOpen(RuntimeError):
    """The station actor was asked to act before ``start()`` (or after ``stop()``)."""


class ExperimentStopped(RuntimeError):
    """The station tripped (a monitor, an e-stop, a campaign abort) while an experiment ran:
    its recipe was stopped there and then, so nothing of it resumes after a reset."""


class StationBusy(RuntimeError):
    """The station is already running an experiment (one at a time per bench)."""


class StationLost(RuntimeError):
    """The process that ran a station died (its instruments could not be safe-stated
    from there); raised by a :class:`~loops.stations.StationLink` call."""


class PortableIllegalTransition(IllegalTransition):
    """An :class:`~loops.journal.IllegalTransition` that survives pickling (Ray sends errors
    across processes; the original's constructor arguments are not its ``args``)."""

    def __init__(self, experiment_id: str, from_state: str, to_state: str, message: str) -> None:
        Exception.__init__(self, message)
        self.experiment_id = experiment_id
        self.from_state = from_state
        self.to_state = to_state

    def __reduce__(self) -> tuple[Any, tuple[str, str, str, str]]:
        return (type(self), (self.experiment_id, self.from_state, self.to_state, str(self)))


def portable_error(exc: Exception, fallback: type[Exception] = JournalError) -> Exception:
    """``exc`` if it pickles, else an equivalent that does (same class family, or
    ``fallback`` with ``Type: message``)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any pickling failure: send a portable copy
        if isinstance(exc, IllegalTransition):
            return PortableIllegalTransition(
                exc.experiment_id, exc.from_state, exc.to_state, str(exc)
            )
        return fallback(f"{type(exc).__name__}: {exc}")
    return exc


#: What Ray's actor errors mean for a station, in words (Ray's own messages run to
#: several lines of internals). Keyed by name: this module does not import Ray.
_ACTOR_GONE = {
    "ActorDiedError": "its Ray actor died (its node or process went down)",
    "ActorUnavailableError": "its Ray actor is not answering (its node may be down or restarting)",
}


def cause_text(exc: BaseException) -> str:
    """``Type: message`` of an error on one line, unwrapping a Ray task error to its cause;
    a Ray actor error says what it means for the station first."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    name = type(err).__name__
    text = " ".join(str(err).split()) or name
    gone = _ACTOR_GONE.get(name)
    if gone:
        return f"{name}: {gone} ({text[:300]})"
    return f"{name}: {text}"
