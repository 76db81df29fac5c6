"""Simulated analytical balance: the MT-SICS subset of PROTOCOLS.md on a pty (9600 8N1, CR LF).

The device side of "Analytical balance" over a
:class:`~simulators.buffer_world.BufferWorld` (the load, its noise, drift,
settling, overload: see that module). The driver opens ``<tmp>/balance``
through :class:`~simulators.ptyport.PtyPort`; ``url`` is
``serial://<tmp>/balance?baudrate=9600``.

Lines end in CR LF (a lone LF is accepted; a line of more than 256 bytes
without LF is dropped). Commands are case-sensitive and run one after
another in arrival order; ``@`` is handled at once.

==========  ================================================================
``S``       waits up to :data:`STABLE_TIMEOUT_S` (3 s, simulated) for a stable
            reading: ``S S <value> g``, else ``S I``; ``S +`` / ``S -`` when over-
            or underloaded
``SI``      the reading now: ``S S <value> g`` (stable) or ``S D <value> g``
``SIR``     ``SI`` replies every 0.1 s (real time: wire traffic) until any other
            command arrives (that command is then executed)
``Z``       zero at the next stable reading (timeout ``Z I``): ``Z A``; ``Z +`` /
            ``Z -`` outside the zero range (+/- 2 % of capacity around the
            power-on zero, an empty pan); zeroing clears the tare
``ZI``      zero now: ``ZI S`` or ``ZI D`` (dynamic); ``ZI +`` / ``ZI -``
``T``       tare at the next stable reading: ``T S <tare> g`` (timeout ``T I``);
            ``T +`` over capacity, ``T -`` a negative weight
``TA``      ``TA A <tare> g``; ``TA <value> g`` presets the tare (``EL`` outside
            0-220 g or another unit)
``TAC``     ``TAC A``, tare cleared
``I2``      ``I2 A "LB-BAL220 220.0000 g"``
``I4``      ``I4 A "<serial number>"``
``@``       reset: cancels a pending command and streaming, clears nothing else;
            ``I4 A "<serial number>"``
==========  ================================================================

``ES`` for an unknown command or a parameter where none is taken, ``ET`` for
a line with a byte outside printable ASCII, ``EL`` for a parameter out of
range. The weight is the net value (gross - zero - tare) right-aligned in a
10-character field with 4 decimals (readability 0.1 mg) after one space, as in
MT-SICS: ``S S    12.3456 g``.

Faults (``world.faults``, device ``"balance"``): ``no-reply`` (lines are read
and recorded, nothing is answered), ``garbled-bytes`` ``probability=1.0``
(one byte of a reply gets its high bit set); physics faults
``balance-overload`` and ``balance-vibration`` live in the world. Every
received line is recorded with ``world.wire.record("balance", line)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from urllib.parse import quote

from simulators.buffer_world import BALANCE_CAPACITY_G, BalanceReading, BufferWorld
from simulators.ptyport import PtyPort

log = logging.getLogger(__name__)

DEVICE = "balance"
MODEL = "LB-BAL220"
SERIAL_NUMBER = "B220104385"
STABLE_TIMEOUT_S = 3.0  # simulated seconds
POLL_S = 0.1  # simulated seconds between readings while waiting for stability
STREAM_PERIOD_S = 0.1  # real seconds between SIR replies
ZERO_RANGE_G = 0.02 * BALANCE_CAPACITY_G
TARE_MIN_G = -0.001
MAX_LINE = 256


def weight_text(value_g: float) -> str:
    """A weight as the balance prints it: 4 decimals right-aligned in 10 characters."""
    text = f"{value_g:.4f}"
    if text == "-0.0000":
        text = "0.0000"
    return f"{text:>10}"


class BalanceSim:
    """An MT-SICS balance on a pty. See the module docstring."""

    def __init__(
        self,
        world: BufferWorld,
        *,
        serial_number: str = SERIAL_NUMBER,
        stable_timeout_s: float = STABLE_TIMEOUT_S,
        seed: int = 0,
    ) -> None:
        self.world = world
        self.serial_number = serial_number
        self.stable_timeout_s = stable_timeout_s
        self.zero_g = 0.0  # relative to the power-on zero (an empty pan)
        self.tare_g = 0.0
        self._rng = random.Random(seed)
        self._port = PtyPort(DEVICE, self._on_data, prefix="lb-balance-")
        self._rx = bytearray()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._stream: asyncio.Task[None] | None = None
        self._running = False

    # ------------------------------------------------------------- lifecycle
    @property
    def link_path(self) -> str:
        if not self._port.is_open:
            raise RuntimeError("BalanceSim is not started")
        return self._port.link_path

    @property
    def url(self) -> str:
        """``serial://<tmp>/balance?baudrate=9600``."""
        return f"serial://{quote(self.link_path)}?baudrate=9600"

    @property
    def streaming(self) -> bool:
        return self._stream is not None and not self._stream.done()

    async def start(self) -> None:
        if self._running:
            return
        self._queue = asyncio.Queue()
        self._rx.clear()
        self._port.open()
        self._worker = asyncio.create_task(self._work(), name="balance-sim")
        self._running = True

    async def stop(self) -> None:
        """Stop streaming and the command worker, close the pty (idempotent)."""
        self._running = False
        await self._cancel(self._stream)
        await self._cancel(self._worker)
        self._stream = self._worker = None
        self._port.close()

    async def __aenter__(self) -> BalanceSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @staticmethod
    async def _cancel(task: asyncio.Task[None] | None) -> None:
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # ---------------------------------------------------------------- the line
    def _on_data(self, data: bytes) -> None:
        self._rx += data
        while True:
            i = self._rx.find(b"\n")
            if i < 0:
                break
            raw = bytes(self._rx[:i]).removesuffix(b"\r")
            del self._rx[: i + 1]
            self._received(raw)
        if len(self._rx) > MAX_LINE:  # no LF for too long: line noise
            self._rx.clear()

    def _received(self, raw: bytes) -> None:
        text = raw.decode("ascii", "replace")
        silent = self.world.faults.active("no-reply", device=DEVICE) is not None
        self.world.wire.record(DEVICE, text, "no-reply" if silent else "")
        if silent or not raw:
            return
        if self.streaming:  # any command ends streaming
            assert self._stream is not None
            self._stream.cancel()
            self._stream = None
        if raw == b"@":
            self._reset()
            return
        self._queue.put_nowait(text if all(0x20 <= b <= 0x7E for b in raw) else "\x00")

    def _reset(self) -> None:
        """``@``: cancel the pending command and the queue, answer with the serial number."""
        if self._worker is not None:
            self._worker.cancel()
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name="balance-sim")
        self._send(f'I4 A "{self.serial_number}"')

    def _send(self, line: str) -> None:
        data = (line + "\r\n").encode("ascii")
        fault = self.world.faults.active("garbled-bytes", device=DEVICE)
        if fault is not None and self._rng.random() < float(fault.get("probability", 1.0)):
            out = bytearray(data)
            out[self._rng.randrange(0, len(out) - 2)] |= 0x80  # never the CR LF
            data = bytes(out)
        self._port.send(data)

    async def _work(self) -> None:
        while True:
            line = await self._queue.get()
            try:
                reply = await self._execute(line)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not kill the device: say so on the wire
                log.exception("balance simulator: %r failed", line)
                reply = "EL"
            if reply is not None:
                self._send(reply)

    # ------------------------------------------------------------- commands
    def _net(self, reading: BalanceReading) -> float:
        return reading.gross_g - self.zero_g - self.tare_g

    def _weight_reply(self, cmd: str, reading: BalanceReading) -> str:
        if reading.overload:
            return f"{cmd} +"
        if reading.underload:
            return f"{cmd} -"
        status = "S" if reading.stable else "D"
        return f"{cmd} {status} {weight_text(self._net(reading))} g"

    async def _stable_reading(self) -> BalanceReading | None:
        """The next stable (or over/underloaded) reading, None after the device timeout."""
        clock = self.world.clock
        deadline = clock.now() + self.stable_timeout_s
        while True:
            reading = self.world.balance_reading()
            if reading.stable or reading.overload or reading.underload:
                return reading
            if clock.now() >= deadline:
                return None
            await clock.sleep(POLL_S)

    async def _execute(self, line: str) -> str | None:
        if line == "\x00":
            return "ET"
        cmd, _, param = line.strip().partition(" ")
        param = param.strip()
        if cmd == "TA" and param:
            return self._preset_tare(param)
        if param:
            return "ES"
        if cmd == "S":
            reading = await self._stable_reading()
            return "S I" if reading is None else self._weight_reply("S", reading)
        if cmd == "SI":
            return self._weight_reply("S", self.world.balance_reading())
        if cmd == "SIR":
            self._stream = asyncio.create_task(self._streaming(), name="balance-sir")
            return None
        if cmd in ("Z", "ZI"):
            if cmd == "Z":
                reading = await self._stable_reading()
                if reading is None:
                    return "Z I"
            else:
                reading = self.world.balance_reading()
            if reading.overload or reading.gross_g > ZERO_RANGE_G:
                return f"{cmd} +"
            if reading.underload or reading.gross_g < -ZERO_RANGE_G:
                return f"{cmd} -"
            self.zero_g, self.tare_g = reading.gross_g, 0.0
            if cmd == "Z":
                return "Z A"
            return "ZI S" if reading.stable else "ZI D"
        if cmd == "T":
            reading = await self._stable_reading()
            if reading is None:
                return "T I"
            if reading.overload:
                return "T +"
            weight = reading.gross_g - self.zero_g
            if reading.underload or weight < TARE_MIN_G:
                return "T -"
            self.tare_g = weight
            return f"T S {weight_text(self.tare_g)} g"
        if cmd == "TA":
            return f"TA A {weight_text(self.tare_g)} g"
        if cmd == "TAC":
            self.tare_g = 0.0
            return "TAC A"
        if cmd == "I2":
            return f'I2 A "{MODEL} {BALANCE_CAPACITY_G:.4f} g"'
        if cmd == "I4":
            return f'I4 A "{self.serial_number}"'
        return "ES"

    def _preset_tare(self, param: str) -> str:
        value_text, _, unit = param.partition(" ")
        try:
            value = float(value_text)
        except ValueError:
            return "ES"
        if unit.strip() != "g" or not 0.0 <= value <= BALANCE_CAPACITY_G:
            return "EL"
        self.tare_g = value
        return f"TA A {weight_text(self.tare_g)} g"

    async def _streaming(self) -> None:
        while True:
            self._send(self._weight_reply("S", self.world.balance_reading()))
            await asyncio.sleep(STREAM_PERIOD_S)


__all__ = ["BalanceSim", "weight_text"]
