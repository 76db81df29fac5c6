"""Capabilities: what kind of thing a guarded instrument is, as typing Protocols.

Code above ``safety/`` holds :class:`~safety.guard.GuardedInstrument` handles, whose
methods are the commands the instrument's driver declares. A Protocol per kind of
thing says which commands code relies on, so that it type-checks against what it
uses and is told at once, by name, when a bench's instrument cannot do it::

    pump = station.handle_as("acid", Pump, who="optimizer")   # TypeError if it is no pump
    await pump.dispense(0.4, 5.0)                             # mypy knows the signature

:func:`require` checks a handle's declared commands against a Protocol's methods
(at run time, when the handle is asked for); every call still goes through the
guard, so a capability is about types, never about permission.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, cast

__all__ = ["Camera", "HeaterStirrer", "Light", "Pump", "Sensor", "require"]


class Pump(Protocol):
    """Moves liquid: delivers (``dispense``) or draws in (``withdraw``) a volume at a rate."""

    async def dispense(
        self, volume_ml: float, rate_ml_min: float, *, who: str | None = None
    ) -> Any: ...

    async def withdraw(
        self, volume_ml: float, rate_ml_min: float, *, who: str | None = None
    ) -> Any: ...

    async def stop(self, *, clear: bool = False, who: str | None = None) -> Any: ...

    async def wait_until_stopped(
        self, timeout: float = 60.0, poll_interval: float = 0.1, *, who: str | None = None
    ) -> Any: ...

    async def read(self, *, who: str | None = None) -> dict[str, Any]: ...


class HeaterStirrer(Protocol):
    """Heats to a setpoint and stirs at a speed, each switched on and off."""

    async def set_heater(
        self, on: bool, setpoint_c: float | None = None, *, who: str | None = None
    ) -> Any: ...

    async def set_stirrer(
        self, on: bool, rpm: int | None = None, *, who: str | None = None
    ) -> Any: ...

    async def read(self, *, who: str | None = None) -> dict[str, Any]: ...


class Light(Protocol):
    """A light that is switched on at an intensity, or off."""

    async def set_light(
        self, on: bool, intensity: float | None = None, *, who: str | None = None
    ) -> Any: ...


class Sensor(Protocol):
    """Takes one measurement on demand."""

    async def measure(self, *, who: str | None = None) -> Any: ...

    async def read(self, *, who: str | None = None) -> dict[str, Any]: ...


class Camera(Protocol):
    """Captures a frame."""

    async def capture(self, timeout: float | None = None, *, who: str | None = None) -> Any: ...


P = TypeVar("P")


def require(handle: Any, capability: type[P]) -> P:
    """``handle`` typed as ``capability``, if its declared commands cover the Protocol's
    methods; ``TypeError`` naming the instrument and what it lacks otherwise."""
    needs = [n for n in vars(capability) if not n.startswith("_")]
    missing = [n for n in needs if n not in handle.commands]
    if missing:
        raise TypeError(
            f"{handle.name} ({handle.kind}) is not a {capability.__name__}: it declares no "
            f"{', '.join(missing)} (it declares: {', '.join(handle.commands)})"
        )
    return cast(P, handle)
