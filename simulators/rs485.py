"""One simulated RS-485 line: several Modbus RTU units on ONE pty, served by ONE pymodbus server.

On a real RS-485 bus every device sees every frame and only the unit the
request names answers. :class:`RS485Line` reproduces that: it opens one
``os.openpty()`` pair, runs one pymodbus ``ModbusSerialServer`` on the master
side (through :class:`PtyMasterTransport`: pymodbus would open a path with
pyserial, and a pty master has none) with one ``SimDevice`` per attached unit,
and routes pymodbus's ``trace_pdu`` / ``trace_packet`` hooks to the unit a frame
belongs to, so each unit keeps its own wire faults (a garbled reply, silence,
an exception) without touching the others. A request for a unit that is not
on the line gets no answer (recorded in the wire log under the line's
``device`` name with a note).

Units derive from :class:`ModbusUnitSim` (the hotplate, :class:`simulators.hotplate.HotplateSim`,
and the pH transmitter, :class:`simulators.ph_meter.PhTransmitterSim`). Attach
every unit before the line starts; units open and close the line through
:meth:`RS485Line.open` / :meth:`RS485Line.close`, which count their users: the
first ``open`` starts the server, the last ``close`` stops it. The driver opens
the slave end, ``/dev/pts/N`` (or the ``link`` symlink if given):
:meth:`RS485Line.url_for` gives ``modbus-rtu://<path>?baudrate=<baud>&unit=<n>``.
A pty has no baud rate: ``baudrate`` only goes into the URL, replies come
without RTU timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tty
from typing import Any
from urllib.parse import quote

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import SimDevice

from simulators.benchworld import BenchWorld, WireLog

log = logging.getLogger(__name__)


#: the function codes the simulated units answer (read holding/input, write one/several)
SUPPORTED_FC = (3, 4, 6, 16)


class ModbusUnitSim:
    """What every simulated Modbus unit shares: its id, the request log and the wire faults.

    Subclasses (a device) give :meth:`sim_device` (their register map, with
    :meth:`action` as the pymodbus hook) and the registers it reads and writes:
    :meth:`input_registers`, :meth:`holding_registers`, :meth:`write`. Requests are recorded in ``world.wire`` under
    ``device``: ``{"fc": 3, "address": 0, "count": 5}`` for reads,
    ``{"fc": 6, "address": 2, "values": [1]}`` for writes. Faults
    (``world.faults``, matched on ``device=``):

    ``modbus-exception`` ``code=4``   every request is answered with that exception
                                      (the ``action`` hook should apply nothing: :meth:`failing`)
    ``garbled-bytes`` ``probability=1.0``  replies corrupted: RTU a bad CRC, TCP an invalid
                                      function code
    ``no-reply``                      requests are read (and recorded) but never answered
    """

    def __init__(
        self, world: BenchWorld, device: str, unit: int, *, mode: str = "rtu", seed: int = 0
    ) -> None:
        if not 1 <= unit <= 247:
            raise ValueError(f"unit {unit} is outside 1-247")
        self.world = world
        self.device = device
        self.unit = unit
        self.mode = mode
        self._rng = random.Random(seed)

    def sim_device(self, device_id: int) -> SimDevice:
        """The unit's register map as a pymodbus ``SimDevice`` with that id."""
        raise NotImplementedError

    def input_registers(self) -> list[int]:
        """The input registers from address 0, as the device would answer now."""
        raise NotImplementedError

    def holding_registers(self) -> list[int]:
        """The holding registers from address 0, as the device would answer now."""
        raise NotImplementedError

    def write(self, address: int, values: list[int]) -> ExcCodes | None:
        """Apply a write (FC6/FC16) of ``values`` at ``address``; an exception code refuses it."""
        raise NotImplementedError

    async def action(
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
        if self.failing():
            return ExcCodes.DEVICE_FAILURE  # nothing applied; trace_pdu puts in the configured code
        if set_values is None:  # a read (or pymodbus reading back an FC6 write for its echo)
            fresh = self.input_registers() if function_code == 4 else self.holding_registers()
            for i, value in enumerate(fresh):
                if 0 <= i - start_address < len(registers):
                    registers[i - start_address] = value
            return None
        return self.write(address, [int(v) for v in set_values])

    def failing(self) -> bool:
        """Is the ``modbus-exception`` fault active for this unit (apply nothing)?"""
        return self.world.faults.active("modbus-exception", device=self.device) is not None

    def trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        """A request received (recorded; None: stay silent) or a reply about to be sent."""
        faults = self.world.faults
        if sending:
            fault = faults.active("modbus-exception", device=self.device)
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
        if faults.active("no-reply", device=self.device) is not None:
            notes.append("no-reply")
        self.world.wire.record(self.device, data, "; ".join(notes))
        if notes:
            return None  # pymodbus drops the request: no answer at all
        return pdu

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        """A whole frame received or about to be sent (garbled here under the fault)."""
        if not sending:
            return data
        fault = self.world.faults.active("garbled-bytes", device=self.device)
        if fault is None or self._rng.random() >= float(fault.get("probability", 1.0)):
            return data
        out = bytearray(data)
        if self.mode == "rtu":
            out[-1] ^= 0x5A  # the CRC no longer matches
        else:
            out[7] ^= 0x40  # MBAP intact, the function code is now undefined
        return bytes(out)


class PtyMasterTransport(asyncio.Transport):
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


class RS485Line:
    """Several Modbus RTU units on one pty and one pymodbus server. See the module docstring.

    ``wire`` is the world's wire log (requests for absent units are recorded
    there under ``device``); ``baudrate`` goes into the URLs only.
    """

    def __init__(
        self,
        wire: WireLog,
        *,
        baudrate: int = 9600,
        link: str | None = None,
        device: str = "rs485",
    ) -> None:
        if baudrate <= 0:
            raise ValueError(f"baudrate {baudrate} must be positive")
        self.wire = wire
        self.baudrate = baudrate
        self.link = link
        self.device = device
        self._units: dict[int, ModbusUnitSim] = {}
        self._users = 0
        self._server: ModbusBaseServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._pty_name = ""
        self._transport: PtyMasterTransport | None = None

    # ------------------------------------------------------------- units
    def attach(self, unit: ModbusUnitSim) -> None:
        """Put a unit on the line (before it starts); its id must be free and in 1-247."""
        if self._server is not None:
            raise RuntimeError("attach every unit before the RS-485 line starts")
        if not 1 <= unit.unit <= 247:
            raise ValueError(f"unit {unit.unit} is outside 1-247")
        if unit.unit in self._units:
            raise ValueError(f"unit {unit.unit} is already on this RS-485 line")
        self._units[unit.unit] = unit

    @property
    def units(self) -> list[int]:
        return sorted(self._units)

    # --------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def path(self) -> str:
        """The serial port the driver opens (the ``link`` symlink, else ``/dev/pts/N``)."""
        if self._server is None:
            raise RuntimeError("the RS-485 line is not started")
        return self.link or self._pty_name

    def url_for(self, unit: int) -> str:
        """``modbus-rtu://<path>?baudrate=<baud>&unit=<unit>`` for a unit on this line."""
        if unit not in self._units:
            raise ValueError(f"unit {unit} is not on this RS-485 line (units: {self.units})")
        return f"modbus-rtu://{quote(self.path)}?baudrate={self.baudrate}&unit={unit}"

    async def open(self) -> None:
        """A unit starts using the line: the first user starts the server."""
        if self._users == 0:
            await self._start()
        self._users += 1

    async def close(self) -> None:
        """A unit stops using the line: the last user stops the server (extra calls are ignored)."""
        if self._users == 0:
            return
        self._users -= 1
        if self._users == 0:
            await self._teardown()

    async def _start(self) -> None:
        if not self._units:
            raise RuntimeError("no unit is attached to the RS-485 line")
        self._loop = asyncio.get_running_loop()
        devices = [u.sim_device(uid) for uid, u in sorted(self._units.items())]
        try:
            self._open_pty()
            server = ModbusSerialServer(
                devices,
                port=self._pty_name,
                baudrate=self.baudrate,
                trace_pdu=self._trace_pdu,  # type: ignore[arg-type]
                trace_packet=self._trace_packet,
            )
            self._server = server
            server.call_create = self._create_pty_connection
            await server.serve_forever(background=True)
        except BaseException:
            await self._teardown()
            raise
        log.info("RS-485 line %s serving units %s", self._pty_name, self.units)

    async def _teardown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            if ModbusBaseServer.active_server is server:
                ModbusBaseServer.active_server = None
            for _ in range(3):
                await asyncio.sleep(0)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for attr in ("_master_fd", "_slave_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)
        self._remove_link()
        self._pty_name = ""

    def _remove_link(self) -> None:
        if self.link and self._pty_name:
            with contextlib.suppress(OSError):
                if os.path.islink(self.link) and os.readlink(self.link) == self._pty_name:
                    os.unlink(self.link)

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

    async def _create_pty_connection(self) -> tuple[asyncio.Transport, Any]:
        """Replaces pymodbus's serial ``call_create``: serve on the pty master fd."""
        assert self._server is not None and self._loop is not None and self._master_fd is not None
        protocol = self._server.handle_new_connection()
        transport = PtyMasterTransport(self._loop, protocol, self._master_fd)
        self._transport = transport
        self._loop.call_soon(transport.setup)
        return transport, protocol

    # ------------------------------------------------------------ routing
    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        unit = self._units.get(pdu.dev_id)
        if unit is None:
            if not sending:
                self.wire.record(
                    self.device,
                    {"unit": pdu.dev_id, "fc": pdu.function_code},
                    f"unit {pdu.dev_id}: not for this device, ignored",
                )
            return None  # pymodbus drops the request: no unit answers
        return unit.trace_pdu(sending, pdu)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending or not data:
            return data
        unit = self._units.get(data[0])  # an RTU frame starts with the unit id
        return data if unit is None else unit.trace_packet(sending, data)


__all__ = ["ModbusUnitSim", "PtyMasterTransport", "RS485Line"]
