"""SerialTransport over pyserial's loop://, real ptys and a real TCP socket (socket://).

pty tests run on both data paths (``io`` fixture): the fd on the event loop and the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    ProtocolError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports import transport_for
from instruments.transports.base import thread_is_alive
from instruments.transports.serial import SerialTransport, _LineWorker


class Pty:
    """A pty pair: the test plays the device on the master end; ``path`` is a stable symlink to the slave."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.slave = -1
        self.rx = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.create()

    def create(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(self.slave))
        os.replace(tmp, self.link)

    def respond(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer every CR-terminated line ``x`` with ``<x>\\n``."""
        self._loop = loop
        loop.add_reader(self.master, self._on_readable)

    def _on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.rx += os.read(self.master, 4096)
        while b"\r" in self.rx:
            line, _, rest = bytes(self.rx).partition(b"\r")
            self.rx = bytearray(rest)
            os.write(self.master, b"<" + line + b">\n")

    def read_master(self, timeout: float = 1.0) -> bytes:
        deadline = time.monotonic() + timeout
        out = b""
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                out += os.read(self.master, 4096)
                if out:
                    return out
            time.sleep(0.005)
        return out

    def close(self) -> None:
        if self._loop is not None and self.master >= 0:
            self._loop.remove_reader(self.master)
        for fd in (self.master, self.slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self.slave = -1


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[Pty]:
    p = Pty(tmp_path / "tty")
    yield p
    p.close()


@pytest.fixture(params=["auto", "thread"])
def io(request: pytest.FixtureRequest) -> str:
    """Run a pty test on both data paths: ``auto`` (the fd on the event loop) and the worker thread."""
    return str(request.param)


def _mode(io: str) -> str:
    return "thread" if io == "thread" else "fd"


# ----------------------------------------------------------------- URLs
@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("serial:///dev/ttyUSB0?parity=X", "parity"),
        ("serial:///dev/ttyUSB0?bytesize=9", "bytesize"),
        ("serial:///dev/ttyUSB0?stopbits=3", "stopbits"),
        ("serial:///dev/ttyUSB0?baudrate=fast", "baudrate"),
        ("serial:///dev/ttyUSB0?baudrate=0", "baudrate"),
        ("serial:///dev/ttyUSB0?timeout=-1", "timeout"),
        ("serial:///dev/ttyUSB0?timeout=0", "timeout"),
        ("serial:///dev/ttyUSB0?baud=9600", "baud"),
        ("serial://dev/ttyUSB0", "absolute"),
        ("socket://127.0.0.1", "host:port"),
        ("loop://?xonxoff=maybe", "xonxoff"),
    ],
)
def test_bad_url_options_are_refused_naming_the_option(url: str, names: str) -> None:
    with pytest.raises(InvalidURLError) as err:
        SerialTransport(url)
    assert names in str(err.value)
    assert url in str(err.value)


def test_url_options_are_parsed() -> None:
    t = transport_for(
        "serial:///dev/ttyUSB0?baudrate=19200&bytesize=7&parity=e&stopbits=2&timeout=0.25"
    )
    assert isinstance(t, SerialTransport)
    assert (
        t.settings["baudrate"] == 19200
        and t.settings["parity"] == "E"
        and t.settings["bytesize"] == 7
    )
    assert t.timeout == 0.25 and t.port == "serial:///dev/ttyUSB0"
    assert (
        SerialTransport("rfc2217://Host:2217?ign_set_control&baudrate=9600").port
        == "rfc2217://host:2217"
    )
    assert SerialTransport("socket://127.0.0.1:4001").port == "socket://127.0.0.1:4001"


async def test_nonexistent_port_error_names_the_url(tmp_path: Path) -> None:
    url = f"serial://{tmp_path}/no-such-tty?baudrate=9600"
    t = SerialTransport(url)
    with pytest.raises(TransportOpenError) as err:
        await t.open()
    assert url in str(err.value)
    assert not t.is_open and t.line_users == 0
    await t.close()
    assert not thread_is_alive("lb-serial-no-such-tty")


async def test_refused_socket_names_the_url() -> None:
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"socket://127.0.0.1:{port}"
    with pytest.raises(TransportOpenError, match=url):
        await SerialTransport(url).open()


# ----------------------------------------------------------------- loop://
async def test_loop_write_read_until_read_exactly_transaction() -> None:
    async with SerialTransport("loop://?timeout=0.5") as t:
        assert isinstance(t, SerialTransport)
        await t.write(b"hello\nworld")
        assert await t.read_until(b"\n") == b"hello\n"
        assert await t.read_exactly(3) == b"wor"
        assert await t.read_exactly(2) == b"ld"
        assert await t.transaction(b"ping\r", b"\r") == b"ping\r"
        await t.write(b"a\nb\n")  # bytes after the terminator are kept for the next read
        assert await t.read_until(b"\n") == b"a\n"
        assert await t.read_until(b"\n") == b"b\n"


async def test_loop_timeout_reports_partial_bytes() -> None:
    t = SerialTransport("loop://?timeout=5")
    async with t:
        await t.write(b"\x0201S")
        started = time.monotonic()
        with pytest.raises(TransportTimeout) as err:
            await t.read_until(b"\x03", timeout=0.15)
        assert 0.1 < time.monotonic() - started < 1.0
        assert "0201S" in str(err.value) and "loop://" in str(err.value)
        with pytest.raises(TransportTimeout):
            await t.read_exactly(4, timeout=0.05)


async def test_loop_max_bytes_without_terminator_is_a_protocol_error() -> None:
    t = SerialTransport("loop://")
    async with t:
        await t.write(b"x" * 100)
        with pytest.raises(ProtocolError):
            await t.read_until(b"\n", max_bytes=50)


async def test_close_is_idempotent_and_ops_after_close_fail() -> None:
    t = SerialTransport("loop://")
    await t.close()  # never opened
    await t.open()
    await t.close()
    await t.close()
    with pytest.raises(TransportError):
        await t.write(b"x")
    assert not thread_is_alive("lb-serial-loop")


async def test_lock_is_reentrant_for_multi_step_exchanges() -> None:
    async with SerialTransport("loop://") as t:
        assert isinstance(t, SerialTransport)
        async with t.lock:
            await t.write(b"abc\n")
            assert (
                await t.transaction(b"q\n", b"\n") == b"q\n"
            )  # transaction discards the stale b"abc\n"


# ----------------------------------------------------------------- pty
async def test_pty_transaction_discards_stale_input(pty: Pty, io: str) -> None:
    pty.respond(asyncio.get_running_loop())
    async with SerialTransport(f"serial://{pty.link}?timeout=0.5&io={io}") as t:
        assert isinstance(t, SerialTransport)
        assert t.io_mode == _mode(io)
        os.write(pty.master, b"<stale late reply>\n")
        await asyncio.sleep(0.02)
        assert await t.transaction(b"0VER\r", b"\n") == b"<0VER>\n"
        os.write(pty.master, b"noise")
        await asyncio.sleep(0.02)
        assert await t.discard_input() == 5
        with pytest.raises(TransportTimeout):
            await t.read_until(b"\n", timeout=0.05)


async def test_pty_line_is_shared_and_refcounted(pty: Pty, io: str) -> None:
    pty.respond(asyncio.get_running_loop())
    url = f"serial://{pty.link}?baudrate=9600&io={io}"
    tty_name = os.ttyname(pty.slave)
    by_symlink, same, by_target = (
        SerialTransport(url),
        SerialTransport(url),
        SerialTransport(f"serial://{tty_name}?timeout=0.3&io={io}"),
    )

    def fds_on_tty() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd") if _readlink(fd) == tty_name)

    before = fds_on_tty()
    async with contextlib.AsyncExitStack() as stack:
        for t in (by_symlink, same, by_target):
            await stack.enter_async_context(t)
        assert by_symlink.line_users == 3
        assert by_target.io_mode == _mode(io)
        assert fds_on_tty() == before + 1  # the port is opened once
        replies = await asyncio.gather(
            *(
                t.transaction(f"{i}RAT{i}.5MM\r".encode(), b"\n")
                for i in range(10)
                for t in (by_symlink, same, by_target)
            )
        )
        assert replies == [f"<{i}RAT{i}.5MM>\n".encode() for i in range(10) for _ in range(3)]
        await by_symlink.close()
        assert await same.transaction(b"x\r", b"\n") == b"<x>\n"
    assert same.line_users == 0
    assert fds_on_tty() == before
    assert not thread_is_alive("lb-serial-tty")


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


async def test_pty_shared_line_with_other_settings_is_refused(pty: Pty) -> None:
    async with SerialTransport(f"serial://{pty.link}?baudrate=9600"):
        other = SerialTransport(f"serial://{pty.link}?baudrate=19200")
        with pytest.raises(TransportOpenError, match="baudrate"):
            await other.open()
        assert not other.is_open


async def test_pty_link_lost_then_reopened_on_demand(pty: Pty, io: str) -> None:
    url = f"serial://{pty.link}?timeout=0.3&io={io}"
    async with SerialTransport(url) as t:
        assert isinstance(t, SerialTransport)
        await t.write(b"1VER\r")
        assert pty.read_master() == b"1VER\r"
        pty.close()  # the USB adapter is unplugged: master and slave gone
        with pytest.raises(LinkLostError) as err:
            await t.write(b"1VER\r")
        assert url in str(err.value)
        with pytest.raises(
            TransportOpenError, match="tty"
        ):  # still unplugged: reopen fails, names the URL
            await t.write(b"1VER\r")
        pty.create()  # plugged back in (a new /dev/pts/N behind the same name)
        pty.respond(asyncio.get_running_loop())
        assert await t.transaction(b"1VER\r", b"\n") == b"<1VER>\n"
        assert t.io_mode == _mode(io)


async def test_pty_link_lost_while_reading(pty: Pty, io: str) -> None:
    url = f"serial://{pty.link}?timeout=2&io={io}"
    async with SerialTransport(url) as t:
        assert isinstance(t, SerialTransport)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, pty.close)
        started = time.monotonic()
        with pytest.raises(LinkLostError, match=re.escape(url)):
            await t.read_until(b"\n")
        assert time.monotonic() - started < 1.0  # not the 2 s deadline
        pty.create()
        await t.reconnect()
        assert t.is_open and t.io_mode == _mode(io)
        pty.respond(loop)
        assert await t.transaction(b"2VER\r", b"\n") == b"<2VER>\n"


# ----------------------------------------------------------------- socket://
@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A TCP 'serial device server' that answers each CR-terminated line with ``<line>\\n``."""
    writers: list[asyncio.StreamWriter] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.append(writer)
        try:
            while line := await reader.readuntil(b"\r"):
                writer.write(b"<" + line[:-1] + b">\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], writers
    server.close()
    for w in writers:
        w.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


async def test_socket_url_transaction_link_lost_and_reconnect(
    echo_server: tuple[int, list[asyncio.StreamWriter]],
) -> None:
    port, writers = echo_server
    url = f"socket://127.0.0.1:{port}?timeout=0.5"
    async with SerialTransport(url) as t:
        assert isinstance(t, SerialTransport)
        assert await t.transaction(b"0DIS\r", b"\n") == b"<0DIS>\n"
        writers[-1].transport.abort()  # the device server drops us
        await asyncio.sleep(0.05)
        with pytest.raises(LinkLostError, match=f"127.0.0.1:{port}"):
            await t.read_until(b"\n")
        assert await t.transaction(b"0DIS\r", b"\n") == b"<0DIS>\n"  # reopened on demand
        assert len(writers) == 2


# ----------------------------------------------------------------- the line's worker thread
def _fail(exc: BaseException) -> None:
    raise exc


async def test_line_worker_order_errors_cancelled_jobs_and_close() -> None:
    worker = _LineWorker("serial-unit")
    names = {await worker.run(lambda: threading.current_thread().name) for _ in range(5)}
    assert names == {"lb-serial-unit"}  # one dedicated thread
    with pytest.raises(ValueError, match="boom"):
        await worker.run(_fail, ValueError("boom"))
    with pytest.raises(RuntimeError, match="StopIteration"):
        await worker.run(_fail, StopIteration())

    ran: list[str] = []
    slow = asyncio.ensure_future(worker.run(time.sleep, 0.1))
    await asyncio.sleep(0.02)  # the slow call is running on the thread
    queued = asyncio.ensure_future(worker.run(ran.append, "cancelled while queued"))
    after = asyncio.ensure_future(worker.run(ran.append, "after"))
    await asyncio.sleep(0)
    queued.cancel()
    await asyncio.gather(slow, after)
    assert ran == ["after"]  # a call cancelled before it started never touches the device

    # aclose waits for the running call without blocking the loop, then joins the thread
    blocker = asyncio.ensure_future(worker.run(time.sleep, 0.15))
    await asyncio.sleep(0.01)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    await worker.aclose()
    ticker.cancel()
    await asyncio.gather(ticker, return_exceptions=True)
    assert ticks >= 5
    assert blocker.done() and blocker.result() is None
    assert not thread_is_alive("lb-serial-unit")
    await worker.aclose()  # idempotent
    with pytest.raises(TransportError):
        await worker.run(int)


async def test_pty_cancelled_transaction_finishes_before_the_next_one(pty: Pty, io: str) -> None:
    """A cancelled exchange still runs to its end (on the line's thread, or on the loop's fd
    callbacks); the next one, queued behind it, gets its own reply (not the late one)."""
    async with SerialTransport(f"serial://{pty.link}?timeout=1&io={io}") as t:
        assert isinstance(t, SerialTransport)
        first = asyncio.create_task(t.transaction(b"q1\r", b"\n"))
        await asyncio.sleep(0.05)  # q1 is on the wire, nobody answers yet
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(t.transaction(b"q2\r", b"\n"))
        await asyncio.sleep(0.02)
        pty.respond(asyncio.get_running_loop())  # answers q1 (late), then q2
        assert await asyncio.wait_for(second, 2) == b"<q2>\n"
        assert await t.transaction(b"q3\r", b"\n") == b"<q3>\n"


# ----------------------------------------------------------------- the data paths (io=auto|fd|thread)
def test_io_option_is_validated() -> None:
    for url, names in (
        ("serial:///dev/ttyUSB0?io=poll", "io"),
        ("loop://?io=fd", "io=fd"),
        ("socket://127.0.0.1:4001?io=fd", "io=fd"),
    ):
        with pytest.raises(InvalidURLError, match=names) as err:
            SerialTransport(url)
        assert url in str(err.value)
    assert SerialTransport("serial:///dev/ttyUSB0?io=THREAD").io == "thread"
    assert SerialTransport("serial:///dev/ttyUSB0").io == "auto"
    assert SerialTransport("loop://?io=thread").io == "thread"


def _tty_fds(tty_name: str) -> list[int]:
    return [int(fd) for fd in os.listdir("/proc/self/fd") if _readlink(fd) == tty_name]


def _assert_no_loop_callbacks(loop: asyncio.AbstractEventLoop, fds: list[int]) -> None:
    for fd in fds:  # remove_* report whether something was registered
        assert not loop.remove_reader(fd), f"reader left on fd {fd}"
        assert not loop.remove_writer(fd), f"writer left on fd {fd}"


async def test_io_mode_reports_the_data_path(pty: Pty) -> None:
    async with SerialTransport("loop://") as t:
        assert isinstance(t, SerialTransport)
        assert t.io_mode == "thread"  # a URL handler has no tty fd
    assert t.io_mode is None
    for io, mode in (("auto", "fd"), ("fd", "fd"), ("thread", "thread")):
        async with SerialTransport(f"serial://{pty.link}?io={io}") as t:
            assert isinstance(t, SerialTransport)
            assert t.io_mode == mode
            other = SerialTransport(
                f"serial://{pty.link}?io={'thread' if io != 'thread' else 'fd'}"
            )
            with pytest.raises(TransportOpenError, match=f"io={io}"):
                await other.open()  # one line, one data path
    url = f"serial://{pty.link}.missing?io=fd"
    with pytest.raises(TransportOpenError, match=re.escape(url)):
        await SerialTransport(url).open()


async def test_pty_reads_keep_leftovers_time_out_with_partial_bytes_and_cap_length(
    pty: Pty, io: str
) -> None:
    url = f"serial://{pty.link}?timeout=0.1&io={io}"
    async with SerialTransport(url) as t:
        assert isinstance(t, SerialTransport)
        os.write(pty.master, b"abc\nde")
        assert await t.read_until(b"\n") == b"abc\n"
        assert await t.read_exactly(2) == b"de"  # the bytes after the terminator were kept
        assert await t.read_exactly(0) == b""
        os.write(pty.master, b"\x0201S")
        started = time.monotonic()
        with pytest.raises(TransportTimeout) as err:
            await t.read_until(b"\x03", timeout=0.15)
        assert 0.1 < time.monotonic() - started < 1.0
        assert "0201S" in str(err.value) and url in str(err.value)
        os.write(pty.master, b"xy")
        with pytest.raises(TransportTimeout, match="2 of 4 bytes"):
            await t.read_exactly(4)
        os.write(pty.master, b"x" * 100 + b"\n")
        await asyncio.sleep(0.02)
        with pytest.raises(ProtocolError, match="within 50 bytes"):
            await t.read_until(b"\n", max_bytes=50)
        assert await t.discard_input() == 51
        # a terminator split across reads is still found; a reply may end exactly at max_bytes
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, os.write, pty.master, b"12\r")
        loop.call_later(0.04, os.write, pty.master, b"\n")
        assert await t.read_until(b"\r\n", max_bytes=4) == b"12\r\n"


async def test_pty_fd_path_runs_on_the_loop_and_leaves_no_callbacks(pty: Pty) -> None:
    loop = asyncio.get_running_loop()
    pty.respond(loop)
    tty_name = os.ttyname(pty.slave)
    async with SerialTransport(f"serial://{pty.link}?timeout=0.2&io=fd") as t:
        assert isinstance(t, SerialTransport)
        fds = _tty_fds(tty_name)
        assert await t.transaction(b"0DIA\r", b"\n") == b"<0DIA>\n"
        assert not loop.remove_reader(fds[-1])  # the reader is there only while a read waits
        # the data path needs no thread: a transaction does not touch the worker thread
        worker_jobs: list[object] = []
        line = t._line
        assert line is not None
        real_run = line.worker.run

        async def spy(fn: object, *args: object, **kw: object) -> object:
            worker_jobs.append(fn)
            return await real_run(fn, *args, **kw)  # type: ignore[arg-type]

        line.worker.run = spy  # type: ignore[method-assign,assignment]
        try:
            assert await t.transaction(b"1DIA\r", b"\n") == b"<1DIA>\n"
            await t.write(b"2DIA\r")
            assert await t.read_until(b"\n") == b"<2DIA>\n"
        finally:
            del line.worker.run
        assert worker_jobs == []
        with pytest.raises(TransportTimeout):
            await t.read_until(b"?", timeout=0.05)
        cancelled = asyncio.create_task(t.read_until(b"?", timeout=0.1))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await t.transaction(b"3DIA\r", b"\n") == b"<3DIA>\n"  # after the 0.1 s deadline
        _assert_no_loop_callbacks(loop, fds)
        # closed while an abandoned read still runs: everything is removed
        cancelled = asyncio.create_task(t.read_until(b"?", timeout=5))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    _assert_no_loop_callbacks(loop, fds)
    assert _tty_fds(tty_name) == [pty.slave]


@pytest.mark.timeout(20)
async def test_pty_fd_write_waits_for_room_without_blocking_the_loop(pty: Pty) -> None:
    """A write larger than the pty's queue (~20 KiB here) meets EAGAIN: it waits for room
    with add_writer while the loop runs on; with no reader it times out (max(2 s, timeout))."""
    loop = asyncio.get_running_loop()
    blob = bytes(range(256)) * 256  # 64 KiB
    got = bytearray()
    all_read = asyncio.Event()
    async with SerialTransport(f"serial://{pty.link}?timeout=0.1&io=fd") as t:
        assert isinstance(t, SerialTransport)
        ticks = 0

        def drain_slowly() -> None:
            nonlocal ticks
            ticks += 1
            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(pty.master, 4096))
            if len(got) < len(blob):
                loop.call_later(0.002, drain_slowly)
            else:
                all_read.set()

        loop.call_later(0.02, drain_slowly)
        await t.write(blob)
        await asyncio.wait_for(all_read.wait(), 5)
        assert bytes(got) == blob and ticks > 5  # the loop ran while the write waited
        started = time.monotonic()
        with pytest.raises(TransportTimeout, match="write did not complete within 2 s"):
            await t.write(blob)  # nobody reads the master now
        assert 1.9 < time.monotonic() - started < 3.0
        _assert_no_loop_callbacks(loop, _tty_fds(os.ttyname(pty.slave)))
        with contextlib.suppress(BlockingIOError):
            while os.read(pty.master, 65536):
                pass
        pty.respond(loop)
        assert await t.transaction(b"ok\r", b"\n") == b"<ok>\n"
