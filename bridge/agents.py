"""Agents as untrusted proposers: who they are (a token) and what they may do (lab.yaml).

lab.yaml::

    agent_tokens: agents.tokens      # the hashed token file (relative to this file; the default)
    agents:
      alice:                         # the agent's identity is agent:alice (journal, results)
        read: "*"                    # campaigns it may read: status, results, journal, program, report
        propose: [color-*, buffer-1] # campaigns it may dry-run proposals for and propose to
        start: [alice-*]             # campaign ids it may start
        control: [alice-*]           # campaigns it may pause, resume, stop or abort
        stations: [bench-a]          # stations it may see (description, live readings) and
                                     # act through: a campaign it proposes to or starts runs
                                     # on these only
        approval:                    # optional: when its proposals wait for a human
          human_when: "temperature_c > 60"   # (auto, human, or a rule: loops/approval.py)
          expires: 30m
        quota: {proposals_per_hour: 30}  # how much it may propose, run and consume
                                     # (bridge/quotaconfig.py; counted by bridge/quotas.py)

Deny by default: a field left out grants nothing, and a token of an agent not listed is
refused. A scope is a glob pattern (``fnmatch``, case-sensitive: ``*``, ``?``, ``[ab]``)
or a list of them; a station pattern must match a station of the lab (a typo would
silently grant nothing). A token may be narrowed further to some actions
(``labbridge agents issue alice --scope read``).

Identity is the token's agent, never a name a request carries: :class:`Authenticator`
turns a bearer token into an :class:`Agent`; :meth:`Agent.require` refuses what its
scopes do not allow with :class:`ScopeRefused`, one line naming the scope and what to do.
The journal names the agent as the proposer ``agent:<name>`` (as the MQTT API names the
broker user that sent a proposal).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.agenttokens import ACTIONS, TokenFileError, TokenStore
from loops.approval import ApprovalPolicy, parse_approval
from safety.yamldoc import YamlDoc

__all__ = [
    "ACTIONS",
    "Agent",
    "AgentConfig",
    "AgentsConfig",
    "AuthError",
    "Authenticator",
    "ScopeRefused",
    "parse_agents",
]

#: an agent's name: also the part after ``agent:`` in the journal
AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")
_POLICY_FIELDS = ("approval", "quota")  # how its proposals are handled (not scopes); quota:
#                                        bridge/quotaconfig.py reads it
_FIELDS = (*ACTIONS, "stations", *_POLICY_FIELDS)
DEFAULT_TOKEN_FILE = "agents.tokens"


class AuthError(PermissionError):
    """A token that does not authenticate (the message never repeats the token)."""


class ScopeRefused(PermissionError):
    """An authenticated agent asked for something its scopes do not allow."""


@dataclass(frozen=True)
class AgentConfig:
    """One agent of lab.yaml: the campaigns it may act on per action, and its stations."""

    name: str
    campaigns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    stations: tuple[str, ...] = ()
    line: int | None = None
    #: when its proposals wait for a human (None: auto; loops/approval.py)
    approval: ApprovalPolicy | None = None

    def may(self, action: str, campaign_id: str) -> bool:
        """lab.yaml lets this agent ``action`` campaign ``campaign_id``."""
        return any(fnmatch.fnmatchcase(campaign_id, p) for p in self.campaigns.get(action, ()))

    def may_use(self, station: str) -> bool:
        """lab.yaml lets this agent see and act through ``station``."""
        return any(fnmatch.fnmatchcase(station, p) for p in self.stations)

    def as_dict(self) -> dict[str, Any]:
        return {
            **{a: list(self.campaigns.get(a, ())) for a in ACTIONS},
            "stations": list(self.stations),
        }


@dataclass(frozen=True)
class AgentsConfig:
    """lab.yaml's ``agents`` and ``agent_tokens``."""

    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    agents: Mapping[str, AgentConfig] = field(default_factory=dict)
    source: str = "<lab>"

    def store(self) -> TokenStore:
        return TokenStore(self.token_file)


@dataclass(frozen=True)
class Agent:
    """An authenticated agent: its lab.yaml entry and the actions its token was issued for.

    The one identity of every request it makes; ``proposer`` is how the journal names it.
    """

    config: AgentConfig
    token_scopes: frozenset[str]
    fingerprint: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def proposer(self) -> str:
        return f"agent:{self.name}"

    def may(self, action: str, campaign_id: str) -> bool:
        """This agent's token and lab.yaml both allow ``action`` on the campaign."""
        return action in self.token_scopes and self.config.may(action, campaign_id)

    def require(self, action: str, campaign_id: str) -> None:
        """Raise :class:`ScopeRefused` unless this agent may ``action`` the campaign."""
        if action not in self.token_scopes:
            raise ScopeRefused(
                f"agent {self.name}'s token (fingerprint {self.fingerprint}) was issued for "
                f"{', '.join(sorted(self.token_scopes))} only, not {action}: the lab's operator "
                f"can issue a token with --scope {action}"
            )
        if not self.config.may(action, campaign_id):
            allowed = ", ".join(self.config.campaigns.get(action, ())) or "nothing"
            raise ScopeRefused(
                f"agent {self.name} may not {action} campaign {campaign_id!r}: lab.yaml "
                f"agents.{self.name}.{action} allows {allowed}; ask the lab's operator to "
                "widen it"
            )

    def require_stations(self, stations: Collection[str], why: str) -> None:
        """Raise :class:`ScopeRefused` unless every station is in this agent's ``stations``."""
        outside = [s for s in stations if not self.config.may_use(s)]
        if outside:
            allowed = ", ".join(self.config.stations) or "none"
            raise ScopeRefused(
                f"agent {self.name} may not use station {', '.join(outside)} ({why}): lab.yaml "
                f"agents.{self.name}.stations allows {allowed}"
            )


