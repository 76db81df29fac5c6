"""Simulated pH transmitter: Modbus RTU unit 2 on the buffer bench's shared RS-485 line.

The device side of PROTOCOLS.md "pH transmitter" over a
:class:`~simulators.buffer_world.BufferWorld`, as a unit of an
:class:`~simulators.rs485.RS485Line` (with the hotplate as unit 1 on the same
pty; the line starts with its first unit and stops with its last).

Registers
---------
input 0 pH x1000 (unsigned, 0-14000), 1 temperature x10 degC (signed; the
compensation temperature: measured in automatic, the manual value in manual
mode), 2 electrode potential x10 mV (signed), 3 status (bit0 stable, bit1 probe
not immersed, bit2 out of range, bit3 calibration due, bit4 calibrating);
holding 0 temperature compensation (0 manual, 1 automatic; default 1), 1
manual temperature x10 degC (-10.0 to 130.0; default 25.0), 2 damping s (0-60,
default 0: a time-weighted moving average of the reading over that many
seconds), 10 calibrate (write 4010, 7000 or 10010; reads back the buffer
while calibrating, 0 when done). Exception 3 for a value out of range (and a
calibration value other than the three buffers), exception 6 (busy) for a
calibrate write while a calibration runs, exception 2 for an address outside
the map (3-9, 11-), exception 1 for function codes other than 3, 4, 6, 16.

The transmitter's own calibration
---------------------------------
It converts the electrode's potential ``E`` to pH with its calibration:
``pH = 7 - (E - zero_mv) / (slope x Nernst(T))`` at the compensation
temperature ``T``. Factory calibration: ``zero_mv`` 0, slope 100 % (the
electrode really has +7.5 mV and 98.5 %, see the world: about 0.15 pH off at
pH 4 or 10), and "calibration due" (bit3) set until two different buffers
were calibrated within the last 24 h (simulated). A write of a buffer value
to holding 10 means the operator has put the probe in that buffer (at ambient
temperature, 22 degC; buffer pH taken as nominal at any temperature): for
:data:`CALIBRATION_S` (15 s) bit4 is set and the readings hold their last
value; then the point (the potential the electrode, with its offset and
drift, gives in that buffer) is stored, replacing an earlier point of that
buffer, and the calibration is refitted: one point shifts ``zero_mv`` only,
two or three points give slope and zero by least squares. The probe then goes
back into the beaker and responds from the buffer's potential (tau 10 s).

Reading
-------
Bit0 (stable): over the last 10 s the undamped reading moved less than
0.01 pH (the samples cover the whole window), the probe immersed, not
calibrating. While the probe is not immersed (too little liquid, or the
``probe-out`` fault) bit1 is set and the pH register returns the last value
read while immersed with bit2 set. A pH outside 0-14 is clamped with bit2.
The potential gets 0.03 mV of electrode noise per reading (``world.rng``).
Wire faults (device ``"ph"``): see :class:`~simulators.rs485.ModbusUnitSim`
(``garbled-bytes``, ``no-reply``, ``modbus-exception``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.benchworld import AMBIENT_C
from simulators.buffer_world import BufferWorld
from simulators.phosphate import nernst_mv
from simulators.rs485 import ModbusUnitSim, RS485Line

log = logging.getLogger(__name__)

DEVICE = "ph"
UNIT = 2
BUFFERS = {4010: 4.01, 7000: 7.00, 10010: 10.01}
CALIBRATION_S = 15.0
CALIBRATION_VALID_S = 24 * 3600.0
STABLE_WINDOW_S = 10.0
STABLE_SPAN_PH = 0.01
NOISE_MV = 0.03
MANUAL_T_RANGE = (-100, 1300)  # x10 degC
MAX_DAMPING_S = 60
FACTORY_ZERO_MV = 0.0
FACTORY_SLOPE = 1.0

STATUS_STABLE = 1 << 0
STATUS_NOT_IMMERSED = 1 << 1
STATUS_OUT_OF_RANGE = 1 << 2
STATUS_CAL_DUE = 1 << 3
STATUS_CALIBRATING = 1 << 4


def _s16(raw: int) -> int:
    return raw - 0x10000 if raw & 0x8000 else raw


def _u16(value: float) -> int:
    return max(-0x8000, min(0x7FFF, round(value))) & 0xFFFF


@dataclass
class Calibration:
    """The transmitter's calibration: potential at pH 7 (mV), slope (fraction of Nernst), points."""

    zero_mv: float = FACTORY_ZERO_MV
    slope: float = FACTORY_SLOPE
    # buffer register value -> (potential mV, temperature degC, sim time)
    points: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    two_point_t: float | None = None  # when two buffers were last fitted

    def ph(self, potential_mv: float, temperature_c: float) -> float:
        return 7.0 - (potential_mv - self.zero_mv) / (self.slope * nernst_mv(temperature_c))

    def add_point(self, buffer: int, potential_mv: float, temperature_c: float, t: float) -> None:
        self.points = {b: p for b, p in self.points.items() if t - p[2] <= CALIBRATION_VALID_S}
        self.points[buffer] = (potential_mv, temperature_c, t)
        if len(self.points) == 1:
            # E = zero - slope * N(T) * (pH - 7)  ->  zero
            self.zero_mv = potential_mv + self.slope * nernst_mv(temperature_c) * (
                BUFFERS[buffer] - 7.0
            )
            return
        # least squares of E against x = -N(T) (pH - 7): E = zero + slope * x
        xs = [-nernst_mv(tc) * (BUFFERS[b] - 7.0) for b, (_, tc, _) in self.points.items()]
        es = [e for e, _, _ in self.points.values()]
        n = len(xs)
        mx, me = sum(xs) / n, sum(es) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        sxe = sum((x - mx) * (e - me) for x, e in zip(xs, es, strict=True))
        self.slope = sxe / sxx
        self.zero_mv = me - self.slope * mx
        self.two_point_t = t

    def due(self, now: float) -> bool:
        return self.two_point_t is None or now - self.two_point_t > CALIBRATION_VALID_S


