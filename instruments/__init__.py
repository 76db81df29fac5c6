"""Instruments: transports (one per bus), drivers (one per instrument kind).

Entry point::

    async with instruments.connect("hotplate", "modbus-tcp://127.0.0.1:5020?unit=1") as hp:
        await hp.set_stirrer(rpm=300)
        print(await hp.read())
"""

from instruments.driver import Channel, Driver, SafeStateError, retry_idempotent, run_all
from instruments.errors import (
    DeviceAlarm,
    DeviceError,
    DeviceRejected,
    InstrumentError,
    InvalidURLError,
    LinkLostError,
    ModbusExceptionError,
    ProtocolError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
    UnknownDriverError,
)
from instruments.registry import available_drivers, connect, driver_class

__all__ = [
    "Channel",
    "DeviceAlarm",
    "DeviceError",
    "DeviceRejected",
    "Driver",
    "InstrumentError",
    "InvalidURLError",
    "LinkLostError",
    "ModbusExceptionError",
    "ProtocolError",
    "SafeStateError",
    "TransportError",
    "TransportOpenError",
    "TransportTimeout",
    "UnknownDriverError",
    "available_drivers",
    "connect",
    "driver_class",
    "retry_idempotent",
    "run_all",
]
