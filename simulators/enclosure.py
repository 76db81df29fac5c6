"""The enclosure module (lid switch, LED light, heartbeat) as an MQTT device, on a real broker.

Device side of PROTOCOLS.md "Enclosure module", written from the spec (it
does not import ``instruments``). Topic root ``<prefix>/enclosure/<id>/``:

==============  =========  ========  ==================================================
topic           direction  retained  payload (JSON, UTF-8)
==============  =========  ========  ==================================================
``state``       device →   yes       ``{"lid": "open"|"closed", "light": {"on", "intensity"}, "uptime_s"}``
``heartbeat``   device →   no        ``{"seq": int, "t": float}`` every 0.5 s (real time)
``cmd``         → device   no        ``{"light": {"on": bool, "intensity": 0..1}, "id": str}``
``cmd/ack``     device →   no        ``{"id": str, "ok": bool, "error": str?}``
``status``      device →   yes       ``online``; Last Will ``offline``
==============  =========  ========  ==================================================

Like an ESP32/Pico-W with a small MQTT library it speaks MQTT 3.1.1 by
default (``?protocol=5`` in the broker URL for v5); it is a paho client with
its network loop on paho's thread, where commands are handled (world state is
changed under ``world.lock``). ``intensity`` may be omitted from a command
(the light keeps its intensity). ``t`` in the heartbeat is the simulated clock.

Faults read from ``world.faults`` (``device="enclosure"`` or no device):

* ``no-reply``: commands are recorded but neither applied nor acknowledged;
* ``heartbeat-stop``: no heartbeats while active (``seq`` resumes after);
* ``dropped-connection`` (edge-triggered): the device's TCP connection is cut
  without DISCONNECT, so the broker publishes the Last Will ``offline``; it
  reconnects after ``down_s`` real seconds (default 0.5) and publishes
  ``online`` and its state again;
* ``broker-restart``: handled by the broker object (``broker.watch(world)``);
  this device reconnects and re-publishes its retained topics.

Every received command is recorded in ``world.wire`` under ``"enclosure"``
(the parsed JSON object, or ``{"raw": text}`` with note ``malformed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from simulators.world import StationWorld

log = logging.getLogger(__name__)
DEVICE = "enclosure"
HEARTBEAT_PERIOD_S = 0.5


def _password(query: dict[str, str]) -> str | None:
    """The broker password named by a URL's ``password_env`` or ``password_file``."""
    if "password_env" in query:
        value = os.environ.get(query["password_env"])
        if value is None:
            raise ValueError(
                f"enclosure simulator: environment variable {query['password_env']} "
                "(password_env) is not set"
            )
        return value
    if "password_file" in query:
        try:
            lines = Path(query["password_file"]).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(
                f"enclosure simulator: cannot read password_file {query['password_file']}: "
                f"{exc.strerror or exc}"
            ) from None
        return lines[0] if lines else ""
    return None


