"""The balance driver (MT-SICS subset) against a minimal emulator of the spec on a real pty.

``SpecBalance`` is written from PROTOCOLS.md ("Analytical balance") only: it
answers CR LF terminated ASCII lines on the master side of a pty, streams
``SI`` replies after ``SIR`` until any other command, and can be made
unstable, overloaded, underloaded, mute, or forced to answer one command with
a given line (``ES``/``ET``/``EL``, garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator

import pytest

from instruments.declare import ACTUATE, READ, SAFER
from instruments.drivers.balance import Balance, Weighing
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
from instruments.transports.serial import SerialTransport

CAPACITY_G = 220.0


class SpecBalance:
    """An MT-SICS balance on a pty (see the module docstring). Weights in g."""

    def __init__(self) -> None:
        self.load_g = 12.3456  # what lies on the pan
        self.zero_g = 0.0
        self.tare_g = 0.0
        self.stable = True
        self.mute = False
        self.override: dict[str, str] = {}  # command -> reply line (without CR LF)
        self.received: list[str] = []
        self.streaming = False
        self.stream_period_s = 0.01
        self._rx = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self.path = ""

    async def __aenter__(self) -> SpecBalance:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._master, self._on_data)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop_stream()
        self._loop.remove_reader(self._master)
        os.close(self._master)
        os.close(self._slave)

    @property
    def url(self) -> str:
        return f"serial://{self.path}?baudrate=9600&timeout=0.2"

    @property
    def net_g(self) -> float:
        return self.load_g - self.zero_g - self.tare_g

    # ---------------------------------------------------------------- the line
    def _on_data(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._rx += os.read(self._master, 4096)
        while (i := self._rx.find(b"\r\n")) >= 0:
            line, self._rx = bytes(self._rx[:i]), self._rx[i + 2 :]
            self._command(line.decode("ascii", "replace"))

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._master, line.encode("latin-1") + b"\r\n")

    def _stop_stream(self) -> None:
        self.streaming = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stream(self) -> None:
        self._send(self.si())
        self._timer = self._loop.call_later(self.stream_period_s, self._stream)

    def _command(self, cmd: str) -> None:
        self.received.append(cmd)
        self._stop_stream()  # any command ends streaming
        if self.mute:
            return
        if cmd in self.override:
            self._send(self.override[cmd])
            return
        reply = self.answer(cmd)
        if reply is not None:
            self._send(reply)

    # ---------------------------------------------------------------- the commands
    @staticmethod
    def weight(prefix: str, status: str, grams: float) -> str:
        return f"{prefix} {status} {grams:10.4f} g"

    def range_error(self, prefix: str) -> str | None:
        if self.load_g > CAPACITY_G:
            return f"{prefix} +"
        if self.load_g < 0:
            return f"{prefix} -"
        return None

    def si(self) -> str:
        return self.range_error("S") or self.weight("S", "S" if self.stable else "D", self.net_g)

    def answer(self, cmd: str) -> str | None:
        if cmd == "S":
            error = self.range_error("S")
            return error or (self.weight("S", "S", self.net_g) if self.stable else "S I")
        if cmd == "SI":
            return self.si()
        if cmd == "SIR":
            self.streaming = True
            self._stream()
            return None
        if cmd in ("Z", "ZI"):
            error = self.range_error(cmd)
            if error:
                return error
            if cmd == "Z" and not self.stable:
                return "Z I"
            self.zero_g, self.tare_g = self.load_g, 0.0
            return "Z A" if cmd == "Z" else f"ZI {'S' if self.stable else 'D'}"
        if cmd == "T":
            error = self.range_error("T")
            if error:
                return error
            if not self.stable:
                return "T I"
            self.tare_g = self.load_g - self.zero_g
            return self.weight("T", "S", self.tare_g)
        if cmd == "TA":
            return self.weight("TA", "A", self.tare_g)
        if cmd == "TAC":
            self.tare_g = 0.0
            return "TAC A"
        if cmd == "I2":
            return f'I2 A "LB-BAL220 {CAPACITY_G:.4f} g"'
        if cmd in ("I4", "@"):
            return 'I4 A "B021234567"'
        return "ES"


@pytest.fixture
async def spec() -> AsyncIterator[SpecBalance]:
    async with SpecBalance() as s:
        yield s


@pytest.fixture
async def balance(spec: SpecBalance) -> AsyncIterator[Balance]:
    async with Balance(SerialTransport(spec.url), timeout=0.2, stable_timeout=0.5) as b:
        yield b


# ---------------------------------------------------------------- declarations
def test_declared_commands_and_channels() -> None:
    c = Balance.commands
    assert {n: s.kind for n, s in c.items()} == {
        "read": READ,
        "describe": READ,
        "weight": READ,
        "weight_now": READ,
        "tare_weight": READ,
        "device_info": READ,
        "sample": READ,
        "zero": ACTUATE,
        "tare": ACTUATE,
        "clear_tare": ACTUATE,
        "reset": SAFER,
        "stop_stream": SAFER,
    }
    taring = ("taring", True, True)  # momentary: true only while the command is checked
    sets = {n: [(s.channel, s.value, s.momentary) for s in c[n].sets] for n in c}
    assert sets["zero"] == [("zeroed", True, False), taring]
    assert sets["tare"] == [("tared", True, False), taring]
    assert sets["clear_tare"] == [("tared", False, False), taring]
    assert c["zero"].params["immediate"].optional
    assert (c["sample"].params["count"].min, c["sample"].params["count"].max) == (1, 1000)
    assert [str(call) for call in Balance.safe_state_calls] == ["stop_stream()"]


def test_constructor_refuses_a_register_transport() -> None:
    from instruments.transports.modbus import ModbusTransport

    with pytest.raises(TypeError, match="line-oriented byte transport"):
        Balance(ModbusTransport("modbus-rtu:///dev/null"))


# ---------------------------------------------------------------- reads
async def test_open_reads_the_device_data(balance: Balance, spec: SpecBalance) -> None:
    assert (balance.model, balance.capacity_g, balance.serial_number) == (
        "LB-BAL220",
        220.0,
        "B021234567",
    )
    assert spec.received == ["TA", "I2", "I4"]  # a stream left running is ended first
    info = balance.describe()
    assert info["capacity_g"] == 220.0 and info["channels"]["weight_g"]["maximum"] == 220.0


async def test_stable_and_immediate_weight(balance: Balance, spec: SpecBalance) -> None:
    assert await balance.weight() == Weighing(12.3456, "g", True, "S S    12.3456 g")
    now = await balance.weight_now()
    assert (now.value, now.stable) == (12.3456, True)
    assert await balance.read() == {
        "weight_g": 12.3456,
        "stable": True,
        "tare_g": 0.0,
        "tared": False,
        "overload": False,
        "underload": False,
    }


async def test_a_dynamic_reading_is_never_reported_as_stable(
    balance: Balance, spec: SpecBalance
) -> None:
    spec.stable = False
    spec.load_g = 50.0
    now = await balance.weight_now()
    assert (now.value, now.stable, now.raw) == (50.0, False, "S D    50.0000 g")
    assert (await balance.read())["stable"] is False
    with pytest.raises(BalanceNotExecutable):  # S waits for a stable weight; none came
        await balance.weight()
    assert all(not r.stable for r in await balance.sample(3))
    spec.override["SI"] = "S D    50.0000 g"
    spec.stable = True
    assert (await balance.weight_now()).stable is False  # what the balance says, not the state
    spec.override["S"] = "S D    50.0000 g"  # a dynamic reply to S is a protocol violation
    with pytest.raises(ProtocolError, match="not a weight reply"):
        await balance.weight()


async def test_zero_tare_and_clear_tare(balance: Balance, spec: SpecBalance) -> None:
    assert await balance.zero() is True
    assert spec.zero_g == 12.3456 and (await balance.weight()).value == 0.0
    spec.load_g = 40.0  # a beaker on the pan
    assert await balance.tare() == pytest.approx(27.6544)
    assert await balance.tare_weight() == pytest.approx(27.6544)
    assert (await balance.read())["tared"] is True
    spec.load_g = 45.5  # liquid in the beaker
    assert (await balance.weight()).value == pytest.approx(5.5)
    await balance.clear_tare()
    assert spec.tare_g == 0.0 and (await balance.weight()).value == pytest.approx(33.1544)
    spec.stable = False
    assert await balance.zero(immediate=True) is False  # ZI D: zeroed on a dynamic reading
    assert spec.zero_g == 45.5
    assert spec.received[-1] == "ZI"


@pytest.mark.parametrize(
    "call, command, reply, error",
    [
        ("weight", "S", "S I", BalanceNotExecutable),
        ("weight", "S", "S +", BalanceOverload),
        ("weight", "S", "S -", BalanceUnderload),
        ("weight_now", "SI", "S +", BalanceOverload),
        ("zero", "Z", "Z I", BalanceNotExecutable),
        ("zero", "Z", "Z +", BalanceOverload),
        ("zero", "Z", "Z -", BalanceUnderload),
        ("tare", "T", "T I", BalanceNotExecutable),
        ("tare", "T", "T +", BalanceOverload),
        ("tare", "T", "T -", BalanceUnderload),
        ("tare_weight", "TA", "ES", BalanceSyntaxError),
        ("clear_tare", "TAC", "ET", BalanceTransmissionError),
        ("tare", "T", "EL", BalanceLogicalError),
    ],
)
async def test_every_error_reply_is_a_typed_error(
    balance: Balance,
    spec: SpecBalance,
    call: str,
    command: str,
    reply: str,
    error: type[BalanceError],
) -> None:
    spec.override[command] = reply
    with pytest.raises(error) as info:
        await getattr(balance, call)()
    assert (info.value.command, info.value.code) == (command, reply)
    assert info.value.advice and info.value.advice in str(info.value)  # says what to do
    del spec.override[command]
    await balance.weight_now()  # the line is fine afterwards


async def test_overload_and_underload_from_the_load(balance: Balance, spec: SpecBalance) -> None:
    spec.load_g = 250.0
    with pytest.raises(BalanceOverload, match="take load off the pan"):
        await balance.weight()
    with pytest.raises(BalanceOverload):
        await balance.tare()
    # read() has no weight to give either, but its error carries what the balance said, for
    # a supervisor (the balance's declared overload/underload faults)
    with pytest.raises(BalanceOverload) as over:
        await balance.read()
    assert over.value.reading == {
        "weight_g": None,
        "stable": False,
        "overload": True,
        "underload": False,
    }
    spec.load_g = -1.0
    with pytest.raises(BalanceUnderload, match="weighing pan is in place"):
        await balance.zero()
    with pytest.raises(BalanceUnderload) as under:
        await balance.read()
    assert under.value.reading is not None
    assert (under.value.reading["overload"], under.value.reading["underload"]) == (False, True)


async def test_garbled_and_missing_replies(balance: Balance, spec: SpecBalance) -> None:
    spec.override["SI"] = "S S  1\x07.0000 g"
    with pytest.raises(ProtocolError, match="control characters"):
        await balance.weight_now()
    spec.override["SI"] = "S X    12.0000 g"
    with pytest.raises(ProtocolError, match="not a weight reply"):
        await balance.weight_now()
    spec.override["I2"] = 'I2 A "LB-BAL220"'
    with pytest.raises(ProtocolError, match="capacity"):
        await balance.device_info()
    spec.override.clear()
    spec.mute = True
    with pytest.raises(TransportTimeout):
        await balance.weight_now()
    # garbled: 3 attempts, "S X" (a well-formed line that is no weight) once, silence: 3
    assert spec.received.count("SI") == Balance.ATTEMPTS + 1 + Balance.ATTEMPTS
    spec.mute = False
    spec.received.clear()
    with contextlib.suppress(TransportTimeout):
        spec.mute = True
        await balance.tare()
    assert spec.received == ["T"]  # a tare is never repeated
    spec.mute = False
    assert (await balance.weight_now()).value == pytest.approx(12.3456)


# ---------------------------------------------------------------- streaming
async def test_stream_yields_readings_and_stops_when_left(
    balance: Balance, spec: SpecBalance
) -> None:
    values = []
    async with contextlib.aclosing(balance.stream()) as readings:
        async for reading in readings:
            values.append(reading)
            spec.load_g += 1.0
            if len(values) == 4:
                break
    assert spec.streaming is False and balance.streaming is False
    assert spec.received[-2:] == ["SIR", "TA"]  # stopped by a command that changes nothing
    assert [round(v.value) for v in values] == sorted(round(v.value) for v in values)
    assert (await balance.weight_now()).value == pytest.approx(spec.net_g)  # no stale line


async def test_stream_is_bounded_and_sample_collects(balance: Balance, spec: SpecBalance) -> None:
    got = [r async for r in balance.stream(max_readings=3)]
    assert len(got) == 3 and not spec.streaming
    spec.stable = False
    sample = await balance.sample(5)
    assert len(sample) == 5 and all(r.stable is False for r in sample)
    assert not spec.streaming and not balance.streaming


async def test_any_other_command_ends_the_stream(balance: Balance, spec: SpecBalance) -> None:
    readings = balance.stream()
    first = await anext(readings)
    assert first.stable and spec.streaming
    assert await balance.tare() == pytest.approx(12.3456)  # a command in the middle
    assert not spec.streaming
    with pytest.raises(StopAsyncIteration):
        await anext(readings)  # the stream ended with it
    await readings.aclose()
    assert spec.received[-3:] == ["SIR", "TA", "T"]


async def test_overload_while_streaming_raises_and_stops(
    balance: Balance, spec: SpecBalance
) -> None:
    spec.load_g = 300.0
    with pytest.raises(BalanceOverload):
        async with contextlib.aclosing(balance.stream()) as readings:
            async for _ in readings:
                pass
    assert not spec.streaming and not balance.streaming


async def test_close_and_reset_end_a_stream(spec: SpecBalance) -> None:
    b = Balance(SerialTransport(spec.url), timeout=0.2)
    await b.open()
    readings = b.stream()
    await anext(readings)
    await b.close()
    assert not spec.streaming and spec.received[-1] == "TA"
    await readings.aclose()  # nothing left to stop, nothing sent on a closed line
    async with Balance(SerialTransport(spec.url), timeout=0.2) as b2:
        stream = b2.stream()
        await anext(stream)
        assert await b2.reset() == "B021234567"
        assert not spec.streaming and spec.received[-1] == "@"
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        await b2.safe_state()  # idempotent: a quiet line stays quiet
        assert spec.received[-1] == "TA" and not spec.streaming


async def test_a_stream_left_running_by_a_previous_owner_is_ended_on_open(
    spec: SpecBalance,
) -> None:
    spec.answer("SIR")
    assert spec.streaming
    async with Balance(SerialTransport(spec.url), timeout=0.2) as b:
        assert not spec.streaming
        assert b.serial_number == "B021234567"


# ---------------------------------------------------------------- the declarations in an envelope
def test_zero_and_tare_are_actuations_an_envelope_bounds_with_rules() -> None:
    """Zero and tare set channels an envelope must bound (deny by default), and a momentary
    ``balance.taring`` that rules name: no tare while a pump may still be delivering (the
    guard's ``<pump>.flowing``), and the rule holds only for the tare, not after it."""
    from instruments.drivers.syringe_pump import SyringePump
    from safety.dryrun import dry_run
    from safety.effects import Layout, assess, initial_commanded
    from safety.envelopeload import load_envelope
    from safety.model import Command

    tare = Command("balance", "tare", {}, "test")
    bare = load_envelope("channels: {}\n")
    drivers = {
        "balance": Balance(SerialTransport("loop://")),
        "acid": SyringePump(SerialTransport("loop://"), address=0),
    }
    layout = Layout.of(drivers)
    verdict = assess(tare, layout=layout, envelope=bare, view={}, now=0.0)
    assert not verdict.allowed and "balance.tared" in verdict.reason  # deny by default
    envelope = load_envelope(
        "channels:\n"
        "  balance.tared: {unbounded: a tare moves nothing}\n"
        "  balance.zeroed: {unbounded: a zero moves nothing}\n"
        "  balance.taring: {unbounded: the rule below says when}\n"
        "  acid.rate_ml_min: {min: 0.1, max: 10}\n"
        "vessels:\n"
        "  beaker: {max: 100, fed_by: [acid], drained_by: []}\n"
        "rules:\n"
        "  - name: no-tare-while-pumps-run\n"
        "    when: balance.taring -> not acid.flowing\n"
    )
    layout = Layout.of(drivers, envelope.vessels)
    rest = initial_commanded(layout)
    assert rest["balance.taring"] is False and rest["acid.flowing"] is False
    dispense = Command("acid", "dispense", {"volume_ml": 2.0, "rate_ml_min": 2.0}, "test")
    # 2 mL at 2 mL/min: the pump may deliver for 60 s; a tare at 30 s is refused, at 61 s not
    report = dry_run(
        [dispense, tare, tare, dispense],
        envelope,
        rest,
        layout=layout,
        now=0.0,
        times=[0.0, 30.0, 61.0, 62.0],
    )
    assert [v.step for v in report.violations] == [1], report
    assert report.violations[0].rule == "no-tare-while-pumps-run"
    assert "acid.flowing=True" in report.violations[0].reason
    # the tare at 61 s went through and did not stick: the dispense after it is allowed
    assert report.final_state["balance.taring"] is False and report.final_state["balance.tared"]
    zero = assess(
        Command("balance", "zero", {"immediate": True}, "test"),
        layout=layout,
        envelope=envelope,
        view=rest,
        now=0.0,
    )
    assert zero.allowed and zero.effect is not None
    assert zero.effect.updates == {"balance.zeroed": True, "balance.taring": True}
    assert zero.effect.committed_updates() == {"balance.zeroed": True, "balance.taring": False}
