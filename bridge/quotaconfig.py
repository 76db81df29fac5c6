"""Agents' quotas in lab.yaml: how much each may propose, run and consume.

::

    default_quota:                   # every proposer without a quota of its own: MQTT users
      proposals_per_hour: 60         # not listed under agents, agents without 'quota:'
    agents:
      alice:
        propose: [color-*]
        quota:                       # replaces default_quota for alice (keys left out: the
          proposals_per_hour: 30     #   built-in defaults below)
          experiments_per_day: 20
          budgets: {dye_ml_per_day: 10}   # a share of the envelope's budget of that name
          queued_per_campaign: 2
          tool_calls_per_s: 5
          tool_call_burst: 10

Keys (all optional):

* ``proposals_per_hour``: proposals journaled (accepted or refused) in the last hour;
* ``experiments_per_day``: experiments of its proposals that started running in the last
  24 hours, plus those accepted (or awaiting approval) and waiting to run;
* ``budgets``: envelope budget name -> the most of it the agent's experiments may consume
  in that budget's window (``dye_ml_per_day: 10``: 10 mL a day), on every station whose
  envelope has that budget; a budget's window is on the stations' clock (a simulated
  bench's, at its speed), the other windows are real time;
* ``queued_per_campaign`` (default 4): proposals that may wait in one campaign at once
  (accepted and queued, or awaiting approval);
* ``tool_calls_per_s`` (default 20) and ``tool_call_burst`` (default 40): MCP tool calls
  (the MQTT API limits each broker user with ``mqtt.request_rate``).

Without ``default_quota`` a proposer without a quota has only the built-in defaults (no
limit on proposals, experiments or budgets). Operators and the campaign's optimizer have no
quota. The counting is :mod:`bridge.quotas`'; this module only reads lab.yaml (errors name
the file, the line and the field).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safety import load_envelope
from safety.yamldoc import YamlDoc

__all__ = ["QUOTA_KEYS", "BudgetShare", "Quota", "Quotas", "parse_quotas"]

QUOTA_KEYS = (
    "proposals_per_hour",
    "experiments_per_day",
    "budgets",
    "queued_per_campaign",
    "tool_calls_per_s",
    "tool_call_burst",
)


@dataclass(frozen=True)
class BudgetShare:
    """Where an envelope budget is counted: on ``station``, resource ``resource`` (what the
    envelope counts, e.g. ``vial.added``), in rolling windows of ``window`` (``day``)."""

    station: str
    resource: str
    window: str
    window_s: float
    unit: str = ""


@dataclass(frozen=True)
class Quota:
    """One proposer's quota (None: no limit); ``where`` names it in lab.yaml, for messages."""

    proposals_per_hour: int | None = None
    experiments_per_day: int | None = None
    budgets: Mapping[str, float] = field(default_factory=dict)
    queued_per_campaign: int = 4
    tool_calls_per_s: float = 20.0
    tool_call_burst: int = 40
    where: str = "the built-in defaults"

    def as_dict(self) -> dict[str, Any]:
        return {
            "proposals_per_hour": self.proposals_per_hour,
            "experiments_per_day": self.experiments_per_day,
            "budgets": dict(self.budgets),
            "queued_per_campaign": self.queued_per_campaign,
            "tool_calls_per_s": self.tool_calls_per_s,
            "tool_call_burst": self.tool_call_burst,
            "where": self.where,
        }


@dataclass(frozen=True)
class Quotas:
    """Every agent's quota and the default; ``budgets``: where each budget named by a quota
    is counted."""

    agents: Mapping[str, Quota] = field(default_factory=dict)
    default: Quota = field(default_factory=Quota)
    budgets: Mapping[str, tuple[BudgetShare, ...]] = field(default_factory=dict)

    def for_proposer(self, proposer: str) -> Quota | None:
        """The quota of ``agent:<name>`` (its own, else the default); None for anybody else
        (an operator, the campaign's optimizer)."""
        if not proposer.startswith("agent:"):
            return None
        return self.agents.get(proposer[len("agent:") :], self.default)


