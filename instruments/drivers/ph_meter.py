"""pH transmitter over Modbus RTU (RS-485, 9600 8N1, unit 2), PROTOCOLS.md "pH transmitter".

It usually shares its RS-485 line with the hotplate (unit 1): give both the
same ``modbus-rtu://`` device and they share one port
(:mod:`instruments.transports.modbuslink`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from instruments.declare import ACTUATE, READ, Fault, Param, Set, declare
from instruments.driver import Channel
from instruments.drivers.registers import RegisterDriver, to_register, to_signed
from instruments.errors import (
    CalibrationError,
    ModbusExceptionError,
    ProbeNotImmersedError,
    ProtocolError,
)
from instruments.transports.base import Transport

# Input registers (FC4)
IR_PH = 0  # 0.001 pH, unsigned (0-14000)
IR_TEMPERATURE = 1  # 0.1 degC, signed
IR_POTENTIAL = 2  # 0.1 mV, signed
IR_STATUS = 3  # bits, see STATUS_*
# Holding registers (FC3 read, FC6/FC16 write)
HR_COMPENSATION = 0  # 0 manual, 1 automatic
HR_MANUAL_TEMPERATURE = 1  # 0.1 degC, signed
HR_DAMPING = 2  # s, 0-60
HR_CALIBRATE = 10  # a buffer's pH x 1000; reads back 0 when done
STATUS_STABLE = 1 << 0
STATUS_NOT_IMMERSED = 1 << 1
STATUS_OUT_OF_RANGE = 1 << 2
STATUS_CALIBRATION_DUE = 1 << 3
STATUS_CALIBRATING = 1 << 4

#: the calibration buffers the transmitter knows (pH at 25 degC) and the value written for each
BUFFERS: dict[float, int] = {4.01: 4010, 7.00: 7000, 10.01: 10010}
COMPENSATION_MODES: dict[str, int] = {"manual": 0, "automatic": 1}
_MODE_NAMES = {v: k for k, v in COMPENSATION_MODES.items()}


@dataclass(frozen=True)
class PhStatus:
    """The status register (input 3), bit by bit."""

    raw: int
    stable: bool  # bit0: the reading is stable
    not_immersed: bool  # bit1: probe not immersed or open circuit
    out_of_range: bool  # bit2: the value is outside the measuring range (or repeated)
    calibration_due: bool  # bit3
    calibrating: bool  # bit4

    @classmethod
    def of(cls, raw: int) -> PhStatus:
        return cls(
            raw,
            bool(raw & STATUS_STABLE),
            bool(raw & STATUS_NOT_IMMERSED),
            bool(raw & STATUS_OUT_OF_RANGE),
            bool(raw & STATUS_CALIBRATION_DUE),
            bool(raw & STATUS_CALIBRATING),
        )

    def as_dict(self) -> dict[str, bool]:
        return {
            "stable": self.stable,
            "not_immersed": self.not_immersed,
            "out_of_range": self.out_of_range,
            "calibration_due": self.calibration_due,
            "calibrating": self.calibrating,
        }


class PhMeter(RegisterDriver):
    """pH transmitter on a Modbus register bus (RTU 9600 8N1, unit 2 by default).

    ``unit``: the Modbus unit id; left out, the URL's ``unit=`` if it names one, else 2.

    Registers (16-bit, big-endian)::

        input 0     pH                      0.001 pH, unsigned (0-14000)      FC4 read
        input 1     temperature             0.1 degC, signed
        input 2     electrode potential     0.1 mV, signed
        input 3     status bits             bit0 reading stable, bit1 probe not immersed or
                                            open circuit, bit2 out of range, bit3 calibration
                                            due, bit4 calibrating
        holding 0   temperature compensation 0 manual, 1 automatic            FC3 read, FC6/16 write
        holding 1   manual temperature      0.1 degC, signed
        holding 2   damping                 s (0-60): moving average of the reading
        holding 10  calibrate               write 4010, 7000 or 10010 (buffer pH x 1000) with
                                            the probe in that buffer; reads back 0 when done

    :meth:`open` reads the status (input 3) and holding 10, which only a pH
    transmitter has (a wrong unit is a :class:`ProtocolError`).
    :meth:`read` is one FC4 (input 0-3) and one FC3 (holding 0-2). While the
    status says the probe is not immersed (bit1) the device repeats its last
    pH with bit2 set: :meth:`read` raises :class:`ProbeNotImmersedError`
    instead of returning that number; :meth:`status` reads the bits alone and
    never raises for them. Out-of-range values (exception 3) and unknown
    addresses (exception 2) raise ``ModbusExceptionError``; the declared
    ranges refuse them before anything is sent. Every write sets an absolute
    value, so reads and writes are retried on a timeout, a garbled reply or a
    lost link.

    :meth:`calibrate` writes the buffer (holding 10) and polls holding 10
    every ``poll_interval`` s until it reads 0; still busy after ``timeout``
    s raises :class:`CalibrationError`. It refuses to start while the probe
    is not immersed.

    Safe state: none to reach. A transmitter measures; it moves no liquid and
    heats nothing, and none of its settings (compensation, damping) can harm
    the bench, so :meth:`safe_state` sends nothing and ``safe_state_calls``
    is empty. A calibration in progress is not interrupted (the protocol has
    no command for that); its result is checked by the recipe that asked for it.

    Device fault ``not-immersed`` (``faults``): status bit1, whenever it is set. Whether
    the probe *should* be in liquid is the bench's business: a beaker emptied between
    experiments legitimately leaves it in the air, so such a bench's envelope narrows the
    fault to when the beaker must be full (``while:``, docs/safety.md "Device faults").
    """

    kind: ClassVar[str] = "ph-meter"
    faults = {
        "not-immersed": Fault(
            "not_immersed",
            "the pH probe is out of the liquid or its circuit is open (status bit1): no pH "
            "can be measured",
        ),
    }
    DEFAULT_UNIT: ClassVar[int] = 2
    #: manual compensation temperatures the driver sends, degC (the transmitter's
    #: working range; the register itself is signed 0.1 degC)
    MIN_TEMPERATURE_C: ClassVar[float] = -10.0
    MAX_TEMPERATURE_C: ClassVar[float] = 110.0
    MAX_DAMPING_S: ClassVar[int] = 60

    def __init__(
        self,
        transport: Transport,
        *,
        unit: int | None = None,
        timeout: float = 1.0,
        calibration_timeout: float = 120.0,
        poll_interval: float = 0.25,
        name: str | None = None,
    ) -> None:
        if unit is None:  # the URL's unit= if it names one, else the transmitter's default
            named = "unit" in parse_qs(urlsplit(transport.url).query)
            unit = int(getattr(transport, "unit", 0)) if named else self.DEFAULT_UNIT
        if not 1 <= unit <= 247:
            raise ValueError(f"unit {unit} is outside 1-247")
        for label, value in (
            ("calibration_timeout", calibration_timeout),
            ("poll_interval", poll_interval),
        ):
            if not value > 0:
                raise ValueError(f"{label} {value!r} must be > 0 s")
        super().__init__(
            transport, unit=unit, timeout=timeout, name=name or f"ph-meter {unit}@{transport.url}"
        )
        self.calibration_timeout = float(calibration_timeout)
        self.poll_interval = float(poll_interval)

    # ------------------------------------------------------------------ surface
    @property
    def channels(self) -> Mapping[str, Channel]:
        return {
            "compensation": Channel(
                "compensation",
                "",
                "enum",
                allowed=tuple(COMPENSATION_MODES),
                doc="temperature compensation: automatic (probe) or manual",
            ),
            "manual_temperature_c": Channel(
                "manual_temperature_c",
                "degC",
                "float",
                self.MIN_TEMPERATURE_C,
                self.MAX_TEMPERATURE_C,
                doc="temperature used by manual compensation",
            ),
            "damping_s": Channel(
                "damping_s", "s", "int", 0, self.MAX_DAMPING_S, doc="moving average of the reading"
            ),
            "last_buffer_ph": Channel(
                "last_buffer_ph",
                "pH",
                "float",
                allowed=tuple(BUFFERS),
                doc="the buffer of the last calibration point",
                readable=False,
            ),
            "calibration_point": Channel(
                "calibration_point",
                "",
                "bool",
                doc="true only while a calibration command is checked (momentary)",
                readable=False,
            ),
            **{
                f"calibrated_ph{round(b)}": Channel(
                    f"calibrated_ph{round(b)}",
                    "",
                    "bool",
                    doc=f"calibrated at the {b:.2f} buffer by this driver",
                    readable=False,
                )
                for b in BUFFERS
            },
            "ph": Channel(
                "ph",
                "pH",
                "float",
                0.0,
                14.0,
                settable=False,
                doc="pH (input 0); None in the snapshot of a probe not immersed",
            ),
            "temperature_c": Channel(
                "temperature_c", "degC", "float", settable=False, doc="temperature (input 1)"
            ),
            "potential_mv": Channel(
                "potential_mv", "mV", "float", settable=False, doc="electrode potential (input 2)"
            ),
            **{
                name: Channel(name, "", "bool", settable=False, doc=f"status {doc}")
                for name, doc in (
                    ("stable", "bit0: the reading is stable"),
                    ("not_immersed", "bit1: probe not immersed or open circuit"),
                    ("out_of_range", "bit2: outside the measuring range (or repeated)"),
                    ("calibration_due", "bit3: calibration due"),
                    ("calibrating", "bit4: calibrating"),
                )
            },
        }

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["unit"] = self.unit
        out["buffers_ph"] = list(BUFFERS)
        return out

    async def open(self) -> None:
        """Open the bus, check the transmitter answers (status) and is one (it has holding 10).

        Another device at that unit (the hotplate, after a wrong ``unit=``) has no
        holding 10: :class:`ProtocolError` naming the unit.
        """
        await self.transport.open()
        try:
            await self.status()
            try:
                await self._read_calibration()
            except ModbusExceptionError as exc:
                if exc.exception_code != 2:
                    raise
                raise ProtocolError(
                    self.name,
                    f"unit {self.unit} has no holding register 10 (calibrate): it is not a pH "
                    f"transmitter; check unit= in the URL (the pH transmitter is usually unit 2)",
                ) from exc
        except BaseException:
            await self.transport.close()  # a device that does not answer leaves nothing open
            raise

    async def safe_state(self) -> None:
        """Nothing to do: a transmitter has no state that could harm the bench (class docstring)."""

    # ------------------------------------------------------------------ reads
    @declare(READ)
    async def status(self) -> PhStatus:
        """The status bits (input 3); never raises for what they say."""
        (raw,) = await self._retry(
            lambda: self.bus.read_input_registers(
                IR_STATUS, 1, unit=self.unit, timeout=self.timeout
            ),
            "read status (input 3)",
        )
        return PhStatus.of(raw)

    @declare(READ)
    async def read(self) -> dict[str, Any]:
        """pH, temperature (degC), potential (mV), the status bits and the settings.

        Raises :class:`ProbeNotImmersedError` while the probe is not immersed (status bit1);
        its ``reading`` has the rest (``ph`` None, ``not_immersed`` True) for a supervisor.
        """
        inp = await self._retry(
            lambda: self.bus.read_input_registers(IR_PH, 4, unit=self.unit, timeout=self.timeout),
            "read input 0-3",
        )
        status = PhStatus.of(inp[IR_STATUS])
        ph = inp[IR_PH] / 1000.0
        hold = await self._retry(
            lambda: self.bus.read_holding_registers(
                HR_COMPENSATION, 3, unit=self.unit, timeout=self.timeout
            ),
            "read holding 0-2",
        )
        reading = {
            "ph": ph,
            "temperature_c": to_signed(inp[IR_TEMPERATURE]) / 10.0,
            "potential_mv": to_signed(inp[IR_POTENTIAL]) / 10.0,
            **status.as_dict(),
            "compensation": _MODE_NAMES.get(hold[HR_COMPENSATION], f"unknown ({hold[0]})"),
            "manual_temperature_c": to_signed(hold[HR_MANUAL_TEMPERATURE]) / 10.0,
            "damping_s": hold[HR_DAMPING],
        }
        if status.not_immersed:
            error = ProbeNotImmersedError(self.name, last_ph=ph)
            error.reading = {**reading, "ph": None}  # the flags, not the repeated value
            raise error
        return reading

    # ------------------------------------------------------------------ commands
    @declare(
        ACTUATE,
        mode=Param(str, allowed=tuple(COMPENSATION_MODES), doc="automatic (probe) or manual"),
        temperature_c=Param(
            float,
            "degC",
            min=MIN_TEMPERATURE_C,
            max=MAX_TEMPERATURE_C,
            step=0.1,
            optional=True,
            doc="manual compensation temperature (0.1 degC on the wire); left out: unchanged",
        ),
        sets=[Set("compensation", arg="mode"), Set("manual_temperature_c", arg="temperature_c")],
    )
    async def set_compensation(self, mode: str, temperature_c: float | None = None) -> None:
        """Temperature compensation ``"automatic"`` or ``"manual"`` (at ``temperature_c`` degC).

        With a temperature, holding 0-1 are written in one FC16 request; without, holding 0 (FC6).
        """
        if mode not in COMPENSATION_MODES:
            raise ValueError(
                f"compensation mode {mode!r} is not one of {', '.join(COMPENSATION_MODES)}"
            )
        code = COMPENSATION_MODES[mode]
        if temperature_c is None:
            await self._write(HR_COMPENSATION, code, f"compensation {mode}")
            return
        raw = self._temperature_register(temperature_c)
        await self._retry(
            lambda: self.bus.write_registers(
                HR_COMPENSATION, [code, raw], unit=self.unit, timeout=self.timeout
            ),
            f"compensation {mode} at {temperature_c} degC (holding 0-1 = {code}, {raw})",
        )

    @declare(
        ACTUATE,
        seconds=Param(int, "s", min=0, max=MAX_DAMPING_S, doc="moving average of the reading"),
        sets=[Set("damping_s", arg="seconds")],
    )
    async def set_damping(self, seconds: int) -> None:
        """Damping: the reading is a moving average over ``seconds`` (0-60 s; holding 2)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise ValueError(f"damping {seconds!r} s must be an integer 0-{self.MAX_DAMPING_S}")
        if not 0 <= seconds <= self.MAX_DAMPING_S:
            raise ValueError(f"damping {seconds} s is outside 0-{self.MAX_DAMPING_S} s")
        await self._write(HR_DAMPING, seconds, f"damping {seconds} s")

    @declare(
        ACTUATE,
        buffer_ph=Param(float, "pH", allowed=tuple(BUFFERS), doc="the buffer the probe is in"),
        timeout=Param(
            float, "s", above=0, optional=True, doc="wait at most (default: the driver's)"
        ),
        sets=[
            Set("last_buffer_ph", arg="buffer_ph"),
            Set("calibrated_ph4", value=True, when={"buffer_ph": 4.01}),
            Set("calibrated_ph7", value=True, when={"buffer_ph": 7.00}),
            Set("calibrated_ph10", value=True, when={"buffer_ph": 10.01}),
            # true only while a calibrate is checked (not the read's ``calibrating``, the
            # device's bit4): rules about when a point may be taken (no pump running)
            Set("calibration_point", value=True, momentary=True),
        ],
    )
    async def calibrate(self, buffer_ph: float, timeout: float | None = None) -> None:
        """One calibration point with the probe in the buffer ``buffer_ph`` (4.01, 7.00 or 10.01).

        Writes the buffer's pH x 1000 to holding 10, then polls holding 10 until it reads 0.
        Two points (7.00 then 4.01 or 10.01) or three make a calibration.
        """
        code = next((c for b, c in BUFFERS.items() if abs(b - buffer_ph) < 1e-9), None)
        if code is None:
            raise ValueError(
                f"buffer pH {buffer_ph!r} is not one of {', '.join(f'{b:.2f}' for b in BUFFERS)}"
            )
        limit = self.calibration_timeout if timeout is None else float(timeout)
        if not limit > 0:
            raise ValueError(f"calibration timeout {timeout!r} must be > 0 s")
        if (await self.status()).not_immersed:
            raise ProbeNotImmersedError(self.name)
        await self._write(HR_CALIBRATE, code, f"calibrate at pH {buffer_ph:.2f}")
        deadline = time.monotonic() + limit
        while True:
            left = await self._read_calibration()
            if left == 0:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CalibrationError(
                    self.name,
                    f"calibration at pH {buffer_ph:.2f} did not finish within {limit:g} s "
                    f"(holding 10 still reads {left}): check that the probe is in the "
                    f"{buffer_ph:.2f} buffer and the reading settles, then calibrate again",
                    buffer_ph,
                )
            await asyncio.sleep(min(self.poll_interval, remaining))

    # ------------------------------------------------------------------ helpers
    async def _read_calibration(self) -> int:
        """Holding 10: the buffer being calibrated (pH x 1000), 0 when idle."""
        (value,) = await self._retry(
            lambda: self.bus.read_holding_registers(
                HR_CALIBRATE, 1, unit=self.unit, timeout=self.timeout
            ),
            "read calibration (holding 10)",
        )
        return value

    def _temperature_register(self, celsius: float) -> int:
        if isinstance(celsius, bool) or not isinstance(celsius, int | float):
            raise ValueError(f"temperature {celsius!r} degC is not a number")
        if not self.MIN_TEMPERATURE_C <= celsius <= self.MAX_TEMPERATURE_C:
            raise ValueError(
                f"manual temperature {celsius} degC is outside "
                f"{self.MIN_TEMPERATURE_C:g}-{self.MAX_TEMPERATURE_C:g} degC"
            )
        return to_register(round(celsius * 10))


__all__ = ["BUFFERS", "COMPENSATION_MODES", "PhMeter", "PhStatus"]
