"""The device end of a simulated serial line: a pty pair behind a stable symlink.

:class:`PtyPort` opens an ``os.openpty()`` pair, links ``<tmp dir>/<name>``
to the slave (the driver opens that path: ``serial://<tmp>/<name>``), reads
the master on the event loop with ``loop.add_reader`` (no thread) and hands
every chunk of bytes to ``on_data``; :meth:`PtyPort.send` writes to the master
without blocking (``loop.add_writer`` waits for room). The simulator keeps the
slave open as well, so the master never reads EIO when the driver closes its
end. :meth:`PtyPort.reopen` unplugs the line (the driver's open port fails
with EIO) and plugs a fresh pty in behind the same symlink. Used by the pump
chain (:mod:`simulators.pump`) and the balance (:mod:`simulators.balance`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import tty
from collections.abc import Callable

log = logging.getLogger(__name__)


class PtyPort:
    """A pty pair behind ``<tmp>/<name>``. See the module docstring. Call on the event loop."""

    def __init__(self, name: str, on_data: Callable[[bytes], None], *, prefix: str = "lb-") -> None:
        self.name = name
        self.prefix = prefix
        self._on_data = on_data
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dir: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._tx = bytearray()

    @property
    def is_open(self) -> bool:
        """Between :meth:`open` and :meth:`close`."""
        return self._dir is not None

    @property
    def link_path(self) -> str:
        """``<tmp>/<name>``, the path the driver opens (stable across :meth:`reopen`)."""
        if self._dir is None:
            raise RuntimeError(f"the {self.name} pty is not open")
        return os.path.join(self._dir, self.name)

    def open(self) -> None:
        """Create the temporary directory, the pty pair and the symlink (on the running loop)."""
        if self._dir is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._dir = tempfile.mkdtemp(prefix=self.prefix)
        try:
            self._open_pty()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the pty and remove the symlink and its directory (idempotent)."""
        self._close_pty()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def reopen(self) -> None:
        """Unplug: close the master (the driver's port fails) and plug a fresh pty in."""
        if self._dir is None:
            return
        self._close_pty()
        self._open_pty()

    def _open_pty(self) -> None:
        assert self._loop is not None
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/NL translation before the driver configures the port
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        tmp = self.link_path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.link_path)
        self._tx.clear()
        self._loop.add_reader(master, self._readable)

    def _close_pty(self) -> None:
        master, slave = self._master, self._slave
        self._master = self._slave = None
        if master is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(master)
            self._loop.remove_writer(master)
        for fd in (master, slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: no slave open (cannot happen while we hold one)
            return
        if data:
            self._on_data(data)

    def send(self, data: bytes) -> None:
        """Write to the line (buffered; never blocks the loop). Dropped when the pty is closed."""
        if self._master is None:
            return
        self._tx += data
        self._flush()

    def _flush(self) -> None:
        if self._master is None or self._loop is None:
            return
        try:
            n = os.write(self._master, self._tx)
            del self._tx[:n]
        except BlockingIOError:
            pass
        except OSError as exc:
            log.debug("%s pty: write failed: %s", self.name, exc)
            self._tx.clear()
        if self._tx:
            self._loop.add_writer(self._master, self._flush)
        else:
            self._loop.remove_writer(self._master)


__all__ = ["PtyPort"]
