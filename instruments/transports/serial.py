"""Serial byte-stream transport (pyserial): RS-232/USB ports, serial device servers, loopback.

URLs::

    serial:///dev/ttyUSB0?baudrate=9600&bytesize=8&parity=N&stopbits=1&timeout=1.0
    socket://192.168.1.20:4001?timeout=0.5      (raw TCP serial device server)
    rfc2217://192.168.1.20:2217?baudrate=19200  (RFC 2217 device server)
    loop://                                     (pyserial loopback, for tests)

Options (all schemes): ``baudrate`` (9600), ``bytesize`` (5-8, default 8),
``parity`` (N/E/O/M/S, default N), ``stopbits`` (1, 1.5, 2; default 1),
``xonxoff`` / ``rtscts`` (false), ``timeout`` (default reply deadline in s,
1.0), ``io`` (``auto``, ``fd`` or ``thread``; see below). ``rfc2217://`` also
passes pyserial's ``ign_set_control`` and ``poll_modem`` through. DTR/RTS are
never touched (a pty refuses them).

One port, one line: several transports on the same port (a daisy chain of
pumps, one driver per address) share one underlying pyserial object, one
worker thread and one lock, refcounted per port and event loop;
the last ``close()`` closes the port and joins its thread. ``serial://`` ports
are opened with an exclusive lock (``flock``), so another process cannot talk
on the same line in the middle of an exchange.

Two data paths. pyserial always opens, configures and closes the port, on the
line's worker thread (``open`` and ``tcsetattr`` can block). Then:

* ``fd`` (``serial://`` on POSIX: a real tty or a pty; the ``auto`` default
  there): reads and writes run on the event loop itself, on the port's file
  descriptor set non-blocking, the way pyserial-asyncio does it: ``os.write``
  (on ``EAGAIN`` or a partial write, ``loop.add_writer`` waits for room),
  ``loop.add_reader`` fills a buffer until the reply is complete, a
  ``loop.call_at`` timer is the deadline. Non-blocking fd I/O never blocks the
  loop, and it saves the two thread hops (loop -> worker -> loop, ~50 us
  together on a 2-core VM) that a query through the worker costs: a pump
  query (``0DIA``) took 1.2-1.5x the time of raw pyserial through the worker,
  0.5-1.0x (p50; p99 0.9-1.05x) on the fd path (``benchmarks/transports.py``).
* ``thread`` (pyserial's URL handlers ``socket://``, ``rfc2217://``,
  ``loop://``, which have no tty fd to watch; or forced with ``io=thread``):
  every pyserial call runs on the line's worker thread (a transaction is one
  call there: discard, write, read).

``io=fd`` insists on the fd path (opening fails, naming the URL, where it is
impossible); ``io=thread`` forces the worker thread. Both behave the same:
reads are deadline based (:class:`TransportTimeout` names what arrived so
far); an exchange whose caller is cancelled still runs to its end (reply or
deadline) before the next one starts, so a late reply never answers the next
request. An ``OSError`` while reading or writing (USB adapter unplugged, pty
master closed, socket reset) raises :class:`LinkLostError`; the next operation
reopens the port.

This module parses the URL and shares lines; the shared port itself is
:mod:`~instruments.transports.serialline`, its fd data path
:mod:`~instruments.transports.serialfd`, its worker thread and lock
:mod:`~instruments.transports.serialworker`.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import weakref
from typing import Any
from urllib.parse import unquote, urlsplit

import serial

from instruments.errors import InvalidURLError, TransportError, TransportOpenError
from instruments.transports.base import Transport, URLOptions, split_url
from instruments.transports.serialline import POLL_S, Line
from instruments.transports.serialworker import LineWorker as _LineWorker  # noqa: F401 - tests use it
from instruments.transports.serialworker import TaskLock

_PARITIES = {
    "N": serial.PARITY_NONE,
    "E": serial.PARITY_EVEN,
    "O": serial.PARITY_ODD,
    "M": serial.PARITY_MARK,
    "S": serial.PARITY_SPACE,
}
_BYTESIZES = {5: serial.FIVEBITS, 6: serial.SIXBITS, 7: serial.SEVENBITS, 8: serial.EIGHTBITS}
_STOPBITS = {
    "1": serial.STOPBITS_ONE,
    "1.5": serial.STOPBITS_ONE_POINT_FIVE,
    "2": serial.STOPBITS_TWO,
}
_RFC2217_PASSTHROUGH = ("ign_set_control", "poll_modem")
_IO_MODES = ("auto", "fd", "thread")


# Lines per event loop, by port key. Guarded by _LINES_LOCK (loops may live on several threads).
_LINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Line]] = (
    weakref.WeakKeyDictionary()
)
_LINES_LOCK = threading.Lock()


def _same_file(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


class SerialTransport(Transport):
    """An async byte stream over pyserial; see the module docstring for URLs and sharing.

    ``timeout`` (URL option) is the default deadline of reads and transactions, in s.
    Framing helpers: :meth:`read_until`, :meth:`read_exactly`, :meth:`transaction`.
    """

    schemes = ("serial", "socket", "rfc2217", "loop")

    def __init__(self, url: str) -> None:
        super().__init__(url)
        scheme, base, raw_opts = split_url(url)
        if scheme not in self.schemes:
            raise InvalidURLError(
                url, f"SerialTransport handles {', '.join(s + '://' for s in self.schemes)}"
            )
        opts = URLOptions(
            url,
            {
                k: v
                for k, v in raw_opts.items()
                if not (scheme == "rfc2217" and k in _RFC2217_PASSTHROUGH)
            },
        )
        passthrough = [
            f"{k}={v}" if v else k
            for k, v in raw_opts.items()
            if scheme == "rfc2217" and k in _RFC2217_PASSTHROUGH
        ]

        baudrate = opts.int("baudrate", 9600)
        if baudrate <= 0:
            raise InvalidURLError(url, f"option baudrate={baudrate} must be a positive integer")
        bytesize = opts.int("bytesize", 8)
        if bytesize not in _BYTESIZES:
            raise InvalidURLError(url, f"option bytesize={bytesize} is not one of 5, 6, 7, 8")
        parity = opts.str("parity", "N").upper()
        if parity not in _PARITIES:
            raise InvalidURLError(url, f"option parity={parity!r} is not one of N, E, O, M, S")
        stopbits = opts.str("stopbits", "1")
        if stopbits not in _STOPBITS:
            raise InvalidURLError(url, f"option stopbits={stopbits!r} is not one of 1, 1.5, 2")
        xonxoff = opts.bool("xonxoff", False)
        rtscts = opts.bool("rtscts", False)
        self.timeout = opts.float("timeout", 1.0)
        if self.timeout <= 0:
            raise InvalidURLError(url, "option timeout must be > 0 (seconds)")
        self.io = opts.str("io", "auto").lower()
        if self.io not in _IO_MODES:
            raise InvalidURLError(url, f"option io={self.io!r} is not one of auto, fd, thread")
        if self.io == "fd" and scheme != "serial":
            raise InvalidURLError(
                url, f"option io=fd needs a serial:// device; {scheme}:// runs on the worker thread"
            )
        opts.finish()

        self.settings: dict[str, Any] = {
            "baudrate": baudrate,
            "bytesize": _BYTESIZES[bytesize],
            "parity": _PARITIES[parity],
            "stopbits": _STOPBITS[stopbits],
            "xonxoff": xonxoff,
            "rtscts": rtscts,
        }
        self._path: str | None = None
        parts = urlsplit(base)
        if scheme == "serial":
            path = unquote(parts.path)
            if parts.netloc:
                if re.fullmatch(r"COM\d+", parts.netloc, re.IGNORECASE) and not path:
                    path = parts.netloc.upper()  # Windows: serial://COM3
                else:
                    raise InvalidURLError(
                        url,
                        "a serial URL needs an absolute device path: serial:///dev/ttyUSB0 (three slashes)",
                    )
            elif not path.startswith("/"):
                raise InvalidURLError(
                    url, "a serial URL needs an absolute device path, e.g. serial:///dev/ttyUSB0"
                )
            self._path = path
            self._target = path
            self._key = "serial://" + (os.path.normpath(path) if path.startswith("/") else path)
        else:
            if scheme in ("socket", "rfc2217"):
                try:
                    host, port = parts.hostname, parts.port
                except ValueError:
                    host, port = None, None
                if not host or port is None:
                    raise InvalidURLError(
                        url, f"{scheme}:// needs host:port, e.g. {scheme}://192.168.1.20:4001"
                    )
                netloc = f"{host}:{port}"
            else:  # loop://
                netloc = parts.netloc
            self._key = f"{scheme}://{netloc.lower()}{parts.path}"
            self._target = self._key + ("?" + "&".join(passthrough) if passthrough else "")
        self._line: Line | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def port(self) -> str:
        """The canonical port this transport talks on (the key under which the line is shared)."""
        return self._key

    @property
    def lock(self) -> TaskLock:
        """The line's lock: hold it (``async with t.lock:``) around a multi-step exchange on a shared line.

        Every operation takes it; the task holding it may call operations inside.
        """
        return self._open_line().lock

    @property
    def io_mode(self) -> str | None:
        """The data path of the open port: ``"fd"`` (event loop) or ``"thread"``; None when not open."""
        line = self._line
        return line.mode if line is not None and line.connected else None

    @property
    def line_users(self) -> int:
        """How many open transports share this transport's line (0 when closed)."""
        return self._line.refs if self._line is not None else 0

    def _acquire(self, loop: asyncio.AbstractEventLoop) -> Line:
        with _LINES_LOCK:
            lines = _LINES.setdefault(loop, {})
            line = lines.get(self._key)
            if line is None and self._path is not None:
                line = next(
                    (
                        ln
                        for ln in lines.values()
                        if ln.path is not None and _same_file(ln.path, self._path)
                    ),
                    None,
                )
            if line is None:
                line = Line(
                    self._key,
                    self._path,
                    self._target,
                    self.settings,
                    max(2.0, self.timeout),
                    self.io,
                )
                lines[self._key] = line
            elif line.settings != self.settings:
                raise TransportOpenError(
                    self.url,
                    f"port already open in this process with other settings ({_describe(line.settings)})",
                )
            elif line.io != self.io:
                raise TransportOpenError(
                    self.url, f"port already open in this process with io={line.io}"
                )
            line.refs += 1
            return line

    @staticmethod
    async def _release_line(loop: asyncio.AbstractEventLoop, line: Line) -> None:
        with _LINES_LOCK:
            line.refs -= 1
            if line.refs > 0:
                return
            lines = _LINES.get(loop, {})
            if lines.get(line.key) is line:
                del lines[line.key]
        await line.shutdown()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        line = self._acquire(loop)
        try:
            async with line.lock:
                await line.ensure(self.url)
        except BaseException:
            await self._release_line(loop, line)
            raise
        self._line = line
        self._loop = loop

    async def _close(self) -> None:
        line, self._line = self._line, None
        if line is not None and self._loop is not None:
            await self._release_line(self._loop, line)

    async def reconnect(self) -> None:
        """Close and reopen the port (for every transport sharing it)."""
        if not self.is_open:
            await self.open()
            return
        line = self._open_line()
        async with line.lock:
            await line.drop()
            await line.ensure(self.url)

    def _open_line(self) -> Line:
        if self._line is None:
            raise TransportError(self.url, "transport is not open (call open() first)")
        return self._line

    # ------------------------------------------------------------------ I/O
    async def write(self, data: bytes) -> None:
        """Write ``data`` (waiting at most the line's write timeout, max(2 s, ``timeout``))."""
        line = self._open_line()
        async with line.lock:
            await line.write(self.url, bytes(data))

    async def read_until(
        self,
        terminator: bytes,
        timeout: float | None = None,
        max_bytes: int = 4096,
    ) -> bytes:
        """Bytes up to and including ``terminator``; :class:`TransportTimeout` at the deadline (s).

        More than ``max_bytes`` without a terminator is a :class:`ProtocolError`.
        """
        if not terminator:
            raise ValueError("terminator must not be empty")
        t = self.timeout if timeout is None else timeout
        line = self._open_line()
        async with line.lock:
            return await line.read_until(self.url, bytes(terminator), t, max_bytes)

    async def read_exactly(
        self,
        n: int,
        timeout: float | None = None,
    ) -> bytes:
        """Exactly ``n`` bytes, or :class:`TransportTimeout` at the deadline (s)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        t = self.timeout if timeout is None else timeout
        line = self._open_line()
        async with line.lock:
            return await line.read_exactly(self.url, n, t)

    async def discard_input(self) -> int:
        """Drop stale received bytes (a late reply, line noise); returns how many were waiting."""
        line = self._open_line()
        async with line.lock:
            return await line.discard(self.url)

    async def transaction(
        self,
        request: bytes,
        terminator: bytes,
        timeout: float | None = None,
        max_bytes: int = 4096,
    ) -> bytes:
        """Under the line's lock: discard stale input, write ``request``, read up to ``terminator``.

        Several drivers sharing one line (a daisy chain) can call this
        concurrently; exchanges never interleave.
        """
        if not terminator:
            raise ValueError("terminator must not be empty")
        t = self.timeout if timeout is None else timeout
        line = self._open_line()
        async with line.lock:
            return await line.transaction(self.url, bytes(request), bytes(terminator), t, max_bytes)


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


__all__ = ["POLL_S", "SerialTransport"]
