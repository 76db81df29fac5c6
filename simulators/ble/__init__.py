"""Bluetooth LE simulators: a BlueZ stand-in on a private D-Bus, and the devices on it.

The kernel of a CI machine has no Bluetooth, so :mod:`simulators.ble.bluez`
simulates bluetoothd + controller + radio behind BlueZ's D-Bus API; bleak and
its BlueZ backend run unchanged against it (Linux only: needs ``dbus-daemon``).
"""

from simulators.ble.bluez import (
    AttError,
    BleSimulatorUnavailable,
    BlueZStandIn,
    Characteristic,
    Peripheral,
    Service,
)
from simulators.ble.color_sensor import ColorSensorSim

__all__ = [
    "AttError",
    "BleSimulatorUnavailable",
    "BlueZStandIn",
    "Characteristic",
    "ColorSensorSim",
    "Peripheral",
    "Service",
]
