"""Syringe pump driver, NE-1000 family RS-232 ASCII protocol (PROTOCOLS.md "Syringe pumps").

Command ``<address><command>[<parameter>]\\r`` (this driver always sends the
address), reply ``\\x02<address, 2 digits><status>[<data>]\\x03``. Status letters:
``I`` infusing, ``W`` withdrawing, ``S`` stopped, ``P`` paused, ``A`` alarm
(data ``?R`` reset, ``?S`` stalled, ``?T`` safe-mode timeout, ``?E`` comms
error). Error data: ``?`` unrecognised, ``?NA`` not applicable now, ``?OOR``
out of range, ``?COM`` invalid packet, ``?IGN`` ignored.

=======  ================================  ================================
command  parameter                         reply data (query)
=======  ================================  ================================
DIA      mm                                ``14.43``
RAT      number + ``UM``/``MM``/``UH``/``MH``  ``2.500MM``
VOL      number + ``UL``/``ML``            ``0.400ML``
DIR      ``INF``/``WDR``/``REV``           ``INF``
RUN      (start the set volume)
STP      (pause if running; again: clear)
DIS      (dispensed)                       ``I0.400W0.000ML``
CLD      ``INF``/``WDR`` (clear counter)
VER      (firmware)                        ``NE1000V3.934``
=======  ================================  ================================

Numbers carry at most 4 significant digits in 5 characters (``0.400``,
``12.50``, ``1234``); the driver picks the device units that keep the most
precision and refuses values the format cannot carry (``ValueError``, before
anything is sent). Surface units: mL, mL/min, mm.

Several drivers (one per address) may share one serial line (a daisy chain):
every exchange is one :meth:`SerialTransport.transaction` under the line's lock.
Queries, setpoint writes and ``STP`` are retried on timeouts / garbled replies;
``RUN`` (and ``DIR REV``) never are: a lost reply does not mean the pump did
not start, so the caller must query :meth:`SyringePump.status`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar, cast

from instruments.declare import ACTUATE, READ, SAFER, Call, Fault, Flow, Param, Set, declare
from instruments.driver import Channel, Driver, retry_idempotent, run_all
from instruments.drivers.pump_wire import (
    ALARM_CODES,
    COMMAND_RE,
    DIRECTION_NAMES,
    DIRECTIONS,
    DIS_RE,
    ERROR_CODES,
    ETX,
    MAX_RELATIVE_ROUNDING,
    RATE,
    RATE_RE,
    RATE_UNITS,
    REFERENCE_DIAMETER_MM,
    REFERENCE_RATE_RANGE,
    VOLUME,
    VOLUME_RE,
    VOLUME_UNITS,
    ByteLink,
    PumpReply,
    PumpStatus,
    encode_quantity,
    format_number,
    parse_number,
    parse_reply,
)
from instruments.errors import DeviceAlarm, DeviceRejected, ProtocolError, TransportError
from instruments.transports.base import Transport

log = logging.getLogger(__name__)
T = TypeVar("T")


# ---------------------------------------------------------------------- driver
class SyringePump(Driver):
    """One NE-1000 style syringe pump at ``address`` (0-99) on a serial line (see module docstring).

    ``diameter_mm`` is the syringe's inner diameter, set on :meth:`open`;
    ``timeout`` the reply deadline per command (s). Volumes in mL, rates in mL/min.

    Device fault ``alarm`` (``faults``): the pump answers with status ``A`` (``read()``
    reports ``alarmed`` and the code in ``alarm``), at any time, not only while the guard
    believes it flows: a pump may report an alarm once, to the next command, and that
    command is often the supervisor's poll; a stall or a power-cycle reset seen only
    while idle still means the next run would start from lost settings.
    """

    kind: ClassVar[str] = "syringe-pump"
    safe_state_calls = (Call("stop", clear=True),)
    faults = {
        "alarm": Fault(
            "alarmed",
            "the pump reports an alarm and has stopped its motor (stalled, reset by a power "
            "interruption: its settings are lost, or a safe-mode communication fault): what it "
            "delivered is no longer what it was told",
            show=("alarm",),
        ),
    }

    def __init__(
        self,
        transport: Transport,
        *,
        address: int = 0,
        diameter_mm: float = REFERENCE_DIAMETER_MM,
        timeout: float = 1.0,
        name: str | None = None,
    ) -> None:
        if not hasattr(transport, "transaction"):
            raise TypeError(
                f"SyringePump needs a byte-stream transport with transaction() (serial://, socket://), "
                f"got {type(transport).__name__} for {transport.url}"
            )
        if not (isinstance(address, int) and 0 <= address <= 99):
            raise ValueError(f"pump address must be an integer 0-99, got {address!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout!r}")
        if not (math.isfinite(diameter_mm) and diameter_mm > 0):
            raise ValueError(f"diameter_mm must be > 0, got {diameter_mm!r}")
        if (
            abs(float(format_number(diameter_mm)) - diameter_mm) / diameter_mm
            > MAX_RELATIVE_ROUNDING
        ):
            raise ValueError(
                f"diameter {diameter_mm!r} mm cannot be carried by the pump's number format"
            )
        super().__init__(transport, name=name or f"syringe-pump {address}@{transport.url}")
        self.address = address
        self.timeout = float(timeout)
        self._diameter_wanted = float(format_number(diameter_mm))
        self.diameter_mm = self._diameter_wanted
        self.firmware: str | None = None
        self.last_alarm: str | None = None

    @property
    def _link(self) -> ByteLink:
        return cast(ByteLink, self.transport)

    # ------------------------------------------------------------ channels
    @property
    def rate_limits_ml_min(self) -> tuple[float, float]:
        """(min, max) rate of the current syringe, in mL/min (scaled by cross-section area)."""
        scale = (self.diameter_mm / REFERENCE_DIAMETER_MM) ** 2
        return REFERENCE_RATE_RANGE[0] * scale, REFERENCE_RATE_RANGE[1] * scale

    @property
    def channels(self) -> Mapping[str, Channel]:
        low, high = self.rate_limits_ml_min
        return {
            "rate_ml_min": Channel(
                "rate_ml_min", "mL/min", minimum=low, maximum=high, doc="pumping rate"
            ),
            "volume_ml": Channel(
                "volume_ml", "mL", minimum=1e-6, maximum=9999.0, doc="volume of the next run (> 0)"
            ),
            "direction": Channel(
                "direction", "", kind="enum", allowed=("infuse", "withdraw"), doc="direction"
            ),
            "status": Channel(
                "status",
                "",
                kind="enum",
                allowed=tuple(s.value for s in PumpStatus),
                settable=False,
                doc="motion status (the reply's status letter)",
            ),
            "moving": Channel(
                "moving", "", kind="bool", settable=False, doc="infusing or withdrawing"
            ),
            "alarmed": Channel(
                "alarmed", "", kind="bool", settable=False, doc="in alarm (the motor stopped)"
            ),
            "alarm": Channel(
                "alarm",
                "",
                kind="enum",
                allowed=tuple(ALARM_CODES),
                settable=False,
                doc="the alarm's code letter (R reset, S stalled, T/E safe mode), None without",
            ),
            "infused_ml": Channel(
                "infused_ml",
                "mL",
                minimum=0.0,
                settable=False,
                doc="infused since the counter was cleared (DIS)",
            ),
            "withdrawn_ml": Channel(
                "withdrawn_ml",
                "mL",
                minimum=0.0,
                settable=False,
                doc="withdrawn since the counter was cleared (DIS)",
            ),
        }

    # ------------------------------------------------------------ wire
    async def _exchange(self, command: str, param: str = "") -> PumpReply:
        """One command, one reply (no retry). Raises DeviceAlarm / DeviceRejected / ProtocolError."""
        text = f"{self.address}{command}{param}"
        raw = await self._link.transaction(f"{text}\r".encode("ascii"), ETX, timeout=self.timeout)
        reply = parse_reply(raw, address=self.address, device=self.name)
        if reply.alarm is not None:
            self.last_alarm = reply.alarm
            raise DeviceAlarm(self.name, reply.alarm, ALARM_CODES[reply.alarm])
        if reply.error is not None:
            raise DeviceRejected(self.name, text, reply.error, ERROR_CODES[reply.error])
        self.last_alarm = None
        return reply

    async def _idempotent(self, command: str, param: str, parse: Callable[[PumpReply], T]) -> T:
        """Exchange + parse, retried on timeouts, garbled replies and lost links."""

        async def op() -> T:
            return parse(await self._exchange(command, param))

        return await retry_idempotent(op, what=f"{self.name}: {command}{param}")

    def _no_data(self, reply: PumpReply) -> PumpStatus:
        if reply.data:
            raise ProtocolError(self.name, f"unexpected data {reply.data!r} in reply", reply.raw)
        return reply.status

    async def command(self, command: str, param: str = "", *, retry: bool = False) -> PumpReply:
        """Send a raw command (``"RAT"``, ``"2.5MM"``) and return the parsed reply.

        Errors and alarms raise. ``retry=True`` only for idempotent commands.
        """
        if not COMMAND_RE.fullmatch(command):
            raise ValueError(f"command must be 3 upper-case letters, got {command!r}")
        if retry:
            return await self._idempotent(command, param, lambda r: r)
        return await self._exchange(command, param)

    # ------------------------------------------------------------ setpoints
    async def set_diameter(self, mm: float) -> float:
        """Syringe inner diameter (mm); returns the value set. ``?NA`` while running."""
        if not (math.isfinite(mm) and mm > 0):
            raise ValueError(f"diameter must be > 0 mm, got {mm!r}")
        text = format_number(mm)
        if abs(float(text) - mm) / mm > MAX_RELATIVE_ROUNDING:
            raise ValueError(f"diameter {mm!r} mm cannot be carried by the pump's number format")
        await self._idempotent("DIA", text, self._no_data)
        self.diameter_mm = float(text)
        return self.diameter_mm

    async def diameter(self) -> float:
        """The pump's syringe diameter (mm)."""

        def parse(r: PumpReply) -> float:
            return parse_number(r.data, self.name, r.raw)

        self.diameter_mm = await self._idempotent("DIA", "", parse)
        return self.diameter_mm

    async def set_rate(self, ml_min: float) -> float:
        """Pumping rate (mL/min), sent in the units that keep the most precision; returns the rate set.

        The pump answers ``?OOR`` outside its range (:attr:`rate_limits_ml_min`)
        and ``?NA`` while running (both :class:`DeviceRejected`).
        """
        text, unit, sent = encode_quantity(ml_min, RATE_UNITS, "rate (mL/min)")
        await self._idempotent("RAT", text + unit, self._no_data)
        return sent

    async def rate(self) -> float:
        """The set rate, mL/min."""

        def parse(r: PumpReply) -> float:
            m = RATE_RE.fullmatch(r.data)
            if m is None:
                raise ProtocolError(self.name, f"unparsable rate {r.data!r}", r.raw)
            return float(m.group(1)) * RATE_UNITS[m.group(2)]

        return await self._idempotent("RAT", "", parse)

    async def set_volume(self, ml: float) -> float:
        """Volume of the next run (mL, > 0: a volume of 0 means "pump until stopped" on these pumps)."""
        text, unit, sent = encode_quantity(ml, VOLUME_UNITS, "volume (mL)")
        await self._idempotent("VOL", text + unit, self._no_data)
        return sent

    async def volume(self) -> float:
        """The set volume, mL."""

        def parse(r: PumpReply) -> float:
            m = VOLUME_RE.fullmatch(r.data)
            if m is None:
                raise ProtocolError(self.name, f"unparsable volume {r.data!r}", r.raw)
            return float(m.group(1)) * VOLUME_UNITS[m.group(2)]

        return await self._idempotent("VOL", "", parse)

    async def set_direction(self, direction: str) -> None:
        """``"infuse"`` or ``"withdraw"`` (a state, so it is safe to repeat)."""
        code = DIRECTIONS.get(direction)
        if code is None:
            raise ValueError(f"direction must be 'infuse' or 'withdraw', got {direction!r}")
        await self._idempotent("DIR", code, self._no_data)

    async def direction(self) -> str:
        """``"infuse"`` or ``"withdraw"``."""

        def parse(r: PumpReply) -> str:
            if r.data not in DIRECTION_NAMES:
                raise ProtocolError(self.name, f"unparsable direction {r.data!r}", r.raw)
            return DIRECTION_NAMES[r.data]

        return await self._idempotent("DIR", "", parse)

    async def reverse_direction(self) -> str:
        """``DIR REV``: a toggle, so never retried. Returns the new direction."""
        self._no_data(await self._exchange("DIR", "REV"))
        return await self.direction()

    # ------------------------------------------------------------ motion
    async def run(self) -> PumpStatus:
        """``RUN``: start (or resume) pumping the set volume. NEVER retried.

        If the reply is lost or garbled the pump may well be running: the error
        propagates and the caller must query :meth:`status`.
        """
        try:
            reply = await self._exchange("RUN")
        except (ProtocolError, TransportError) as exc:
            exc.add_note(
                f"{self.name}: RUN is not retried; the pump may be running, query status()"
            )
            raise
        return self._no_data(reply)

    @declare(SAFER, clear=Param(bool, optional=True, doc="also clear the paused phase"))
    async def stop(self, *, clear: bool = False) -> PumpStatus:
        """``STP``: stop (a running pump pauses). ``clear=True`` sends a second ``STP`` that
        clears the paused phase, so a later ``RUN`` starts afresh instead of resuming."""
        status = await self._idempotent("STP", "", self._no_data)
        if clear:
            status = await self._idempotent("STP", "", self._no_data)
        return status

    async def _move(self, direction: str, volume_ml: float, rate_ml_min: float) -> PumpStatus:
        vol_text, vol_unit, _ = encode_quantity(volume_ml, VOLUME_UNITS, "volume (mL)")
        rate_text, rate_unit, _ = encode_quantity(rate_ml_min, RATE_UNITS, "rate (mL/min)")
        status = await self.status()
        if status is PumpStatus.ALARM:
            raise DeviceAlarm(
                self.name, self.last_alarm or "?", ALARM_CODES.get(self.last_alarm or "", "alarm")
            )
        if status is PumpStatus.PAUSED:
            await self._idempotent(
                "STP", "", self._no_data
            )  # clear the old phase: RUN must not resume it
        await self._idempotent("RAT", rate_text + rate_unit, self._no_data)  # ?NA if running
        await self._idempotent("VOL", vol_text + vol_unit, self._no_data)
        await self._idempotent("DIR", direction, self._no_data)
        await self._idempotent("CLD", direction, self._no_data)
        return await self.run()

    @declare(
        ACTUATE,
        volume_ml=VOLUME,
        rate_ml_min=RATE,
        sets=[Set("rate_ml_min", arg="rate_ml_min")],
        flow=Flow("out", "volume_ml", "rate_ml_min", progress="progress"),
    )
    async def dispense(self, volume_ml: float, rate_ml_min: float) -> PumpStatus:
        """Infuse ``volume_ml`` at ``rate_ml_min``: sets direction, rate, volume, clears the
        infused counter and runs. Returns when ``RUN`` is acknowledged (see :meth:`wait_until_stopped`)."""
        return await self._move("INF", volume_ml, rate_ml_min)

    @declare(
        ACTUATE,
        volume_ml=VOLUME,
        rate_ml_min=RATE,
        sets=[Set("rate_ml_min", arg="rate_ml_min")],
        flow=Flow("in", "volume_ml", "rate_ml_min", progress="progress"),
    )
    async def withdraw(self, volume_ml: float, rate_ml_min: float) -> PumpStatus:
        """Withdraw ``volume_ml`` at ``rate_ml_min`` (like :meth:`dispense`, direction ``WDR``)."""
        return await self._move("WDR", volume_ml, rate_ml_min)

    # ------------------------------------------------------------ status
    def _parse_dis(self, r: PumpReply) -> tuple[float, float]:
        m = DIS_RE.fullmatch(r.data)
        if m is None:
            raise ProtocolError(self.name, f"unparsable dispensed volumes {r.data!r}", r.raw)
        factor = VOLUME_UNITS[m.group(3)]
        return float(m.group(1)) * factor, float(m.group(2)) * factor

    async def _status_and_dispensed(self) -> tuple[PumpStatus, tuple[float, float] | None]:
        """One ``DIS``: the status letter (alarm included, without raising) and the counters."""

        async def op() -> tuple[PumpStatus, tuple[float, float] | None]:
            try:
                reply = await self._exchange("DIS")
            except DeviceAlarm:
                return PumpStatus.ALARM, None
            return reply.status, self._parse_dis(reply)

        return await retry_idempotent(op, what=f"{self.name}: DIS")

    @declare(READ)
    async def status(self) -> PumpStatus:
        """Infusing / withdrawing / stopped / paused / alarm (:attr:`last_alarm` has the code)."""
        return (await self._status_and_dispensed())[0]

    @declare(READ)
    async def dispensed(self) -> tuple[float, float]:
        """``(infused_ml, withdrawn_ml)`` since the counters were last cleared."""
        return await self._idempotent("DIS", "", self._parse_dis)

    @declare(READ)
    async def progress(self) -> dict[str, Any]:
        """``moving`` (bool; an alarm stops the motor), ``out_ml`` and ``in_ml`` (infused /
        withdrawn since the last move started; None in alarm), from one ``DIS``."""
        status, counters = await self._status_and_dispensed()
        if counters is None:
            return {"moving": False, "out_ml": None, "in_ml": None}
        return {"moving": status.moving, "out_ml": counters[0], "in_ml": counters[1]}

    async def clear_dispensed(self, which: str = "both") -> None:
        """Clear the infused (``"infuse"``), withdrawn (``"withdraw"``) or both counters."""
        if which not in ("infuse", "withdraw", "both"):
            raise ValueError(f"which must be 'infuse', 'withdraw' or 'both', got {which!r}")
        for name, code in DIRECTIONS.items():
            if which in (name, "both"):
                await self._idempotent("CLD", code, self._no_data)

    async def version(self) -> str:
        """Firmware version string (``NE1000V3.934``)."""

        def parse(r: PumpReply) -> str:
            if not r.data:
                raise ProtocolError(self.name, "empty firmware version", r.raw)
            return r.data

        self.firmware = await self._idempotent("VER", "", parse)
        return self.firmware

    @declare(
        READ,
        timeout=Param(float, "s", above=0, optional=True),
        poll_interval=Param(float, "s", above=0, optional=True),
    )
    async def wait_until_stopped(
        self,
        timeout: float = 60.0,
        poll_interval: float = 0.1,
    ) -> PumpStatus:
        """Poll until the pump is stopped or paused (real seconds). Alarm -> :class:`DeviceAlarm`;
        still moving at the deadline -> ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status()
            if status is PumpStatus.ALARM:
                code = self.last_alarm or "?"
                raise DeviceAlarm(self.name, code, ALARM_CODES.get(code, "alarm"))
            if not status.moving:
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: still {status.value} after {timeout:g} s")
            await asyncio.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------ driver contract
    async def open(self) -> None:
        """Open the line, check the pump answers (``VER``) and set the syringe diameter."""
        await self.transport.open()
        try:
            await self.version()
        except DeviceAlarm as exc:
            if exc.code != "R":
                raise
            log.info("%s: pump reports a reset alarm (power cycled); continuing", self.name)
            await self.version()
        if abs(await self.diameter() - self._diameter_wanted) > 1e-9:
            await self.set_diameter(self._diameter_wanted)

    async def read(self) -> dict[str, Any]:
        """status, moving, alarmed, alarm (the alarm's code letter, None without one),
        rate_ml_min, volume_ml, direction, infused_ml, withdrawn_ml (in alarm: values None)."""
        status, counters = await self._status_and_dispensed()
        if status is PumpStatus.ALARM or counters is None:
            return {
                "status": PumpStatus.ALARM.value,
                "moving": False,  # an alarm stops the motor
                "alarmed": True,
                "alarm": self.last_alarm,
                "rate_ml_min": None,
                "volume_ml": None,
                "direction": None,
                "infused_ml": None,
                "withdrawn_ml": None,
            }
        return {
            "status": status.value,
            "moving": status.moving,
            "alarmed": False,
            "alarm": None,
            "rate_ml_min": await self.rate(),
            "volume_ml": await self.volume(),
            "direction": await self.direction(),
            "infused_ml": counters[0],
            "withdrawn_ml": counters[1],
        }

    async def safe_state(self) -> None:
        """``STP`` twice: stop, then clear the paused phase so nothing resumes.

        Idempotent; fine on a stopped pump. A pump in alarm has stopped its motor,
        so an alarm reply counts as stopped.
        """

        def stp(label: str) -> Callable[[], Awaitable[None]]:
            async def action() -> None:
                known = self.last_alarm
                try:
                    await self._idempotent("STP", "", self._no_data)
                except DeviceAlarm as exc:  # once per alarm: a latched station re-asserts this
                    (log.debug if exc.code == known else log.warning)(
                        "%s: %s answered with an alarm (motor stopped): %s", self.name, label, exc
                    )

            return action

        await run_all(
            {"STP (stop)": stp("STP"), "STP (clear paused phase)": stp("second STP")}, self.name
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(
            {
                "model": "NE-1000 family syringe pump",
                "address": self.address,
                "firmware": self.firmware,
                "diameter_mm": self.diameter_mm,
                "rate_limits_ml_min": list(self.rate_limits_ml_min),
            }
        )
        return out


__all__ = [
    "ALARM_CODES",
    "ERROR_CODES",
    "PumpReply",
    "PumpStatus",
    "SyringePump",
    "encode_quantity",
    "format_number",
    "parse_reply",
]
