"""A small JSON file of secrets' hashes, kept private: the agents' token file and the lab
page's password file (:mod:`bridge.agenttokens`, :mod:`bridge.webusers`).

:class:`SecretFile` reads the file again whenever it changes on disk (inode, mtime, size),
so a revocation or a new password takes effect on the next request of a running server.
It refuses a file that others can read or write (mode ``& 0o077``), as ssh refuses such a
key, and writes atomically: a temporary file in the same folder (mode 0600), fsync'ed,
renamed over the old one, the folder fsync'ed; one writer at a time (``flock`` on a lock
file beside it). Problems are ``error_cls`` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["SecretFile"]

T = TypeVar("T")


class SecretFile(Generic[T]):
    """One private JSON file, parsed by ``parse`` into a ``T`` (cached until the file changes).

    ``what``: how messages name it ("the agent token file"); ``missing``: what
    :meth:`load` returns when there is no file; ``error_cls``: the error raised.
    """

    def __init__(
        self,
        path: Path,
        *,
        what: str,
        parse: Callable[[Any], T],
        missing: Callable[[], T],
        error_cls: type[ValueError],
        fix: str,
    ) -> None:
        self.path = Path(path)
        self.what = what
        self._parse = parse
        self._missing = missing
        self._error = error_cls
        self._fix = fix
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._value: T | None = None

    def load(self) -> T:
        """The parsed file as it is now (read again when it changed)."""
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._value = None, None
                return self._missing()
            except OSError as exc:
                raise self._error(f"cannot read {self.what} {self.path}: {exc}") from None
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp or self._value is None:
                self._check_mode(st)
                self._value = self._parse(self._read())
                self._stamp = stamp
            return self._value

    def _check_mode(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise self._error(f"{self.what} {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise self._error(
                f"{self.what} {self.path} is accessible to others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {self.path}"
            )

    def _read(self) -> Any:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise self._error(f"cannot read {self.what} {self.path}: {exc}") from None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise self._error(
                f"{self.what} {self.path} is not valid JSON ({exc}): {self._fix}"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time (two writers at once would lose one's change)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, data: Any) -> None:
        """Replace the file with ``data`` as JSON, atomically, mode 0600 (hold :meth:`locked`)."""
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself is durable
        finally:
            os.close(dfd)
