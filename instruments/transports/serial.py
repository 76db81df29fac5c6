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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import serial

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    ProtocolError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.base import Transport, URLOptions, split_url

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
#: bytes asked of one ``os.read`` on the fd path (a tty's input queue holds 4 KiB)
_READ_SIZE = 65536

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


class _TaskLock:
    """An asyncio lock that the task holding it may re-enter.

    A driver can hold ``transport.lock`` around a multi-step exchange and still
    call ``transaction()`` (which takes the lock too) inside it.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is not None and self._owner is task:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner = task
        self._depth = 1

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


class _LineWorker:
    """The line's dedicated thread (``lb-serial-<port>``): pyserial calls, one at a time, in order.

    The contract of :class:`~instruments.transports.base.DeviceWorker`, with a
    cheaper hop per call: the thread takes jobs from a ``queue.SimpleQueue``,
    hands each result back with one ``loop.call_soon_threadsafe`` and blocks
    again at once. ``run_in_executor`` chains a concurrent future to an asyncio
    one and runs the executor's bookkeeping (locks, a condition, an idle
    semaphore) around each call, on both threads. Measured on a 2-core VM, a
    bare round trip costs ~20-40 us here against ~50-65 us through
    ``run_in_executor``: on a serial query that is most of our overhead over raw
    pyserial. A job whose awaiting
    task was cancelled before it started is skipped; one already running
    finishes on the thread and its result is dropped. Deadlines are enforced by
    the jobs themselves (reads poll every :data:`POLL_S`; writes have pyserial's
    write timeout).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _start(self) -> threading.Thread:
        thread = threading.Thread(
            target=_worker_main, args=(self._queue,), name=f"lb-{self.name}", daemon=True
        )
        thread.start()
        # A worker dropped without close() still ends its thread (the thread holds only the queue).
        weakref.finalize(self, self._queue.put, None)
        self._thread = thread
        return thread

    async def run(self, fn: Callable[..., T], *args: Any, url: str = "") -> T:
        """Run ``fn(*args)`` on the line's thread and return its result (or raise its error)."""
        if self._closed:
            raise TransportError(url or self.name, "device worker is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._thread is None:
            self._start()
        self._queue.put((fut, fn, args))
        return await fut

    def _cancel_pending(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _hand_back(job[0], None, None, cancel=True)

    def close(self) -> None:
        """Stop the thread (idempotent), joining it after the running call; queued calls are cancelled."""
        if self._closed:
            return
        self._closed = True
        self._cancel_pending()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    async def aclose(self) -> None:
        """Like :meth:`close`, waiting for the running call without blocking the event loop."""
        if self._closed:
            return
        self._closed = True
        self._cancel_pending()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put((done, _stop, ()))
        await asyncio.shield(done)
        thread.join()  # the thread has handed back its last result: it is ending


#: (future to settle, function, arguments)
_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _stop() -> None:
    """The last job of a worker thread (see ``_LineWorker.aclose``)."""


def _worker_main(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        fut, fn, args = job
        del job
        if fut.cancelled():  # its task gave up while it was queued: never touch the port for it
            continue
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            _hand_back(fut, None, exc)
        else:
            _hand_back(fut, result, None)
        if fn is _stop:
            return
        del fut, fn, args


def _hand_back(
    fut: asyncio.Future[Any], result: Any, exc: BaseException | None, *, cancel: bool = False
) -> None:
    """Settle ``fut`` on its own loop (from the worker thread, or to cancel a queued job)."""
    try:
        fut.get_loop().call_soon_threadsafe(_settle, fut, result, exc, cancel)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None, cancel: bool) -> None:
    if fut.done():
        return
    if cancel:
        fut.cancel()
    elif exc is not None:
        if isinstance(exc, StopIteration):  # a future refuses it (TypeError: never settled)
            exc = RuntimeError(f"worker call raised {exc!r}")
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class _Line:
    """One open port shared by every transport on it (same process, same event loop).

    Attributes starting with ``_w`` and the pyserial object are touched only on
    the worker thread. On the fd path, ``fd``, ``rx`` and the running
    :class:`_FdOp` are touched only on the event loop.
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
        self.lock = _TaskLock()
        name = os.path.basename(path) if path else key.split("://", 1)[-1] or key
        self.worker = _LineWorker(f"serial-{name}")
        self.connected = False
        self.mode: str | None = None  # the data path of the open port: "fd" or "thread"
        self._ser: Any = None
        self._rx = bytearray()  # thread path: bytes read past the last reply (worker side)
        # fd path (event loop side)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fd: int | None = None
        self.rx = bytearray()  # bytes read past the last reply
        self.op: _FdOp | None = None  # the operation on the fd (at most one at a time)

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
        if fd is not None and not _loop_watches(loop, fd):
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
            await self._fd_run(_FdOp(self, url, data, None, None, 0.0, 0))

    async def read_until(
        self, url: str, terminator: bytes, timeout: float, max_bytes: int
    ) -> bytes:
        await self.ready(url)
        if self.fd is None:
            return await self.call(url, self.w_read_until, terminator, timeout, max_bytes)
        return await self._fd_run(_FdOp(self, url, b"", terminator, None, timeout, max_bytes))

    async def read_exactly(self, url: str, n: int, timeout: float) -> bytes:
        await self.ready(url)
        if self.fd is None:
            return await self.call(url, self.w_read_exactly, n, timeout)
        return await self._fd_run(_FdOp(self, url, b"", None, n, timeout, 0))

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
        return await self._fd_run(_FdOp(self, url, request, terminator, None, timeout, max_bytes))

    # ------------------------------------------------------------ fd path (event loop side)
    async def _fd_guard(self, url: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous fd step; an ``OSError`` is a lost link."""
        try:
            return fn(*args)
        except OSError as exc:
            await self.drop()
            raise _link_lost(url, exc) from exc

    async def _fd_run(self, op: _FdOp) -> Any:
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
                chunk = os.read(self.fd, _READ_SIZE)
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


class _FdOp:
    """One operation on a line's non-blocking fd, driven by event loop callbacks (no thread).

    Writes ``request`` (``os.write``; on ``EAGAIN`` or a partial write
    ``loop.add_writer`` waits for room, within the line's write timeout), then,
    with a ``terminator`` or a count ``n``, reads into the line's buffer from a
    ``loop.add_reader`` callback until the reply is complete; a ``loop.call_at``
    timer is the deadline (``timeout`` s, counted from the end of the write).
    :meth:`start` returns the future of the outcome: the reply, or a typed
    error (:class:`TransportTimeout` with the partial bytes, :class:`ProtocolError`
    past ``max_bytes``, :class:`LinkLostError`). Bytes after the reply stay in
    the line's buffer for the next read. Cancelling the caller abandons the operation
    (:meth:`abandon`): it runs to its end, its reply is dropped, and the line's next
    operation waits for it, so a late reply never answers the next request.
    Callbacks and timer are removed when it ends, whatever the end.
    """

    __slots__ = (
        "line",
        "loop",
        "fd",
        "url",
        "tx",
        "terminator",
        "n",
        "timeout",
        "max_bytes",
        "searched",
        "fut",
        "timer",
        "reading",
        "writing",
        "abandoned",
        "finished",
    )

    def __init__(
        self,
        line: _Line,
        url: str,
        request: bytes,
        terminator: bytes | None,
        n: int | None,
        timeout: float,
        max_bytes: int,
    ) -> None:
        assert line.loop is not None and line.fd is not None
        self.line = line
        self.loop = line.loop
        self.fd = line.fd
        self.url = url
        self.tx = memoryview(request)
        self.terminator = terminator
        self.n = n
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.searched = 0  # the terminator does not start before this offset of line.rx
        self.fut: asyncio.Future[Any] = self.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.reading = self.writing = False
        self.abandoned = self.finished = False

    def start(self) -> asyncio.Future[Any]:
        """Write what the fd takes now, then start reading; the future may be done already."""
        if self.tx:
            try:
                self._write()
            except OSError as exc:
                self.finish(exc=_link_lost(self.url, exc))
                return self.fut
            if self.tx:  # the port's output queue is full: wait for room
                self.line.op = self
                self.writing = True
                self.loop.add_writer(self.fd, self._on_writable)
                self.timer = self.loop.call_at(
                    self.loop.time() + self.line.write_timeout, self._on_deadline
                )
                return self.fut
        self._read_phase()
        return self.fut

    def abandon(self) -> None:
        """The caller was cancelled: run on to the end, then settle a fresh future with None."""
        self.abandoned = True
        self.fut = self.loop.create_future()

    def finish(self, result: Any = None, exc: BaseException | None = None) -> None:
        """End the operation (idempotent): remove callbacks and timer, settle the future."""
        if self.finished:
            return
        self.finished = True
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        line = self.line
        if line.op is self:
            line.op = None
        if isinstance(exc, LinkLostError):
            line.lost()
        fut = self.fut
        if fut.done():  # cancelled with its task, and not abandoned: nobody is waiting
            return
        if self.abandoned:
            if exc is not None:
                log.debug("%s: abandoned exchange ended: %s", self.url, exc)
            else:
                log.debug("%s: dropped the reply of an abandoned exchange: %r", self.url, result)
            fut.set_result(None)
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    # ------------------------------------------------------------ write
    def _write(self) -> None:
        """Write until done or ``EAGAIN``; raises ``OSError`` on a failed port."""
        while self.tx:
            try:
                k = os.write(self.fd, self.tx)
            except BlockingIOError:
                return
            self.tx = self.tx[k:]

    def _on_writable(self) -> None:
        try:
            self._write()
        except OSError as exc:
            self.finish(exc=_link_lost(self.url, exc))
            return
        if self.tx:
            return
        self.writing = False
        self.loop.remove_writer(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._read_phase()

    # ------------------------------------------------------------ read
    def _read_phase(self) -> None:
        if self.terminator is None and self.n is None:
            self.finish(None)
        elif not self._take():
            self.line.op = self
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)
            self.timer = self.loop.call_at(self.loop.time() + self.timeout, self._on_deadline)

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(exc=_link_lost(self.url, exc))
            return
        if not chunk:  # readable yet empty: what pyserial reports as a disconnected device
            self.finish(
                exc=_link_lost(
                    self.url, "device reports readiness to read but returned no data (unplugged?)"
                )
            )
            return
        self.line.rx += chunk
        self._take()

    def _take(self) -> bool:
        """Finish with the reply if the buffer holds it (or with an error past ``max_bytes``)."""
        rx = self.line.rx
        term = self.terminator
        if term is None:
            n = self.n
            assert n is not None
            if len(rx) < n:
                return False
            reply = bytes(rx[:n])
            del rx[:n]
            self.finish(reply)
            return True
        i = rx.find(term, self.searched, self.max_bytes)
        if i >= 0:
            end = i + len(term)
            reply = bytes(rx[:end])
            del rx[:end]
            self.finish(reply)
            return True
        if len(rx) >= self.max_bytes:
            got = bytes(rx[: self.max_bytes])
            del rx[: self.max_bytes]
            self.finish(
                exc=ProtocolError(
                    self.url, f"no terminator {term!r} within {self.max_bytes} bytes", got
                )
            )
            return True
        self.searched = max(0, len(rx) - len(term) + 1)
        return False

    def _on_deadline(self) -> None:
        self.timer = None
        if self.writing:
            self.finish(
                exc=TransportTimeout(
                    self.url, f"write did not complete within {self.line.write_timeout:g} s"
                )
            )
            return
        try:  # one last look: bytes whose reader callback has not run yet
            chunk = os.read(self.fd, _READ_SIZE)
        except OSError:  # the next operation finds out
            chunk = b""
        if chunk:
            self.line.rx += chunk
            if self._take():
                return
        rx = self.line.rx
        got = bytes(rx[: self.max_bytes] if self.terminator is not None else rx)
        rx.clear()
        if self.terminator is not None:
            what = f"no {self.terminator!r}-terminated reply within {self.timeout:g} s"
        else:
            what = f"{len(got)} of {self.n} bytes within {self.timeout:g} s"
        self.finish(exc=TransportTimeout(self.url, f"{what}; received {got!r}"))


def _link_lost(url: str, exc: BaseException | str) -> LinkLostError:
    return LinkLostError(url, f"link lost ({exc}); it is reopened on the next operation")


def _noop() -> None:
    pass


def _loop_watches(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    """Whether ``loop`` can watch ``fd`` (add_reader; not on a proactor loop)."""
    try:
        loop.add_reader(fd, _noop)
    except (NotImplementedError, ValueError, OSError):
        return False
    loop.remove_reader(fd)
    return True


# Lines per event loop, by port key. Guarded by _LINES_LOCK (loops may live on several threads).
_LINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Line]] = (
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
        self._line: _Line | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def port(self) -> str:
        """The canonical port this transport talks on (the key under which the line is shared)."""
        return self._key

    @property
    def lock(self) -> _TaskLock:
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

    def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Line:
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
                line = _Line(
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
    async def _release_line(loop: asyncio.AbstractEventLoop, line: _Line) -> None:
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

    def _open_line(self) -> _Line:
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


__all__ = ["SerialTransport"]
