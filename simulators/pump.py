"""Device side of the syringe-pump daisy chain (PROTOCOLS.md "Syringe pumps") on one pty.

:class:`PumpChainSim` answers for every pump of ``world.pumps`` (bench:
addresses 0-3, fluids red/green/blue/waste) on ONE pty pair, like pumps
chained on one RS-232 line. The driver opens the slave end through a stable
symlink (``<tmp>/pumps``), so ``url`` is ``serial://<tmp>/pumps?baudrate=9600``;
the simulator reads the master end with ``loop.add_reader`` (no thread).
With ``tcp=True`` the same chain is also served as a raw TCP serial device
server at ``tcp_url`` (``socket://127.0.0.1:PORT``).

Protocol: ``<address><command>[<parameter>]\\r`` (spaces allowed, address
omitted = 0, lower case accepted); reply ``\\x02<2-digit address><status>[data]\\x03``.
An unknown address gets no reply (like a real chain). Behaviour:

* ``RAT``/``VOL``/``DIA`` writes while running -> ``?NA``; a rate outside
  0.001-30 mL/min (scaled by (diameter / 14.43 mm)^2) -> ``?OOR``; a number
  with more than 4 significant digits or 5 characters -> ``?OOR``; an
  unparsable parameter or unknown command -> ``?``; undecodable bytes -> ``?COM``;
  ``RUN`` while running -> ``?IGN``.
* ``RUN`` starts the set volume (volume 0: until stopped) or resumes a paused
  run; ``STP`` pauses a running pump, a second ``STP`` clears the phase.
* Motion and delivery are integrated by ``world.advance()`` (clogged pumps
  count what they were asked for; the vial gets less).

Faults read from ``world.faults`` (device name ``pumps``):

``garbled-bytes``       ``probability=1.0``, ``count=N`` (only the next N replies),
                        ``mode="flip"`` (one byte's high bit flipped, never the ETX) or
                        ``"truncate"`` (reply cut before the ETX): the command is executed
``no-reply``            optional ``pump=``: the pump(s) stay silent and do nothing
``dropped-connection``  edge-triggered: the pty master is closed and a fresh pty is
                        created behind the same symlink (TCP clients are disconnected)
``pump-alarm``          ``pump=``, ``code="S"``: the pump stops and answers ``A?<code>``
                        to every command until the fault is cleared; ``on_run=True``: from
                        the first ``RUN`` on (a motor that stalls as it starts)
``clogged-pump``        physics, in the world

Every received line is recorded with ``world.wire.record("pumps", "<line>")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import threading
from typing import Any
from urllib.parse import quote

from simulators.benchworld import BenchWorld, PumpState
from simulators.ptyport import PtyPort

log = logging.getLogger(__name__)

DEVICE = "pumps"
FIRMWARE = "NE1000V3.934"
STX, ETX = b"\x02", b"\x03"
RATE_FACTORS = {"MM": 1.0, "UM": 1e-3, "MH": 1.0 / 60.0, "UH": 1e-3 / 60.0}  # mL/min per unit
VOLUME_FACTORS = {"ML": 1.0, "UL": 1e-3}  # mL per unit
REFERENCE_DIAMETER_MM = 14.43
DIAMETER_RANGE_MM = (0.1, 50.0)
MAX_LINE = 256

_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_LINE_RE = re.compile(r"(\d*)([A-Z]{0,3})(.*)")


class _OutOfRange(Exception):
    pass


def fmt(value: float) -> str | None:
    """At most 4 significant digits in at most 5 characters, or None if impossible."""
    if not math.isfinite(value) or value < 0:
        return None
    for decimals in (3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if len(text) <= (5 if decimals else 4):
            return text
    return None


def parse_number(text: str) -> float | None:
    """A wire number; None if not a number, :class:`_OutOfRange` if longer than the format allows."""
    if not _NUMBER_RE.fullmatch(text):
        return None
    digits = text.replace(".", "").lstrip("0")
    if len(text) > 5 or len(digits) > 4:
        raise _OutOfRange(text)
    return float(text)


class PumpChainSim:
    """A daisy chain of NE-1000 style pumps on one pty (and optionally TCP). See the module docstring."""

    def __init__(
        self, world: BenchWorld, *, tcp: bool = False, seed: int = 0, firmware: str = FIRMWARE
    ) -> None:
        self.world = world
        self.tcp = tcp
        self.firmware = firmware
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._running = False
        self._listening = False
        self._port = PtyPort(DEVICE, self._on_pty_data, prefix="lb-pumps-")
        self._pty_rx = bytearray()
        self._server: asyncio.AbstractServer | None = None
        self._tcp_port: int | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._client_tasks: set[asyncio.Task[Any]] = set()
        self._garble_left: int | None = None
        self.drops = 0

    # ------------------------------------------------------------------ life cycle
    @property
    def link_path(self) -> str:
        if not self._port.is_open:
            raise RuntimeError("PumpChainSim is not started")
        return self._port.link_path

    @property
    def url(self) -> str:
        """``serial://<tmp>/pumps?baudrate=9600`` (stable across dropped connections)."""
        return f"serial://{quote(self.link_path)}?baudrate=9600"

    @property
    def tcp_url(self) -> str:
        """``socket://127.0.0.1:PORT`` when started with ``tcp=True``."""
        if self._tcp_port is None:
            raise RuntimeError("PumpChainSim was not started with tcp=True")
        return f"socket://127.0.0.1:{self._tcp_port}"

    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._running = True
        try:
            self._pty_rx.clear()
            self._port.open()
            if self.tcp:
                self._server = await asyncio.start_server(self._serve_client, "127.0.0.1", 0)
                self._tcp_port = self._server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise
        garble = self.world.faults.active("garbled-bytes", device=DEVICE)
        self._garble_left = garble.get("count") if garble else None
        if not self._listening:
            self.world.faults.on_inject(self._on_fault)
            self._listening = True

    async def stop(self) -> None:
        """Close the pty, the TCP server and its clients, remove the symlink (idempotent)."""
        self._running = False
        self._port.close()
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            for writer in list(self._clients):
                writer.close()
            for task in list(self._client_tasks):
                task.cancel()
            await asyncio.gather(*self._client_tasks, return_exceptions=True)
            await server.wait_closed()
            self._tcp_port = None

    # ------------------------------------------------------------------ pty
    def _on_pty_data(self, data: bytes) -> None:
        for line in _split_lines(self._pty_rx, data):
            reply = self._handle(line)
            if reply is not None:
                self._port.send(reply)

    def write_noise(self, data: bytes) -> None:
        """Put unsolicited bytes on the line (a late reply, line noise), to every client."""
        self._port.send(data)
        for writer in self._clients:
            writer.write(data)

    def drop_connection(self) -> None:
        """Unplug: close the pty master (the driver's port fails with EIO) and create a fresh
        pty behind the same symlink; disconnect TCP clients. Call on the event loop thread."""
        if not self._running:
            return
        self.drops += 1
        self._pty_rx.clear()
        self._port.reopen()
        for writer in list(self._clients):
            writer.transport.abort()

    # ------------------------------------------------------------------ TCP
    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._client_tasks.add(task)
        self._clients.add(writer)
        buf = bytearray()
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                for line in _split_lines(buf, data):
                    reply = self._handle(line)
                    if reply is not None:
                        writer.write(reply)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._client_tasks.discard(task)

    # ------------------------------------------------------------------ faults
    def _on_fault(self, name: str, params: dict[str, Any]) -> None:
        """Edge-triggered faults (called on the injecting thread)."""
        if not self._running or (params.get("device", DEVICE) != DEVICE and name != "pump-alarm"):
            return
        if name == "garbled-bytes":
            self._garble_left = params.get("count")
        elif name == "pump-alarm" and not params.get("on_run"):
            self.world.advance()
            with self.world.lock:
                for pump in self.world.pumps.values():
                    if _targets(params, pump):
                        self._alarm_stop(pump, str(params.get("code", "S")))
        elif name == "dropped-connection":
            loop = self._loop
            if loop is None or loop.is_closed():
                return
            if threading.get_ident() == self._loop_thread:
                self.drop_connection()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.drop_connection)

    def _garble(self, reply: bytes) -> bytes:
        params = self.world.faults.active("garbled-bytes", device=DEVICE)
        if params is None:
            return reply
        if self._garble_left is not None:
            if self._garble_left <= 0:
                return reply
        if self._rng.random() >= float(params.get("probability", 1.0)):
            return reply
        if self._garble_left is not None:
            self._garble_left -= 1
        if params.get("mode", "flip") == "truncate":
            return reply[: max(1, len(reply) - 2)]
        out = bytearray(reply)
        i = self._rng.randrange(
            0, len(out) - 1
        )  # never the ETX: the reader sees a whole, corrupt frame
        out[i] ^= 0x80
        return bytes(out)

    @staticmethod
    def _alarm_stop(pump: PumpState, code: str) -> None:
        pump.alarm = code
        pump.phase = "stopped"
        pump.remaining_ml = 0.0

    # ------------------------------------------------------------------ protocol
    def _handle(self, raw: bytes) -> bytes | None:
        """One received line (without CR) -> the reply frame, or None for silence."""
        text = raw.decode("ascii", "replace").strip()
        if not text:
            return None
        printable = all(0x20 <= b <= 0x7E or b in (0x09, 0x0A) for b in raw)
        if not printable:
            self.world.wire.record(DEVICE, text, "undecodable")
            prefix = re.match(rb"\s*(\d{1,2})(?!\d)", raw)
            address = int(prefix.group(1)) if prefix else 0
            pump = self.world.pumps.get(address)
            if pump is None:
                return None
            return self._garble(self._frame(pump, "?COM"))
        compact = re.sub(r"\s+", "", text).upper()
        m = _LINE_RE.fullmatch(compact)
        assert m is not None  # the pattern matches any string
        addr_text, command, param = m.groups()
        if len(addr_text) > 2:
            self.world.wire.record(DEVICE, text, "bad address")
            return None
        pump = self.world.pumps.get(int(addr_text) if addr_text else 0)
        if pump is None:
            self.world.wire.record(DEVICE, text, "no such address")
            return None
        silent = self.world.faults.active("no-reply", device=DEVICE)
        if silent is not None and _targets(silent, pump):
            self.world.wire.record(DEVICE, text, "no-reply")
            return None
        self.world.wire.record(DEVICE, text)
        self.world.advance()
        with self.world.lock:
            alarm = self.world.faults.active("pump-alarm")
            if alarm is not None and _targets(alarm, pump):
                if not alarm.get("on_run") or command == "RUN" or pump.alarm:
                    code = pump.alarm or str(alarm.get("code", "S"))
                    self._alarm_stop(pump, code)
                    return self._garble(self._frame(pump, "?" + code))
            pump.alarm = None
            data = self._execute(pump, command, param)
            return self._garble(self._frame(pump, data))

    def _frame(self, pump: PumpState, data: str) -> bytes:
        if pump.alarm:
            status = "A"
        elif pump.phase == "running":
            status = "I" if pump.direction == "INF" else "W"
        elif pump.phase == "paused":
            status = "P"
        else:
            status = "S"
        return STX + f"{pump.address:02d}{status}{data}".encode("ascii") + ETX

    def _execute(self, pump: PumpState, command: str, param: str) -> str:
        """Run one command on ``pump`` (world lock held); returns the reply data."""
        running = pump.phase == "running"
        try:
            if command == "":
                return "" if not param else "?"
            if command == "VER":
                return self.firmware if not param else "?"
            if command == "DIA":
                if not param:
                    return fmt(pump.diameter_mm) or "?"
                value = parse_number(param)
                if value is None:
                    return "?"
                if running:
                    return "?NA"
                if not DIAMETER_RANGE_MM[0] <= value <= DIAMETER_RANGE_MM[1]:
                    return "?OOR"
                pump.diameter_mm = value
                return ""
            if command == "RAT":
                if not param:
                    return self._rate_text(pump)
                m = re.fullmatch(r"([0-9.]+)(UM|MM|UH|MH)?", param)
                value = parse_number(m.group(1)) if m else None
                if m is None or value is None:
                    return "?"
                if running:
                    return "?NA"
                units = m.group(2) or pump.rate_units
                ml_min = value * RATE_FACTORS[units]
                low, high = self.rate_limits(pump)
                if not low * (1 - 1e-9) <= ml_min <= high * (1 + 1e-9):
                    return "?OOR"
                pump.rate_ml_min, pump.rate_units = ml_min, units
                return ""
            if command == "VOL":
                if not param:
                    return self._volume_text(pump)
                if param in VOLUME_FACTORS:
                    pump.volume_units = param
                    return ""
                m = re.fullmatch(r"([0-9.]+)(UL|ML)?", param)
                value = parse_number(m.group(1)) if m else None
                if m is None or value is None:
                    return "?"
                if running:
                    return "?NA"
                units = m.group(2) or pump.volume_units
                pump.volume_ml, pump.volume_units = value * VOLUME_FACTORS[units], units
                return ""
            if command == "DIR":
                if not param:
                    return pump.direction
                if param == "REV":
                    pump.direction = "WDR" if pump.direction == "INF" else "INF"
                elif param in ("INF", "WDR"):
                    pump.direction = param
                else:
                    return "?"
                return ""
            if command == "RUN":
                if param:
                    return "?"
                if running:
                    return "?IGN"
                if pump.phase == "stopped":
                    pump.remaining_ml = pump.volume_ml if pump.volume_ml > 0 else math.inf
                pump.phase = "running"
                return ""
            if command == "STP":
                if param:
                    return "?"
                if running:
                    pump.phase = "paused"
                elif pump.phase == "paused":
                    pump.phase = "stopped"
                    pump.remaining_ml = 0.0
                return ""
            if command == "DIS":
                if param:
                    return "?"
                return self._dispensed_text(pump)
            if command == "CLD":
                if param == "INF":
                    pump.dispensed_inf_ml = 0.0
                elif param == "WDR":
                    pump.dispensed_wdr_ml = 0.0
                else:
                    return "?"
                return ""
        except _OutOfRange:
            return "?OOR"
        return "?"

    @staticmethod
    def rate_limits(pump: PumpState) -> tuple[float, float]:
        """(min, max) mL/min for the pump's syringe: bench limits scaled by cross-section."""
        scale = (pump.diameter_mm / REFERENCE_DIAMETER_MM) ** 2
        return PumpState.MIN_RATE * scale, PumpState.MAX_RATE * scale

    @staticmethod
    def _rate_text(pump: PumpState) -> str:
        for units in (pump.rate_units, "MM", "UM", "MH", "UH"):
            text = fmt(pump.rate_ml_min / RATE_FACTORS[units])
            if text is not None and (float(text) > 0 or pump.rate_ml_min == 0):
                return text + units
        return "?"

    @staticmethod
    def _volume_text(pump: PumpState) -> str:
        for units in (pump.volume_units, "ML", "UL"):
            text = fmt(pump.volume_ml / VOLUME_FACTORS[units])
            if text is not None:
                return text + units
        return "?"

    @staticmethod
    def _dispensed_text(pump: PumpState) -> str:
        for units in (pump.volume_units, "ML"):
            factor = VOLUME_FACTORS[units]
            inf, wdr = fmt(pump.dispensed_inf_ml / factor), fmt(pump.dispensed_wdr_ml / factor)
            if inf is not None and wdr is not None:
                return f"I{inf}W{wdr}{units}"
        return "?"


def _targets(params: dict[str, Any], pump: PumpState) -> bool:
    """Does a fault's ``pump=`` parameter (absent = every pump) name this pump?"""
    if "pump" not in params:
        return True
    target = params["pump"]
    return target in (pump.fluid, pump.address, str(pump.address))


def _split_lines(buf: bytearray, data: bytes) -> list[bytes]:
    """Append ``data`` to ``buf`` and return the complete CR-terminated lines."""
    buf += data
    lines = []
    while True:
        i = buf.find(b"\r")
        if i < 0:
            break
        lines.append(bytes(buf[:i]))
        del buf[: i + 1]
    if len(buf) > MAX_LINE:  # no CR for too long: line noise
        buf.clear()
    return lines


__all__ = ["PumpChainSim"]
