"""Approval policies: when an agent's proposal waits for a human before it may run.

A policy is written in a campaign's program.md (``approval:``) or for one agent in
lab.yaml (``agents.<name>.approval:``), in one of three forms::

    approval: auto            # the default: no human (the policy's absence)
    approval: human           # every proposal of an agent waits for a human
    approval:
      human_when: "temperature_c > 60 or agent not in trusted"
      trusted: [alice, lims]  # a list the rule names (agent in trusted)
      expires: 2h             # a proposal nobody decided is rejected after this
                              # (30s, 15m, 2h, 1d; or expires_s: 7200); default 1 h, at most 7 d
      max_awaiting: 16        # program.md only: proposals awaiting at once (default 16)

``human_when`` is a rule in the safety layer's expression language (:mod:`safety.expr`)
over the proposal's parameters (and the program's ``fixed`` values), ``agent`` (the
proposing agent's authenticated name, without ``agent:``) and ``trusted``; ``true``
is the same as ``human``. A campaign's rule is checked at load against the program's
names (a typo is an error naming the file, line and field); an agent's rule, whose
parameters depend on the campaign, when a campaign it may propose to starts
(:meth:`ApprovalPolicy.check_names`). A rule that cannot be evaluated for a proposal
(a value of the wrong type) asks a human: a policy fails closed.

A proposal needs a human if the campaign's policy or its agent's says so
(:func:`approval_needed`); only agents' proposals (``agent:<name>``) are gated: the
campaign's own optimizer proposes inside the space that the operator who wrote the
program chose, and an operator's proposals are the operator's own decision.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safety.expr import EvaluationError, Expression, Member, Name, RuleSyntaxError, parse
from safety.yamldoc import ConfigError, YamlDoc, field_path

__all__ = [
    "APPROVAL_KEYS",
    "DEFAULT_EXPIRES_S",
    "DEFAULT_MAX_AWAITING",
    "MAX_EXPIRES_S",
    "ApprovalNeeded",
    "ApprovalPolicy",
    "approval_needed",
    "parse_approval",
    "parse_duration",
]

APPROVAL_KEYS = ("human_when", "trusted", "expires", "expires_s", "max_awaiting")
#: how long a proposal waits for a decision unless the policy says otherwise (s)
DEFAULT_EXPIRES_S = 3600.0
#: the longest a policy may let a proposal wait (s): a week
MAX_EXPIRES_S = 7 * 86400.0
#: the shortest (s)
MIN_EXPIRES_S = 1.0
#: proposals awaiting a decision at once in one campaign, unless program.md says otherwise
DEFAULT_MAX_AWAITING = 16
MAX_AWAITING_LIMIT = 1000
#: the names a rule has besides the campaign's: the agent, and the named lists
AGENT_NAME = "agent"
LIST_NAMES = ("trusted",)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``30s``, ``15m``, ``2h``, ``1d`` or a number of seconds -> seconds; ValueError otherwise."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"a duration is like 30s, 15m, 2h or 1d, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, got {value!r}")
    return seconds


@dataclass(frozen=True)
class ApprovalPolicy:
    """One approval policy (see the module docstring); ``rule`` None: every proposal.

    ``where`` names it in messages and the journal (``program.md approval``,
    ``lab.yaml agents.alice.approval``); ``source``/``line``/``field`` locate it for
    errors found later (:meth:`check_names`).
    """

    where: str
    rule: Expression | None = None
    trusted: tuple[str, ...] = ()
    expires_s: float = DEFAULT_EXPIRES_S
    max_awaiting: int = DEFAULT_MAX_AWAITING
    source: str = field(default="<policy>", compare=False)
    line: int | None = field(default=None, compare=False)
    field: str = field(default="approval", compare=False)

    @property
    def text(self) -> str:
        """``human``, or the rule as written."""
        return "human" if self.rule is None else self.rule.text

    def as_spec(self) -> Any:
        """The ``approval:`` value that :func:`parse_approval` reads back as this policy."""
        if self.rule is None and not self.trusted and self.expires_s == DEFAULT_EXPIRES_S:
            if self.max_awaiting == DEFAULT_MAX_AWAITING:
                return "human"
        spec: dict[str, Any] = {
            "human_when": "true" if self.rule is None else self.rule.text,
            "expires_s": self.expires_s,
        }
        if self.trusted:
            spec["trusted"] = list(self.trusted)
        if self.max_awaiting != DEFAULT_MAX_AWAITING:
            spec["max_awaiting"] = self.max_awaiting
        return spec

    def names(self) -> set[str]:
        """The campaign's names the rule uses (not ``agent`` or a named list)."""
        if self.rule is None:
            return set()
        return self.rule.names() - {AGENT_NAME, *LIST_NAMES}

    def check_names(self, known: Sequence[str], what: str) -> None:
        """Every name the rule uses is one of ``known`` (``what`` names their owner, e.g.
        ``campaign run-1``); raises :class:`~safety.yamldoc.ConfigError` otherwise."""
        unknown = sorted(self.names() - set(known))
        if unknown:
            raise ConfigError(
                f"unknown name '{unknown[0]}' in \"{self.text}\" for {what} (its names: "
                f"{', '.join(sorted({*known, AGENT_NAME, *LIST_NAMES}))})",
                source=self.source,
                line=self.line if self.rule is None else self.rule.line,
                field=f"{self.field}.human_when",
            )

    def needs_human(
        self, params: Mapping[str, Any], fixed: Mapping[str, Any], agent: str
    ) -> str | None:
        """Why a human must approve this proposal (the policy, the rule and the values it
        saw), or None. A rule that cannot be evaluated asks a human."""
        if self.rule is None:
            return f"{self.where}: human (every agent proposal)"
        state = {
            **{k: v for k, v in fixed.items() if isinstance(v, str | bool | numbers.Real)},
            **dict(params),
            AGENT_NAME: agent,
            "trusted": list(self.trusted),
        }
        try:
            verdict = self.rule.evaluate(state)
        except EvaluationError as exc:
            return f'{self.where}: "{self.text}" could not be evaluated ({exc}): a human decides'
        if verdict is False:
            return None
        seen = ", ".join(
            f"{n}={state[n]!r}"
            for n in self.rule.names_in_order()
            if n in state and n not in LIST_NAMES
        )
        if verdict is not True:
            return f'{self.where}: "{self.text}" gave {verdict!r}, not true/false: a human decides'
        return f"{self.where}: {self.text} ({seen})"


