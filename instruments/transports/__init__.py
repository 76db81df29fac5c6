"""Transports: one small async interface per bus, opened from a URL.

Each module here is the only place its library is imported:

=================  ==========================================  ===================
module             URL schemes                                  library
=================  ==========================================  ===================
``serial``         ``serial://``, ``socket://``, ``rfc2217://``, pyserial
                   ``loop://``
``modbus``,        ``modbus-tcp://``, ``modbus-rtu://``         pymodbus
``modbuslink``     (the link, shared by the units of one line)
``ble``            ``ble://ADDRESS``, ``ble://name/NAME``       bleak
``mqtt``           ``mqtt://``, ``mqtts://``                    paho-mqtt
``camera``         ``camera://INDEX``, ``camera:///file``,      OpenCV
                   ``http(s)://...``, ``rtsp://...``
=================  ==========================================  ===================

:func:`transport_for` builds the right (unopened) transport for a URL; the
library behind it is imported only then.
"""

from __future__ import annotations

import importlib

from instruments.errors import InvalidURLError
from instruments.transports.base import DeviceWorker, Transport, URLOptions, split_url

_SCHEMES: dict[str, tuple[str, str]] = {
    "serial": ("instruments.transports.serial", "SerialTransport"),
    "socket": ("instruments.transports.serial", "SerialTransport"),
    "rfc2217": ("instruments.transports.serial", "SerialTransport"),
    "loop": ("instruments.transports.serial", "SerialTransport"),
    "modbus-tcp": ("instruments.transports.modbus", "ModbusTransport"),
    "modbus-rtu": ("instruments.transports.modbus", "ModbusTransport"),
    "ble": ("instruments.transports.ble", "BleTransport"),
    "mqtt": ("instruments.transports.mqtt", "MqttTransport"),
    "mqtts": ("instruments.transports.mqtt", "MqttTransport"),
    "camera": ("instruments.transports.camera", "CameraTransport"),
    "http": ("instruments.transports.camera", "CameraTransport"),
    "https": ("instruments.transports.camera", "CameraTransport"),
    "rtsp": ("instruments.transports.camera", "CameraTransport"),
}


def transport_class(url: str) -> type[Transport]:
    """The transport class that handles ``url``'s scheme."""
    scheme, _, _ = split_url(url)
    try:
        module_name, class_name = _SCHEMES[scheme]
    except KeyError:
        raise InvalidURLError(
            url, f"unknown scheme {scheme!r}; known: {', '.join(sorted(_SCHEMES))}"
        ) from None
    cls: type[Transport] = getattr(importlib.import_module(module_name), class_name)
    return cls


def transport_for(url: str) -> Transport:
    """A new, not yet opened transport for ``url`` (the URL is validated now)."""
    return transport_class(url)(url)


__all__ = [
    "DeviceWorker",
    "Transport",
    "URLOptions",
    "split_url",
    "transport_class",
    "transport_for",
]