class EnclosureSim:
    """The enclosure module on ``broker_url`` (``mqtt[s]://[user@]host:port``, optional
    ``?protocol=5|3.1.1``; with a user, the password from ``password_env`` or
    ``password_file`` in the query, as the driver's transport reads it).

    ``url`` is the driver's transport URL: ``mqtt://host:port/<prefix>`` (plus
    the broker URL's query). See the module docstring for topics and faults.
    """

    def __init__(
        self,
        world: StationWorld,
        broker_url: str,
        *,
        prefix: str = "lab",
        enclosure_id: str = "enc-1",
        heartbeat_period_s: float = HEARTBEAT_PERIOD_S,
        connect_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(broker_url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker_url must be mqtt://host:port, got {broker_url!r}")
        self.world = world
        self.host = parts.hostname
        self.port = parts.port or 1883
        self.tls = parts.scheme == "mqtts"
        self._query = dict(parse_qsl(parts.query))
        self.username = unquote(parts.username) if parts.username else None
        self._password = _password(self._query) if self.username else None
        protocol = self._query.get("protocol", "3.1.1")
        if protocol not in ("3.1.1", "5"):
            raise ValueError(f"protocol must be 3.1.1 or 5, got {protocol!r}")
        self.protocol = protocol
        self.prefix = prefix.strip("/")
        self.enclosure_id = enclosure_id
        self.root = (
            f"{self.prefix}/enclosure/{enclosure_id}"
            if self.prefix
            else f"enclosure/{enclosure_id}"
        )
        self.heartbeat_period_s = heartbeat_period_s
        self.connect_timeout = connect_timeout
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()
        self._connected = threading.Event()
        self._stopping = False
        self.heartbeat_seq = 0
        self.connects = 0
        self.commands = 0
        world.faults.on_inject(self._on_fault)

    # ------------------------------------------------------------------ URL
    @property
    def url(self) -> str:
        """Transport URL for the driver: ``mqtt://host:port/<prefix>[?query]``."""
        scheme = "mqtts" if self.tls else "mqtt"
        query = urlencode(self._query)
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}/{self.prefix}" + (
            f"?{query}" if query else ""
        )

    def topic(self, leaf: str) -> str:
        return f"{self.root}/{leaf}"

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Connect (status ``online``, retained state) and start the heartbeat."""
        if self._client is not None:
            return
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        version = paho.MQTTv5 if self.protocol == "5" else paho.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{self.world.name}-{self.enclosure_id}-sim",
            protocol=version,
            clean_session=None if version == paho.MQTTv5 else True,
        )
        client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]
        client.on_socket_open = _no_delay  # an ESP32 stack sends small packets at once, too
        client.will_set(self.topic("status"), b"offline", qos=1, retain=True)
        if self.username:
            client.username_pw_set(self.username, self._password)
        if self.tls:
            ctx = ssl.create_default_context(cafile=self._query.get("ca"))
            client.tls_set_context(ctx)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._connected.clear()
        client.connect_async(self.host, self.port, keepalive=10)
        client.loop_start()
        deadline = time.monotonic() + self.connect_timeout
        while not self._connected.is_set():
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(
                    f"enclosure simulator: no connection to the broker at {self.host}:{self.port}"
                )
            await asyncio.sleep(0.005)
        self._heartbeat_stop.clear()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat, name=f"enclosure-sim-heartbeat-{self.enclosure_id}"
        )
        self._heartbeat_thread.start()

    async def stop(self) -> None:
        """Publish ``offline`` (retained), disconnect, join paho's thread. Idempotent."""
        self._stopping = True
        thread, self._heartbeat_thread = self._heartbeat_thread, None
        if thread is not None:
            self._heartbeat_stop.set()
            await asyncio.to_thread(thread.join)
        client, self._client = self._client, None
        if client is None:
            return
        info = None
        if client.is_connected():
            info = client.publish(self.topic("status"), b"offline", qos=1, retain=True)
        await asyncio.to_thread(self._shutdown_client, client, info)
        self._connected.clear()

    @staticmethod
    def _shutdown_client(client: paho.Client, info: paho.MQTTMessageInfo | None) -> None:
        if info is not None:
            with contextlib.suppress(Exception):  # best effort: the link may be going down
                info.wait_for_publish(1.0)
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
        reset = getattr(client, "_reset_sockets", None)  # close paho's wake-up socket pair now
        if reset is not None:
            reset()

    async def __aenter__(self) -> EnclosureSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ publishing
    def state_payload(self) -> dict[str, Any]:
        world = self.world
        now = world.advance()
        with world.lock:
            enc = world.enclosure
            return {
                "lid": enc.lid,
                "light": {"on": enc.light_on, "intensity": enc.intensity},
                "uptime_s": round(now - enc.started_sim_t, 3),
            }

    def _publish(self, leaf: str, payload: Any, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None:
            return
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client.publish(self.topic(leaf), data, qos=qos, retain=retain)

    def publish_state(self) -> None:
        """Publish the retained ``state`` (done on every change and on every connect)."""
        self._publish("state", self.state_payload(), retain=True)

    def set_lid(self, lid: str) -> None:
        """Open or close the lid (the switch changes; ``state`` is published)."""
        if lid not in ("open", "closed"):
            raise ValueError(f"lid must be 'open' or 'closed', got {lid!r}")
        with self.world.lock:
            self.world.enclosure.lid = lid
        self.publish_state()

    def _heartbeat(self) -> None:
        """Every ``heartbeat_period_s`` of real time, on a thread of its own, as the device's
        own timer: a faster simulated clock speeds up the physics, not the network (the
        driver and the monitors age heartbeats in real seconds), and a busy event loop in
        the simulating process does not delay a device's heartbeat (an ESP32's would not
        wait for the lab PC either). The first one at once: a device says it is alive as it
        comes online. Stops at ``_heartbeat_stop``."""
        clock = self.world.clock
        next_t = time.monotonic()
        while not self._heartbeat_stop.is_set():
            stopped = self.world.faults.active("heartbeat-stop", device=DEVICE) is not None
            if self._connected.is_set() and not stopped:
                self.heartbeat_seq += 1
                self._publish(
                    "heartbeat", {"seq": self.heartbeat_seq, "t": round(clock.now(), 3)}, qos=0
                )
            next_t = max(next_t + self.heartbeat_period_s, time.monotonic())
            self._heartbeat_stop.wait(next_t - time.monotonic())

    # ----------------------------------------------------- paho's thread side
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("enclosure simulator: broker refused the connection: %s", reason)
            return
        self.connects += 1
        client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]
        client.on_socket_open = _no_delay  # an ESP32 stack sends small packets at once, too
        client.subscribe(self.topic("cmd"), qos=1)
        client.publish(self.topic("status"), b"online", qos=1, retain=True)
        client.publish(
            self.topic("state"), json.dumps(self.state_payload()).encode(), qos=1, retain=True
        )
        self._connected.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic != self.topic("cmd"):
            return
        self.commands += 1
        raw = bytes(message.payload)
        try:
            cmd = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            self.world.wire.record(DEVICE, {"raw": raw.decode("utf-8", "replace")}, "malformed")
            if self.world.faults.active("no-reply", device=DEVICE) is None:
                self._publish(
                    "cmd/ack", {"id": None, "ok": False, "error": f"malformed JSON: {exc}"}
                )
            return
        self.world.wire.record(DEVICE, cmd if isinstance(cmd, dict) else {"raw": cmd}, "cmd")
        if self.world.faults.active("no-reply", device=DEVICE) is not None:
            return
        cmd_id = cmd.get("id") if isinstance(cmd, dict) else None
        error = self._apply(cmd)
        ack: dict[str, Any] = {
            "id": cmd_id if isinstance(cmd_id, str) else None,
            "ok": error is None,
        }
        if error is not None:
            ack["error"] = error
        self._publish("cmd/ack", ack)

    def _apply(self, cmd: Any) -> str | None:
        """Validate and apply a command; the error text, or None when applied."""
        if not isinstance(cmd, dict):
            return "command must be a JSON object"
        if not isinstance(cmd.get("id"), str) or not cmd["id"]:
            return "missing or non-string 'id'"
        unknown = set(cmd) - {"id", "light"}
        if unknown:
            return f"unknown field(s): {', '.join(sorted(unknown))}"
        light = cmd.get("light")
        if not isinstance(light, dict):
            return "missing 'light' object"
        on = light.get("on")
        if not isinstance(on, bool):
            return "'light.on' must be true or false"
        intensity = light.get("intensity")
        if intensity is not None:
            if (
                isinstance(intensity, bool)
                or not isinstance(intensity, int | float)
                or not math.isfinite(intensity)
            ):
                return "'light.intensity' must be a number"
            if not 0.0 <= intensity <= 1.0:
                return f"'light.intensity' {intensity} out of range 0..1"
        world = self.world
        world.advance()
        with world.lock:
            changed = world.enclosure.light_on != on
            world.enclosure.light_on = on
            if intensity is not None:
                changed = changed or world.enclosure.intensity != float(intensity)
                world.enclosure.intensity = float(intensity)
        if changed:
            self.publish_state()
        return None

    # ----------------------------------------------------------------- faults
    def _on_fault(self, name: str, params: dict[str, Any]) -> None:
        if name != "dropped-connection" or params.get("device", DEVICE) != DEVICE:
            return
        client = self._client
        if client is None or self._stopping:
            return
        down_s = float(params.get("down_s", 0.5))
        self.drop_connection(down_s)

    def drop_connection(self, down_s: float = 0.5) -> None:
        """Cut the TCP connection without DISCONNECT (the broker sends the Will); reconnect after ``down_s``."""
        client = self._client
        if client is None:
            return
        # paho waits its back-off minimum before reconnecting: make that down_s for
        # this drop (``_on_connect`` restores the normal back-off).
        client.reconnect_delay_set(max(down_s, 0.01), max(down_s, 1.0))  # type: ignore[arg-type]
        sock = client.socket()
        if isinstance(sock, socket.socket):  # also ssl.SSLSocket
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        log.info("enclosure simulator: connection dropped (reconnect in %.2f s)", down_s)

    def __repr__(self) -> str:
        return f"<EnclosureSim {self.root} on {self.host}:{self.port}>"


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle: state + ack are published back to back (else +40 ms per command)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