@dataclass(frozen=True)
class ApprovalNeeded:
    """A proposal that waits for a human: why (one line per policy that asked) and for how
    long at most (the shortest expiry of those policies, s)."""

    rules: tuple[str, ...]
    expires_s: float


def approval_needed(
    policies: Sequence[ApprovalPolicy | None],
    params: Mapping[str, Any],
    fixed: Mapping[str, Any],
    proposer: str,
) -> ApprovalNeeded | None:
    """Whether an ``agent:<name>`` proposal needs a human under ``policies`` (the campaign's
    and its agent's); None for any other proposer or when no policy asks."""
    if not proposer.startswith("agent:"):
        return None
    agent = proposer[len("agent:") :]
    asked = [
        (p, why)
        for p in policies
        if p is not None and (why := p.needs_human(params, fixed, agent)) is not None
    ]
    if not asked:
        return None
    return ApprovalNeeded(tuple(why for _, why in asked), min(p.expires_s for p, _ in asked))


# ----------------------------------------------------------------------- loading
def parse_approval(
    value: Any,
    doc: YamlDoc,
    path: tuple[Any, ...],
    *,
    where: str,
    known: Sequence[str] | None,
    campaign: bool,
) -> ApprovalPolicy | None:
    """Validate an ``approval:`` value at ``path`` of ``doc`` (None: ``auto``, no policy).

    ``known``: the names a rule may use besides ``agent`` and ``trusted`` (a program's
    parameters and fixed values), or None to check them later (an agent's policy:
    :meth:`ApprovalPolicy.check_names`). ``campaign``: program.md's (``max_awaiting``
    allowed). Errors name the file, the line and the field.
    """
    base = ApprovalPolicy(where, source=doc.source, line=doc.line(path), field=field_path(path))
    if value is None or value == "auto":
        return None
    if value == "human" or value is True:
        return base
    if not isinstance(value, Mapping):
        raise doc.error(
            f"must be auto, human, or a mapping with human_when (a rule), got {value!r}", path
        )
    for key in value:
        if key not in APPROVAL_KEYS or (key == "max_awaiting" and not campaign):
            allowed = [k for k in APPROVAL_KEYS if campaign or k != "max_awaiting"]
            hint = "; max_awaiting is a campaign's (program.md)" if key == "max_awaiting" else ""
            raise doc.error(
                f"unknown key '{key}' (known: {', '.join(allowed)}{hint})", (*path, key)
            )
    if "human_when" not in value:
        raise doc.error("missing 'human_when' (a rule; or write approval: human)", path)
    trusted = _names_list(value.get("trusted"), doc, (*path, "trusted"))
    expires_s = _expiry(value, doc, path)
    max_awaiting = DEFAULT_MAX_AWAITING
    if value.get("max_awaiting") is not None:
        raw = value["max_awaiting"]
        if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_AWAITING_LIMIT:
            raise doc.error(
                f"must be an integer from 1 to {MAX_AWAITING_LIMIT}, got {raw!r}",
                (*path, "max_awaiting"),
            )
        max_awaiting = raw
    rule_value = value["human_when"]
    if rule_value is False:
        return None
    policy = dataclasses.replace(
        base, trusted=trusted, expires_s=expires_s, max_awaiting=max_awaiting
    )
    if rule_value is True:
        return policy
    return dataclasses.replace(policy, rule=_rule(rule_value, doc, (*path, "human_when"), known))


