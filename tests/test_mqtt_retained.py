"""Retained requests on the MQTT API (docs/mqtt-api.md, "Queued and retained e-stops"), against
the real mosquitto of tests/test_mqtt_api.py with the docs' configuration and ACL:

* ``labbridge estop --clear-retained`` (the CLI, as a user runs it) clears a retained e-stop:
  a fresh subscriber gets no retained e-stop afterwards, and the clearing trips nothing;
* a ``campaigns/start`` published retained while the service is down (it would be acted on
  otherwise: it carries an expiry and the station is free) is not acted on when the service
  comes back: answered "not acted on", no campaign started, nothing journaled.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_mqtt_api import (  # noqa: F401  (docs_broker: the fixture)
    PASSWORDS,
    ROOT,
    DocsBroker,
    client,
    docs_broker,
    journal_campaigns,
    serving,
    small_program,
    until,
)

from bridge.labmqtt import mqtt_settings
from bridge.mqttapi import MqttApi


async def retained_estops(broker: DocsBroker, root: str) -> list[tuple[str, Any]]:
    """What a fresh subscriber to every e-stop topic gets at once: the retained e-stops."""
    with client(broker, "labbridge", loop=asyncio.get_running_loop()) as fresh:
        fresh.subscribe(f"{root}/estop/#")
        got = []
        with pytest.raises(TimeoutError):  # nothing more within 1 s: all retained ones came
            while True:
                topic, data, _ = await fresh.get(timeout=1.0)
                got.append((topic, data))
        return got


@pytest.mark.timeout(120)
async def test_estop_clear_retained_cli_clears_it_and_trips_nothing(
    ray_session: Any,
    docs_broker: DocsBroker,  # noqa: F811  (the fixture of tests/test_mqtt_api.py)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(tmp_path, docs_broker, "lab-clear", monkeypatch) as s:
        root, actor = s.root, s.service.actors["bench-a"]
        with client(docs_broker, "ana", loop=asyncio.get_running_loop()) as ana:
            ana.subscribe(f"{root}/replies/ana/#")
            ana.publish(
                f"{root}/estop/ana",
                {"reason": "retained by mistake"},
                response_topic=f"{root}/replies/ana/kept",
                retain=True,
            )
            _, kept, _ = await ana.get(lambda t, d: t.endswith("/kept"))
            assert kept["ok"] and kept["retained"] is True
        assert await retained_estops(docs_broker, root) == [
            (f"{root}/estop/ana", {"reason": "retained by mistake"})
        ]
        await s.service.reset("test", "before clearing it")
        assert not (await actor.status.remote())["tripped"]
        estops = len(s.service.estops)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ANA_PASSWORD": PASSWORDS["ana"]}
        argv = [sys.executable, "-m", "bridge.cli", "estop", "--clear-retained"]
        who = ["--lab", str(tmp_path / "lab.yaml"), "--user", "ana", "--password-env"]
        done = await asyncio.to_thread(
            subprocess.run,
            [*argv, *who, "ANA_PASSWORD"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            f"retained e-stop on {root}/estop/ana cleared (nothing was tripped)"
        )
        await until(lambda: s.api.counts.get("estop:cleared") == 1, 10, "the clearing")
        assert await retained_estops(docs_broker, root) == []
        assert len(s.service.estops) == estops  # the clearing was no e-stop
        assert not (await actor.status.remote())["tripped"]


@pytest.mark.timeout(120)
async def test_a_retained_start_sent_while_the_service_was_down_is_not_acted_on(
    ray_session: Any,
    docs_broker: DocsBroker,  # noqa: F811  (the fixture of tests/test_mqtt_api.py)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    async with serving(tmp_path, docs_broker, "lab-retained-start", monkeypatch) as s:
        root = s.root
        await s.api.detach()  # the service goes away; its persistent session stays
        await s.api.close("restart")
        with client(docs_broker, "lims", loop=loop) as lims:
            lims.subscribe(f"{root}/replies/lims/#")
            topic = f"{root}/campaigns/start/lims"
            lims.puback(
                lims.publish(  # an expiry (it may wait) and a free station: only retain stops it
                    topic,
                    {"id": "kept-1", "program": small_program(2)},
                    response_topic=f"{root}/replies/lims/kept-1",
                    expiry=60,
                    retain=True,
                )
            )
            api = MqttApi(mqtt_settings(s.lab), s.lab.bridge_id)
            await api.connect()  # queued and retained copies come back: both refused
            try:
                await api.attach(s.service)
                _, reply, _ = await lims.get(lambda t, d: t.endswith("/kept-1"), timeout=30)
                assert not reply["ok"], reply
                assert reply["errors"][0].startswith(
                    f"a retained message on {topic} is not acted on"
                )
                await asyncio.sleep(1.0)  # any other copy answered by now, and refused too
                while not lims.aq.empty():
                    _, payload, _ = lims.aq.get_nowait()
                    assert b'"ok": false' in payload or b'"ok":false' in payload, payload
                assert s.service.campaigns == {}
                assert not (await s.service.actors["bench-a"].status.remote())["tripped"]
                lims.puback(lims.publish(topic, b"", retain=True))  # clear it
                await api.detach()
            finally:
                await api.close("test over")
    assert journal_campaigns(tmp_path / "journal.db") == {}
