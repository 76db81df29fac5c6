"""The serial line's fd data path: one operation on a non-blocking tty fd, driven by the event loop.

See :mod:`instruments.transports.serial` for when a line takes this path. :class:`FdOp`
needs of its line only what :class:`FdLine` names (:class:`~instruments.transports.serialline.Line`
provides it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol

from instruments.errors import LinkLostError, ProtocolError, TransportTimeout

log = logging.getLogger(__name__)

#: bytes asked of one ``os.read`` on the fd path (a tty's input queue holds 4 KiB)
READ_SIZE = 65536


class FdLine(Protocol):
    """What an :class:`FdOp` uses of its line: the loop and fd, the receive buffer, the running op."""

    loop: asyncio.AbstractEventLoop | None
    fd: int | None
    rx: bytearray
    op: FdOp | None
    write_timeout: float

    def lost(self) -> None: ...


class FdOp:
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
        line: FdLine,
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
                self.finish(exc=link_lost(self.url, exc))
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
            self.finish(exc=link_lost(self.url, exc))
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
            chunk = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(exc=link_lost(self.url, exc))
            return
        if not chunk:  # readable yet empty: what pyserial reports as a disconnected device
            self.finish(
                exc=link_lost(
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
            chunk = os.read(self.fd, READ_SIZE)
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


def link_lost(url: str, exc: BaseException | str) -> LinkLostError:
    return LinkLostError(url, f"link lost ({exc}); it is reopened on the next operation")


def _noop() -> None:
    pass


def loop_watches(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    """Whether ``loop`` can watch ``fd`` (add_reader; not on a proactor loop)."""
    try:
        loop.add_reader(fd, _noop)
    except (NotImplementedError, ValueError, OSError):
        return False
    loop.remove_reader(fd)
    return True


__all__ = ["READ_SIZE", "FdLine", "FdOp", "link_lost", "loop_watches"]
