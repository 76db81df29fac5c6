"""The journal's data: experiment and campaign states, errors, row types, JSON encoding."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPERIMENT_STATES = (
    "proposed",
    "awaiting-approval",
    "checked",
    "rejected",
    "queued",
    "running",
    "done",
    "failed",
    "interrupted",
    "cancelled",
)
NEXT_STATES: Mapping[str, frozenset[str]] = {
    "proposed": frozenset({"checked", "rejected", "cancelled", "awaiting-approval"}),
    # a human decides (loops/journal/_approvals.py): approved -> checked; denied or expired ->
    # rejected; the campaign ended -> cancelled
    "awaiting-approval": frozenset({"checked", "rejected", "cancelled"}),
    "checked": frozenset({"queued", "proposed", "cancelled"}),
    "queued": frozenset({"running", "proposed", "failed", "cancelled"}),
    "running": frozenset({"done", "failed", "interrupted"}),
    "interrupted": frozenset({"failed"}),
    "done": frozenset(),
    "failed": frozenset(),
    "rejected": frozenset(),
    "cancelled": frozenset(),
}
FINAL_STATES = frozenset(s for s, nxt in NEXT_STATES.items() if not nxt)
CAMPAIGN_STATES = ("running", "paused", "stopped", "done", "aborted")


# --------------------------------------------------------------------- errors
class JournalError(Exception):
    """The journal refused an operation or cannot be used (the message says which and why)."""


class UnknownCampaign(JournalError, LookupError):
    """No campaign with that id in the journal."""


class UnknownExperiment(JournalError, LookupError):
    """No experiment with that id in the journal."""


class CampaignMismatch(JournalError):
    """create_campaign(exist_ok=True) found the id with a different name or program."""


class IllegalTransition(JournalError):
    """A transition the state machine does not allow; names the experiment and both states."""

    def __init__(
        self, experiment_id: str, from_state: str, to_state: str, detail: str = ""
    ) -> None:
        self.experiment_id = experiment_id
        self.from_state = from_state
        self.to_state = to_state
        allowed = ", ".join(sorted(NEXT_STATES.get(from_state, ()))) or "nothing (final state)"
        msg = (
            f"experiment {experiment_id}: illegal transition {from_state!r} -> {to_state!r} "
            f"(from {from_state!r} allowed: {allowed})"
        )
        super().__init__(msg + (f"; {detail}" if detail else ""))


class StepOrderError(JournalError):
    """A step event out of order: a step started twice, or done without being started."""


class StaleOwner(JournalError):
    """A write (or a station call) from a campaign owner that a newer owner (a higher
    epoch: a resume, a restarted service) has fenced off."""


# ---------------------------------------------------------------- data model
@dataclass(frozen=True)
class Campaign:
    """One campaign row. ``program`` is what was given (program.md text or a dict)."""

    id: str
    name: str
    program: Any
    state: str
    optimizer_state: dict[str, Any] | None
    created: float
    updated: float


@dataclass(frozen=True)
class Experiment:
    """One experiment row (times are wall-clock seconds since the epoch).

    ``step`` is the index of the last step started (None before the first);
    ``verified`` is None (not checked), True, or False (untrusted result).
    """

    id: str
    campaign_id: str
    seq: int
    station: str | None
    params: dict[str, Any]
    proposer: str
    state: str
    step: int | None
    recipe: Any
    result: Any
    objective: float | None
    verified: bool | None
    reason: str | None
    created: float
    updated: float

    @property
    def trusted(self) -> bool:
        """False when verification disagreed (verified is False); unverified counts as trusted."""
        return self.verified is not False


@dataclass(frozen=True)
class Transition:
    """One row of the append-only log.

    ``event``: ``state`` (a state change), ``step_started``, ``step_done``,
    ``measured`` (what the run measured, with its last ``step_done``), ``outcome``
    (the station's verified outcome), ``verified`` (mark_verified), ``campaign``
    (campaign-level, experiment_id
    None, state = the campaign's) or ``station`` (campaign-level: a station went
    out, was paused or rests; ``data`` says which and why). ``data`` is None or a dict: the event's own
    keys (``params``/``proposer`` when proposed, ``step`` when a step started,
    ``result``/``objective``/``verified`` when done, ``last_step_*`` when
    interrupted by resume), ``reason``/``station``/``recipe`` when given, and
    the caller's data under ``"data"``: the log alone rebuilds the tables.
    """

    id: int
    experiment_id: str | None
    campaign_id: str
    t: float
    event: str
    state: str
    step: int | None
    data: dict[str, Any] | None


@dataclass(frozen=True)
class InterruptedExperiment:
    """An experiment found ``running`` at resume: the station must be safe-stated and checked.

    ``last_step_started`` is the index of the last physical step that started
    (None: the experiment was running but no step had started), ``last_step``
    its step data, ``last_step_done`` whether it also finished. ``marked_now`` is
    False for an experiment an earlier resume marked and nobody resolved yet
    (resolve with ``fail(id, reason)`` once the station is checked).
    """

    experiment: Experiment
    station: str | None
    last_step_started: int | None
    last_step: Any
    last_step_done: bool
    steps_done: tuple[int, ...]
    marked_now: bool


@dataclass(frozen=True)
class CompletedRun:
    """An experiment found ``running`` at resume whose station had journaled its outcome
    (:meth:`Journal.record_outcome`): every step ran and was measured, only the result was
    not recorded yet. Resume records it as the result it is (never re-run, never lost).

    ``outcome``: what the station's run returned (measurements, ``result``, ``verification``,
    ``audit``, ``images``: role -> ``sha256``/``bytes``); ``images``: the JPEGs journaled
    with it, role -> bytes (:meth:`Journal.outcome_images`).
    """

    experiment: Experiment
    outcome: dict[str, Any]
    images: dict[str, bytes]


@dataclass(frozen=True)
class ResumeInfo:
    """What a campaign needs to carry on after a crash (see :meth:`Journal.resume`).

    ``finished``: done experiments with results (re-tell the optimizer those its
    saved state does not include); ``failed``/``rejected``: information for the
    optimizer too; ``interrupted``: NEVER re-run, check the station first;
    ``requeued``: were checked/queued, now proposed again (also in
    ``pending_proposals``, which lists every experiment in ``proposed``, to be
    dry-run again); ``next_seq``: the seq the next proposal will get;
    ``completed``: running experiments whose outcome the station journaled (record
    their results: :class:`CompletedRun`); ``recovered``: running experiments whose every
    step finished and whose measurements were journaled with the last one, but not their
    outcome (the process died while the station verified it): verify each on its station
    and record it (:class:`CompletedRun`, ``outcome`` unverified: :meth:`Journal.measured`);
    ``adopted``: running experiments named in ``keep`` (their station still runs them for
    the new owner, who took its lease over), left ``running``: wait for their outcomes.
    """

    campaign: Campaign
    finished: list[Experiment]
    failed: list[Experiment]
    rejected: list[Experiment]
    interrupted: list[InterruptedExperiment]
    requeued: list[Experiment]
    pending_proposals: list[Experiment]
    optimizer_state: dict[str, Any] | None
    next_seq: int
    completed: list[CompletedRun] = dataclasses.field(default_factory=list)
    recovered: list[CompletedRun] = dataclasses.field(default_factory=list)
    adopted: list[Experiment] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------- JSON
def _json_default(o: Any) -> Any:
    if hasattr(o, "as_dict") and callable(o.as_dict):  # safety.Command, DryRunReport, ...
        return o.as_dict()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist") and callable(o.tolist):  # numpy arrays and scalars
        return o.tolist()
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    if isinstance(o, Mapping):
        return dict(o)
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"journal: {type(o).__name__} is not JSON-serialisable: {o!r}")


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, default=_json_default, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