def parse_quotas(
    agents: Any, default: Any, doc: YamlDoc, envelopes: Mapping[str, tuple[str, str]]
) -> Quotas:
    """lab.yaml's ``default_quota`` and each agent's ``quota`` (``agents`` as parsed by
    :func:`bridge.agents.parse_agents`: a mapping of name -> mapping, or None).
    ``envelopes``: station -> (envelope YAML text, its source), for the budget names."""
    index: dict[str, tuple[BudgetShare, ...]] | None = None

    def budgets() -> dict[str, tuple[BudgetShare, ...]]:
        nonlocal index
        if index is None:  # the envelopes are parsed only if a quota names a budget
            found: dict[str, list[BudgetShare]] = {}
            for station, (text, source) in envelopes.items():
                for b in load_envelope(text, source=source).budgets:
                    share = BudgetShare(station, b.resource, b.window, b.window_s, b.unit)
                    found.setdefault(b.name, []).append(share)
            index = {k: tuple(v) for k, v in found.items()}
        return index

    source = Path(doc.source).name
    out = Quotas(
        default=(
            _quota(default, ("default_quota",), doc, budgets, source)
            if default is not None
            else Quota()
        )
    )
    mine: dict[str, Quota] = {}
    for name, spec in (agents or {}).items():
        if isinstance(spec, Mapping) and spec.get("quota") is not None:
            mine[name] = _quota(spec["quota"], ("agents", name, "quota"), doc, budgets, source)
    named = {n for q in (out.default, *mine.values()) for n in q.budgets}
    return Quotas(mine, out.default, {n: budgets()[n] for n in sorted(named)})


def _quota(value: Any, at: tuple[Any, ...], doc: YamlDoc, budgets: Any, source: str) -> Quota:
    if not isinstance(value, Mapping):
        raise doc.error(
            f"must be a mapping of {', '.join(QUOTA_KEYS)}, got {type(value).__name__}", at
        )
    for key in value:
        if key not in QUOTA_KEYS:
            raise doc.error(f"unknown field '{key}' (known: {', '.join(QUOTA_KEYS)})", (*at, key))

    def count(key: str, low: int) -> int | None:
        v = value.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise doc.error(f"must be a whole number >= {low}, got {v!r}", (*at, key))
        return int(v)

    shares: dict[str, float] = {}
    raw = value.get("budgets")
    if raw is not None:
        if not isinstance(raw, Mapping):
            raise doc.error(
                "must be a mapping of envelope budget name -> the agent's share "
                f"(e.g. {{dye_ml_per_day: 10}}), got {type(raw).__name__}",
                (*at, "budgets"),
            )
        known = budgets()
        for name, share in raw.items():
            where = (*at, "budgets", name)
            if name not in known:
                names = ", ".join(sorted(known)) or "none"
                raise doc.error(
                    f"unknown budget {name!r}: a share names a budget of the stations' "
                    f"envelopes (budgets: {names})",
                    where,
                )
            if (
                isinstance(share, bool)
                or not isinstance(share, int | float)
                or not math.isfinite(share)
                or share < 0
            ):
                raise doc.error(
                    f"must be a number >= 0 (in the budget's unit), got {share!r}", where
                )
            shares[str(name)] = float(share)
    rate = value.get("tool_calls_per_s", 20.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
        raise doc.error(f"must be a number > 0, got {rate!r}", (*at, "tool_calls_per_s"))
    return Quota(
        proposals_per_hour=count("proposals_per_hour", 0),
        experiments_per_day=count("experiments_per_day", 0),
        budgets=shares,
        queued_per_campaign=count("queued_per_campaign", 1) or 4,
        tool_calls_per_s=float(rate),
        tool_call_burst=count("tool_call_burst", 1) or 40,
        where=f"{source} {'.'.join(str(p) for p in at)}",
    )
