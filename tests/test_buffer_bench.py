"""``SimulatedLab(bench="buffer")``: the second bench's stations start, answer on their wires
(pumps and hotplate through their drivers; the pH transmitter and the balance with plain
clients) and stop cleanly."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import pytest
import serial
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.framer import FramerType

import instruments
from simulators.bench import SimulatedLab
from simulators.buffer_bench import SimulatedBufferBench
from simulators.buffer_world import BEAKER_TARE_G, STOCKS, BufferWorld


def test_unknown_bench_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown bench 'paint'; benches: colour, buffer"):
        SimulatedLab(bench="paint")


@pytest.mark.timeout(60)
async def test_buffer_lab_starts_lists_its_instruments_and_stops() -> None:
    dbus_before = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    async with SimulatedLab(stations=2, speed=50, bench="buffer") as lab:
        assert lab.bluez is None and os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") == dbus_before
        config = lab.lab_config()
        assert set(config["stations"]) == {"bench-a", "bench-b"}
        assert config["dbus_system_bus_address"] is None
        lines = set()
        for bench in lab.stations:
            assert isinstance(bench, SimulatedBufferBench) and isinstance(bench.world, BufferWorld)
            specs = {s.name: s for s in bench.instruments()}
            assert [(s.name, s.kind) for s in bench.instruments()] == [
                ("acid", "syringe-pump"),
                ("base", "syringe-pump"),
                ("water", "syringe-pump"),
                ("waste", "syringe-pump"),
                ("hotplate", "hotplate"),
                ("ph", "ph-meter"),
                ("balance", "balance"),
            ]
            assert [specs[f].options for f in ("acid", "base", "water", "waste")] == [
                {"address": 0},
                {"address": 1},
                {"address": 2},
                {"address": 3},
            ]
            hp_url, ph_url = urlsplit(specs["hotplate"].url), urlsplit(specs["ph"].url)
            assert hp_url.scheme == ph_url.scheme == "modbus-rtu"
            assert hp_url.path == ph_url.path  # one RS-485 line
            assert hp_url.query == "baudrate=9600&unit=1" and ph_url.query == "baudrate=9600&unit=2"
            lines.add(hp_url.path)
            assert specs["balance"].url.startswith("serial://") and specs["balance"].url.endswith(
                "/balance?baudrate=9600"
            )

            async with instruments.connect(
                "syringe-pump", specs["acid"].url, **specs["acid"].options
            ) as pump:
                await pump.dispense(2.0, 30.0)
                await pump.wait_until_stopped(timeout=10)
            async with instruments.connect("hotplate", specs["hotplate"].url) as hp:
                await hp.set_stirrer(True, 150)
                assert (await hp.read())["stirrer_enabled"] is True
            assert bench.world.beaker.stock_ml["acid"] == pytest.approx(2.0)

            client = AsyncModbusSerialClient(
                hp_url.path, framer=FramerType.RTU, baudrate=9600, timeout=0.5, retries=0
            )
            await client.connect()
            try:
                rr = await client.read_input_registers(0, count=4, device_id=2)
                assert not rr.isError() and rr.registers[3] & 0b10  # 2 mL: probe not immersed
            finally:
                client.close()

            # the stirrer (switched off on exit) spins down, the pan settles
            await lab.clock.sleep(10.0)
            port = serial.Serial(specs["balance"].url[len("serial://") :].split("?")[0], 9600)
            try:
                await asyncio.to_thread(port.write, b"S\r\n")
                port.timeout = 5.0
                reply = (await asyncio.to_thread(port.readline)).decode()
            finally:
                port.close()
            assert reply.startswith("S S ") and reply.endswith(" g\r\n")
            expected = BEAKER_TARE_G + 2.0 * STOCKS["acid"].density_g_ml
            assert float(reply[4:14]) == pytest.approx(expected, abs=0.001)
        assert len(lines) == 2  # each station its own line
    assert lab.stations == [] and lab.broker is None
