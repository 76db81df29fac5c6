"""Picking a campaign up after a crash: :meth:`JournalResume.resume`, below
:class:`~loops.journal.Journal`."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from loops.journal._model import CompletedRun, InterruptedExperiment, ResumeInfo
from loops.journal._steps import JournalSteps


class JournalResume(JournalSteps):
    """:meth:`resume`: what a campaign needs to carry on, the journal made consistent first."""

    def resume(
        self, campaign_id: str, *, epoch: int | None = None, keep: Sequence[str] = ()
    ) -> ResumeInfo:
        """Pick a campaign up after a crash, in one transaction (idempotent).

        ``running`` experiments whose station journaled their outcome
        (:meth:`record_outcome`: every step ran) stay ``running`` and are returned in
        ``completed``: record their results. Those whose every step finished and was
        measured (:meth:`step_done` ``measured=``) but whose outcome was not journaled stay
        ``running`` too, returned in ``recovered``: verify and record them. The other
        ``running`` ones become
        ``interrupted`` (reason and log data say which step was in progress): the caller
        safe-states their station, checks it, and resolves them with ``fail()``; they are
        never re-run. ``checked`` and ``queued`` ones (no step started) go back to
        ``proposed``, to be dry-run again. Finished results and the optimizer state are
        returned as stored. ``epoch``: the resuming owner's (:meth:`take_ownership`).
        ``keep``: experiments whose station still runs them for this owner (it took their
        lease over live): those ``running`` without a journaled outcome stay ``running`` and
        are returned in ``adopted``.
        """
        with self._tx() as conn:
            self._require_campaign(conn, campaign_id)
            self._require_epoch(conn, campaign_id, epoch)
            running = conn.execute(
                "SELECT id FROM experiments WHERE campaign_id = ? AND state = 'running' ORDER BY seq",
                (campaign_id,),
            ).fetchall()
            newly: set[str] = set()
            completed: list[str] = []
            recovered: list[str] = []
            adopted: list[str] = []
            for (eid,) in running:
                if self._outcome_row(conn, eid) is not None:
                    completed.append(eid)  # ran to its end and was measured: not interrupted
                    continue
                if self._event_data(conn, eid, "measured") is not None:
                    recovered.append(eid)  # every step ran, measured, not verified yet
                    continue
                if eid in keep:
                    adopted.append(eid)  # its station still runs it for this owner
                    continue
                self._interrupt(conn, campaign_id, eid)
                newly.add(eid)
            waiting = conn.execute(
                "SELECT id, state FROM experiments WHERE campaign_id = ? "
                "AND state IN ('checked', 'queued') ORDER BY seq",
                (campaign_id,),
            ).fetchall()
            for eid, state in waiting:
                self._apply(
                    conn,
                    eid,
                    campaign_id,
                    "proposed",
                    reason=f"resume: was {state}, no step started; dry-run again",
                    fields={"was": state},
                )
            self._log(
                conn,
                None,
                campaign_id,
                "campaign",
                self._campaign_state(conn, campaign_id),
                None,
                {
                    "resumed": True,
                    "interrupted": sorted(newly),
                    "completed": completed,
                    "recovered": recovered,
                    "adopted": adopted,
                    "requeued": [w[0] for w in waiting],
                },
            )
            interrupted_ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM experiments WHERE campaign_id = ? AND state = 'interrupted' "
                    "ORDER BY seq",
                    (campaign_id,),
                ).fetchall()
            ]
            steps = {eid: self._step_info(conn, eid) for eid in interrupted_ids}
            next_seq = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM experiments WHERE campaign_id = ?",
                (campaign_id,),
            ).fetchone()[0]
        requeued = {w[0] for w in waiting}
        campaign = self.campaign(campaign_id)
        interrupted = []
        for eid in interrupted_ids:
            exp = self.experiment(eid)
            info = steps[eid]
            interrupted.append(
                InterruptedExperiment(
                    experiment=exp,
                    station=exp.station,
                    last_step_started=info["last_step_started"],
                    last_step=info["last_step"],
                    last_step_done=info["last_step_done"],
                    steps_done=info["steps_done"],
                    marked_now=eid in newly,
                )
            )
        pending = self.experiments(campaign_id, "proposed")
        return ResumeInfo(
            campaign=campaign,
            finished=self.experiments(campaign_id, "done"),
            failed=self.experiments(campaign_id, "failed"),
            rejected=self.experiments(campaign_id, "rejected"),
            interrupted=interrupted,
            requeued=[e for e in pending if e.id in requeued],
            pending_proposals=pending,
            optimizer_state=campaign.optimizer_state,
            next_seq=next_seq,
            completed=[
                CompletedRun(
                    self.experiment(eid), self.outcome(eid) or {}, self.outcome_images(eid)
                )
                for eid in completed
            ],
            recovered=[self._measured_run(eid) for eid in recovered],
            adopted=[self.experiment(eid) for eid in adopted],
        )

    def _measured_run(self, eid: str) -> CompletedRun:
        """A run whose every step finished, with what it measured (unverified) and its JPEGs."""
        return CompletedRun(
            self.experiment(eid), self.measured(eid) or {}, self.outcome_images(eid)
        )

    def _interrupt(self, conn: sqlite3.Connection, campaign_id: str, eid: str) -> None:
        """``running`` -> ``interrupted``, the reason saying which step was in progress."""
        info = self._step_info(conn, eid)
        if info["last_step_started"] is None:
            where = "no step had started"
        else:
            where = f"step {info['last_step_started']} " + (
                "had finished" if info["last_step_done"] else "was in progress"
            )
        self._apply(
            conn,
            eid,
            campaign_id,
            "interrupted",
            reason=f"resume: found running ({where}); safe-state and check the station, "
            "never re-run",
            fields={
                "last_step_started": info["last_step_started"],
                "last_step_done": info["last_step_done"],
                "step": info["last_step"],
            },
        )
