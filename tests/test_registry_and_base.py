"""The transport base, URL options, the per-device worker and the driver registry."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import instruments
from instruments.driver import Channel, Driver, SafeStateError, retry_idempotent, run_all
from instruments.errors import InvalidURLError, ProtocolError, TransportTimeout, UnknownDriverError
from instruments.transports import split_url, transport_class
from instruments.transports.base import DeviceWorker, Transport, URLOptions


def test_split_url_and_options() -> None:
    scheme, base, opts = split_url("serial:///dev/ttyUSB0?baudrate=19200&parity=E")
    assert (scheme, base, opts) == (
        "serial",
        "serial:///dev/ttyUSB0",
        {"baudrate": "19200", "parity": "E"},
    )
    with pytest.raises(InvalidURLError, match="given twice"):
        split_url("serial:///dev/x?baudrate=1&baudrate=2")
    with pytest.raises(InvalidURLError, match="no scheme"):
        split_url("/dev/ttyUSB0")


def test_url_options_are_typed_and_typos_rejected() -> None:
    url = "x://y?baudrate=abc"
    opts = URLOptions(url, {"baudrate": "abc"})
    with pytest.raises(InvalidURLError, match="baudrate='abc' is not an integer"):
        opts.int("baudrate", 9600)
    opts = URLOptions(url, {"timout": "1", "parity": "Q", "rtscts": "maybe"})
    with pytest.raises(InvalidURLError, match="not one of N, E, O"):
        opts.choice("parity", "N", ("N", "E", "O"))
    with pytest.raises(InvalidURLError, match="boolean"):
        opts.bool("rtscts", False)
    assert opts.float("timeout", 1.5) == 1.5
    with pytest.raises(InvalidURLError, match=r"unknown option\(s\): timout"):
        opts.finish()
    with pytest.raises(InvalidURLError, match="non-negative"):
        URLOptions(url, {"timeout": "-1"}).float("timeout", 1.0)


def test_unknown_scheme_names_the_url_and_known_schemes() -> None:
    with pytest.raises(InvalidURLError) as err:
        transport_class("gpib://0/5")
    assert "gpib://0/5" in str(err.value) and "modbus-tcp" in str(err.value)


async def test_device_worker_runs_on_one_dedicated_thread_and_times_out() -> None:
    worker = DeviceWorker("unit")
    names = {await worker.run(lambda: threading.current_thread().name) for _ in range(5)}
    assert len(names) == 1 and next(iter(names)).startswith("lb-unit")
    assert threading.current_thread().name not in names
    with pytest.raises(TransportTimeout, match="dev://x: no answer within 0.05 s"):
        await worker.run(time.sleep, 0.3, timeout=0.05, url="dev://x")
    await worker.aclose()
    await worker.aclose()  # idempotent
    with pytest.raises(Exception, match="closed"):
        await worker.run(lambda: 1)


class CountingTransport(Transport):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.opens = 0
        self.closes = 0

    async def _open(self) -> None:
        self.opens += 1

    async def _close(self) -> None:
        self.closes += 1


async def test_transport_open_close_idempotent_and_reconnect() -> None:
    t = CountingTransport("count://1")
    await t.close()  # never opened: fine
    await t.open()
    await t.open()
    assert t.opens == 1 and t.is_open
    await t.reconnect()
    assert (t.opens, t.closes) == (2, 1)
    await t.close()
    await t.close()
    assert t.closes == 2 and not t.is_open


async def test_retry_idempotent_retries_only_transient_errors() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ProtocolError("dev", "garbled")
        return "ok"

    assert await retry_idempotent(flaky, what="query") == "ok" and calls == 3

    async def always_bad() -> None:
        raise TransportTimeout("dev://", "silent")

    with pytest.raises(TransportTimeout):
        await retry_idempotent(always_bad, attempts=2)

    async def rejected() -> None:
        raise ValueError("not transient")

    with pytest.raises(ValueError):
        await retry_idempotent(rejected)


async def test_run_all_attempts_every_action_then_reports_all_failures() -> None:
    done: list[str] = []

    async def ok(label: str) -> None:
        done.append(label)

    async def boom() -> None:
        raise OSError("port gone")

    with pytest.raises(SafeStateError, match="heater: port gone") as err:
        await run_all(
            {"heater": boom, "stirrer": lambda: ok("stirrer"), "light": lambda: ok("light")}, "dev"
        )
    assert done == ["stirrer", "light"]
    assert list(err.value.failures) == ["heater"]


def test_unknown_driver_lists_known_kinds() -> None:
    with pytest.raises(
        UnknownDriverError,
        match="known kinds: balance, camera, color-sensor, enclosure, hotplate, ph-meter, syringe-pump",
    ):
        instruments.driver_class("thermocycler")


# A driver from "another package", registered through the entry-point group.
class SoftBalance(Driver):
    """A soft (in-memory) balance used to prove third-party registration works."""

    kind = "soft-balance"
    log: list[str] = []

    def __init__(self, transport: Transport, *, tare_g: float = 0.0) -> None:
        super().__init__(transport)
        self.tare_g = tare_g

    @property
    def channels(self) -> dict[str, Channel]:
        return {"mass_g": Channel("mass_g", "g", settable=False)}

    async def read(self) -> dict[str, Any]:
        return {"mass_g": 1.5 - self.tare_g}

    async def safe_state(self) -> None:
        SoftBalance.log.append("safe")


@pytest.fixture
def third_party_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "labbridge_soft_balance-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: labbridge-soft-balance\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[labbridge.drivers]\nsoft-balance = tests.test_registry_and_base:SoftBalance\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tests.test_registry_and_base", sys.modules[__name__])


async def test_third_party_driver_registers_through_entry_points(third_party_package: None) -> None:
    assert "soft-balance" in instruments.available_drivers()
    SoftBalance.log.clear()
    async with instruments.connect("soft-balance", "loop://", tare_g=0.5) as bal:
        assert await bal.read() == {"mass_g": 1.0}
        assert bal.describe()["channels"]["mass_g"]["unit"] == "g"
        assert bal.transport.is_open
    assert SoftBalance.log == ["safe"]  # safe state on exit
    assert not bal.transport.is_open


async def test_connect_safe_states_even_when_the_body_raises(third_party_package: None) -> None:
    SoftBalance.log.clear()
    with pytest.raises(RuntimeError, match="user code"):
        async with instruments.connect("soft-balance", "loop://"):
            raise RuntimeError("user code")
    assert SoftBalance.log == ["safe"]


def test_driver_refuses_the_wrong_transport_type() -> None:
    class NeedsCounting(SoftBalance):
        transport_types = (CountingTransport,)

    with pytest.raises(TypeError, match="needs a CountingTransport"):
        NeedsCounting(transport_class("loop://")("loop://"))  # type: ignore[call-arg]
