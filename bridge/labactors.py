"""The lab's actors on a cluster started with ``ray start``: detached, named, found again.

When labbridge joins a cluster (``--ray-address``, lab.yaml ``ray.address``,
``$RAY_ADDRESS``), the journal actor and the station actors are created
``lifetime="detached"`` with stable names in the lab's namespace (``labbridge-<bridge_id>``),
so that they outlive the process that created them: a ``labbridge serve`` killed with
``kill -9`` leaves its stations running their experiments under their leases, and the
service started again finds them by name (:func:`lab_actors`) before it creates any. A
local Ray (started by labbridge itself) dies with its process, and nothing is detached
there.

Found again, and kept, is a station actor whose lease is live (a dead owner's: the new one
takes it over, :mod:`loops.campaignlease`) and whose journal actor is alive too (the
station journals through it). Any other actor found is closed (instruments safe-stated)
and ended, and a fresh one created, as before there were detached actors: one whose lease
ran out (it tripped and closed itself), one built from another lab.yaml (each name carries
a digest of what the actor was built from: instruments, envelope, clock...), one that does
not answer. Whoever holds the lab's actors holds a lock file per station beside the journal
(:func:`station_locks`): the kernel frees it only when its holder dies, so a second
labbridge process on this machine cannot take over the stations of a live one. The lab's
journal and its drivers run on one machine (docs/cluster.md), and each lab on a cluster has
a ``bridge_id`` of its own (it is its MQTT topic root too): a journal actor of another path
found in the lab's namespace is taken for a left-over and ended. The orderly end of the
lab (:func:`bridge.campaigns.open_lab`) ends every actor explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bridge.labconfig import LabConfig
from instruments.deadline import bounded
from loops.campaignlock import CampaignBusy, campaign_lock
from loops.raylinks import end_actor, find_actor, named_actors, start_journal_actor
from loops.stations import ClockSpec

log = logging.getLogger(__name__)

__all__ = [
    "LabActors",
    "StationHeld",
    "journal_actor_name",
    "joins_cluster",
    "lab_actors",
    "lab_namespace",
    "station_actor_name",
    "station_locks",
]

#: how long a station actor found again may take to answer its status (real seconds)
STATUS_S = 10.0


def joins_cluster(lab: LabConfig, ray_address: str | None) -> bool:
    """Whether labbridge joins a cluster here (its actors are then detached), as
    :func:`bridge.campaigns.join_ray` decides: ``--ray-address``, else lab.yaml
    ``ray.address``, else ``$RAY_ADDRESS``."""
    return bool(ray_address or lab.ray_address or os.environ.get("RAY_ADDRESS"))


def lab_namespace(lab: LabConfig) -> str:
    """The Ray namespace of the lab's actors: ``labbridge-<bridge_id>``."""
    return f"labbridge-{lab.bridge_id}"


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def journal_actor_name(lab: LabConfig) -> str:
    """``journal-<digest of the journal's path>``."""
    return f"journal-{_digest(str(Path(lab.store).resolve()))}"


def station_actor_name(lab: LabConfig, name: str, clock: ClockSpec | None) -> str:
    """``station-<name>-<digest>``: the digest of what the actor is built from (instruments,
    envelope, supervisor, environment, verification, clock), so that an actor of another
    lab.yaml is never taken for this one's."""
    st = lab.stations[name]
    built = {
        "instruments": list(st.instruments),
        "envelope": st.envelope_text,
        "supervisor": st.supervisor,
        "env": st.env,
        "verification": st.verification.actor_options() if st.verification else None,
        "clock": None if clock is None else [clock.speed, *clock.sim_at_real],
    }
    return f"station-{name}-{_digest(built)}"


@contextlib.contextmanager
def station_locks(lab: LabConfig, names: Iterable[str]) -> Iterator[None]:
    """Hold ``<journal>.station~<name>.lock`` for each station while this process holds its
    actor; raises :class:`StationHeld` naming the process that holds one."""
    with contextlib.ExitStack() as held:
        for name in names:
            try:
                held.enter_context(campaign_lock(lab.store, f"station~{name}"))
            except CampaignBusy as exc:
                pid = re.search(r"pid (\S+)", str(exc))
                raise StationHeld(
                    f"station {name} is held by another labbridge process on this machine "
                    f"(pid {pid.group(1) if pid else '?'}): one process holds a lab's stations "
                    "at a time; stop that one first"
                ) from None
        yield


class StationHeld(RuntimeError):
    """Another labbridge process on this machine holds the station's actor."""


class LabActors:
    """The journal actor and the station actors :func:`lab_actors` found or created;
    ``kept``: the stations whose actor was found with a live lease (not opened or set up
    again: its experiment may still run)."""

    def __init__(self, journal: Any, actors: dict[str, Any], kept: set[str]) -> None:
        self.journal = journal
        self.actors = actors
        self.kept = kept


async def _leased(handle: Any) -> bool:
    """Whether the station actor answers and holds a live lease."""
    try:
        status = await bounded(asyncio.wrap_future(handle.status.remote().future()), STATUS_S)
    except Exception as exc:
        log.info("a station actor found again does not answer: %s", exc)
        return False
    lease = status.get("lease") or {}
    return bool(lease.get("held")) and float(lease.get("remaining_s") or 0.0) > 0.0


async def _end(handle: Any, name: str, namespace: str, why: str) -> None:
    """Close the actor's station (instruments safe-stated), bounded, then end the actor."""
    log.warning("ending actor %s (%s)", name, why)
    with contextlib.suppress(Exception):
        await bounded(asyncio.wrap_future(handle.stop.remote().future()), STATUS_S)
    await asyncio.to_thread(end_actor, handle, name, namespace)


async def lab_actors(
    lab: LabConfig, names: list[str], clock: ClockSpec | None, start_station: Any
) -> LabActors:
    """Find the lab's detached actors or create them (module docstring). ``start_station(name,
    journal, actor_name, namespace)`` creates one station's detached actor."""
    ns = lab_namespace(lab)
    existing = set(named_actors(ns))
    jname = journal_actor_name(lab)
    journal = find_actor(jname, ns) if jname in existing else None
    for other in sorted(n for n in existing if n.startswith("journal-") and n != jname):
        handle = find_actor(other, ns)
        if handle is not None:
            await _end(handle, other, ns, "the journal of another lab.yaml")
    found = journal is not None
    if journal is None:
        journal = start_journal_actor(lab.store, actor_name=jname, namespace=ns, detached=True)
    actors: dict[str, Any] = {}
    kept: set[str] = set()
    for name in names:
        want = station_actor_name(lab, name, clock)
        stale = re.compile(rf"station-{re.escape(name)}-[0-9a-f]{{8}}")
        for other in sorted(n for n in existing if stale.fullmatch(n)):
            handle = find_actor(other, ns)
            if handle is None:
                continue
            if other == want and found and await _leased(handle):
                log.warning("station %s: its actor %s still holds a live lease: kept", name, want)
                actors[name] = handle
                kept.add(name)
                continue
            why = (
                "built from another lab.yaml"
                if other != want
                else "its journal actor is gone"
                if not found
                else "no live lease"
            )
            await _end(handle, other, ns, why)
        if name not in actors:
            actors[name] = start_station(name, journal, want, ns)
    return LabActors(journal, actors, kept)
