"""The Modbus link under :class:`~instruments.transports.modbus.ModbusTransport`: one pymodbus client, shared.

One RS-485 line, one port: several ``modbus-rtu://`` transports naming the
same serial device (a hotplate at unit 1 and a pH transmitter at unit 2 on
one bus) share one :class:`ModbusLine`, the way the serial transport shares
one pyserial object between the pumps of a daisy chain:

* one pymodbus client (one open port), reference counted per device and event
  loop: the last transport to close closes the port; closing one user leaves
  the line open under the others;
* one ``asyncio.Lock``: requests to all units on the line are serialized,
  each with its own deadline;
* a garbled reply, a timeout or a cancelled request marks the line for a
  reset: the port is reopened (its input discarded) before the next request,
  whichever unit that request is for, so a late or broken reply from one unit
  can never be taken for the answer to another. A reply that decodes but
  names another unit is skipped by pymodbus (RTU has no transaction ids; the
  unit id is the only tag).

Both transports must agree on the line settings (baud rate, byte size,
parity, stop bits); the unit, timeout and retries are each transport's own.
``modbus-tcp://`` transports each get a link of their own (a TCP gateway
serves many units on one connection, but nothing here needs to share it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerBase, FramerRTU, FramerSocket, FramerType
from pymodbus.pdu import DecodePDU, ModbusPDU

from instruments.deadline import bounded
from instruments.errors import LinkLostError, ProtocolError, TransportOpenError, TransportTimeout

log = logging.getLogger(__name__)

# pymodbus's own timeout is only a backstop: our deadlines (a timer per request) always end it first.
_BACKSTOP_S = 300.0


@dataclass(frozen=True)
class ModbusSettings:
    """A parsed Modbus URL. ``mode`` is ``"tcp"`` or ``"rtu"``."""

    mode: str
    unit: int
    timeout: float
    retries: int
    host: str = ""
    port: int = 502
    device: str = ""
    baudrate: int = 19200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1

    def line(self) -> tuple[Any, ...]:
        """What transports sharing one serial line must agree on."""
        return (self.baudrate, self.bytesize, self.parity, self.stopbits)


class Connection:
    """One pymodbus client connection and what its callbacks reported."""

    def __init__(self) -> None:
        self.client: ModbusBaseClient | None = None
        self.connected = asyncio.Event()
        self.lost = False
        #: the task waiting for a reply (None between requests)
        self.waiter: asyncio.Task[Any] | None = None
        #: why the waiting request was ended early (set together with ``waiter.cancel()``)
        self.abort: Exception | None = None

    def end_request(self, reason: Exception) -> bool:
        """End the request that waits on this connection with ``reason`` (the first reason wins).

        The waiting task is cancelled and turns the cancellation into ``reason``
        (see :meth:`ModbusLine.request`). False if no request waits.
        """
        task = self.waiter
        if task is None or self.abort is not None or task.done():
            return False
        self.abort = reason
        task.cancel()
        return True


class _GarbleCheck(FramerBase):
    """Framer mixin: report a reply that pymodbus would silently drop (bad CRC, corrupt PDU).

    pymodbus skips an undecodable frame and lets the request run into its
    timeout; we want a :class:`ProtocolError` at once. The check costs nothing
    on a good reply: only a frame consumed without a PDU is decoded a second
    time, unfiltered, to tell a corrupt frame from one for another unit or
    transaction (which pymodbus skips, as before).
    """

    on_garbled: Callable[[str, bytes], None] | None = None

    def handleFrame(  # pymodbus names it so
        self, data: bytes, exp_devid: int, exp_tid: int
    ) -> tuple[int, ModbusPDU | None]:
        try:
            used, pdu = super().handleFrame(data, exp_devid, exp_tid)
        except ModbusException as exc:
            return self._garbled(f"undecodable reply ({exc})", data)
        if pdu is None and used:
            try:
                _, anything = super().handleFrame(data, 0, 0)
            except ModbusException as exc:
                return self._garbled(f"undecodable reply ({exc})", data)
            if anything is None:
                return self._garbled("corrupt frame (bad CRC or length)", data)
        return used, pdu

    def _garbled(self, problem: str, data: bytes) -> tuple[int, None]:
        if self.on_garbled is not None:
            self.on_garbled(problem, bytes(data))
        # pymodbus never sees the garbage; the line is reset before the next request
        return len(data), None


class _CheckedSocketFramer(_GarbleCheck, FramerSocket):
    pass


class _CheckedRTUFramer(_GarbleCheck, FramerRTU):
    pass


class ModbusLine:
    """One Modbus link (TCP connection or serial port) and the lock its requests queue on.

    ``url`` is the URL of the transport whose request runs now (or that opened
    the line): errors raised by the client's callbacks name it.
    """

    def __init__(self, settings: ModbusSettings, key: str | None, url: str) -> None:
        self.settings = settings
        self.key = key  # registry key (shared serial lines), None for a private link
        self.url = url
        self.refs = 0
        self.lock = asyncio.Lock()
        self.conn: Connection | None = None
        #: reopen the link before the next request (after a timeout, garbled reply, cancellation)
        self.reset_before_next = False

    @property
    def connected(self) -> bool:
        conn = self.conn
        return bool(conn and conn.client and conn.client.connected and not conn.lost)

    @property
    def usable(self) -> bool:
        """Connected and not marked for a reset."""
        return self.connected and not self.reset_before_next

    # ------------------------------------------------------------ connection
    def _make_client(self, conn: Connection) -> ModbusBaseClient:
        s = self.settings

        def on_connect(up: bool) -> None:
            if up:
                conn.connected.set()
                return
            conn.lost = True
            conn.end_request(LinkLostError(self.url, "connection lost while waiting for a reply"))

        def on_garbled(problem: str, data: bytes) -> None:
            self.reset_before_next = True
            if not conn.end_request(ProtocolError(self.url, problem, raw=data)):
                log.warning("%s: unexpected garbled bytes %r", self.url, data)

        common: dict[str, Any] = {
            "reconnect_delay": 0,  # no background reconnect task: we reconnect on demand
            "timeout": _BACKSTOP_S,
            "retries": 0,
            "trace_connect": on_connect,
        }
        client: ModbusBaseClient
        framer: _GarbleCheck
        if s.mode == "tcp":
            client = AsyncModbusTcpClient(s.host, port=s.port, framer=FramerType.SOCKET, **common)
            framer = _CheckedSocketFramer(DecodePDU(False))
        else:
            client = AsyncModbusSerialClient(
                s.device,
                framer=FramerType.RTU,
                baudrate=s.baudrate,
                bytesize=s.bytesize,
                parity=s.parity,
                stopbits=s.stopbits,  # type: ignore[arg-type]  # pyserial accepts 1.5
                **common,
            )
            framer = _CheckedRTUFramer(DecodePDU(False))
        # Same framer class and decoder pymodbus builds for this FramerType, plus the garble check.
        framer.on_garbled = on_garbled
        client.ctx.framer = framer
        return client

    async def connect(self, url: str, limit: float) -> None:
        """Open a fresh pymodbus client within ``limit`` seconds or raise TransportOpenError.

        Hold :attr:`lock` (or be the only user).
        """
        s = self.settings
        self.url = url
        if s.mode == "rtu" and not _path_exists(s.device):
            raise TransportOpenError(url, f"no such serial port {s.device}")
        conn = Connection()
        conn.client = self._make_client(conn)
        self.conn = conn
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            ok = await bounded(conn.client.connect(), limit)
            if ok:
                await bounded(conn.connected.wait(), max(0.001, deadline - loop.time()))
        except TimeoutError:
            await self.drop(None)
            raise TransportOpenError(url, f"could not connect within {limit:g} s") from None
        except Exception as exc:
            await self.drop(None)
            raise TransportOpenError(url, f"could not connect: {exc}") from exc
        if not ok:
            await self.drop(None)
            where = f"serial port {s.device}" if s.mode == "rtu" else f"{s.host}:{s.port}"
            raise TransportOpenError(
                url, f"could not connect to {where} (refused, unreachable or busy)"
            )
        self.reset_before_next = False

    async def drop(self, reason: Exception | None) -> None:
        """Close the client (a waiting request ends with ``reason``); the next request reopens."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if reason is not None:
            conn.end_request(reason)
        if conn.client is not None:
            conn.client.close()
            # asyncio closes a socket on the next loop iteration: let it, so nothing dangles.
            for _ in range(3):
                await asyncio.sleep(0)

    # ------------------------------------------------------------ one request
    async def request(
        self,
        url: str,
        what: str,
        send: Callable[[ModbusBaseClient, int], Awaitable[ModbusPDU]],
        unit: int,
        limit: float,
    ) -> ModbusPDU:
        """Send one request to ``unit`` under the line's lock and return the reply PDU.

        Raises :class:`TransportTimeout` at the deadline, :class:`ProtocolError`
        for a garbled reply, :class:`LinkLostError` when the link drops; each of
        them (and a cancellation) marks the line for a reset.
        """
        async with self.lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + limit
            self.url = url
            if not self.usable:
                if self.conn is not None:
                    log.info("%s: reopening the line before %s", url, what)
                await self.drop(None)
                await self.connect(url, limit)
            conn = self.conn
            assert conn is not None and conn.client is not None
            # The request is awaited in this task, not raced in another one: the deadline
            # timer and the client's callbacks (lost link, garbled reply) end it early through
            # ``conn.end_request``, which cancels this task; the cancellation is turned back
            # into their error below (the way ``asyncio.timeout`` does it).
            task = asyncio.current_task()
            assert task is not None
            cancelling = task.cancelling()
            conn.abort = None
            conn.waiter = task
            timer = loop.call_at(deadline, self._expire, conn, url, what, unit, limit)
            try:
                pdu = await send(conn.client, unit)
            except asyncio.CancelledError:
                self.reset_before_next = True  # a late reply must not answer the next request
                reason = conn.abort
                if reason is None or task.uncancel() > cancelling:
                    raise  # cancelled from outside
                raise reason from None
            except ConnectionException as exc:
                self.reset_before_next = True
                raise LinkLostError(url, f"{what}: link down ({exc})") from exc
            except ModbusIOException as exc:
                self.reset_before_next = True
                if "No response" in str(exc):
                    raise TransportTimeout(url, f"no reply to {what} (unit {unit})") from exc
                raise ProtocolError(url, f"{what}: {exc}") from exc
            except ModbusException as exc:
                self.reset_before_next = True
                raise ProtocolError(url, f"{what}: {exc}") from exc
            except BaseException:
                self.reset_before_next = True
                raise
            finally:
                timer.cancel()
                conn.waiter = None
            if conn.abort is not None:
                # Ended early, but the reply had already arrived: pymodbus's wait_for returned it
                # and swallowed our cancellation. Keep the reply (the line is still reset).
                self.reset_before_next = True
                if task.uncancel() > cancelling:
                    raise asyncio.CancelledError  # a cancellation from outside was swallowed too
            elif task.cancelling() > cancelling:
                # cancelled from outside as the reply arrived: pymodbus's wait_for returned the
                # reply and swallowed the cancellation; the caller asked to stop, so stop
                raise asyncio.CancelledError
            return pdu

    @staticmethod
    def _expire(conn: Connection, url: str, what: str, unit: int, limit: float) -> None:
        conn.end_request(
            TransportTimeout(url, f"no reply to {what} (unit {unit}) within {limit:g} s")
        )


