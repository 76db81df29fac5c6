"""A campaign whose station actor dies always ends or carries on (issue 12's fault campaign
hung once: ``benchmarks/faults.py --faults 1000``).

The hang: bench-c's actor was killed (``ray.kill``) during step 1 of the first experiment
after a resume; the campaign marked the station out and the experiment failed, then its
end waited forever for the lease keeper, which kept renewing for nobody (the campaign row
stayed ``running``). The cause: the keeper's release of the dead station used
``asyncio.wait_for``, which on Python 3.11 returns the outcome of a call that completes as
the caller is cancelled and swallows the cancellation -- the dead station's release fails
at once, so the keeper's cancellation at the campaign's end could land in exactly that
moment. :func:`test_the_lease_keeper_ends_when_a_dead_stations_release_fails_as_the_campaign_ends`
makes that moment happen every time (in-process); the Ray tests kill the station actor at
the windows the fault campaign hits (after a reset and a resume, during the claim, between
experiments, during a resume's recovery) and check the campaign ends with the reason, and
that a new actor and a resume carry it on.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loops.campaign import CampaignRunner
from loops.journal import AsyncJournal, Journal
from loops.program import load_program
from loops.stations import LocalStation, StationActor, StationLost

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"


class DiesLikeARayActor:
    """A :class:`~loops.stations.StationLink` to an in-process, unopened station (leases
    only) that can die: after :meth:`kill` every call fails at once with
    :class:`StationLost`, as ``RayStation``'s calls to a killed actor do.
    ``on_release``: called as the dead station's release is asked (the caller's moment)."""

    def __init__(self) -> None:
        self.inner = LocalStation(StationActor("bench-a", [], "channels: {}\n"))
        self.name = "bench-a"
        self.dead = False
        self.on_release: Callable[[], None] | None = None

    def kill(self, on_release: Callable[[], None]) -> None:
        self.dead, self.on_release = True, on_release

    def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if not self.dead:
            return self.inner.call(fn, *args, **kwargs)
        if fn is StationActor.release and self.on_release is not None:
            hook, self.on_release = self.on_release, None
            hook()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(StationLost(f"station bench-a died: {fn.__name__} not run"))
        return fut


@pytest.mark.timeout(60)
async def test_the_lease_keeper_ends_when_a_dead_stations_release_fails_as_the_campaign_ends(
    tmp_path: Path,
) -> None:
    base = load_program(EXAMPLE)
    program = dataclasses.replace(base, budget=dataclasses.replace(base.budget, experiments=2))
    link = DiesLikeARayActor()
    async with await AsyncJournal.open(tmp_path / "journal.db") as journal:
        runner = CampaignRunner(program, journal, {"bench-a": link}, campaign_id="keeper")
        await runner.prepare()
        keeper = runner._keeper
        assert keeper is not None and not keeper.done()
        ending: list[asyncio.Task[None]] = []

        def end_now() -> None:  # the campaign's end, in the instant the release fails
            ending.append(asyncio.get_running_loop().create_task(runner._release_leases()))

        link.kill(end_now)
        # the keeper's next renewal finds the station dead (out: lease refused), the one
        # after that releases its lease: the campaign ends in that very instant
        async with asyncio.timeout(10 * 1.0 + 5):
            while not ending:
                await asyncio.sleep(0.05)
        # asyncio.wait, not a timeout around an await: cancelling the end would cancel its
        # wait for the keeper, and the old end swallowed that cancellation too
        done, _ = await asyncio.wait({ending[0]}, timeout=10)
        if not done:
            keeper.cancel()  # the old keeper swallowed one cancellation: end it for the test
            ending[0].cancel()
            raise AssertionError("the campaign's end waited for a lease keeper that never stopped")
        await ending[0]
        assert keeper.done() and runner._keeper is None
        state = runner.progress()["stations"]["bench-a"]
        assert state["state"] == "out" and "died" in state["reason"], state
        runner.stop("test: done")
        async with asyncio.timeout(20):
            summary = await runner.run()
        assert summary.state == "stopped", summary
        row = await journal.call(Journal.campaign, "keeper")
        assert row.state == "stopped"
        await link.inner.actor.stop()  # what a killed actor's process takes with it
