"""Bluetooth LE GATT transport over bleak: the only module that imports bleak.

URLs::

    ble://AA:BB:CC:DD:EE:FF                 by Bluetooth address (or a CoreBluetooth UUID on macOS)
    ble://name/LB-COLOR-EE01                by advertised local name (percent-encoded if needed)
    ble://AA:BB:CC:DD:EE:FF?timeout=10&scan_timeout=5&adapter=hci1

Options: ``timeout`` (s, default 10): connecting and every GATT operation;
``scan_timeout`` (s, default 5): how long to look for the device's
advertisement when resolving it; ``adapter`` (Linux: ``hci0``, ...).

Opening scans for the device (address or name), connects, and discovers its
GATT database. Characteristics are named by UUID (``"2a19"`` and the 128-bit
form are the same). Notifications go onto one :class:`asyncio.Queue` per
subscribed characteristic; bleak's callbacks only put bytes on it (on the
event loop; moved there with ``call_soon_threadsafe`` if a backend calls from
another thread) -- user code never runs inside a bleak callback.

Link loss: when the peripheral disconnects, the callbacks registered with
:meth:`BleTransport.on_disconnect` are scheduled on the loop, a waiter on a
notification gets :class:`LinkLostError`, and so does the next operation
(once); the operation after that reconnects, re-subscribing every active
notification onto the same queues.

Errors: :class:`TransportOpenError` (names the URL) when the device is not
found or the connection fails; :class:`TransportTimeout` when an operation
outlives its timeout; :class:`LinkLostError`; :class:`DeviceRejected` when
the peripheral answers with an ATT error (``code`` ``"ATT 0x0D"``);
:class:`TransportError` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from bleak import BleakAdapter, BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.exc import (
    PROTOCOL_ERROR_CODES,
    BleakCharacteristicNotFoundError,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
)
from bleak.uuids import normalize_uuid_str

from instruments.errors import (
    DeviceRejected,
    InvalidURLError,
    LinkLostError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.base import Transport, URLOptions, split_url

T = TypeVar("T")
log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
_CB_UUID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")
# D-Bus errors (BlueZ) that mean "there is no link any more"
_LINK_ERRORS = {
    "org.bluez.Error.NotConnected",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.ServiceUnknown",
}

#: (address, advertised name or None, RSSI in dBm)
ScanResult = tuple[str, "str | None", int]


def normalize_uuid(uuid: str) -> str:
    """``"2A19"``/``"0x2a19"`` -> ``"00002a19-0000-1000-8000-00805f9b34fb"`` (bleak's form)."""
    u = uuid.strip().lower().removeprefix("0x")
    try:
        return normalize_uuid_str(u)
    except (ValueError, TypeError):
        raise ValueError(f"not a Bluetooth UUID: {uuid!r}") from None


_SCAN_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _scan_lock() -> asyncio.Lock:
    """One scan at a time per event loop.

    BlueZ gives each D-Bus client one discovery session, and bleak shares one
    D-Bus connection per event loop: a second concurrent ``StartDiscovery``
    fails with ``org.bluez.Error.InProgress`` (two stations opening their
    sensors at once hit this). Scans queue here instead.
    """
    loop = asyncio.get_running_loop()
    lock = _SCAN_LOCKS.get(loop)
    if lock is None:
        lock = _SCAN_LOCKS[loop] = asyncio.Lock()
    return lock


_USERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()


def _enter_loop() -> None:
    loop = asyncio.get_running_loop()
    _USERS[loop] = _USERS.get(loop, 0) + 1


async def _leave_loop() -> None:
    loop = asyncio.get_running_loop()
    left = _USERS.get(loop, 0) - 1
    if left > 0:
        _USERS[loop] = left
        return
    _USERS.pop(loop, None)
    await _release_bluez_manager(loop)


async def _release_bluez_manager(loop: asyncio.AbstractEventLoop) -> None:
    """Close bleak's per-loop BlueZ manager once the last BLE link of this loop is closed.

    bleak keeps one manager per event loop (a D-Bus connection and a watcher
    task) until that loop is closed *and* another manager is requested. Closing
    every link should release every socket, so the last close releases it; the
    next open makes a fresh one. Uses bleak internals, guarded: if they change,
    the manager is simply kept (as bleak itself would).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        from bleak.backends.bluezdbus import manager as bluez_manager
    except ImportError:
        return
    instances = getattr(bluez_manager, "_global_instances", None)
    if not isinstance(instances, dict):
        return
    manager = instances.pop(loop, None)
    bus = getattr(manager, "_bus", None)
    if bus is None:
        return
    logger = logging.getLogger("bleak.backends.bluezdbus.manager")
    quiet = _DropBusLostWarning()
    logger.addFilter(quiet)
    try:
        bus.disconnect()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await bus.wait_for_disconnect()
        for _ in range(3):  # let the manager's watcher task see the disconnect and finish
            await asyncio.sleep(0)
    finally:
        logger.removeFilter(quiet)


class _DropBusLostWarning(logging.Filter):
    """bleak warns "D-Bus connection to BlueZ was lost" when we close it on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "connection to BlueZ was lost" not in record.getMessage()


class BleTransport(Transport):
    """A GATT link to one peripheral. See the module docstring for URLs, options and errors."""

    schemes = ("ble",)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._counted = False  # counted in _USERS (this loop's BLE links) while open
        scheme, base, options = split_url(url)
        if scheme not in self.schemes:
            raise InvalidURLError(url, "BleTransport handles ble:// URLs")
        if not base.lower().startswith("ble://"):
            raise InvalidURLError(url, "expected ble://ADDRESS or ble://name/NAME")
        target = base[len("ble://") :]
        self.address: str | None = None
        self.device_name: str | None = None
        if target.lower().startswith("name/"):
            name = unquote(target[len("name/") :])
            if not name:
                raise InvalidURLError(url, "empty device name (expected ble://name/NAME)")
            self.device_name = name
        else:
            mac = target.upper().replace("-", ":")
            if _ADDRESS.match(mac):
                self.address = mac
            elif _CB_UUID.match(target.upper()):  # macOS hides addresses behind a UUID
                self.address = target.upper()
            else:
                raise InvalidURLError(
                    url,
                    f"{target!r} is not a Bluetooth address (AA:BB:CC:DD:EE:FF); use ble://name/NAME for a name",
                )
        opts = URLOptions(url, options)
        self.timeout = opts.float("timeout", 10.0)
        self.scan_timeout = opts.float("scan_timeout", 5.0)
        self.adapter = opts.optional_str("adapter")
        opts.finish()
        if self.timeout <= 0 or self.scan_timeout <= 0:
            raise InvalidURLError(url, "timeout and scan_timeout must be > 0")

        self._client: BleakClient | None = None
        self._device: BLEDevice | None = None
        self._dead: list[BleakClient] = []
        self._subs: dict[str, asyncio.Queue[bytes]] = {}
        self._lost_pending = False
        self._lost_event = asyncio.Event()
        self._disconnect_callbacks: list[Callable[[], object]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.dropped_notifications = 0

    # ---------------------------------------------------------------- info
    @property
    def target(self) -> str:
        """What is looked for: the address, or ``name NAME``."""
        return self.address if self.address is not None else f"name {self.device_name!r}"

    @property
    def is_connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    @property
    def services(self) -> dict[str, tuple[str, ...]]:
        """Service UUID -> its characteristic UUIDs (empty when not connected)."""
        client = self._client
        if client is None or not client.is_connected:
            return {}
        return {s.uuid: tuple(c.uuid for c in s.characteristics) for s in client.services}

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return tuple(self._subs)

    def on_disconnect(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback()`` (scheduled on the event loop) whenever the peripheral drops the link.

        Not called for :meth:`close`. Returns a function that unregisters it.
        """
        self._disconnect_callbacks.append(callback)

        def remove() -> None:
            if callback in self._disconnect_callbacks:
                self._disconnect_callbacks.remove(callback)

        return remove

    # ---------------------------------------------------------------- scan
    @classmethod
    async def scan(cls, timeout: float = 5.0, *, adapter: str | None = None) -> list[ScanResult]:
        """Listen for advertisements for ``timeout`` s; ``(address, name, rssi)``, strongest first."""
        kwargs: dict[str, Any] = {"bluez": {"adapter": adapter}} if adapter else {}
        _enter_loop()
        try:
            async with _scan_lock(), asyncio.timeout(timeout + 10.0):
                found = await BleakScanner.discover(timeout=timeout, return_adv=True, **kwargs)
        except TimeoutError:
            raise TransportTimeout(
                "ble://", f"scan did not finish within {timeout + 10.0:g} s"
            ) from None
        except Exception as exc:
            raise TransportOpenError(
                "ble://", f"cannot scan for BLE devices: {_describe(exc)}"
            ) from exc
        finally:
            await _leave_loop()
        results = [
            (dev.address, adv.local_name or dev.name, int(adv.rssi)) for dev, adv in found.values()
        ]
        return sorted(results, key=lambda r: -r[2])

    # ---------------------------------------------------------- open/close
    async def _open(self) -> None:
        if not self._counted:
            _enter_loop()
            self._counted = True
        await self._drop_dead_clients()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        try:
            client = await self._connect()
        except (TransportOpenError, asyncio.CancelledError):
            raise
        except TimeoutError:
            raise TransportOpenError(
                self.url, f"connecting timed out after {self.timeout:g} s"
            ) from None
        except Exception as exc:
            raise TransportOpenError(
                self.url, f"cannot connect to {self.target}: {_describe(exc)}"
            ) from exc
        self._client = client
        self._lost_pending = False
        self._lost_event.clear()
        try:
            for uuid, queue in self._subs.items():
                async with asyncio.timeout(self.timeout):
                    await client.start_notify(uuid, self._callback_for(queue))
        except Exception as exc:
            self._client = None
            self._dead.append(client)
            await self._drop_dead_clients()
            raise TransportOpenError(
                self.url, f"connected, but re-subscribing failed: {_describe(exc)}"
            ) from exc

    async def _connect(self) -> BleakClient:
        for attempt in (1, 2):
            device = self._device or await self._find()
            client = BleakClient(
                device,
                disconnected_callback=self._on_bleak_disconnect,
                timeout=self.timeout,
                **self._bluez_kwargs(),
            )
            try:
                async with asyncio.timeout(self.timeout):
                    await client.connect()
            except BleakDeviceNotFoundError:
                await self._discard(client)
                if self._device is None or attempt == 2:
                    raise
                self._device = None  # BlueZ forgot it: scan again
                continue
            except BaseException:
                await self._discard(client)
                raise
            self._device = device
            return client
        raise AssertionError("unreachable")

    async def _find(self) -> BLEDevice:
        kwargs = self._bluez_kwargs()
        async with _scan_lock(), asyncio.timeout(self.scan_timeout + 10.0):
            connected = await self._already_connected()
            if connected is not None:
                return connected
            if self.address is not None:
                device = await BleakScanner.find_device_by_address(
                    self.address, timeout=self.scan_timeout, **kwargs
                )
            else:
                assert self.device_name is not None
                device = await BleakScanner.find_device_by_name(
                    self.device_name, timeout=self.scan_timeout, **kwargs
                )
        if device is None:
            raise TransportOpenError(
                self.url,
                f"device not found: no advertisement from {self.target} within a {self.scan_timeout:g} s scan",
            )
        return device

    async def _already_connected(self) -> BLEDevice | None:
        """The device if the OS already holds a connection to it, else None.

        A process that died without disconnecting (kill -9, a crash) leaves BlueZ
        connected to the device, which then no longer advertises: a scan cannot find it
        (bleak issue #367, BlueZ issue #89). BlueZ lists the services of a connected
        device in its UUIDs, Generic Access/Attribute (0x1800/0x1801) among them.
        """
        try:
            adapter = await BleakAdapter.get(**self._bluez_kwargs())
            devices = await adapter.get_connected_devices(["1800", "1801"])
        except (BleakError, NotImplementedError, ValueError) as exc:
            log.debug("%s: cannot list connected devices: %s", self.url, exc)
            return None
        for device in devices:
            if (self.address is not None and device.address.upper() == self.address) or (
                self.address is None and device.name == self.device_name
            ):
                log.info(
                    "%s: reusing the connection BlueZ still holds to %s", self.url, device.address
                )
                return device
        return None

    def _bluez_kwargs(self) -> dict[str, Any]:
        return {"bluez": {"adapter": self.adapter}} if self.adapter else {}

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._dead.append(client)
        await self._release()

    async def _release(self) -> None:
        self._subs.clear()
        self._lost_pending = False
        await self._drop_dead_clients()
        if self._counted:
            self._counted = False
            await _leave_loop()

    async def _discard(self, client: BleakClient) -> None:
        """Release a client that failed to connect (bleak keeps its own bus otherwise)."""
        try:
            async with asyncio.timeout(self.timeout):
                await client.disconnect()
        except Exception as exc:
            log.debug("%s: releasing a failed client: %r", self.url, exc)

    async def _drop_dead_clients(self) -> None:
        while self._dead:
            await self._discard(self._dead.pop())

    # ----------------------------------------------------------- link loss
    def _on_bleak_disconnect(self, client: BleakClient) -> None:
        """bleak's disconnected callback: only bookkeeping, never user code."""
        loop = self._loop
        if (
            loop is not None
            and self._loop_thread is not None
            and threading.get_ident() != self._loop_thread
        ):
            loop.call_soon_threadsafe(self._mark_lost, client, False)
            return
        self._mark_lost(client, False)

    def _mark_lost(self, client: BleakClient, reported: bool) -> None:
        if client is self._client:
            log.warning("%s: link lost", self.url)
            self._client = None
            self._dead.append(client)
            self._is_open = False
            self._lost_pending = not reported
            self._lost_event.set()
            loop = self._loop or asyncio.get_running_loop()
            for callback in list(self._disconnect_callbacks):
                loop.call_soon(callback)
        elif reported:
            self._lost_pending = False  # the callback got there first; this report is the one

    def _take_loss(self, what: str) -> LinkLostError:
        self._lost_pending = False
        return LinkLostError(
            self.url, f"{what}: the peripheral disconnected; the next operation reconnects"
        )

    async def _ready(self, what: str) -> BleakClient:
        if self._lost_pending:
            raise self._take_loss(what)
        await self.ensure_open()
        client = self._client
        if client is None:  # lost again while opening
            self._is_open = False
            raise self._take_loss(what)
        return client

    def _is_link_error(self, client: BleakClient, exc: BaseException) -> bool:
        if client is not self._client or not client.is_connected:
            return True
        if isinstance(exc, BleakDBusError):
            if exc.dbus_error in _LINK_ERRORS:
                return True
            return (
                exc.dbus_error == "org.bluez.Error.Failed" and "not connected" in str(exc).lower()
            )
        return "not connected" in str(exc).lower()

    # --------------------------------------------------------------- GATT
    async def _gatt(
        self, what: str, op: Callable[[BleakClient], Awaitable[T]], timeout: float | None
    ) -> T:
        client = await self._ready(what)
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await op(client)
        except TimeoutError:
            raise TransportTimeout(self.url, f"{what}: no answer within {limit:g} s") from None
        except BleakCharacteristicNotFoundError as exc:
            raise TransportError(
                self.url, f"{what}: the device has no such characteristic"
            ) from exc
        except BleakGATTProtocolError as exc:
            code = int(exc.code)
            meaning = PROTOCOL_ERROR_CODES.get(
                code, "application error" if 0x80 <= code <= 0x9F else "unknown"
            )
            raise DeviceRejected(self.url, what, f"ATT 0x{code:02X}", meaning) from exc
        except (BleakError, EOFError, OSError) as exc:
            if self._is_link_error(client, exc):
                self._mark_lost(client, True)
                raise LinkLostError(self.url, f"{what}: link lost ({_describe(exc)})") from exc
            raise TransportError(self.url, f"{what} failed: {_describe(exc)}") from exc

    async def read(self, uuid: str, *, timeout: float | None = None) -> bytes:
        """Read a characteristic's value (a GATT Read Request)."""
        key = normalize_uuid(uuid)

        async def op(client: BleakClient) -> bytes:
            return bytes(await client.read_gatt_char(key))

        return await self._gatt(f"read {key}", op, timeout)

    async def write(
        self, uuid: str, data: bytes, response: bool = True, *, timeout: float | None = None
    ) -> None:
        """Write a characteristic: a Write Request (``response=True``, errors come back) or a Command."""
        key = normalize_uuid(uuid)
        payload = bytes(data)

        async def op(client: BleakClient) -> None:
            await client.write_gatt_char(key, payload, response=response)

        await self._gatt(f"write {key} {payload.hex()}", op, timeout)

    async def subscribe(self, uuid: str, *, maxsize: int = 256) -> asyncio.Queue[bytes]:
        """Enable notifications; every notification's bytes go onto the returned queue.

        Idempotent (the same queue is returned). When the queue is full the
        oldest notification is dropped (counted in ``dropped_notifications``).
        The subscription survives a reconnect.
        """
        key = normalize_uuid(uuid)
        existing = self._subs.get(key)
        if existing is not None:
            return existing
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize)

        async def op(client: BleakClient) -> None:
            await client.start_notify(key, self._callback_for(queue))

        await self._gatt(f"subscribe {key}", op, None)
        self._subs[key] = queue
        return queue

    async def unsubscribe(self, uuid: str, *, timeout: float | None = None) -> None:
        """Disable notifications (idempotent; does not reconnect a dropped link for it)."""
        key = normalize_uuid(uuid)
        if self._subs.pop(key, None) is None:
            return
        client = self._client
        if client is None or not client.is_connected:
            return
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                await client.stop_notify(key)
        except TimeoutError:
            raise TransportTimeout(
                self.url, f"unsubscribe {key}: no answer within {limit:g} s"
            ) from None
        except (BleakError, EOFError, OSError) as exc:
            if self._is_link_error(client, exc):
                return  # no link, no notifications: done
            raise TransportError(self.url, f"unsubscribe {key} failed: {_describe(exc)}") from exc

    async def next_notification(
        self, uuid: str, timeout: float | None = None, *, until: asyncio.Event | None = None
    ) -> bytes | None:
        """The next notification of a subscribed characteristic.

        Raises :class:`TransportTimeout` after ``timeout`` (default: the URL's),
        :class:`LinkLostError` if the link drops while waiting. Returns None if
        ``until`` is set first (a way to stop a waiting consumer).
        """
        key = normalize_uuid(uuid)
        queue = self._subs.get(key)
        if queue is None:
            raise TransportError(self.url, f"not subscribed to {key}")
        if not queue.empty():
            return queue.get_nowait()
        await self._ready(f"wait for notification on {key}")
        limit = self.timeout if timeout is None else timeout
        get = asyncio.ensure_future(queue.get())
        lost = asyncio.ensure_future(self._lost_event.wait())
        waits: set[asyncio.Future[Any]] = {get, lost}
        stop = asyncio.ensure_future(until.wait()) if until is not None else None
        if stop is not None:
            waits.add(stop)
        try:
            await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                if not w.done():
                    w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if get.done() and not get.cancelled():
            data: bytes = get.result()
            return data
        if lost.done() and not lost.cancelled():
            raise self._take_loss(f"wait for notification on {key}")
        if stop is not None and stop.done() and not stop.cancelled():
            return None
        raise TransportTimeout(self.url, f"no notification on {key} within {limit:g} s")

    def _callback_for(
        self, queue: asyncio.Queue[bytes]
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def callback(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            payload = bytes(data)
            loop = self._loop
            if (
                loop is not None
                and self._loop_thread is not None
                and threading.get_ident() != self._loop_thread
            ):
                loop.call_soon_threadsafe(self._put, queue, payload)
            else:
                self._put(queue, payload)

        return callback

    def _put(self, queue: asyncio.Queue[bytes], payload: bytes) -> None:
        if queue.full():
            queue.get_nowait()
            self.dropped_notifications += 1
        queue.put_nowait(payload)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, OSError) and sys.platform.startswith("linux"):
        out += (
            " (BlueZ is not reachable on the D-Bus system bus: is bluetoothd running, or is"
            " DBUS_SYSTEM_BUS_ADDRESS meant to point at a simulator's bus?)"
        )
    return out


__all__ = ["BleTransport", "ScanResult", "normalize_uuid"]
