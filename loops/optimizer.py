"""Ask/tell optimizers for campaigns: pending-aware, and infeasible/failed results are data.

A campaign asks a strategy for a :class:`Proposal`, runs it on a station (after
the safety dry run), and tells the strategy what happened::

    opt = BayesOptimizer({"acid": (0.0, 1.4, float), "hold": (0, 600, int)},
                         direction="minimize", seed=1)
    p = opt.ask()                       # p.params is plain JSON: floats and ints
    opt.tell(p.id, 3.2)                 # status "ok": a trusted measurement
    opt.tell(q.id, None, status="infeasible")   # the dry run refused it
    opt.tell(r.id, None, status="failed")       # the experiment broke
    opt.tell(s.id, 7.5, status="untrusted")     # camera and sensor disagree

Statuses (what the Bayesian strategy does with them):

* ``ok`` -- a trusted result, used as data.
* ``infeasible`` (refused by the dry run or a constraint) and ``failed`` -- the
  point is registered in the model with a *penalty* worse than every result
  seen (``worst - 0.25 * (best - worst)``, recomputed at each ask), so the
  model learns that the region is bad, and no proposal comes within
  ``exclusion_radius`` of it (hard rule, distance in the unit cube; lifted
  to the exact point if the same point later gets a trusted result).
* ``untrusted`` -- the value is kept in :meth:`observations` but never used as
  data; the point is treated like a point whose experiment is still running
  (the "lie" below) and is excluded like an infeasible one, so it is not
  re-proposed blindly.

Pending points. K ``ask()`` without ``tell()`` give K distinct points. At
each ask the GP's hyperparameters are fitted on the real data only; then the
pending (and untrusted) points join the data on a fresh copy with values the
model gives them. By default (``lie="fantasies"``) four joint draws of their
outcomes from the GP's posterior, each conditioning its own copy of the GP, and
the acquisition is the expected improvement averaged over the four (over each
copy's incumbent); ``lie="believer"`` gives them the GP's own prediction
("Kriging believer"), ``lie="mean"|"min"|"max"`` the classic constant liar.
The uncertainty collapses there and the acquisition looks elsewhere; a pending
point also excludes its neighbourhood. With 4 in flight on Hartmann-6 the
fantasies need 1.31x the sequential experiments (38.5 vs 29.5, median over 20
seeds; BoTorch's qLogNEI, the ``botorch`` strategy, 1.26x; Optuna's GP sampler
1.43x over 10: docs/optimizer.md, ``benchmarks/optimizers.py``).
The package's ``bayes_opt.acquisition.ConstantLiar``
is not used: it refuses constraints (``ConstraintNotSupportedError``), its
dummies shape the GP hyperparameters, and it keeps its own list of dummies,
dropped only when a point close to one is registered -- a cancelled or
untrusted point would stay a dummy forever, and the list would be hidden state
to save. Here the pending set is explicit and saved in :meth:`state`.

Known constraints (``constraints=``, a callable ``params -> bool``, e.g. the
program's ``acid + base <= 2.8``) are checked before proposing: the
acquisition is masked outside them, the initial design skips points that
violate them, and a proposal that violates one is never returned (if nothing
feasible and unexcluded can be found, :class:`Exhausted` is raised).

State. :meth:`state` is JSON (observations with statuses, pending points, the
initial design, the RNG state, counters); ``from_state(space, state)`` gives an
optimizer that proposes exactly what the original would have proposed next.
The model is rebuilt from the observation list at every ask (cheap next to a
suggest), so the saved state *is* the model.

An optimizer is plain synchronous, single-owner state (no locks). A model-based
``ask()`` is CPU-bound (6-D, one idle core: ~0.06 s at 50 observations, ~0.2 s
at 1,000): from async code call it with ``asyncio.to_thread``, one call at a time.

Strategies: :class:`BayesOptimizer` (a scikit-learn Matern GP, maximum-likelihood
length scales, log expected improvement or UCB maximised over uniform candidates
and candidates around the best results; bayesian-optimization 3.4's kernel
wrapper snaps int and choice columns), :class:`RandomSearch` and :class:`GridSearch` as
baselines, and ``botorch`` (:class:`loops.optbotorch.BoTorchStrategy`: BoTorch's GP and
qLogNEI, the ``botorch`` extra; not re-exported here, so that this module imports no
torch). :func:`optimizer_from_state` restores any of them. Side by side with
bayes-opt, Optuna and BoTorch: ``benchmarks/optimizers.py``.

Modules: :mod:`loops.optspace` (the space, proposals, observations, statuses),
:mod:`loops.optbase` (the :class:`Optimizer` protocol and the bookkeeping every
strategy shares), :mod:`loops.optregistry` (the strategies by name),
:mod:`loops.optbayes` (:class:`BayesOptimizer`, :func:`time_suggest`; its model in
:mod:`loops.optgp`, its search in :mod:`loops.optsearch`), :mod:`loops.optbaselines` (:class:`RandomSearch`,
:class:`GridSearch`); all re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loops.optbase import Optimizer
from loops.optbaselines import GridSearch, RandomSearch
from loops.optbayes import BayesOptimizer, time_suggest
from loops.optregistry import STRATEGY_NAMES, strategy_class
from loops.optspace import (
    STATUSES,
    Constraint,
    Dimension,
    Direction,
    Exhausted,
    Observation,
    Params,
    ParamSpace,
    ParamValue,
    Proposal,
    SpaceSpec,
    Status,
    UnknownProposal,
    space_params,
)

__all__ = [
    "STATUSES",
    "BayesOptimizer",
    "Constraint",
    "Dimension",
    "Direction",
    "Exhausted",
    "GridSearch",
    "Observation",
    "Optimizer",
    "ParamSpace",
    "ParamValue",
    "Params",
    "Proposal",
    "RandomSearch",
    "SpaceSpec",
    "Status",
    "UnknownProposal",
    "optimizer_from_state",
    "space_params",
    "time_suggest",
]


def optimizer_from_state(
    space: SpaceSpec | ParamSpace,
    state: Mapping[str, Any],
    *,
    constraints: Constraint | None = None,
) -> Any:
    """Restore whichever strategy ``state`` (from ``.state()``) was saved from
    (:mod:`loops.optregistry` names them)."""
    name = state.get("strategy") if isinstance(state, Mapping) else None
    if name not in STRATEGY_NAMES:
        raise ValueError(f"state: unknown strategy {name!r} (known: {sorted(STRATEGY_NAMES)})")
    return strategy_class(name).from_state(space, state, constraints=constraints)
