"""A whole simulated station (or several) on loopback, handing back the URLs for a lab config.

``SimulatedBench`` starts one :class:`~simulators.world.StationWorld` and the
device side of every instrument of the reference bench over its real wire:

=================  ============================================  =========================
instrument         simulator                                      URL handed back
=================  ============================================  =========================
syringe pumps 0-3  one daisy chain on a pty pair                  ``serial:///tmp/.../pumps``
hotplate-stirrer   a pymodbus server (Modbus TCP, or RTU on pty)  ``modbus-tcp://127.0.0.1:P``
colour sensor      GATT peripheral on a BlueZ stand-in (D-Bus)    ``ble://AA:BB:CC:DD:EE:01``
enclosure module   an MQTT client on a real broker                ``mqtt://127.0.0.1:P/lab``
camera             MJPEG over HTTP                                ``http://127.0.0.1:P/stream.mjpg``
=================  ============================================  =========================

Several stations share one MQTT broker and one BlueZ stand-in (bleak reaches
BlueZ through the process-wide ``DBUS_SYSTEM_BUS_ADDRESS``), see
:class:`SimulatedLab`. ``SimulatedLab(bench="buffer")`` starts the second
bench's stations instead (:mod:`simulators.buffer_bench`: pumps, hotplate and
pH transmitter on one RS-485 line, balance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from simulators.ble.bluez import BlueZStandIn
from simulators.ble.color_sensor import ColorSensorSim
from simulators.broker import start_broker
from simulators.buffer_bench import SimulatedBufferBench
from simulators.buffer_world import BufferWorld
from simulators.camera import CameraSim
from simulators.clock import SimClock
from simulators.enclosure import EnclosureSim
from simulators.hotplate import HotplateSim
from simulators.pump import PumpChainSim
from simulators.station import InstrumentSpec, SimulatedStation
from simulators.world import StationWorld

log = logging.getLogger(__name__)

__all__ = [
    "BENCHES",
    "InstrumentSpec",
    "SimClock",
    "SimulatedBench",
    "SimulatedBufferBench",
    "SimulatedLab",
    "StationWorld",
]

BENCHES = ("colour", "buffer")

PUMP_ADDRESSES = {"red": 0, "green": 1, "blue": 2, "waste": 3}


class SimulatedBench(SimulatedStation):
    """One simulated reference station. Use :class:`SimulatedLab` to start it (and its neighbours).

    ``index`` makes addresses unique when several stations share a broker and a BLE bus.
    """

    def __init__(
        self,
        world: StationWorld,
        *,
        index: int = 0,
        broker_url: str,
        bluez: BlueZStandIn,
        hotplate_mode: str = "tcp",
        prefix: str = "lab",
        camera_fps: float = 10.0,
    ) -> None:
        super().__init__(world, index=index)
        self.world: StationWorld = world
        self.enclosure_id = f"enc-{index + 1}"
        self.pumps = PumpChainSim(world)
        self.hotplate = HotplateSim(world, mode=hotplate_mode)
        address = f"AA:BB:CC:DD:EE:{index + 1:02X}"
        self.color_sensor = ColorSensorSim(
            world, address=address, name=f"LB-COLOR-{index + 1:04X}", bluez=bluez
        )
        self.enclosure = EnclosureSim(
            world, broker_url, prefix=prefix, enclosure_id=self.enclosure_id
        )
        self.camera = CameraSim(world, fps=camera_fps)
        self._sims = [
            self.pumps,
            self.hotplate,
            self.color_sensor,
            self.enclosure,
            self.camera,
        ]

    @property
    def urls(self) -> dict[str, str]:
        return {
            "pumps": self.pumps.url,
            "hotplate": self.hotplate.url,
            "color-sensor": self.color_sensor.url,
            "enclosure": self.enclosure.url,
            "camera": self.camera.url,
        }

    def instruments(self) -> list[InstrumentSpec]:
        """The station's instruments as a lab config lists them (driver kind, URL, options)."""
        specs = [
            InstrumentSpec(fluid, "syringe-pump", self.pumps.url, {"address": addr})
            for fluid, addr in PUMP_ADDRESSES.items()
        ]
        specs += [
            InstrumentSpec("hotplate", "hotplate", self.hotplate.url),
            InstrumentSpec("color", "color-sensor", self.color_sensor.url),
            InstrumentSpec(
                "enclosure", "enclosure", self.enclosure.url, {"enclosure_id": self.enclosure_id}
            ),
            InstrumentSpec("camera", "camera", self.camera.url),
        ]
        return specs


