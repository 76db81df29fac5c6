"""One open serial port shared by every transport on it: open/close, the thread and fd data paths.

The only module besides :mod:`instruments.transports.serial` that imports pyserial;
see that module's docstring for sharing and the two data paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import serial

from instruments.errors import (
    LinkLostError,
    ProtocolError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.serialfd import READ_SIZE, FdOp, link_lost, loop_watches
from instruments.transports.serialworker import LineWorker, TaskLock

try:  # termios.error is not an OSError; tcflush on a dead tty raises it
    import termios

    _LINK_ERRORS: tuple[type[BaseException], ...] = (OSError, termios.error)
except ImportError:  # pragma: no cover - Windows
    _LINK_ERRORS = (OSError,)

_OPEN_ERRORS: tuple[type[BaseException], ...] = (*_LINK_ERRORS, ValueError)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how long one blocking ``read`` waits before the deadline is checked again (s; thread path)
POLL_S = 0.02


class Line:
    """One open port shared by every transport on it (same process, same event loop).

    Attributes starting with ``_w`` and the pyserial object are touched only on
    the worker thread. On the fd path, ``fd``, ``rx`` and the running
    :class:`FdOp` are touched only on the event loop.
    """

    def __init__(
        self,
        key: str,
        path: str | None,
        target: str,
        settings: dict[str, Any],
        write_timeout: float,
        io: str = "auto",
    ) -> None:
        self.key = key
        self.path = path  # filesystem path for serial://, else None
        self.target = target  # what serial_for_url receives
        self.settings = settings
        self.write_timeout = write_timeout
        self.io = io  # requested data path: auto, fd or thread
        self.refs = 0
        self.lock = TaskLock()
        name = os.path.basename(path) if path else key.split("://", 1)[-1] or key
        self.worker = LineWorker(f"serial-{name}")
        self.connected = False
        self.mode: str | None = None  # the data path of the open port: "fd" or "thread"
        self._ser: Any = None
        self._rx = bytearray()  # thread path: bytes read past the last reply (worker side)
        # fd path (event loop side)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fd: int | None = None
        self.rx = bytearray()  # bytes read past the last reply
        self.op: FdOp | None = None  # the operation on the fd (at most one at a time)

    # ------------------------------------------------------------ event loop side
    async def ensure(self, url: str) -> None:
        """Open the port if it is not open (first use, or after a lost link). Hold ``lock``."""
        if self.connected:
            return
        loop = asyncio.get_running_loop()
        want_fd = self.path is not None and self.io != "thread" and os.name == "posix"
        try:
            fd = await self.worker.run(self._w_open, want_fd)
        except TransportError:
            raise
        except _OPEN_ERRORS as exc:
            raise TransportOpenError(url, f"cannot open {self.target}: {exc}") from exc
        if fd is not None and not loop_watches(loop, fd):
            fd = None
        if fd is None and self.io == "fd":
            await self.worker.run(self._w_close)
            raise TransportOpenError(
                url,
                "io=fd needs a POSIX tty or pty whose fd the event loop can watch; "
                "use io=auto or io=thread",
            )
        self.loop, self.fd, self.rx = loop, fd, bytearray()
        self.mode = "thread" if fd is None else "fd"
        self.connected = True

    async def ready(self, url: str) -> None:
        """Before an operation (hold ``lock``): let an abandoned fd operation end, open the port."""
        op = self.op
        if op is not None:
            # It ends by its deadline at the latest; shield it: our cancellation must not end it.
            with contextlib.suppress(Exception):
                await asyncio.shield(op.fut)
        if not self.connected:
            await self.ensure(url)

    def detach(self) -> None:
        """Stop using the fd on the loop: end a running operation, remove the loop's callbacks."""
        op, fd = self.op, self.fd
        if op is not None:
            op.finish(exc=TransportError(op.url, "port closed during the operation"))
        self.fd = None
        if fd is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)

    def lost(self) -> None:
        """The link failed on the fd path (callbacks already removed): reopen on the next operation."""
        self.detach()
        self.connected = False

    async def drop(self) -> None:
        """Close the port (it reopens on the next operation)."""
        self.detach()
        self.connected = False
        await self.worker.run(self._w_close)

    async def call(self, url: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(url, *args)`` on the worker, mapping pyserial failures to typed errors. Hold ``lock``."""
        if not self.connected:
            await self.ensure(url)
        try:
            return await self.worker.run(fn, url, *args)
        except TransportError:
            raise
        except serial.SerialTimeoutException as exc:
            raise TransportTimeout(
                url, f"write did not complete within {self.write_timeout:g} s"
            ) from exc
        except _LINK_ERRORS as exc:
            await self.drop()
            raise LinkLostError(
                url, f"link lost ({exc}); it is reopened on the next operation"
            ) from exc

    async def shutdown(self) -> None:
        self.detach()
        self.connected = False
        try:
            await self.worker.run(self._w_close)
        finally:
            await self.worker.aclose()

    # ------------------------------------------------------------ operations (hold ``lock``)
    async def write(self, url: str, data: bytes) -> None:
        await self.ready(url)
        if self.fd is None:
            await self.call(url, self.w_write, data)
        else:
            await self._fd_run(FdOp(self, url, data, None, None, 0.0, 0))

    async def read_until(
        self, url: str, terminator: bytes, timeout: float, max_bytes: int
    ) -> bytes:
        await self.ready(url)
        if self.fd is None:
            return await self.call(url, self.w_read_until, terminator, timeout, max_bytes)
        return await self._fd_run(FdOp(self, url, b"", terminator, None, timeout, max_bytes))

    async def read_exactly(self, url: str, n: int, timeout: float) -> bytes:
        await self.ready(url)
        if self.fd is None:
            return await self.call(url, self.w_read_exactly, n, timeout)
        return await self._fd_run(FdOp(self, url, b"", None, n, timeout, 0))

    async def discard(self, url: str) -> int:
        await self.ready(url)
        if self.fd is None:
            return await self.call(url, self.w_discard)
        return await self._fd_guard(url, self.fd_discard, url)

    async def transaction(
        self, url: str, request: bytes, terminator: bytes, timeout: float, max_bytes: int
    ) -> bytes:
        await self.ready(url)
        if self.fd is None:
            return await self.call(url, self.w_transaction, request, terminator, timeout, max_bytes)
        await self._fd_guard(url, self.fd_discard, url)
        return await self._fd_run(FdOp(self, url, request, terminator, None, timeout, max_bytes))

    # ------------------------------------------------------------ fd path (event loop side)
    async def _fd_guard(self, url: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous fd step; an ``OSError`` is a lost link."""
        try:
            return fn(*args)
        except OSError as exc:
            await self.drop()
            raise link_lost(url, exc) from exc

    async def _fd_run(self, op: FdOp) -> Any:
        """Start ``op`` and wait for its end; a cancelled caller leaves it running to its end."""
        fut = op.start()
        try:
            if fut.done():  # done at once: written in one go, or the reply was already buffered
                return fut.result()
            return await fut
        except asyncio.CancelledError:
            if not op.finished:
                op.abandon()  # it runs on; the next operation waits for its end
            raise
        except LinkLostError:
            await self.drop()
            raise

    def fd_discard(self, url: str) -> int:
        """Drop buffered and pending input without blocking; return how many bytes there were."""
        assert self.fd is not None
        stale = len(self.rx)
        self.rx.clear()
        for _ in range(64):  # a device streaming faster than we drain cannot keep us here
            try:
                chunk = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:  # VMIN=0: an empty read means nothing is waiting
                break
            stale += len(chunk)
        if stale:
            log.debug("%s: discarded %d stale byte(s)", url, stale)
        return stale

    # ------------------------------------------------------------ worker side
    def _w_open(self, want_fd: bool = False) -> int | None:
        """Open and configure the port; with ``want_fd``, its fd set non-blocking (None: no fd)."""
        self._w_close()
        kwargs = dict(self.settings)
        if self.path is not None:
            kwargs["exclusive"] = True
        ser = serial.serial_for_url(self.target, do_not_open=True, **kwargs)
        ser.timeout = POLL_S
        ser.write_timeout = self.write_timeout
        ser.open()
        self._ser = ser
        self._rx.clear()
        fileno = getattr(ser, "fileno", None)
        if not want_fd or fileno is None:
            return None
        fd: int = fileno()
        os.set_blocking(fd, False)
        return fd

    def _w_close(self) -> None:
        ser, self._ser = self._ser, None
        self._rx.clear()
        if ser is not None:
            # pyserial's socket:// close() skips socket.close() when shutdown() fails (peer already
            # gone), leaking the fd: keep a handle and close it ourselves.
            sock = getattr(ser, "_socket", None)
            try:
                ser.close()
            except Exception as exc:  # closing a dead port may fail; it is gone anyway
                log.debug("%s: error while closing: %s", self.target, exc)
            finally:
                if sock is not None:
                    sock.close()

    def _w_port(self) -> Any:
        if self._ser is None:
            raise serial.PortNotOpenError()
        return self._ser

    def w_write(self, url: str, data: bytes) -> None:
        self._w_port().write(data)

    def w_discard(self, url: str, count: bool = True) -> int:
        """Drop buffered and pending input; with ``count``, return how much there was (one ioctl more)."""
        ser = self._w_port()
        stale = len(self._rx) + ser.in_waiting if count else 0
        self._rx.clear()
        ser.reset_input_buffer()
        if stale:
            log.debug("%s: discarded %d stale byte(s)", url, stale)
        return stale

    def w_read_until(self, url: str, terminator: bytes, timeout: float, max_bytes: int) -> bytes:
        ser = self._w_port()
        deadline = time.monotonic() + timeout
        buf, self._rx = self._rx, bytearray()
        searched = 0  # the terminator does not start before this offset
        while True:
            i = buf.find(terminator, searched)
            if i >= 0:
                end = i + len(terminator)
                self._rx = buf[end:]
                return bytes(buf[:end])
            if len(buf) >= max_bytes:
                raise ProtocolError(
                    url, f"no terminator {terminator!r} within {max_bytes} bytes", bytes(buf)
                )
            if time.monotonic() >= deadline:
                raise TransportTimeout(
                    url,
                    f"no {terminator!r}-terminated reply within {timeout:g} s; received {bytes(buf)!r}",
                )
            searched = max(0, len(buf) - len(terminator) + 1)
            # Block (at most POLL_S) for one byte, then take whatever arrived with it in one read.
            chunk = ser.read(1)
            if chunk:
                more = min(ser.in_waiting, max_bytes - len(buf) - 1)
                if more > 0:
                    chunk += ser.read(more)
                buf += chunk

    def w_read_exactly(self, url: str, n: int, timeout: float) -> bytes:
        ser = self._w_port()
        deadline = time.monotonic() + timeout
        buf, self._rx = self._rx, bytearray()
        while len(buf) < n:
            if time.monotonic() >= deadline:
                raise TransportTimeout(
                    url, f"{len(buf)} of {n} bytes within {timeout:g} s; received {bytes(buf)!r}"
                )
            buf += ser.read(max(1, min(ser.in_waiting, n - len(buf))))
        self._rx = buf[n:]
        return bytes(buf[:n])

    def w_transaction(
        self, url: str, request: bytes, terminator: bytes, timeout: float, max_bytes: int
    ) -> bytes:
        self.w_discard(url, log.isEnabledFor(logging.DEBUG))
        self.w_write(url, request)
        return self.w_read_until(url, terminator, timeout, max_bytes)


__all__ = ["POLL_S", "Line"]