# ---------------------------------------------------------------- sharing
# Serial lines per event loop, by device. Guarded by _LINES_LOCK (loops may live on several threads).
_LINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ModbusLine]] = (
    weakref.WeakKeyDictionary()
)
_LINES_LOCK = threading.Lock()


def _line_key(device: str) -> str:
    return os.path.realpath(device)


def acquire_line(settings: ModbusSettings, url: str) -> ModbusLine:
    """The line for ``settings`` (shared for RTU on the same device and loop), one more user.

    Raises :class:`TransportOpenError` when the device is already in use with
    other line settings.
    """
    if settings.mode != "rtu":
        line = ModbusLine(settings, None, url)
        line.refs = 1
        return line
    loop = asyncio.get_running_loop()
    key = _line_key(settings.device)
    with _LINES_LOCK:
        lines = _LINES.setdefault(loop, {})
        shared = lines.get(key)
        if shared is None:
            shared = lines[key] = ModbusLine(settings, key, url)
        elif shared.settings.line() != settings.line():
            s = shared.settings
            raise TransportOpenError(
                url,
                f"serial port {settings.device} is already open in this process as another "
                f"Modbus line (baudrate={s.baudrate} bytesize={s.bytesize} parity={s.parity} "
                f"stopbits={s.stopbits:g}): every unit on one RS-485 line needs the same settings",
            )
        shared.refs += 1
        return shared


async def release_line(line: ModbusLine, reason: Exception | None) -> None:
    """One user fewer; the last one closes the link (a waiting request ends with ``reason``)."""
    with _LINES_LOCK:
        line.refs -= 1
        if line.refs > 0:
            return
        if line.key is not None:
            for lines in _LINES.values():
                if lines.get(line.key) is line:
                    del lines[line.key]
    await line.drop(reason)


def _path_exists(path: str) -> bool:
    """Whether a serial device path exists (a stat of a local path: does not block)."""
    return os.path.exists(path)


__all__ = ["Connection", "ModbusLine", "ModbusSettings", "acquire_line", "release_line"]
