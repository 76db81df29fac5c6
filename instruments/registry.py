"""Driver registry and ``connect()``.

Drivers register through the ``labbridge.drivers`` entry-point group (the
built-in ones too, see ``pyproject.toml``), so a driver from another package
is found the same way as ours::

    [project.entry-points."labbridge.drivers"]
    my-balance = "mypkg.balance:Balance"
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from typing import Any

from instruments.driver import Driver
from instruments.errors import UnknownDriverError
from instruments.transports import transport_for

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "labbridge.drivers"

# Fallback when the distribution is not installed (running from a source tree).
_BUILTIN: dict[str, str] = {
    "syringe-pump": "instruments.drivers.syringe_pump:SyringePump",
    "hotplate": "instruments.drivers.hotplate:Hotplate",
    "color-sensor": "instruments.drivers.color_sensor:ColorSensor",
    "enclosure": "instruments.drivers.enclosure:Enclosure",
    "camera": "instruments.drivers.camera:Camera",
    "ph-meter": "instruments.drivers.ph_meter:PhMeter",
    "balance": "instruments.drivers.balance:Balance",
}


def _entry_points() -> dict[str, str]:
    found = dict(_BUILTIN)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def available_drivers() -> list[str]:
    """Names of every registered driver kind."""
    return sorted(_entry_points())


def driver_class(kind: str) -> type[Driver]:
    """The driver class registered as ``kind``."""
    eps = _entry_points()
    if kind not in eps:
        raise UnknownDriverError(kind, list(eps))
    module_name, _, attr = eps[kind].partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Driver)):
        raise TypeError(f"entry point {kind!r} ({eps[kind]}) is not an instruments.Driver subclass")
    return obj


def unopened(kind: str, url: str, **options: Any) -> Driver:
    """A driver of ``kind`` on the transport at ``url``, neither opened: what it declares
    (``commands``, ``channels`` with the limits its options give) without touching anything.

    Raises :class:`UnknownDriverError`, :class:`InvalidURLError` (naming the URL
    and what is wrong with it) or ``TypeError``/``ValueError`` for options the
    driver does not take. No port, socket or device is touched.
    """
    return driver_class(kind)(transport_for(url), **options)


def check(kind: str, url: str, **options: Any) -> None:
    """Validate a driver kind, a transport URL and driver options without opening anything
    (:func:`unopened`, raising what it raises)."""
    unopened(kind, url, **options)


@contextlib.asynccontextmanager
async def connect(
    kind: str, url: str, *, safe_on_exit: bool = True, **options: Any
) -> AsyncIterator[Any]:
    """Open a driver of ``kind`` on the transport at ``url``; close it on exit.

    URL query options configure the transport (``?baudrate=9600``); keyword
    ``options`` configure the driver (``address=2``). On exit the instrument is
    put into its safe state first (unless ``safe_on_exit=False``): a script that
    crashes never leaves a heater on. A failing safe state is logged, and the
    transport is closed regardless.
    """
    driver = unopened(kind, url, **options)
    try:
        await driver.open()
    except BaseException:
        await driver.close()
        raise
    try:
        yield driver
    finally:
        try:
            if safe_on_exit:
                try:
                    await driver.safe_state()
                except Exception as exc:
                    log.error("%s: safe state on exit failed: %s", driver.name, exc)
        finally:
            await driver.close()