class SimulatedLab:
    """N simulated stations on loopback with one broker and one BLE bus.

    ``async with SimulatedLab(stations=2, speed=20) as lab:`` then
    ``lab.stations[0].instruments()``. With ``broker_url=None`` a broker is
    started (mosquitto when installed, else the embedded pure-Python one;
    ``prefer_broker="embedded"`` forces the latter).
    While running, ``DBUS_SYSTEM_BUS_ADDRESS`` points at the BlueZ stand-in
    (restored on stop), so bleak in this process finds the simulated sensors.

    ``bench="colour"`` (default) starts colour-match stations
    (:class:`SimulatedBench`); ``bench="buffer"`` starts buffer-formulation
    stations (:class:`~simulators.buffer_bench.SimulatedBufferBench`, each on a
    :class:`~simulators.buffer_world.BufferWorld`): they have no BLE device,
    so no BlueZ stand-in is started (``bluez`` stays None; ``hotplate_mode``
    and ``camera_fps`` do not apply), the broker is (the campaign API uses it).
    """

    def __init__(
        self,
        stations: int = 1,
        *,
        speed: float = 1.0,
        seed: int = 0,
        broker_url: str | None = None,
        hotplate_mode: str = "tcp",
        prefix: str = "lab",
        camera_fps: float = 10.0,
        prefer_broker: str = "mosquitto",
        bench: str = "colour",
    ) -> None:
        if stations < 1:
            raise ValueError(f"a simulated lab needs at least one station, got {stations}")
        if bench not in BENCHES:
            raise ValueError(f"unknown bench {bench!r}; benches: {', '.join(BENCHES)}")
        self.bench = bench
        self.clock = SimClock(speed)
        self.n_stations = stations
        self.seed = seed
        self.prefix = prefix
        self.hotplate_mode = hotplate_mode
        self.camera_fps = camera_fps
        self._broker_url = broker_url
        self.prefer_broker = prefer_broker
        self.broker: Any = None
        self.bluez: BlueZStandIn | None = None
        self.stations: list[SimulatedBench | SimulatedBufferBench] = []
        self._saved_env: str | None = None
        self._env_set = False

    @property
    def broker_url(self) -> str:
        if self._broker_url is not None:
            return self._broker_url
        if self.broker is None:
            raise RuntimeError("the simulated lab is not started")
        return str(self.broker.url)

    async def start(self) -> None:
        try:
            if self._broker_url is None:
                self.broker = await asyncio.to_thread(start_broker, self.prefer_broker)
            if self.bench == "colour":
                self.bluez = BlueZStandIn()
                await self.bluez.start()
                self._saved_env = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.bluez.address
                self._env_set = True
            for i in range(self.n_stations):
                station = self._station(i)
                self.stations.append(station)
                if self.broker is not None:
                    self.broker.watch(station.world)  # the broker-restart fault restarts our broker
                await station.start()
        except BaseException:
            await self.stop()
            raise

    def _station(self, i: int) -> SimulatedBench | SimulatedBufferBench:
        name = f"bench-{chr(ord('a') + i)}"
        if self.bench == "buffer":
            return SimulatedBufferBench(
                BufferWorld(name, clock=self.clock, seed=self.seed + i), index=i
            )
        assert self.bluez is not None
        return SimulatedBench(
            StationWorld(name, clock=self.clock, seed=self.seed + i),
            index=i,
            broker_url=self.broker_url,
            bluez=self.bluez,
            hotplate_mode=self.hotplate_mode,
            prefix=self.prefix,
            camera_fps=self.camera_fps,
        )

    async def stop(self) -> None:
        """Stop everything (idempotent): stations, then the BLE bus and the broker."""
        for bench in reversed(self.stations):
            await bench.stop()
        self.stations.clear()
        if self._env_set:
            if self._saved_env is None:
                os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self._saved_env
            self._env_set = False
        if self.bluez is not None:
            with contextlib.suppress(Exception):
                await self.bluez.stop()
            self.bluez = None
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await asyncio.to_thread(broker.stop)

    def lab_config(self) -> dict[str, Any]:
        """A lab-config-shaped dict (stations -> instruments) for the running simulators."""
        return {
            "broker": self.broker_url,
            # bleak reaches the simulated sensors through this bus (another process must export it)
            "dbus_system_bus_address": self.bluez.address if self.bluez else None,
            "stations": {
                bench.name: {"instruments": [spec.as_dict() for spec in bench.instruments()]}
                for bench in self.stations
            },
        }

    async def __aenter__(self) -> SimulatedLab:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
