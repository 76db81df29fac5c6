"""A station whose node died rejoins its running campaign once the node is back (``--rejoin``).

:func:`return_stations` runs beside a campaign (:func:`bridge.campaigns.run_rejoining`:
``labbridge run --rejoin``, and each campaign of ``labbridge serve --rejoin``). Every
``every_s`` it asks each station that is out of the campaign whether its actor still
lives. For one whose actor died (its Ray node went down: a crashed or rebooted bench PC,
a killed raylet) it creates a new actor for the station; Ray places it only where
``station:<name>`` is offered, so it waits, unplaced, until the bench PC's node is back.
Then the bench is recovered as after any interrupted experiment (:meth:`StationActor.recover
<loops.stationrecover.StationRecovery.recover>`: every instrument to its safe state,
latched, reset in the name of the ``--operator``, every vessel drained through the
guard) and handed back to the campaign (:meth:`CampaignRunner.rejoin
<loops.campaignlease.CampaignLease.rejoin>`), which journals it and gives it work again.

A station out for any other reason (it tripped, refused, a spent budget) is left to the
operator: only a dead actor is replaced. The experiment that was running on the dead
node stays failed (journaled with the step in progress): it is never re-run. While the
node is down its bench is on its own: the hotplate's device watchdog switches heater and
stirrer off (docs/cluster.md lists what else fails safe by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import ray

from instruments.deadline import bounded
from loops.campaign import CampaignRunner
from loops.raylinks import RayStation
from loops.stationerrors import cause_text
from loops.stations import StationActor, StationLink, StationLost

log = logging.getLogger(__name__)

__all__ = ["REJOIN_EVERY_S", "return_stations"]

#: how often the stations out of the campaign are looked at (real s)
REJOIN_EVERY_S = 2.0
#: how long a liveness question to a station may take (real s): no answer is not death
ASK_S = 10.0


async def _died(link: StationLink) -> bool:
    """Whether the station's actor is gone (its calls fail with StationLost)."""
    try:
        await bounded(link.call(StationActor.status), ASK_S)
    except StationLost:
        return True
    except Exception:  # slow or refusing: alive, or not known dead yet
        return False
    return False


async def _bring_back(
    runner: CampaignRunner,
    new_actor: Callable[[str], Any],
    actors: MutableMapping[str, Any],
    name: str,
    why_out: str,
    operator: str,
    every_s: float,
) -> None:
    """A new actor for ``name``, placed once its node is back, recovered and rejoined."""
    actor = new_actor(name)
    started = joined = False
    try:
        await actor.start.remote()  # waits, unplaced, until a node offers station:<name>
        started = True
        # placed and open: the lab's close stops it (and kills it) with the others, and a
        # service's status, e-stop and reset reach it; an unplaced actor would only hang them
        actors[name] = actor
        where = await actor.placement.remote()
        log.warning("station %s: a new actor on node %s", name, where["node_ip"])
        why = f"its node died ({why_out}); back on node {where['node_ip']}"
        while True:
            try:
                await actor.recover.remote(operator, why)
                break
            except Exception as exc:  # a monitor still holds (names it): try again later
                cause = getattr(exc, "cause", None) or exc
                log.error("station %s: recovery refused: %s", name, cause_text(cause))
                await asyncio.sleep(5 * every_s)
        await runner.rejoin(
            name, RayStation(name, actor), f"recovered by {operator} (trip, reset, drain): {why}"
        )
        joined = True
    finally:
        if not joined:  # cancelled (the campaign ended) or failed: nothing left unplaced or open
            if started:  # instruments safe-stated and closed (an unplaced actor never answers)
                with contextlib.suppress(Exception):
                    await bounded(asyncio.wrap_future(actor.stop.remote().future()), ASK_S)
            ray.kill(actor, no_restart=True)


async def return_stations(
    runner: CampaignRunner,
    new_actor: Callable[[str], Any],
    actors: MutableMapping[str, Any],
    operator: str,
    *,
    every_s: float = REJOIN_EVERY_S,
) -> None:
    """Until cancelled (the campaign ended): bring back every station whose actor died
    (module docstring). ``new_actor(name)``: a new, unopened actor for station ``name``
    (:func:`bridge.campaigns.start_lab_station`); ``actors``: the lab's station actors
    (:func:`bridge.campaigns.open_lab`; a service's, :class:`bridge.service.LabService`):
    a new one replaces its dead one there once Ray placed it and it opened, so the lab's
    close stops it and a service's status, e-stop and reset reach it."""
    coming: dict[str, asyncio.Task[None]] = {}
    try:
        while True:
            await asyncio.sleep(every_s)
            for name, task in list(coming.items()):
                if task.done():
                    del coming[name]
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        log.error("station %s did not rejoin: %s", name, cause_text(exc))
            if runner.stopping:
                continue
            for name, link in runner.out_stations().items():
                if name in coming or not await _died(link):
                    continue
                reason = runner.progress()["stations"][name]["reason"] or "died"
                log.warning("station %s died; it rejoins once its node is back", name)
                coming[name] = asyncio.create_task(
                    _bring_back(runner, new_actor, actors, name, reason, operator, every_s),
                    name=f"rejoin-{name}",
                )
    finally:
        for task in coming.values():
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*coming.values(), return_exceptions=True)
