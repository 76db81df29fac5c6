"""Simulated hotplate-stirrer: a real pymodbus 3.16 server (Modbus TCP, or RTU on a pty).

The device side of PROTOCOLS.md "Hotplate-stirrer", with its state in the
shared world (:class:`~simulators.benchworld.BenchWorld`: either bench):

* every request brings the world up to now (``world.advance()``) and the
  registers it reads are computed from the world (plate and liquid
  temperature, stirrer speed, status bits; holding registers too, since the
  device watchdog may have switched the enables off);
* writes go to ``world.hotplate`` and feed the device watchdog
  (``world.hotplate_write()``); a write of 1 to an enable register re-arms a
  tripped watchdog (and an over-temperature trip once the plate is below the
  maximum);
* exception 3 for a setpoint above the device maximum (340 degC), a stirrer
  setpoint above 1500 rpm or an enable other than 0/1; exception 2 for an
  address outside the map; exception 1 for function codes other than 3, 4,
  6 and 16;
* requests for another unit id are not answered (as on an RS-485 line);
* every received request is recorded in ``world.wire`` under ``"hotplate"``:
  ``{"fc": 3, "address": 0, "count": 5}`` for reads,
  ``{"fc": 6, "address": 2, "values": [1]}`` for writes (the request log and the wire
  faults below are :class:`simulators.rs485.ModbusUnitSim`'s, shared with the pH transmitter).

The server is pymodbus's own (``ModbusTcpServer``, or for RTU the
``ModbusSerialServer`` of a :class:`simulators.rs485.RS485Line`) with a
:class:`pymodbus.simulator.SimDevice`: the register logic is the SimDevice
``action`` hook, wire faults use the server's ``trace_pdu`` / ``trace_packet``
hooks. For RTU the hotplate is a unit of an RS-485 line on a pty: its own line
(19200 baud in the URL), or a shared one (``line=``, e.g. with the buffer
bench's pH transmitter as unit 2); the driver opens the slave, ``/dev/pts/N``
(or the ``link`` symlink if given).

Faults (``world.faults``, device ``"hotplate"``):

``modbus-exception`` ``code=4``   every request is answered with that exception (writes are not applied)
``garbled-bytes``   ``probability=1.0``   replies are corrupted: RTU bad CRC, TCP an invalid function code
``no-reply``                        requests are read (and recorded) but never answered
``dropped-connection``              TCP: every client connection is closed once, on injection
``stuck-heater``                    physics in the world (the heating status bit follows it)
``hotplate-overtemp``               physics in the world: the over-temperature cut-out (status bit2)
``hotplate-probe-fault``            the liquid probe fails: input 1 = 0x8000, status bit3 set

The device watchdog (holding 4) is physics in the world as well. Without the
probe fault, a missing probe reads 0x8000 with bit3 clear. A pty has no baud
rate, so RTU replies come without 19200-baud timing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.benchworld import BenchWorld
from simulators.rs485 import ModbusUnitSim, RS485Line

log = logging.getLogger(__name__)

DEVICE = "hotplate"
NO_PROBE = 0x8000
MAX_RPM = 1500
N_REGISTERS = 5


def _u16(value: float) -> int:
    """A temperature/number as a signed 16-bit register value (rounded, clamped)."""
    return max(-0x8000, min(0x7FFF, round(value))) & 0xFFFF


def _s16(raw: int) -> int:
    return raw - 0x10000 if raw & 0x8000 else raw


class HotplateSim(ModbusUnitSim):
    """The hotplate-stirrer's Modbus side on a real pymodbus server. See the module docstring.

    ``HotplateSim(world, mode="tcp"|"rtu", unit=1)``; ``url`` is
    ``modbus-tcp://127.0.0.1:PORT?unit=1`` or
    ``modbus-rtu:///dev/pts/N?baudrate=19200&unit=1`` (``link`` names a
    stable symlink to the pty instead). With ``line=`` (an
    :class:`~simulators.rs485.RS485Line`) the hotplate joins that shared
    RS-485 line as its ``unit`` instead of having a pty of its own (RTU; the
    line's baud rate); the line starts with its first unit and stops with its
    last.
    """

    def __init__(
        self,
        world: BenchWorld,
        mode: str | None = None,
        unit: int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        link: str | None = None,
        seed: int = 0,
        line: RS485Line | None = None,
    ) -> None:
        mode = mode or ("rtu" if line is not None else "tcp")
        if mode not in ("tcp", "rtu"):
            raise ValueError(f"mode {mode!r} is not 'tcp' or 'rtu'")
        if line is not None and mode != "rtu":
            raise ValueError("a hotplate on an RS-485 line speaks Modbus RTU, not mode='tcp'")
        if line is not None and link is not None:
            raise ValueError(
                "link= names the pty of a hotplate's own line; the shared line has its own"
            )
        super().__init__(world, DEVICE, unit, mode=mode, seed=seed)
        self.host = host
        self.port = port
        self.link = link
        self._server: ModbusBaseServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.line: RS485Line | None = None
        if mode == "rtu":
            self.line = line or RS485Line(world.wire, baudrate=19200, link=link, device=DEVICE)
            self.line.attach(self)
        self._listening = False
        self._registered = False

    # ------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if not self._listening:
            raise RuntimeError("HotplateSim is not started")
        if self.line is not None:
            return self.line.url_for(self.unit)
        return f"modbus-tcp://{self.host}:{self.port}?unit={self.unit}"

    @property
    def running(self) -> bool:
        return self._listening

    async def start(self) -> None:
        """Start serving (idempotent)."""
        if self._listening:
            return
        self._loop = asyncio.get_running_loop()
        if not self._registered:
            self.world.faults.on_inject(self._on_fault)
            self._registered = True
        if self.line is not None:
            await self.line.open()
        else:
            try:
                self._server = ModbusTcpServer(
                    self.sim_device(0),
                    address=(self.host, self.port),
                    trace_pdu=self.trace_pdu,  # type: ignore[arg-type]
                    trace_packet=self.trace_packet,
                )
                await self._server.serve_forever(background=True)
                sockets = self._server.transport.sockets  # type: ignore[attr-defined]
                self.port = int(sockets[0].getsockname()[1])
            except BaseException:
                await self._teardown()
                raise
        self._listening = True
        log.info("hotplate simulator serving %s", self.url)

    async def stop(self) -> None:
        """Stop serving and release every socket and pty fd (idempotent)."""
        if self._listening and self.line is not None:
            await self.line.close()
        self._listening = False
        await self._teardown()

    async def _teardown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            if ModbusBaseServer.active_server is server:
                ModbusBaseServer.active_server = None
            for _ in range(3):  # asyncio closes accepted sockets on the next iterations
                await asyncio.sleep(0)

    async def __aenter__(self) -> HotplateSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------- registers
    def sim_device(self, device_id: int) -> SimDevice:
        """The register map as a pymodbus ``SimDevice`` (TCP: id 0, any unit; other units are
        filtered in :meth:`trace_pdu`)."""
        bits = [SimData(0, count=1, values=0, datatype=DataType.BITS)]
        regs = [SimData(0, count=N_REGISTERS, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(
            id=device_id,
            simdata=(
                list(bits),
                list(bits),
                list(regs),
                [SimData(0, count=N_REGISTERS, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self.action,
        )

    def input_registers(self) -> list[int]:
        """Input registers 0-4 as the device reports them now."""
        w = self.world
        w.advance()
        with w.lock:
            hp = w.hotplate
            heating, _ = w.heater_effective()
            probe_fault = w.faults.get("hotplate-probe-fault") is not None
            status = 0
            if heating:
                status |= 1 << 0
            if hp.stirrer_rpm >= 5.0:
                status |= 1 << 1
            if hp.over_temperature:
                status |= 1 << 2
            if probe_fault:
                status |= 1 << 3
            if hp.watchdog_tripped:
                status |= 1 << 4
            return [
                _u16(hp.plate_c * 10),
                _u16(hp.liquid_c * 10) if hp.probe_present and not probe_fault else NO_PROBE,
                max(0, min(0xFFFF, round(hp.stirrer_rpm))),
                status,
                _u16(hp.max_c * 10),
            ]

    def holding_registers(self) -> list[int]:
        """Holding registers 0-4 as the device reports them now."""
        w = self.world
        w.advance()
        with w.lock:
            hp = w.hotplate
            return [
                _u16(hp.setpoint_c * 10),
                max(0, min(0xFFFF, int(hp.stirrer_setpoint_rpm))),
                int(hp.heater_enabled),
                int(hp.stirrer_enabled),
                max(0, min(0xFFFF, int(hp.watchdog_s))),
            ]

    def write(self, address: int, values: list[int]) -> ExcCodes | None:
        w = self.world
        hp = w.hotplate
        # Check every value first: a rejected FC16 changes nothing.
        for offset, raw in enumerate(values):
            reg = address + offset
            if reg == 0 and _s16(raw) > round(hp.max_c * 10):
                return ExcCodes.ILLEGAL_VALUE
            if reg == 1 and raw > MAX_RPM:
                return ExcCodes.ILLEGAL_VALUE
            if reg in (2, 3) and raw not in (0, 1):
                return ExcCodes.ILLEGAL_VALUE
        w.advance()  # integrate up to now under the old settings
        with w.lock:
            for offset, raw in enumerate(values):
                reg = address + offset
                if reg == 0:
                    hp.setpoint_c = _s16(raw) / 10.0
                elif reg == 1:
                    hp.stirrer_setpoint_rpm = raw
                elif reg == 2:
                    hp.heater_enabled = bool(raw)
                elif reg == 3:
                    hp.stirrer_enabled = bool(raw)
                elif reg == 4:
                    hp.watchdog_s = raw
                if reg in (2, 3) and raw == 1:
                    hp.watchdog_tripped = False
                    if hp.plate_c < hp.max_c:
                        hp.over_temperature = False
            w.hotplate_write()
        return None

    # ----------------------------------------------------------- wire faults
    def _on_fault(self, name: str, params: dict[str, Any]) -> None:
        """Edge-triggered faults (called on the injecting thread)."""
        if name != "dropped-connection" or params.get("device", DEVICE) != DEVICE:
            return
        loop = self._loop
        if loop is None or loop.is_closed() or not self._listening:
            return
        loop.call_soon_threadsafe(self._drop_connections)

    def _drop_connections(self) -> None:
        server = self._server
        if server is None or self.mode != "tcp":
            if self.mode == "rtu":
                log.info("dropped-connection has no meaning on a serial line; ignored")
            return
        handlers = list(server.active_connections.values())
        for handler in handlers:
            handler.close()
        log.info("hotplate simulator dropped %d connection(s)", len(handlers))


__all__ = ["HotplateSim"]
