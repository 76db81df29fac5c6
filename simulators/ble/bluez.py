"""A small BlueZ stand-in on a private D-Bus: bleak's real BlueZ backend runs against it.

What is simulated, and why
--------------------------
A Linux BLE central is three layers: the **radio + controller** (an HCI
device, ``hci0``), the kernel's Bluetooth stack (``AF_BLUETOOTH`` sockets),
and **bluetoothd** (BlueZ), which drives them and publishes everything on the
*system D-Bus* as ``org.bluez`` objects. bleak's Linux backend only ever talks
to that D-Bus API. The machines this project tests on have no Bluetooth at all
(no ``AF_BLUETOOTH``, no ``/dev/vhci`` for a virtual controller), so the
radio, the controller and bluetoothd are replaced here, together, by one
process-local object: :class:`BlueZStandIn`. It

* starts a private ``dbus-daemon`` (unix socket in a temp dir, a policy that
  allows everything) -- point ``DBUS_SYSTEM_BUS_ADDRESS`` at
  :attr:`BlueZStandIn.address` (or use :meth:`BlueZStandIn.environ`) *before*
  bleak first connects in an event loop;
* claims ``org.bluez`` on it and serves, at the D-Bus level, what bluetoothd
  serves and what bleak uses: ``org.freedesktop.DBus.ObjectManager`` at ``/``
  (``GetManagedObjects``, ``InterfacesAdded``/``InterfacesRemoved`` sent from
  ``/``), ``org.freedesktop.DBus.Properties`` (``Get``/``GetAll``/``Set``,
  ``PropertiesChanged``), the adapter ``/org/bluez/hci0``
  (``org.bluez.Adapter1``), devices ``/org/bluez/hci0/dev_AA_BB_...``
  (``org.bluez.Device1``) and their GATT database
  (``org.bluez.GattService1``/``GattCharacteristic1``/``GattDescriptor1``);
* plays the radio: peripherals (:class:`Peripheral`, plain data with handler
  callbacks) "advertise" while a discovery session runs, a ``Connect`` makes a
  link, GATT reads/writes call the peripheral's handlers, a peripheral's
  notification arrives as ``PropertiesChanged`` on ``Value``, and a link can
  drop from the peripheral side (:meth:`BlueZStandIn.disconnect_peripheral`).

What stays real: bleak, its BlueZ backend (manager, scanner, client, its
signal parsing and state machine), dbus-fast on both ends, the D-Bus wire
protocol and a real ``dbus-daemon`` routing the messages.

BlueZ behaviours reproduced because clients depend on them (bluez 5.6x-5.8x):

* devices appear (``InterfacesAdded``) when first seen during discovery; a
  known device is only reported again through ``PropertiesChanged`` on
  ``RSSI``, which is invalidated when discovery stops (so the next scan sees
  it again) -- bleak's scanner relies on exactly this;
* ``Connect`` sets ``Connected``, then the GATT objects are exported and
  ``ServicesResolved`` becomes true; they are kept after a disconnect (BlueZ's
  default ``Cache = always``);
* a GATT ``ReadValue`` updates the characteristic's ``Value`` and emits
  ``PropertiesChanged`` for it, so a client subscribed with ``StartNotify``
  sees every read a second time, as a notification (a real BlueZ quirk);
* an ATT error response from the peripheral (:class:`AttError`) becomes the
  D-Bus error BlueZ's ``create_gatt_dbus_error()`` makes of it (e.g. 0x0D ->
  ``org.bluez.Error.InvalidArguments "Invalid Length"``, 0x80 ->
  ``org.bluez.Error.Failed "Operation failed with ATT error: 0x80"``);
* notify sessions and discovery sessions belong to the D-Bus client that
  opened them and end when that client leaves the bus;
* link loss: ``Notifying`` false, ``ServicesResolved`` false, ``Connected``
  false, in that order.

Not implemented (bleak does not need them by default): ``AcquireNotify`` /
``AcquireWrite`` (no ``NotifyAcquired`` property is published, so bleak uses
``StartNotify``), passive scanning (``AdvertisementMonitorManager1``), pairing
agents, BR/EDR, and introspection data for the ``org.bluez`` objects.

Where no ``dbus-daemon`` exists (macOS, Windows) :meth:`BlueZStandIn.start`
raises :class:`BleSimulatorUnavailable`: this simulator needs ``dbus-daemon``
(Linux), and bleak's CoreBluetooth/WinRT backends cannot be pointed at it.

Threading: the stand-in runs on the event loop that awaited :meth:`start`.
Its public mutators (:meth:`notify`, :meth:`disconnect_peripheral`,
:meth:`set_in_range`) may be called from other threads; they are then
scheduled onto that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulators._proc import bound_to_parent

try:  # dbus-fast is bleak's dependency on Linux only (see pyproject markers)
    from dbus_fast import BusType, Message, MessageType, NameFlag, RequestNameReply, Variant
    from dbus_fast.aio import MessageBus
    from dbus_fast.errors import DBusError
except ImportError:  # pragma: no cover - not Linux
    MessageBus = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

BLUEZ = "org.bluez"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
ADAPTER = "org.bluez.Adapter1"
DEVICE = "org.bluez.Device1"
GATT_SERVICE = "org.bluez.GattService1"
GATT_CHARACTERISTIC = "org.bluez.GattCharacteristic1"
GATT_DESCRIPTOR = "org.bluez.GattDescriptor1"
CCCD_UUID = "00002902-0000-1000-8000-00805f9b34fb"
BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"

# ATT error codes (Core spec Vol 3 Part F 3.4.1.1) a peripheral handler may raise.
ATT_READ_NOT_PERMITTED = 0x02
ATT_WRITE_NOT_PERMITTED = 0x03
ATT_REQUEST_NOT_SUPPORTED = 0x06
ATT_INVALID_OFFSET = 0x07
ATT_INSUFFICIENT_AUTHORIZATION = 0x08
ATT_INVALID_ATTRIBUTE_VALUE_LENGTH = 0x0D
ATT_UNLIKELY_ERROR = 0x0E
ATT_VALUE_NOT_ALLOWED = 0x13
ATT_APPLICATION_ERROR = 0x80  # 0x80-0x9F: defined by the application

# D-Bus signature of every property the stand-in publishes, per interface.
_SIGNATURES: dict[str, dict[str, str]] = {
    ADAPTER: {
        "Address": "s",
        "AddressType": "s",
        "Name": "s",
        "Alias": "s",
        "Class": "u",
        "Powered": "b",
        "PowerState": "s",
        "Discoverable": "b",
        "DiscoverableTimeout": "u",
        "Pairable": "b",
        "PairableTimeout": "u",
        "Discovering": "b",
        "UUIDs": "as",
        "Modalias": "s",
        "Roles": "as",
        "ExperimentalFeatures": "as",
    },
    DEVICE: {
        "Address": "s",
        "AddressType": "s",
        "Name": "s",
        "Alias": "s",
        "Appearance": "q",
        "Paired": "b",
        "Bonded": "b",
        "Trusted": "b",
        "Blocked": "b",
        "LegacyPairing": "b",
        "Connected": "b",
        "ServicesResolved": "b",
        "UUIDs": "as",
        "Adapter": "o",
        "RSSI": "n",
        "TxPower": "n",
        "ManufacturerData": "a{qv}",
        "ServiceData": "a{sv}",
        "AdvertisingFlags": "ay",
        "AdvertisingData": "a{yv}",
        "WakeAllowed": "b",
    },
    GATT_SERVICE: {"UUID": "s", "Device": "o", "Primary": "b", "Includes": "ao"},
    GATT_CHARACTERISTIC: {
        "UUID": "s",
        "Service": "o",
        "Value": "ay",
        "Notifying": "b",
        "Flags": "as",
        "MTU": "q",
    },
    GATT_DESCRIPTOR: {"UUID": "s", "Characteristic": "o", "Value": "ay", "Flags": "as"},
}
_WRITABLE: dict[str, set[str]] = {
    ADAPTER: {
        "Powered",
        "Alias",
        "Discoverable",
        "Pairable",
        "DiscoverableTimeout",
        "PairableTimeout",
    },
    DEVICE: {"Trusted", "Blocked", "Alias", "WakeAllowed"},
}
_DISCOVERY_FILTER_KEYS = {
    "UUIDs": "as",
    "RSSI": "n",
    "Pathloss": "q",
    "Transport": "s",
    "DuplicateData": "b",
    "Discoverable": "b",
    "Pattern": "s",
}


class BleSimulatorUnavailable(RuntimeError):
    """The BLE simulator cannot run here (no ``dbus-daemon``: it needs Linux)."""


class AttError(Exception):
    """Raised by a peripheral's read/write handler: an ATT Error Response with ``code``.

    The stand-in turns it into the D-Bus error bluetoothd would send (see the
    module docstring).
    """

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"ATT error 0x{code:02X}" + (f": {detail}" if detail else ""))
        self.code = code
        self.detail = detail


def full_uuid(uuid: str) -> str:
    """``"2a19"``/``"0x2A19"``/``"00002a19"`` -> the 128-bit, lower-case form BlueZ publishes."""
    u = uuid.lower().removeprefix("0x")
    if len(u) == 4:
        u = f"0000{u}"
    if len(u) == 8:
        u = f"{u}{BASE_UUID_SUFFIX}"
    return u


ReadHandler = Callable[[], "bytes | Awaitable[bytes]"]
WriteHandler = Callable[[bytes, bool], "None | Awaitable[None]"]


@dataclass
class Characteristic:
    """One GATT characteristic of a simulated peripheral.

    ``flags`` use BlueZ's names (``read``, ``write``, ``write-without-response``,
    ``notify``, ``indicate``). ``read()`` returns the value (or raises
    :class:`AttError`); without it a read returns ``value``. ``write(data,
    with_response)`` receives writes (raise :class:`AttError` to reject one;
    the error only reaches the central for a write *with* response). Handlers
    may be coroutines. Notify/indicate characteristics get a CCCD (0x2902).
    """

    uuid: str
    flags: Sequence[str] = ("read",)
    read: ReadHandler | None = None
    write: WriteHandler | None = None
    value: bytes = b""

    def __post_init__(self) -> None:
        self.uuid = full_uuid(self.uuid)


@dataclass
class Service:
    """A primary GATT service and its characteristics."""

    uuid: str
    characteristics: Sequence[Characteristic] = ()
    primary: bool = True

    def __post_init__(self) -> None:
        self.uuid = full_uuid(self.uuid)


@dataclass
class Peripheral:
    """A simulated BLE peripheral, described by data.

    Advertising data: ``name`` (local name), ``advertised_uuids``,
    ``manufacturer_data`` (company id -> bytes), ``service_data`` (uuid ->
    bytes), ``tx_power`` (dBm) and ``rssi`` (dBm as the adapter hears it, with
    +-2 dB jitter). The hooks run on the stand-in's loop:
    ``on_connect()``, ``on_disconnect(reason)`` (``"local"`` = the central
    disconnected, ``"remote"`` = the peripheral dropped the link),
    ``on_subscribe(char_uuid, enabled)`` (CCCD written).
    """

    address: str
    name: str | None = None
    services: Sequence[Service] = ()
    advertised_uuids: Sequence[str] = ()
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    service_data: dict[str, bytes] = field(default_factory=dict)
    tx_power: int | None = None
    rssi: int = -55
    address_type: str = "public"
    in_range: bool = True
    on_connect: Callable[[], None] | None = None
    on_disconnect: Callable[[str], None] | None = None
    on_subscribe: Callable[[str, bool], None] | None = None

    def __post_init__(self) -> None:
        self.address = self.address.upper()
        self.advertised_uuids = [full_uuid(u) for u in self.advertised_uuids]
        self.service_data = {full_uuid(k): v for k, v in self.service_data.items()}


@dataclass
class _CharState:
    path: str
    char: Characteristic
    service_path: str
    cccd_path: str | None
    sessions: set[str] = field(default_factory=set)  # D-Bus senders with StartNotify


@dataclass
class _DeviceState:
    peripheral: Peripheral
    path: str
    exported: bool = False
    gatt_exported: bool = False
    connected: bool = False
    chars: dict[str, _CharState] = field(default_factory=dict)  # by object path
    gatt_paths: list[tuple[str, str]] = field(
        default_factory=list
    )  # (path, interface) in export order


def _variant(signature: str, value: Any) -> Variant:
    if signature in ("a{qv}", "a{sv}", "a{yv}"):
        value = {k: Variant("ay", bytes(v)) for k, v in value.items()}
    return Variant(signature, value)


def _dbus_error(name: str, text: str) -> DBusError:
    return DBusError(name, text)


def _att_to_dbus(code: int) -> DBusError:
    """What bluetoothd's ``create_gatt_dbus_error()`` makes of an ATT error code."""
    if code == ATT_READ_NOT_PERMITTED:
        return _dbus_error("org.bluez.Error.NotPermitted", "Read not permitted")
    if code == ATT_WRITE_NOT_PERMITTED:
        return _dbus_error("org.bluez.Error.NotPermitted", "Write not permitted")
    if code in (0x05, 0x0C, 0x0F):
        return _dbus_error("org.bluez.Error.NotPermitted", "Not paired")
    if code == ATT_INVALID_OFFSET:
        return _dbus_error("org.bluez.Error.InvalidArguments", "Invalid offset")
    if code == ATT_INVALID_ATTRIBUTE_VALUE_LENGTH:
        return _dbus_error("org.bluez.Error.InvalidArguments", "Invalid Length")
    if code == ATT_INSUFFICIENT_AUTHORIZATION:
        return _dbus_error("org.bluez.Error.NotAuthorized", "Operation Not Authorized")
    if code == ATT_REQUEST_NOT_SUPPORTED:
        return _dbus_error("org.bluez.Error.NotSupported", "Operation is not supported")
    if code == 0:
        return _dbus_error("org.bluez.Error.Failed", "Operation failed")
    return _dbus_error("org.bluez.Error.Failed", f"Operation failed with ATT error: 0x{code:02x}")


