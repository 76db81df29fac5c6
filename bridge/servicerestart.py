"""A restarted ``labbridge serve`` picks up its campaigns: :class:`ServiceRestart` (part of
:class:`~bridge.service.LabService`).

On a cluster started with ``ray start`` the station actors outlive a killed service
(:mod:`bridge.labactors`); the service started again within their lease finds them, and
:meth:`ServiceRestart._pick_up` resumes each campaign whose owner epoch they are leased
with, on those stations: the resume takes their leases over live and waits for the
experiments they still run (:mod:`loops.campaignresume`). docs/cluster.md, "When the
service restarts".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bridge.servicetypes import CampaignHandle, StartResult
from loops.campaign import CampaignBusy, campaign_lock
from loops.program import Program, load_program
from loops.stationerrors import cause_text
from safety.yamldoc import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ServiceRestart"]

#: campaign states after which it takes no more work (as bridge.service's ENDED)
_ENDED = ("done", "stopped", "aborted", "error")


class ServiceRestart:
    """Resuming campaigns in the service (module docstring)."""

    lab: Any
    operator: str
    actors: dict[str, Any]
    journal: Any
    _campaigns: dict[str, CampaignHandle]
    _start_lock: asyncio.Lock
    _station_timeout_s: float
    _parser: ThreadPoolExecutor | None
    _emit: Callable[[dict[str, Any]], None]
    _require_open: Callable[[], None]
    _handle: Callable[[str, Program, tuple[str, ...], str], CampaignHandle]
    _run: Callable[[CampaignHandle], Any]
    _stored_campaign: Callable[[str], Any]

    async def _pick_up(self, kept: set[str]) -> None:
        """After a restart: resume each campaign whose owner epoch leases stations found
        alive (:mod:`bridge.labactors`) on those stations, holding its lock file; the
        resume takes their leases over and waits for the experiments they still run
        (:mod:`loops.campaignresume`). A campaign that cannot be resumed is logged: its
        stations' leases run out and they trip, as when nobody comes back."""
        epochs: dict[int, list[str]] = {}
        for name in sorted(kept):
            try:
                st = await asyncio.wait_for(
                    self.actors[name].status.remote(), self._station_timeout_s
                )
            except Exception as exc:
                log.error("station %s found again does not answer: %s", name, cause_text(exc))
                continue
            epoch = (st.get("lease") or {}).get("epoch")
            if isinstance(epoch, int):
                epochs.setdefault(epoch, []).append(name)
        for campaign in await self.journal.campaigns.remote():
            if campaign.state in _ENDED:
                continue
            owner = await self.journal.owner.remote(campaign.id)
            stations = epochs.get(int(owner["epoch"]))
            if stations:
                await self.resume_campaign(campaign.id, stations, who="labbridge serve restart")

    async def resume_campaign(
        self, campaign_id: str, stations: Sequence[str], *, who: str = "api"
    ) -> StartResult:
        """Resume campaign ``campaign_id`` from the journal on ``stations`` (as ``labbridge
        resume`` does, with the service's operator; its program is the one stored), taking
        over the stations its dead owner still leases. Never raises for a refusal: the
        result lists the errors."""
        self._require_open()
        async with self._start_lock:
            if campaign_id in self._campaigns and self._campaigns[campaign_id].active:
                return StartResult(campaign_id, False, errors=(f"{campaign_id} is running",))
            stored = await self._stored_campaign(campaign_id)
            if stored is None:
                return StartResult(campaign_id, False, errors=(f"no campaign {campaign_id}",))
            try:
                prog = await asyncio.get_running_loop().run_in_executor(
                    None,
                    functools.partial(
                        load_program, stored.program, source=f"campaign {campaign_id} (journal)"
                    ),
                )
                handle = self._handle(campaign_id, prog, tuple(stations), who)
                handle.lock.enter_context(campaign_lock(self.lab.store, campaign_id))
            except (CampaignBusy, ConfigError, TypeError, ValueError) as exc:
                log.error("campaign %s not resumed: %s", campaign_id, exc)
                return StartResult(campaign_id, False, errors=(str(exc),))
            handle.runner.holds_campaign_lock = True  # the older owner is dead
            try:
                await handle.runner.prepare(resume=True, operator=self.operator)
            except Exception as exc:
                handle.lock.close()
                why = f"campaign {campaign_id} could not be resumed: {cause_text(exc)}"
                log.error("%s", why)
                return StartResult(campaign_id, False, errors=(why,))
            self._campaigns[campaign_id] = handle
            handle.state = "running"
            handle.task = asyncio.create_task(self._run(handle), name=f"campaign-{campaign_id}")
            await asyncio.sleep(0)
        log.warning("campaign %s resumed by %s on %s", campaign_id, who, ", ".join(stations))
        self._emit(
            {
                "event": "campaign",
                "campaign_id": campaign_id,
                "state": "resumed",
                "stations": list(stations),
                "who": who,
            }
        )
        return StartResult(campaign_id, True, state="running", stations=tuple(stations))