def _names_list(value: Any, doc: YamlDoc, path: tuple[Any, ...]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise doc.error(f"must be a list of agent names (e.g. [alice, lims]), got {value!r}", path)
    return tuple(value)


def _expiry(value: Mapping[str, Any], doc: YamlDoc, path: tuple[Any, ...]) -> float:
    if "expires" in value and "expires_s" in value:
        raise doc.error("give expires or expires_s, not both", (*path, "expires_s"))
    key = "expires_s" if "expires_s" in value else "expires"
    if key not in value:
        return DEFAULT_EXPIRES_S
    raw = value[key]
    try:
        if key == "expires_s" and not (isinstance(raw, numbers.Real) and not isinstance(raw, bool)):
            raise ValueError(f"must be a number of seconds, got {raw!r}")
        seconds = parse_duration(raw)
    except ValueError as exc:
        raise doc.error(str(exc), (*path, key)) from None
    if not MIN_EXPIRES_S <= seconds <= MAX_EXPIRES_S:
        raise doc.error(
            f"must be from {MIN_EXPIRES_S:g} s to 7 days ({MAX_EXPIRES_S:g} s), got {raw!r}",
            (*path, key),
        )
    return seconds


def _rule(
    text: Any, doc: YamlDoc, path: tuple[Any, ...], known: Sequence[str] | None
) -> Expression:
    if not isinstance(text, str) or not text.strip():
        raise doc.error(f"a rule (a string, or true), got {text!r}", path)
    line, column, indent = doc.scalars.get(path, (doc.line(path) or 1, 1, 0))
    try:
        rule = parse(text, source=doc.source, line=line, column=column, indent=indent)
    except RuleSyntaxError as exc:
        raise doc.error_cls(
            f'{exc.problem} in rule "{text}" (column {exc.column})',
            source=doc.source,
            line=exc.line if path in doc.scalars else doc.line(path),
            field=field_path(path),
        ) from None
    nodes = list(rule.ast.walk())
    named = [n.items for n in nodes if isinstance(n, Member) and isinstance(n.items, Name)]
    for items in named:  # after 'in': a named list only
        if items.name not in LIST_NAMES:
            raise doc.error(
                f"'{items.name}' is not a list: after 'in' name {' or '.join(LIST_NAMES)}, "
                f'or write a list [..], in "{text}"',
                path,
            )
    uses = [n.name for n in nodes if isinstance(n, Name) and n.name in LIST_NAMES]
    if len(uses) > len(named):  # and a named list nowhere else
        raise doc.error(
            f"'{uses[0]}' is a list: use it after 'in' (agent in {uses[0]}) in \"{text}\"", path
        )
    if known is not None:
        clash = sorted({AGENT_NAME, *LIST_NAMES} & set(known))
        if clash:
            raise doc.error(
                f"'{clash[0]}' is a parameter or fixed value and a name of the approval rule: "
                "rename it",
                path,
            )
        unknown = sorted(rule.names() - {AGENT_NAME, *LIST_NAMES} - set(known))
        if unknown:
            raise doc.error(
                f"unknown name '{unknown[0]}' in \"{text}\" (known: "
                f"{', '.join(sorted({*known, AGENT_NAME, *LIST_NAMES}))})",
                path,
            )
    return rule
