"""Modbus register bus over pymodbus 3.16's asyncio clients: ``modbus-tcp://`` and ``modbus-rtu://``.

URLs::

    modbus-tcp://HOST[:PORT]?unit=1&timeout=1.0&retries=0          (PORT defaults to 502)
    modbus-rtu:///dev/ttyUSB1?baudrate=19200&bytesize=8&parity=N&stopbits=1&unit=1&timeout=1.0&retries=0

``unit`` is the default Modbus unit (device) id, overridable per call;
``timeout`` the default deadline of one request in seconds (also the connect
deadline); ``retries`` how many times this transport repeats a *read*
(FC1/2/3/4) after a timeout, a garbled reply or a lost link (default 0: drivers
decide about retries; writes are never repeated here). pymodbus's own retries
and automatic reconnection are switched off.

Behaviour:

* one request at a time per link (an ``asyncio.Lock``), each with a deadline
  (:class:`~instruments.errors.TransportTimeout` naming the URL);
* a Modbus exception reply raises :class:`~instruments.errors.ModbusExceptionError`
  (function code, address, exception code);
* a reply that cannot be decoded (bad CRC, corrupt PDU, wrong function or
  count) raises :class:`~instruments.errors.ProtocolError`;
* the link dropping while a request waits raises
  :class:`~instruments.errors.LinkLostError`; a link found dropped between
  requests is reopened on demand by the next request. After a timeout or a
  garbled reply the link is also reopened before the next request, so a late
  reply can never be taken for the answer to a later request (RTU has no
  transaction ids);
* a refused connection or a missing serial port raises
  :class:`~instruments.errors.TransportOpenError` naming the URL.

pymodbus's asyncio client needs no thread: it runs on the event loop. Closing
leaves no task, thread or socket behind. (``timeout=`` parameters are
per-request deadlines that end in a typed ``TransportTimeout`` naming the URL,
hence the ``noqa: ASYNC109``.)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerBase, FramerRTU, FramerSocket, FramerType
from pymodbus.pdu import DecodePDU, ModbusPDU

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    ModbusExceptionError,
    ProtocolError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.base import Transport, URLOptions, split_url

log = logging.getLogger(__name__)

# pymodbus's own timeout is only a backstop: our deadlines (a timer per request) always end it first.
_BACKSTOP_S = 300.0
_MAX_READ_REGISTERS = 125
_MAX_WRITE_REGISTERS = 123
_MAX_READ_BITS = 2000


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


def parse_modbus_url(url: str) -> ModbusSettings:
    """Validate a ``modbus-tcp://`` or ``modbus-rtu://`` URL (see the module docstring)."""
    scheme, _, query = split_url(url)
    opts = URLOptions(url, query)
    parts = urlsplit(url)
    if scheme == "modbus-tcp":
        try:
            host = parts.hostname or ""
            port = parts.port if parts.port is not None else 502
        except ValueError as exc:
            raise InvalidURLError(url, f"bad host or port ({exc})") from None
        if not host:
            raise InvalidURLError(url, "no host (expected modbus-tcp://HOST:PORT)")
        if not 1 <= port <= 65535:
            raise InvalidURLError(url, f"port {port} is outside 1-65535")
        if parts.path not in ("", "/"):
            raise InvalidURLError(
                url, f"unexpected path {parts.path!r} (expected modbus-tcp://HOST:PORT?unit=N)"
            )
        unit = opts.int("unit", 1)
        if not 0 <= unit <= 255:
            raise InvalidURLError(url, f"option unit={unit} is outside 0-255")
        settings = ModbusSettings("tcp", unit, _timeout(opts), _retries(opts), host=host, port=port)
    elif scheme == "modbus-rtu":
        if parts.netloc:
            raise InvalidURLError(
                url,
                f"the serial port must be an absolute path: modbus-rtu:///dev/..., not host {parts.netloc!r}",
            )
        device = parts.path
        if not device.startswith("/") or device == "/":
            raise InvalidURLError(url, "no serial port path (expected modbus-rtu:///dev/ttyUSB0)")
        unit = opts.int("unit", 1)
        if not 1 <= unit <= 247:
            raise InvalidURLError(url, f"option unit={unit} is outside 1-247 (RTU)")
        baudrate = opts.int("baudrate", 19200)
        if baudrate <= 0:
            raise InvalidURLError(url, f"option baudrate={baudrate} must be positive")
        bytesize = opts.int("bytesize", 8)
        if bytesize not in (5, 6, 7, 8):
            raise InvalidURLError(url, f"option bytesize={bytesize} is not one of 5, 6, 7, 8")
        parity = opts.choice("parity", "N", ("N", "E", "O", "M", "S"))
        stopbits_raw = opts.choice("stopbits", "1", ("1", "1.5", "2"))
        settings = ModbusSettings(
            "rtu",
            unit,
            _timeout(opts),
            _retries(opts),
            device=device,
            baudrate=baudrate,
            bytesize=bytesize,
            parity=parity,
            stopbits=float(stopbits_raw) if stopbits_raw == "1.5" else int(stopbits_raw),
        )
    else:
        raise InvalidURLError(url, f"scheme {scheme!r} is not modbus-tcp or modbus-rtu")
    opts.finish()
    return settings


