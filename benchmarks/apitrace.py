"""Where an e-stop's time goes in benchmarks/api.py: :class:`Tracer` timestamps each hop of
the e-stop in flight (:data:`benchmarks.apireport.HOPS`), this process's garbage
collections and the run-queue waits (CPU starvation) of this process and the station
actor's."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

from bridge.mqttapi import MqttApi
from bridge.service import LabService


class Tracer:
    """Timestamps of the e-stop in flight along its path (:data:`HOPS`), and every garbage
    collection of this process (the service, the simulators and the requester all run in
    it). It observes: each hook calls the service's own code unchanged. The station actor
    runs in another process: its trip's start and end come from its trip report (wall
    clock, converted to this machine's monotonic clock)."""

    def __init__(self, api: MqttApi, service: LabService) -> None:
        self.current: dict[str, float] | None = None
        self.pids: dict[str, int] = {}
        self.outcomes: dict[str, float] = {}  # the last trip's safe_state() times, ms
        self.gcs: list[tuple[float, float, int]] = []
        self._gc_start = 0.0
        self._wall_to_mono = time.time() - time.monotonic()
        estop, station_call = api._estop, service._station_call

        async def traced_estop(req: Any, data: Any, problems: list[str]) -> None:
            if self.current is not None:
                self.current.setdefault("rx", req.msg.received)
                self.current.setdefault("handler", time.monotonic())
            await estop(req, data, problems)

        async def traced_call(name: str, method: str, *args: Any, **kw: Any) -> Any:
            result = await station_call(name, method, *args, **kw)
            if method == "trip" and self.current is not None and isinstance(result, dict):
                self.current.setdefault("ray_back", time.monotonic())
                trip = float(result["t"]) - self._wall_to_mono
                self.current.setdefault("trip", trip)
                self.outcomes = {
                    k: round(float(o.get("elapsed_s") or 0.0) * 1e3, 3)
                    for k, o in (result.get("outcomes") or {}).items()
                }
                if result.get("reaction_s") is not None:
                    self.current.setdefault("trip_done", trip + float(result["reaction_s"]))
            return result

        api._estop = traced_estop  # type: ignore[method-assign]
        service._station_call = traced_call  # type: ignore[method-assign]
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.monotonic()
        else:
            self.gcs.append((self._gc_start, time.monotonic(), int(info["generation"])))

    def gc_in(self, since: float, until: float) -> tuple[float, int]:
        """Seconds of garbage collection in [since, until] and the oldest generation collected."""
        spans = [(a, b, g) for a, b, g in self.gcs if b >= since and a <= until]
        return sum(min(b, until) - max(a, since) for a, b, _ in spans), max(
            (g for _, _, g in spans), default=-1
        )

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)

    async def watch(self, service: LabService) -> None:
        """Also count the run-queue waits of this process and of the station actor's."""
        (name,) = service.actors
        placement = await service._station_call(name, "placement")
        self.pids = {"bench": os.getpid(), "actor": int(placement["pid"])}

    def runq(self) -> dict[str, float]:
        """Seconds the threads of each watched process have waited, runnable, for a CPU
        (the sum over its threads of /proc/<pid>/task/*/schedstat's second field)."""
        out = {}
        for who, pid in self.pids.items():
            total = 0
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    total += int((task / "schedstat").read_text().split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # a thread that ended meanwhile; no schedstat on this kernel
            out[who] = total / 1e9
        return out
