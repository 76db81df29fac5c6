"""Hotplate-stirrer over Modbus (RTU 19200 8N1 or TCP), PROTOCOLS.md "Hotplate-stirrer"."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from instruments.declare import ACTUATE, Call, Fault, Param, Set, declare
from instruments.driver import Channel, run_all
from instruments.drivers.registers import RegisterDriver, to_register, to_signed
from instruments.transports.base import Transport

# Holding registers (FC3 read, FC6/FC16 write)
HR_SETPOINT = 0  # 0.1 degC, signed
HR_STIRRER_RPM = 1  # rpm
HR_HEATER_ENABLE = 2  # 0/1
HR_STIRRER_ENABLE = 3  # 0/1
HR_WATCHDOG_S = 4  # s, 0 = off
# Input registers (FC4)
IR_PLATE = 0  # 0.1 degC, signed
IR_LIQUID = 1  # 0.1 degC, signed, 0x8000 = no probe
IR_STIRRER_RPM = 2  # rpm
IR_STATUS = 3  # bits, see STATUS_*
IR_MAX = 4  # 0.1 degC
NO_PROBE = 0x8000
STATUS_HEATING = 1 << 0
STATUS_STIRRING = 1 << 1
STATUS_OVER_TEMPERATURE = 1 << 2
STATUS_PROBE_FAULT = 1 << 3
STATUS_WATCHDOG_TRIPPED = 1 << 4


class Hotplate(RegisterDriver):
    """Hotplate-stirrer on a Modbus register bus (RTU 19200 8N1 or TCP, unit 1 by default).

    Registers (16-bit, big-endian; temperatures in 0.1 degC, signed)::

        holding 0  temperature setpoint   0.1 degC        FC3 read, FC6/FC16 write
        holding 1  stirrer setpoint       rpm
        holding 2  heater enable          0/1
        holding 3  stirrer enable         0/1
        holding 4  watchdog timeout       s, 0 = off: no register write for this long
                                          switches heater and stirrer off (status bit4)
        input 0    plate temperature      0.1 degC        FC4 read
        input 1    liquid temperature     0.1 degC, 0x8000 = no probe
        input 2    stirrer speed          rpm
        input 3    status bits            bit0 heating, bit1 stirring, bit2 over-temperature,
                                          bit3 probe fault, bit4 watchdog tripped
        input 4    device maximum         0.1 degC (340 degC on the bench plate)

    A setpoint above the device maximum is answered with Modbus exception 3,
    an address outside the map with exception 2 (both raise
    ``ModbusExceptionError``); the driver refuses such values before sending
    (``ValueError`` naming the value and the limit).

    Commands target a state: ``set_heater(True, 60.0)`` writes the setpoint
    (FC6 holding 0) then the enable (FC6 holding 2); ``set_state`` writes
    holding 0-3 in one FC16 request. Every write here sets an absolute value,
    so reads and writes are retried (``retry_idempotent``) on a timeout, a
    garbled reply or a lost link. ``read()`` is two multi-register reads
    (FC3 holding 0-4, FC4 input 0-4). ``safe_state()`` writes heater enable 0
    and stirrer enable 0, trying both even if one fails.

    Device faults (``faults``; the station supervisor trips on each, as
    ``<instrument>.<fault>``): ``watchdog-tripped`` (status bit4 while the guard
    commands heating or stirring), ``over-temperature`` (bit2 while it commands
    heating) and ``probe-fault`` (bit3 while it commands heating). The first
    two need ``confirm``: the device clears its bit at the next enable, which
    the guard records at once but a reading shows only afterwards.
    """

    kind: ClassVar[str] = "hotplate"
    #: stirrer speed range accepted by the driver, rpm
    MIN_RPM: ClassVar[int] = 0
    MAX_RPM: ClassVar[int] = 1500
    #: lowest setpoint the driver sends, degC (the plate cannot cool)
    MIN_SETPOINT_C: ClassVar[float] = 0.0
    #: device maximum assumed until ``open()`` reads the real one, degC
    DEFAULT_MAX_C: ClassVar[float] = 340.0
    MAX_WATCHDOG_S: ClassVar[int] = 65535
    safe_state_calls = (Call("set_heater", on=False), Call("set_stirrer", on=False))
    #: the device's setpoint ranges (0.1 degC on the wire), shared by the commands that set them
    SETPOINT: ClassVar[Param] = Param(
        float, "degC", min=MIN_SETPOINT_C, max=DEFAULT_MAX_C, step=0.1
    )
    RPM: ClassVar[Param] = Param(int, "rpm", min=0, max=MAX_RPM)
    faults = {
        "watchdog-tripped": Fault(
            "watchdog_tripped and (heater or stirrer)",
            "the hotplate's own watchdog switched heater and stirrer off (no register write "
            "for its timeout: labbridge stalled or the link dropped) while heating or stirring "
            "was commanded: the liquid's thermal history is no longer what was commanded",
            confirm=True,
        ),
        "over-temperature": Fault(
            "over_temperature and heater",
            "the hotplate's over-temperature cut-out switched heating off while heating was "
            "commanded (the plate went above the device maximum): it no longer heats as told",
            confirm=True,
        ),
        "probe-fault": Fault(
            "probe_fault and heater",
            "the liquid temperature probe is faulty (open or short circuit) while heating: "
            "nobody sees the liquid's temperature",
        ),
    }

    def __init__(
        self,
        transport: Transport,
        *,
        unit: int | None = None,
        timeout: float = 1.0,
        name: str | None = None,
    ) -> None:
        if unit is not None and not 0 <= unit <= 255:
            raise ValueError(f"unit {unit} is outside 0-255")
        super().__init__(transport, unit=unit, timeout=timeout, name=name)
        self.max_c = self.DEFAULT_MAX_C

    # ------------------------------------------------------------------ basics
    @property
    def channels(self) -> Mapping[str, Channel]:
        return {
            "setpoint_c": Channel(
                "setpoint_c",
                "degC",
                "float",
                self.MIN_SETPOINT_C,
                self.max_c,
                doc="plate temperature setpoint",
            ),
            "stirrer_setpoint_rpm": Channel(
                "stirrer_setpoint_rpm",
                "rpm",
                "int",
                self.MIN_RPM,
                self.MAX_RPM,
                doc="stirrer setpoint (holding 1)",
            ),
            "stirrer_rpm": Channel(
                "stirrer_rpm",
                "rpm",
                "int",
                self.MIN_RPM,
                self.MAX_RPM,
                doc="stirrer speed (input 2); commanded: the setpoint while on, 0 off",
            ),
            "heater": Channel(
                "heater",
                "",
                "bool",
                allowed=(False, True),
                doc="heater enable as commanded (read: heater_enabled)",
                readable=False,
            ),
            "stirrer": Channel(
                "stirrer",
                "",
                "bool",
                allowed=(False, True),
                doc="stirrer enable as commanded (read: stirrer_enabled)",
                readable=False,
            ),
            "watchdog_s": Channel(
                "watchdog_s",
                "s",
                "int",
                0,
                self.MAX_WATCHDOG_S,
                doc="device watchdog timeout, 0 = off",
            ),
            "heater_enabled": Channel(
                "heater_enabled", "", "bool", settable=False, doc="heater enable (holding 2)"
            ),
            "stirrer_enabled": Channel(
                "stirrer_enabled", "", "bool", settable=False, doc="stirrer enable (holding 3)"
            ),
            "plate_c": Channel(
                "plate_c", "degC", settable=False, doc="plate temperature (input 0)"
            ),
            "liquid_c": Channel(
                "liquid_c",
                "degC",
                settable=False,
                doc="liquid temperature from the probe (input 1), None without a probe",
            ),
            "heating": Channel("heating", "", "bool", settable=False, doc="status bit0: heating"),
            "stirring": Channel(
                "stirring", "", "bool", settable=False, doc="status bit1: stirring"
            ),
            "over_temperature": Channel(
                "over_temperature",
                "",
                "bool",
                settable=False,
                doc="status bit2: over-temperature trip",
            ),
            "probe_fault": Channel(
                "probe_fault", "", "bool", settable=False, doc="status bit3: probe fault"
            ),
            "watchdog_tripped": Channel(
                "watchdog_tripped",
                "",
                "bool",
                settable=False,
                doc="status bit4: the watchdog switched heater and stirrer off",
            ),
            "max_c": Channel(
                "max_c",
                "degC",
                settable=False,
                doc="device maximum temperature (input 4; 340 for the plate)",
            ),
        }

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["unit"] = self.unit
        out["max_c"] = self.max_c
        return out

    async def open(self) -> None:
        """Open the bus, check the device answers and read its maximum temperature (input 4)."""
        await self.transport.open()
        try:
            (raw_max,) = await self._retry(
                lambda: self.bus.read_input_registers(
                    IR_MAX, 1, unit=self.unit, timeout=self.timeout
                ),
                "read device maximum (input 4)",
            )
        except BaseException:
            await self.transport.close()  # a device that does not answer leaves nothing open
            raise
        self._set_max(raw_max)

    def _set_max(self, raw: int) -> None:
        value = to_signed(raw) / 10.0
        if value > 0:
            self.max_c = value

    # ------------------------------------------------------------------ commands
    @declare(
        ACTUATE,
        on=Param(bool, doc="heater enable"),
        setpoint_c=replace(
            SETPOINT,
            optional=True,
            keeps="setpoint_c",
            fill_when={"on": True},
            need_known=True,
            doc="plate setpoint (0.1 degC on the wire); left out: the known one is re-sent",
        ),
        sets=[Set("heater", arg="on"), Set("setpoint_c", arg="setpoint_c")],
        safer_when={"on": False, "setpoint_c": None},
    )
    async def set_heater(self, on: bool, setpoint_c: float | None = None) -> None:
        """Heater on/off; with ``setpoint_c`` (degC) the setpoint is written first."""
        if setpoint_c is not None:
            raw = self._setpoint_register(setpoint_c)
            await self._write(HR_SETPOINT, raw, f"setpoint {setpoint_c} degC")
        await self._write(HR_HEATER_ENABLE, int(bool(on)), f"heater {'on' if on else 'off'}")

    @declare(
        ACTUATE,
        on=Param(bool, doc="stirrer enable"),
        rpm=replace(
            RPM,
            optional=True,
            keeps="stirrer_setpoint_rpm",
            fill_when={"on": True},
            need_known=True,
            doc="stirrer setpoint; left out: the known one is re-sent",
        ),
        sets=[
            Set("stirrer", arg="on"),
            Set("stirrer_setpoint_rpm", arg="rpm"),
            Set("stirrer_rpm", arg="rpm", when={"on": True}),
            Set("stirrer_rpm", value=0, when={"on": False}),
        ],
        latch_ok_when={"on": False, "rpm": None},
    )
    async def set_stirrer(self, on: bool, rpm: int | None = None) -> None:
        """Stirrer on/off; with ``rpm`` the stirrer setpoint is written first."""
        if rpm is not None:
            raw = self._rpm_register(rpm)
            await self._write(HR_STIRRER_RPM, raw, f"stirrer {rpm} rpm")
        await self._write(HR_STIRRER_ENABLE, int(bool(on)), f"stirrer {'on' if on else 'off'}")

    @declare(
        ACTUATE,
        heater=Param(bool, doc="heater enable"),
        setpoint_c=SETPOINT,
        stirrer=Param(bool, doc="stirrer enable"),
        rpm=RPM,
        sets=[
            Set("heater", arg="heater"),
            Set("setpoint_c", arg="setpoint_c"),
            Set("stirrer", arg="stirrer"),
            Set("stirrer_setpoint_rpm", arg="rpm"),
            Set("stirrer_rpm", arg="rpm", when={"stirrer": True}),
            Set("stirrer_rpm", value=0, when={"stirrer": False}),
        ],
    )
    async def set_state(self, *, heater: bool, setpoint_c: float, stirrer: bool, rpm: int) -> None:
        """Set setpoint, stirrer setpoint, heater and stirrer enable in one FC16 write (holding 0-3)."""
        values = [
            self._setpoint_register(setpoint_c),
            self._rpm_register(rpm),
            int(bool(heater)),
            int(bool(stirrer)),
        ]
        await self._retry(
            lambda: self.bus.write_registers(
                HR_SETPOINT, values, unit=self.unit, timeout=self.timeout
            ),
            f"write holding 0-3 = {values}",
        )

    async def set_watchdog(self, seconds: int) -> None:
        """Device watchdog: heater and stirrer switch off after ``seconds`` without a write (0 = off)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise ValueError(
                f"watchdog {seconds!r} s must be an integer number of seconds (0-{self.MAX_WATCHDOG_S})"
            )
        if not 0 <= seconds <= self.MAX_WATCHDOG_S:
            raise ValueError(f"watchdog {seconds} s is outside 0-{self.MAX_WATCHDOG_S} s")
        await self._write(HR_WATCHDOG_S, seconds, f"watchdog {seconds} s")

    async def read(self) -> dict[str, Any]:
        """Holding 0-4 (FC3) and input 0-4 (FC4), in degC / rpm / s / bool."""
        hold = await self._retry(
            lambda: self.bus.read_holding_registers(
                HR_SETPOINT, 5, unit=self.unit, timeout=self.timeout
            ),
            "read holding 0-4",
        )
        inp = await self._retry(
            lambda: self.bus.read_input_registers(
                IR_PLATE, 5, unit=self.unit, timeout=self.timeout
            ),
            "read input 0-4",
        )
        self._set_max(inp[IR_MAX])
        status = inp[IR_STATUS]
        return {
            "plate_c": to_signed(inp[IR_PLATE]) / 10.0,
            "liquid_c": None if inp[IR_LIQUID] == NO_PROBE else to_signed(inp[IR_LIQUID]) / 10.0,
            "stirrer_rpm": inp[IR_STIRRER_RPM],
            "heating": bool(status & STATUS_HEATING),
            "stirring": bool(status & STATUS_STIRRING),
            "over_temperature": bool(status & STATUS_OVER_TEMPERATURE),
            "probe_fault": bool(status & STATUS_PROBE_FAULT),
            "watchdog_tripped": bool(status & STATUS_WATCHDOG_TRIPPED),
            "setpoint_c": to_signed(hold[HR_SETPOINT]) / 10.0,
            "stirrer_setpoint_rpm": hold[HR_STIRRER_RPM],
            "heater_enabled": bool(hold[HR_HEATER_ENABLE]),
            "stirrer_enabled": bool(hold[HR_STIRRER_ENABLE]),
            "watchdog_s": hold[HR_WATCHDOG_S],
            "max_c": to_signed(inp[IR_MAX]) / 10.0,
        }

    async def safe_state(self) -> None:
        """Heater enable 0 and stirrer enable 0 (each tried even if the other fails); idempotent."""
        await run_all(
            {
                "heater off": lambda: self._write(HR_HEATER_ENABLE, 0, "heater off"),
                "stirrer off": lambda: self._write(HR_STIRRER_ENABLE, 0, "stirrer off"),
            },
            self.name,
        )

    # ------------------------------------------------------------------ helpers
    def _setpoint_register(self, setpoint_c: float) -> int:
        if (
            isinstance(setpoint_c, bool)
            or not isinstance(setpoint_c, int | float)
            or not math.isfinite(setpoint_c)
        ):
            raise ValueError(f"setpoint {setpoint_c!r} degC is not a finite number")
        if setpoint_c > self.max_c:
            raise ValueError(
                f"setpoint {setpoint_c} degC is above the device maximum {self.max_c} degC"
            )
        if setpoint_c < self.MIN_SETPOINT_C:
            raise ValueError(
                f"setpoint {setpoint_c} degC is below the minimum {self.MIN_SETPOINT_C} degC"
            )
        return to_register(round(setpoint_c * 10))

    def _rpm_register(self, rpm: int) -> int:
        if isinstance(rpm, bool) or not isinstance(rpm, int):
            raise ValueError(
                f"stirrer speed {rpm!r} rpm must be an integer ({self.MIN_RPM}-{self.MAX_RPM} rpm)"
            )
        if not self.MIN_RPM <= rpm <= self.MAX_RPM:
            raise ValueError(
                f"stirrer speed {rpm} rpm is outside {self.MIN_RPM}-{self.MAX_RPM} rpm"
            )
        return rpm


__all__ = ["Hotplate"]
