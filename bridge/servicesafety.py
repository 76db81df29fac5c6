"""The lab service's safety calls: e-stop every station, reset stations, station statuses.

:class:`StationSafety` is the safety half of :class:`~bridge.service.LabService` (which
inherits it; the rules, e.g. that an e-stop never waits for anything else the service
does, are in :mod:`bridge.service`'s docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bridge.labconfig import LabConfig
from bridge.servicetypes import CampaignHandle, ServiceError
from instruments.deadline import bounded
from loops.stationerrors import cause_text

log = logging.getLogger(__name__)


class StationSafety:
    """E-stop, reset and station statuses of :class:`~bridge.service.LabService`.

    The attributes below are set by :class:`~bridge.service.LabService`'s constructor
    and :meth:`~bridge.service.LabService.open`.
    """

    lab: LabConfig
    state: str
    actors: dict[str, Any]
    estops: list[dict[str, Any]]
    _stack: contextlib.AsyncExitStack | None
    _campaigns: dict[str, CampaignHandle]
    _safety_lock: asyncio.Lock
    _estops_running: int
    _estops_idle: asyncio.Event
    _estop_seq: int
    _station_timeout_s: float
    _reset_wait_s: float
    _emit: Callable[[dict[str, Any]], None]
    _require_open: Callable[[], None]

    async def _station_call(
        self, name: str, method: str, *args: Any, timeout: float | None = None
    ) -> Any:
        ref = getattr(self.actors[name], method).remote(*args)
        return await bounded(asyncio.wrap_future(ref.future()), timeout or self._station_timeout_s)

    async def estop(self, reason: str, who: str = "operator") -> dict[str, Any]:
        """Trip every station at once (latched safe state), then abort every running campaign.

        Never raises because a station failed: the report names, per station, the
        instruments that reached their safe state and those that failed, or the error.
        Idempotent (``already_tripped``).
        """
        if self._stack is None:
            raise ServiceError("the lab service is not open")
        reason = (reason or "").strip() or "no reason given"
        who = (who or "").strip() or "unknown"
        t0 = time.monotonic()
        self._estop_seq += 1
        self._estops_running += 1
        self._estops_idle.clear()
        try:
            report = await self._estop(reason, who, t0)
        finally:
            self._estops_running -= 1
            if not self._estops_running:
                self._estops_idle.set()
        self.estops.append(report)
        self._emit({"event": "estop", **report})
        return report

    async def _estop(self, reason: str, who: str, t0: float) -> dict[str, Any]:
        text = f"e-stop by {who}: {reason}"
        log.critical("E-STOP by %s: %s", who, reason)
        names = list(self.actors)
        active = [h for h in self._campaigns.values() if h.active]
        # the trips go out first; the campaigns learn of the abort in the same turn of the
        # loop, before any station can report a failed experiment (their stop reason is the
        # e-stop, not "no station available")
        results = await asyncio.gather(
            *(self._station_call(n, "trip", text, who) for n in names),
            *(h.runner.abort(text, who=who) for h in active),
            return_exceptions=True,
        )
        results = results[: len(names)]
        elapsed = time.monotonic() - t0
        stations: dict[str, Any] = {}
        for name, res in zip(names, results, strict=True):
            if isinstance(res, BaseException):
                stations[name] = {"ok": False, "error": cause_text(res)}
            else:
                failed = sorted(res.get("failed") or [])
                stations[name] = {
                    "ok": not failed,
                    "already_tripped": bool(res.get("already_tripped")),
                    "safe": sorted(res.get("safe") or []),
                    "failed": failed,
                    "errors": {
                        k: o.get("error")
                        for k, o in (res.get("outcomes") or {}).items()
                        if k in failed
                    },
                }
        return {
            "reason": reason,
            "who": who,
            "t": time.time(),
            "elapsed_s": elapsed,
            "ok": all(s["ok"] for s in stations.values()),
            "already_tripped": bool(stations)
            and all(s.get("already_tripped") for s in stations.values()),
            "stations": stations,
            "campaigns_aborted": [h.campaign_id for h in active],
        }

    async def reset(
        self,
        who: str,
        why: str,
        stations: Sequence[str] | None = None,
        *,
        drain: bool = False,
    ) -> dict[str, Any]:
        """Unlatch the stations (default all) whose monitors have cleared; ``who`` and ``why``
        are required and recorded. Nothing is switched back on.

        A station still running an experiment is not reset under it: an experiment that
        was running when the station tripped stops at its next command while the
        station is latched, but would carry on after a reset. The reset waits for it, and
        for the campaigns told to stop to end (they hold their stations' leases until
        then), up to ``reset_wait_s``, and otherwise refuses that station. ``drain``: also
        empty the vial through the guard (:meth:`~loops.stations.StationActor.recover`:
        trip, reset, drain), for a station whose experiment stopped half-way and left
        liquid in the vial (the guard counts it: new proposals would overfill it).

        Per station: ``ok``, ``was_tripped``, ``tripped``, ``drained_ml`` (with
        ``drain``) or the ``error`` (the monitor that still holds, the experiment still
        running).
        """
        self._require_open()
        if not isinstance(who, str) or not who.strip():
            raise ServiceError("a reset must say who resets (who)")
        if not isinstance(why, str) or not why.strip():
            raise ServiceError("a reset must say why (why)")
        names = list(dict.fromkeys(stations)) if stations else list(self.actors)
        unknown = [n for n in names if n not in self.actors]
        if unknown:
            raise ServiceError(
                f"no station {', '.join(unknown)} in this lab (stations: {', '.join(self.actors)})"
            )
        await self._wait_idle(names, self._reset_wait_s)
        async with self._safety_lock:
            # an e-stop in progress finishes first (its campaign aborts trip stations again);
            # one that arrives during the reset wins: its stations are tripped again below
            await self._estops_idle.wait()
            seq = self._estop_seq
            before = await self._station_statuses(names)
            out = dict(
                zip(
                    names,
                    await asyncio.gather(
                        *(self._reset_one(n, before[n], who, why, drain) for n in names)
                    ),
                    strict=True,
                )
            )
            if self._estop_seq != seq:
                await self._estops_idle.wait()
                last = self.estops[-1] if self.estops else {}
                text = f"e-stop by {last.get('who', '?')}: {last.get('reason', '?')}"
                await asyncio.gather(
                    *(self._station_call(n, "trip", text, str(last.get("who"))) for n in names),
                    return_exceptions=True,
                )
                for st in out.values():
                    st.update(
                        ok=False,
                        tripped=True,
                        error="an e-stop arrived during the reset: tripped again",
                    )
        report = {
            "who": who,
            "why": why,
            "drain": drain,
            "t": time.time(),
            "ok": all(s["ok"] for s in out.values()),
            "stations": out,
        }
        log.warning("reset by %s (%s): %s", who, why, {n: s["ok"] for n, s in out.items()})
        self._emit({"event": "reset", **report})
        return report

    async def _reset_one(
        self, name: str, status: Mapping[str, Any], who: str, why: str, drain: bool
    ) -> dict[str, Any]:
        was = bool(status.get("tripped"))
        if "error" in status:
            return {"ok": False, "was_tripped": was, "tripped": True, "error": status["error"]}
        if status.get("busy"):
            return {
                "ok": False,
                "was_tripped": was,
                "tripped": was,
                "error": (
                    f"station {name} is still running {status.get('experiment')} (while latched "
                    "it stops at its next command): not reset under it; try again when it has "
                    "stopped"
                ),
            }
        try:
            if drain:
                # the drain runs at the waste pump's rate: minutes on a real bench
                recovered = await self._station_call(name, "recover", who, why, timeout=600.0)
                st = recovered["status"]
                return {
                    "ok": True,
                    "was_tripped": was,
                    "tripped": bool(st.get("tripped")),
                    "drained_ml": recovered.get("drained_ml"),
                }
            st = await self._station_call(name, "reset", who, why)
        except Exception as exc:
            return {"ok": False, "was_tripped": was, "tripped": True, "error": cause_text(exc)}
        return {"ok": True, "was_tripped": was, "tripped": bool(st.get("tripped"))}

    async def _wait_idle(self, names: Sequence[str], timeout: float) -> None:
        """Wait (up to ``timeout``) until no station runs an experiment and every campaign
        told to stop has ended: until then it holds its stations' leases, and a drain
        (a call without the owner's epoch) is refused."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ending = [h for h in self._campaigns.values() if h.active and h.runner.stopping]
            statuses = await self._station_statuses(names)
            if not ending and not any(st.get("busy") for st in statuses.values()):
                return
            await asyncio.sleep(0.1)

    async def _station_statuses(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        results = await asyncio.gather(
            *(self._station_call(n, "status") for n in names), return_exceptions=True
        )
        out: dict[str, dict[str, Any]] = {}
        for name, res in zip(names, results, strict=True):
            out[name] = {"error": cause_text(res)} if isinstance(res, BaseException) else dict(res)
        return out


__all__ = ["StationSafety"]
