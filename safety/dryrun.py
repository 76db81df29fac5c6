"""Dry run: check a whole recipe (a sequence of commands) against the envelope before queuing it.

:func:`dry_run` simulates the commanded state each step would produce, with
the same effects and envelope code as the guard (safety/effects.py
:func:`~safety.effects.assess`), and no I/O. It returns EVERY violation of
EVERY step, each with its step index: a refused step is skipped (the state
stays as it was before it, as the guard would leave it) and the simulation
continues, so one report lists all the problems of a proposal, not only the
first.

Assumptions (the guard checks every step again when it is sent):

* steps happen at ``now`` unless ``times`` gives each step's time (seconds,
  same clock as the guard's): rate limits count from those times;
* a drain (a flow out of a vessel) has finished by the next step (a recipe
  waits for it); the guard credits a drain only as it is observed;
* an instrument sent a flow is ``<name>.flowing`` until its volume / rate has
  passed on the steps' times (or a safer command stopped it);
* the station is not latched, and the measured values (lid, temperatures) stay
  as they are in ``state_view``;
* the envelope's ledger (change times, budget consumption) is copied, never
  changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safety.effects import Layout, assess, initial_commanded
from safety.envelope import Envelope
from safety.limits import Ledger
from safety.model import Command

__all__ = ["DryRunReport", "DryRunViolation", "dry_run"]


@dataclass(frozen=True)
class DryRunViolation:
    """Step ``step`` (0-based) of the recipe, ``command``, refused by ``rule`` for ``reason``."""

    step: int
    command: Command
    rule: str
    reason: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"step {self.step} {self.command}: {self.reason}"


@dataclass
class DryRunReport:
    """The outcome of a dry run: ``ok`` when no step violates the envelope."""

    steps: int
    violations: list[DryRunViolation] = field(default_factory=list)
    final_state: dict[str, Any] = field(default_factory=dict)
    #: when the last step would be sent (the dry run's clock)
    until: float | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def refused_steps(self) -> list[int]:
        return sorted({v.step for v in self.violations})

    def __str__(self) -> str:
        if self.ok:
            return f"dry run: {self.steps} steps, all inside the envelope"
        lines = [f"dry run: {len(self.refused_steps)} of {self.steps} steps refused"]
        lines += [f"  {v}" for v in self.violations]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "steps": self.steps,
            "violations": [
                {
                    "step": v.step,
                    "command": v.command.as_dict(),
                    "rule": v.rule,
                    "reason": v.reason,
                    "values": dict(v.values),
                }
                for v in self.violations
            ],
        }


def dry_run(
    commands: Sequence[Command],
    envelope: Envelope,
    state_view: Mapping[str, Any],
    *,
    layout: Layout,
    now: float,
    times: Sequence[float] | None = None,
    ledger: Ledger | None = None,
) -> DryRunReport:
    """Check ``commands`` in order from ``state_view`` (see the module docstring).

    ``layout``: the station's instruments, their declared commands and the
    envelope's vessels (:class:`~safety.effects.Layout`); ``times``: one time per step (default: all at ``now``); ``ledger``:
    the runtime bookkeeping to start from (copied; default the envelope's).
    """
    if times is not None and len(times) != len(commands):
        raise ValueError(f"times has {len(times)} entries for {len(commands)} commands")
    book = (ledger if ledger is not None else envelope.ledger).copy()
    book.start(now)
    view: dict[str, Any] = initial_commanded(layout)
    view.update(state_view)
    flowing = layout.flowing_channels()
    until: dict[str, float] = {}  # a flow's instrument -> when its volume / rate has passed
    report = DryRunReport(len(commands))
    for step, command in enumerate(commands):
        t = now if times is None else times[step]
        for channel, name in flowing.items():
            if name in until:
                view[channel] = until[name] > t
        a = assess(command, layout=layout, envelope=envelope, view=view, now=t, ledger=book)
        if not a.allowed:
            report.violations += [
                DryRunViolation(step, command, v.rule, v.reason, dict(v.values))
                for v in a.violations
            ]
            continue
        effect = a.effect
        assert effect is not None
        envelope.commit(view, effect.updates, now=t, consumes=effect.consumes, ledger=book)
        view.update(effect.settled_updates())
        name = command.instrument
        if effect.busy_s is not None:
            until[name] = t + effect.busy_s
        elif effect.action.flow is not None or (effect.safer and f"{name}.flowing" in flowing):
            until[name] = t if effect.safer else float("inf")  # stopped; or no rate: unknown
    report.final_state = view
    report.until = (now if times is None else times[-1]) if commands else now
    return report
