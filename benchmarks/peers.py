"""Other libraries' optimizers behind labbridge's ask/tell contract, for benchmarks/optimizers.py.

Each peer is used the way its own documentation shows, wrapped so that a
benchmark campaign (:func:`benchmarks.campaign.simulate_campaign`) can drive it
like :class:`loops.optimizer.BayesOptimizer`:

* ``bayes-opt``: bayesian-optimization's ``BayesianOptimization(f=None, pbounds,
  random_state)`` with ``suggest()`` / ``register()`` as its README's ask/tell
  section shows (all defaults; a known constraint as its ``NonlinearConstraint``,
  0 feasible / 1 not). It has no pending points (K = 1 only), and a target is a
  number: a failed experiment is registered with the worst value seen so far.
* ``optuna-tpe`` / ``optuna-gp``: ``optuna.create_study`` with ``TPESampler(seed=)``
  or ``GPSampler(seed=)`` (defaults), ``study.ask()`` / ``study.tell()``; pending
  points are the study's running trials, a failed experiment is a FAIL trial, a
  point a known constraint refuses is told the worst value seen (as a user's
  objective would return it; a FAIL trial there makes the GP sampler propose
  the same point again).
* ``botorch``: BoTorch's loop as its tutorials (and Ax's default generation
  strategy) run it: labbridge's own ``strategy: botorch``
  (:class:`loops.optbotorch.BoTorchStrategy`, the ``botorch`` extra), listed here
  under its library's name so the tables compare it with the default ``bayes``
  strategy as they did when it was only a peer: a scrambled Sobol design of
  ``max(5, 2 d)`` points, then a ``SingleTaskGP`` fitted by ``fit_gpytorch_mll``,
  ``qLogNoisyExpectedImprovement`` with the pending points as ``X_pending``,
  maximised by ``optimize_acqf`` (10 restarts, 512 raw samples).

A point that violates a known constraint is never returned: a library peer is told
it was refused (as the dry run would) and asked again, at most ``_TRIES`` times,
then :class:`~loops.optimizer.Exhausted`. :data:`PEERS` maps the names to
factories; :func:`peer_versions` gives the versions of the installed ones and
:func:`missing_peers` says why the others cannot run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from loops.optbase import StrategyBase
from loops.optspace import (
    Constraint,
    Direction,
    Exhausted,
    Observation,
    Params,
    ParamSpace,
    ParamValue,
    Proposal,
    SpaceSpec,
    Status,
)

__all__ = [
    "PEERS",
    "PEER_MODULES",
    "BayesOptPeer",
    "OptunaPeer",
    "missing_peers",
    "peer_versions",
]

_TRIES = 1000  # proposals in a row refused by a known constraint before giving up


class _Peer(StrategyBase):
    """Ask/tell bookkeeping of :class:`StrategyBase` around a library that proposes points.

    Subclasses implement :meth:`_next` (the library's next point, plus a handle
    to tell it later), :meth:`_told` (pass a result on) and :meth:`_refused`
    (a proposal a known constraint refused, never run).
    """

    strategy = "peer"

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        seed: int,
        *,
        direction: Direction = "minimize",
        constraints: Constraint | None = None,
    ) -> None:
        super().__init__(space, direction=direction, constraints=constraints)
        self.seed = int(seed)
        self._handles: dict[str, Any] = {}
        self._last: Any = None

    def _propose(self) -> Params:
        for _ in range(_TRIES):
            params, handle = self._next()
            params = self.space.validate(params)
            if self._feasible(params):
                self._last = handle
                return params
            self._refused(params, handle)
        raise Exhausted(f"{self.strategy}: {_TRIES} proposals in a row violated the constraints")

    def ask(self) -> Proposal:
        proposal = super().ask()
        self._handles[proposal.id] = self._last
        return proposal

    def tell(
        self,
        proposal: str | Mapping[str, ParamValue],
        value: float | None,
        *,
        status: Status = "ok",
    ) -> Observation:
        obs = super().tell(proposal, value, status=status)
        self._told(obs, self._handles.pop(obs.id, None))
        return obs

    def cancel(self, proposal_id: str) -> None:
        super().cancel(proposal_id)
        self._told(Observation(proposal_id, {}, None, "failed"), self._handles.pop(proposal_id))

    def _next(self) -> tuple[Mapping[str, Any], Any]:
        raise NotImplementedError

    def _told(self, obs: Observation, handle: Any) -> None:
        raise NotImplementedError

    def _refused(self, params: Params, handle: Any) -> None:
        raise NotImplementedError


class BayesOptPeer(_Peer):
    """bayesian-optimization's own ``suggest()`` / ``register()`` (its README), K = 1 only."""

    strategy = "bayes-opt"

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        seed: int,
        *,
        direction: Direction = "minimize",
        constraints: Constraint | None = None,
    ) -> None:
        super().__init__(space, seed, direction=direction, constraints=constraints)
        from bayes_opt import BayesianOptimization
        from scipy.optimize import NonlinearConstraint

        pbounds: dict[str, Any] = {
            d.name: (int(d.low), int(d.high), int) if d.is_int else (d.low, d.high)
            for d in self.space.dims
        }
        self._constraint_fn = None
        nlc = None
        if constraints is not None:
            known = constraints

            def violated(**kw: Any) -> float:
                return 0.0 if known(kw) else 1.0

            self._constraint_fn = violated
            nlc = NonlinearConstraint(violated, -np.inf, 0.5)
        with warnings.catch_warnings():  # "Non-float parameters are experimental"
            warnings.simplefilter("ignore")
            self._bo = BayesianOptimization(
                f=None,
                pbounds=pbounds,
                constraint=nlc,
                random_state=self.seed,
                verbose=0,
                allow_duplicate_points=True,
            )
        self._worst: float | None = None

    def _next(self) -> tuple[Mapping[str, Any], Any]:
        if self._pending:
            raise Exhausted("bayes-opt: suggest() has no pending points (run it with K = 1)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = self._bo.suggest()
        return {k: float(v) for k, v in p.items()}, None

    def _register(self, params: Params, target: float) -> None:
        kw: dict[str, Any] = {}
        if self._constraint_fn is not None:
            kw["constraint_value"] = self._constraint_fn(**params)
        self._bo.register(params=dict(params), target=target, **kw)

    def _penalty(self) -> float:
        return self._worst if self._worst is not None else -1.0

    def _refused(self, params: Params, handle: Any) -> None:
        self._register(params, self._penalty())

    def _told(self, obs: Observation, handle: Any) -> None:
        if not obs.params:  # cancelled: nothing to say
            return
        if obs.status == "ok" and obs.value is not None:
            target = self._sign * obs.value  # bayes-opt maximises
            self._worst = target if self._worst is None else min(self._worst, target)
            self._register(obs.params, target)
        elif obs.status in ("failed", "infeasible"):
            self._register(obs.params, self._penalty())


class OptunaPeer(_Peer):
    """An Optuna study with ``TPESampler`` (``kind="tpe"``) or ``GPSampler`` (``"gp"``)."""

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        seed: int,
        *,
        kind: str = "tpe",
        direction: Direction = "minimize",
        constraints: Constraint | None = None,
    ) -> None:
        super().__init__(space, seed, direction=direction, constraints=constraints)
        import optuna

        optuna.logging.set_verbosity(logging.WARNING)
        self._optuna = optuna
        if kind == "tpe":
            sampler: Any = optuna.samplers.TPESampler(seed=self.seed)
        elif kind == "gp":
            sampler = optuna.samplers.GPSampler(seed=self.seed)
        else:
            raise ValueError(f"kind must be 'tpe' or 'gp', got {kind!r}")
        self.strategy = f"optuna-{kind}"
        self._study = optuna.create_study(direction=direction, sampler=sampler)
        dists = optuna.distributions
        self._dists: dict[str, Any] = {
            d.name: dists.IntDistribution(int(d.low), int(d.high))
            if d.is_int
            else dists.FloatDistribution(d.low, d.high)
            for d in self.space.dims
        }

    def _next(self) -> tuple[Mapping[str, Any], Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = self._study.ask(self._dists)
        return dict(trial.params), trial

    def _refused(self, params: Params, handle: Any) -> None:
        """Told the worst value seen (a FAIL trial teaches the GP sampler nothing: it would
        propose the same refused point again)."""
        values = [t.value for t in self._study.get_trials(deepcopy=False) if t.value is not None]
        if not values:
            self._study.tell(handle, state=self._optuna.trial.TrialState.FAIL)
            return
        self._study.tell(handle, max(values) if self.direction == "minimize" else min(values))

    def _told(self, obs: Observation, handle: Any) -> None:
        state = self._optuna.trial.TrialState
        ok = obs.status == "ok" and obs.value is not None
        if handle is None:  # a point we did not ask for: add it as a finished trial
            if obs.params:
                self._study.add_trial(
                    self._optuna.trial.create_trial(
                        params=dict(obs.params),
                        distributions=self._dists,
                        value=obs.value if ok else None,
                        state=state.COMPLETE if ok else state.FAIL,
                    )
                )
            return
        if ok:
            self._study.tell(handle, obs.value)
        else:
            self._study.tell(handle, state=state.FAIL)


def _botorch(space: SpaceSpec, seed: int, constraints: Constraint | None) -> StrategyBase:
    """labbridge's ``botorch`` strategy (imported here: torch loads only when it runs)."""
    from loops.optbotorch import BoTorchStrategy

    return BoTorchStrategy(space, seed=seed, constraints=constraints)


PeerFactory = Callable[[SpaceSpec, int, Constraint | None], StrategyBase]

#: peer name -> factory(space, seed, constraints) (minimising)
PEERS: dict[str, PeerFactory] = {
    "bayes-opt": lambda s, seed, c: BayesOptPeer(s, seed, constraints=c),
    "optuna-tpe": lambda s, seed, c: OptunaPeer(s, seed, kind="tpe", constraints=c),
    "optuna-gp": lambda s, seed, c: OptunaPeer(s, seed, kind="gp", constraints=c),
    "botorch": _botorch,
}

#: the modules each peer imports (a missing one: the peer is skipped with the reason)
PEER_MODULES: dict[str, tuple[str, ...]] = {
    "bayes-opt": ("bayes_opt",),
    "optuna-tpe": ("optuna",),
    "optuna-gp": ("optuna", "torch"),
    "botorch": ("botorch", "gpytorch", "torch"),
}


def missing_peers(names: list[str] | tuple[str, ...] = tuple(PEERS)) -> dict[str, str]:
    """Peers that cannot run here: name -> why (the import that failed, and the fix)."""
    out: dict[str, str] = {}
    for name in names:
        for module in PEER_MODULES[name]:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                out[name] = f"{module} not importable ({exc}): pip install -e '.[peers]'"
                break
    return out


def peer_versions() -> dict[str, str]:
    """Installed versions of every library that shapes a run (absent ones are left out)."""
    out: dict[str, str] = {}
    for dist in (
        "numpy",
        "scipy",
        "scikit-learn",
        "bayesian-optimization",
        "threadpoolctl",
        "optuna",
        "torch",
        "botorch",
        "gpytorch",
        "linear_operator",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
