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
* ``modbus-rtu://`` transports naming the same serial device (several units
  on one RS-485 line) share one port, one client and one lock, reference
  counted: see :mod:`instruments.transports.modbuslink`;
* a Modbus exception reply raises :class:`~instruments.errors.ModbusExceptionError`
  (function code, address, exception code);
* a reply that cannot be decoded (bad CRC, corrupt PDU, wrong function or
  count) raises :class:`~instruments.errors.ProtocolError`;
* the link dropping while a request waits raises
  :class:`~instruments.errors.LinkLostError`; a link found dropped between
  requests is reopened on demand by the next request. After a timeout or a
  garbled reply the link is also reopened before the next request (to any
  unit on the line), so a late reply can never be taken for the answer to a
  later request (RTU has no transaction ids);
* a refused connection or a missing serial port raises
  :class:`~instruments.errors.TransportOpenError` naming the URL.

pymodbus's asyncio client needs no thread: it runs on the event loop. Closing
leaves no task, thread or socket behind. (``timeout=`` parameters are
per-request deadlines that end in a typed ``TransportTimeout`` naming the URL,
hence the ``noqa: ASYNC109``.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from pymodbus.client import ModbusBaseClient
from pymodbus.pdu import ModbusPDU

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    ModbusExceptionError,
    ProtocolError,
    TransportTimeout,
)
from instruments.transports.base import Transport, URLOptions, split_url
from instruments.transports.modbuslink import (
    Connection,
    ModbusLine,
    ModbusSettings,
    acquire_line,
    release_line,
)

log = logging.getLogger(__name__)
_MAX_READ_REGISTERS = 125
_MAX_WRITE_REGISTERS = 123
_MAX_READ_BITS = 2000


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
        self._line: ModbusLine | None = None

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
        return self._line is not None and self._line.connected

    @property
    def line_users(self) -> int:
        """How many open transports share this transport's line (0 when closed)."""
        return self._line.refs if self._line is not None else 0

    @property
    def _link(self) -> Connection | None:
        """The line's current client connection (None when closed or between reconnects)."""
        return self._line.conn if self._line is not None else None

    # ------------------------------------------------------------ open/close
    async def _open(self) -> None:
        line = acquire_line(self.settings, self.url)
        try:
            async with line.lock:
                if not line.usable:
                    await line.drop(None)
                    await line.connect(self.url, self.settings.timeout)
        except BaseException:
            await release_line(line, None)
            raise
        self._line = line

    async def _close(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            await release_line(
                line, LinkLostError(self.url, "transport closed while a request was waiting")
            )

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
        line = self._line
        assert line is not None
        pdu = await line.request(self.url, what, send, unit, limit)
        return self._check_reply(line, what, fc, address, pdu)

    def _check_reply(
        self, line: ModbusLine, what: str, fc: int, address: int, pdu: ModbusPDU | None
    ) -> ModbusPDU:
        if pdu is None:
            line.reset_before_next = True
            raise ProtocolError(self.url, f"{what}: no reply object")
        if (pdu.function_code & 0x7F) != fc:
            line.reset_before_next = True
            raise ProtocolError(
                self.url, f"{what}: reply has function code {pdu.function_code}, expected {fc}"
            )
        if pdu.isError():
            raise ModbusExceptionError(self.url, fc, address, int(pdu.exception_code))
        return pdu


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} {value!r} must be an integer in {low}-{high}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}-{high}")


__all__ = ["ModbusSettings", "ModbusTransport", "parse_modbus_url"]
