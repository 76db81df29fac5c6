"""What one proposal costs on a station, from its compiled plan (no I/O): :func:`plan_cost`.

The same code the safety layer's dry run uses: the recipe bound to the point
(:func:`~loops.recipe.build_recipe`), each command's send time
(:func:`~loops.recipe.recipe_times`: holds, ramps at their pace, a flow keeping its pump
busy for volume / rate) and each command's effect (:func:`safety.effects.effect_of`: what
a flow consumes, ``<pump>.delivered`` and ``<vessel>.added`` for one that feeds a vessel,
``<pump>.withdrawn`` and ``<vessel>.removed`` for one that drains it, in mL).

``minutes`` runs from the first command to the last one or the end of the last flow,
whichever is later (a wait with a timeout counts as instantaneous, as in the dry run);
``consumed`` sums each channel over the plan. :func:`station_cost` gives the
:class:`~loops.optcost.CostModel`'s exact cost function for a program's ``cost:`` on a
station (its instruments and envelope, nothing opened), as ``labbridge check`` loads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loops.optcost import DURATION, CostSpec, ExactCost
from loops.plan import Recipe, RecipeError
from loops.recipe import build_recipe, recipe_times
from safety import load_envelope, station_layout
from safety.effects import CommandRefused, Layout, effect_of, initial_commanded

__all__ = ["CostError", "PlanCost", "cost_channels", "plan_cost", "station_cost"]


class CostError(ValueError):
    """A program's ``cost:`` that the station cannot cost (one line naming the choices)."""


@dataclass(frozen=True)
class PlanCost:
    """A plan's bench minutes and what it consumes (channel -> mL)."""

    minutes: float
    consumed: Mapping[str, float] = field(default_factory=dict)

    def of(self, what: str) -> float:
        """``duration`` or a consumed channel (0 when the plan does not consume it)."""
        return self.minutes if what == DURATION else float(self.consumed.get(what, 0.0))


def plan_cost(
    recipe: Recipe, *, layout: Layout, envelope: Any, view: Mapping[str, Any]
) -> PlanCost:
    """The cost of ``recipe`` on a station (``layout``, ``envelope``) from state ``view``.
    Raises :class:`~safety.effects.CommandRefused` where the dry run would refuse a command
    for what it is (not declared, malformed, a flow no vessel accounts for)."""
    timeline = recipe_times(
        recipe, layout=layout, envelope=envelope, view=view, who="cost", now=0.0
    )
    state = dict(view)
    end = 0.0
    consumed: dict[str, float] = {}
    for command, t in timeline:
        effect = effect_of(command, layout, state)
        state.update(effect.updates)
        end = max(end, t + (effect.busy_s or 0.0))
        for channel, amount in effect.consumes.items():
            consumed[channel] = consumed.get(channel, 0.0) + float(amount)
    return PlanCost(end / 60.0, consumed)


def cost_channels(layout: Layout) -> list[str]:
    """What a station's plans can be costed by: ``duration``, each consumed channel of its
    pumps and vessels, and each counter its commands add to."""
    out = [DURATION]
    for name in sorted(layout.kinds):
        found = layout.vessel_of(name)
        if found is None:
            continue
        vessel, direction = found
        out += (
            [f"{name}.delivered", f"{vessel.name}.added"]
            if direction == "out"
            else [f"{name}.withdrawn", f"{vessel.name}.removed"]
        )
    out += layout.counter_channels()
    return list(dict.fromkeys(out))


def station_cost(
    program: Any,
    instruments: Iterable[Mapping[str, Any]],
    envelope_text: str,
    *,
    source: str = "<envelope>",
    assume: Mapping[str, Any] | None = None,
) -> ExactCost:
    """The exact cost of a point of ``program`` (its ``cost:``) on the station with
    ``instruments`` and the envelope ``envelope_text``: None where the program's constraints
    exclude it, its recipe cannot be built or the dry run refuses a command for what it is.
    Raises :class:`CostError` when ``cost:`` names a channel the station has not."""
    spec: CostSpec = program.cost
    envelope = load_envelope(envelope_text, source=source)
    layout = station_layout(list(instruments), envelope)
    choices = cost_channels(layout)
    if spec.of not in choices:
        raise CostError(
            f"{program.source}: cost: {spec.of!r} is not a cost of this station; "
            f"choose one of: {', '.join(choices)}"
        )
    view: dict[str, Any] = {**initial_commanded(layout), **dict(assume or {})}

    def exact(params: Mapping[str, Any]) -> float | None:
        if not program.feasible(params)[0]:
            return None
        try:
            recipe = build_recipe(program, params)
            return plan_cost(recipe, layout=layout, envelope=envelope, view=view).of(spec.of)
        except (RecipeError, CommandRefused):
            return None

    return exact
