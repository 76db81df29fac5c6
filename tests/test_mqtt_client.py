"""The shared MQTT client (instruments/transports/mqttclient.py) on its own, against a real mosquitto.

The transport's and the campaign API's tests cover what they build on it; these
cover what only the shared client does: its settings, a persistent session's
queued messages (``unrouted``), and ``publish(wait=False)`` across a broker restart.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from instruments.errors import LinkLostError, TransportOpenError
from instruments.transports.mqttclient import MqttClient, MqttMessage, MqttSettings
from simulators.broker import MosquittoBroker


def unique() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_settings_password_sources_and_no_secret_in_url_or_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = MqttSettings("broker.lab", 8883, tls=True, username="svc", inline_password="hunter2")
    assert s.password() == "hunter2" and s.url == "mqtts://svc@broker.lab:8883"
    assert "hunter2" not in repr(s)
    monkeypatch.setenv("LB_TEST_CLIENT_PW", "from-env")
    assert (
        MqttSettings("h", username="u", password_env="LB_TEST_CLIENT_PW").password() == "from-env"
    )
    (tmp_path / "pw").write_text("from-file\nignored\n")
    assert MqttSettings("h", username="u", password_file=tmp_path / "pw").password() == "from-file"
    assert MqttSettings("h").password() is None
    with pytest.raises(TransportOpenError, match="cannot read password_file"):
        MqttSettings("h", username="u", password_file=tmp_path / "missing").password()
    with pytest.raises(ValueError, match="protocol must be auto, 5 or 3.1.1"):
        MqttSettings("h", protocol="4")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_persistent_sessions_queued_messages_reach_unrouted(
    mosquitto: MosquittoBroker, protocol: str
) -> None:
    """Queued QoS 1 messages arrive right after the CONNACK, before any subscription is
    made again: they go to ``unrouted`` (the campaign API's single queue)."""
    prefix = unique()
    session = MqttSettings(
        "127.0.0.1", mosquitto.port, client_id=unique(), protocol=protocol, session_expiry_s=60
    )
    away = MqttClient(session, prefix=prefix)
    await away.connect()
    await away.subscribe("x/#", qos=1)
    await away.disconnect()
    publisher = MqttClient(MqttSettings("127.0.0.1", mosquitto.port), prefix=prefix)
    await publisher.connect()
    try:
        await publisher.publish("x/1", "while away", qos=1)
    finally:
        await publisher.disconnect()
    back = MqttClient(session, prefix=prefix)
    back.unrouted = asyncio.Queue()
    await back.connect()
    try:
        msg: MqttMessage = await asyncio.wait_for(back.unrouted.get(), 5)
        assert (msg.topic, msg.absolute_topic, msg.payload) == (
            "x/1",
            f"{prefix}/x/1",
            b"while away",
        )
        assert msg.received > 0 and not msg.expired()
    finally:
        back.settings = MqttSettings("127.0.0.1", mosquitto.port, client_id=session.client_id)
        await back.disconnect()
    # clean up the broker's session: a clean connect with the same id ends it
    await back.connect()
    await back.disconnect()


async def test_publish_without_wait_is_sent_after_the_reconnect(
    fresh_mosquitto: MosquittoBroker,
) -> None:
    settings = MqttSettings(
        "127.0.0.1", fresh_mosquitto.port, timeout_s=2, reconnect_min_s=0.05, reconnect_max_s=0.2
    )
    prefix = unique()
    pub = MqttClient(settings, prefix=prefix)
    await pub.connect()
    try:
        fresh_mosquitto._stop_process()
        await asyncio.wait_for(_until_not(pub.connected), 5)
        with pytest.raises(LinkLostError, match="not connected"):
            await pub.publish("kept", "x", qos=1, timeout=0.2)
        await pub.publish("kept", "queued by paho", qos=1, retain=True, wait=False)
        fresh_mosquitto.start()
        await asyncio.wait_for(pub.connected.wait(), 5)
        sub = MqttClient(settings, prefix=prefix)
        await sub.connect()
        try:
            got = None
            for _ in range(20):  # paho sends the kept message right after its reconnect
                q = await sub.subscribe("kept", qos=1)
                try:
                    got = await asyncio.wait_for(q.get(), 0.25)
                    break
                except TimeoutError:
                    await sub.unsubscribe("kept")
            assert got is not None and got.payload == b"queued by paho" and got.retain
        finally:
            await sub.disconnect()
    finally:
        await pub.disconnect()
    with pytest.raises(LinkLostError, match="closed"):
        await pub.publish("kept", "after close", qos=1, wait=False)


async def _until_not(event: asyncio.Event) -> None:
    while event.is_set():  # noqa: ASYNC110 - paho's thread clears it through the loop
        await asyncio.sleep(0.01)
