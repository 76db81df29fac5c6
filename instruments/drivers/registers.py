"""What the Modbus register drivers (hotplate, pH meter) share: the bus they need, 16-bit
register conversions, and :class:`RegisterDriver` (one unit on a bus, a per-request
timeout, idempotent requests retried)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, Protocol, TypeVar, cast

from instruments.driver import Driver, retry_idempotent
from instruments.transports.base import Transport

T = TypeVar("T")


class RegisterBus(Protocol):
    """What the driver needs from its transport (``ModbusTransport`` provides it).

    Declared structurally so this module never imports the Modbus transport
    (and through it pymodbus): the import-linter contracts forbid that.
    """

    url: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def read_holding_registers(
        self,
        address: int,
        count: int = 1,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> list[int]: ...

    async def read_input_registers(
        self,
        address: int,
        count: int = 1,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> list[int]: ...

    async def write_register(
        self,
        address: int,
        value: int,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> None: ...

    async def write_registers(
        self,
        address: int,
        values: Sequence[int],
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> None: ...


BUS_METHODS = (
    "read_holding_registers",
    "read_input_registers",
    "write_register",
    "write_registers",
)


def to_signed(raw: int) -> int:
    """A 16-bit register value read as two's-complement signed."""
    return raw - 0x10000 if raw & 0x8000 else raw


def to_register(value: int) -> int:
    """A signed integer (-32768..32767) as a 16-bit register value."""
    if not -0x8000 <= value <= 0x7FFF:
        raise ValueError(f"{value} does not fit a signed 16-bit register (-32768..32767)")
    return value & 0xFFFF


class RegisterDriver(Driver):
    """A driver of one Modbus unit: ``bus`` (the transport as a :class:`RegisterBus`),
    ``unit``, ``timeout`` per request; :meth:`_retry` retries an idempotent request up to
    ``ATTEMPTS`` times. A subclass checks its own unit range before calling this."""

    ATTEMPTS: ClassVar[int] = 3

    def __init__(
        self, transport: Transport, *, unit: int | None, timeout: float, name: str | None
    ) -> None:
        missing = [m for m in BUS_METHODS if not callable(getattr(transport, m, None))]
        if missing:
            raise TypeError(
                f"{type(self).__name__} needs a Modbus register transport (modbus-tcp:// or "
                f"modbus-rtu://), got {type(transport).__name__} for {transport.url} "
                f"(missing {', '.join(missing)})"
            )
        if not timeout > 0:
            raise ValueError(f"timeout {timeout!r} must be > 0 s")
        super().__init__(transport, name=name)
        self.bus = cast(RegisterBus, transport)
        self.unit = unit
        self.timeout = float(timeout)

    async def _write(self, address: int, value: int, what: str) -> None:
        await self._retry(
            lambda: self.bus.write_register(address, value, unit=self.unit, timeout=self.timeout),
            f"{what} (holding {address} = {value})",
        )

    async def _retry(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        return await retry_idempotent(op, attempts=self.ATTEMPTS, what=f"{self.name}: {what}")


__all__ = ["BUS_METHODS", "RegisterBus", "RegisterDriver", "to_register", "to_signed"]
