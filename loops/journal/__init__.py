"""Journal: every state transition of every experiment, written durably before it is acted on.

One SQLite file per lab (or per campaign), ``PRAGMA journal_mode=WAL`` and
``PRAGMA synchronous=FULL``: a method that writes returns only after its
transaction is committed and the WAL is fsync'ed, so the caller acts on a
transition only once it would survive a ``kill -9`` or a power cut. Every
write is ONE transaction: the experiment's row, its append-only
``transitions`` row and (when given) the campaign's optimizer state change
together or not at all.

Experiment states (:data:`NEXT_STATES` is the whole machine)::

    proposed -> checked | rejected | cancelled | awaiting-approval
    awaiting-approval -> checked (a human approved) | rejected (denied, expired) | cancelled
    checked  -> queued | proposed (re-dry-run) | cancelled
    queued   -> running | proposed (never started) | failed | cancelled
    running  -> done (finish) | failed | interrupted      (+ step_started/step_done events)
    interrupted -> failed   (after the station was safe-stated and checked)
    done, failed, rejected, cancelled: final (done may get mark_verified)

A physical step is never re-run: :meth:`Journal.step_started` refuses an index
that already started, and nothing leaves ``interrupted`` except ``failed``.
:meth:`Journal.resume` after a crash marks ``running`` experiments
``interrupted`` (with the step that was in progress; one whose outcome the station
journaled is returned as a :class:`CompletedRun` instead), sends ``checked``/``queued``
ones back to ``proposed`` (to be dry-run again) and returns everything the
campaign needs to carry on (:class:`ResumeInfo`).

Threading: a :class:`Journal` owns one connection and must be used from the
thread that opened it (sqlite3 checks). Its writes are synchronous and short
(median ~0.2-0.3 ms, p99 < 1 ms on the CI disk; a few ms on a lab SSD), so the
campaign's event loop calls it directly: nothing else runs between the commit
and the action that follows it. On a slow disk (SD card, network share) use
:class:`AsyncJournal`, the same API on one dedicated thread;
:meth:`Journal.commit_stats` tells which case a machine is in.

The API is defined once, by :class:`Journal`. Other processes and threads reach it
through a :class:`JournalLink`: ``await link.call(Journal.finish, eid, result,
objective)``, type-checked against the method itself. :class:`AsyncJournal` is the
in-process link; ``loops.raylinks`` has the Ray actor and its link, which forward
:data:`JOURNAL_API` (every public method but ``close``) by name.

An agent's proposal that an approval policy sends to a human waits in
``awaiting-approval`` (:meth:`Journal.await_approval`; resume leaves it there): a
human's decision is recorded by :meth:`Journal.decide` and applied by the campaign, and
it leaves for ``checked`` only with a recorded approval (``_approvals``).

A station journals a run's outcome (:meth:`Journal.record_outcome`) before it returns
it: resume records such a run's result (:class:`CompletedRun`) instead of failing it.

Modules: ``_model`` (states, errors, row types, JSON), ``_schema`` (SQLite schema
and migrations), ``_reads`` (the queries and CSV rows), ``_conn`` (the connection, one
write transaction, the row-level helpers of the writes), ``_owners`` (owner epochs,
budget consumption), ``_steps`` (step events, reservations, outcomes), ``_resume``
(resume), ``_approvals`` (proposals awaiting a human), ``_usage`` (what one proposer
used: its quotas' counts), ``_store`` (:class:`Journal`: campaigns and state changes),
``_async`` (:class:`JournalLink`, :class:`AsyncJournal`).
"""

from loops.journal._approvals import AWAITING, ApprovalError
from loops.journal._async import AsyncJournal, JournalLink
from loops.journal._model import (
    CAMPAIGN_STATES,
    EXPERIMENT_STATES,
    FINAL_STATES,
    NEXT_STATES,
    Campaign,
    CampaignMismatch,
    CompletedRun,
    Experiment,
    IllegalTransition,
    InterruptedExperiment,
    JournalError,
    ResumeInfo,
    StaleOwner,
    StepOrderError,
    Transition,
    UnknownCampaign,
    UnknownExperiment,
)
from loops.journal._schema import SCHEMA_VERSION, migrate
from loops.journal._store import JOURNAL_API, Journal, api_name

__all__ = [
    "AWAITING",
    "ApprovalError",
    "CAMPAIGN_STATES",
    "EXPERIMENT_STATES",
    "FINAL_STATES",
    "JOURNAL_API",
    "NEXT_STATES",
    "SCHEMA_VERSION",
    "AsyncJournal",
    "Campaign",
    "CampaignMismatch",
    "CompletedRun",
    "Experiment",
    "IllegalTransition",
    "InterruptedExperiment",
    "Journal",
    "JournalError",
    "JournalLink",
    "ResumeInfo",
    "StaleOwner",
    "StepOrderError",
    "Transition",
    "UnknownCampaign",
    "UnknownExperiment",
    "api_name",
    "migrate",
]
