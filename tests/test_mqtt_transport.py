"""MqttTransport against a real mosquitto (and amqtt) on loopback.

Only two tests use a stand-in: a bare TCP server that answers CONNECT but
never acknowledges anything (or says nothing at all), because a real broker
cannot be made to withhold PUBACK/CONNACK on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports import transport_for
from instruments.transports.mqtt import MqttMessage, MqttTransport
from simulators.broker import EmbeddedBroker, MosquittoBroker, free_port, tls_tooling

PASSWORD = "s3cr#t:pw/é"  # needs URL-encoding inline


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[MqttTransport]:
    t = MqttTransport(url)
    await t.open()
    try:
        yield t
    finally:
        await t.close()


async def get(q: asyncio.Queue[MqttMessage], within: float = 2.0) -> MqttMessage:
    return await asyncio.wait_for(q.get(), within)


async def nothing(q: asyncio.Queue[MqttMessage], wait: float = 0.1) -> bool:
    await asyncio.sleep(wait)
    return q.empty()


@pytest.fixture(scope="module")
def secure_broker(mosquitto_bin: str) -> Iterator[MosquittoBroker]:
    """mosquitto with a user (anonymous refused) and, if certificates can be made, a TLS listener."""
    broker = MosquittoBroker(
        users={"alice": PASSWORD, "bob": "bobs-pw"},
        acl="user alice\ntopic readwrite #\n\nuser bob\ntopic read #\n",
        tls=tls_tooling() is not None,
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# ------------------------------------------------------------------ pub/sub
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_publish_subscribe_all_qos(mosquitto: MosquittoBroker, protocol: str) -> None:
    url = mosquitto.client_url(unique_prefix(), protocol=protocol)
    async with opened(url) as a, opened(url) as b:
        assert a.protocol == protocol
        q = await b.subscribe("data/#", qos=2)
        for qos in (0, 1, 2):
            await a.publish("data/x", f"hello {qos}", qos=qos)
            msg = await get(q)
            assert (msg.topic, msg.payload, msg.qos, msg.retain) == (
                "data/x",
                f"hello {qos}".encode(),
                qos,
                False,
            )
            assert msg.absolute_topic == f"{a.prefix}/data/x"


async def test_topic_filters_plus_and_hash(mosquitto: MosquittoBroker) -> None:
    async with opened(mosquitto.client_url(unique_prefix())) as t:
        plus = await t.subscribe("dev/+/temp")
        hash_ = await t.subscribe("dev/#")
        for topic in ("dev/a/temp", "dev/b/temp", "dev/a/rh", "dev/a/temp/raw"):
            await t.publish(topic, topic, qos=1)
        assert [(await get(plus)).topic for _ in range(2)] == ["dev/a/temp", "dev/b/temp"]
        assert [(await get(hash_)).topic for _ in range(4)] == [
            "dev/a/temp",
            "dev/b/temp",
            "dev/a/rh",
            "dev/a/temp/raw",
        ]
        assert await nothing(plus)
        # one queue for two overlapping filters gets each message once
        shared: asyncio.Queue[MqttMessage] = asyncio.Queue()
        await t.subscribe("x/+", queue=shared)
        await t.subscribe("x/#", queue=shared)
        await t.publish("x/1", "once", qos=1)
        assert (await get(shared)).payload == b"once"
        assert await nothing(shared)
        await t.unsubscribe("dev/#")
        await t.publish("dev/a/rh", "after", qos=1)
        assert await nothing(hash_)
        assert "dev/#" not in {f.split("/", 1)[1] for f in t.subscriptions}


async def test_prefix_relative_and_absolute_topics(mosquitto: MosquittoBroker) -> None:
    prefix = unique_prefix()
    async with opened(mosquitto.client_url(f"{prefix}/lab")) as t, opened(mosquitto.url) as root:
        assert t.topic("a/b") == f"{prefix}/lab/a/b"
        assert t.topic("/elsewhere/x") == "elsewhere/x"
        everything = await root.subscribe(f"{prefix}/#")
        inside = await t.subscribe("#")
        outside = await t.subscribe(f"/{prefix}/other")
        await t.publish("a/b", "rel", qos=1)
        await t.publish(f"/{prefix}/other", "abs", qos=1)
        got = {(await get(everything)).topic for _ in range(2)}
        assert got == {f"{prefix}/lab/a/b", f"{prefix}/other"}  # no prefix on the root link
        assert (await get(inside)).topic == "a/b"
        msg = await get(outside)
        assert (msg.topic, msg.absolute_topic) == (f"/{prefix}/other", f"{prefix}/other")
        with pytest.raises(ValueError, match="wildcards"):
            await t.publish("a/+", "x")


async def test_v5_properties_round_trip(mosquitto: MosquittoBroker) -> None:
    url = mosquitto.client_url(unique_prefix(), protocol="5")
    async with opened(url) as t:
        q = await t.subscribe("req", qos=1)
        props = {
            "response_topic": f"{t.prefix}/reply/42",
            "correlation_data": b"\x00\x01corr",
            "message_expiry_interval": 60,
            "content_type": "application/json",
            "user_properties": [("proposer", "agent-7")],
        }
        await t.publish("req", b"{}", qos=1, properties=props)
        msg = await get(q)
        assert msg.properties["response_topic"] == props["response_topic"]
        assert msg.properties["correlation_data"] == b"\x00\x01corr"
        assert 55 <= msg.properties["message_expiry_interval"] <= 60
        assert msg.properties["content_type"] == "application/json"
        assert ("proposer", "agent-7") in msg.properties["user_properties"]
        with pytest.raises(ValueError, match="unknown MQTT v5 property"):
            await t.publish("req", b"", properties={"expiry": 3})
    async with opened(mosquitto.client_url(unique_prefix(), protocol="3.1.1")) as t3:
        with pytest.raises(ValueError, match="need protocol 5"):
            await t3.publish("req", b"", properties={"message_expiry_interval": 1})


async def test_retained_messages(mosquitto: MosquittoBroker) -> None:
    url = mosquitto.client_url(unique_prefix())
    async with opened(url) as t:
        await t.publish("status", "online", qos=1, retain=True)
    async with opened(url) as t:
        q1 = await t.subscribe("status")
        msg = await get(q1)
        assert (msg.payload, msg.retain) == (b"online", True)
        q2 = await t.subscribe("status")  # a second queue on the same filter gets it too
        assert (await get(q2)).retain
        await t.publish("status", b"", qos=1, retain=True)  # clear it
    async with opened(url) as t:
        q = await t.subscribe("status")
        assert await nothing(q)


_WILL_CHILD = r"""
import asyncio, sys
from instruments.transports.mqtt import MqttTransport