class PhTransmitterSim(ModbusUnitSim):
    """The pH transmitter on an RS-485 line. See the module docstring.

    ``PhTransmitterSim(world, line)`` attaches itself to ``line`` as ``unit``
    (default 2); ``url`` is the line's ``modbus-rtu://...&unit=2``. The
    register logic (:meth:`input_registers`, :meth:`holding_registers`,
    :meth:`write`) can be called without a wire.
    """

    def __init__(
        self, world: BufferWorld, line: RS485Line, unit: int = UNIT, *, seed: int = 0
    ) -> None:
        super().__init__(world, DEVICE, unit, mode="rtu", seed=seed)
        self.buffer_world = world
        self.line = line
        self.compensation = 1
        self.manual_t10 = 250
        self.damping_s = 0
        self.calibration = Calibration()
        self._calibrating: tuple[int, float] | None = None  # (buffer, done at sim time)
        self._last_ph = 7000
        self._listening = False
        line.attach(self)

    # ------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if not self._listening:
            raise RuntimeError("PhTransmitterSim is not started")
        return self.line.url_for(self.unit)

    @property
    def running(self) -> bool:
        return self._listening

    async def start(self) -> None:
        """Start serving (opens the shared line; idempotent)."""
        if self._listening:
            return
        await self.line.open()
        self._listening = True

    async def stop(self) -> None:
        """Stop serving (closes the line when it was the last unit; idempotent)."""
        if self._listening:
            self._listening = False
            await self.line.close()

    # ------------------------------------------------------------- the device
    @property
    def calibrating(self) -> bool:
        self._finish_calibration()
        return self._calibrating is not None

    def _finish_calibration(self) -> None:
        if self._calibrating is None:
            return
        buffer, done_t = self._calibrating
        now = self.world.advance()
        if now < done_t:
            return
        w = self.buffer_world
        potential = w.probe_in_buffer(BUFFERS[buffer], AMBIENT_C)
        t_comp = AMBIENT_C if self.compensation else self.manual_t10 / 10.0
        self.calibration.add_point(buffer, potential, t_comp, now)
        self._calibrating = None
        log.info(
            "pH transmitter calibrated at %.2f: zero %.2f mV, slope %.1f %%",
            BUFFERS[buffer],
            self.calibration.zero_mv,
            100.0 * self.calibration.slope,
        )

    def _t_comp(self, measured_c: float) -> float:
        return measured_c if self.compensation else self.manual_t10 / 10.0

    def input_registers(self) -> list[int]:
        """Input registers 0-3 as the transmitter reports them now."""
        self._finish_calibration()
        w = self.buffer_world
        with w.lock:
            samples = w.probe_samples(max(float(self.damping_s), STABLE_WINDOW_S))
            now = w.sim_time  # the samples' time base (the clock moves on while we compute)
            probe = w.probe
            immersed = probe.immersed
            t_comp = self._t_comp(probe.temperature_c)
            potential = probe.potential_mv + float(w.rng.normal(0.0, NOISE_MV))
        status = 0
        if self.calibration.due(now):
            status |= STATUS_CAL_DUE
        if self._calibrating is not None:
            status |= STATUS_CALIBRATING
        ph_reg = self._last_ph
        if not immersed:
            status |= STATUS_NOT_IMMERSED | STATUS_OUT_OF_RANGE
        elif self._calibrating is None:
            cal = self.calibration
            damped = [s for s in samples if s.t > now - self.damping_s]
            if damped:
                total = sum(s.dt for s in damped)
                ph = sum(
                    cal.ph(s.potential_mv, self._t_comp(s.temperature_c)) * s.dt for s in damped
                )
                ph = ph / total if total > 0 else cal.ph(potential, t_comp)
            else:
                ph = cal.ph(potential, t_comp)
            if not 0.0 <= ph <= 14.0:
                status |= STATUS_OUT_OF_RANGE
            ph_reg = max(0, min(14000, round(ph * 1000.0)))
            self._last_ph = ph_reg
            recent = [s for s in samples if s.t > now - STABLE_WINDOW_S]
            covered = bool(recent) and recent[0].t - recent[0].dt <= now - STABLE_WINDOW_S + 0.5
            values = [cal.ph(s.potential_mv, self._t_comp(s.temperature_c)) for s in recent]
            if (
                covered
                and all(s.immersed for s in recent)
                and max(values) - min(values) < STABLE_SPAN_PH
            ):
                status |= STATUS_STABLE
        return [ph_reg, _u16(t_comp * 10.0), _u16(potential * 10.0), status]

    def holding_registers(self) -> list[int]:
        """Holding registers 0-2 and 10 (as a list of 11: 3-9 are not in the map)."""
        self._finish_calibration()
        cal = self._calibrating[0] if self._calibrating is not None else 0
        regs = [self.compensation, self.manual_t10 & 0xFFFF, self.damping_s] + [0] * 7 + [cal]
        return regs

    def write(self, address: int, values: list[int]) -> ExcCodes | None:
        """Holding-register write(s) from ``address``; an exception code rejects all of them."""
        self._finish_calibration()
        for offset, raw in enumerate(values):
            reg = address + offset
            if reg == 0 and raw not in (0, 1):
                return ExcCodes.ILLEGAL_VALUE
            if reg == 1 and not MANUAL_T_RANGE[0] <= _s16(raw) <= MANUAL_T_RANGE[1]:
                return ExcCodes.ILLEGAL_VALUE
            if reg == 2 and not 0 <= raw <= MAX_DAMPING_S:
                return ExcCodes.ILLEGAL_VALUE
            if reg == 10:
                if raw not in BUFFERS:
                    return ExcCodes.ILLEGAL_VALUE
                if self._calibrating is not None:
                    return ExcCodes.DEVICE_BUSY
            if 3 <= reg <= 9 or reg > 10:
                return ExcCodes.ILLEGAL_ADDRESS
        now = self.world.advance()
        for offset, raw in enumerate(values):
            reg = address + offset
            if reg == 0:
                self.compensation = raw
            elif reg == 1:
                self.manual_t10 = _s16(raw)
            elif reg == 2:
                self.damping_s = raw
            elif reg == 10:
                self._calibrating = (raw, now + CALIBRATION_S)
        return None

    # ------------------------------------------------------------- pymodbus
    def sim_device(self, device_id: int) -> SimDevice:
        bits = [SimData(0, count=1, values=0, datatype=DataType.BITS)]
        return SimDevice(
            id=device_id,
            simdata=(
                list(bits),
                list(bits),
                [
                    SimData(0, count=3, values=0, datatype=DataType.REGISTERS),
                    SimData(10, count=1, values=0, datatype=DataType.REGISTERS),
                ],
                [SimData(0, count=4, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self.action,
        )


__all__ = ["BUFFERS", "Calibration", "PhTransmitterSim"]
