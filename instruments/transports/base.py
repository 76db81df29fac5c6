"""What every transport shares: URL options, the per-device worker thread, open/close.

A transport is one small async object per link. Blocking libraries (pyserial,
OpenCV) run on :class:`DeviceWorker`, one dedicated thread per device, never on
the event loop; callback libraries (paho, bleak) hand their data to asyncio
queues with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from instruments.deadline import bounded
from instruments.errors import InvalidURLError, TransportError, TransportTimeout

T = TypeVar("T")


def split_url(url: str) -> tuple[str, str, dict[str, str]]:
    """Split ``scheme://rest?opts`` into ``(scheme, rest_without_query, options)``.

    Options must be unique; an option given twice is an error (a typo like
    ``?baudrate=9600&baudrate=19200`` should not silently pick one).
    """
    parts = urlsplit(url)
    if not parts.scheme:
        raise InvalidURLError(url, "no scheme (expected e.g. serial://, modbus-tcp://, mqtt://)")
    opts: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in opts:
            raise InvalidURLError(url, f"option {key!r} given twice")
        opts[key] = value
    return parts.scheme.lower(), url.split("?", 1)[0], opts


class URLOptions:
    """Typed access to a URL's query options; ``finish()`` rejects leftovers (typos)."""

    def __init__(self, url: str, options: Mapping[str, str]) -> None:
        self.url = url
        self._opts = dict(options)

    def _take(self, name: str, default: T, convert: Callable[[str], T], what: str) -> T:
        if name not in self._opts:
            return default
        raw = self._opts.pop(name)
        try:
            return convert(raw)
        except (TypeError, ValueError):
            raise InvalidURLError(self.url, f"option {name}={raw!r} is not {what}") from None

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        return self._take(name, default, builtins.str, "a string")

    def optional_str(self, name: builtins.str) -> builtins.str | None:
        return self._opts.pop(name, None)

    def int(self, name: builtins.str, default: builtins.int) -> builtins.int:
        return self._take(name, default, builtins.int, "an integer")

    def float(self, name: builtins.str, default: builtins.float) -> builtins.float:
        value = self._take(name, default, builtins.float, "a number")
        if value != value or value < 0:  # NaN or negative
            raise InvalidURLError(
                self.url, f"option {name}={value!r} must be a non-negative number"
            )
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        def convert(raw: builtins.str) -> builtins.bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)

        return self._take(name, default, convert, "a boolean (true/false)")

    def choice(
        self, name: builtins.str, default: builtins.str, allowed: tuple[builtins.str, ...]
    ) -> builtins.str:
        value = self.str(name, default)
        if value not in allowed:
            raise InvalidURLError(
                self.url, f"option {name}={value!r} is not one of {', '.join(allowed)}"
            )
        return value

    def finish(self) -> None:
        """Raise if any option was not consumed: an unknown option is almost always a typo."""
        if self._opts:
            raise InvalidURLError(self.url, f"unknown option(s): {', '.join(sorted(self._opts))}")


class DeviceWorker:
    """One dedicated thread per device for a blocking library.

    ``await worker.run(fn, *args)`` runs ``fn`` on the device's thread. Calls run
    in submission order, one at a time, so the library never sees two threads.
    If ``timeout`` passes, :class:`TransportTimeout` is raised; the blocking call
    itself cannot be interrupted and finishes on its thread (its result is dropped).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lb-{name}")
        )

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None = None,
        url: str = "",
        **kwargs: Any,
    ) -> T:
        if self._executor is None:
            raise TransportError(url or self.name, "device worker is closed")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        if timeout is None:
            return await fut
        try:
            return await bounded(fut, timeout)
        except TimeoutError:
            raise TransportTimeout(url or self.name, f"no answer within {timeout:g} s") from None

    def close(self, wait: bool = True) -> None:
        """Stop the thread (idempotent). With ``wait``, joins it after queued calls finish."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    async def aclose(self) -> None:
        """Like :meth:`close`, joining the thread without blocking the event loop."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


class Transport(abc.ABC):
    """Base of every transport: opened from a URL, idempotent close, reconnect on demand.

    Subclasses implement ``_open`` and ``_close``. ``open()`` wraps failures of
    ``_open`` so the error names the URL. After a dropped link, operations call
    :meth:`ensure_open` which reopens once.
    """

    #: URL schemes this transport accepts
    schemes: tuple[str, ...] = ()

    def __init__(self, url: str) -> None:
        self.url = url
        self._is_open = False
        self._open_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._is_open

    async def open(self) -> None:
        async with self._open_lock:
            if self._is_open:
                return
            await self._open()
            self._is_open = True

    async def ensure_open(self) -> None:
        if not self._is_open:
            await self.open()

    async def reconnect(self) -> None:
        """Close (ignoring errors of a dead link) and open again."""
        with contextlib.suppress(Exception):
            await self.close()
        await self.open()

    async def close(self) -> None:
        """Close the link. Idempotent: closing twice (or a never-opened link) is fine."""
        if not self._is_open:
            await self._release()
            return
        self._is_open = False
        await self._close()

    async def _release(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Free resources held by a transport whose open failed or was never done."""

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    async def __aenter__(self) -> Transport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "open" if self._is_open else "closed"
        return f"<{type(self).__name__} {self.url} {state}>"


def thread_is_alive(name_prefix: str) -> bool:
    """True if a thread whose name starts with ``name_prefix`` is alive (used by tests)."""
    return any(t.name.startswith(name_prefix) and t.is_alive() for t in threading.enumerate())
