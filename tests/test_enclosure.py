"""The Enclosure driver against the enclosure simulator over a real broker (mosquitto, and amqtt).

One test runs the driver against a second, minimal emulator written here
from PROTOCOLS.md (a tiny paho client), so the driver follows the spec and
not our simulator's habits.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import instruments
from instruments.drivers.enclosure import Enclosure
from instruments.errors import DeviceRejected, ProtocolError, TransportTimeout
from instruments.transports.mqtt import MqttTransport
from simulators.broker import EmbeddedBroker, MosquittoBroker
from simulators.clock import SimClock
from simulators.enclosure import EnclosureSim
from simulators.world import StationWorld

SPEED = 20.0  # heartbeat every 0.5 simulated s = 25 ms real


async def until(cond: Callable[[], bool], within: float = 3.0, what: str = "condition") -> None:
    """Poll ``cond`` (state changed by other threads and tasks) until true or ``within`` s pass."""

    async def poll() -> None:
        while not cond():  # noqa: ASYNC110 - polling state that paho's thread and tasks change
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), within)
    except TimeoutError:
        raise AssertionError(f"timed out after {within} s waiting for {what}") from None


@dataclass
class Bench:
    world: StationWorld
    sim: EnclosureSim
    enc: Enclosure

    @property
    def url(self) -> str:
        return self.sim.url


def make_world() -> StationWorld:
    return StationWorld(clock=SimClock(speed=SPEED))


async def start_bench(broker_url: str, **driver_options: Any) -> Bench:
    world = make_world()
    sim = EnclosureSim(world, broker_url, prefix=f"t-{uuid.uuid4().hex[:8]}", enclosure_id="enc-1")
    await sim.start()
    options: dict[str, Any] = {"enclosure_id": "enc-1", "timeout": 1.0}
    options.update(driver_options)
    enc = Enclosure(MqttTransport(sim.url), **options)
    try:
        await enc.open()
    except BaseException:
        await enc.close()
        await sim.stop()
        raise
    return Bench(world, sim, enc)


async def stop_bench(bench: Bench) -> None:
    await bench.enc.close()
    await bench.sim.stop()


@pytest.fixture
async def bench(mosquitto: MosquittoBroker) -> AsyncIterator[Bench]:
    b = await start_bench(mosquitto.url)
    try:
        yield b
    finally:
        await stop_bench(b)


# ----------------------------------------------------------------- basics
async def test_retained_state_and_status_on_connect(bench: Bench) -> None:
    state = await bench.enc.wait_for_state(timeout=2)
    assert state["lid"] == "closed" and state["light_on"] is False
    await until(lambda: bench.enc.online is True, what="status online")
    reading = await bench.enc.read()
    assert set(reading) == {
        "lid",
        "light_on",
        "intensity",
        "uptime_s",
        "online",
        "heartbeat_age_s",
        "heartbeat_seq",
    }
    assert reading["online"] is True and reading["uptime_s"] >= 0
    assert bench.enc.lid == "closed"
    assert bench.enc.describe()["channels"]["intensity"]["maximum"] == 1.0


async def test_heartbeat_ticks(bench: Bench) -> None:
    enc = bench.enc
    await until(lambda: enc.heartbeats >= 4, what="4 heartbeats")
    first = (await enc.read())["heartbeat_seq"]
    await until(lambda: (enc.state is not None) and enc.heartbeats >= 8, what="8 heartbeats")
    reading = await enc.read()
    assert reading["heartbeat_seq"] > first
    assert reading["heartbeat_age_s"] is not None and reading["heartbeat_age_s"] < 0.5


async def test_set_light_acked_and_reflected_everywhere(bench: Bench) -> None:
    enc, world = bench.enc, bench.world
    await enc.set_light(True, 0.7)
    assert world.enclosure.light_on is True and world.enclosure.intensity == pytest.approx(0.7)
    state = await enc.wait_for_state(timeout=2, predicate=lambda s: s["light_on"])
    assert state["intensity"] == pytest.approx(0.7)
    sent = world.wire.data("enclosure")[-1]
    assert sent["light"] == {"on": True, "intensity": 0.7} and isinstance(sent["id"], str)
    # The state is retained: a newcomer sees the light on at once.
    other = Enclosure(MqttTransport(bench.url), enclosure_id="enc-1")
    try:
        await other.open()
        assert (await other.wait_for_state(timeout=2))["light_on"] is True
    finally:
        await other.close()
    # Intensity omitted: the device keeps it.
    await enc.set_light(False)
    await enc.set_light(True)
    assert world.enclosure.intensity == pytest.approx(0.7)


async def test_bad_command_is_rejected(bench: Bench, mosquitto: MosquittoBroker) -> None:
    enc, world = bench.enc, bench.world
    with pytest.raises(DeviceRejected, match="out of range") as info:
        await enc.set_light(True, 1.5)
    assert info.value.code == "ok:false"
    assert world.enclosure.light_on is False
    with pytest.raises(TypeError):
        await enc.set_light(True, float("nan"))
    # Malformed JSON straight onto the wire: the device answers ok:false.
    raw = MqttTransport(bench.url)
    async with raw:
        acks = await raw.subscribe("enclosure/enc-1/cmd/ack", qos=1)
        await raw.publish("enclosure/enc-1/cmd", b"{not json", qos=1)
        ack = json.loads((await asyncio.wait_for(acks.get(), 2)).payload)
        assert ack["ok"] is False and "malformed" in ack["error"]
    assert world.wire.entries("enclosure")[-1].note == "malformed"


async def test_no_ack_times_out(bench: Bench) -> None:
    bench.world.faults.inject("no-reply", device="enclosure")
    enc = Enclosure(MqttTransport(bench.url), enclosure_id="enc-1", timeout=0.2, attempts=2)
    try:
        await enc.open()
        before = len(bench.world.wire.data("enclosure"))
        with pytest.raises(TransportTimeout, match="no cmd/ack"):
            await enc.set_light(True, 0.5)
        assert (
            len(bench.world.wire.data("enclosure")) - before == 2
        )  # retried once, with a fresh id
        assert bench.world.enclosure.light_on is False
        bench.world.faults.clear("no-reply")
        await enc.set_light(True, 0.5)
        assert bench.world.enclosure.light_on is True
    finally:
        await enc.close()


async def test_lid_change_seen_by_driver(bench: Bench) -> None:
    await bench.enc.wait_for_state(timeout=2)
    bench.sim.set_lid("open")
    state = await bench.enc.wait_for_state(timeout=2, predicate=lambda s: s["lid"] == "open")
    assert state["lid"] == "open" and bench.enc.lid == "open"
    bench.sim.set_lid("closed")
    await bench.enc.wait_for_state(timeout=2, predicate=lambda s: s["lid"] == "closed")
    with pytest.raises(TransportTimeout):
        await bench.enc.wait_for_state(timeout=0.05, predicate=lambda s: s["lid"] == "ajar")


async def test_heartbeat_stop_makes_age_grow(bench: Bench) -> None:
    enc = bench.enc
    await until(lambda: enc.heartbeats >= 2, what="heartbeats")
    bench.world.faults.inject("heartbeat-stop", device="enclosure")
    await asyncio.sleep(0.05)  # one in flight may still land
    seq = enc.heartbeats
    await asyncio.sleep(0.3)  # 6 simulated seconds: 12 missed beats
    age = enc.heartbeat_age()
    assert enc.heartbeats == seq and age is not None and age > 0.3
    bench.world.faults.clear("heartbeat-stop")
    await until(lambda: (enc.heartbeat_age() or 1.0) < 0.1, what="heartbeats again")


async def test_dropped_connection_will_then_online(bench: Bench) -> None:
    enc = bench.enc
    await until(lambda: enc.online is True, what="online")
    seen: list[bool | None] = []

    async def watch() -> None:
        while True:
            if not seen or seen[-1] != enc.online:
                seen.append(enc.online)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        connects = bench.sim.connects
        bench.world.faults.inject("dropped-connection", device="enclosure", down_s=0.3)
        await until(lambda: seen[-1] is False, what="Last Will 'offline'")
        await until(
            lambda: len(seen) >= 3 and bench.sim.connects == connects + 1, what="back online"
        )
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
    assert seen == [True, False, True]
    await enc.set_light(True, 0.2)  # and it still obeys
    assert bench.world.enclosure.intensity == pytest.approx(0.2)


async def test_broker_restart_driver_keeps_working(fresh_mosquitto: MosquittoBroker) -> None:
    bench = await start_bench(fresh_mosquitto.client_url(reconnect_min="0.05", reconnect_max="0.5"))
    try:
        enc = bench.enc
        fresh_mosquitto.watch(bench.world)
        await enc.set_light(True, 0.3)
        updates = enc.state_updates
        bench.world.faults.inject("broker-restart")
        assert fresh_mosquitto.restarts == 1
        # The device republishes its retained state after reconnecting; the driver re-subscribed.
        await until(lambda: enc.state_updates > updates, within=5, what="state after the restart")
        await enc.set_light(False)
        assert bench.world.enclosure.light_on is False
        await until(lambda: (enc.heartbeat_age() or 1.0) < 0.1, what="heartbeats after the restart")
    finally:
        await stop_bench(bench)


async def test_malformed_device_payloads_are_counted_not_fatal(bench: Bench) -> None:
    enc = bench.enc
    await enc.wait_for_state(timeout=2)
    rogue = MqttTransport(bench.url)
    async with rogue:
        await rogue.publish("enclosure/enc-1/state", b"\xff garbage", qos=1)
        await rogue.publish(
            "enclosure/enc-1/state", json.dumps({"lid": "ajar", "light": {"on": True}}), qos=1
        )
        await rogue.publish("enclosure/enc-1/heartbeat", json.dumps({"seq": "x"}), qos=1)
        await rogue.publish("enclosure/enc-1/status", b"sleepy", qos=1)
        await until(lambda: enc.errors >= 4, what="4 protocol errors")
        assert isinstance(enc.last_error, ProtocolError)
        # The consumer is still alive: a valid state is taken.
        bench.sim.set_lid("open")
        await enc.wait_for_state(timeout=2, predicate=lambda s: s["lid"] == "open")


async def test_safe_state_and_close_are_idempotent(bench: Bench) -> None:
    enc = bench.enc
    await enc.set_light(True, 1.0)
    await enc.safe_state()
    await enc.safe_state()
    assert bench.world.enclosure.light_on is False
    await enc.close()
    await enc.close()
    assert enc._consumer is None


async def test_registry_connect(bench: Bench) -> None:
    async with instruments.connect(
        "enclosure", bench.url, enclosure_id="enc-1", timeout=1.0
    ) as enc:
        assert isinstance(enc, Enclosure)
        await enc.set_light(True, 0.9)
        assert (await enc.read())["lid"] == "closed"
        assert bench.world.enclosure.light_on is True
    assert bench.world.enclosure.light_on is False  # safe state on exit


async def test_embedded_broker_over_311() -> None:
    with EmbeddedBroker() as broker:
        bench = await start_bench(broker.client_url())
        try:
            assert "protocol=3.1.1" in bench.url
            assert bench.enc.transport.protocol == "3.1.1"  # type: ignore[attr-defined]
            await bench.enc.wait_for_state(timeout=2)
            await bench.enc.set_light(True, 0.4)
            assert bench.world.enclosure.intensity == pytest.approx(0.4)
            await until(lambda: bench.enc.heartbeats >= 2, what="heartbeats")
            bench.sim.set_lid("open")
            await bench.enc.wait_for_state(timeout=2, predicate=lambda s: s["lid"] == "open")
        finally:
            await stop_bench(bench)


# ------------------------------------- a second emulator, from PROTOCOLS.md
class SpecEnclosure:
    """A minimal enclosure written from the spec table alone (MQTT 3.1.1, paho).

    It acks *before* publishing state (the spec does not fix the order),
    always reports ``uptime_s`` 1.5, and sends a heartbeat when the test
    calls ``beat()``.
    """

    def __init__(self, host: str, port: int, root: str) -> None:
        self.root = root
        self.lid = "closed"
        self.light = {"on": False, "intensity": 0.0}
        self.seq = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"spec-{uuid.uuid4().hex[:6]}"
        )
        self.client.will_set(f"{root}/status", "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def _state(self) -> str:
        return json.dumps({"lid": self.lid, "light": self.light, "uptime_s": 1.5})

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(f"{self.root}/cmd", 1)
        client.publish(f"{self.root}/status", "online", qos=1, retain=True)
        client.publish(f"{self.root}/state", self._state(), qos=1, retain=True)

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        cmd = json.loads(msg.payload)
        light = cmd["light"]
        if "intensity" in light and not 0 <= light["intensity"] <= 1:
            client.publish(
                f"{self.root}/cmd/ack",
                json.dumps({"id": cmd["id"], "ok": False, "error": "range"}),
                qos=1,
            )
            return
        self.light = {
            "on": light["on"],
            "intensity": light.get("intensity", self.light["intensity"]),
        }
        client.publish(f"{self.root}/cmd/ack", json.dumps({"id": cmd["id"], "ok": True}), qos=1)
        client.publish(f"{self.root}/state", self._state(), qos=1, retain=True)

    def beat(self) -> None:
        self.seq += 1
        self.client.publish(
            f"{self.root}/heartbeat", json.dumps({"seq": self.seq, "t": self.seq * 0.5})
        )

    def start(self) -> None:
        self.client.connect(self.host, self.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho closes its wake-up socket pair only in __del__


async def test_driver_against_minimal_spec_emulator(mosquitto: MosquittoBroker) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    emu = SpecEnclosure(mosquitto.host, mosquitto.port, f"{prefix}/enclosure/box-9")
    await asyncio.to_thread(emu.start)
    try:
        async with instruments.connect(
            "enclosure", f"{mosquitto.url}/{prefix}", enclosure_id="box-9"
        ) as enc:
            state = await enc.wait_for_state(timeout=2)
            assert state == {"lid": "closed", "light_on": False, "intensity": 0.0, "uptime_s": 1.5}
            await until(lambda: enc.online is True, what="online")
            await enc.set_light(True, 0.25)
            await enc.wait_for_state(
                timeout=2, predicate=lambda s: s["light_on"] and s["intensity"] == 0.25
            )
            with pytest.raises(DeviceRejected, match="range"):
                await enc.set_light(True, 2.0)
            emu.beat()
            emu.beat()
            await until(lambda: enc.heartbeats == 2, what="2 heartbeats")
            reading = await enc.read()
            assert reading["heartbeat_seq"] == 2 and reading["light_on"] is True
        assert emu.light["on"] is False  # safe state on exit: light off
    finally:
        await asyncio.to_thread(emu.stop)


async def test_a_broker_url_with_credentials_is_used_by_the_simulator_and_the_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``labbridge sim --broker mqtt://user@host:port?password_env=VAR`` once failed: the
    enclosure simulator connected without the credentials (refused by the broker)."""
    from tests.conftest import require_mosquitto

    require_mosquitto()
    monkeypatch.setenv("LB_TEST_ENC_PASSWORD", "s3cret-enc")
    with MosquittoBroker(users={"dev": "s3cret-enc"}) as broker:
        url = f"mqtt://dev@{broker.host}:{broker.port}?password_env=LB_TEST_ENC_PASSWORD"
        b = await start_bench(url)
        try:
            assert b.sim.url.startswith(f"mqtt://dev@{broker.host}:{broker.port}/")
            assert (await b.enc.read())["lid"] in ("open", "closed")
        finally:
            await stop_bench(b)
        monkeypatch.delenv("LB_TEST_ENC_PASSWORD")
        with pytest.raises(ValueError, match="LB_TEST_ENC_PASSWORD .password_env. is not set"):
            EnclosureSim(make_world(), url)
