"""A campaign runner's books: what a running campaign knows, and the events it emits.

:class:`CampaignBook` holds the state of one :class:`~loops.campaign.CampaignRunner`
(stations as :class:`Slot`, the queue of :class:`Item` and whose turn it is, :class:`Counts`, the
optimizer with its pending proposals and what it was told, the best result, the
campaign's clock) and the small operations every part of the runner shares:
emitting an event, telling the optimizer an outcome, saving the state, taking a
station out. :func:`make_optimizer` builds the program's strategy.

The state saved with the journal (``optimizer_state`` of the campaign row) is
:data:`STATE_VERSION`'s wrapper (see :mod:`loops.campaign`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loops.approval import ApprovalPolicy
from loops.journal import Journal, JournalLink
from loops.optbase import StrategyBase
from loops.optcost import CostModel, ExactCost
from loops.optimizer import (
    BayesOptimizer,
    Direction,
    GridSearch,
    ParamSpace,
    RandomSearch,
    Status,
    UnknownProposal,
    optimizer_from_state,
)
from loops.optmulti import ParetoOptimizer
from loops.optregistry import STRATEGY_NAMES, strategy_class
from loops.program import Program
from loops.stationlease import LEASE_S
from loops.stations import StationLink
from loops.urgentlock import UrgentLock

log = logging.getLogger(__name__)

__all__ = [
    "AGENT_RUN",
    "MAX_CONSECUTIVE_REJECTIONS",
    "Awaiting",
    "STATE_VERSION",
    "CampaignBook",
    "Counts",
    "Event",
    "Item",
    "OnEvent",
    "Slot",
    "Strategy",
    "make_optimizer",
    "restore_optimizer",
    "violation_text",
]

STATE_VERSION = 1
Event = dict[str, Any]
OnEvent = Callable[[Event], None]
#: consecutive rejected optimizer proposals after which the campaign stops (a space
#: the safety layer refuses almost everywhere: fix the program or the envelope)
MAX_CONSECUTIVE_REJECTIONS = 25
#: agents' accepted proposals run ahead of the optimizer's next point, but after this many
#: of them in a row the optimizer's next point takes the free station: a flood of accepted
#: proposals cannot keep the campaign's own search off the stations
AGENT_RUN = 3


#: one objective: a :class:`StrategyBase` (bayes, random, grid, or an optional one such as
#: botorch, whose class is imported only when chosen: :mod:`loops.optregistry`)
Strategy = StrategyBase | ParetoOptimizer


def make_optimizer(program: Program) -> Strategy:
    """The program's strategy over its space, with its constraints, direction and seed; with
    several objectives, a :class:`~loops.optmulti.ParetoOptimizer` over that strategy
    (minimising its scalarisation)."""
    space = ParamSpace.of(program.space)
    direction: Direction = "minimize" if program.objective.minimize or program.multi else "maximize"

    def feasible(params: Mapping[str, Any]) -> bool:
        return program.feasible(params)[0]

    inner: StrategyBase
    if program.strategy == "bayes":
        inner = BayesOptimizer(
            space,
            direction=direction,
            seed=program.seed,
            initial_points=program.initial_points,
            constraints=feasible,
        )
    elif program.strategy == "random":
        inner = RandomSearch(space, program.seed, direction=direction, constraints=feasible)
    elif program.strategy == "grid":
        budget = program.budget.experiments or 100
        per_axis = max(2, math.floor(budget ** (1.0 / max(1, len(space.dims)))))
        inner = GridSearch(space, per_axis, direction=direction, constraints=feasible)
    elif program.strategy == "botorch":  # the botorch extra; StrategyUnavailable without it
        inner = strategy_class("botorch")(
            space,
            direction=direction,
            seed=program.seed,
            initial_points=program.initial_points,
            constraints=feasible,
        )
    else:
        raise ValueError(
            f"unknown strategy {program.strategy!r} (known: {', '.join(STRATEGY_NAMES)})"
        )
    inner.learn_feasibility = program.feasibility == "learned"
    if program.multi:
        return ParetoOptimizer(inner, [o.direction for o in program.goals], seed=program.seed)
    return inner


def restore_optimizer(current: Strategy, state: Mapping[str, Any]) -> Strategy:
    """The strategy saved in ``state`` (from ``.state()``), over ``current``'s space and
    constraints (``current``: :func:`make_optimizer`'s, for the same program)."""
    if isinstance(current, ParetoOptimizer):
        pareto = ParetoOptimizer.from_state(
            current.space, state, inner=type(current.inner), constraints=current.constraints
        )
        pareto.inner.cost_model = current.inner.cost_model  # not part of the state
        return pareto
    restored = optimizer_from_state(current.space, state, constraints=current.constraints)
    restored.cost_model = current.cost_model  # not part of the state: the runner's
    return restored


def attach_cost(optimizer: Strategy, model: CostModel | None) -> None:
    """Weigh ``optimizer``'s acquisition by ``model`` (:mod:`loops.optcost`); with several
    objectives, its inner strategy's (whose acquisition it uses)."""
    inner = optimizer.inner if isinstance(optimizer, ParetoOptimizer) else optimizer
    inner.cost_model = model


@dataclass
class Item:
    """A proposal on its way to a station."""

    experiment_id: str
    pid: str | None  # the optimizer's pending id (None: not in the optimizer's space)
    params: dict[str, Any]
    recipe: dict[str, Any] | None
    proposer: str
    checked: bool
    #: a human approved it (loops/campaignapproval.py): the approval policy is not asked again
    approved: bool = False
    #: the rules of the safety layer's dry run that refused it (told to the optimizer)
    rules: tuple[str, ...] = ()


@dataclass
class Awaiting:
    """A proposal waiting for a human: why and until when (wall clock, epoch s)."""

    item: Item
    rules: tuple[str, ...]
    expires: float
    requested: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiment_id": self.item.experiment_id,
            "proposer": self.item.proposer,
            "params": dict(self.item.params),
            "rules": list(self.rules),
            "requested_t": self.requested,
            "expires_t": self.expires,
        }


