"""Ray, the one place that knows it: the journal and station actors, their links, ``init_ray``.

:class:`JournalActor` is the one process that owns the journal's SQLite file; its Ray
methods are built from :data:`loops.journal.JOURNAL_API` (each forwards to the
:class:`~loops.journal.Journal` method of that name, one call at a time), so
there is no second copy of the API. :class:`RayJournal` and :class:`RayStation` wrap
actor handles as a :class:`~loops.journal.JournalLink` and a
:class:`~loops.stations.StationLink`: the campaign loop calls those, never ``.remote()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from loops.journal import JOURNAL_API, Journal, api_name
from loops.rayprobe import RayTlsError, RayUnreachable, check_ray_address, not_ray
from loops.runfolder import note_children
from loops.stacktime import current_timer, timed
from loops.stationerrors import cause_text, portable_error
from loops.stations import (
    ClockSpec,
    StationActor,
    StationLost,
    station_method,
    station_resource,
)

log = logging.getLogger(__name__)

__all__ = [
    "JournalActor",
    "RayAuthError",
    "RayJournal",
    "RayStation",
    "RayTlsError",
    "RayUnreachable",
    "check_ray_address",
    "check_ray_token",
    "end_actor",
    "find_actor",
    "named_actors",
    "init_ray",
    "ray_links",
    "start_journal_actor",
    "start_station_actor",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


# ------------------------------------------------------------------------ links
class RayJournal:
    """The journal actor's handle as a :class:`~loops.journal.JournalLink` (picklable: a
    station actor gets one). A journal error arrives as a Ray task error of its own type."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def call(
        self, fn: Callable[Concatenate[Journal, _P], _R], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Awaitable[_R]:
        name = api_name(fn)
        ref = getattr(self.handle, name).remote(*args, **kwargs)
        if current_timer() is not None:  # an experiment's stack time is being measured
            return timed(f"journal.{name}", ref)
        return cast(Awaitable[_R], ref)  # an ObjectRef: submitted now, awaitable


