"""Per-identity token buckets and a bounded queue that is fair between identities.

One implementation for every way in: the MQTT API limits each broker user's requests
(``mqtt.request_rate``/``request_burst``, :mod:`bridge.mqttrequests`) and the MCP server
each agent's tool calls (its quota's ``tool_calls_per_s``/``tool_call_burst``,
:mod:`bridge.mcptools`) with :class:`RateLimiter`; the MQTT API's request queue is a
:class:`FairQueue`, so one user's burst waits behind its own requests, not in front of
everybody else's.

Neither ever blocks: :meth:`RateLimiter.admit` says yes or no at once, and
:meth:`FairQueue.put_nowait` raises :class:`asyncio.QueueFull` when the queue is full;
the caller refuses the request ("busy, retry") without reading it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Bucket", "FairQueue", "RateLimiter"]

T = TypeVar("T")

#: identities idle this long are forgotten once there are :data:`MAX_KEYS` of them (s)
IDLE_S = 60.0
MAX_KEYS = 10_000


@dataclass
class Bucket:
    """One identity's token bucket: ``tokens`` left at ``t``; ``told``: when it was last told
    "busy" (see :meth:`RateLimiter.tell`)."""

    tokens: float
    t: float
    told: float = -1e9


class RateLimiter:
    """Token buckets by identity: ``rate`` tokens a second, at most ``burst`` saved up; a
    new identity starts with a full bucket. ``clock``: seconds (``time.monotonic``)."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst = float(rate), float(burst)
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}

    def _bucket(self, key: str, rate: float, burst: float) -> Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_KEYS:  # identities come and go: forget idle ones
                self._buckets = {k: b for k, b in self._buckets.items() if now - b.t < IDLE_S}
            bucket = self._buckets[key] = Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.t) * rate)
        bucket.t = now
        return bucket

    def admit(self, key: str, *, rate: float | None = None, burst: float | None = None) -> bool:
        """Take a token from ``key``'s bucket; False (nothing taken) when it is empty.
        ``rate``/``burst``: this identity's own, instead of the limiter's."""
        bucket = self._bucket(
            key, self.rate if rate is None else rate, self.burst if burst is None else burst
        )
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def retry_after(self, key: str, *, rate: float | None = None) -> float:
        """Seconds until ``key``'s bucket holds a token again (0: it does now)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        missing = 1.0 - bucket.tokens - max(0.0, self._clock() - bucket.t) * (rate or self.rate)
        return max(0.0, missing / (rate or self.rate))

    def tell(self, key: str, every_s: float = 1.0) -> bool:
        """Whether to tell ``key`` it is refused now: at most once per ``every_s`` (the
        refusals in between are only counted, so a flood is not answered one by one)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(self.burst, now)
        if now - bucket.told < every_s:
            return False
        bucket.told = now
        return True


class FairQueue(Generic[T]):
    """A bounded queue served round-robin between identities, in priority classes.

    :meth:`put_nowait` adds ``item`` for ``key`` in class ``priority`` (0 first) or raises
    :class:`asyncio.QueueFull` once ``maxsize`` items wait; :meth:`get` takes from the
    lowest class that has items, from the identity whose turn it is: each identity's items
    in the order they came, one identity after the other. One identity's hundred
    requests then delay another's by at most one.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._classes: dict[int, OrderedDict[str, deque[T]]] = {}
        self._size = 0
        self._ready = asyncio.Semaphore(0)

    def qsize(self) -> int:
        return self._size

    def put_nowait(self, item: T, *, key: str, priority: int = 1) -> None:
        if self._size >= self.maxsize:
            raise asyncio.QueueFull
        turns = self._classes.setdefault(priority, OrderedDict())
        turns.setdefault(key, deque()).append(item)
        self._size += 1
        self._ready.release()

    async def get(self) -> T:
        await self._ready.acquire()
        priority = min(p for p, turns in self._classes.items() if turns)
        turns = self._classes[priority]
        key, items = next(iter(turns.items()))
        item = items.popleft()
        if items:
            turns.move_to_end(key)  # its next item waits for everybody else's turn
        else:
            del turns[key]
        self._size -= 1
        return item
