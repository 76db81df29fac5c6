"""Simulated hotplate-stirrer: a real pymodbus 3.16 server (Modbus TCP, or RTU on a pty).

The device side of PROTOCOLS.md "Hotplate-stirrer", with its state in the
shared :class:`~simulators.world.StationWorld`:

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
  ``{"fc": 6, "address": 2, "values": [1]}`` for writes.

The server is pymodbus's own (``ModbusTcpServer`` / ``ModbusSerialServer``
with a :class:`pymodbus.simulator.SimDevice`): the register logic is the
SimDevice ``action`` hook, wire faults use the server's ``trace_pdu`` /
``trace_packet`` hooks. For RTU the server listens on the master side of an
``os.openpty()`` pair through a small asyncio transport (pymodbus would open a
path with pyserial, and a pty master has none); the driver opens the slave,
``/dev/pts/N`` (or the ``link`` symlink if given).

Faults (``world.faults``, device ``"hotplate"``):

``modbus-exception`` ``code=4``   every request is answered with that exception (writes are not applied)
``garbled-bytes``   ``probability=1.0``   replies are corrupted: RTU bad CRC, TCP an invalid function code
``no-reply``                        requests are read (and recorded) but never answered
``dropped-connection``              TCP: every client connection is closed once, on injection
``stuck-heater``                    physics in the world (the heating status bit follows it)

The device watchdog (holding 4) is physics in the world as well. Status bit3
(probe fault) is never set: the world models a missing probe only (input 1 =
0x8000). A pty has no baud rate, so RTU replies come without 19200-baud timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tty
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.world import StationWorld

log = logging.getLogger(__name__)

DEVICE = "hotplate"
NO_PROBE = 0x8000
MAX_RPM = 1500
N_REGISTERS = 5
SUPPORTED_FC = (3, 4, 6, 16)


def _u16(value: float) -> int:
    """A temperature/number as a signed 16-bit register value (rounded, clamped)."""
    return max(-0x8000, min(0x7FFF, round(value))) & 0xFFFF


def _s16(raw: int) -> int:
    return raw - 0x10000 if raw & 0x8000 else raw


class _PtyMasterTransport(asyncio.Transport):
    """An asyncio transport over a pty master fd (the device end of the simulated serial line)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Any, fd: int) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._fd = fd
        self._closed = False
        self._pending = b""

    def setup(self) -> None:
        if self._closed:
            return
        self._loop.add_reader(self._fd, self._read_ready)
        self._protocol.connection_made(self)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: no slave open (we keep one open, so rare)
            log.debug("pty master read: %s", exc)
            return
        if data:
            self._protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or not data:
            return
        self._pending += bytes(data)
        self._flush()

    def _flush(self) -> None:
        while self._pending and not self._closed:
            try:
                n = os.write(self._fd, self._pending)
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._fd, self._write_ready)
                return
            except OSError as exc:
                log.debug("pty master write: %s", exc)
                self._pending = b""
                return
            self._pending = self._pending[n:]

    def _write_ready(self) -> None:
        self._loop.remove_writer(self._fd)
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._pending = b""

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closed

    def get_write_buffer_size(self) -> int:
        return len(self._pending)

    def can_write_eof(self) -> bool:
        return False

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_reading(self) -> bool:
        return not self._closed


