"""Colour sensor driver (kind ``color-sensor``): a BLE GATT peripheral.

Needs a GATT transport (``ble://AA:BB:CC:DD:EE:01`` or ``ble://name/LB-COLOR-EE01``);
the driver never imports bleak, it uses the transport's read / write /
subscribe / next_notification.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncGenerator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast, runtime_checkable

from instruments.declare import ACTUATE, READ, SAFER, Call, Param, Set, declare
from instruments.driver import Channel, Driver, retry_idempotent
from instruments.errors import LinkLostError, ProtocolError, TransportTimeout
from instruments.transports.base import Transport

log = logging.getLogger(__name__)

SERVICE_UUID = "6e400001-b5a3-f393-e0a9-e50e24dc0001"
MEASUREMENT_UUID = "6e400002-b5a3-f393-e0a9-e50e24dc0001"
CONTROL_UUID = "6e400003-b5a3-f393-e0a9-e50e24dc0001"
BATTERY_LEVEL_UUID = "00002a19-0000-1000-8000-00805f9b34fb"
MEASUREMENT = struct.Struct("<HHHHHB")
CONTROL = struct.Struct("<BH")
OP_MEASURE_ONCE, OP_START_CONTINUOUS, OP_STOP = 1, 2, 3
STATUS = {0: "ok", 1: "saturated", 2: "dark"}
MIN_INTEGRATION_MS, MAX_INTEGRATION_MS = 1, 65535
#: the integration time a measurement or continuous mode may be given (declared commands)
INTEGRATION = Param(
    int,
    "ms",
    min=MIN_INTEGRATION_MS,
    max=MAX_INTEGRATION_MS,
    optional=True,
    doc="integration time (default: the driver's)",
)


@runtime_checkable
class GattLink(Protocol):
    """What the driver needs from its transport (``BleTransport`` provides it)."""

    url: str

    @property
    def is_open(self) -> bool: ...

    @property
    def services(self) -> Mapping[str, tuple[str, ...]]: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self, uuid: str, *, timeout: float | None = None) -> bytes: ...

    async def write(
        self, uuid: str, data: bytes, response: bool = True, *, timeout: float | None = None
    ) -> None: ...

    async def subscribe(self, uuid: str, *, maxsize: int = 256) -> asyncio.Queue[bytes]: ...

    async def next_notification(
        self, uuid: str, timeout: float | None = None, *, until: asyncio.Event | None = None
    ) -> bytes | None: ...


@dataclass(frozen=True)
class ColorReading:
    """One measurement. Counts are linear in light (0-65535) for ``integration_ms``.

    ``gap``: sequence numbers skipped since the previous reading this driver
    saw (0 = none; lost notifications, not an error). ``rgb``: red, green,
    blue normalised to the white reference (0-1, clipped), None without a
    calibration (:meth:`ColorSensor.calibrate_white`).
    """

    seq: int
    red: int
    green: int
    blue: int
    clear: int
    status: str  # "ok" | "saturated" | "dark"
    integration_ms: int | None = None
    gap: int = 0
    rgb: tuple[float, float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rgb"] = list(self.rgb) if self.rgb is not None else None
        return out


def parse_measurement(
    payload: bytes, device: str = "color-sensor"
) -> tuple[int, int, int, int, int, str]:
    """``<HHHHHB`` -> (seq, red, green, blue, clear, status). Strict: any other length or status raises."""
    if len(payload) != MEASUREMENT.size:
        raise ProtocolError(
            device,
            f"measurement payload is {len(payload)} bytes, expected {MEASUREMENT.size}",
            bytes(payload),
        )
    seq, red, green, blue, clear, status = MEASUREMENT.unpack(payload)
    if status not in STATUS:
        raise ProtocolError(
            device,
            f"measurement status {status} is not 0 (ok), 1 (saturated) or 2 (dark)",
            bytes(payload),
        )
    return seq, red, green, blue, clear, STATUS[status]


class ColorSensor(Driver):
    """BLE colour sensor (PROTOCOLS.md "Colour sensor").

    GATT service ``6e400001-b5a3-f393-e0a9-e50e24dc0001``:

    * measurement ``...0002`` (notify, read): ``<HHHHHB`` little-endian
      sequence, red, green, blue, clear counts, status (0 ok, 1 saturated,
      2 dark);
    * control ``...0003`` (write with response): ``<BH`` opcode, integration
      time in ms -- 1 measure once (one notification), 2 start continuous (a
      notification every integration period), 3 stop;
    * Battery Service ``0x180F`` / level ``0x2A19`` (read): percent.

    :meth:`measure` = write opcode 1, wait for the notification (``timeout`` +
    the integration time); it is a read, so it is retried on a timeout, a
    garbled payload or a lost link (the retry reconnects). Sequence numbers:
    a gap is logged and returned in :attr:`ColorReading.gap`; a notification
    repeating the last sequence number is skipped (BlueZ delivers a read of a
    subscribed characteristic once more as a notification).
    :meth:`readings` iterates over the continuous stream and re-arms it
    (opcode 2) after a reconnect, since the device goes idle when the link
    drops. ``safe_state()`` stops continuous mode.
    """

    kind = "color-sensor"
    safe_state_calls = (Call("stop_continuous"),)

    def __init__(
        self,
        transport: Transport,
        *,
        integration_ms: int = 100,
        timeout: float = 2.0,
        name: str | None = None,
        attempts: int = 3,
    ) -> None:
        if not isinstance(transport, GattLink):
            raise TypeError(
                f"ColorSensor needs a GATT transport (ble://...), got {type(transport).__name__} for {transport.url}"
            )
        super().__init__(transport, name=name)
        self.link = cast(GattLink, transport)
        self.integration_ms = _check_ms(integration_ms)
        self.timeout = timeout
        self.attempts = attempts
        self._queue: asyncio.Queue[bytes] | None = None
        self._lock = asyncio.Lock()
        self._continuous = False
        self._continuous_ms = self.integration_ms
        self._stopped = asyncio.Event()
        self._last_seq: int | None = None
        self._last_ms = self.integration_ms  # integration time of the last command sent
        self._white: tuple[float, float, float, int] | None = None

    # ------------------------------------------------------------- surface
    @property
    def channels(self) -> Mapping[str, Channel]:
        return {
            "integration_ms": Channel(
                "integration_ms",
                "ms",
                "int",
                MIN_INTEGRATION_MS,
                MAX_INTEGRATION_MS,
                doc="sensor integration time",
            ),
            "continuous": Channel(
                "continuous", "", "bool", doc="notify a measurement every integration period"
            ),
            "red": Channel("red", "counts", "int", 0, 65535, settable=False, doc="red counts"),
            "green": Channel(
                "green", "counts", "int", 0, 65535, settable=False, doc="green counts"
            ),
            "blue": Channel("blue", "counts", "int", 0, 65535, settable=False, doc="blue counts"),
            "clear": Channel(
                "clear", "counts", "int", 0, 65535, settable=False, doc="unfiltered counts"
            ),
            "seq": Channel(
                "seq", "", "int", 0, 65535, settable=False, doc="the measurement's sequence number"
            ),
            "status": Channel(
                "status",
                "",
                "enum",
                allowed=("ok", "saturated", "dark"),
                settable=False,
                doc="the measurement's status",
            ),
            "gap": Channel(
                "gap",
                "",
                "int",
                0,
                65535,
                settable=False,
                doc="measurements missed before this one (lost notifications)",
            ),
            "rgb": Channel(
                "rgb",
                "1",
                "list",
                0.0,
                1.0,
                settable=False,
                doc="[red, green, blue] normalised to the white reference, None without one",
            ),
            "battery_percent": Channel(
                "battery_percent", "%", "int", 0, 100, settable=False, doc="battery level"
            ),
        }

    @property
    def continuous(self) -> bool:
        return self._continuous

    @property
    def white(self) -> tuple[float, float, float, int] | None:
        """White reference (red, green, blue counts, integration ms), or None."""
        return self._white

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["service"] = SERVICE_UUID
        out["white_reference"] = list(self._white) if self._white else None
        return out

    async def open(self) -> None:
        """Connect, check the colour-sensor service is there, subscribe to measurements."""
        await self.link.open()
        chars = {c for cs in self.link.services.values() for c in cs}
        if chars and not {MEASUREMENT_UUID, CONTROL_UUID} <= chars:
            raise ProtocolError(
                self.name,
                f"the device at {self.url} has no colour-sensor service {SERVICE_UUID} (measurement + control)",
            )
        await self._subscribed()

    async def close(self) -> None:
        self._continuous = False
        self._stopped.set()
        self._queue = None
        await self.link.close()

    # ------------------------------------------------------------ commands
    @declare(READ, integration_ms=INTEGRATION)
    async def measure(self, integration_ms: int | None = None) -> ColorReading:
        """One measurement (opcode 1 + its notification). While continuous, the next streamed one."""
        ms = _check_ms(integration_ms if integration_ms is not None else self.integration_ms)
        async with self._lock:
            return await retry_idempotent(
                lambda: self._measure_once(ms), attempts=self.attempts, what=f"{self.name}: measure"
            )

    async def _measure_once(self, ms: int) -> ColorReading:
        queue = await self._subscribed()
        if self._continuous:
            ms = self._continuous_ms
        else:
            while not queue.empty():  # stale: earlier stream, or reads echoed by BlueZ
                queue.get_nowait()
            await self.link.write(
                CONTROL_UUID, CONTROL.pack(OP_MEASURE_ONCE, ms), response=True, timeout=self.timeout
            )
            self._last_ms = ms
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout + ms / 1000.0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransportTimeout(
                    self.url, f"no measurement notification within {self.timeout + ms / 1000.0:g} s"
                )
            raw = await self.link.next_notification(MEASUREMENT_UUID, remaining)
            assert raw is not None
            reading = self._reading(raw, ms, skip_repeat=True)
            if reading is not None:
                return reading

    @declare(READ)
    async def latest(self) -> ColorReading:
        """Read the measurement characteristic: the device's most recent measurement."""
        raw = await retry_idempotent(
            lambda: self.link.read(MEASUREMENT_UUID, timeout=self.timeout),
            attempts=self.attempts,
            what=f"{self.name}: read measurement",
        )
        reading = self._reading(raw, self._last_ms, skip_repeat=False)
        assert reading is not None
        return reading

    @declare(
        ACTUATE,
        integration_ms=INTEGRATION,
        sets=[Set("continuous", value=True)],
    )
    async def start_continuous(self, integration_ms: int | None = None) -> None:
        """Continuous mode at ``integration_ms`` (a state: sending it twice is harmless)."""
        ms = _check_ms(integration_ms if integration_ms is not None else self.integration_ms)
        async with self._lock:
            queue = await self._subscribed()
            while not queue.empty():
                queue.get_nowait()
            await retry_idempotent(
                lambda: self.link.write(
                    CONTROL_UUID,
                    CONTROL.pack(OP_START_CONTINUOUS, ms),
                    response=True,
                    timeout=self.timeout,
                ),
                attempts=self.attempts,
                what=f"{self.name}: start continuous",
            )
            self._continuous_ms = self._last_ms = ms
            self._continuous = True
            self._stopped.clear()

    @declare(SAFER, sets=[Set("continuous", value=False)])
    async def stop_continuous(self) -> None:
        """Stop continuous mode (idempotent); a running :meth:`readings` loop ends."""
        self._continuous = False
        self._stopped.set()
        await retry_idempotent(
            lambda: self.link.write(
                CONTROL_UUID,
                CONTROL.pack(OP_STOP, self._continuous_ms),
                response=True,
                timeout=self.timeout,
            ),
            attempts=self.attempts,
            what=f"{self.name}: stop continuous",
        )

    async def readings(self) -> AsyncGenerator[ColorReading, None]:
        """Readings of continuous mode as they are notified; ends after :meth:`stop_continuous`.

        Use ``contextlib.aclosing(sensor.readings())`` to stop iterating early.
        A garbled payload raises :class:`ProtocolError`; a silent sensor
        :class:`TransportTimeout` (after the integration time + ``timeout``).
        """
        if not self._continuous:
            raise RuntimeError(f"{self.name}: call start_continuous() before readings()")
        relinks = 0
        while self._continuous:
            ms = self._continuous_ms
            try:
                raw = await self.link.next_notification(
                    MEASUREMENT_UUID, self.timeout + ms / 1000.0, until=self._stopped
                )
            except LinkLostError as exc:
                if relinks >= self.attempts:
                    raise
                relinks += 1
                log.warning("%s: %s; reconnecting and re-arming continuous mode", self.name, exc)
                await self.link.write(
                    CONTROL_UUID,
                    CONTROL.pack(OP_START_CONTINUOUS, ms),
                    response=True,
                    timeout=self.timeout,
                )
                continue
            if raw is None:  # stopped
                return
            reading = self._reading(raw, ms, skip_repeat=True)
            if reading is not None:
                relinks = 0
                yield reading

    async def battery(self) -> int:
        """Battery level, percent (Battery Service 0x180F / 0x2A19)."""
        raw = await retry_idempotent(
            lambda: self.link.read(BATTERY_LEVEL_UUID, timeout=self.timeout),
            attempts=self.attempts,
            what=f"{self.name}: read battery",
        )
        if len(raw) != 1 or raw[0] > 100:
            raise ProtocolError(self.name, "battery level must be one byte, 0-100 %", bytes(raw))
        return raw[0]

    def calibrate_white(self, reading: ColorReading) -> None:
        """Use ``reading`` (of a white reference) to normalise later readings' ``rgb`` to 0-1."""
        if reading.status != "ok":
            raise ValueError(f"a white reference must be an 'ok' reading, not {reading.status!r}")
        if min(reading.red, reading.green, reading.blue) <= 0:
            raise ValueError("a white reference needs non-zero red, green and blue counts")
        ms = reading.integration_ms or self.integration_ms
        self._white = (float(reading.red), float(reading.green), float(reading.blue), ms)

    async def read(self) -> dict[str, Any]:
        """A fresh measurement plus battery level and mode."""
        out = (await self.measure()).as_dict()
        out["battery_percent"] = await self.battery()
        out["continuous"] = self._continuous
        return out

    async def safe_state(self) -> None:
        """Stop continuous mode. Idempotent; with no link there is no stream to stop."""
        self._continuous = False
        self._stopped.set()
        if not self.link.is_open:
            return
        await self.stop_continuous()

    # ------------------------------------------------------------ internals
    async def _subscribed(self) -> asyncio.Queue[bytes]:
        queue = await self.link.subscribe(MEASUREMENT_UUID)
        self._queue = queue
        return queue

    def _reading(self, raw: bytes, ms: int | None, *, skip_repeat: bool) -> ColorReading | None:
        seq, red, green, blue, clear, status = parse_measurement(raw, self.name)
        last = self._last_seq
        if skip_repeat and last is not None and seq == last:
            log.debug("%s: skipping a repeat of measurement %d", self.name, seq)
            return None
        gap = 0
        if last is not None and seq != last:
            gap = (seq - last - 1) & 0xFFFF
            if gap:
                log.warning("%s: %d measurement(s) missed before sequence %d", self.name, gap, seq)
        self._last_seq = seq
        rgb = None
        if self._white is not None and ms is not None:
            wr, wg, wb, wms = self._white
            scale = wms / ms
            rgb = (_clip(red / wr * scale), _clip(green / wg * scale), _clip(blue / wb * scale))
        return ColorReading(seq, red, green, blue, clear, status, ms, gap, rgb)


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def _check_ms(ms: int) -> int:
    if (
        isinstance(ms, bool)
        or not isinstance(ms, int)
        or not MIN_INTEGRATION_MS <= ms <= MAX_INTEGRATION_MS
    ):
        raise ValueError(
            f"integration time must be an integer {MIN_INTEGRATION_MS}-{MAX_INTEGRATION_MS} ms, got {ms!r}"
        )
    return ms


__all__ = ["ColorReading", "ColorSensor", "GattLink", "parse_measurement"]