class RayStation:
    """A station actor's handle as a :class:`~loops.stations.StationLink`; an actor that
    died raises :class:`~loops.stations.StationLost`."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self.handle = handle

    def call(
        self,
        fn: Callable[Concatenate[StationActor, _P], Awaitable[_R]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> asyncio.Future[_R]:
        name = station_method(fn)
        ref = getattr(self.handle, name).remote(*args, **kwargs)
        return asyncio.ensure_future(self._result(ref, name))

    async def _result(self, ref: Any, name: str) -> Any:
        try:
            return await timed(f"station.{name}", ref)
        except ray.exceptions.RayActorError as exc:
            raise StationLost(
                f"station {self.name} lost, taken as died: {cause_text(exc)}"
            ) from None


def ray_links(journal: Any, actors: Mapping[str, Any]) -> tuple[RayJournal, dict[str, RayStation]]:
    """The links a :class:`~loops.campaign.CampaignRunner` takes, from the actor handles."""
    return RayJournal(journal), {name: RayStation(name, h) for name, h in actors.items()}


# ---------------------------------------------------------------------- journal
class JournalActor:
    """The process that owns the journal file: :class:`loops.journal.Journal` behind a Ray actor.

    One Ray method per name in :data:`~loops.journal.JOURNAL_API` (built below, not
    written out), plus :meth:`close`. Each call runs the :class:`~loops.journal.Journal`
    method on the actor's event loop, synchronously (nothing awaited inside it), so calls
    run one at a time and never interleave, and the connection stays on that one thread.
    (Handing each call to a thread of its own, as :class:`~loops.journal.AsyncJournal`
    does in-process, cost 0.5 ms of a 3 ms round trip in thread hops: benchmarks/scale.py's
    journal burst.) A write has committed (fsync'ed) when its ObjectRef resolves. Journal
    errors (IllegalTransition, StepOrderError, ...) reach the caller as Ray task errors of
    that type.
    """

    def __init__(self, path: str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self._busy_timeout_s = busy_timeout_s
        self._journal: Journal | None = None

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._journal is None:
                self._journal = Journal(self.path, busy_timeout_s=self._busy_timeout_s)
            return getattr(self._journal, method)(*args, **kwargs)
        except Exception as exc:
            portable = portable_error(exc)
            if portable is exc:
                raise
            raise portable from None

    async def close(self) -> None:
        """Close the file (the actor can be killed afterwards); idempotent."""
        journal, self._journal = self._journal, None
        if journal is not None:
            journal.close()


def _forwarder(name: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: JournalActor, *args: Any, **kwargs: Any) -> Any:
        return await self._call(name, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"JournalActor.{name}"
    method.__doc__ = getattr(Journal, name).__doc__
    return method


for _name in sorted(JOURNAL_API):  # before ray.remote() reads the class's methods
    setattr(JournalActor, _name, _forwarder(_name))


def start_station_actor(
    name: str,
    specs: Sequence[Mapping[str, Any]],
    envelope_text: str | Mapping[str, Any],
    *,
    clock: ClockSpec | None = None,
    supervisor_options: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    journal: Any = None,
    actor_name: str | None = None,
    namespace: str | None = None,
    verification: Mapping[str, Any] | None = None,
    setup: Mapping[str, Any] | None = None,
    detached: bool = False,
) -> Any:
    """Create station ``name``'s :class:`StationActor` (not yet open: ``await handle.start.remote()``).

    Placed by the resource ``station:<name>`` (1 unit: one actor per bench), no CPU,
    named ``station-<name>`` (``actor_name`` overrides), never restarted or retried by
    Ray. ``journal``: the journal actor's handle (:func:`start_journal_actor`), reached
    from the station through a :class:`RayJournal`. ``detached``: it outlives the process
    that creates it (Ray's ``lifetime="detached"``; give it a ``namespace``): whoever
    ends it must :func:`end_actor` it. Returns the actor handle.
    """
    cls = ray.remote(StationActor)
    options: dict[str, Any] = {
        "name": actor_name or f"station-{name}",
        "resources": {station_resource(name): 1},
        "num_cpus": 0,
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    if namespace is not None:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    return cls.options(**options).remote(
        name,
        [dict(s) for s in specs],
        envelope_text,
        clock=clock,
        supervisor_options=dict(supervisor_options or {}),
        env=dict(env or {}),
        journal=None if journal is None else RayJournal(journal),
        verification=dict(verification or {}),
        setup=dict(setup or {}),
    )


def start_journal_actor(
    path: str | Path,
    *,
    actor_name: str | None = None,
    busy_timeout_s: float = 10.0,
    namespace: str | None = None,
    detached: bool = False,
) -> Any:
    """Create the :class:`JournalActor` for ``path`` on the driver's node (the file is local to it).

    ``path`` is made absolute here (a worker's working directory is not the driver's).
    ``namespace``, ``detached``: as for :func:`start_station_actor`.
    """
    cls = ray.remote(JournalActor)
    options: dict[str, Any] = {
        "num_cpus": 0,
        "max_restarts": 0,
        "max_task_retries": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False
        ),
    }
    if actor_name is not None:
        options["name"] = actor_name
    if namespace is not None:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    return cls.options(**options).remote(str(Path(path).resolve()), busy_timeout_s=busy_timeout_s)


def find_actor(name: str, namespace: str) -> Any:
    """The live actor named ``name`` in ``namespace`` (a detached one that outlived the
    process that created it), or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # no such actor (or it died: Ray frees its name)
        return None


def named_actors(namespace: str) -> list[str]:
    """The names of the live named actors in ``namespace``."""
    return sorted(
        str(a["name"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace
    )


def end_actor(handle: Any, name: str, namespace: str, timeout_s: float = 10.0) -> None:
    """Kill the actor (``ray.kill``) and wait, bounded, until its name is free again."""
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while find_actor(name, namespace) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def init_ray(
    address: str | None = None,
    *,
    stations: Iterable[str] = (),
    local: bool = True,
    num_cpus: int = 2,
    object_store_mb: int = 100,
    token_file: str | Path | None = None,
    **kwargs: Any,
) -> Any:
    """Start or join Ray for a campaign; returns ``ray.init``'s context (or None if already up).

    ``address`` (else ``$RAY_ADDRESS``) joins an existing cluster: each bench PC
    offers its own ``station:<name>`` resource there. Otherwise a local instance
    starts with ``num_cpus``, no dashboard, a small object store and one
    ``station:<name>`` unit per name in ``stations``; ``local=True`` keeps it on
    loopback (every Ray server listens on 127.0.0.1 only).

    Token authentication (Ray's own, ``RAY_AUTH_MODE=token``) is on in both cases;
    ``RAY_AUTH_MODE=disabled`` in the environment is overridden. Anyone who can run
    code in a Ray cluster owns every station in it (``actor.__ray_call__`` runs any
    function inside an actor), and loopback is not private to this process tree:
    every local user can connect to 127.0.0.1 ports, so without a token any account
    on this machine could join a local Ray and drive the instruments (it never leaves
    this machine: nothing beyond loopback reaches it). The token costs nothing
    measurable at start-up (measured: local starts of 9-14 s on a loaded 2-core machine
    either way). docs/cluster.md states the trust model.

    The token is Ray's, from (first found) ``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH``, the file ``token_file`` (lab.yaml ``ray.token_file``),
    ``~/.ray/auth_token``. A local start without any makes a fresh one for this process
    tree (``RAY_AUTH_TOKEN`` in this process's environment, inherited by Ray's processes
    and by whatever this process starts, never written to disk). Joining a cluster
    needs the cluster's token: :class:`RayAuthError` (one line, what to do) when there
    is none, when the file cannot be read, when the cluster refuses it, or when the
    cluster does not ask for one at all (it would let anyone in). Before that, the address is
    probed (:func:`loops.rayprobe.check_ray_address`): :class:`RayUnreachable` when no Ray
    head answers there, :class:`RayTlsError` when it speaks TLS and this process does not
    (``RAY_USE_TLS``), or the other way round, or the TLS handshake fails.

    Sets ``RAY_USAGE_STATS_ENABLED=0`` unless already set. A local start notes Ray's
    processes in this process's run folder (:mod:`loops.runfolder`, when it has one):
    some of them outlive a ``kill -9`` of this process, and the next labbridge start ends
    them.
    """
    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs.setdefault("logging_level", logging.WARNING)  # no INFO lines over the progress bar
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        names = list(stations)
        if names:  # a driver joining a cluster cannot add resources: the bench PCs offer them
            log.info("joining Ray at %s: stations %s must be offered by their nodes", target, names)
        check_ray_address(target)
        source = _use_token(token_file, create=False)
        if _loopback(target):  # a local cluster started by init_ray(local=True): stay on loopback
            _pin_loopback()
            kwargs.setdefault("_node_ip_address", "127.0.0.1")
        check_ray_token(target, source)
        return ray.init(address=target, **kwargs)
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "object_store_memory": object_store_mb * 1024 * 1024,
        "resources": {station_resource(n): 1 for n in stations},
    }
    _use_token(token_file, create=True)
    if local:
        _pin_loopback()
        options["_node_ip_address"] = "127.0.0.1"
    options.update(kwargs)
    context = ray.init(**options)
    note_children()  # a next start ends what outlives this process (a kill -9)
    return context


# ------------------------------------------------------------------ the token
TOKEN_DOC = "docs/cluster.md"


class RayAuthError(ConnectionError):
    """No usable Ray token: none found, its file unreadable, refused by the cluster, or a
    cluster that does not ask for one. The message says what to do."""


def _default_token_path() -> Path:
    """Ray's default token file (``ray get-auth-token --generate`` writes it)."""
    return Path.home() / ".ray" / "auth_token"


def _set_auth_mode(mode: str) -> None:
    """Set ``RAY_AUTH_MODE`` for this process and its children, and make Ray's C++ side
    see it now (it caches the mode and the token; Ray's own ``_enable_token_auth`` does
    the same refresh)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _use_token(token_file: str | Path | None, *, create: bool) -> str:
    """Turn token authentication on and make sure Ray will find a token; where it is from.

    Ray's order: ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, then (labbridge's)
    ``token_file`` (exported as ``RAY_AUTH_TOKEN_PATH``), then ``~/.ray/auth_token``.
    ``create``: with none of them, make a fresh token for this process tree. Raises
    :class:`RayAuthError` for a named file that cannot be read or is empty (Ray would
    abort the process) or, without ``create``, when there is no token at all.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.info("RAY_AUTH_MODE=%s overridden: labbridge runs Ray with token auth", mode)
    if os.environ.get("RAY_AUTH_TOKEN"):
        _set_auth_mode("token")
        return "$RAY_AUTH_TOKEN"
    env_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path: Path | None = None
    if env_path:
        path, named = Path(env_path), f"the token file {env_path} ($RAY_AUTH_TOKEN_PATH)"
    elif token_file is not None:
        path = Path(token_file).expanduser().resolve()
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)  # Ray's own way to name the file
        named = f"the token file {path} (lab.yaml ray.token_file)"
    if path is not None:
        try:
            empty = not path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RayAuthError(
                f"cannot read {named}: {why}: save the cluster's Ray token there "
                f"(print it on the head with ray get-auth-token), see {TOKEN_DOC}"
            ) from None
        if empty:
            raise RayAuthError(
                f"{named} is empty: save the cluster's Ray token there "
                f"(print it on the head with ray get-auth-token), see {TOKEN_DOC}"
            )
        _set_auth_mode("token")
        return named
    default = _default_token_path()
    if default.is_file() and default.stat().st_size > 0:
        _set_auth_mode("token")
        return f"the token file {default} (Ray's default)"
    if not create:
        raise RayAuthError(
            "joining a Ray cluster needs its token and none was found: save it in a file "
            "readable only by you and name that file in lab.yaml ray.token_file or "
            f"$RAY_AUTH_TOKEN_PATH (print it on the head with ray get-auth-token), see {TOKEN_DOC}"
        )
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # Ray's own tokens are this
    _set_auth_mode("token")
    return "a token made for this process tree ($RAY_AUTH_TOKEN)"


def check_ray_token(address: str, source: str) -> None:
    """Raise :class:`RayAuthError` unless the GCS at ``address`` takes this process's token
    and refuses a client without one (a cluster without authentication lets anyone in).

    Two cheap calls (milliseconds) with a cluster ID that cannot match: the GCS checks the
    token before the ID, so ``InvalidAuthToken`` means refused and any other answer means
    the credentials passed. Without this, ``ray.init`` retries a refused token for 20 s and
    ends with a bare ``ConnectionError``. ``auto`` and ``ray://`` addresses are left to Ray.
    Call with token mode on (:func:`_use_token`); it is on again when this returns.
    """
    if "://" in address or ":" not in address:
        return
    passed = _gcs_lets_in(address)
    if isinstance(passed, str):  # it speaks gRPC (TLS or not, as we do) but is no Ray GCS
        raise RayUnreachable(not_ray(address, f"Ray's GCS probe failed: {passed}"))
    if not passed:
        raise RayAuthError(
            f"the Ray cluster at {address} refused the token from {source}: use the cluster's "
            f"token (print it on the head with ray get-auth-token), see {TOKEN_DOC}"
        )
    _set_auth_mode("disabled")
    try:
        open_door = _gcs_lets_in(address)
    finally:
        _set_auth_mode("token")
    if open_door is True:
        raise RayAuthError(
            f"the Ray cluster at {address} does not require a token (anyone who reaches it can "
            "run code on every station): restart its head and nodes with RAY_AUTH_MODE=token "
            f"and a token, see {TOKEN_DOC}"
        )


def _gcs_lets_in(gcs_address: str) -> bool | str:
    """Whether the GCS passes this process's current credentials (see :func:`check_ray_token`);
    why not, as text, when the probe failed for another reason (no GCS answered: bounded,
    about 15 s when nothing answers at all)."""
    from ray._raylet import ClusterID, GcsClient  # type: ignore[attr-defined]

    try:
        client = GcsClient(address=gcs_address, cluster_id=ClusterID.from_random().hex())
        client.internal_kv_get(b"labbridge-auth-probe", None, timeout=5)
    except ray.exceptions.AuthenticationError as exc:  # WrongClusterID comes as one too
        return "InvalidAuthToken" not in str(exc)
    except Exception as exc:  # not about the token (a timeout, ...)
        log.debug("Ray auth probe at %s: %s: %s", gcs_address, type(exc).__name__, exc)
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return True


def _loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _pin_loopback() -> None:
    """Keep every Ray server and this driver on 127.0.0.1.

    Ray 2.60 on Linux turns ``_node_ip_address="127.0.0.1"`` into the host's routable
    IP (and its servers then listen on every interface; a driver joining
    ``127.0.0.1:port`` looks for the GCS at that routable IP and times out) unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0 (read at import into ray_constants; the
    raylet/gcs/workers inherit the env). Measured: with both, every Ray socket
    listens on 127.0.0.1 only and a second driver joins over loopback.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
