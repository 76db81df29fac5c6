"""The colour sensor's device side (PROTOCOLS.md, "Colour sensor - Bluetooth LE GATT").

A BLE peripheral on :class:`~simulators.ble.bluez.BlueZStandIn` (bluetoothd,
controller and radio simulated; bleak's BlueZ backend real, see that module):

* advertises ``LB-COLOR-<4 hex>`` (default: the address's last two bytes)
  and its service ``6e400001-b5a3-f393-e0a9-e50e24dc0001``;
* measurement ``...0002`` (notify, read): ``<HHHHHB`` little-endian
  ``seq, red, green, blue, clear, status`` (0 ok, 1 saturated, 2 dark), counts
  from :meth:`StationWorld.sensor_counts` and ``seq`` from
  ``world.sensor_seq``. A read returns the latest measurement (one is taken
  if there is none yet);
* control ``...0003`` (write): ``<BH`` opcode + integration time in ms.
  1 = measure once (one notification after the integration time), 2 = start
  continuous (a notification every integration period), 3 = stop. Time is
  simulated time (``world.clock``). A write of the wrong length is answered
  with ATT error 0x0D (bluetoothd: ``org.bluez.Error.InvalidArguments
  "Invalid Length"``); an unknown opcode or a zero integration time with 0x13
  (Value Not Allowed);
* Battery Service ``0x180F`` / Battery Level ``0x2A19`` (read): percent.

The firmware goes idle when the link drops (continuous mode stops; a
central must send opcode 2 again after reconnecting).

Faults (``world.faults``, device ``color-sensor``):

``sensor-dropout``      no notifications; measurement reads fail with ATT
                        error 0x80 (application: sensor unavailable).
``dropped-connection``  edge-triggered on injection: the peripheral drops the
                        link (``Connected``/``ServicesResolved`` false, as
                        BlueZ reports a link loss). It can be reconnected.
``garbled-bytes``       ``probability`` (default 1): measurement payloads
                        (notified or read) are truncated and bit-flipped.

Every control write, characteristic read, subscription change, connection
and disconnection is recorded in ``world.wire`` under ``color-sensor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from typing import Any

from simulators.ble.bluez import (
    ATT_APPLICATION_ERROR,
    ATT_INVALID_ATTRIBUTE_VALUE_LENGTH,
    ATT_VALUE_NOT_ALLOWED,
    AttError,
    BlueZStandIn,
    Characteristic,
    Peripheral,
    Service,
)
from simulators.world import StationWorld

DEVICE = "color-sensor"
SERVICE_UUID = "6e400001-b5a3-f393-e0a9-e50e24dc0001"
MEASUREMENT_UUID = "6e400002-b5a3-f393-e0a9-e50e24dc0001"
CONTROL_UUID = "6e400003-b5a3-f393-e0a9-e50e24dc0001"
BATTERY_SERVICE_UUID = "0000180f-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL_UUID = "00002a19-0000-1000-8000-00805f9b34fb"
MEASUREMENT = struct.Struct("<HHHHHB")
CONTROL = struct.Struct("<BH")
OP_MEASURE_ONCE, OP_START_CONTINUOUS, OP_STOP = 1, 2, 3


class ColorSensorSim:
    """Simulated BLE colour sensor. See the module docstring for the protocol and faults.

    ``bluez``: share one :class:`BlueZStandIn` between several simulated BLE
    devices (a process has one system bus); by default the sim starts and
    owns its own. ``min_period_s``: floor on the real-time period between
    continuous notifications (a BLE connection interval cannot be shorter
    than 7.5 ms; with a fast clock this keeps the sim from spinning).
    """

    def __init__(
        self,
        world: StationWorld,
        *,
        address: str = "AA:BB:CC:DD:EE:01",
        name: str | None = None,
        bluez: BlueZStandIn | None = None,
        battery_percent: int = 87,
        rssi: int = -58,
        min_period_s: float = 0.001,
        seed: int = 0,
    ) -> None:
        self.world = world
        self.address = address.upper()
        self.name = name or f"LB-COLOR-{self.address.replace(':', '')[-4:]}"
        self.battery_percent = battery_percent
        self.rssi = rssi
        self.min_period_s = min_period_s
        self.integration_ms = 100
        self._own_bluez = bluez is None
        self._bluez = bluez
        self._rng = random.Random(seed)
        self._latest: bytes | None = None
        self._continuous: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._listening = False
        self.peripheral = Peripheral(
            self.address,
            self.name,
            services=[
                Service(
                    SERVICE_UUID,
                    [
                        Characteristic(
                            MEASUREMENT_UUID, ("read", "notify"), read=self._read_measurement
                        ),
                        Characteristic(CONTROL_UUID, ("write",), write=self._write_control),
                    ],
                ),
                Service(
                    BATTERY_SERVICE_UUID,
                    [Characteristic(BATTERY_LEVEL_UUID, ("read",), read=self._read_battery)],
                ),
            ],
            advertised_uuids=[SERVICE_UUID],
            rssi=rssi,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_subscribe=self._on_subscribe,
        )

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """``ble://AA:BB:CC:DD:EE:01``: what a driver connects to."""
        return f"ble://{self.address}"

    @property
    def name_url(self) -> str:
        """``ble://name/LB-COLOR-EE01``: the same device, found by its advertised name."""
        return f"ble://name/{self.name}"

    @property
    def bluez(self) -> BlueZStandIn:
        if self._bluez is None:
            raise RuntimeError("ColorSensorSim is not started")
        return self._bluez

    @property
    def dbus_address(self) -> str:
        """The private bus; ``DBUS_SYSTEM_BUS_ADDRESS`` must point here before bleak connects."""
        return self.bluez.address

    def environ(self) -> contextlib.AbstractContextManager[str]:
        """Context manager setting ``DBUS_SYSTEM_BUS_ADDRESS`` to the private bus (restored after)."""
        return self.bluez.environ()

    @property
    def continuous(self) -> bool:
        return self._continuous is not None and not self._continuous.done()

    @property
    def connected(self) -> bool:
        return self._bluez is not None and self._running and self._bluez.is_connected(self.address)

    async def start(self) -> None:
        if self._running:
            return
        if self._bluez is None:
            self._bluez = BlueZStandIn()
        if self._own_bluez:
            await self._bluez.start()
        self._bluez.add_peripheral(self.peripheral)
        if not self._listening:  # Faults has no way to remove a listener: register once
            self.world.faults.on_inject(self._on_fault)
            self._listening = True
        self._running = True

    async def stop(self) -> None:
        """Stop measuring, leave the radio, stop the stand-in if this sim owns it (idempotent)."""
        if not self._running:
            return
        self._running = False
        await self._cancel_tasks()
        bluez = self._bluez
        if bluez is not None:
            if self._own_bluez:
                await bluez.stop()
                self._bluez = None
            else:
                bluez.remove_peripheral(self.address)
        await self._cancel_tasks()  # a disconnect hook may have run meanwhile

    async def __aenter__(self) -> ColorSensorSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -------------------------------------------------------------- faults
    def _record(self, data: Any, note: str) -> None:
        self.world.wire.record(DEVICE, data, note)

    def _dropout(self) -> bool:
        return self.world.faults.active("sensor-dropout", device=DEVICE) is not None

    def _on_fault(self, name: str, params: dict[str, Any]) -> None:
        if (
            not self._running
            or name != "dropped-connection"
            or params.get("device", DEVICE) != DEVICE
        ):
            return
        self._record(None, "link dropped (fault dropped-connection)")
        self.bluez.disconnect_peripheral(self.address, "remote")

    def _garble(self, payload: bytes) -> bytes:
        params = self.world.faults.active("garbled-bytes", device=DEVICE)
        if params is None or self._rng.random() >= float(params.get("probability", 1.0)):
            return payload
        cut = self._rng.randint(1, len(payload) - 1)
        data = bytearray(payload[:cut])
        data[self._rng.randrange(len(data))] ^= 1 << self._rng.randrange(8)
        return bytes(data)

    # ------------------------------------------------------------- physics
    def _measure(self, integration_ms: int) -> bytes | None:
        """One measurement from the world (None during a sensor dropout)."""
        if self._dropout():
            return None
        red, green, blue, clear, status = self.world.sensor_counts(integration_ms)
        with self.world.lock:
            seq = self.world.sensor_seq
        self._latest = MEASUREMENT.pack(seq, red, green, blue, clear, status)
        return self._latest

    def _publish(self, payload: bytes | None) -> None:
        if payload is not None and self._running:
            self.bluez.notify(self.address, MEASUREMENT_UUID, self._garble(payload))

    async def _measure_once(self, integration_ms: int) -> None:
        await self.world.clock.sleep(integration_ms / 1000.0)
        self._publish(self._measure(integration_ms))

    async def _continuous_loop(self, integration_ms: int) -> None:
        clock = self.world.clock
        while True:
            await asyncio.sleep(max(clock.real_seconds(integration_ms / 1000.0), self.min_period_s))
            self._publish(self._measure(integration_ms))

    def _stop_continuous(self) -> None:
        task, self._continuous = self._continuous, None
        if task is not None:
            task.cancel()

    # ---------------------------------------------------------- GATT server
    def _read_measurement(self) -> bytes:
        self._record(b"", "read measurement")
        if self._dropout():
            raise AttError(ATT_APPLICATION_ERROR, "sensor unavailable")
        payload = self._latest if self._latest is not None else self._measure(self.integration_ms)
        assert payload is not None
        return self._garble(payload)

    def _read_battery(self) -> bytes:
        self._record(b"", "read battery")
        return bytes([max(0, min(100, int(self.battery_percent)))])

    def _write_control(self, data: bytes, with_response: bool) -> None:
        self._record(bytes(data), "write control" + ("" if with_response else " (no response)"))
        if len(data) != CONTROL.size:
            raise AttError(
                ATT_INVALID_ATTRIBUTE_VALUE_LENGTH, f"control takes {CONTROL.size} bytes"
            )
        opcode, integration_ms = CONTROL.unpack(data)
        if opcode == OP_STOP:
            self._stop_continuous()
            return
        if opcode not in (OP_MEASURE_ONCE, OP_START_CONTINUOUS) or integration_ms < 1:
            raise AttError(
                ATT_VALUE_NOT_ALLOWED, f"opcode {opcode}, integration {integration_ms} ms"
            )
        self.integration_ms = integration_ms
        if opcode == OP_MEASURE_ONCE:
            self._spawn(self._measure_once(integration_ms))
        else:
            self._stop_continuous()
            self._continuous = self._spawn(self._continuous_loop(integration_ms))

    def _on_connect(self) -> None:
        self._record(None, "connect")

    def _on_disconnect(self, reason: str) -> None:
        self._record(None, f"disconnect ({reason})")
        # the firmware goes idle without a central
        for task in list(self._tasks):
            task.cancel()
        self._continuous = None

    def _on_subscribe(self, uuid: str, enabled: bool) -> None:
        self._record(uuid, "notifications " + ("on" if enabled else "off"))


__all__ = [
    "BATTERY_LEVEL_UUID",
    "BATTERY_SERVICE_UUID",
    "CONTROL_UUID",
    "DEVICE",
    "MEASUREMENT_UUID",
    "SERVICE_UUID",
    "ColorSensorSim",
]