def _timeout(opts: URLOptions) -> float:
    value = opts.float("timeout", 1.0)
    if value <= 0:
        raise InvalidURLError(opts.url, f"option timeout={value!r} must be > 0 s")
    return value


def _retries(opts: URLOptions) -> int:
    value = opts.int("retries", 0)
    if not 0 <= value <= 10:
        raise InvalidURLError(opts.url, f"option retries={value} is outside 0-10")
    return value


class _Link:
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
        """End the request that waits on this link with ``reason`` (the first reason wins).

        The waiting task is cancelled and turns the cancellation into ``reason``
        (see ``ModbusTransport._request_once``). False if no request waits.
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
        # pymodbus never sees the garbage; the link is reset before the next request
        return len(data), None


class _CheckedSocketFramer(_GarbleCheck, FramerSocket):
    pass


class _CheckedRTUFramer(_GarbleCheck, FramerRTU):
    pass


class ModbusTransport(Transport):
    """A Modbus TCP or RTU link (see the module docstring for URLs and behaviour).

    Addresses are 0-based protocol addresses; register values are unsigned
    16-bit integers (0-65535): signed or scaled values are the driver's job.
    Every method takes ``unit`` (default: the URL's) and ``timeout`` (seconds,
    default: the URL's).
    """

    schemes = ("modbus-tcp", "modbus-rtu")

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.settings = parse_modbus_url(url)
        self._link: _Link | None = None
        self._request_lock = asyncio.Lock()
        self._reset_before_next = False

    # ------------------------------------------------------------ properties
    @property
    def unit(self) -> int:
        """The default unit id (from the URL)."""
        return self.settings.unit

    @property
    def timeout(self) -> float:
        """The default request deadline in seconds (from the URL)."""
        return self.settings.timeout

    @property
    def connected(self) -> bool:
        """True while the underlying TCP connection / serial port is up."""
        link = self._link
        return bool(link and link.client and link.client.connected and not link.lost)

    # ------------------------------------------------------------ open/close
    async def _open(self) -> None:
        await self._connect(self.settings.timeout)

    async def _close(self) -> None:
        await self._drop_link(
            LinkLostError(self.url, "transport closed while a request was waiting")
        )

    async def _release(self) -> None:
        await self._drop_link(None)

    def _make_client(self, link: _Link) -> ModbusBaseClient:
        s = self.settings

        def on_connect(up: bool) -> None:
            if up:
                link.connected.set()
                return
            link.lost = True
            link.end_request(LinkLostError(self.url, "connection lost while waiting for a reply"))

        def on_garbled(problem: str, data: bytes) -> None:
            self._reset_before_next = True
            if not link.end_request(ProtocolError(self.url, problem, raw=data)):
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

    async def _connect(self, limit: float) -> None:
        """Open a fresh pymodbus client within ``limit`` seconds or raise TransportOpenError."""
        s = self.settings
        if s.mode == "rtu" and not _path_exists(s.device):
            raise TransportOpenError(self.url, f"no such serial port {s.device}")
        link = _Link()
        link.client = self._make_client(link)
        self._link = link
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            ok = await asyncio.wait_for(link.client.connect(), limit)
            if ok:
                await asyncio.wait_for(link.connected.wait(), max(0.001, deadline - loop.time()))
        except TimeoutError:
            await self._drop_link(None)
            raise TransportOpenError(self.url, f"could not connect within {limit:g} s") from None
        except Exception as exc:
            await self._drop_link(None)
            raise TransportOpenError(self.url, f"could not connect: {exc}") from exc
        if not ok:
            await self._drop_link(None)
            where = f"serial port {s.device}" if s.mode == "rtu" else f"{s.host}:{s.port}"
            raise TransportOpenError(
                self.url, f"could not connect to {where} (refused, unreachable or busy)"
            )
        self._reset_before_next = False

    async def _drop_link(self, reason: Exception | None) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if reason is not None:
            link.end_request(reason)
        if link.client is not None:
            link.client.close()
            # asyncio closes a socket on the next loop iteration: let it, so nothing dangles.
            for _ in range(3):
                await asyncio.sleep(0)

    # ------------------------------------------------------------ requests
    async def read_holding_registers(
        self,
        address: int,
        count: int = 1,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """FC3: ``count`` holding registers from ``address`` (unsigned 16-bit values)."""
        return await self._read_registers(
            3, "read_holding_registers", address, count, unit, timeout
        )

    async def read_input_registers(
        self,
        address: int,
        count: int = 1,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """FC4: ``count`` input registers from ``address`` (unsigned 16-bit values)."""
        return await self._read_registers(4, "read_input_registers", address, count, unit, timeout)

    async def write_register(
        self,
        address: int,
        value: int,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """FC6: write one holding register (``value`` 0-65535)."""
        _check_range("address", address, 0, 65535)
        _check_range("register value", value, 0, 65535)
        pdu = await self._request(
            f"write_register({address}, {value})",
            6,
            address,
            lambda c, u: c.write_register(address, value, device_id=u),
            unit=unit,
            limit=timeout,
            idempotent=False,
        )
        if pdu.address != address or list(pdu.registers) != [value]:
            raise ProtocolError(
                self.url,
                f"FC6 echo {pdu.address}={list(pdu.registers)} does not match {address}=[{value}]",
            )

    async def write_registers(
        self,
        address: int,
        values: Sequence[int],
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """FC16: write consecutive holding registers from ``address`` (each 0-65535)."""
        vals = [int(v) for v in values]
        _check_range("address", address, 0, 65535)
        _check_range("number of values", len(vals), 1, _MAX_WRITE_REGISTERS)
        _check_range("address + count", address + len(vals), 1, 65536)
        for v in vals:
            _check_range("register value", v, 0, 65535)
        pdu = await self._request(
            f"write_registers({address}, {vals})",
            16,
            address,
            lambda c, u: c.write_registers(address, vals, device_id=u),
            unit=unit,
            limit=timeout,
            idempotent=False,
        )
        if pdu.address != address or pdu.count != len(vals):
            raise ProtocolError(
                self.url,
                f"FC16 reply address={pdu.address} count={pdu.count}, sent {address}/{len(vals)}",
            )

    async def read_coils(
        self,
        address: int,
        count: int = 1,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> list[bool]:
        """FC1: ``count`` coils from ``address``."""
        return await self._read_bits(1, "read_coils", address, count, unit, timeout)

    async def read_discrete_inputs(
        self,
        address: int,
        count: int = 1,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> list[bool]:
        """FC2: ``count`` discrete inputs from ``address``."""
        return await self._read_bits(2, "read_discrete_inputs", address, count, unit, timeout)

    async def write_coil(
        self,
        address: int,
        value: bool,
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """FC5: switch one coil on or off."""
        _check_range("address", address, 0, 65535)
        pdu = await self._request(
            f"write_coil({address}, {bool(value)})",
            5,
            address,
            lambda c, u: c.write_coil(address, bool(value), device_id=u),
            unit=unit,
            limit=timeout,
            idempotent=False,
        )
        if pdu.address != address or not pdu.bits or bool(pdu.bits[0]) != bool(value):
            raise ProtocolError(
                self.url,
                f"FC5 echo {pdu.address}={list(pdu.bits)[:1]} does not match {address}={value}",
            )

    # ------------------------------------------------------------ machinery
    async def _read_registers(
        self,
        fc: int,
        method: str,
        address: int,
        count: int,
        unit: int | None,
        timeout: float | None,
    ) -> list[int]:
        """FC3/FC4: the pymodbus client method ``method``, range-checked, idempotent (retryable)."""
        _check_range("address", address, 0, 65535)
        _check_range("count", count, 1, _MAX_READ_REGISTERS)
        _check_range("address + count", address + count, 1, 65536)
        pdu = await self._request(
            f"{method}({address}, {count})",
            fc,
            address,
            lambda c, u: getattr(c, method)(address, count=count, device_id=u),
            unit=unit,
            limit=timeout,
            idempotent=True,
        )
        return self._registers(pdu, fc, address, count)

    async def _read_bits(
        self,
        fc: int,
        method: str,
        address: int,
        count: int,
        unit: int | None,
        timeout: float | None,
    ) -> list[bool]:
        """FC1/FC2: the pymodbus client method ``method``, range-checked, idempotent (retryable)."""
        _check_range("address", address, 0, 65535)
        _check_range("count", count, 1, _MAX_READ_BITS)
        pdu = await self._request(
            f"{method}({address}, {count})",
            fc,
            address,
            lambda c, u: getattr(c, method)(address, count=count, device_id=u),
            unit=unit,
            limit=timeout,
            idempotent=True,
        )
        return self._bits(pdu, address, count)

    def _registers(self, pdu: ModbusPDU, fc: int, address: int, count: int) -> list[int]:
        regs = [int(r) for r in pdu.registers]
        if len(regs) != count:
            raise ProtocolError(
                self.url, f"FC{fc} at {address}: asked for {count} registers, got {len(regs)}"
            )
        return regs

    def _bits(self, pdu: ModbusPDU, address: int, count: int) -> list[bool]:
        bits = [bool(b) for b in pdu.bits]
        if len(bits) < count:
            raise ProtocolError(
                self.url,
                f"FC{pdu.function_code} at {address}: asked for {count} bits, got {len(bits)}",
            )
        return bits[:count]

    async def _request(
        self,
        what: str,
        fc: int,
        address: int,
        send: Callable[[ModbusBaseClient, int], Awaitable[ModbusPDU]],
        *,
        unit: int | None,
        limit: float | None,
        idempotent: bool,
    ) -> ModbusPDU:
        dev = self.settings.unit if unit is None else unit
        _check_range("unit", dev, 0, 255)
        if limit is None:
            limit = self.settings.timeout
        if not limit > 0:
            raise ValueError(f"timeout {limit!r} must be > 0 s")
        attempts = 1 + (self.settings.retries if idempotent else 0)
        for attempt in range(1, attempts + 1):
            try:
                return await self._request_once(what, fc, address, send, dev, limit)
            except (TransportTimeout, ProtocolError, LinkLostError) as exc:
                if attempt == attempts:
                    raise
                log.warning(
                    "%s: %s failed (attempt %d/%d): %s", self.url, what, attempt, attempts, exc
                )
        raise AssertionError("unreachable")

    async def _request_once(
        self,
        what: str,
        fc: int,
        address: int,
        send: Callable[[ModbusBaseClient, int], Awaitable[ModbusPDU]],
        unit: int,
        limit: float,
    ) -> ModbusPDU:
        if not self._is_open:
            await self.open()
        async with self._request_lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + limit
            link = self._link
            if (
                link is None
                or link.client is None
                or link.lost
                or self._reset_before_next
                or not link.client.connected
            ):
                if link is not None:
                    log.info("%s: reopening the link before %s", self.url, what)
                await self._drop_link(None)
                await self._connect(limit)
                link = self._link
            assert link is not None and link.client is not None
            # The request is awaited in this task, not raced in another one: the deadline
            # timer and the link callbacks (lost link, garbled reply) end it early through
            # ``link.end_request``, which cancels this task; the cancellation is turned
            # back into their error below (the way ``asyncio.timeout`` does it).
            task = asyncio.current_task()
            assert task is not None
            cancelling = task.cancelling()
            link.abort = None
            link.waiter = task
            timer = loop.call_at(deadline, self._expire, link, what, unit, limit)
            try:
                pdu = await send(link.client, unit)
            except asyncio.CancelledError:
                self._reset_before_next = True  # a late reply must not answer the next request
                reason = link.abort
                if reason is None or task.uncancel() > cancelling:
                    raise  # cancelled from outside
                raise reason from None
            except ConnectionException as exc:
                self._reset_before_next = True
                raise LinkLostError(self.url, f"{what}: link down ({exc})") from exc
            except ModbusIOException as exc:
                self._reset_before_next = True
                if "No response" in str(exc):
                    raise TransportTimeout(self.url, f"no reply to {what} (unit {unit})") from exc
                raise ProtocolError(self.url, f"{what}: {exc}") from exc
            except ModbusException as exc:
                self._reset_before_next = True
                raise ProtocolError(self.url, f"{what}: {exc}") from exc
            except BaseException:
                self._reset_before_next = True
                raise
            finally:
                timer.cancel()
                link.waiter = None
            if link.abort is not None:
                # Ended early, but the reply had already arrived: pymodbus's wait_for returned it
                # and swallowed our cancellation. Keep the reply (the link is still reset).
                self._reset_before_next = True
                if task.uncancel() > cancelling:
                    raise asyncio.CancelledError  # a cancellation from outside was swallowed too
            return self._check_reply(what, fc, address, pdu)

    def _expire(self, link: _Link, what: str, unit: int, limit: float) -> None:
        link.end_request(
            TransportTimeout(self.url, f"no reply to {what} (unit {unit}) within {limit:g} s")
        )

    def _check_reply(self, what: str, fc: int, address: int, pdu: ModbusPDU | None) -> ModbusPDU:
        if pdu is None:
            self._reset_before_next = True
            raise ProtocolError(self.url, f"{what}: no reply object")
        if (pdu.function_code & 0x7F) != fc:
            self._reset_before_next = True
            raise ProtocolError(
                self.url, f"{what}: reply has function code {pdu.function_code}, expected {fc}"
            )
        if pdu.isError():
            raise ModbusExceptionError(self.url, fc, address, int(pdu.exception_code))
        return pdu


def _path_exists(path: str) -> bool:
    """Whether a serial device path exists (a stat of a local path: does not block)."""
    return os.path.exists(path)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} {value!r} must be an integer in {low}-{high}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}-{high}")


__all__ = ["ModbusSettings", "ModbusTransport", "parse_modbus_url"]
