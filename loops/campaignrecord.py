"""Recording what an experiment came to: :class:`CampaignRecorder`.

Each outcome of a station's run (a finished result, verified or not, with its
images; no finite objective; refused at start; failed and tripped; the station
lost) is journaled with the optimizer's state in the same transaction, told to
the optimizer, counted, emitted as an event and given to whoever waits for it.

A station that dies after its run's last step keeps what the run measured: with the
outcome journaled (the station died before returning it) the result is recorded from
the journal at once, marked recovered; measured with the last step but not verified yet
(it died while verifying), the experiment stays ``running`` (never failed, never re-run)
and the next resume verifies it on a new actor of that station
(:meth:`StationActor.recover_outcome <loops.stationrecover.StationRecovery.recover_outcome>`)
and records it, as after a kill -9 of the campaign's process.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from loops.campaignbook import CampaignBook, Item, Slot, violation_text
from loops.journal import Experiment, Journal
from loops.stacktime import cpu_part, current_timer

log = logging.getLogger(__name__)

__all__ = ["RECOVERED", "RECOVERED_LIVE", "CampaignRecorder"]

#: the reason of a result recovered on resume (:meth:`CampaignResume._record_recovered
#: <loops.campaignresume.CampaignResume._record_recovered>`)
RECOVERED = (
    "recovered on resume: every step ran before the campaign's process stopped, "
    "the measurements journaled with the last one"
)
#: the reason of a result recorded from the journal after its station died (the
#: outcome journaled, not returned)
RECOVERED_LIVE = (
    "recovered after the station died: every step ran and the outcome was journaled "
    "before the station's process stopped"
)


class CampaignRecorder(CampaignBook):
    """The outcomes of proposals and runs, into the journal, the optimizer and the events."""

    async def _reject(self, item: Item, reasons: Sequence[str], *, tell: bool = True) -> None:
        if tell:
            self._tell(item, None, "infeasible")
        else:
            self._forget(item)
        await self.journal.call(
            Journal.reject,
            item.experiment_id,
            list(reasons),
            data={"rules": list(item.rules)} if item.rules else None,
            optimizer_state=self._state(),
            epoch=self._epoch,
        )
        self._counts.rejected += 1
        event = {
            "experiment_id": item.experiment_id,
            "params": item.params,
            "proposer": item.proposer,
            "reasons": list(reasons),
        }
        self._emit("rejected", **event)
        self._resolve(item.experiment_id, {"event": "rejected", **event})

    async def _station_lost(self, slot: Slot, item: Item, reason: str) -> None:
        """The station died or failed outside a recipe step: mark the experiment, never retry
        it (one that ran to its end is recorded or left for the resume: :meth:`_ran_to_its_end`)."""
        self._out(slot, reason)
        async with self._lock:
            exp: Experiment = await self.journal.call(Journal.experiment, item.experiment_id)
            if exp.state == "running" and await self._ran_to_its_end(slot, item, reason):
                return
            if exp.state == "running":
                step = "before its first step" if exp.step is None else f"during step {exp.step}"
                why = (
                    f"{reason} {step}; the instruments could not be safe-stated from here "
                    "(device watchdogs apply): check the bench; never retried"
                )
            else:
                why = f"{reason} before the experiment started; not retried"
            self._tell(item, None, "failed")
            await self.journal.call(
                Journal.fail,
                item.experiment_id,
                why,
                optimizer_state=self._state(),
                epoch=self._epoch,
            )
            self._counts.failed += 1
            if exp.state == "running":
                self._record_value(item.experiment_id, item.params, None)
            self._failed_event(slot, item, why)

    async def _ran_to_its_end(self, slot: Slot, item: Item, reason: str) -> bool:
        """After ``slot``'s station died during ``item``'s run: whether every step had run
        and been measured (journaled with the last step), and so the experiment is not a
        failure. Its journaled outcome is recorded now (marked recovered); one measured
        but not yet verified stays ``running`` for the next resume to verify on a new
        actor and record (module docstring). Caller holds the lock."""
        eid = item.experiment_id
        outcome = await self.journal.call(Journal.outcome, eid)
        if outcome is not None:
            images = await self.journal.call(Journal.outcome_images, eid)
            out = {
                **outcome,
                "image": images.get("outcome"),
                "reference_image": images.get("reference"),
                "recovered_after_death": True,
            }
            await self._record(slot, item, out)
            return True
        if await self.journal.call(Journal.measured, eid) is None:
            return False
        why = (
            f"{reason} after every step of {eid} ran and was measured, before it was verified: "
            "it stays running, never re-run; resume the campaign with a new actor of the "
            "station to verify and record it"
        )
        log.warning("campaign %s: %s", self.campaign_id, why)
        self._record_value(eid, item.params, None)  # it ran: it counts against the budget
        slot.reason = f"{reason}; {eid} awaits recovery: resume the campaign"
        self._emit("measured", experiment_id=eid, station=slot.name, reason=why)
        return True

    def _failed_event(self, slot: Slot, item: Item, reason: str, **extra: Any) -> None:
        event = {
            "experiment_id": item.experiment_id,
            "station": slot.name,
            "params": item.params,
            "proposer": item.proposer,
            "reason": reason,
            **extra,
        }
        self._emit("failed", **event)
        self._resolve(item.experiment_id, {"event": "failed", **event})

    async def _record(self, slot: Slot, item: Item, out: Mapping[str, Any]) -> None:
        j, eid = self.journal, item.experiment_id
        measure = self.program.objective.measure
        images, missing = self._save_images(out)
        # the evidence first, then the outcome that cites it: with a result, both in one
        # transaction (Journal.write_all); else the evidence on its own, first
        evidence: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        if images or out.get("audit"):
            evidence.append(
                (
                    "record_evidence",
                    (eid,),
                    {"verdicts": out.get("audit") or (), "images": images, "epoch": self._epoch},
                )
            )
        if out.get("ok"):
            measurements = dict(out.get("measurements") or {})
            value, vector = self._outcome(measurements)
            if value is not None:
                verification = out.get("verification")
                verified, reason = None, None
                if verification is not None:
                    verified = verification.get("verified")
                    if verified is False:
                        reason = "unverified: " + "; ".join(verification.get("reasons") or ["?"])
                if out.get("recovered_on_resume"):
                    checked = ", verified on resume" if verification is not None else ""
                    reason = "; ".join(filter(None, [reason, RECOVERED + checked]))
                elif out.get("recovered_after_death"):
                    reason = "; ".join(filter(None, [reason, RECOVERED_LIVE]))
                cpu_part(
                    "tell",
                    self._tell,
                    item,
                    value,
                    "untrusted" if verified is False else "ok",
                    vector,
                )
                result = {**dict(out.get("result") or {}), "station": slot.name}
                if verification is not None:
                    result["verification"] = verification
                if images:
                    result["images"] = images
                if missing:  # cited by the outcome, neither journaled nor on disk
                    result["images_missing"] = missing
                for flag in ("recorded_on_resume", "recovered_on_resume", "recovered_after_death"):
                    if out.get(flag):
                        result[flag] = True
                finish: dict[str, Any] = {
                    "verified": verified,
                    "reason": reason,
                    "optimizer_state": self._state(),
                    "epoch": self._epoch,
                }
                if evidence:  # one round trip, one commit: the evidence, then the result
                    await j.call(
                        Journal.write_all,
                        [*evidence, ("finish", (eid, result, float(value)), finish)],
                    )
                else:
                    await j.call(Journal.finish, eid, result, float(value), **finish)
                self._counts.done += 1
                self._counts.by_station[slot.name] = self._counts.by_station.get(slot.name, 0) + 1
                # an untrusted value counts against the budget but is no result (stop rules)
                self._record_value(eid, item.params, None if verified is False else value, vector)
                event = {
                    "experiment_id": eid,
                    "station": slot.name,
                    "params": item.params,
                    "proposer": item.proposer,
                    "objective": float(value),
                    "measurements": measurements,
                    "verified": verified,
                    "verification": verification,
                    "images": images,
                }
                timer = current_timer()  # where its stack time went (loops.stacktime)
                if timer is not None:
                    timer.merge(dict(out.get("stack") or {}), "station:")
                    event["stack"] = timer.as_dict()
                self._emit("finished", **event, progress=self.progress())
                self._resolve(eid, {"event": "finished", **event})
                self._count_disagreement(slot, verified, reason)
                return
            if evidence:
                await j.call(Journal.write_all, evidence)
            got = {o.measure: measurements.get(o.measure) for o in self.program.goals}
            if self.program.multi:
                reason = f"the recipe ran but produced no finite value of every objective ({got})"
            else:
                reason = f"the recipe ran but produced no finite {measure!r} (got {got[measure]!r})"
            self._tell(item, None, "failed")
            await j.call(
                Journal.fail,
                eid,
                reason,
                data={"measurements": measurements},
                optimizer_state=self._state(),
                epoch=self._epoch,
            )
            self._counts.failed += 1
            self._record_value(eid, item.params, None)
            self._failed_event(slot, item, reason)
            return
        if evidence:
            await j.call(Journal.write_all, evidence)
        if out.get("rejected"):  # the station's state changed since the check: nothing acted
            reasons = [violation_text(v) for v in out.get("violations") or []] or [
                str(out.get("error"))
            ]
            violations = out.get("violations") or []
            budget = bool(violations) and all(
                str(v.get("rule", "")).startswith("budget.") for v in violations
            )
            await j.call(
                Journal.transition,
                eid,
                "proposed",
                reason="the dry run at start refused it",
                epoch=self._epoch,
            )
            await self._reject(item, reasons, tell=not budget)
            if budget:
                self._out(slot, f"safety budget spent ({reasons[0]})", state="paused")
            return
        if out.get("refused"):  # latched, a budget, or the journal: nothing acted
            reason = f"station {slot.name} refused to start it: {out.get('error')}"
            self._forget(item)
            await j.call(
                Journal.transition,
                eid,
                "cancelled",
                reason=reason,
                optimizer_state=self._state(),
                epoch=self._epoch,
            )
            self._counts.cancelled += 1
            self._out(slot, str(out.get("error")))
            event = {"experiment_id": eid, "station": slot.name, "reason": reason}
            self._emit("cancelled", **event)
            self._resolve(eid, {"event": "cancelled", **event})
            return
        step = out.get("step")
        where = "before its first step" if step is None else f"at step {step}"
        reason = f"failed {where}: {out.get('error')}"
        self._tell(item, None, "failed")
        await j.call(
            Journal.fail,
            eid,
            reason,
            data={k: v for k, v in out.items() if k != "image"},
            optimizer_state=self._state(),
            epoch=self._epoch,
        )
        self._counts.failed += 1
        self._record_value(eid, item.params, None)
        self._failed_event(slot, item, reason, trip=out.get("trip"))
        self._out(slot, f"tripped after {eid} {reason}; check it and reset it to use it again")

    def _save_images(
        self, out: Mapping[str, Any]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Write the run's JPEGs under ``images_dir`` by content hash (before the journal
        names them): role -> ``sha256``, ``path``, ``bytes``. A role the outcome cites
        (``images``: role -> ``sha256``, an outcome journaled by the station) without its
        bytes is cited if its file is there, else returned as missing (role -> sha256)."""
        if self._images_dir is None:
            return {}, {}
        saved: dict[str, dict[str, Any]] = {}
        for role, key in (("outcome", "image"), ("reference", "reference_image")):
            data = out.get(key)
            if not data:
                continue
            digest = hashlib.sha256(data).hexdigest()
            path = self._images_dir / f"{digest}.jpg"
            if not path.exists():
                self._images_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            saved[role] = {"sha256": digest, "path": str(path), "bytes": len(data)}
        missing: dict[str, str] = {}
        for role, cited in dict(out.get("images") or {}).items():
            if role in saved or not isinstance(cited, Mapping) or not cited.get("sha256"):
                continue
            path = self._images_dir / f"{cited['sha256']}.jpg"
            if path.is_file() and path.stat().st_size == int(cited.get("bytes") or -1):
                saved[role] = {
                    "sha256": cited["sha256"],
                    "path": str(path),
                    "bytes": int(cited["bytes"]),
                }
            else:
                missing[role] = str(cited["sha256"])
        return saved, missing

    def _count_disagreement(self, slot: Slot, verified: bool | None, reason: str | None) -> None:
        """Pause a station after ``max_disagreements`` unverified results in a row."""
        if verified is not False:
            slot.disagreements = 0
            return
        slot.disagreements += 1
        limit = self._max_disagreements.get(slot.name, 3)
        self._emit("unverified", station=slot.name, reason=reason, in_a_row=slot.disagreements)
        if slot.disagreements >= limit:
            self._out(
                slot,
                f"paused: {slot.disagreements} results in a row failed their checks "
                f"(last: {reason}); check the bench and its instruments, then resume the campaign",
                state="paused",
            )
