"""One bounded wait for every layer: :func:`bounded` (``asyncio.timeout``, never
``asyncio.wait_for``).

On Python 3.11, ``asyncio.wait_for(call, limit)`` returns ``call``'s outcome and swallows
the caller's cancellation when the two arrive together (the call completes just as the
caller is cancelled). A task that must stop -- a campaign's lease keeper, a station's
poll, an e-stop's drain -- then carries on, and whoever waits for it waits forever
(seen: the fault campaign's hang, issue 12). ``asyncio.timeout`` has no such window
(Python 3.12 rebuilt ``wait_for`` on it). Also :func:`connect_failure`, the one wording of
why a bounded connection attempt failed. Pure: no I/O, so loops/ and bridge/ may import it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["bounded", "connect_failure"]

_T = TypeVar("_T")


async def bounded(call: Awaitable[_T], limit_s: float | None) -> _T:
    """``await call``, raising TimeoutError after ``limit_s`` real seconds (None: no limit);
    a cancellation of the caller always propagates."""
    async with asyncio.timeout(limit_s):
        return await call


def connect_failure(exc: OSError, limit_s: float) -> str:
    """Why a connection attempt bounded by ``limit_s`` real seconds failed, in the words an
    error line uses: no answer in time, refused, or the system's own reason."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {limit_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc)
