"""The second bench, simulated: buffer formulation with a pH transmitter and an analytical balance.

One :class:`~simulators.buffer_world.BufferWorld` and the device side of each
instrument over its real wire:

=====================  ===========================================  ==========================================
instrument             simulator                                    URL handed back
=====================  ===========================================  ==========================================
pumps acid/base/       one daisy chain on a pty (addresses 0-3)     ``serial://<tmp>/pumps?baudrate=9600``
water/waste
hotplate (unit 1)      one RS-485 line: a pymodbus RTU server on    ``modbus-rtu://<pty>?baudrate=9600&unit=1``
pH transmitter         a pty, both units, each answering only its   ``modbus-rtu://<pty>?baudrate=9600&unit=2``
(unit 2)               own id
balance                MT-SICS on its own pty                       ``serial://<tmp>/balance?baudrate=9600``
=====================  ===========================================  ==========================================

The shared RS-485 line runs at 9600 baud, the pH transmitter's rate
(PROTOCOLS.md): on one bus every unit uses the same rate, so the hotplate is
configured for 9600 here (its own line on the colour bench says 19200). A pty
does not emulate the baud rate; the URL carries it for the driver. No camera,
no BLE, no enclosure: the balance verifies the pumps.
"""

from __future__ import annotations

from simulators.balance import BalanceSim
from simulators.buffer_world import BufferWorld
from simulators.hotplate import HotplateSim
from simulators.ph_meter import PhTransmitterSim
from simulators.pump import PumpChainSim
from simulators.rs485 import RS485Line
from simulators.station import InstrumentSpec, SimulatedStation

PUMP_ADDRESSES = {"acid": 0, "base": 1, "water": 2, "waste": 3}
RS485_BAUDRATE = 9600
HOTPLATE_UNIT = 1
PH_UNIT = 2


class SimulatedBufferBench(SimulatedStation):
    """One simulated buffer-formulation station (see the module docstring)."""

    def __init__(self, world: BufferWorld, *, index: int = 0) -> None:
        super().__init__(world, index=index)
        self.world: BufferWorld = world
        self.pumps = PumpChainSim(world)
        self.rs485 = RS485Line(world.wire, baudrate=RS485_BAUDRATE)
        self.hotplate = HotplateSim(world, unit=HOTPLATE_UNIT, line=self.rs485)
        self.ph = PhTransmitterSim(world, self.rs485, unit=PH_UNIT)
        self.balance = BalanceSim(world)
        self._sims = [self.pumps, self.hotplate, self.ph, self.balance]

    @property
    def urls(self) -> dict[str, str]:
        return {
            "pumps": self.pumps.url,
            "hotplate": self.hotplate.url,
            "ph": self.ph.url,
            "balance": self.balance.url,
        }

    def instruments(self) -> list[InstrumentSpec]:
        specs = [
            InstrumentSpec(fluid, "syringe-pump", self.pumps.url, {"address": addr})
            for fluid, addr in PUMP_ADDRESSES.items()
        ]
        specs += [
            InstrumentSpec("hotplate", "hotplate", self.hotplate.url),
            InstrumentSpec("ph", "ph-meter", self.ph.url),
            InstrumentSpec("balance", "balance", self.balance.url),
        ]
        return specs


__all__ = ["PUMP_ADDRESSES", "SimulatedBufferBench"]
