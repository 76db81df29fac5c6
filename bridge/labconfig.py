"""The lab config (``lab.yaml``): stations, their instruments and envelopes, Ray, the store.

Example (``labbridge sim`` and ``labbridge run`` write one for the simulated lab
they start; ``examples/lab-hardware.yaml`` is a commented template for a real bench)::

    bridge_id: reference-lab          # MQTT topic root labbridge/<bridge_id>/
    store: labbridge.db               # the journal (relative to this file)
    ray:
      address: null                   # null: local Ray on loopback; "auto"/host:port: a cluster
      token_file: null                # a file holding the cluster's Ray token (relative to this
                                      # file; never the token itself): docs/cluster.md
      lease_s: 5                      # a station acts on this long without hearing from its
                                      # campaign (2-300 s; a restarted serve back within it
                                      # takes the stations over live): docs/cluster.md
    simulated:                        # only for simulated benches: their shared clock
      speed: 100                      # simulated seconds per real second
      sim_at_real: [12.5, 45678.9]    # (simulated s, time.monotonic()) at one instant (default: 0 at load)
    env:                              # set in every station process before it connects
      DBUS_SYSTEM_BUS_ADDRESS: unix:path=/tmp/labbridge-bluez/bus
    stations:
      bench-a:
        envelope: reference           # "reference", a path (relative to this file) or a mapping
        supervisor: {poll_interval: 0.1}
        instruments:
          - {name: red, kind: syringe-pump, url: "serial:///dev/ttyUSB0?baudrate=9600",
             options: {address: 0}}
        setup: [reference]            # set-up recipes (loops/setup.py): files (relative to
                                      # this file), inline mappings, or "reference" (the
                                      # reference bench's camera calibration)
        setup_file: setup/bench-a.yaml   # (default) what they keep; labbridge setup writes it
        verification:                 # the program's checks after each experiment (default on)
          max_disagreements: 3        # unverified results in a row before the station pauses
                                      # (what is checked, and how closely: the program's
                                      # verification, loops/checks.py)
    agents:                           # MCP agents and what they may do (bridge/agents.py,
      alice: {read: "*", propose: [color-*], stations: [bench-a]}   # docs/agents.md)
    agent_tokens: agents.tokens       # their hashed tokens (the default; labbridge agents issue)
    default_quota: {proposals_per_hour: 60}   # proposers without a quota of their own
                                      # (agents.NAME.quota: bridge/quotaconfig.py)
    users: {ana: operator, ben: viewer}   # who logs in to the lab page (bridge/webusers.py)
    user_passwords: users.passwords   # their scrypt-hashed passwords (labbridge users passwd)
    notifications: {webhooks: {chat: {url_file: chat.secret}}}   # who is told when the lab
                                      # needs a person (bridge/notifyconfig.py, docs/notifications.md)

Every error names the file, the line and the field
(``lab.yaml:14: stations.bench-a.instruments[2].url: ...``). Nothing here
touches hardware: :func:`load_lab` parses and validates (URLs by their scheme,
envelopes by :func:`safety.load_envelope`).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridge.agents import AgentsConfig, parse_agents
from bridge.laberrors import LabConfigError
from bridge.labmqtt import mqtt_settings
from bridge.notifyconfig import NotifyConfig, parse_notifications
from bridge.quotaconfig import Quotas, parse_quotas
from bridge.webusers import UsersConfig, parse_users
from instruments.errors import InstrumentError
from loops.check import check_setup
from loops.setup import REFERENCE_SETUP, SetupRecipe, SetupStore, compile_setup, load_setup
from loops.stationlease import LEASE_S, RENEW_S
from safety import check_device_faults, check_instrument, load_envelope, station_layout
from safety.effects import check_counted
from safety.envelopeload import REFERENCE_BENCH
from safety.yamldoc import ConfigError, YamlDoc, compose_yaml

__all__ = [
    "LabConfig",
    "LabConfigError",
    "StationConfig",
    "load_lab",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
#: lab.yaml ``ray.lease_s``'s bounds (real seconds): a few renewals at least; at most what a
#: bench may run on unattended after its campaign's process died
MIN_LEASE_S, MAX_LEASE_S = 2 * RENEW_S, 300.0
_TOP: tuple[str, ...] = ("bridge_id", "store", "ray", "simulated", "env", "stations", "mqtt")
_TOP += ("agents", "agent_tokens", "default_quota", "users", "user_passwords", "notifications")
_STATION = ("envelope", "instruments", "supervisor", "env", "verification", "setup", "setup_file")
_VERIFICATION = ("enabled", "max_disagreements")
_INSTRUMENT = ("name", "kind", "url", "options")
_SUPERVISOR = ("poll_interval", "device_time_scale", "safe_timeout", "watchdog_s")


@dataclass(frozen=True)
class StationConfig:
    """One station: its instruments (dicts for ``open_station``) and envelope YAML text."""

    name: str
    instruments: tuple[dict[str, Any], ...]
    envelope_text: str
    envelope_source: str
    supervisor: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    verification: VerificationConfig | None = None
    #: the station's set-up recipes, in the order they run
    setup: tuple[SetupRecipe, ...] = ()
    #: what they keep and when each ran (``setup_file``)
    setup_store: SetupStore | None = None


@dataclass(frozen=True)
class VerificationConfig:
    """A station's verification: how many unverified results in a row pause the station
    (the checks themselves are the program's)."""

    max_disagreements: int = 3

    def actor_options(self) -> dict[str, Any]:
        return {"enabled": True}


@dataclass(frozen=True)
class LabConfig:
    """A validated ``lab.yaml``."""

    source: str
    bridge_id: str
    store: Path
    stations: dict[str, StationConfig]
    ray_address: str | None = None
    ray_token_file: Path | None = None
    #: how long a station acts on without hearing from its campaign's owner (real seconds;
    #: lab.yaml ``ray.lease_s``): a restarted ``labbridge serve`` that is back within it takes
    #: the stations over live (docs/cluster.md)
    lease_s: float = LEASE_S
    speed: float | None = None
    sim_at_real: tuple[float, float] | None = None
    env: dict[str, str] = field(default_factory=dict)
    mqtt: dict[str, Any] = field(default_factory=dict)
    #: the agents (MCP) and their scopes, and where their hashed tokens are
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    #: what each agent may propose, run and consume (bridge/quotaconfig.py)
    quotas: Quotas = field(default_factory=Quotas)
    #: the people who log in to the lab page, their roles, and where their hashed passwords are
    users: UsersConfig = field(default_factory=UsersConfig)
    #: who is told when the lab needs a person, and how (bridge/notifyconfig.py)
    notifications: NotifyConfig | None = None
    doc: YamlDoc | None = field(default=None, repr=False, compare=False)

    @property
    def simulated(self) -> bool:
        return self.speed is not None

    def check(self) -> list[str]:
        """Everything ``labbridge check`` verifies beyond the format, without touching
        hardware: the ``mqtt:`` block (:func:`mqtt_settings`), each envelope's
        channels and rules name the station's instruments, each driver kind is installed,
        each transport URL and its driver options are valid, each budget over a counter
        names one the station's drivers declare, each set-up recipe's steps name the
        station's instruments, commands, arguments and readings (:func:`check_setup`).
        Returns the problems (``file:line: field: problem``), empty when all is well."""
        problems: list[str] = []
        if self.mqtt:
            try:
                mqtt_settings(self)
            except ConfigError as exc:
                problems.append(str(exc))
        if self.notifications is not None:  # its secret files (their notes: labbridge check)
            problems += self.notifications.check(bool(self.mqtt.get("url")))[0]
        for name, st in self.stations.items():
            at = ("stations", name)
            layout = None  # stays None for a driver kind not installed (reported below)
            try:
                envelope = load_envelope(
                    st.envelope_text,
                    source=st.envelope_source,
                    known=[i["name"] for i in st.instruments],
                )
                check_device_faults(st.instruments, envelope)  # disabled/while name real faults
                with contextlib.suppress(
                    InstrumentError, ImportError, KeyError, TypeError, ValueError
                ):
                    layout = station_layout(st.instruments, envelope)
                if layout is not None:
                    check_counted(layout, envelope)  # budgets over counters name real ones
            except ConfigError as exc:
                problems.append(f"{exc} (station {name})")
            else:
                if layout is not None:  # set-up steps against the station
                    problems += check_setup(st.setup, layout)
            for i, spec in enumerate(st.instruments):
                try:
                    check_instrument(spec["kind"], spec["url"], spec.get("options"))
                except (InstrumentError, TypeError, ValueError) as exc:
                    where = (*at, "instruments", i)
                    if self.doc is not None:
                        problems.append(str(self.doc.error(str(exc), where)))
                    else:
                        problems.append(f"{self.source}: stations.{name}.instruments[{i}]: {exc}")
        return problems


def _str(
    value: Any,
    path: tuple[Any, ...],
    doc: YamlDoc,
    *,
    pattern: re.Pattern[str] | None = None,
    what: str = "a string",
) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(f"must be {what}, got {value!r}", path)
    if pattern is not None and not pattern.match(value):
        raise doc.error(f"{value!r} is not {what}", path)
    return value


def _mapping(
    value: Any, path: tuple[Any, ...], doc: YamlDoc, allowed: tuple[str, ...] | None
) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise doc.error(f"must be a mapping, got {type(value).__name__}", path)
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise doc.error(
                    f"unknown field '{key}' (known: {', '.join(allowed)})", (*path, key)
                )
    return dict(value)


def _env(value: Any, path: tuple[Any, ...], doc: YamlDoc) -> dict[str, str]:
    out = {}
    for k, v in _mapping(value or {}, path, doc, None).items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise doc.error(f"must be a string, got {v!r}", (*path, k))
        out[str(k)] = str(v)
    return out


def _number(value: Any, path: tuple[Any, ...], doc: YamlDoc) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise doc.error(f"must be a number > 0, got {value!r}", path)
    return float(value)


def _envelope(value: Any, path: tuple[Any, ...], doc: YamlDoc, base: Path) -> tuple[str, str]:
    if value is None or value == "reference":
        return REFERENCE_BENCH.read_text(encoding="utf-8"), str(REFERENCE_BENCH)
    if isinstance(value, Mapping):
        text = yaml.safe_dump(dict(value), sort_keys=False)
        source = f"{doc.source} ({path[-2]} envelope)"
        load_envelope(text, source=source)
        return text, source
    file = _str(value, path, doc, what="'reference', a file path or a mapping")
    p = Path(file)
    if not p.is_absolute():
        p = base / p
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise doc.error(f"cannot read envelope {p}: {exc.strerror or exc}", path) from None
    load_envelope(text, source=str(p))  # its own errors name its file and line
    return text, str(p)


def _instrument(value: Any, path: tuple[Any, ...], doc: YamlDoc) -> dict[str, Any]:
    data = _mapping(value, path, doc, _INSTRUMENT)
    for key in ("name", "kind", "url"):
        if key not in data:
            raise doc.error(f"missing field '{key}'", path)
    out: dict[str, Any] = {
        "name": _str(
            data["name"],
            (*path, "name"),
            doc,
            pattern=_NAME,
            what="a name (letters, digits, _ . -)",
        ),
        "kind": _str(data["kind"], (*path, "kind"), doc, what="a driver kind (labbridge drivers)"),
        "url": _str(
            data["url"], (*path, "url"), doc, pattern=_URL, what="a transport URL (scheme://...)"
        ),
        "options": _mapping(data.get("options") or {}, (*path, "options"), doc, None),
    }
    return out


def _verification(value: Any, at: tuple[Any, ...], doc: YamlDoc) -> VerificationConfig | None:
    """On by default (the program's checks run after each experiment); ``enabled: false``
    turns it off."""
    if isinstance(value, Mapping) and "calibration" in value:
        raise doc.error(
            "verification.calibration is gone: a camera calibration is what a set-up recipe "
            "keeps (station 'setup:' and 'setup_file:', labbridge setup)",
            (*at, "calibration"),
        )
    data = _mapping(value or {}, at, doc, _VERIFICATION)
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise doc.error(f"must be true or false, got {enabled!r}", (*at, "enabled"))
    if not enabled:
        return None
    n = data.get("max_disagreements", 3)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise doc.error(f"must be an integer >= 1, got {n!r}", (*at, "max_disagreements"))
    return VerificationConfig(n)


def _setup(value: Any, at: tuple[Any, ...], doc: YamlDoc, base: Path) -> tuple[SetupRecipe, ...]:
    """A station's ``setup:`` list: files (relative to the lab file), inline mappings, or
    ``reference`` (the reference bench's, loops/programs/reference-setup.yaml)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise doc.error("must be a list of set-up recipes (files or mappings)", at)
    out: list[SetupRecipe] = []
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            recipe = compile_setup(item, doc=doc, path=(*at, i))
        else:
            file = _str(item, (*at, i), doc, what="'reference', a file path or a mapping")
            p = REFERENCE_SETUP if file == "reference" else Path(file)
            if not p.is_absolute():
                p = base / p
            if not p.is_file():
                raise doc.error(f"no set-up recipe file {p}", (*at, i))
            recipe = load_setup(p)  # its own errors name its file and line
        if any(r.name == recipe.name for r in out):
            raise doc.error(f"two set-up recipes named {recipe.name!r}", (*at, i))
        out.append(recipe)
    return tuple(out)


def load_lab(spec: str | Path, *, source: str | None = None) -> LabConfig:
    """Read and validate a lab config (a path, or YAML text with ``source`` naming it)."""
    if isinstance(spec, Path) or ("\n" not in spec and spec.strip().endswith((".yaml", ".yml"))):
        path = Path(spec)
        name = source or str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LabConfigError(f"cannot read: {exc.strerror or exc}", source=name) from None
        base = path.resolve().parent
    else:
        text, name, base = str(spec), source or "<lab>", Path.cwd()
    doc = YamlDoc(name, error_cls=LabConfigError)
    data = compose_yaml(text, doc, key_types=(str,))
    top = _mapping(data if data is not None else {}, (), doc, _TOP)
    if not top.get("stations"):
        raise doc.error("missing field 'stations' (at least one station)", ())
    stations_raw = _mapping(top["stations"], ("stations",), doc, None)
    env = _env(top.get("env"), ("env",), doc)
    stations: dict[str, StationConfig] = {}
    for sname, sraw in stations_raw.items():
        at = ("stations", sname)
        _str(sname, at, doc, pattern=_NAME, what="a station name (letters, digits, _ . -)")
        sdata = _mapping(sraw, at, doc, _STATION)
        instruments_raw = sdata.get("instruments")
        if not isinstance(instruments_raw, list) or not instruments_raw:
            raise doc.error("must be a non-empty list of instruments", (*at, "instruments"))
        instruments = tuple(
            _instrument(item, (*at, "instruments", i), doc)
            for i, item in enumerate(instruments_raw)
        )
        names = [i["name"] for i in instruments]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise doc.error(f"duplicate instrument name {n!r}", (*at, "instruments", i, "name"))
        supervisor = _mapping(sdata.get("supervisor") or {}, (*at, "supervisor"), doc, _SUPERVISOR)
        for key, v in supervisor.items():
            _number(v, (*at, "supervisor", key), doc)
        text_env, env_source = _envelope(sdata.get("envelope"), (*at, "envelope"), doc, base)
        verification = _verification(sdata.get("verification"), (*at, "verification"), doc)
        setup_file = Path(
            _str(
                sdata.get("setup_file", f"setup/{sname}.yaml"),
                (*at, "setup_file"),
                doc,
                what="a file path",
            )
        )
        stations[sname] = StationConfig(
            name=sname,
            instruments=instruments,
            envelope_text=text_env,
            envelope_source=env_source,
            supervisor=supervisor,
            env={**env, **_env(sdata.get("env"), (*at, "env"), doc)},
            verification=verification,
            setup=_setup(sdata.get("setup"), (*at, "setup"), doc, base),
            setup_store=SetupStore(setup_file if setup_file.is_absolute() else base / setup_file),
        )
    speed: float | None = None
    sim_at_real: tuple[float, float] | None = None
    if top.get("simulated") is not None:
        sim = _mapping(top["simulated"], ("simulated",), doc, ("speed", "sim_at_real"))
        if "speed" not in sim:
            raise doc.error("missing field 'speed'", ("simulated",))
        speed = _number(sim["speed"], ("simulated", "speed"), doc)
        pair = sim.get("sim_at_real")
        if pair is not None:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
            ):
                raise doc.error(
                    "must be [simulated seconds, monotonic seconds]", ("simulated", "sim_at_real")
                )
            sim_at_real = (float(pair[0]), float(pair[1]))
        else:  # the clock starts at 0 now: every process that uses this LabConfig shares it
            sim_at_real = (0.0, time.monotonic())
    ray_cfg = _mapping(top.get("ray") or {}, ("ray",), doc, ("address", "token_file", "lease_s"))
    lease_s = LEASE_S
    if ray_cfg.get("lease_s") is not None:
        lease_s = _number(ray_cfg["lease_s"], ("ray", "lease_s"), doc)
        if not MIN_LEASE_S <= lease_s <= MAX_LEASE_S:
            raise doc.error(
                f"must be {MIN_LEASE_S:g} to {MAX_LEASE_S:g} seconds (how long a station acts "
                f"on without hearing from its campaign), got {lease_s:g}",
                ("ray", "lease_s"),
            )
    address = ray_cfg.get("address")
    if address is not None:
        address = _str(
            address, ("ray", "address"), doc, what="a Ray address (auto, host:port, ray://...)"
        )
    token_file = ray_cfg.get("token_file")
    if isinstance(token_file, str) and re.fullmatch(r"[0-9a-fA-F]{32,}", token_file.strip()):
        raise doc.error(  # never echo it: the error may end up in a log
            "looks like a Ray token itself: save the token in a file readable only by you "
            "and name that file here (docs/cluster.md)",
            ("ray", "token_file"),
        )
    if token_file is not None:
        what = "a file path (the file holding the Ray token, not the token)"
        token_file = _str(token_file, ("ray", "token_file"), doc, what=what)
        token_file = base / Path(token_file).expanduser()
    bridge_id = _str(
        top.get("bridge_id", "labbridge"),
        ("bridge_id",),
        doc,
        pattern=_NAME,
        what="a name (letters, digits, _ . -)",
    )
    store = Path(_str(top.get("store", "labbridge.db"), ("store",), doc, what="a file path"))
    if not store.is_absolute():
        store = base / store
    mqtt = _mapping(top.get("mqtt") or {}, ("mqtt",), doc, None)
    agents = parse_agents(top.get("agents"), top.get("agent_tokens"), doc, base, list(stations))
    quotas = parse_quotas(
        top.get("agents"),
        top.get("default_quota"),
        doc,
        {n: (st.envelope_text, st.envelope_source) for n, st in stations.items()},
    )
    users = parse_users(top.get("users"), top.get("user_passwords"), doc, base)
    notifications = parse_notifications(top.get("notifications"), doc, base, list(stations))
    return LabConfig(
        source=name,
        bridge_id=bridge_id,
        store=store,
        stations=stations,
        ray_address=address,
        ray_token_file=token_file,
        lease_s=lease_s,
        speed=speed,
        sim_at_real=sim_at_real,
        env=env,
        mqtt=mqtt,
        agents=agents,
        quotas=quotas,
        users=users,
        notifications=notifications,
        doc=doc,
    )
