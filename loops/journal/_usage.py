"""What one proposer used, read from the journal: the counts behind an agent's quotas.

:meth:`JournalUsage.proposer_usage` answers, in one read, for a proposer
(``agent:alice``):

* ``proposals``: when each of its proposals was journaled (``created``, epoch seconds)
  after a time: accepted and refused alike (a proposal refused before it was journaled,
  e.g. for its quota, is not in the journal and does not count);
* ``runs``: when each of its experiments started running (its ``running`` transition)
  after a time, and ``pending``: how many of its experiments were accepted and have not
  started yet (any state that is not final and never ran: ``proposed``, ``checked``,
  ``queued``, ...), which will run;
* ``consumption``: per ``(station, resource)``, what the station's safety budgets
  consumed while one of its experiments ran there, after a time: ``(t_wall, amount)``
  rows. The consumption table does not name an experiment; a station runs one
  experiment at a time, so a row is the experiment's when its time lies between the
  experiment's last ``queued`` before it ran (the station's run, and its ``experiments``
  unit, start after that) and its end (``done``, ``failed`` or ``interrupted``; a
  running one: now). A step's reservation (a step cut by a kill) counts like the
  consumption it stands for.

Read-only; the times are the journal's wall clock (``time.time()``) and the stations'
``t_wall``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loops.journal._model import FINAL_STATES
from loops.journal._reads import JournalReads

_FINAL = tuple(sorted(FINAL_STATES))
_RAN = (
    "SELECT MIN(t) FROM transitions WHERE experiment_id = e.id AND event = 'state' "
    "AND state = 'running'"
)


class JournalUsage(JournalReads):
    """:meth:`proposer_usage` (module docstring)."""

    def proposer_usage(
        self,
        proposer: str,
        *,
        proposals_since: float | None = None,
        runs_since: float | None = None,
        consumption: Sequence[tuple[str, str, float]] = (),
    ) -> dict[str, Any]:
        """``proposer``'s proposals after ``proposals_since``, its runs after ``runs_since``
        and pending experiments (None: not asked), and for each ``(station, resource,
        since_wall)`` of ``consumption`` what its experiments consumed there after
        ``since_wall``: ``{"proposals": [t, ...], "runs": [t, ...], "pending": n,
        "consumption": {(station, resource): [(t_wall, amount), ...]}}``, oldest first."""
        db = self._db()
        out: dict[str, Any] = {"proposals": [], "runs": [], "pending": 0, "consumption": {}}
        if proposals_since is not None:
            rows = db.execute(
                "SELECT created FROM experiments WHERE proposer = ? AND created > ? "
                "ORDER BY created",
                (proposer, float(proposals_since)),
            ).fetchall()
            out["proposals"] = [float(r[0]) for r in rows]
        if runs_since is not None:
            rows = db.execute(
                f"SELECT t0 FROM (SELECT ({_RAN}) AS t0 FROM experiments e WHERE e.proposer = ?) "
                "WHERE t0 > ? ORDER BY t0",
                (proposer, float(runs_since)),
            ).fetchall()
            out["runs"] = [float(r[0]) for r in rows]
            marks = ", ".join("?" * len(_FINAL))
            (pending,) = db.execute(
                f"SELECT COUNT(*) FROM experiments e WHERE e.proposer = ? "
                f"AND e.state NOT IN ({marks}) AND NOT EXISTS ({_RAN.replace('MIN(t)', '1')})",
                (proposer, *_FINAL),
            ).fetchone()
            out["pending"] = int(pending)
        for station, resource, since in consumption:
            rows = db.execute(
                "WITH ran AS (SELECT e.id AS id, e.station AS station, "
                f"({_RAN}) AS t_run FROM experiments e WHERE e.proposer = ? AND e.station = ?), "
                "spans AS (SELECT station, "
                "COALESCE((SELECT MAX(t) FROM transitions WHERE experiment_id = ran.id "
                "AND event = 'state' AND state = 'queued' AND t <= ran.t_run), ran.t_run) AS t0, "
                "(SELECT MIN(t) FROM transitions WHERE experiment_id = ran.id AND event = 'state' "
                "AND state IN ('done', 'failed', 'interrupted') AND t >= ran.t_run) AS t1 "
                "FROM ran WHERE t_run IS NOT NULL) "
                "SELECT c.t_wall, c.amount FROM consumption c JOIN spans s "
                "ON c.station = s.station AND c.t_wall >= s.t0 "
                "AND (s.t1 IS NULL OR c.t_wall <= s.t1) "
                "WHERE c.resource = ? AND c.t_wall > ? ORDER BY c.t_wall, c.id",
                (proposer, str(station), str(resource), float(since)),
            ).fetchall()
            out["consumption"][(str(station), str(resource))] = [
                (float(t), float(a)) for t, a in rows
            ]
        return out