class HotplateSim:
    """The hotplate-stirrer's Modbus side on a real pymodbus server. See the module docstring.

    ``HotplateSim(world, mode="tcp"|"rtu", unit=1)``; ``url`` is
    ``modbus-tcp://127.0.0.1:PORT?unit=1`` or
    ``modbus-rtu:///dev/pts/N?baudrate=19200&unit=1`` (``link`` names a
    stable symlink to the pty instead).
    """

    def __init__(
        self,
        world: StationWorld,
        mode: str = "tcp",
        unit: int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        link: str | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in ("tcp", "rtu"):
            raise ValueError(f"mode {mode!r} is not 'tcp' or 'rtu'")
        if not 1 <= unit <= 247:
            raise ValueError(f"unit {unit} is outside 1-247")
        self.world = world
        self.mode = mode
        self.unit = unit
        self.host = host
        self.port = port
        self.link = link
        self._rng = random.Random(seed)
        self._server: ModbusBaseServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._pty_name = ""
        self._pty_transport: _PtyMasterTransport | None = None
        self._listening = False
        self._registered = False

    # ------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if not self._listening:
            raise RuntimeError("HotplateSim is not started")
        if self.mode == "tcp":
            return f"modbus-tcp://{self.host}:{self.port}?unit={self.unit}"
        return f"modbus-rtu://{self.link or self._pty_name}?baudrate=19200&unit={self.unit}"

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
        device = self._device()
        try:
            if self.mode == "tcp":
                self._server = ModbusTcpServer(
                    device,
                    address=(self.host, self.port),
                    trace_pdu=self._trace_pdu,  # type: ignore[arg-type]
                    trace_packet=self._trace_packet,
                )
                await self._server.serve_forever(background=True)
                sockets = self._server.transport.sockets  # type: ignore[attr-defined]
                self.port = int(sockets[0].getsockname()[1])
            else:
                self._open_pty()
                self._server = ModbusSerialServer(
                    device,
                    port=self._pty_name,
                    baudrate=19200,
                    trace_pdu=self._trace_pdu,  # type: ignore[arg-type]
                    trace_packet=self._trace_packet,
                )
                self._server.call_create = self._create_pty_connection
                await self._server.serve_forever(background=True)
        except BaseException:
            await self._teardown()
            raise
        self._listening = True
        log.info("hotplate simulator serving %s", self.url)

    async def stop(self) -> None:
        """Stop serving and release every socket and pty fd (idempotent)."""
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
        if self._pty_transport is not None:
            self._pty_transport.close()
            self._pty_transport = None
        for attr in ("_master_fd", "_slave_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)
        self._remove_link()
        self._pty_name = ""

    async def __aenter__(self) -> HotplateSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- pty
    def _open_pty(self) -> None:
        master, slave = os.openpty()
        self._master_fd, self._slave_fd = master, slave
        tty.setraw(slave)  # no echo, no line discipline: a byte pipe like a serial line
        os.set_blocking(master, False)
        self._pty_name = os.ttyname(slave)
        if self.link:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.link)
            os.symlink(self._pty_name, self.link)

    def _remove_link(self) -> None:
        if self.link and self._pty_name:
            with contextlib.suppress(OSError):
                if os.path.islink(self.link) and os.readlink(self.link) == self._pty_name:
                    os.unlink(self.link)

    async def _create_pty_connection(self) -> tuple[asyncio.Transport, Any]:
        """Replaces pymodbus's serial ``call_create``: serve on the pty master fd."""
        assert self._server is not None and self._loop is not None and self._master_fd is not None
        protocol = self._server.handle_new_connection()
        transport = _PtyMasterTransport(self._loop, protocol, self._master_fd)
        self._pty_transport = transport
        self._loop.call_soon(transport.setup)
        return transport, protocol

    # ------------------------------------------------------------- registers
    def _device(self) -> SimDevice:
        bits = [SimData(0, count=1, values=0, datatype=DataType.BITS)]
        regs = [SimData(0, count=N_REGISTERS, values=0, datatype=DataType.REGISTERS)]
        # id=0: the device answers any unit at this level; other units are filtered in _trace_pdu.
        return SimDevice(
            id=0,
            simdata=(
                list(bits),
                list(bits),
                list(regs),
                [SimData(0, count=N_REGISTERS, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )

    def input_registers(self) -> list[int]:
        """Input registers 0-4 as the device reports them now."""
        w = self.world
        w.advance()
        with w.lock:
            hp = w.hotplate
            heating, _ = w.heater_effective()
            status = 0
            if heating:
                status |= 1 << 0
            if hp.stirrer_rpm >= 5.0:
                status |= 1 << 1
            if hp.over_temperature:
                status |= 1 << 2
            if hp.watchdog_tripped:
                status |= 1 << 4
            return [
                _u16(hp.plate_c * 10),
                _u16(hp.liquid_c * 10) if hp.probe_present else NO_PROBE,
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

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """SimDevice hook, called for every access after pymodbus checked the address range."""
        if function_code not in SUPPORTED_FC:
            return ExcCodes.ILLEGAL_FUNCTION
        if self.world.faults.active("modbus-exception", device=DEVICE) is not None:
            return (
                ExcCodes.DEVICE_FAILURE
            )  # nothing applied; _trace_pdu puts in the configured code
        if set_values is None:  # a read (or pymodbus reading back an FC6 write for its echo)
            fresh = self.input_registers() if function_code == 4 else self.holding_registers()
            for i, value in enumerate(fresh):
                if 0 <= i - start_address < len(registers):
                    registers[i - start_address] = value
            return None
        return self._apply_write(address, [int(v) for v in set_values])

    def _apply_write(self, address: int, values: list[int]) -> ExcCodes | None:
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

    # ----------------------------------------------------------- wire hooks
    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        if sending:
            fault = self.world.faults.active("modbus-exception", device=DEVICE)
            if fault is not None:
                code = int(fault.get("code", 4))
                fc = pdu.function_code & 0x7F
                return ExceptionResponse(
                    fc, code, device_id=pdu.dev_id, transaction=pdu.transaction_id
                )
            return pdu
        fc = pdu.function_code
        data: dict[str, Any] = {"fc": fc, "address": pdu.address}
        if fc in (6, 16, 23):
            data["values"] = [int(v) for v in pdu.registers]
        elif fc in (5, 15):
            data["values"] = [bool(b) for b in pdu.bits]
        else:
            data["count"] = pdu.count
        notes = []
        if pdu.dev_id != self.unit:
            notes.append(f"unit {pdu.dev_id}: not for this device, ignored")
        if self.world.faults.active("no-reply", device=DEVICE) is not None:
            notes.append("no-reply")
        self.world.wire.record(DEVICE, data, "; ".join(notes))
        if notes:
            return None  # pymodbus drops the request: no answer at all
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        fault = self.world.faults.active("garbled-bytes", device=DEVICE)
        if fault is None or self._rng.random() >= float(fault.get("probability", 1.0)):
            return data
        out = bytearray(data)
        if self.mode == "rtu":
            out[-1] ^= 0x5A  # the CRC no longer matches
        else:
            out[7] ^= 0x40  # MBAP intact, the function code is now undefined
        return bytes(out)

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
