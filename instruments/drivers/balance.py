"""Analytical balance, MT-SICS subset over serial (9600 8N1, CR LF), PROTOCOLS.md "Analytical balance".

Commands and replies are ASCII lines ending in ``\\r\\n``. A weight reply is
``<cmd> <status> <value> <unit>``, the value right-aligned in a 10-character
field: ``S S      12.3456 g``.

=======  ==============================  ==========================================
command  reply                           meaning
=======  ==============================  ==========================================
``S``    ``S S <value> g``               the next stable weight
``SI``   ``S S|D <value> g``             the weight now, stable (S) or dynamic (D)
``SIR``  ``SI`` replies, ~10 per s       streaming, until any other command
``Z``    ``Z A``                         zero at the next stable reading
``ZI``   ``ZI S`` / ``ZI D``             zero now (on a stable / dynamic reading)
``T``    ``T S <value> g``               tare at the next stable reading
``TA``   ``TA A <value> g``              the tare weight in use
``TAC``  ``TAC A``                       clear the tare
``I2``   ``I2 A "<model> <capacity> g"``  device data
``I4``   ``I4 A "<serial number>"``      serial number
``@``    ``I4 A "<serial number>"``      reset: cancels pending commands and streaming
=======  ==============================  ==========================================

Error replies become typed errors (:mod:`instruments.errors`): ``<cmd> I``
:class:`BalanceNotExecutable`, ``<cmd> +`` :class:`BalanceOverload`, ``<cmd>
-`` :class:`BalanceUnderload`, ``ES`` :class:`BalanceSyntaxError`, ``ET``
:class:`BalanceTransmissionError`, ``EL`` :class:`BalanceLogicalError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

from instruments.declare import ACTUATE, READ, SAFER, Call, Fault, Param, Set, declare
from instruments.driver import Channel, Driver, retry_idempotent
from instruments.errors import (
    BalanceError,
    BalanceLogicalError,
    BalanceNotExecutable,
    BalanceOverload,
    BalanceSyntaxError,
    BalanceTransmissionError,
    BalanceUnderload,
    ProtocolError,
    TransportTimeout,
)
from instruments.transports.base import Transport

log = logging.getLogger(__name__)

CRLF = b"\r\n"
#: ``<cmd> <status>`` error replies -> error type
STATUS_ERRORS: dict[str, type[BalanceError]] = {
    "I": BalanceNotExecutable,
    "+": BalanceOverload,
    "-": BalanceUnderload,
}
#: whole-line error replies -> error type
LINE_ERRORS: dict[str, type[BalanceError]] = {
    "ES": BalanceSyntaxError,
    "ET": BalanceTransmissionError,
    "EL": BalanceLogicalError,
}
_WEIGHT_RE = re.compile(r"(S|T|TA) ([SDA]) +([+-]?\d+(?:\.\d*)?) ([A-Za-z]+)")
_STATUS_RE = re.compile(r"(S|SI|Z|ZI|T|TA|TAC|I2|I4) ([SDAI+-])")
_TEXT_RE = re.compile(r'(I2|I4) A "([^"]*)"')


@dataclass(frozen=True)
class Weighing:
    """One weight reply: ``value`` in ``unit`` (g), ``stable`` False for a dynamic reading."""

    value: float
    unit: str
    stable: bool
    raw: str

    @property
    def grams(self) -> float:
        return self.value


class _LineLink(Protocol):
    url: str

    async def write(self, data: bytes) -> None: ...

    async def read_until(
        self, terminator: bytes, timeout: float | None = None, max_bytes: int = 4096
    ) -> bytes: ...

    async def discard_input(self) -> int: ...

    async def transaction(
        self, request: bytes, terminator: bytes, timeout: float | None = None, max_bytes: int = 4096
    ) -> bytes: ...


class Balance(Driver):
    """Analytical balance speaking an MT-SICS subset on its own serial port (module docstring).

    ``timeout``: reply deadline of immediate commands (s); ``stable_timeout``:
    deadline of the commands that wait for a stable reading (``S``, ``Z``,
    ``T``), longer than the balance's own timeout so that its ``I`` reply
    arrives. Weights are in grams.

    Reads (``S``, ``SI``, ``TA``, ``I2``, ``I4``) are retried on a timeout or
    a garbled line; zero and tare are not (a lost reply does not mean the
    balance did not zero). A dynamic reading (``S D``) is never reported as
    stable. :meth:`stream` iterates over ``SIR`` readings; any other command
    (and :meth:`close`) ends the stream first: the driver sends ``TA`` (which
    changes nothing) and drops stream lines until its reply.

    Zero and tare are actuations (declared ``ACTUATE``: ``zeroed`` and
    ``tared`` are the channels they set), so an envelope can bound them with
    rules. Safe state: the balance moves and heats nothing; its safe state is
    a quiet line (:meth:`stop_stream`).

    Device faults (``faults``), at any time: ``overload`` and ``underload``
    (``SI`` answers ``S +`` / ``S -``): the pan carries more than the balance
    weighs, or less than nothing (a load put on it, the pan lifted, the vessel
    knocked off): the balance no longer weighs what is on it, so it witnesses
    nothing, and liquid dispensed now may go where no vessel is.
    """

    kind: ClassVar[str] = "balance"
    safe_state_calls = (Call("stop_stream"),)
    faults = {
        "overload": Fault(
            "overload",
            "the balance is overloaded (S +): more is on the pan than it weighs; it no longer "
            "weighs what the bench put there",
        ),
        "underload": Fault(
            "underload",
            "the balance is underloaded (S -): the pan is lifted or the vessel is off it",
        ),
    }
    #: most stream lines dropped while a stream is being stopped (about 10 a second)
    MAX_STOP_LINES: ClassVar[int] = 200
    ATTEMPTS: ClassVar[int] = 3

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float = 1.0,
        stable_timeout: float = 15.0,
        name: str | None = None,
    ) -> None:
        needed = ("write", "read_until", "discard_input", "transaction")
        missing = [m for m in needed if not callable(getattr(transport, m, None))]
        if missing:
            raise TypeError(
                f"Balance needs a line-oriented byte transport (serial://, socket://), got "
                f"{type(transport).__name__} for {transport.url} (missing {', '.join(missing)})"
            )
        for label, value in (("timeout", timeout), ("stable_timeout", stable_timeout)):
            if not value > 0:
                raise ValueError(f"{label} {value!r} must be > 0 s")
        super().__init__(transport, name=name or f"balance@{transport.url}")
        self.timeout = float(timeout)
        self.stable_timeout = float(stable_timeout)
        self.model: str | None = None
        self.capacity_g: float | None = None
        self.serial_number: str | None = None
        self._lock = asyncio.Lock()  # one exchange (or stream step) at a time
        self._streaming = False
        self._stream_id = 0  # bumped when a stream starts or is stopped

    @property
    def _link(self) -> _LineLink:
        return cast(_LineLink, self.transport)

    @property
    def streaming(self) -> bool:
        return self._streaming

    # ------------------------------------------------------------------ surface
    @property
    def channels(self) -> Mapping[str, Channel]:
        top = self.capacity_g
        return {
            "zeroed": Channel(
                "zeroed", "", "bool", doc="zeroed by this driver (Z / ZI)", readable=False
            ),
            "tared": Channel("tared", "", "bool", doc="a tare is in use (T; TAC clears it)"),
            "taring": Channel(
                "taring",
                "",
                "bool",
                doc="true only while a zero or tare command is checked (momentary)",
                readable=False,
            ),
            "streaming": Channel("streaming", "", "bool", doc="SIR streaming on", readable=False),
            "weight_g": Channel(
                "weight_g",
                "g",
                "float",
                None,
                top,
                settable=False,
                doc="the weight now (SI), None over- or underloaded",
            ),
            "stable": Channel("stable", "", "bool", settable=False, doc="the reading is stable"),
            "tare_g": Channel(
                "tare_g", "g", "float", 0.0, top, settable=False, doc="the tare in use (TA)"
            ),
            "overload": Channel(
                "overload", "", "bool", settable=False, doc="over the weighing range (S +)"
            ),
            "underload": Channel(
                "underload", "", "bool", settable=False, doc="under the weighing range (S -)"
            ),
        }

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(
            {"model": self.model, "capacity_g": self.capacity_g, "serial": self.serial_number}
        )
        return out

    async def open(self) -> None:
        """Open the line, end a stream left running by a previous owner, read the device data."""
        await self.transport.open()
        try:
            await self.stop_stream()
            await self.device_info()
        except BaseException:
            await self.transport.close()
            raise

    async def close(self) -> None:
        """End a running stream (best effort) and close the line."""
        if self._streaming and self.transport.is_open:
            with contextlib.suppress(Exception):
                await self.stop_stream()
        self._streaming = False
        await self.transport.close()

    async def safe_state(self) -> None:
        """A quiet line: end streaming (idempotent, harmless when nothing streams)."""
        await self.stop_stream()

    # ------------------------------------------------------------------ wire
    def _raise_error(self, command: str, text: str) -> None:
        """Raise the typed error an error reply stands for (nothing for a normal reply)."""
        error = LINE_ERRORS.get(text)
        if error is not None:
            raise error(self.name, command, text, text)
        m = _STATUS_RE.fullmatch(text)
        if m is not None and m[2] in STATUS_ERRORS:
            raise STATUS_ERRORS[m[2]](self.name, command, f"{m[1]} {m[2]}", text)

    def _decode(self, raw: bytes) -> str:
        if not raw.endswith(CRLF):
            raise ProtocolError(self.name, "reply does not end with CR LF", raw)
        try:
            text = raw[:-2].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(self.name, "reply is not ASCII", raw) from None
        if any(not 0x20 <= ord(c) <= 0x7E for c in text):
            raise ProtocolError(self.name, "reply contains control characters", raw)
        return text

    async def _exchange(self, command: str, timeout: float | None = None) -> str:
        """Send ``command``, return its reply line (errors raised as typed errors). Hold the lock."""
        if self._streaming:
            await self._stop_stream_locked()
        raw = await self._link.transaction(
            command.encode("ascii") + CRLF,
            CRLF,
            timeout=self.timeout if timeout is None else timeout,
        )
        text = self._decode(raw)
        self._raise_error(command, text)
        return text

    async def _query(self, command: str, timeout: float | None = None) -> str:
        """An exchange that changes nothing on the balance: retried on timeouts / garbled lines."""

        async def once() -> str:
            async with self._lock:
                return await self._exchange(command, timeout)

        return await retry_idempotent(once, attempts=self.ATTEMPTS, what=f"{self.name}: {command}")

    async def _command(self, command: str, timeout: float | None = None) -> str:
        """An exchange that changes the balance (zero, tare, ...): never retried."""
        async with self._lock:
            return await self._exchange(command, timeout)

    def _weighing(self, command: str, text: str, statuses: str) -> Weighing:
        m = _WEIGHT_RE.fullmatch(text)
        if m is None or m[2] not in statuses:
            raise ProtocolError(self.name, f"{command}: not a weight reply", text)
        if m[1] != {"SI": "S", "SIR": "S"}.get(command, command):
            raise ProtocolError(self.name, f"{command}: reply is for command {m[1]!r}", text)
        return Weighing(float(m[3]), m[4], m[2] == "S", text)

    def _expect(self, command: str, text: str, *replies: str) -> str:
        if text not in replies:
            raise ProtocolError(
                self.name, f"{command}: expected {' or '.join(map(repr, replies))}", text
            )
        return text

    def _quoted(self, command: str, text: str) -> str:
        m = _TEXT_RE.fullmatch(text)
        if m is None or m[1] != ("I4" if command == "@" else command):
            raise ProtocolError(self.name, f"{command}: expected '{command} A \"...\"'", text)
        return m[2]

    # ------------------------------------------------------------------ reads
    @declare(READ)
    async def weight(self) -> Weighing:
        """``S``: the next stable weight (waits up to ``stable_timeout``)."""
        text = await self._query("S", self.stable_timeout)
        return self._weighing("S", text, "S")

    @declare(READ)
    async def weight_now(self) -> Weighing:
        """``SI``: the weight now; ``stable`` is False for a dynamic reading."""
        return self._weighing("SI", await self._query("SI"), "SD")

    @declare(READ)
    async def tare_weight(self) -> float:
        """``TA``: the tare weight in use, g."""
        return self._weighing("TA", await self._query("TA"), "A").value

    @declare(READ)
    async def device_info(self) -> dict[str, Any]:
        """``I2`` and ``I4``: model, capacity (g) and serial number."""
        data = self._quoted("I2", await self._query("I2"))
        parts = data.rsplit(" ", 2)
        if len(parts) != 3 or parts[2] != "g":
            raise ProtocolError(self.name, "I2: expected '<model> <capacity> g'", data)
        try:
            capacity = float(parts[1])
        except ValueError:
            raise ProtocolError(self.name, "I2: capacity is not a number", data) from None
        serial = self._quoted("I4", await self._query("I4"))
        self.model, self.capacity_g, self.serial_number = parts[0], capacity, serial
        return {"model": parts[0], "capacity_g": capacity, "serial": serial}

    @declare(READ)
    async def read(self) -> dict[str, Any]:
        """``SI`` and ``TA``: weight (g), whether it is stable, the tare (g) and whether one is
        in use (``tared``: the measured value of the channel tare / clear_tare set), and
        ``overload``/``underload`` (False). Over- or underloaded, ``SI`` has no weight: raises
        :class:`BalanceOverload`/:class:`BalanceUnderload` whose ``reading`` says which
        (``weight_g`` None) for a supervisor."""
        try:
            now = await self.weight_now()
        except (BalanceOverload, BalanceUnderload) as exc:
            over = isinstance(exc, BalanceOverload)
            exc.reading = {
                "weight_g": None,
                "stable": False,
                "overload": over,
                "underload": not over,
            }
            raise
        tare_g = await self.tare_weight()
        return {
            "weight_g": now.value,
            "stable": now.stable,
            "tare_g": tare_g,
            "tared": tare_g != 0,
            "overload": False,
            "underload": False,
        }

    # ------------------------------------------------------------------ actuations
    @declare(
        ACTUATE,
        immediate=Param(bool, optional=True, doc="ZI: zero now, even on a dynamic reading"),
        sets=[Set("zeroed", value=True), Set("taring", value=True, momentary=True)],
    )
    async def zero(self, immediate: bool = False) -> bool:
        """Zero the balance: ``Z`` at the next stable reading, or ``ZI`` now.

        Returns whether the reading it zeroed on was stable (``Z`` always is; ``ZI D`` is not).
        """
        if immediate:
            text = await self._command("ZI")
            return self._expect("ZI", text, "ZI S", "ZI D") == "ZI S"
        self._expect("Z", await self._command("Z", self.stable_timeout), "Z A")
        return True

    @declare(ACTUATE, sets=[Set("tared", value=True), Set("taring", value=True, momentary=True)])
    async def tare(self) -> float:
        """``T``: tare at the next stable reading; returns the tare weight (g)."""
        text = await self._command("T", self.stable_timeout)
        return self._weighing("T", text, "S").value

    @declare(ACTUATE, sets=[Set("tared", value=False), Set("taring", value=True, momentary=True)])
    async def clear_tare(self) -> None:
        """``TAC``: clear the tare."""
        self._expect("TAC", await self._command("TAC"), "TAC A")

    @declare(SAFER, sets=[Set("streaming", value=False)])
    async def reset(self) -> str:
        """``@``: cancel pending commands and streaming; returns the serial number."""
        async with self._lock:
            self._streaming = False
            self._stream_id += 1
            await self._link.discard_input()
            text = await self._drain_until("@", "I4 ")
        self.serial_number = self._quoted("@", text)
        return self.serial_number

    # ------------------------------------------------------------------ streaming
    @declare(SAFER, sets=[Set("streaming", value=False)])
    async def stop_stream(self) -> None:
        """End ``SIR`` streaming (sends ``TA``, drops stream lines up to its reply); idempotent."""
        async with self._lock:
            await self._stop_stream_locked()

    async def _stop_stream_locked(self) -> None:
        self._streaming = False
        self._stream_id += 1
        await self._drain_until("TA", "TA ")

    async def _drain_until(self, command: str, prefix: str) -> str:
        """Send ``command`` and read lines until one starts with ``prefix`` (or is an error).

        Stream lines before it are dropped (at most :attr:`MAX_STOP_LINES`).
        """
        await self._link.write(command.encode("ascii") + CRLF)
        for _ in range(self.MAX_STOP_LINES):
            text = self._decode(await self._link.read_until(CRLF, self.timeout))
            if text.startswith(prefix) or text in LINE_ERRORS:
                self._raise_error(command, text)
                return text
        raise ProtocolError(
            self.name,
            f"{command}: no reply within {self.MAX_STOP_LINES} lines (the balance keeps streaming)",
        )

    @declare(READ, count=Param(int, min=1, max=1000, doc="how many readings"))
    async def sample(self, count: int) -> list[Weighing]:
        """``count`` streamed readings (``SIR``), then the stream is stopped."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
            raise ValueError(f"count {count!r} must be an integer 1-1000")
        out: list[Weighing] = []
        async with contextlib.aclosing(self.stream(max_readings=count)) as readings:
            async for reading in readings:
                out.append(reading)
        return out

    async def stream(self, max_readings: int | None = None) -> AsyncGenerator[Weighing, None]:
        """Readings of ``SIR`` (about 10 a second) as they arrive.

        Ends after ``max_readings`` (if given), when any other command of this
        driver is sent (that command stops the stream), or on :meth:`close`;
        leaving the loop early (``break``, an error) stops the stream. Use
        ``contextlib.aclosing(balance.stream())`` so that happens at once. A
        silent balance raises :class:`TransportTimeout` after ``timeout``;
        ``S +``/``S -`` lines raise :class:`BalanceOverload`/:class:`BalanceUnderload`.
        """
        if max_readings is not None and max_readings < 1:
            raise ValueError(f"max_readings {max_readings!r} must be >= 1")
        async with self._lock:
            if self._streaming:
                await self._stop_stream_locked()
            await self._link.discard_input()
            await self._link.write(b"SIR" + CRLF)
            self._streaming = True
            self._stream_id += 1
            mine = self._stream_id
        count = 0
        try:
            while max_readings is None or count < max_readings:
                async with self._lock:
                    if self._stream_id != mine:
                        return  # another command stopped the stream
                    text = self._decode(await self._link.read_until(CRLF, self.timeout))
                self._raise_error("SIR", text)
                count += 1
                yield self._weighing("SIR", text, "SD")
        finally:
            if self._stream_id == mine and self._streaming:
                try:
                    await asyncio.shield(self.stop_stream())
                except (BalanceError, ProtocolError, TransportTimeout) as exc:
                    log.warning("%s: stopping the stream failed: %s", self.name, exc)


__all__ = ["Balance", "Weighing"]