async def main():
    t = MqttTransport(sys.argv[1])
    t.set_will("dev/status", "offline", qos=1, retain=True)
    await t.open()
    await t.publish("dev/status", "online", qos=1, retain=True)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_last_will_on_ungraceful_disconnect(mosquitto: MosquittoBroker) -> None:
    """A process holding the link is killed (no DISCONNECT): the broker publishes its Will."""
    url = mosquitto.client_url(unique_prefix())
    async with opened(url) as observer:
        q = await observer.subscribe("dev/status", qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WILL_CHILD, url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line.strip() == b"ready"
            assert (await get(q)).payload == b"online"
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the kernel just closes the socket
            assert (await get(q, 5)).payload == b"offline"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.wait_for(proc.communicate(), 10)  # reap it, drain and close the pipes
    async with opened(url) as late:  # the Will was retained
        q = await late.subscribe("dev/status")
        assert (await get(q)).payload == b"offline"


async def test_set_will_after_open_is_refused(mosquitto: MosquittoBroker) -> None:
    async with opened(mosquitto.client_url(unique_prefix())) as t:
        with pytest.raises(Exception, match="before open"):
            t.set_will("status", "offline")


# ---------------------------------------------------------------- reconnect
async def test_reconnect_and_resubscribe_after_broker_restart(
    fresh_mosquitto: MosquittoBroker,
) -> None:
    url = fresh_mosquitto.client_url(unique_prefix(), reconnect_min="0.05", reconnect_max="0.5")
    changes: list[bool] = []
    async with opened(url) as sub, opened(url) as pub:
        remove = sub.on_connection_change(changes.append)
        q = await sub.subscribe("a/#", qos=1)
        await pub.publish("a/1", "before", qos=1)
        assert (await get(q)).payload == b"before"
        fresh_mosquitto.restart()
        await asyncio.wait_for(_until(lambda: changes == [False, True]), 10)
        await asyncio.wait_for(pub.connected.wait(), 10)
        assert sub.reconnects == 1
        await pub.publish("a/2", "after", qos=1)  # reaches sub: it re-subscribed
        assert (await get(q, 5)).payload == b"after"
        remove()


async def _until(cond: Callable[[], bool], period: float = 0.01) -> None:
    while not cond():  # noqa: ASYNC110 - polling state that paho's thread changes
        await asyncio.sleep(period)


async def test_publish_while_broker_down_raises_link_lost(fresh_mosquitto: MosquittoBroker) -> None:
    url = fresh_mosquitto.client_url(
        unique_prefix(), timeout="0.3", reconnect_min="0.05", reconnect_max="0.2"
    )
    async with opened(url) as t:
        fresh_mosquitto._stop_process()  # down, and stays down
        await asyncio.wait_for(_until(lambda: not t.connected.is_set()), 5)
        with pytest.raises(LinkLostError, match="not connected"):
            await t.publish("x", "y", qos=1)
        fresh_mosquitto.start()
        await asyncio.wait_for(t.connected.wait(), 5)
        await t.publish("x", "y", qos=1)


# ------------------------------------------------------- credentials and TLS
async def test_credentials_env_file_and_inline(
    secure_broker: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("LB_TEST_MQTT_PW", PASSWORD)
    async with opened(
        secure_broker.client_url(unique_prefix(), user="alice", password_env="LB_TEST_MQTT_PW")
    ) as t:
        await t.publish("x", "y", qos=1)
    pw_file = tmp_path / "pw"
    pw_file.write_text(PASSWORD + "\n")
    async with opened(
        secure_broker.client_url(unique_prefix(), user="alice", password_file=str(pw_file))
    ) as t:
        await t.publish("x", "y", qos=1)
    from urllib.parse import quote

    inline = f"mqtt://alice:{quote(PASSWORD, safe='')}@127.0.0.1:{secure_broker.port}/p"
    with caplog.at_level(logging.DEBUG, logger="instruments.transports.mqtt"):
        async with opened(inline) as t:
            assert t.url == f"mqtt://alice:***@127.0.0.1:{secure_broker.port}/p"
            await t.publish("x", "y", qos=1)
    assert "prefer ?password_env" in caplog.text
    assert PASSWORD not in caplog.text and quote(PASSWORD, safe="") not in caplog.text


async def test_wrong_credentials_refused_clearly(
    secure_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LB_TEST_MQTT_PW", "wrong-password")
    url = secure_broker.client_url("p", user="alice", password_env="LB_TEST_MQTT_PW")
    t = MqttTransport(url)
    with pytest.raises(TransportOpenError, match="not authorised") as info:
        await t.open()
    assert url in str(info.value) and "wrong-password" not in str(info.value)
    assert not t.is_open
    await t.close()
    with pytest.raises(TransportOpenError, match="not authorised.*anonymous"):
        await MqttTransport(secure_broker.client_url("p")).open()
    with pytest.raises(TransportOpenError, match="LB_UNSET_VAR"):
        await MqttTransport(
            secure_broker.client_url("p", user="alice", password_env="LB_UNSET_VAR")
        ).open()


async def test_acl_refusal_is_reported_on_v5(
    secure_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob may only read (broker ACL): his QoS 1 publish is refused in the v5 PUBACK."""
    monkeypatch.setenv("LB_TEST_MQTT_PW", PASSWORD)
    monkeypatch.setenv("LB_TEST_BOB_PW", "bobs-pw")
    prefix = unique_prefix()
    alice_url = secure_broker.client_url(prefix, user="alice", password_env="LB_TEST_MQTT_PW")
    bob_url = secure_broker.client_url(prefix, user="bob", password_env="LB_TEST_BOB_PW")
    async with opened(alice_url) as alice, opened(bob_url) as bob:
        q = await bob.subscribe("news")
        await alice.publish("news", "for bob", qos=1)
        assert (await get(q)).payload == b"for bob"
        with pytest.raises(TransportError, match="refused the publish.*[Nn]ot authori"):
            await bob.publish("news", "from bob", qos=1)
        assert await nothing(q)


async def test_tls_with_ca_file(
    secure_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    if secure_broker.tls_port is None:
        pytest.skip(
            "cannot generate TLS certificates here: neither 'cryptography' nor the openssl CLI"
        )
    monkeypatch.setenv("LB_TEST_MQTT_PW", PASSWORD)
    url = secure_broker.client_url(
        unique_prefix(), tls=True, user="alice", password_env="LB_TEST_MQTT_PW"
    )
    assert url.startswith("mqtts://") and "ca=" in url
    async with opened(url) as t:
        q = await t.subscribe("secure")
        await t.publish("secure", "over TLS", qos=2)
        assert (await get(q)).payload == b"over TLS"
    # Without our CA (system CAs only) the broker's certificate is not trusted.
    untrusted = (
        f"mqtts://alice@127.0.0.1:{secure_broker.tls_port}/p?password_env=LB_TEST_MQTT_PW&timeout=2"
    )
    with pytest.raises(TransportOpenError, match="TLS|certificate"):
        await MqttTransport(untrusted).open()


# ------------------------------------------------------------- open / close
async def test_open_closed_port_names_url_without_password() -> None:
    url = f"mqtt://bob:hunter2@127.0.0.1:{free_port()}/lab?timeout=1"
    t = transport_for(url)
    assert isinstance(t, MqttTransport)
    with pytest.raises(TransportOpenError) as info:
        await t.open()
    message = str(info.value)
    assert "mqtt://bob:***@127.0.0.1" in message and "hunter2" not in message
    assert "cannot connect" in message
    await t.close()


async def test_close_is_idempotent(mosquitto: MosquittoBroker) -> None:
    never = MqttTransport(mosquitto.client_url("p"))
    await never.close()
    await never.close()
    t = MqttTransport(mosquitto.client_url(unique_prefix()))
    await t.open()
    await t.open()  # idempotent too
    await t.close()
    await t.close()
    assert not t.connected.is_set()
    with pytest.raises(LinkLostError):
        await t.publish("x", "y")
    await t.open()  # reopen after close works
    await t.publish("x", "y", qos=1)
    await t.close()


def test_url_validation() -> None:
    bad = {
        "mqtt://127.0.0.1:1883/p?colour=blue": "unknown option",
        "mqtt://127.0.0.1:1883/p?ca=/x.pem": "need mqtts",
        "mqtt://:pw@127.0.0.1:1883/p": "needs a user",
        "mqtt://u:pw@127.0.0.1:1883/p?password_env=X": "one way",
        "mqtt://127.0.0.1:1883/lab/+": "wildcards",
        "mqtt://127.0.0.1:99999/p": "port",
        "mqtt://127.0.0.1/p?protocol=4": "protocol",
        "mqtt:///p": "no broker host",
    }
    for url, problem in bad.items():
        with pytest.raises(InvalidURLError, match=problem):
            MqttTransport(url)
    t = MqttTransport("mqtts://u%40lab@broker.example/a/b/?keepalive=10&insecure=true")
    s = t.settings
    assert (s.username, s.host, s.port, t.prefix, s.keepalive, s.insecure) == (
        "u@lab",
        "broker.example",
        8883,
        "a/b",
        10,
        True,
    )


async def test_embedded_broker_falls_back_to_311() -> None:
    with EmbeddedBroker() as broker:
        async with opened(f"{broker.url}/lab") as t:  # protocol=auto
            assert t.protocol == "3.1.1"
            q = await t.subscribe("x")
            await t.publish("x", "y", qos=1)
            assert (await get(q)).payload == b"y"
        with pytest.raises(TransportOpenError, match="protocol=3.1.1"):
            await MqttTransport(f"{broker.url}/lab?protocol=5").open()


# ------------------------------------------- a broker that never answers
@contextlib.asynccontextmanager
async def silent_broker(connack: bool) -> AsyncIterator[int]:
    """A TCP server that reads everything and only ever sends a CONNACK (if ``connack``)."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await reader.read(1024)  # the CONNECT
            if connack:
                writer.write(b"\x20\x02\x00\x00")  # MQTT 3.1.1 CONNACK, accepted
                await writer.drain()
            while await reader.read(1024):
                pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the handlers see EOF and finish


async def test_no_connack_and_no_puback_time_out() -> None:
    async with silent_broker(connack=False) as port:
        with pytest.raises(TransportOpenError, match="no CONNACK"):
            await MqttTransport(f"mqtt://127.0.0.1:{port}/p?protocol=3.1.1&timeout=0.3").open()
    async with silent_broker(connack=True) as port:
        async with opened(f"mqtt://127.0.0.1:{port}/p?protocol=3.1.1&timeout=0.3") as t:
            await t.publish("x", "qos0 needs no ack")
            with pytest.raises(TransportTimeout, match="no PUBACK"):
                await t.publish("x", "y", qos=1)


def test_no_password_in_repr() -> None:
    t = MqttTransport("mqtt://u:topsecret@127.0.0.1:1/p")
    assert "topsecret" not in repr(t) and "topsecret" not in t.url
