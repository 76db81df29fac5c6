"""The lab service's questions: a dry run that queues nothing, live readings, the journal.

:class:`ServiceQueries` is the read half of :class:`~bridge.service.LabService` (which
inherits it). Nothing here is journaled and nothing reaches a wire: a dry run is the
program's constraints and the stations' dry runs (the safety layer's own check, from each
station's current state, no I/O), exactly the checks a proposal passes before it is
queued; readings are what the station supervisors last polled; the journal is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bridge.labconfig import LabConfig
from bridge.servicetypes import CampaignHandle, ServiceError, UnknownExperiment
from instruments.deadline import bounded
from loops.campaignbook import violation_text
from loops.journal import FINAL_STATES, Campaign, Experiment
from loops.recipe import RecipeError, build_recipe
from loops.stationerrors import cause_text

__all__ = ["ServiceQueries"]

#: how long one journal read may take (s)
JOURNAL_TIMEOUT_S = 10.0


class ServiceQueries:
    """Dry runs, readings and journal reads of :class:`~bridge.service.LabService`.

    The attributes below are set by :class:`~bridge.service.LabService`.
    """

    lab: LabConfig
    actors: dict[str, Any]
    journal: Any
    _campaigns: dict[str, CampaignHandle]
    _require_open: Callable[[], None]
    campaign: Callable[[str], CampaignHandle]
    #: :meth:`~bridge.servicesafety.StationSafety._station_call` (LabService inherits both)
    _station_call: Callable[..., Awaitable[Any]]

    async def dry_run(
        self, campaign_id: str, params: Mapping[str, Any], who: str
    ) -> dict[str, Any]:
        """What would happen to a proposal of ``params`` to the campaign now, with nothing
        journaled or queued: ``ok``, every reason it would be refused (``reasons``, each
        prefixed by its station) and each station's verdict (``stations``).

        The checks a proposal passes (:meth:`~loops.campaign.CampaignRunner.propose`): the
        program's parameter bounds and constraints, its recipe for ``params``, and the safety
        layer's dry run of that recipe on every station the campaign runs on, from that
        station's current state. ``who`` is a label for the dry run (the proposer).
        Raises :class:`~bridge.servicetypes.UnknownCampaign`.
        """
        self._require_open()
        handle = self.campaign(campaign_id)
        if not isinstance(params, Mapping):
            raise ServiceError(
                f"params must be a mapping of parameter -> value, got {type(params).__name__}"
            )
        out: dict[str, Any] = {
            "campaign_id": campaign_id,
            "params": dict(params),
            "ok": False,
            "stage": "constraints",
            "reasons": [],
            "stations": {},
        }
        program = handle.program
        feasible, reasons = program.feasible(params)
        if not feasible:
            out["reasons"] = reasons
            return out
        try:
            recipe = build_recipe(program, params).as_dict()
        except (RecipeError, TypeError, ValueError) as exc:
            out.update(stage="recipe", reasons=[f"recipe: {exc}"])
            return out
        out["stage"] = "safety"
        names = list(handle.stations)
        verdicts = await asyncio.gather(
            *(self._station_call(n, "dry_run", recipe, who) for n in names),
            return_exceptions=True,
        )
        for name, res in zip(names, verdicts, strict=True):
            if isinstance(res, BaseException):
                texts = [f"station {name} could not dry-run it: {cause_text(res)}"]
            else:
                texts = [violation_text(v) for v in res]
            out["stations"][name] = {"ok": not texts, "reasons": texts}
            out["reasons"] += [f"{name}: {t}" for t in texts]
        out["ok"] = not out["reasons"]
        return out

    async def readings(self, station: str) -> dict[str, Any]:
        """A station's live picture, no I/O: the measured values (with their age in s) and
        commanded targets, whether it is tripped and why, what it runs, its monitors."""
        self._require_open()
        if station not in self.actors:
            raise ServiceError(
                f"no station {station!r} in this service (stations: {', '.join(self.actors)})"
            )
        status, values = await asyncio.gather(
            self._station_call(station, "status"), self._station_call(station, "readings")
        )
        return {
            "station": station,
            "tripped": bool(status.get("tripped")),
            "trip": status.get("trip"),
            "busy": bool(status.get("busy")),
            "experiment": status.get("experiment"),
            "measured": values["measured"],
            "commanded": values["commanded"],
            "monitors": status.get("monitors") or {},
        }

    # ------------------------------------------------------------------ journal
    async def _journal_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._require_open()
        ref = getattr(self.journal, method).remote(*args, **kwargs)
        try:
            return await bounded(asyncio.wrap_future(ref.future()), JOURNAL_TIMEOUT_S)
        except Exception as exc:
            inner = getattr(exc, "cause", None) or exc
            if isinstance(inner, LookupError):
                raise UnknownExperiment(str(inner)) from None
            raise

    async def stored_campaigns(self) -> list[Campaign]:
        """Every campaign of the lab's journal (also those of earlier runs), oldest first."""
        rows: list[Campaign] = await self._journal_call("campaigns")
        return rows

    async def experiments(self, campaign_id: str) -> list[Experiment]:
        """The campaign's experiments from the journal, in order (none for an unknown id)."""
        rows: list[Experiment] = await self._journal_call("experiments", campaign_id)
        return rows

    async def experiment(self, experiment_id: str) -> Experiment:
        """One experiment's journal row; raises :class:`UnknownExperiment`."""
        row: Experiment = await self._journal_call("experiment", experiment_id)
        return row

    async def experiment_record(self, experiment: Experiment) -> dict[str, Any]:
        """An experiment's whole journal: its row, its log (steps, states), the safety
        verdicts of its commands and its images (by SHA-256), as plain data."""
        eid = experiment.id
        log, verdicts, images = await asyncio.gather(
            self._journal_call("transitions", eid),
            self._journal_call("verdicts", experiment.campaign_id, eid),
            self._journal_call("images", eid),
        )
        return {
            "experiment_id": eid,
            "campaign_id": experiment.campaign_id,
            "seq": experiment.seq,
            "proposer": experiment.proposer,
            "state": experiment.state,
            "station": experiment.station,
            "params": experiment.params,
            "recipe": experiment.recipe,
            "result": experiment.result,
            "objective": experiment.objective,
            "verified": experiment.verified,
            "reason": experiment.reason,
            "log": [
                {
                    "t": t.t,
                    "event": t.event,
                    "state": t.state,
                    "step": t.step,
                    "data": {k: v for k, v in (t.data or {}).items() if k != "recipe"},
                }
                for t in log
            ],
            "verdicts": [{k: v for k, v in d.items() if k != "id"} for d in verdicts],
            "images": {
                role: {"sha256": i["sha256"], "bytes": i["bytes"]} for role, i in images.items()
            },
        }

    async def wait_experiment(self, experiment: Experiment, timeout_s: float) -> Experiment:
        """The experiment once it has reached a final state (done, failed, rejected,
        cancelled), or as it stands after ``timeout_s`` or when its campaign is not running
        in this service (nothing more will happen to it here)."""
        if experiment.state in FINAL_STATES:
            return experiment
        handle = self._campaigns.get(experiment.campaign_id)
        if handle is not None and handle.active:
            try:
                await bounded(handle.runner.wait_for(experiment.id), timeout_s)
            except TimeoutError:
                pass
        return await self.experiment(experiment.id)