@dataclass
class Slot:
    """One station as the campaign sees it."""

    name: str
    actor: StationLink
    state: str = "idle"  # idle | busy | out
    experiment: str | None = None
    reason: str | None = None
    runs: int = 0
    disagreements: int = 0  # unverified results in a row
    rejoined: str | None = None  # why it took work again after it was out (the last time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "experiment": self.experiment,
            "reason": self.reason,
            "runs": self.runs,
            "rejoined": self.rejoined,
        }


@dataclass
class Counts:
    """How many proposals came to what (this campaign, resumes included)."""

    proposed: int = 0
    rejected: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    agent: int = 0
    by_station: dict[str, int] = field(default_factory=dict)


def violation_text(v: Mapping[str, Any]) -> str:
    step = v.get("step")
    where = f"step {step}" if step is not None else "recipe"
    command = v.get("command") or {}
    what = command.get("description") if isinstance(command, Mapping) else None
    rule = str(v.get("rule") or "?")
    reason = str(v.get("reason", "?"))
    text = f"{where}: {reason}" if reason.startswith(f"{rule}:") else f"{where}: {rule}: {reason}"
    return f"{text} ({what})" if what else text


class CampaignBook:
    """A campaign runner's books: its stations (slots), the queue, the counts, the optimizer
    and what it was told, the best result, the clock and the events it emits.

    Constructor arguments: :class:`~loops.campaign.CampaignRunner`, which runs the campaign
    over these books; :class:`~loops.campaignresume.CampaignResume` restores them after a
    crash, :class:`~loops.campaignrecord.CampaignRecorder` records outcomes in them.
    """

    def __init__(
        self,
        program: Program,
        journal: JournalLink,
        stations: Mapping[str, StationLink],
        *,
        campaign_id: str,
        clock_now: Callable[[], float] = time.monotonic,
        on_event: OnEvent | None = None,
        max_consecutive_rejections: int = MAX_CONSECUTIVE_REJECTIONS,
        max_disagreements: Mapping[str, int] | None = None,
        images_dir: Path | None = None,
        lease_s: float = LEASE_S,
        agent_approvals: Mapping[str, ApprovalPolicy] | None = None,
        approval_poll_s: float = 1.0,
        cost: ExactCost | None = None,
    ) -> None:
        if not stations:
            raise ValueError("a campaign needs at least one station")
        self.program = program
        self.campaign_id = campaign_id
        self.journal = journal
        self.optimizer = make_optimizer(program)
        #: cost-aware asks (program.md ``cost:``): the plan's cost of a point on a station,
        #: modelled (loops/optcost.py) and weighed into the acquisition
        self.cost: CostModel | None = None
        if program.cost is not None:
            if cost is None:
                raise ValueError(
                    f"{program.source}: cost: {program.cost.of} needs the plan's costs on a "
                    "station: build the runner with cost=loops.plancost.station_cost(...)"
                )
            self.cost = CostModel(
                ParamSpace.of(program.space), cost, program.cost, seed=program.seed
            )
            attach_cost(self.optimizer, self.cost)
        self._slots = {name: Slot(name, actor) for name, actor in stations.items()}
        self._clock_now = clock_now
        self._on_event = on_event
        self._max_rejections = max_consecutive_rejections
        self._max_disagreements = dict(max_disagreements or {})
        self._images_dir = images_dir
        self._lease_s = float(lease_s)  # how long a station acts without hearing from us
        # claims, asks, tells and state saves: one at a time, a finished run's record first
        self._lock = UrgentLock()
        self._queue: deque[Item] = deque()  # agent and resumed proposals, run before new asks
        self._pending: dict[str, str] = {}  # experiment id -> optimizer proposal id
        self._told: set[str] = set()
        self._values: list[float | None] = []  # objective per experiment run, finish order
        #: with several objectives: every objective's value per experiment run (same order)
        self._vectors: list[tuple[float, ...] | None] = []
        self._best: tuple[str, dict[str, Any], float] | None = None
        self._counts = Counts()
        self._consecutive_rejections = 0
        self._in_flight = 0
        #: station -> the experiment it still runs for this campaign's dead owner, taken over
        #: on resume (loops.campaignresume): its outcome is waited for before it claims work
        self._adopted: dict[str, Item] = {}
        self._elapsed_before = 0.0
        self._t0: float | None = None
        self._stop_request: str | None = None
        self._abort_request: str | None = None
        self._exhausted: str | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._phase = "new"  # new | prepared | running | ended
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._notes: list[Awaitable[int]] = []  # journal writes in flight (station events)
        self._strategy = f"optimizer:{self.optimizer.strategy}"
        #: this owner's epoch (:meth:`~loops.journal.Journal.take_ownership`), passed with every
        #: journal write: an older owner still alive cannot write once a newer one took over
        self._epoch: int | None = None
        #: agent name -> its approval policy (lab.yaml; the program's is program.approval)
        self._agent_approvals = dict(agent_approvals or {})
        self._approval_poll_s = float(approval_poll_s)
        #: proposals awaiting a human (loops/campaignapproval.py), oldest first
        self._awaiting: dict[str, Awaiting] = {}
        # the queue's fair share (_next_queued): claims served from it, when each proposer
        # was served last, agents' claims in a row
        self._claims = 0
        self._served: dict[str, int] = {}
        self._agent_run = 0

    # ------------------------------------------------------------------- queue
    def queued_by(self, proposer: str) -> int:
        """How many of ``proposer``'s proposals wait in this campaign: in its queue (accepted
        or resumed, not claimed by a station yet) or for a human's approval."""
        queued = sum(1 for item in self._queue if item.proposer == proposer)
        return queued + sum(1 for a in self._awaiting.values() if a.item.proposer == proposer)

    def _next_queued(self) -> Item | None:
        """The queued proposal to claim next, or None: the optimizer's turn (an empty queue,
        or :data:`AGENT_RUN` agents' proposals in a row). Proposers take turns: the one
        served longest ago first, each one's proposals in the order they came."""
        if not self._queue:
            return None
        if self._agent_run >= AGENT_RUN and self._exhausted is None:
            return None
        served = self._served
        item = min(self._queue, key=lambda it: served.get(it.proposer, -1))  # first of equals
        self._queue.remove(item)
        self._claims += 1
        served[item.proposer] = self._claims
        self._agent_run = self._agent_run + 1 if item.proposer.startswith("agent:") else 0
        return item

    # ------------------------------------------------------------------ events
    def _emit(self, event: str, **data: Any) -> None:
        if self._on_event is None:
            return
        payload: Event = {"event": event, "campaign_id": self.campaign_id, **data}
        try:
            self._on_event(payload)
        except Exception:  # a broken listener must not break the campaign
            log.exception("campaign %s: on_event listener failed", self.campaign_id)

    # ------------------------------------------------------------------- state
    @property
    def elapsed_s(self) -> float:
        """Campaign clock seconds, over every run of this campaign (resumes included)."""
        if self._t0 is None:
            return self._elapsed_before
        return self._elapsed_before + (self._clock_now() - self._t0)

    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "optimizer": self.optimizer.state(),
            "pending": dict(self._pending),
            "told": sorted(self._told),
            "elapsed_s": self.elapsed_s,
        }

    def progress(self) -> dict[str, Any]:
        """A snapshot for progress displays and status topics (plain data)."""
        c = self._counts
        budget = self.program.budget.experiments
        best = None
        if self._best is not None:
            best = {"experiment_id": self._best[0], "params": self._best[1], "value": self._best[2]}
        return {
            "campaign_id": self.campaign_id,
            "phase": self._phase,
            "paused": not self._running.is_set(),
            "experiments": len(self._values),
            "budget": budget,
            "in_flight": self._in_flight,
            "queued": len(self._queue),
            "awaiting_approval": len(self._awaiting),
            "done": c.done,
            "failed": c.failed,
            "rejected": c.rejected,
            "agent": c.agent,
            "best": best,
            "target": self.program.stop.target,
            "elapsed_s": self.elapsed_s,
            "stations": {n: s.as_dict() for n, s in self._slots.items()},
        }

    def _tell(
        self,
        item: Item,
        value: float | None,
        status: Status,
        vector: tuple[float, ...] | None = None,
    ) -> None:
        """Tell the optimizer an outcome (by pending id, else by params); remember it was told.
        With several objectives the optimizer is told ``vector`` (every objective's value);
        a refusal comes with the dry run's rules (``item.rules``) for the feasibility model."""
        opt = self.optimizer
        told: Any = vector if isinstance(opt, ParetoOptimizer) else value
        rules = item.rules if status == "infeasible" else ()
        if item.pid is not None and item.pid in {p.id for p in opt.pending()}:
            opt.tell(item.pid, told, status=status, rules=rules)
        else:
            try:
                opt.tell(item.params, told, status=status, rules=rules)
            except ValueError as exc:  # params outside the space (an agent's): nothing to learn
                log.info("campaign %s: %s not told: %s", self.campaign_id, item.experiment_id, exc)
        self._pending.pop(item.experiment_id, None)
        self._told.add(item.experiment_id)

    def _prediction(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """What the optimizer's feasibility model predicts for ``params`` (the probability of
        being refused and by which rule, of failing, of an unverified result), or None for
        params outside its space (an agent's) and with ``feasibility: declared`` (nothing is
        learned). CPU-bound: call it off the event loop."""
        if self.program.feasibility != "learned":
            return None
        try:
            return self.optimizer.feasibility(params)
        except ValueError:
            return None

    def _cost_prediction(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """With ``cost:``: the cost model's prediction for ``params`` and the plan's exact
        cost (which the model learns from: :meth:`~loops.optcost.CostModel.explain`); None
        without, or for params outside the space. CPU-bound: call it off the event loop."""
        if self.cost is None:
            return None
        try:
            return self.cost.explain(params)
        except ValueError:
            return None

    def _outcome(
        self, measurements: Mapping[str, Any]
    ) -> tuple[float | None, tuple[float, ...] | None]:
        """A result's objective value (the first objective's, None when not a finite
        number) and, with several objectives, every objective's (None when one is missing)."""
        if self.program.multi:
            vector = self.program.objective_values(measurements)
            return (vector[0] if vector is not None else None), vector
        value = measurements.get(self.program.objective.measure)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), None
        return None, None

    def _forget(self, item: Item) -> None:
        """Drop a proposal from the optimizer without information (it never ran)."""
        if item.pid is not None:
            with contextlib.suppress(UnknownProposal):
                self.optimizer.cancel(item.pid)
        self._pending.pop(item.experiment_id, None)
        self._told.add(item.experiment_id)

    def _record_value(
        self,
        experiment_id: str,
        params: Mapping[str, Any],
        value: float | None,
        vector: tuple[float, ...] | None = None,
    ) -> None:
        """Count an experiment that ran (its trusted value, None for none) for the stop rules
        and the best result; ``vector``: every objective's value (several objectives)."""
        self._values.append(value)
        self._vectors.append(vector if value is not None else None)
        if value is None or not math.isfinite(value):
            return
        if self._best is None or self.program.objective.better(value, self._best[2]):
            self._best = (experiment_id, dict(params), value)

    # ---------------------------------------------------------------- waiters
    async def wait_for(self, experiment_id: str) -> dict[str, Any]:
        """The outcome event (``finished``/``failed``/``rejected``/``cancelled``) of an experiment."""
        fut = self._waiters.get(experiment_id)
        if fut is None:
            fut = self._waiters[experiment_id] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(fut)

    def _resolve(self, experiment_id: str, outcome: dict[str, Any]) -> None:
        fut = self._waiters.get(experiment_id)
        if fut is None:
            fut = self._waiters[experiment_id] = asyncio.get_running_loop().create_future()
        if not fut.done():
            fut.set_result(outcome)

    # --------------------------------------------------------------- stations
    def _out(self, slot: Slot, reason: str, *, state: str = "out") -> None:
        slot.state, slot.reason, slot.experiment = "out", reason, None
        log.error("campaign %s: station %s is %s: %s", self.campaign_id, slot.name, state, reason)
        self._emit("station", station=slot.name, state=state, reason=reason)
        # journaled without waiting here (callers hold the lock); awaited before the end
        self._notes.append(
            self.journal.call(
                Journal.station_event, self.campaign_id, slot.name, state, reason, epoch=self._epoch
            )
        )
