"""Several objectives: :class:`ParetoOptimizer` proposes along the Pareto front.

With two objectives over the Bayesian strategy (``acquisition="auto"``, the default, or
``"ehvi"``) the inner strategy's acquisition is replaced by the expected hypervolume
improvement of :mod:`loops.optehvi` (one GP per objective, pending points fantasised),
searched over the inner strategy's allowed points and weighted by its
:meth:`~loops.optbase.StrategyBase.acquisition_weight`; measured against ParEGO and the
peers in benchmarks/optpareto.py (docs/optimizer.md). Otherwise (3+ objectives, random
search, grid, or ``acquisition="parego"``) it is
ParEGO (Knowles 2006) over any single-objective strategy of :mod:`loops.optimizer`:
at every ``ask()`` a fresh weight vector is drawn (uniform on the simplex, from the
optimizer's own seeded RNG, saved in its state), every trusted result's objectives
are normalised to [0, 1] over what was measured so far and scalarised with the
augmented Chebyshev function (:func:`loops.pareto.chebyshev`), and the inner strategy
(a :class:`~loops.optbayes.BayesOptimizer`, minimising) proposes for that scalar.
Different weights aim at different parts of the front; the augmented Chebyshev
scalarisation reaches every Pareto-optimal point, the concave parts included::

    inner = BayesOptimizer(space, direction="minimize", seed=1)
    opt = ParetoOptimizer(inner, ["minimize", "minimize"], seed=1)
    p = opt.ask()
    opt.tell(p.id, [2.4, 1.1])                  # one value per objective
    opt.tell(q.id, None, status="infeasible")   # statuses as for one objective
    opt.front()                                 # [(params, (2.4, 1.1)), ...]

Everything the inner strategy does stays: pending points (its lie and exclusion
zones: K asks give K distinct points), infeasible/failed points penalised, untrusted
ones not used, known constraints, categorical parameters. The inner strategy's state
*is* its model; it is rebuilt from its own JSON state with the new scalar values at
each ask (:meth:`from_state`), so nothing hidden is kept. :meth:`state` is JSON: the
inner state, every observation's objective vector, the RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Self

import numpy as np
from numpy.typing import NDArray

from loops.optbase import STATE_VERSION, StrategyBase, rng_state, set_rng_state
from loops.optbayes import FANTASIES, BayesOptimizer
from loops.optehvi import ehvi_scorer
from loops.optgp import ModelData, Score
from loops.optspace import (
    Constraint,
    Observation,
    Params,
    ParamSpace,
    ParamValue,
    Proposal,
    SpaceSpec,
    Status,
)
from loops.pareto import chebyshev, min_frame, nondominated, normalise

__all__ = ["ACQUISITIONS", "ParetoOptimizer"]

#: ``"ehvi"``: expected hypervolume improvement (:mod:`loops.optehvi`; the Bayesian inner
#: strategy, 2 objectives), ``"parego"``: the inner strategy's own acquisition on the
#: ParEGO scalarisation, ``"auto"``: EHVI where it applies, else ParEGO
ACQUISITIONS = ("auto", "ehvi", "parego")

Vector = tuple[float, ...]


class _Restorable(Protocol):
    @classmethod
    def from_state(
        cls, space: Any, state: Mapping[str, Any], *, constraints: Constraint | None = None
    ) -> Any: ...


class ParetoOptimizer:
    """EHVI or ParEGO over an inner single-objective strategy (module docstring).

    ``inner``: a minimising strategy with ``state()`` and ``from_state`` (the
    Bayesian one, random search, grid); ``directions``: one per objective;
    ``rho``: the augmented Chebyshev term. ``tell`` takes a sequence of values,
    one per objective, in the order of ``directions``. ``acquisition``: one of
    :data:`ACQUISITIONS`; :attr:`method` is the one in use. The scalarisation is drawn at
    every ask either way (under EHVI it only centres the inner search's local candidates).
    """

    strategy = "pareto"

    def __init__(
        self,
        inner: StrategyBase,
        directions: Sequence[str],
        *,
        seed: int = 0,
        rho: float = 0.05,
        acquisition: str = "auto",
    ) -> None:
        if inner.direction != "minimize":
            raise ValueError("the inner strategy of a ParetoOptimizer must minimise")
        if len(directions) < 2:
            raise ValueError(f"a ParetoOptimizer needs 2 or more objectives, got {directions!r}")
        for d in directions:
            if d not in ("minimize", "maximize"):
                raise ValueError(f"direction must be 'minimize' or 'maximize', got {d!r}")
        if acquisition not in ACQUISITIONS:
            raise ValueError(
                f"acquisition must be one of {', '.join(ACQUISITIONS)}, got {acquisition!r}"
            )
        ehvi_ok = isinstance(inner, BayesOptimizer) and len(directions) == 2
        if acquisition == "ehvi" and not ehvi_ok:
            raise ValueError(
                "acquisition 'ehvi' needs the Bayesian inner strategy and 2 objectives; "
                "use 'parego' (or 'auto')"
            )
        #: what was asked for ("auto": EHVI where it applies, else ParEGO)
        self.acquisition = acquisition
        #: the acquisition in use: "ehvi" or "parego"
        self.method = "ehvi" if ehvi_ok and acquisition != "parego" else "parego"
        self.inner = inner
        self.directions = tuple(directions)
        self.seed = int(seed)
        self.rho = float(rho)
        self._rng = np.random.RandomState(self.seed)
        self._vectors: dict[str, Vector | None] = {}  # observation id -> objective values
        #: the weights of the last ask (None before the first model-based one)
        self.last_weights: NDArray[np.float64] | None = None

    # -- the Optimizer protocol ----------------------------------------------

    @property
    def space(self) -> ParamSpace:
        return self.inner.space

    @property
    def constraints(self) -> Constraint | None:
        return self.inner.constraints

    def ask(self) -> Proposal:
        """Next point for freshly drawn weights; raises Exhausted like the inner strategy."""
        self._rescalarise()
        if self.method == "ehvi" and isinstance(self.inner, BayesOptimizer):
            self.inner.score_override = self._ehvi
        return self.inner.ask()

    def tell(
        self,
        proposal: str | Mapping[str, ParamValue],
        value: Sequence[float] | None,
        *,
        status: Status = "ok",
        rules: Sequence[str] = (),
    ) -> Observation:
        """Record a result: ``value`` is one number per objective (or None without a result).
        ``ok`` needs every value finite. Raises like the inner ``tell`` (nothing recorded)."""
        vec: Vector | None = None
        if value is not None:
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise ValueError(
                    f"value must be {len(self.directions)} numbers (one per objective), "
                    f"got {value!r}"
                )
            if len(value) != len(self.directions):
                raise ValueError(
                    f"value has {len(value)} numbers, the campaign {len(self.directions)} "
                    "objectives"
                )
            nums = []
            for v in value:
                if isinstance(v, bool) or not isinstance(v, int | float | np.number):
                    raise ValueError(f"objective values must be numbers, got {v!r}")
                nums.append(float(v))
            vec = tuple(nums) if all(math.isfinite(v) for v in nums) else None
        if status == "ok" and vec is None:
            raise ValueError(
                f"status 'ok' needs {len(self.directions)} finite values, got {value!r}"
            )
        scalar = None if vec is None else self._scalars([vec])[0]
        obs = self.inner.tell(proposal, scalar, status=status, rules=rules)
        self._vectors[obs.id] = vec
        return obs

    def add_pending(self, params: Mapping[str, ParamValue]) -> Proposal:
        return self.inner.add_pending(params)

    def cancel(self, proposal_id: str) -> None:
        self.inner.cancel(proposal_id)

    def pending(self) -> list[Proposal]:
        return self.inner.pending()

    def observations(self) -> list[Observation]:
        """The inner observations (``value``: the last scalarisation); :meth:`outcomes` has
        the objective values."""
        return self.inner.observations()

    def outcomes(self) -> list[tuple[Observation, Vector | None]]:
        """Every observation with its objective values (None without a result)."""
        return [(o, self._vectors.get(o.id)) for o in self.inner.observations()]

    def front(self) -> list[tuple[Params, Vector]]:
        """The trusted results no other trusted result dominates, in the order they came."""
        ok = [(o.params, v) for o, v in self.outcomes() if o.status == "ok" and v is not None]
        if not ok:
            return []
        mask = nondominated(min_frame([v for _, v in ok], self.directions))
        return [(dict(p), v) for (p, v), keep in zip(ok, mask, strict=True) if keep]

    def best(self) -> tuple[Params, float] | None:
        """The front's best result on the first objective (the protocol's one number)."""
        front = self.front()
        if not front:
            return None
        sign = -1.0 if self.directions[0] == "minimize" else 1.0
        params, vec = max(front, key=lambda pv: sign * pv[1][0])
        return params, vec[0]

    def counts(self) -> dict[str, int]:
        return self.inner.counts()

    def acquisition_weight(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """The inner strategy's learned feasibility (its acquisition is weighted by it)."""
        return self.inner.acquisition_weight(X)

    def feasibility(self, params: Mapping[str, ParamValue]) -> dict[str, Any]:
        """The inner strategy's prediction at ``params`` (:meth:`StrategyBase.feasibility`)."""
        return self.inner.feasibility(params)

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "strategy": self.strategy,
            "directions": list(self.directions),
            "seed": self.seed,
            "rho": self.rho,
            "acquisition": self.acquisition,
            "inner": self.inner.state(),
            "vectors": {k: list(v) if v is not None else None for k, v in self._vectors.items()},
            "rng": rng_state(self._rng),
        }

    @classmethod
    def from_state(
        cls,
        space: SpaceSpec | ParamSpace,
        state: Mapping[str, Any],
        *,
        inner: type[_Restorable] | Any,
        constraints: Constraint | None = None,
    ) -> Self:
        """Restore from :meth:`state`; ``inner``: the inner strategy's class (the program's)."""
        if not isinstance(state, Mapping) or state.get("strategy") != cls.strategy:
            got = state.get("strategy") if isinstance(state, Mapping) else state
            raise ValueError(f"state: not a {cls.strategy!r} state ({got!r})")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: unsupported version {state.get('version')!r}")
        restored = inner.from_state(space, state["inner"], constraints=constraints)
        opt = cls(
            restored,
            state["directions"],
            seed=state["seed"],
            rho=state["rho"],
            acquisition=state.get("acquisition", "auto"),
        )
        opt._vectors = {
            str(k): tuple(float(x) for x in v) if v is not None else None
            for k, v in state["vectors"].items()
        }
        set_rng_state(opt._rng, state["rng"])
        return opt

    # -- acquisition ---------------------------------------------------------

    def _ehvi(self, data: ModelData) -> tuple[Score, NDArray[np.float64]]:
        """The inner strategy's acquisition replaced by EHVI (:mod:`loops.optehvi`): one GP
        per objective on the trusted results (mean per point), ``data``'s pending and
        untrusted points fantasised."""
        inner = self.inner
        assert isinstance(inner, BayesOptimizer)
        space = inner.space
        per: dict[tuple[float, ...], list[Vector]] = {}
        for o, v in self.outcomes():
            if o.status == "ok" and v is not None:
                per.setdefault(space.key(o.params), []).append(v)
        X = np.array([space.to_unit(dict(zip(space.names, k, strict=True))) for k in per])
        Y = min_frame([tuple(np.mean(vs, axis=0)) for vs in per.values()], self.directions)
        return ehvi_scorer(
            X.reshape(-1, len(space)),
            Y,
            data.X_lie,
            kernel=inner._kernel,
            tuning=inner.tuning,
            rng=inner._rng,
            fantasies=FANTASIES,
        )

    # -- scalarisation -------------------------------------------------------

    def _trusted(self) -> NDArray[np.float64]:
        vs = [v for o, v in self.outcomes() if o.status == "ok" and v is not None]
        return min_frame(vs, self.directions)

    def _scalars(self, vectors: Sequence[Vector]) -> list[float]:
        """``vectors``' augmented Chebyshev values for the last weights (equal weights before
        the first draw), normalised over the trusted results and these."""
        w = self.last_weights
        if w is None:
            w = np.full(len(self.directions), 1.0 / len(self.directions))
        known = self._trusted()
        y = np.vstack([known, min_frame(list(vectors), self.directions)])
        s = chebyshev(normalise(y), w, rho=self.rho)
        return [float(x) for x in s[len(known) :]]

    def _rescalarise(self) -> None:
        """Draw new weights and give every result its scalar for them (the inner strategy is
        rebuilt from its state with the new values)."""
        self.last_weights = self._rng.dirichlet(np.ones(len(self.directions)))
        state = self.inner.state()
        ids = [o["id"] for o in state["observations"]]
        vecs = [self._vectors.get(i) for i in ids]
        have = [i for i, v in enumerate(vecs) if v is not None]
        if not have:
            return
        y = normalise(min_frame([vecs[i] or () for i in have], self.directions))
        s = chebyshev(y, self.last_weights, rho=self.rho)
        for i, v in zip(have, s, strict=True):
            state["observations"][i]["value"] = float(v)
        restore: Any = type(self.inner)
        learned = self.inner._feasibility  # same points and statuses: the model still holds
        cost = self.inner.cost_model  # not part of the state: the runner's
        self.inner = restore.from_state(self.space, state, constraints=self.constraints)
        self.inner._feasibility = learned
        self.inner.cost_model = cost