class Authenticator:
    """Bearer token -> :class:`Agent`, against the hashed token file and lab.yaml's agents."""

    def __init__(self, agents: AgentsConfig, store: TokenStore | None = None) -> None:
        self.agents = agents
        self.store = store if store is not None else agents.store()

    def authenticate(self, token: str) -> Agent:
        """The token's agent; :class:`AuthError` (one line, never the token) otherwise."""
        try:
            record = self.store.lookup(token)
        except TokenFileError as exc:
            raise AuthError(f"tokens cannot be checked: {exc}") from None
        if record is None:
            raise AuthError(
                "the token is not valid (unknown, revoked or replaced): ask the lab's operator "
                "for one (labbridge agents issue NAME)"
            )
        config = self.agents.agents.get(record.agent)
        if config is None:
            raise AuthError(
                f"the token's agent {record.agent!r} is not in {self.agents.source}'s agents: "
                "its tokens are refused until the lab's operator adds it"
            )
        return Agent(config, frozenset(record.scopes), record.fingerprint)


# ---------------------------------------------------------------------- lab.yaml
def parse_agents(
    agents: Any,
    token_file: Any,
    doc: YamlDoc,
    base: Path,
    stations: Collection[str],
) -> AgentsConfig:
    """Validate lab.yaml's ``agents`` and ``agent_tokens``; errors name file, line and field."""
    path = Path(DEFAULT_TOKEN_FILE)
    if token_file is not None:
        if not isinstance(token_file, str) or not token_file.strip():
            raise doc.error(
                f"must be a file path (the hashed token file), got {token_file!r}",
                ("agent_tokens",),
            )
        if token_file.startswith("lbt_"):
            raise doc.error(  # never echo it: the error may end up in a log
                "looks like a token itself: name the token file here (labbridge agents issue "
                "writes it)",
                ("agent_tokens",),
            )
        path = Path(token_file).expanduser()
    if not path.is_absolute():
        path = base / path
    if agents is None:
        return AgentsConfig(path, {}, doc.source)
    if not isinstance(agents, Mapping):
        raise doc.error(
            f"must be a mapping of agent name -> its scopes, got {type(agents).__name__}",
            ("agents",),
        )
    out: dict[str, AgentConfig] = {}
    for name, spec in agents.items():
        at: tuple[Any, ...] = ("agents", name)
        if not isinstance(name, str) or not AGENT_NAME.match(name):
            raise doc.error(f"{name!r} is not an agent name (letters, digits, _ . -)", at)
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise doc.error(
                f"must be a mapping of {', '.join(_FIELDS)} -> patterns, got {type(spec).__name__}",
                at,
            )
        for key in spec:
            if key not in _FIELDS:
                raise doc.error(
                    f"unknown field '{key}' (known: {', '.join(_FIELDS)}; deny by default: "
                    "what is not granted is refused)",
                    (*at, key),
                )
        campaigns = {a: _patterns(spec.get(a), (*at, a), doc) for a in ACTIONS}
        station_patterns = _patterns(spec.get("stations"), (*at, "stations"), doc)
        for i, pattern in enumerate(station_patterns):
            if not any(fnmatch.fnmatchcase(s, pattern) for s in stations):
                where = (
                    (*at, "stations", i)
                    if isinstance(spec.get("stations"), list)
                    else (
                        *at,
                        "stations",
                    )
                )
                raise doc.error(
                    f"{pattern!r} matches no station of this lab (stations: {', '.join(stations)})",
                    where,
                )
        out[name] = AgentConfig(
            name, campaigns, station_patterns, doc.line(at), _approval(spec, doc, at, name)
        )
    return AgentsConfig(path, out, doc.source)


def _approval(
    spec: Mapping[str, Any], doc: YamlDoc, at: tuple[Any, ...], name: str
) -> ApprovalPolicy | None:
    """An agent's ``approval`` (its rule's parameter names are checked against each
    campaign it may propose to when that campaign starts: bridge/campaigns.py)."""
    return parse_approval(
        spec.get("approval"),
        doc,
        (*at, "approval"),
        where=f"{Path(doc.source).name} agents.{name}.approval",
        known=None,
        campaign=False,
    )


def _patterns(value: Any, at: tuple[Any, ...], doc: YamlDoc) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise doc.error(
            f"must be a pattern or a list of patterns (e.g. [color-*, run-1]), got {value!r}", at
        )
    out = []
    for i, item in enumerate(items):
        where = at if isinstance(value, str) else (*at, i)
        if not isinstance(item, str) or not _PATTERN.match(item):
            raise doc.error(
                f"{item!r} is not a name pattern (letters, digits, _ . - and the globs * ? [ ])",
                where,
            )
        out.append(item)
    return tuple(out)
