"""Starting a campaign from earlier ones' results (``prior:`` in program.md).

:func:`read_prior` reads a campaign of the same journal and turns what happened there into
what this campaign's optimizer can be told: parameters matched by name (the prior's other
parameters are ignored), a done experiment's value of *this* program's objective(s) read
from its journaled measurements (``untrusted`` when its verification failed), a failed
one as ``failed``, a refusal as ``infeasible`` with the dry run's rules. Points outside
this program's space (a parameter missing, a value outside the bounds or the choices) and
results without this program's objective are dropped and counted, never silently.

:class:`PriorError` (a ValueError) says, in one line, what is wrong: an unknown campaign
(listing the journal's), a campaign with no parameter in common, or none of whose results
lies in this space. The campaign runner reads every prior before it creates the campaign
(a typo creates nothing), tells the points before the first ask and journals what it told
(:meth:`Journal.record_prior <loops.journal.Journal.record_prior>`); they are not this
campaign's experiments and count towards none of its budgets or stop rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loops.journal import Journal, JournalLink, UnknownCampaign
from loops.optspace import Params, ParamSpace, Status

__all__ = ["Prior", "PriorError", "PriorPoint", "read_prior", "refusing_rules"]

#: a result's (first objective's value, every objective's values) from its measurements
Outcome = Callable[[Mapping[str, Any]], tuple[float | None, tuple[float, ...] | None]]


class PriorError(ValueError):
    """A ``prior:`` campaign that cannot start this one (unknown, or nothing in common)."""


@dataclass(frozen=True)
class PriorPoint:
    experiment_id: str
    params: Params
    status: Status
    value: float | None
    vector: tuple[float, ...] | None
    rules: tuple[str, ...] = ()


@dataclass
class Prior:
    """What a prior campaign gives this one: the points to tell, and what was dropped."""

    campaign_id: str
    points: list[PriorPoint] = field(default_factory=list)
    #: reason -> how many of the prior's experiments were dropped for it
    dropped: Counter[str] = field(default_factory=Counter)
    #: the prior's experiments that never ran nor were refused (cancelled, never started)
    skipped: int = 0

    def record(self) -> dict[str, Any]:
        """The journal's record of it (JSON), with a ``reason`` in words."""
        told = Counter(p.status for p in self.points)
        parts = ", ".join(f"{n} {s}" for s, n in told.items()) or "none"
        text = (
            f"started from campaign {self.campaign_id}: {len(self.points)} results told ({parts})"
        )
        if self.dropped:
            text += "; dropped " + ", ".join(f"{n} {why}" for why, n in self.dropped.items())
        if self.skipped:
            text += f"; {self.skipped} never ran"
        return {
            "prior": self.campaign_id,
            "told": len(self.points),
            "by_status": dict(told),
            "experiments": [p.experiment_id for p in self.points],
            "dropped": dict(self.dropped),
            "skipped": self.skipped,
            "reason": text,
        }


async def read_prior(
    journal: JournalLink,
    campaign_id: str,
    space: ParamSpace,
    outcome: Outcome,
    *,
    this_campaign: str,
) -> Prior:
    """The points ``campaign_id`` (in ``journal``) gives a campaign over ``space`` whose
    objective(s) ``outcome`` reads from measurements. Raises :class:`PriorError`."""
    if campaign_id == this_campaign:
        raise PriorError(f"prior: campaign {campaign_id!r} cannot start from its own results")
    try:
        await journal.call(Journal.campaign, campaign_id)
    except UnknownCampaign:
        known = [c.id for c in await journal.call(Journal.campaigns)]
        raise PriorError(
            f"prior: no campaign {campaign_id!r} in this journal (it has: "
            f"{', '.join(known) or 'none'}); name an earlier campaign of the same lab"
        ) from None
    exps = await journal.call(Journal.experiments, campaign_id)
    names = set(space.names)
    theirs = {n for e in exps for n in e.params}
    if exps and not names & theirs:
        raise PriorError(
            f"prior: campaign {campaign_id!r} shares no parameter with this program (its: "
            f"{', '.join(sorted(theirs))}; this one's: {', '.join(space.names)})"
        )
    rules = await refusing_rules(journal, campaign_id)
    prior = Prior(campaign_id)
    for e in exps:
        if e.state not in ("done", "failed", "rejected"):
            prior.skipped += 1
            continue
        missing = sorted(names - set(e.params))
        if missing:
            prior.dropped[f"without {', '.join(missing)}"] += 1
            continue
        try:
            params = space.validate({n: e.params[n] for n in space.names})
        except ValueError:
            prior.dropped["outside this space"] += 1
            continue
        status: Status
        value: float | None = None
        vector: tuple[float, ...] | None = None
        if e.state == "done":
            result = e.result if isinstance(e.result, Mapping) else {}
            measurements = result.get("measurements")
            if isinstance(measurements, Mapping):
                value, vector = outcome(measurements)
            if value is None:
                prior.dropped["without this program's objective"] += 1
                continue
            status = "ok" if e.trusted else "untrusted"
        elif e.state == "failed":
            status = "failed"
        else:
            status = "infeasible"
        prior.points.append(
            PriorPoint(e.id, params, status, value, vector, tuple(rules.get(e.id, ())))
        )
    if not prior.points:
        dropped = ", ".join(f"{n} {why}" for why, n in prior.dropped.items()) or "none ran"
        raise PriorError(
            f"prior: none of campaign {campaign_id!r}'s {len(exps)} experiments gives this "
            f"program a result ({dropped})"
        )
    return prior


async def refusing_rules(journal: JournalLink, campaign_id: str) -> dict[str, list[str]]:
    """The dry run's refusing rules of each rejected experiment of ``campaign_id``."""
    out: dict[str, list[str]] = {}
    for t in await journal.call(Journal.campaign_log, campaign_id):
        if t.state == "rejected" and t.experiment_id is not None and isinstance(t.data, Mapping):
            data = t.data.get("data")
            rules = data.get("rules") if isinstance(data, Mapping) else None
            if isinstance(rules, list):
                out[t.experiment_id] = [str(r) for r in rules]
    return out