_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Private bus of the labbridge BLE simulator: stands in for the system bus
     (clients find it through DBUS_SYSTEM_BUS_ADDRESS). Everything is allowed. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


def _kill_daemon(proc: subprocess.Popen[bytes], tmpdir: str) -> None:
    """Last-resort cleanup (garbage collection / interpreter exit) of a daemon never stopped."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=2)
    if proc.stdout is not None:
        proc.stdout.close()
    shutil.rmtree(tmpdir, ignore_errors=True)


class PrivateBus:
    """A private ``dbus-daemon`` on a unix socket in a temp dir (everything allowed)."""

    def __init__(self, dbus_daemon: str | None = None) -> None:
        self._binary = dbus_daemon
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._finalizer: weakref.finalize | None = None
        self.address: str | None = None
        self.binary = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def start(self, startup_timeout: float = 5.0) -> str:
        """Launch the daemon (off the event loop) and wait for it to print its address."""
        await asyncio.to_thread(self._launch)
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + startup_timeout
        while b"\n" not in buf:
            chunk = None
            with contextlib.suppress(BlockingIOError):
                chunk = os.read(proc.stdout.fileno(), 4096)  # non-blocking pipe
            if chunk:
                buf += chunk
                continue
            if chunk == b"" or proc.poll() is not None or time.monotonic() > deadline:
                detail = self._log_tail()
                await self.astop()
                raise BleSimulatorUnavailable(
                    f"dbus-daemon ({self.binary}) did not start: {detail or 'no output'}"
                )
            await asyncio.sleep(0.002)
        self.address = buf.split(b"\n", 1)[0].decode().strip()
        return self.address

    def _launch(self) -> None:
        binary = self.binary = self._binary or shutil.which("dbus-daemon") or ""
        if not binary or not os.path.exists(binary):
            raise BleSimulatorUnavailable(
                "the BLE simulator needs dbus-daemon (Linux): bleak's BlueZ backend is driven "
                "through a private D-Bus that stands in for the system bus"
                + (f"; {binary!r} does not exist" if binary else "; no dbus-daemon on PATH")
                + ". On Debian/Ubuntu: apt-get install dbus-daemon. macOS and Windows cannot run "
                "this simulator (bleak uses CoreBluetooth/WinRT there)."
            )
        self._tmpdir = tempfile.mkdtemp(prefix="lb-ble-")
        sock = os.path.join(self._tmpdir, "system_bus_socket")
        config = os.path.join(self._tmpdir, "bus.conf")
        with open(config, "w", encoding="utf-8") as fh:
            fh.write(_CONFIG.format(socket=sock))
        with open(os.path.join(self._tmpdir, "daemon.log"), "wb") as errlog:
            self._proc = subprocess.Popen(
                bound_to_parent(
                    [
                        binary,
                        f"--config-file={config}",
                        "--nofork",
                        "--nopidfile",
                        "--print-address=1",
                    ]
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errlog,
                close_fds=True,
                start_new_session=True,  # never attached to the caller's terminal/job
            )
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._finalizer = weakref.finalize(self, _kill_daemon, self._proc, self._tmpdir)

    def _log_tail(self) -> str:
        if self._tmpdir is None:
            return ""
        try:
            with open(os.path.join(self._tmpdir, "daemon.log"), "rb") as fh:
                return fh.read()[-500:].decode(errors="replace").strip()
        except OSError:
            return ""

    async def astop(self, timeout: float = 3.0) -> None:
        """Terminate the daemon and wait for it without blocking the loop; then :meth:`stop`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, timeout)
        self.stop(timeout)

    def stop(self, timeout: float = 3.0) -> None:
        """Terminate (kill if needed) and reap the daemon, close its pipe, delete its dir. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self.address = None


class BlueZStandIn:
    """bluetoothd + controller + radio, served as ``org.bluez`` on a private D-Bus.

    Usage::

        bluez = BlueZStandIn()
        await bluez.start()
        bluez.add_peripheral(Peripheral("AA:BB:CC:DD:EE:02", "Thermo", services=[...]))
        with bluez.environ():          # DBUS_SYSTEM_BUS_ADDRESS -> the private bus
            ...                         # bleak code here (same or another event loop)
        await bluez.stop()

    ``adv_interval`` is the real-time period of simulated advertisements while
    a discovery session runs (a real device advertises every 20 ms - 10 s).
    """

    def __init__(
        self,
        *,
        adapter: str = "hci0",
        adapter_address: str = "00:1A:7D:DA:71:13",
        adv_interval: float = 0.05,
        connect_delay: float = 0.002,
        seed: int = 0,
        dbus_daemon: str | None = None,
    ) -> None:
        self.adapter_path = f"/org/bluez/{adapter}"
        self.adapter_address = adapter_address.upper()
        self.adv_interval = adv_interval
        self.connect_delay = connect_delay
        self._rng = random.Random(seed)
        self._daemon = PrivateBus(dbus_daemon)
        self._bus: MessageBus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id: int | None = None
        self._objects: dict[str, dict[str, dict[str, Any]]] = {}
        self._devices: dict[str, _DeviceState] = {}  # by address
        self._discovery: dict[str, dict[str, Any]] = {}  # sender -> filter
        self._adv_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False

    # ------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        """The private bus address (what ``DBUS_SYSTEM_BUS_ADDRESS`` must be)."""
        if self._daemon.address is None:
            raise RuntimeError("BlueZStandIn is not started")
        return self._daemon.address

    @property
    def daemon_pid(self) -> int | None:
        return self._daemon.pid

    @property
    def running(self) -> bool:
        return self._started

    @contextlib.contextmanager
    def environ(self) -> Iterator[str]:
        """Set ``DBUS_SYSTEM_BUS_ADDRESS`` to the private bus for the block; restore it after."""
        old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        try:
            yield self.address
        finally:
            if old is None:
                os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old

    async def start(self) -> None:
        """Start the private dbus-daemon, claim ``org.bluez``, publish the adapter."""
        if self._started:
            return
        if MessageBus is None:  # pragma: no cover - not Linux
            raise BleSimulatorUnavailable(
                "the BLE simulator needs dbus-daemon (Linux) and dbus-fast; neither is available here"
            )
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        address = await self._daemon.start()
        try:
            bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
            self._bus = bus
            await bus.connect()
            bus.add_message_handler(self._on_message)
            await self._call_daemon(
                "AddMatch",
                "s",
                [
                    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'"
                ],
            )
            reply = await bus.request_name(BLUEZ, NameFlag.DO_NOT_QUEUE)
            if reply != RequestNameReply.PRIMARY_OWNER:
                raise BleSimulatorUnavailable(
                    f"could not own {BLUEZ} on the private bus: {reply!r}"
                )
        except BaseException:
            await self._close_bus()
            await self._daemon.astop()
            raise
        self._add_object(
            self.adapter_path,
            ADAPTER,
            {
                "Address": self.adapter_address,
                "AddressType": "public",
                "Name": "labbridge-sim",
                "Alias": "labbridge-sim",
                "Class": 0,
                "Powered": True,
                "PowerState": "on",
                "Discoverable": False,
                "DiscoverableTimeout": 180,
                "Pairable": False,
                "PairableTimeout": 0,
                "Discovering": False,
                "UUIDs": [],
                "Modalias": "usb:v1D6Bp0246d0548",
                "Roles": ["central", "peripheral"],
                "ExperimentalFeatures": [],
            },
        )
        self._started = True
        log.debug("BlueZ stand-in on %s (dbus-daemon pid %s)", address, self._daemon.pid)

    async def stop(self) -> None:
        """Drop every link, stop the tasks, close the bus connection and the daemon (idempotent)."""
        if self._bus is None and not self._daemon.running:
            self._started = False
            return
        self._started = False
        for dev in list(self._devices.values()):
            if dev.connected:
                self._link_down(dev, "local")
        tasks = [t for t in (self._adv_task, *self._tasks) if t is not None]
        self._adv_task = None
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self._close_bus()
        await self._daemon.astop()
        self._objects.clear()
        self._devices.clear()
        self._discovery.clear()

    async def _close_bus(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        bus.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.wait_for_disconnect(), 2.0)

    async def __aenter__(self) -> BlueZStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------- peripherals
    def add_peripheral(self, peripheral: Peripheral) -> None:
        """Put a peripheral in radio range (it advertises during discovery)."""
        if peripheral.address in self._devices:
            raise ValueError(f"a peripheral with address {peripheral.address} already exists")
        path = f"{self.adapter_path}/dev_{peripheral.address.replace(':', '_')}"
        self._devices[peripheral.address] = _DeviceState(peripheral, path)

    def remove_peripheral(self, address: str) -> None:
        """Take a peripheral away (drops its link, removes its BlueZ objects)."""
        dev = self._devices.pop(address.upper(), None)
        if dev is not None:
            self._forget(dev)

    def device_path(self, address: str) -> str:
        return self._device(address).path

    def is_connected(self, address: str) -> bool:
        return self._device(address).connected

    def is_notifying(self, address: str, char_uuid: str) -> bool:
        dev = self._device(address)
        uuid = full_uuid(char_uuid)
        return dev.connected and any(
            cs.sessions for cs in dev.chars.values() if cs.char.uuid == uuid
        )

    def notify(self, address: str, char_uuid: str, value: bytes) -> bool:
        """The peripheral sends a notification; returns whether it reached a subscribed central.

        Thread-safe (scheduled onto the stand-in's loop when called elsewhere;
        then returns whether it was *scheduled*).
        """
        if not self._on_loop():
            return self._threadsafe(self.notify, address, char_uuid, value)
        dev = self._devices.get(address.upper())
        if dev is None or not dev.connected or self._bus is None:
            return False
        uuid = full_uuid(char_uuid)
        sent = False
        for cs in dev.chars.values():
            if cs.char.uuid == uuid and cs.sessions:
                self._set_props(cs.path, GATT_CHARACTERISTIC, {"Value": bytes(value)}, force=True)
                sent = True
        return sent

    def disconnect_peripheral(self, address: str, reason: str = "remote") -> bool:
        """The link drops from the peripheral's side (link loss, supervision timeout). Thread-safe."""
        if not self._on_loop():
            return self._threadsafe(self.disconnect_peripheral, address, reason)
        dev = self._devices.get(address.upper())
        if dev is None or not dev.connected:
            return False
        self._link_down(dev, reason)
        return True

    def set_in_range(self, address: str, in_range: bool) -> bool:
        """Move a peripheral in or out of radio range (out of range drops its link). Thread-safe."""
        if not self._on_loop():
            return self._threadsafe(self.set_in_range, address, in_range)
        dev = self._devices.get(address.upper())
        if dev is None:
            return False
        dev.peripheral.in_range = in_range
        if not in_range and dev.connected:
            self._link_down(dev, "remote")
        return True

    # -------------------------------------------------------------- helpers
    def _on_loop(self) -> bool:
        return self._thread_id is None or threading.get_ident() == self._thread_id

    def _threadsafe(self, fn: Callable[..., Any], *args: Any) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed() or not self._started:
            return False
        loop.call_soon_threadsafe(fn, *args)
        return True

    def _device(self, address: str) -> _DeviceState:
        try:
            return self._devices[address.upper()]
        except KeyError:
            raise KeyError(f"no simulated peripheral {address}") from None

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, msg: Message) -> None:
        if self._bus is None or not self._bus.connected:
            return
        fut = self._bus.send(msg)
        fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())

    def _send_error(self, error: DBusError, msg: Message) -> None:
        self._send(Message.new_error(msg, error.type, error.text))

    async def _call_daemon(self, member: str, signature: str, body: list[Any]) -> Message:
        assert self._bus is not None
        reply = await self._bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature=signature,
                body=body,
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise BleSimulatorUnavailable(
                f"dbus-daemon refused {member}: {reply.error_name} {reply.body}"
            )
        return reply

    def _props_variants(self, interface: str, props: dict[str, Any]) -> dict[str, Variant]:
        sigs = _SIGNATURES[interface]
        return {name: _variant(sigs[name], value) for name, value in props.items()}

    def _add_object(self, path: str, interface: str, props: dict[str, Any]) -> None:
        self._objects.setdefault(path, {})[interface] = dict(props)
        self._send(
            Message.new_signal(
                "/",
                OBJECT_MANAGER,
                "InterfacesAdded",
                "oa{sa{sv}}",
                [path, {interface: self._props_variants(interface, props)}],
            )
        )

    def _remove_object(self, path: str, interfaces: list[str]) -> None:
        obj = self._objects.get(path)
        if obj is None:
            return
        for iface in interfaces:
            obj.pop(iface, None)
        if not obj:
            del self._objects[path]
        self._send(
            Message.new_signal("/", OBJECT_MANAGER, "InterfacesRemoved", "oas", [path, interfaces])
        )

    def _set_props(
        self,
        path: str,
        interface: str,
        changes: dict[str, Any],
        *,
        invalidate: Sequence[str] = (),
        force: bool = False,
    ) -> None:
        """Update properties and emit ``PropertiesChanged`` for what changed (all with ``force``)."""
        props = self._objects.get(path, {}).get(interface)
        if props is None:
            return
        changed = {k: v for k, v in changes.items() if force or props.get(k, _MISSING) != v}
        gone = [k for k in invalidate if k in props]
        props.update(changed)
        for k in gone:
            del props[k]
        if changed or gone:
            self._send(
                Message.new_signal(
                    path,
                    PROPERTIES,
                    "PropertiesChanged",
                    "sa{sv}as",
                    [interface, self._props_variants(interface, changed), gone],
                )
            )

    # -------------------------------------------------------------- D-Bus in
    def _on_message(self, msg: Message) -> Message | bool | None:
        if msg.message_type is MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
                name, _old, new = msg.body
                if not new and name.startswith(":"):
                    self._client_left(name)
            return None
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        if msg.interface in ("org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer"):
            return None  # dbus-fast's defaults answer these
        return self._dispatch(msg)

    def _dispatch(self, msg: Message) -> Message | bool:
        path, iface, member, sig = msg.path, msg.interface, msg.member, msg.signature
        if path == "/" and iface in (OBJECT_MANAGER, None) and member == "GetManagedObjects":
            return self._get_managed_objects(msg)
        obj = self._objects.get(path or "")
        if obj is None:
            raise _dbus_error(
                "org.freedesktop.DBus.Error.UnknownObject",
                f'Method "{member}" with signature "{sig}" on interface "{iface}" doesn\'t exist',
            )
        if iface == PROPERTIES:
            return self._properties_call(msg, obj)
        handler = _METHODS.get((iface or "", member or ""))
        if handler is None or iface not in obj or handler[0] != sig:
            raise _dbus_error(
                "org.freedesktop.DBus.Error.UnknownMethod",
                f'Method "{member}" with signature "{sig}" on interface "{iface}" doesn\'t exist',
            )
        if not self._objects[self.adapter_path][ADAPTER]["Powered"] and member not in (
            "RemoveDevice",
        ):
            raise _dbus_error("org.bluez.Error.NotReady", "Resource Not Ready")
        result: Message | bool = handler[1](self, msg)
        return result

    def _get_managed_objects(self, msg: Message) -> Message:
        body = {
            path: {iface: self._props_variants(iface, props) for iface, props in ifaces.items()}
            for path, ifaces in self._objects.items()
        }
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [body])

    def _properties_call(self, msg: Message, obj: dict[str, dict[str, Any]]) -> Message:
        member, sig = msg.member, msg.signature
        if member == "GetAll" and sig == "s":
            (iface,) = msg.body
            props = obj.get(iface)
            if props is None:
                raise _dbus_error(
                    "org.freedesktop.DBus.Error.InvalidArgs", f"No such interface '{iface}'"
                )
            return Message.new_method_return(msg, "a{sv}", [self._props_variants(iface, props)])
        if member == "Get" and sig == "ss":
            iface, name = msg.body
            props = obj.get(iface)
            if props is None or name not in props:
                raise _dbus_error("org.freedesktop.DBus.Error.InvalidArgs", "No such property")
            return Message.new_method_return(
                msg, "v", [_variant(_SIGNATURES[iface][name], props[name])]
            )
        if member == "Set" and sig == "ssv":
            iface, name, value = msg.body
            props = obj.get(iface)
            if props is None or name not in _SIGNATURES.get(iface, {}):
                raise _dbus_error("org.freedesktop.DBus.Error.InvalidArgs", "No such property")
            if name not in _WRITABLE.get(iface, set()):
                raise _dbus_error(
                    "org.freedesktop.DBus.Error.PropertyReadOnly",
                    f"Property '{name}' is not writable",
                )
            if value.signature != _SIGNATURES[iface][name]:
                raise _dbus_error(
                    "org.freedesktop.DBus.Error.InvalidArgs", f"Invalid type for '{name}'"
                )
            self._property_set(msg.path or "", iface, name, value.value)
            return Message.new_method_return(msg)
        raise _dbus_error(
            "org.freedesktop.DBus.Error.UnknownMethod",
            f'Method "{member}" with signature "{sig}" doesn\'t exist',
        )

    def _property_set(self, path: str, iface: str, name: str, value: Any) -> None:
        if iface == ADAPTER and name == "Powered":
            self._set_props(path, iface, {"Powered": value, "PowerState": "on" if value else "off"})
            if not value:
                for dev in self._devices.values():
                    if dev.connected:
                        self._link_down(dev, "local")
                self._discovery.clear()
                self._discovery_changed()
            return
        self._set_props(path, iface, {name: value})

    def _client_left(self, sender: str) -> None:
        """A D-Bus client left the bus: end its notify and discovery sessions, as bluetoothd does."""
        for dev in self._devices.values():
            for cs in dev.chars.values():
                if sender in cs.sessions:
                    cs.sessions.discard(sender)
                    self._after_unsubscribe(dev, cs)
        if self._discovery.pop(sender, None) is not None:
            self._discovery_changed()

    # ------------------------------------------------------------- adapter
    def _start_discovery(self, msg: Message) -> Message:
        sender = msg.sender or ""
        if sender in self._discovery and self._discovery[sender].get("_active"):
            raise _dbus_error("org.bluez.Error.InProgress", "Operation already in progress")
        self._discovery.setdefault(sender, {})["_active"] = True
        self._discovery_changed()
        return Message.new_method_return(msg)

    def _stop_discovery(self, msg: Message) -> Message:
        sender = msg.sender or ""
        session = self._discovery.get(sender)
        if not session or not session.get("_active"):
            raise _dbus_error("org.bluez.Error.Failed", "No discovery started")
        del self._discovery[sender]
        self._discovery_changed()
        return Message.new_method_return(msg)

    def _set_discovery_filter(self, msg: Message) -> Message:
        (raw,) = msg.body
        flt: dict[str, Any] = {}
        for key, variant in raw.items():
            if (
                key not in _DISCOVERY_FILTER_KEYS
                or variant.signature != _DISCOVERY_FILTER_KEYS[key]
            ):
                raise _dbus_error(
                    "org.bluez.Error.InvalidArguments", "Invalid arguments in method call"
                )
            flt[key] = variant.value
        if "UUIDs" in flt:
            flt["UUIDs"] = {full_uuid(u) for u in flt["UUIDs"]}
        sender = msg.sender or ""
        active = self._discovery.get(sender, {}).get("_active", False)
        if flt or active:
            self._discovery[sender] = {**flt, "_active": active}
        else:
            self._discovery.pop(sender, None)
        return Message.new_method_return(msg)

    def _get_discovery_filters(self, msg: Message) -> Message:
        return Message.new_method_return(msg, "as", [list(_DISCOVERY_FILTER_KEYS)])

    def _remove_device(self, msg: Message) -> Message:
        (path,) = msg.body
        for dev in self._devices.values():
            if dev.path == path and dev.exported:
                self._forget(dev)
                return Message.new_method_return(msg)
        raise _dbus_error("org.bluez.Error.DoesNotExist", "Does Not Exist")

    def _forget(self, dev: _DeviceState) -> None:
        if dev.connected:
            self._link_down(dev, "local")
        for path, iface in reversed(dev.gatt_paths):
            self._remove_object(path, [iface])
        dev.gatt_paths.clear()
        dev.chars.clear()
        dev.gatt_exported = False
        if dev.exported:
            self._remove_object(dev.path, [DEVICE])
            dev.exported = False

    def _discovery_changed(self) -> None:
        active = any(s.get("_active") for s in self._discovery.values())
        self._set_props(self.adapter_path, ADAPTER, {"Discovering": active})
        if active and self._adv_task is None:
            self._adv_task = asyncio.ensure_future(self._advertise_loop())
        elif not active:
            if self._adv_task is not None:
                self._adv_task.cancel()
                self._adv_task = None
            # bluetoothd forgets RSSI/TxPower of what it no longer hears
            for dev in self._devices.values():
                if dev.exported and not dev.connected:
                    self._set_props(dev.path, DEVICE, {}, invalidate=("RSSI", "TxPower"))

    async def _advertise_loop(self) -> None:
        while True:
            for dev in list(self._devices.values()):
                p = dev.peripheral
                if p.in_range and not dev.connected and self._filters_match(dev):
                    self._advertise(dev)
            await asyncio.sleep(self.adv_interval)

    def _filters_match(self, dev: _DeviceState) -> bool:
        p = dev.peripheral
        for flt in self._discovery.values():
            if not flt.get("_active"):
                continue
            uuids = flt.get("UUIDs")
            if uuids and not uuids & set(p.advertised_uuids):
                continue
            if "RSSI" in flt and p.rssi < flt["RSSI"]:
                continue
            pattern = flt.get("Pattern")
            if pattern and not (
                p.address.startswith(pattern.upper()) or (p.name or "").startswith(pattern)
            ):
                continue
            return True
        return False

    def _advertise(self, dev: _DeviceState) -> None:
        """One advertisement heard: create the device object or update what changed."""
        p = dev.peripheral
        rssi = p.rssi + self._rng.randint(-2, 2)
        adv: dict[str, Any] = {"RSSI": rssi, "UUIDs": list(p.advertised_uuids)}
        if p.name is not None:
            adv["Name"] = p.name
        if p.tx_power is not None:
            adv["TxPower"] = p.tx_power
        if p.manufacturer_data:
            adv["ManufacturerData"] = dict(p.manufacturer_data)
        if p.service_data:
            adv["ServiceData"] = dict(p.service_data)
        if not dev.exported:
            props: dict[str, Any] = {
                "Address": p.address,
                "AddressType": p.address_type,
                "Alias": p.name if p.name is not None else p.address.replace(":", "-"),
                "Paired": False,
                "Bonded": False,
                "Trusted": False,
                "Blocked": False,
                "LegacyPairing": False,
                "Connected": False,
                "ServicesResolved": False,
                "Adapter": self.adapter_path,
                "AdvertisingFlags": b"\x06",
                **adv,
            }
            dev.exported = True
            self._add_object(dev.path, DEVICE, props)
            return
        duplicates = any(f.get("DuplicateData") for f in self._discovery.values())
        self._set_props(dev.path, DEVICE, adv)
        if duplicates:
            self._set_props(dev.path, DEVICE, {"RSSI": rssi}, force=True)

    # -------------------------------------------------------------- device
    def _device_for(self, msg: Message) -> _DeviceState:
        for dev in self._devices.values():
            if dev.path == msg.path:
                return dev
        raise _dbus_error("org.freedesktop.DBus.Error.UnknownObject", f"no device at {msg.path}")

    def _connect(self, msg: Message) -> Message | bool:
        dev = self._device_for(msg)
        if dev.connected:
            return Message.new_method_return(msg)
        if not dev.peripheral.in_range:
            self._spawn(
                self._reply_later(
                    msg,
                    1.0,
                    _dbus_error("org.bluez.Error.Failed", "Software caused connection abort"),
                )
            )
            return True
        dev.connected = True
        self._set_props(dev.path, DEVICE, {"Connected": True})
        if dev.peripheral.on_connect is not None:
            self._hook(dev.peripheral.on_connect)
        self._send(Message.new_method_return(msg))
        self._spawn(self._resolve_services(dev))
        return True

    async def _reply_later(self, msg: Message, delay: float, error: DBusError) -> None:
        await asyncio.sleep(delay)
        self._send_error(error, msg)

    async def _resolve_services(self, dev: _DeviceState) -> None:
        """GATT discovery after a connection: export the database once, then ServicesResolved."""
        await asyncio.sleep(self.connect_delay)
        if not dev.connected:
            return
        if not dev.gatt_exported:
            self._export_gatt(dev)
        for cs in dev.chars.values():
            self._set_props(cs.path, GATT_CHARACTERISTIC, {"MTU": 247})
        # like BlueZ: once resolved, UUIDs lists every GATT service, plus Generic Access
        # (0x1800) and Generic Attribute (0x1801) that the stack itself serves
        p = dev.peripheral
        uuids = {*p.advertised_uuids, *(svc.uuid for svc in p.services)}
        uuids |= {full_uuid("1800"), full_uuid("1801")}
        self._set_props(dev.path, DEVICE, {"UUIDs": sorted(uuids), "ServicesResolved": True})

    def _export_gatt(self, dev: _DeviceState) -> None:
        handle = 0x0009
        for service in dev.peripheral.services:
            handle += 1
            spath = f"{dev.path}/service{handle:04x}"
            self._add_object(
                spath,
                GATT_SERVICE,
                {
                    "UUID": service.uuid,
                    "Device": dev.path,
                    "Primary": service.primary,
                    "Includes": [],
                },
            )
            dev.gatt_paths.append((spath, GATT_SERVICE))
            for char in service.characteristics:
                handle += 1  # declaration
                cpath = f"{spath}/char{handle:04x}"
                handle += 1  # value
                props: dict[str, Any] = {
                    "UUID": char.uuid,
                    "Service": spath,
                    "Value": b"",
                    "Flags": list(char.flags),
                    "MTU": 23,
                }
                notifiable = "notify" in char.flags or "indicate" in char.flags
                if notifiable:
                    props["Notifying"] = False
                self._add_object(cpath, GATT_CHARACTERISTIC, props)
                dev.gatt_paths.append((cpath, GATT_CHARACTERISTIC))
                dpath = None
                if notifiable:
                    handle += 1
                    dpath = f"{cpath}/desc{handle:04x}"
                    self._add_object(
                        dpath,
                        GATT_DESCRIPTOR,
                        {
                            "UUID": CCCD_UUID,
                            "Characteristic": cpath,
                            "Value": b"",
                            "Flags": ["read", "write"],
                        },
                    )
                    dev.gatt_paths.append((dpath, GATT_DESCRIPTOR))
                dev.chars[cpath] = _CharState(cpath, char, spath, dpath)
        dev.gatt_exported = True

    def _disconnect(self, msg: Message) -> Message:
        dev = self._device_for(msg)
        if not dev.connected:
            raise _dbus_error("org.bluez.Error.NotConnected", "Not Connected")
        self._link_down(dev, "local")
        return Message.new_method_return(msg)

    def _link_down(self, dev: _DeviceState, reason: str) -> None:
        for cs in dev.chars.values():
            if cs.sessions:
                cs.sessions.clear()
                self._set_props(cs.path, GATT_CHARACTERISTIC, {"Notifying": False})
                if dev.peripheral.on_subscribe is not None:
                    self._hook(dev.peripheral.on_subscribe, cs.char.uuid, False)
        dev.connected = False
        self._set_props(dev.path, DEVICE, {"ServicesResolved": False})
        self._set_props(dev.path, DEVICE, {"Connected": False})
        if dev.peripheral.on_disconnect is not None:
            self._hook(dev.peripheral.on_disconnect, reason)

    def _pair(self, msg: Message) -> Message:
        dev = self._device_for(msg)
        self._set_props(dev.path, DEVICE, {"Paired": True, "Bonded": True})
        return Message.new_method_return(msg)

    def _hook(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a peripheral bug must not kill the "radio"
            log.exception("peripheral hook %r failed", fn)

    # ---------------------------------------------------------------- GATT
    def _char_for(self, msg: Message) -> tuple[_DeviceState, _CharState]:
        for dev in self._devices.values():
            cs = dev.chars.get(msg.path or "")
            if cs is not None:
                if not dev.connected:
                    raise _dbus_error("org.bluez.Error.Failed", "Not connected")
                return dev, cs
        raise _dbus_error(
            "org.freedesktop.DBus.Error.UnknownObject", f"no characteristic at {msg.path}"
        )

    def _read_value(self, msg: Message) -> bool:
        _dev, cs = self._char_for(msg)
        offset = _option(msg.body[0], "offset", 0)
        if "read" not in cs.char.flags:
            raise _att_to_dbus(ATT_READ_NOT_PERMITTED)
        self._spawn(self._complete_read(msg, cs, offset))
        return True

    async def _complete_read(self, msg: Message, cs: _CharState, offset: int) -> None:
        try:
            handler = cs.char.read
            if handler is None:
                value = cs.char.value
            else:
                result = handler()
                value = await result if inspect.isawaitable(result) else result
            value = bytes(value)
            if offset > len(value):
                raise AttError(ATT_INVALID_OFFSET)
        except AttError as exc:
            self._send_error(_att_to_dbus(exc.code), msg)
            return
        except Exception:
            log.exception("read handler of %s failed", cs.char.uuid)
            self._send_error(_att_to_dbus(ATT_UNLIKELY_ERROR), msg)
            return
        self._send(Message.new_method_return(msg, "ay", [value[offset:]]))
        # bluetoothd writes what it read into its cache and signals the new Value
        self._set_props(cs.path, GATT_CHARACTERISTIC, {"Value": value}, force=True)

    def _write_value(self, msg: Message) -> Message | bool:
        _dev, cs = self._char_for(msg)
        data, options = bytes(msg.body[0]), msg.body[1]
        kind = _option(options, "type", "request")
        if _option(options, "offset", 0):
            raise _att_to_dbus(ATT_INVALID_OFFSET)
        if len(data) > 512:
            raise _dbus_error("org.bluez.Error.InvalidValueLength", "Invalid Length")
        if kind == "command":
            if "write-without-response" not in cs.char.flags:
                raise _dbus_error("org.bluez.Error.NotSupported", "Operation is not supported")
            self._spawn(self._complete_write(None, cs, data, False))
            return Message.new_method_return(msg)
        if "write" not in cs.char.flags:
            raise _att_to_dbus(ATT_WRITE_NOT_PERMITTED)
        self._spawn(self._complete_write(msg, cs, data, True))
        return True

    async def _complete_write(
        self, msg: Message | None, cs: _CharState, data: bytes, response: bool
    ) -> None:
        try:
            handler = cs.char.write
            if handler is None:
                cs.char.value = data
            else:
                result = handler(data, response)
                if inspect.isawaitable(result):
                    await result
        except AttError as exc:
            if msg is not None:
                self._send_error(_att_to_dbus(exc.code), msg)
            return
        except Exception:
            log.exception("write handler of %s failed", cs.char.uuid)
            if msg is not None:
                self._send_error(_att_to_dbus(ATT_UNLIKELY_ERROR), msg)
            return
        if msg is not None:
            self._send(Message.new_method_return(msg))

    def _start_notify(self, msg: Message) -> Message | bool:
        dev, cs = self._char_for(msg)
        if "notify" not in cs.char.flags and "indicate" not in cs.char.flags:
            raise _dbus_error("org.bluez.Error.NotSupported", "Operation is not supported")
        sender = msg.sender or ""
        if sender in cs.sessions:
            return Message.new_method_return(msg)
        first = not cs.sessions
        cs.sessions.add(sender)
        self._send(Message.new_method_return(msg))
        if first:
            self._set_props(cs.path, GATT_CHARACTERISTIC, {"Notifying": True})
            if dev.peripheral.on_subscribe is not None:
                self._hook(dev.peripheral.on_subscribe, cs.char.uuid, True)
        return True

    def _stop_notify(self, msg: Message) -> Message:
        dev, cs = self._char_for(msg)
        sender = msg.sender or ""
        if sender not in cs.sessions:
            raise _dbus_error("org.bluez.Error.Failed", "No notify session started")
        cs.sessions.discard(sender)
        self._after_unsubscribe(dev, cs)
        return Message.new_method_return(msg)

    def _after_unsubscribe(self, dev: _DeviceState, cs: _CharState) -> None:
        if not cs.sessions:
            self._set_props(cs.path, GATT_CHARACTERISTIC, {"Notifying": False})
            if dev.connected and dev.peripheral.on_subscribe is not None:
                self._hook(dev.peripheral.on_subscribe, cs.char.uuid, False)

    def _descriptor_for(self, msg: Message) -> tuple[_DeviceState, _CharState]:
        for dev in self._devices.values():
            for cs in dev.chars.values():
                if cs.cccd_path == msg.path:
                    if not dev.connected:
                        raise _dbus_error("org.bluez.Error.Failed", "Not connected")
                    return dev, cs
        raise _dbus_error(
            "org.freedesktop.DBus.Error.UnknownObject", f"no descriptor at {msg.path}"
        )

    def _read_descriptor(self, msg: Message) -> Message:
        _dev, cs = self._descriptor_for(msg)
        value = b"\x01\x00" if cs.sessions else b"\x00\x00"
        self._set_props(cs.cccd_path or "", GATT_DESCRIPTOR, {"Value": value}, force=True)
        return Message.new_method_return(msg, "ay", [value])

    def _write_descriptor(self, msg: Message) -> Message:
        self._descriptor_for(msg)
        # bluetoothd owns the CCCD: clients must use StartNotify/StopNotify
        raise _att_to_dbus(ATT_WRITE_NOT_PERMITTED)


class _Missing:
    pass


_MISSING = _Missing()


def _option(options: dict[str, Any], key: str, default: Any) -> Any:
    variant = options.get(key)
    return default if variant is None else variant.value


# (interface, member) -> (input signature, handler)
_METHODS: dict[tuple[str, str], tuple[str, Callable[[BlueZStandIn, Message], Message | bool]]] = {
    (ADAPTER, "StartDiscovery"): ("", BlueZStandIn._start_discovery),
    (ADAPTER, "StopDiscovery"): ("", BlueZStandIn._stop_discovery),
    (ADAPTER, "SetDiscoveryFilter"): ("a{sv}", BlueZStandIn._set_discovery_filter),
    (ADAPTER, "GetDiscoveryFilters"): ("", BlueZStandIn._get_discovery_filters),
    (ADAPTER, "RemoveDevice"): ("o", BlueZStandIn._remove_device),
    (DEVICE, "Connect"): ("", BlueZStandIn._connect),
    (DEVICE, "Disconnect"): ("", BlueZStandIn._disconnect),
    (DEVICE, "Pair"): ("", BlueZStandIn._pair),
    (GATT_CHARACTERISTIC, "ReadValue"): ("a{sv}", BlueZStandIn._read_value),
    (GATT_CHARACTERISTIC, "WriteValue"): ("aya{sv}", BlueZStandIn._write_value),
    (GATT_CHARACTERISTIC, "StartNotify"): ("", BlueZStandIn._start_notify),
    (GATT_CHARACTERISTIC, "StopNotify"): ("", BlueZStandIn._stop_notify),
    (GATT_DESCRIPTOR, "ReadValue"): ("a{sv}", BlueZStandIn._read_descriptor),
    (GATT_DESCRIPTOR, "WriteValue"): ("aya{sv}", BlueZStandIn._write_descriptor),
}

__all__ = [
    "ATT_APPLICATION_ERROR",
    "ATT_INVALID_ATTRIBUTE_VALUE_LENGTH",
    "ATT_VALUE_NOT_ALLOWED",
    "AttError",
    "BleSimulatorUnavailable",
    "BlueZStandIn",
    "Characteristic",
    "Peripheral",
    "PrivateBus",
    "Service",
    "full_uuid",
]
