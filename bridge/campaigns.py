"""Wiring a campaign to a lab: Ray, the journal actor, one station actor per bench, the runner.

:func:`run_campaign` is what ``labbridge run`` and ``labbridge resume`` call::

    lab = load_lab("lab.yaml")
    summary = await run_campaign(load_program("program.md"), lab, campaign_id="color-1")

Ray: ``ray_address`` (else the lab's ``ray.address``, else ``$RAY_ADDRESS``)
joins a cluster whose bench PCs offer ``station:<name>``; otherwise a local,
loopback-only Ray starts with one such resource per station of the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, MutableMapping
from typing import Any

import ray

from bridge.labactors import StationHeld, joins_cluster, lab_actors, station_locks
from bridge.labconfig import LabConfig
from bridge.stationreturn import return_stations
from instruments.deadline import bounded
from loops.campaign import CampaignRunner, CampaignSummary, OnEvent, campaign_lock
from loops.journal import Campaign
from loops.optcost import ExactCost
from loops.plancost import station_cost
from loops.program import Program, load_program
from loops.raylinks import init_ray, ray_links, start_journal_actor, start_station_actor
from loops.setup import SetupRecipe
from loops.stations import ClockSpec, ScaledClock

log = logging.getLogger(__name__)

__all__ = [
    "join_ray",
    "CampaignProgress",
    "StationUnavailable",
    "agent_approvals",
    "set_up",
    "lab_clock",
    "start_lab_station",
    "make_runner",
    "open_lab",
    "run_campaign",
    "run_rejoining",
    "run_with_signals",
]

#: how long a station actor may take to be placed and open its instruments
START_TIMEOUT_S = 60.0


class StationUnavailable(RuntimeError):
    """A station could not be started (not placed by Ray, or its instruments did not open)."""


def join_ray(lab: LabConfig, ray_address: str | None, stations: list[str] | None = None) -> None:
    """Start (or join) the lab's Ray: ``ray_address``, else lab.yaml ``ray.address``, else a
    local one offering ``station:<name>`` for ``stations`` (default: all the lab's); with
    the lab's token file. Before taking SIGINT/SIGTERM over: Ray's driver installs its own
    SIGTERM handler in ``ray.init``."""
    init_ray(
        ray_address or lab.ray_address,
        stations=stations if stations is not None else list(lab.stations),
        local=True,
        token_file=lab.ray_token_file,
        log_to_driver=False,
    )


def lab_clock(lab: LabConfig) -> tuple[ClockSpec | None, Callable[[], float]]:
    """The lab's clock: a simulated lab's shared clock (spec and ``now``), else ``time.monotonic``."""
    if lab.speed is None:
        return None, time.monotonic
    assert lab.sim_at_real is not None  # load_lab fills it in for a simulated lab
    spec = ClockSpec(lab.speed, lab.sim_at_real)
    return spec, ScaledClock(spec).now


async def _start(name: str, actor: Any, timeout_s: float) -> None:
    try:
        await bounded(asyncio.wrap_future(actor.start.remote().future()), timeout_s)
    except TimeoutError:
        raise StationUnavailable(
            f"station {name} did not start within {timeout_s:g} s: no Ray node offers the "
            f"resource 'station:{name}', or another campaign still holds it"
        ) from None
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        raise StationUnavailable(
            f"station {name} did not open: {type(cause).__name__}: {cause}"
        ) from None


@contextlib.asynccontextmanager
async def open_lab(
    lab: LabConfig,
    *,
    ray_address: str | None = None,
    stations: list[str] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
    set_up_first: bool = True,
    kept: set[str] | None = None,
) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """Start Ray (or join it), the journal actor for ``lab.store`` and the station actors.

    Yields ``(journal, {station: actor})`` with every station open and, with
    ``set_up_first``, set up for a campaign (:func:`_ensure_set_up`: a simulated bench
    sets itself up; a real one whose set-up never ran is an error that says to run
    ``labbridge setup``). On exit every station is closed (instruments safe-stated)
    and the actors are ended.

    Joining a cluster, the actors are detached and a station actor that outlived a killed
    labbridge with a live lease is found again and kept (:mod:`bridge.labactors`: neither
    opened nor set up again, its experiment may still run); ``kept`` receives their names.
    """
    names = stations or list(lab.stations)
    unknown = [n for n in names if n not in lab.stations]
    if unknown:
        raise ValueError(
            f"{lab.source}: no station {', '.join(unknown)} (known: {', '.join(lab.stations)})"
        )
    join_ray(lab, ray_address, names)
    lab.store.parent.mkdir(parents=True, exist_ok=True)
    clock, _ = lab_clock(lab)
    actors: dict[str, Any] = {}
    found: set[str] = set() if kept is None else kept
    with contextlib.ExitStack() as locks:
        if joins_cluster(lab, ray_address):  # detached: they may outlive this process
            try:
                locks.enter_context(station_locks(lab, names))
            except StationHeld as exc:
                raise StationUnavailable(str(exc)) from None
            held = await lab_actors(
                lab,
                names,
                clock,
                lambda name, journal, actor_name, namespace: start_lab_station(
                    lab, name, journal, clock, actor_name=actor_name, namespace=namespace
                ),
            )
            journal, actors = held.journal, held.actors
            found.update(held.kept)
        else:
            journal = start_journal_actor(lab.store)
        try:
            for name in names:
                if name not in actors:
                    actors[name] = start_lab_station(lab, name, journal, clock)
            fresh = {n: a for n, a in actors.items() if n not in found}
            await asyncio.gather(*(_start(n, a, start_timeout_s) for n, a in fresh.items()))
            if set_up_first:
                await _ensure_set_up(lab, fresh)
            yield journal, actors
        finally:
            await _close(journal, actors)


def start_lab_station(
    lab: LabConfig,
    name: str,
    journal: Any,
    clock: ClockSpec | None = None,
    *,
    actor_name: str | None = None,
    namespace: str | None = None,
) -> Any:
    """Create station ``name``'s actor as the lab config describes it (instruments, envelope,
    supervisor, environment, verification, what its set-up kept), journaling through
    ``journal`` (the journal actor), on the lab's clock ``clock`` (:func:`lab_clock`).
    Not yet open: ``await handle.start.remote()``. :func:`open_lab` uses it for every
    station; a tool that replaces a station actor that died uses it for one (with an
    ``actor_name`` of its own: Ray may keep a dead actor's name a while after its node died).
    With a ``namespace`` it is detached there (:mod:`bridge.labactors`)."""
    st = lab.stations[name]
    return start_station_actor(
        name,
        list(st.instruments),
        st.envelope_text,
        clock=clock,
        supervisor_options=st.supervisor,
        env=st.env,
        journal=journal,
        actor_name=actor_name,
        namespace=namespace,
        detached=namespace is not None,
        verification=st.verification.actor_options() if st.verification else None,
        setup=st.setup_store.values() if st.setup_store else None,
    )


async def _ensure_set_up(lab: LabConfig, actors: Mapping[str, Any]) -> None:
    """Run what each station's set-up needs before a campaign (:meth:`SetupStore.pending`):
    its ``every: campaign`` recipes, and on a simulated bench the ``once`` ones never run;
    a real bench whose ``once`` recipes have not run is an error saying to run
    ``labbridge setup`` (an operator's job: a calibration needs trusted instruments)."""
    todo: dict[str, list[SetupRecipe]] = {}
    missing: list[str] = []
    for name in actors:
        st = lab.stations[name]
        if st.setup_store is None:
            continue
        pending = st.setup_store.pending(st.setup)
        if not lab.simulated:
            missing += [
                f"station {name}: set-up {r.name!r} has not run"
                for r in pending
                if r.every == "once"
            ]
        todo[name] = pending
    if missing:
        raise StationUnavailable("; ".join(missing) + f": run `labbridge setup --lab {lab.source}`")
    await set_up(lab, actors, {n: r for n, r in todo.items() if r}, who="campaign:setup")


async def set_up(
    lab: LabConfig,
    actors: Mapping[str, Any],
    recipes: Mapping[str, list[SetupRecipe]] | None = None,
    *,
    who: str = "operator:setup",
) -> dict[str, list[str]]:
    """Run set-up recipes on each station (default: all of the station's, in order) and
    save what they keep in its set-up file; returns station -> the recipes run."""
    done: dict[str, list[str]] = {}
    for name, actor in actors.items():
        st = lab.stations[name]
        for recipe in st.setup if recipes is None else recipes.get(name, []):
            log.info("station %s: set-up %s", name, recipe.name)
            try:
                kept = await actor.run_setup.remote(
                    recipe.recipe.as_dict(), list(recipe.keep), who=who
                )
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                raise StationUnavailable(f"station {name}: {cause}") from None
            assert st.setup_store is not None  # load_lab gives every station one
            st.setup_store.record(recipe, kept, who=who)
            done.setdefault(name, []).append(recipe.name)
    return done


async def _close(journal: Any, actors: Mapping[str, Any]) -> None:
    results = await asyncio.gather(
        *(asyncio.wrap_future(a.stop.remote().future()) for a in actors.values()),
        return_exceptions=True,
    )
    for name, res in zip(actors, results, strict=True):
        if isinstance(res, BaseException):
            log.error("station %s did not close cleanly: %s", name, res)
    for a in actors.values():
        ray.kill(a, no_restart=True)
    with contextlib.suppress(Exception):
        await asyncio.wrap_future(journal.close.remote().future())
    ray.kill(journal, no_restart=True)


def agent_approvals(lab: LabConfig, program: Program, campaign_id: str) -> dict[str, Any]:
    """Agent name -> its approval policy (lab.yaml), for a campaign of ``program``. The rule
    of an agent that may propose to the campaign must name only the program's parameters
    and fixed values (a typo is an error now, when the campaign starts, not when a
    proposal comes); another agent's (e.g. an MQTT user of the same name) that names
    something else is kept: it cannot be evaluated and asks a human (fails closed).
    Raises :class:`~safety.yamldoc.ConfigError` naming lab.yaml's line and field."""
    known = [p.name for p in program.parameters] + [
        k for k, v in program.fixed.items() if isinstance(v, str | int | float)
    ]
    out: dict[str, Any] = {}
    for name, agent in lab.agents.agents.items():
        if agent.approval is None:
            continue
        if agent.may("propose", campaign_id):
            agent.approval.check_names(known, f"campaign {campaign_id}")
        out[name] = agent.approval
    return out


def make_runner(
    lab: LabConfig,
    program: Program,
    journal: Any,
    actors: Mapping[str, Any],
    campaign_id: str,
    on_event: OnEvent | None = None,
) -> CampaignRunner:
    """A :class:`CampaignRunner` on ``actors`` (a subset of the lab's stations) with the lab's
    clock, each station's verification limit, the images folder next to the journal and
    the lab's agents' approval policies (:func:`agent_approvals`, which may raise)."""
    journal_link, stations = ray_links(journal, actors)
    return CampaignRunner(
        program,
        journal_link,
        stations,
        campaign_id=campaign_id,
        clock_now=lab_clock(lab)[1],
        on_event=on_event,
        max_disagreements={
            n: st.verification.max_disagreements
            for n, st in lab.stations.items()
            if n in actors and st.verification is not None
        },
        images_dir=lab.store.parent / "images",
        agent_approvals=agent_approvals(lab, program, campaign_id),
        cost=plan_costs(lab, program, actors),
        lease_s=lab.lease_s,
    )


def plan_costs(lab: LabConfig, program: Program, stations: Iterable[str]) -> ExactCost | None:
    """With program.md ``cost:``: the plan's exact cost on the first of ``stations``
    (:func:`loops.plancost.station_cost`; raises :class:`~loops.plancost.CostError`), else
    None."""
    if program.cost is None:
        return None
    st = lab.stations[sorted(stations)[0]]
    return station_cost(program, st.instruments, st.envelope_text, source=st.envelope_source)


async def run_campaign(
    program: Program | None,
    lab: LabConfig,
    *,
    campaign_id: str,
    resume: bool = False,
    operator: str = "operator",
    on_event: OnEvent | None = None,
    ray_address: str | None = None,
    on_runner: Callable[[CampaignRunner], None] | None = None,
    rejoin: bool = False,
) -> CampaignSummary:
    """Run (or resume) one campaign on the lab's stations; returns its summary.

    ``program`` None with ``resume``: the program stored with the campaign.
    ``on_runner`` receives the runner once it exists (for stop/abort/agent
    proposals from elsewhere, e.g. a signal handler). ``rejoin``: a station whose actor
    died (its Ray node went down) is recovered in ``operator``'s name and rejoins the
    campaign once its node is back (:mod:`bridge.stationreturn`). Raises
    :class:`~loops.campaign.CampaignBusy` if another process runs this campaign.
    """
    with campaign_lock(lab.store, campaign_id):
        async with open_lab(lab, ray_address=ray_address) as (journal, actors):
            if resume:
                stored: Campaign = await journal.campaign.remote(campaign_id)
                program = load_program(stored.program, source=f"campaign {campaign_id} (journal)")
            if program is None:
                raise ValueError("a new campaign needs its program")
            runner = make_runner(lab, program, journal, actors, campaign_id, on_event)
            runner.holds_campaign_lock = True  # taken above: the older owner is dead
            if on_runner is not None:
                on_runner(runner)
            await runner.prepare(resume=resume, operator=operator)
            if not rejoin:
                return await runner.run()
            return await run_rejoining(runner, lab, journal, actors, operator)


async def run_rejoining(
    runner: CampaignRunner,
    lab: LabConfig,
    journal: Any,
    actors: MutableMapping[str, Any],
    operator: str,
) -> CampaignSummary:
    """``runner.run()`` (prepared) with :func:`~bridge.stationreturn.return_stations` beside it:
    a station of the campaign whose actor died gets a new actor (:func:`start_lab_station`)
    once its node is back, is recovered in ``operator``'s name and rejoins. ``actors``: the
    lab's station actors (:func:`open_lab`'s, which its close stops): a new actor replaces
    the dead one there. ``labbridge run --rejoin`` and ``labbridge serve --rejoin`` use it."""
    clock = lab_clock(lab)[0]
    returning = asyncio.create_task(
        return_stations(
            runner,
            lambda name: start_lab_station(
                lab, name, journal, clock, actor_name=f"station-{name}-{secrets.token_hex(4)}"
            ),
            actors,
            operator,
        ),
        name=f"campaign-{runner.campaign_id}-rejoin",
    )
    try:
        return await runner.run()
    finally:
        returning.cancel()
        await asyncio.gather(returning, return_exceptions=True)


class CampaignProgress:
    """A live progress bar (tqdm, on stderr) fed by the runner's events.

    The bar counts experiments run against the budget; its postfix shows the best
    value so far, the experiments in flight, rejections, failures and any station
    that dropped out. Failures, rejections and stations going out are also
    printed as lines above the bar.
    """

    def __init__(
        self, program: Program, campaign_id: str, *, stream: Any = None, disable: bool = False
    ) -> None:
        from tqdm import tqdm

        self.program = program
        self._stream = stream or sys.stderr
        self._bar = tqdm(
            total=program.budget.experiments,
            desc=campaign_id,
            unit="exp",
            file=self._stream,
            disable=disable,
            dynamic_ncols=True,
            mininterval=0.2,
        )
        self._best: float | None = None
        self._flags: dict[str, int] = {"rejected": 0, "failed": 0, "unverified": 0}
        self._running = 0
        self._postfix: dict[str, Any] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("finished", "failed"):
            self._bar.update(1)
        if kind == "finished" and event.get("verified") is not False:  # untrusted: no result
            value = event["objective"]
            if self._best is None or self.program.objective.better(value, self._best):
                self._best = value
        elif kind in ("failed", "rejected", "station", "unverified"):
            if kind in self._flags:
                self._flags[kind] += 1
            what = event.get("reason") or "; ".join(event.get("reasons") or [])
            who = event.get("experiment_id") or event.get("station")
            self._bar.write(f"{kind}: {who}: {what}", file=self._stream)
        elif kind == "awaiting_approval":
            eid = event.get("experiment_id")
            self._bar.write(
                f"awaiting approval: {eid} by {event.get('proposer')}: "
                f"{'; '.join(event.get('rules') or [])} -- labbridge approve|deny {eid} "
                "--reason ...",
                file=self._stream,
            )
        elif kind == "approval":
            who = f" by {event['who']}" if event.get("who") else ""
            self._bar.write(
                f"{event.get('decision')}{who}: {event.get('experiment_id')}: "
                f"{event.get('reason')}",
                file=self._stream,
            )
        elif kind == "state" and event.get("state") == "resumed":
            progress = event.get("progress") or {}
            self._bar.n = int(progress.get("experiments", 0))
            best = (progress.get("best") or {}).get("value")
            self._best = best if best is not None else self._best
        progress = event.get("progress") or {}
        if "in_flight" in progress:
            self._running = int(progress["in_flight"])
        postfix: dict[str, Any] = {}
        if self._best is not None:
            postfix[self.program.objective.measure] = f"{self._best:.3g}"
        postfix["running"] = self._running
        postfix.update({k: v for k, v in self._flags.items() if v})
        if postfix != self._postfix:
            self._postfix = postfix
            self._bar.set_postfix(postfix, refresh=True)

    def close(self, summary: CampaignSummary | None = None) -> None:
        """End the bar; with the campaign's ``summary``, at its final count and reason (a
        campaign that stops early, e.g. at its target, does not leave a bar at 27%)."""
        if summary is not None:
            self._bar.total = self._bar.n  # what was run is the whole campaign
            self._bar.set_description_str(f"{self._bar.desc}: {summary.state}")
            self._bar.refresh()
        self._bar.close()


async def run_with_signals(
    program: Program | None,
    lab: LabConfig,
    *,
    campaign_id: str,
    resume: bool,
    operator: str,
    ray_address: str | None,
    progress: bool = True,
    on_runner: Callable[[CampaignRunner], None] | None = None,
    rejoin: bool = False,
) -> CampaignSummary:
    """:func:`run_campaign` (``rejoin`` as there) with a progress bar, and SIGINT/SIGTERM as
    an orderly stop.

    The first signal aborts the campaign: every station is tripped into its safe
    state (latched), running experiments are recorded failed, the journal is
    final. A second signal cancels whatever is still waiting.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    runner_box: list[CampaignRunner] = []
    pending: list[asyncio.Task[Any]] = []
    signals_seen: list[str] = []

    def on_signal(name: str) -> None:
        signals_seen.append(name)
        if len(signals_seen) > 1 or not runner_box:
            if main is not None:
                main.cancel()
            return
        print(
            f"\n{name}: stopping campaign {campaign_id}: every station to its safe state",
            file=sys.stderr,
        )
        pending.append(loop.create_task(runner_box[0].abort(f"{name} received", who=operator)))

    # Ray's driver installs a C-level SIGTERM handler in ray.init (it dies with 15): start
    # or join Ray first, then take SIGINT/SIGTERM over
    join_ray(lab, ray_address)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    shown = program
    bar: CampaignProgress | None = None

    def on_event(event: dict[str, Any]) -> None:
        if bar is not None:
            bar(event)

    def got_runner(runner: CampaignRunner) -> None:
        nonlocal bar
        runner_box.append(runner)
        if progress:
            bar = CampaignProgress(runner.program, campaign_id)
        if on_runner is not None:
            on_runner(runner)

    summary: CampaignSummary | None = None
    try:
        summary = await run_campaign(
            shown,
            lab,
            campaign_id=campaign_id,
            resume=resume,
            operator=operator,
            on_event=on_event,
            ray_address=ray_address,
            on_runner=got_runner,
            rejoin=rejoin,
        )
        return summary
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if bar is not None:
            bar.close(summary)
