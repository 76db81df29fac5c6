"""The contract every driver follows.

A driver receives an (unopened or open) transport in its constructor and never
opens a port itself. It speaks SI-ish units at its surface (mL, mL/min, °C,
rpm, s) and converts to device units inside. It offers:

* typed async commands that target a state (``set_heater(on=True, setpoint_c=60)``);
* ``await read() -> dict``: a snapshot of its measured values (SI units);
* ``describe() -> dict``: what it is (kind, URL, model, channels with units);
* ``channels``: every channel it has, with units and device limits: each key
  ``read()`` returns (read-only ones ``settable=False``) and each channel its
  commands set (those ``read()`` does not return ``readable=False``: a heater
  enable the guard knows as commanded). ``labbridge check --program`` checks
  the readings a recipe names against them, and :meth:`Driver.reading_problems`
  checks a snapshot against them (the bundled drivers' tests run it against
  their simulators);
* ``await safe_state()``: idempotent, works after a fault (pumps stopped,
  heater and stirrer off, light off); it tries every action and raises only
  after trying all of them. ``safe_state_calls`` says what it amounts to in
  declared commands;
* declarations of every command the safety layer may pass
  (:mod:`instruments.declare`): ``commands`` holds them, checked against the
  methods when the class is created;
* ``faults``: the faults the device reports in its readings (a watchdog or
  cut-out that switched something off, an alarm, a probe out of the liquid),
  each a condition over its own channels (:class:`~instruments.declare.Fault`):
  the station supervisor trips the station on each of them.

A ``read()`` that refuses a value because the device flags it invalid (a pH
probe out of the liquid, an overloaded balance) raises a
:class:`~instruments.errors.DeviceError` whose ``reading`` holds the rest of
the snapshot (the refused values ``None``, the flags that say why), so a
supervisor still sees the flags while a recipe never gets a number that is not
a measurement.

Idempotent operations (reads, setpoint writes) are retried a bounded number of
times on a timeout or a garbled reply with :func:`retry_idempotent`; starting
motion (a pump ``RUN``) never is.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from instruments.declare import READ, Call, CommandSpec, Fault, check_faults, collect, declare
from instruments.errors import LinkLostError, ProtocolError, TransportTimeout
from instruments.transports.base import Transport

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Channel:
    """A settable (or readable) quantity of an instrument.

    ``minimum``/``maximum`` are the *device's* limits; the lab's safety envelope
    (``safety/``) is usually narrower. ``allowed`` lists discrete values.
    ``settable``: a command sets it (False: measured only). ``readable``: ``read()``
    returns it (False: only a command sets it, the guard knows it as commanded, and a
    recipe's ``wait``/``read`` cannot see it).
    """

    name: str
    unit: str
    kind: str = "float"  # float | int | bool | enum | list (of numbers)
    minimum: float | None = None
    maximum: float | None = None
    allowed: tuple[Any, ...] | None = None
    settable: bool = True
    doc: str = ""
    readable: bool = True

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "unit": self.unit,
            "kind": self.kind,
            "settable": self.settable,
            "readable": self.readable,
        }
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.allowed is not None:
            out["allowed"] = list(self.allowed)
        if self.doc:
            out["doc"] = self.doc
        return out


RETRYABLE: tuple[type[BaseException], ...] = (TransportTimeout, ProtocolError, LinkLostError)


async def retry_idempotent(
    op: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    what: str = "operation",
    before_retry: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Run an *idempotent* operation, retrying on timeouts, garbled replies and lost links.

    Never use this for an operation that starts motion or dispensing: a lost
    reply does not mean the command was not executed.
    """
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return await op()
        except RETRYABLE as exc:
            last = exc
            log.warning("%s failed (attempt %d/%d): %s", what, attempt, attempts, exc)
            if attempt < attempts:
                if before_retry is not None:
                    await before_retry()
                await asyncio.sleep(0.01 * attempt)
    assert last is not None
    raise last


class Driver(abc.ABC):
    """Base class of instrument drivers. See the module docstring for the contract."""

    #: registered driver name (``syringe-pump``, ``hotplate``, ...)
    kind: ClassVar[str] = ""
    #: the transport class(es) this driver works over
    transport_types: ClassVar[tuple[type[Transport], ...]] = ()
    #: what ``safe_state()`` does, as calls of declared commands: the safety layer derives
    #: the commanded channels after a safe state from their effects (instruments/declare.py)
    safe_state_calls: ClassVar[tuple[Call, ...]] = ()
    #: every declared command (instruments/declare.py), collected and checked against the
    #: method signatures when the class is created
    commands: ClassVar[Mapping[str, CommandSpec]] = {}
    #: the faults the device reports (instruments/declare.py ``Fault``): name -> condition over
    #: this driver's own channels; the station supervisor trips on each (safety/devicefaults.py)
    faults: ClassVar[Mapping[str, Fault]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.commands = collect(cls, cls.safe_state_calls)
        cls.faults = check_faults(cls.__qualname__, cls.faults)

    def __init__(self, transport: Transport, *, name: str | None = None) -> None:
        if self.transport_types and not isinstance(transport, self.transport_types):
            expected = " or ".join(t.__name__ for t in self.transport_types)
            raise TypeError(
                f"{type(self).__name__} needs a {expected}, got {type(transport).__name__} for {transport.url}"
            )
        self.transport = transport
        self.name = name or f"{self.kind}@{transport.url}"

    @property
    def url(self) -> str:
        return self.transport.url

    @property
    @abc.abstractmethod
    def channels(self) -> Mapping[str, Channel]: ...

    async def open(self) -> None:
        """Open the transport and check the device answers (override to add a handshake)."""
        await self.transport.open()

    async def close(self) -> None:
        """Close the transport (idempotent)."""
        await self.transport.close()

    @declare(READ)
    @abc.abstractmethod
    async def read(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def safe_state(self) -> None: ...

    @declare(READ)
    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "url": self.url,
            "driver": f"{type(self).__module__}.{type(self).__qualname__}",
            "channels": {name: ch.as_dict() for name, ch in self.channels.items()},
            "commands": {name: spec.as_dict() for name, spec in self.commands.items()},
            "faults": {
                name: {"when": f.when, "doc": f.doc, "confirm": f.confirm}
                for name, f in self.faults.items()
            },
        }

    def reading_problems(self, reading: Mapping[str, Any]) -> list[str]:
        """What is wrong with a ``read()`` snapshot against the declared ``channels``: a key
        not declared, a declared ``readable`` channel missing (empty when they agree).
        A driver's tests run this against its simulator, so a key added to ``read()``
        without its declaration fails there, not in a lab's recipe."""
        declared = self.channels
        readable = {n for n, ch in declared.items() if ch.readable}
        out = [
            f"{type(self).__name__}.read() returns {key!r}, which channels does not declare "
            f"(declare it: Channel({key!r}, unit, kind, settable=False, doc=...))"
            for key in sorted(set(reading) - set(declared))
        ]
        out += [
            f"{type(self).__name__}.read() does not return {name!r}, which channels declares "
            f"readable (a channel only a command sets: readable=False)"
            for name in sorted(readable - set(reading))
        ]
        out += [
            f"{type(self).__name__}.read() returns {name!r}, which channels declares readable=False"
            for name in sorted(set(reading) & (set(declared) - readable))
        ]
        return out

    async def __aenter__(self: Any) -> Any:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


async def run_all(actions: Mapping[str, Callable[[], Awaitable[Any]]], device: str) -> None:
    """Run every action (in order), even when some fail; raise afterwards naming all failures.

    Used by ``safe_state()``: a failing "stop pump 1" must not prevent "stop pump 2".
    """
    failures: dict[str, BaseException] = {}
    for label, action in actions.items():
        try:
            await action()
        except Exception as exc:
            failures[label] = exc
            log.error("%s: safe-state action %r failed: %s", device, label, exc)
    if failures:
        detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
        raise SafeStateError(device, failures, detail)


class SafeStateError(Exception):
    """One or more safe-state actions failed (all of them were attempted)."""

    def __init__(self, device: str, failures: dict[str, BaseException], detail: str) -> None:
        super().__init__(f"{device}: safe state incomplete: {detail}")
        self.device = device
        self.failures = failures
