"""Notifications (bridge/notify.py): people are told when the lab needs them, through real
receivers on 127.0.0.1: an HTTP server that records the webhooks' POSTs (and can answer 500),
an SMTP server with TLS and a login (aiosmtpd, on the test's event loop), and the mosquitto
broker's retained alert topics seen by a subscriber that connects afterwards.

The lab: a simulated bench served by ``labbridge serve``'s own :func:`bridge.mqttserve.serve`
(the session's Ray). A trip (the enclosure stops its heartbeat) reaches the webhook, the
mailbox and the retained MQTT alert; a dead webhook is tried ``attempts`` times, its alerts
dropped and counted, and an e-stop goes through all the same (seen on the simulators' wire).
Without a lab: a burst folds into one message per window, a failing receiver is retried
until it answers, a refused login is not retried, and config errors are one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from docpages import blocks, run_script, strays, write_files
from test_mqtt_api import GOOD, client, full_storm, safe_state_storm, small_program, until

from bridge.labconfig import LabConfigError, load_lab
from bridge.labmqtt import mqtt_settings
from bridge.mqttserve import serve
from bridge.notify import Notifier
from bridge.notifyconfig import NotifyConfig, WebhookConfig
from bridge.notifysend import Alert
from bridge.simbench import sim_lab_yaml
from simulators.bench import SimulatedLab
from simulators.broker import make_test_certificates

SPEED = 500.0
SMTP_USER, SMTP_PASSWORD = "labbridge", "mail-for-the-lab"
#: how long a receiver may take to see what the lab did (generous: a loaded 2-core CI)
SEEN_S = 60.0


# ------------------------------------------------------------------ receivers
class Receiver:
    """An HTTP server on 127.0.0.1 that records the JSON POSTed to it, answering the
    ``statuses`` given first (e.g. 500, 500) and then ``default``."""

    def __init__(self, statuses: tuple[int, ...] = (), default: int = 200) -> None:
        self.statuses = list(statuses)
        self.default = default
        self.hits = 0
        self.bodies: list[dict[str, Any]] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await reader.readline():  # the request line (keep-alive: several per socket)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    key, _, value = line.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.hits += 1
                status = self.statuses.pop(0) if self.statuses else self.default
                if status == 200:
                    self.bodies.append(json.loads(body))
                said = b"ok" if status == 200 else b"receiver down for the test"
                writer.write(
                    f"HTTP/1.1 {status} Test\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(said)}\r\n\r\n".encode()
                    + said
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def kinds(self) -> list[str]:
        return [b["kind"] for b in self.bodies]

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks/secret-key"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()


class Mailbox:
    """aiosmtpd on 127.0.0.1 with TLS (STARTTLS required, or implicit) and a login."""

    def __init__(self, certs: tuple[Path, Path, Path], *, implicit: bool = False) -> None:
        _, crt, key = certs
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(str(crt), str(key))
        self.implicit = implicit
        self.messages: list[email.message.EmailMessage] = []
        self.logins: list[tuple[bytes, bool]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        self.messages.append(msg)
        return "250 OK"

    def _auth(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == SMTP_USER.encode()
            and data.password == SMTP_PASSWORD.encode()
        )
        self.logins.append((data.login if isinstance(data, LoginPassword) else b"?", ok))
        return AuthResult(success=ok, handled=False, auth_data=data)  # 235 or 535

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]

    async def __aenter__(self) -> Mailbox:
        def protocol() -> SMTP:
            return SMTP(
                self,
                hostname="127.0.0.1",
                tls_context=None if self.implicit else self.tls,
                require_starttls=not self.implicit,
                auth_required=True,
                auth_require_tls=not self.implicit,  # implicit: the whole session is TLS
                authenticator=self._auth,
            )

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, "127.0.0.1", 0, ssl=self.tls if self.implicit else None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def secret(path: Path, data: dict[str, str]) -> Path:
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path, Path]:
    folder = tmp_path / "tls"
    folder.mkdir()
    return make_test_certificates(folder)


def notifications_yaml(**sections: Any) -> str:
    """lab.yaml's ``notifications:`` section from plain data (JSON is YAML)."""
    return f"notifications: {json.dumps(sections)}\n"


@contextlib.asynccontextmanager
async def notifier(config: NotifyConfig, drain_s: float = 5.0) -> AsyncIterator[Notifier]:
    n = Notifier(config, "test-lab", page_url=lambda: "http://127.0.0.1:8765/")
    await n.start()
    try:
        yield n
    finally:
        await n.close(drain_s)


def trip(station: str, reason: str = "enclosure-heartbeat-stale") -> dict[str, Any]:
    """What the notifier's station watch reports for a newly tripped station."""
    return {"event": "_tripped", "station": station, "reason": reason}


# ----------------------------------------------------------------- the served lab
@pytest.mark.timeout(180)
async def test_a_trip_on_the_bench_reaches_the_webhook_mailbox_and_retained_mqtt_alert_and_a_dead_webhook_blocks_nothing(
    ray_session: Any, mosquitto: Any, certs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    async with (
        Receiver() as chat,
        Receiver(default=500) as dead,
        Mailbox(certs) as mailbox,
        SimulatedLab(stations=1, speed=SPEED) as sim,
    ):
        path = tmp_path / "lab.yaml"
        settings = {
            "page_url": "http://lab-pc.example.org:8765/",
            "rate_limit_s": 300,
            "attempts": 3,
            "retry_s": 0.2,
            "timeout_s": 5,
            "station_poll_s": 0.2,
            "webhooks": {
                "chat": {"url_file": "chat.secret"},
                "dead": {"url": dead.url, "events": ["trip", "estop"]},
            },
            "email": {
                "oncall": {
                    "host": "127.0.0.1",
                    "port": mailbox.port,
                    "tls": "starttls",
                    "ca": str(certs[0]),
                    "from": "labbridge@lab.example.org",
                    "to": ["ana@lab.example.org"],
                    "username": SMTP_USER,
                    "password_file": "smtp.secret",
                    "events": ["trip"],
                    "stations": ["bench-a"],
                }
            },
            "mqtt": {"topic": "alerts"},
        }
        secret(tmp_path / "chat.secret", {"url": chat.url})
        secret(tmp_path / "smtp.secret", {"password": SMTP_PASSWORD})
        path.write_text(
            sim_lab_yaml(sim, tmp_path / "journal.db", bridge_id="notify-lab")
            + f"mqtt: {{url: '{mosquitto.url}', status_interval_s: 0.5}}\n"
            + notifications_yaml(**settings)
        )
        lab = load_lab(path)
        assert lab.check() == []  # the secret files are private and complete
        stop = asyncio.Event()
        online: asyncio.Future[tuple[Any, Any]] = loop.create_future()
        served = asyncio.create_task(
            serve(
                lab,
                mqtt_settings(lab),
                stop=stop,
                handle_signals=False,
                on_online=lambda api, service: online.set_result((api, service)),
            )
        )
        try:
            async with asyncio.timeout(SEEN_S):
                api, service = await asyncio.shield(online)
            # --- an e-stop goes through while the dead webhook fails: seen on the wire
            t0 = time.monotonic()
            report = await service.estop("notification test", who="ana")
            assert report["ok"] and report["stations"]["bench-a"]["ok"], report
            await until(lambda: full_storm(safe_state_storm(sim, t0)), SEEN_S, "the safe state")
            await until(lambda: "estop" in chat.kinds(), SEEN_S, "the e-stop at the webhook")
            estop = chat.bodies[chat.kinds().index("estop")]
            assert estop["text"].startswith("[notify-lab] e-stop by ana: notification test")
            assert estop["url"] == "http://lab-pc.example.org:8765/#/lab", estop
            assert estop["stations"] == ["bench-a"] and estop["bridge_id"] == "notify-lab"
            # --- the dead webhook: tried 3 times, then given up, counted
            counts = served_counts(api)
            await until(lambda: counts["dead"].dropped == 1, SEEN_S, "the dead webhook's drop")
            assert dead.hits == 3 and counts["dead"].failed_attempts == 3
            assert "answered HTTP 500" in (counts["dead"].last_error or "")
            assert "secret-key" not in (counts["dead"].last_error or "")  # the URL's key
            assert mailbox.messages == []  # the e-mail channel takes trips only
            await service.reset("ana", "e-stop checked: notification test")
            # --- an agent's proposal awaits approval; the campaign is aborted (its trip is
            # the abort's, told as the campaign's end, not as a trip)
            program = small_program(20).replace("---\n", "---\napproval: human\n", 1)
            assert (await service.start_campaign("appr-1", program, who="ana")).accepted
            receipt = await service.propose("appr-1", GOOD, "agent:alice")
            assert receipt.approval is not None, receipt
            await until(lambda: "approval" in chat.kinds(), SEEN_S, "the approval at the webhook")
            waiting = chat.bodies[chat.kinds().index("approval")]
            assert waiting["title"].startswith(
                f"proposal {receipt.experiment_id} by agent:alice in campaign appr-1 awaits "
                "approval"
            ), waiting
            assert waiting["url"].endswith("/#/campaign/appr-1") and waiting["stations"] == [
                "bench-a"
            ]
            await service.control("appr-1", "abort", who="ana", reason="notification test")
            await service.wait_campaign("appr-1")
            await until(lambda: "campaign" in chat.kinds(), SEEN_S, "the campaign's end")
            ended = chat.bodies[chat.kinds().index("campaign")]
            assert ended["title"] == "campaign appr-1 aborted: notification test", ended
            # --- reset, then a trip on the bench: the enclosure stops its heartbeat
            await service.reset("ana", "abort checked: notification test")
            assert not (await service.status())["stations"]["bench-a"]["tripped"]
            assert "trip" not in chat.kinds()  # the e-stop's and the abort's trips: not trips
            sim.stations[0].inject_fault("heartbeat-stop", device="enclosure")
            await until(lambda: "trip" in chat.kinds(), SEEN_S, "the trip at the webhook")
            tripped = chat.bodies[chat.kinds().index("trip")]
            assert tripped["title"].startswith("station bench-a tripped: "), tripped
            assert "heartbeat" in tripped["title"], tripped
            await until(lambda: mailbox.messages != [], SEEN_S, "the trip in the mailbox")
            mail = mailbox.messages[0]
            assert mail["Subject"].startswith("[labbridge notify-lab] station bench-a tripped")
            assert mail["To"] == "ana@lab.example.org"
            assert "http://lab-pc.example.org:8765/#/lab" in mail.get_content()
            assert mailbox.logins == [(SMTP_USER.encode(), True)]
            await until(lambda: counts["mqtt"].sent == 4, SEEN_S, "the MQTT alerts")
            # --- a subscriber that connects afterwards sees the retained alerts
            with client(mosquitto, None, loop=loop) as watcher:
                watcher.subscribe("labbridge/notify-lab/alerts/#")
                seen = {}
                for _ in range(4):
                    topic, data, _ = await watcher.get(timeout=SEEN_S)
                    seen[topic] = data
            assert seen["labbridge/notify-lab/alerts/trip"]["title"] == tripped["title"]
            assert seen["labbridge/notify-lab/alerts/estop"]["kind"] == "estop"
            assert seen["labbridge/notify-lab/alerts/approval"]["title"] == waiting["title"]
            assert seen["labbridge/notify-lab/alerts/campaign"]["title"] == ended["title"]
            await until(lambda: counts["dead"].dropped == 2, SEEN_S, "the trip's drop")
            assert counts["chat"].dropped == counts["oncall"].dropped == 0
        finally:
            stop.set()
            await asyncio.wait_for(served, SEEN_S)
        assert served.result().startswith("shut down")


@pytest.mark.timeout(240)
async def test_labbridge_sim_keep_running_with_notify_tells_the_webhook_and_mailbox_of_a_trip(
    ray_session: Any, certs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The issue's "done when": ``labbridge sim --keep-running --notify notify.yaml`` and a
    trip on the simulated bench (``--fault heartbeat-stop``) reaches the webhook and the
    mailbox, each linking to the page that sim serves."""
    async with Receiver() as chat, Mailbox(certs) as mailbox:
        secret(tmp_path / "smtp.secret", {"password": SMTP_PASSWORD})
        (tmp_path / "notify.yaml").write_text(
            notifications_yaml(
                station_poll_s=0.2,
                webhooks={"chat": {"url": chat.url, "events": ["trip"]}},
                email={
                    "oncall": {
                        "host": "127.0.0.1",
                        "port": mailbox.port,
                        "ca": str(certs[0]),
                        "from": "labbridge@lab.example.org",
                        "to": ["ana@lab.example.org"],
                        "username": SMTP_USER,
                        "password_file": "smtp.secret",  # relative to notify.yaml
                        "events": ["trip"],
                    }
                },
            )
        )
        (tmp_path / "program.md").write_text(small_program(2))
        argv = [
            sys.executable, "-m", "bridge.cli", "sim", "--keep-running",
            "--notify", str(tmp_path / "notify.yaml"), "--fault", "heartbeat-stop",
            "--campaign", str(tmp_path / "program.md"), "--speed", str(SPEED),
            "--web", "127.0.0.1:0", "--out", str(tmp_path / "run"), "--no-progress",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(sys.path),
            "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        }
        with open(tmp_path / "sim.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
            try:
                said = lambda: (tmp_path / "sim.log").read_text(errors="replace")  # noqa: E731
                await until(lambda: "trip" in chat.kinds(), SEEN_S * 2, "the trip at the webhook")
                await until(lambda: mailbox.messages != [], SEEN_S, "the trip in the mailbox")
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
                await asyncio.wait_for(proc.wait(), SEEN_S)
        tripped = chat.bodies[0]
        assert tripped["title"].startswith("station bench-a tripped: "), (tripped, said())
        assert "heartbeat" in tripped["title"], tripped
        page = re.search(r"the lab page: (http://127\.0\.0\.1:\d+/)", said())
        assert page is not None, said()
        assert tripped["url"] == f"{page.group(1)}#/lab", (tripped, said())
        assert mailbox.messages[0]["Subject"].startswith(
            "[labbridge labbridge-sim] station bench-a"
        )
        assert f"The lab page: {page.group(1)}#/lab" in mailbox.messages[0].get_content()
        written = load_lab(tmp_path / "run" / "lab.yaml").notifications
        assert written is not None and written.email[0].password_file == tmp_path / "smtp.secret"


def served_counts(api: Any) -> Any:
    """The counts of the notifier serve() runs for the service."""
    assert api.notifier is not None
    return api.notifier.counts


# ------------------------------------------------------------------ without a lab
async def test_a_burst_folds_into_one_message_per_channel_and_kind_and_filters_hold() -> None:
    async with Receiver() as everything, Receiver() as only_b:
        config = NotifyConfig(
            rate_limit_s=3600,  # nothing but the first passes until the notifier closes
            webhooks=(
                WebhookConfig("all", url=everything.url),
                WebhookConfig(
                    "bench-b",
                    url=only_b.url,
                    events=frozenset({"trip"}),
                    stations=frozenset({"bench-b"}),
                ),
            ),
        )
        async with notifier(config) as n:
            for i in range(6):
                n.on_event(trip(f"bench-{'ab'[i % 2]}", f"monitor {i}"))
            n.on_event(
                {"event": "estop", "who": "ana", "reason": "smoke", "stations": {"bench-a": {}}}
            )
            await until(
                lambda: len(everything.bodies) == 2, SEEN_S, "the first trip and the e-stop"
            )
            await until(lambda: len(only_b.bodies) == 1, SEEN_S, "bench-b's first trip")
            assert everything.kinds() == ["trip", "estop"]  # another kind: not held by trips
            assert everything.bodies[0]["folded"] == 0
            assert everything.bodies[0]["title"] == "station bench-a tripped: monitor 0"
        # closing sends what the windows held: one message each, saying how many
        assert len(everything.bodies) == 3 and len(only_b.bodies) == 2
        folded = everything.bodies[2]
        assert folded["kind"] == "trip" and folded["folded"] == 5, folded
        assert folded["title"].startswith("5 trips since "), folded
        assert "station bench-b tripped: monitor 5" in folded["title"]
        assert folded["stations"] == ["bench-b", "bench-a"]
        assert folded["url"] == "http://127.0.0.1:8765/#/lab"
        assert only_b.bodies[1]["folded"] == 2 and only_b.bodies[1]["stations"] == ["bench-b"]
        assert n.counts["all"].sent == 3 and n.counts["all"].folded == 5
        assert n.counts["all"].dropped == n.counts["bench-b"].dropped == 0


async def test_a_station_back_in_its_campaign_is_told_and_a_channel_may_leave_it_out() -> None:
    """The event CampaignLease.rejoin emits (``serve --rejoin``: the node of a dead station
    is back) is a ``station_back`` alert; a channel without that kind is not told."""
    async with Receiver() as everything, Receiver() as lost_only:
        config = NotifyConfig(
            webhooks=(
                WebhookConfig("all", url=everything.url),
                WebhookConfig("lost", url=lost_only.url, events=frozenset({"station_lost"})),
            ),
        )
        async with notifier(config) as n:
            why = "its node is back: recovered by ana (drained 3.1 mL)"
            n.on_event(
                {
                    "event": "station",
                    "campaign_id": "c1",
                    "station": "bench-b",
                    "state": "out",
                    "reason": "station bench-b lost, taken as died: node died",
                }
            )
            n.on_event(
                {
                    "event": "station",
                    "campaign_id": "c1",
                    "station": "bench-b",
                    "state": "rejoined",
                    "reason": why,
                }
            )
            await until(lambda: len(everything.bodies) == 2, SEEN_S, "the loss and the return")
            await until(lambda: len(lost_only.bodies) == 1, SEEN_S, "the loss")
        assert everything.kinds() == ["station_lost", "station_back"]
        back = everything.bodies[1]
        assert back["title"] == f"station bench-b is back in campaign c1: {why}", back
        assert back["stations"] == ["bench-b"] and back["url"].endswith("#/campaign/c1")
        assert lost_only.kinds() == ["station_lost"]


async def test_a_failing_receiver_is_retried_until_it_answers_and_a_full_queue_drops_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Receiver(statuses=(500, 503)) as flaky, Receiver(default=500) as dead:
        config = NotifyConfig(
            rate_limit_s=0,
            attempts=4,
            retry_s=0.01,
            webhooks=(WebhookConfig("flaky", url=flaky.url), WebhookConfig("dead", url=dead.url)),
        )
        ended = {
            "event": "campaign",
            "campaign_id": "c1",
            "state": "done",
            "reason": "target reached",
        }
        async with notifier(config) as n:
            n.on_event(ended)
            await until(lambda: n.counts["flaky"].sent == 1, SEEN_S, "the flaky receiver's message")
            assert flaky.hits == 3 and n.counts["flaky"].failed_attempts == 2
            assert flaky.bodies[0]["title"] == "campaign c1 done: target reached"
            assert flaky.bodies[0]["url"] == "http://127.0.0.1:8765/#/campaign/c1"
            await until(lambda: n.counts["dead"].dropped == 1, SEEN_S, "the dead receiver's drop")
            assert dead.hits == 4 and n.counts["dead"].failed_attempts == 4
            assert n.counts["dead"].last_error is not None
            assert "answered HTTP 500 (receiver down for the test)" in n.counts["dead"].last_error
        # a burst while a dead receiver's worker waits to retry: two queued, the rest dropped
        config = NotifyConfig(
            rate_limit_s=0,
            attempts=3,
            retry_s=600,
            queue_size=2,
            webhooks=(WebhookConfig("dead", url=dead.url),),
        )
        async with notifier(config, drain_s=0.1) as n:
            for i in range(6):
                n.on_event({**ended, "campaign_id": f"b{i}", "state": "stopped"})
            await until(lambda: n.counts["dead"].dropped >= 4, SEEN_S, "the full queue's drops")
        said = "dead: 1 alert(s) dropped: its queue is full (2 waiting): campaign alert not sent: "
        assert f"{said}campaign b5 stopped: target reached" in caplog.text
        # closing gives up on what it still has (one retrying, one queued): counted, not silent
        assert n.counts["dead"].dropped == 6 and n.counts["dead"].sent == 0


async def test_the_station_watch_tells_a_lost_station_once_and_skips_trips_by_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the watch makes of the service's station statuses (as ``LabService.status()``
    gives them), and a full intake: dropped, counted, logged."""
    async with Receiver() as chat:
        config = NotifyConfig(rate_limit_s=0, webhooks=(WebhookConfig("chat", url=chat.url),))
        async with notifier(config) as n:
            lost = {"ok": False, "error": "RayActorError: the actor died unexpectedly"}
            by_request = {"ok": True, "tripped": True, "trip": {"reason": "abort", "source": "api"}}
            monitor = {"reason": "hotplate-overtemp: 95.0 > 90", "source": "hotplate-overtemp"}
            for st in (lost, lost, {"ok": True}, by_request, {"ok": True}):
                n._look("bench-a", st)
            n._look("bench-a", {"ok": True, "tripped": True, "trip": monitor})
            n._look("bench-a", {"ok": True, "tripped": True, "trip": monitor})  # still latched
            await until(lambda: len(chat.bodies) == 2, SEEN_S, "the lost station and the trip")
            for _ in range(1001):  # before the router runs: one more than the intake holds
                n.on_event({"event": "reset"})
            assert n.intake_dropped == 1
        assert [b["title"] for b in chat.bodies] == [
            "the service lost station bench-a: RayActorError: the actor died unexpectedly",
            "station bench-a tripped: hotplate-overtemp: 95.0 > 90",
        ]
        assert chat.kinds() == ["station_lost", "trip"]
        assert (
            "notifications: dropped a reset event: 1000 events wait for the router" in caplog.text
        )


# aiosmtpd cannot tell that an implicit-TLS session is TLS: it warns about AUTH without TLS
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_email_over_implicit_tls_and_a_refused_login_is_not_retried(
    certs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    async with Mailbox(certs, implicit=True) as mailbox:
        password = secret(tmp_path / "smtp.secret", {"password": SMTP_PASSWORD})
        lab = tmp_path / "lab.yaml"
        lab.write_text(
            "stations:\n  bench-a:\n    instruments:\n"
            "      - {name: hotplate, kind: hotplate, url: 'modbus-tcp://127.0.0.1:5020?unit=1'}\n"
            + notifications_yaml(
                rate_limit_s=0,
                attempts=3,
                retry_s=0.01,
                email={
                    "oncall": {
                        "host": "127.0.0.1",
                        "port": mailbox.port,
                        "tls": "implicit",
                        "ca": str(certs[0]),
                        "from": "labbridge@lab.example.org",
                        "to": ["ana@lab.example.org", "ben@lab.example.org"],
                        "username": SMTP_USER,
                        "password_file": str(password),
                    }
                },
            )
        )
        config = load_lab(lab).notifications
        assert config is not None and config.email[0].port == mailbox.port
        async with notifier(config) as n:
            n.on_event(
                {
                    "event": "awaiting_approval",
                    "campaign_id": "c2",
                    "experiment_id": "c2-7",
                    "proposer": "agent:alice",
                    "rules": ["temperature_c > 60"],
                }
            )
            await until(lambda: n.counts["oncall"].sent == 1, SEEN_S, "the approval mail")
            mail = mailbox.messages[0]
            assert mail["To"] == "ana@lab.example.org, ben@lab.example.org"
            assert "proposal c2-7 by agent:alice in campaign c2 awaits approval" in mail["Subject"]
            assert "The lab page: http://127.0.0.1:8765/#/campaign/c2" in mail.get_content()
            # the password changes on disk (read again): a refused login is not retried
            secret(password, {"password": "not-the-password"})
            n.on_event(
                {
                    "event": "station",
                    "campaign_id": "c2",
                    "station": "bench-a",
                    "state": "out",
                    "reason": "the station's actor died",
                }
            )
            await until(lambda: n.counts["oncall"].dropped == 1, SEEN_S, "the refused login")
            assert n.counts["oncall"].failed_attempts == 1
            assert "refused the login of labbridge" in (n.counts["oncall"].last_error or "")
            assert mailbox.logins[-1] == (SMTP_USER.encode(), False)
            assert len(mailbox.messages) == 1


# -------------------------------------------------------------------- config
BASE = (
    "stations:\n  bench-a:\n    instruments:\n"
    "      - {name: hotplate, kind: hotplate, url: 'modbus-tcp://127.0.0.1:5020?unit=1'}\n"
)
BAD = [
    (
        "notifications:\n  webhooks:\n    chat: {url: 'ftp://x'}\n",
        "lab.yaml:7: notifications.webhooks.chat.url: 'ftp://x' is not an http:// or https:// URL",
    ),
    (
        "notifications:\n  email:\n    oncall:\n      host: smtp.example.org\n      tls: plain\n"
        "      from: a@b.org\n      to: [c@d.org]\n",
        "lab.yaml:9: notifications.email.oncall.tls: must be starttls (port 587), implicit "
        "(port 465) or none, got 'plain'",
    ),
    (
        "notifications:\n  email:\n    oncall:\n      host: smtp.example.org\n      tls: none\n"
        "      from: a@b.org\n      to: [c@d.org]\n",
        "lab.yaml:9: notifications.email.oncall.tls: plain SMTP would send the password",
    ),
    (
        "notifications:\n  email:\n    oncall: {host: h.org, from: a@b.org, to: [c@d.org], "
        "username: u, password: hunter2}\n",
        "lab.yaml:7: notifications.email.oncall.password: secrets are never inline",
    ),
    (
        "notifications:\n  mqtt: {events: [trip, tripped]}\n",
        "lab.yaml:6: notifications.mqtt.events[1]: unknown event kind 'tripped' (kinds: trip, "
        "estop, station_lost, station_back, campaign, approval, verification, budget)",
    ),
    (
        "notifications:\n  webhooks:\n    chat: {url: 'https://x.org/h', stations: [bench-z]}\n",
        "lab.yaml:7: notifications.webhooks.chat.stations[0]: no station 'bench-z' in this lab",
    ),
    (
        "notifications:\n  rate_limit_s: -1\n",
        "lab.yaml:6: notifications.rate_limit_s: must be a number >= 0 (seconds), got -1",
    ),
    (
        "notifications:\n  retries: 3\n",
        "lab.yaml:6: notifications.retries: unknown field 'retries' (known: page_url, ",
    ),
]


@pytest.mark.parametrize("section,said", BAD, ids=[s.split("\n")[1].strip() for s, _ in BAD])
def test_a_bad_notifications_section_is_one_clear_line_naming_the_field(
    section: str, said: str, tmp_path: Path
) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(BASE + section)
    with pytest.raises(LabConfigError) as err:
        load_lab(path)
    message = str(err.value).replace(str(tmp_path) + "/", "")
    assert "\n" not in message and message.startswith(said), message


def test_labbridge_check_reports_the_section_its_secret_files_and_a_missing_mqtt_link(
    tmp_path: Path,
) -> None:
    lab = (Path(__file__).resolve().parents[1] / "examples" / "lab-hardware.yaml").read_text()
    path = tmp_path / "lab.yaml"
    open_secret = tmp_path / "smtp.secret"
    open_secret.write_text(json.dumps({"password": "x"}))
    open_secret.chmod(0o644)
    path.write_text(
        lab
        + notifications_yaml(
            email={
                "oncall": {
                    "host": "smtp.example.org",
                    "from": "a@b.org",
                    "to": ["c@d.org"],
                    "username": "u",
                    "password_file": "smtp.secret",
                }
            },
            webhooks={"chat": {"url_file": "chat.secret"}},
            mqtt={},
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def check() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "bridge.cli", "check", str(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)

    done = check()
    assert done.returncode == 1, done
    problems = [line for line in done.stderr.splitlines() if "notifications." in line]
    assert len(problems) == 2, done.stderr
    assert (
        f"notifications.email.oncall.password_file: the secret file {open_secret} is "
        "accessible to others (mode 0644): chmod 600" in problems[1]
    )
    assert (
        f"notifications.webhooks.chat.url_file: no secret file {tmp_path / 'chat.secret'}"
        in problems[0]
    )
    assert "no mqtt.url" not in done.stdout  # the example's service has its MQTT link
    notes = load_lab(path).notifications.check(has_mqtt=False)[1]  # type: ignore[union-attr]
    assert any("notifications.mqtt: this lab.yaml has no mqtt.url" in n for n in notes), notes
    assert (
        "notifications: e-mail oncall via smtp.example.org:587 (starttls) to c@d.org" in done.stdout
    )
    open_secret.chmod(0o600)
    secret(tmp_path / "chat.secret", {"url": "https://chat.example.org/hooks/k"})
    done = check()
    assert done.returncode == 0 and "OK" in done.stdout, done


# ---------------------------------------------------------------------- docs
@pytest.mark.timeout(120)
def test_the_notifications_page_runs_as_written(tmp_path: Path) -> None:
    page = "notifications.md"
    assert not strays(page), strays(page)
    written = {p.name for p in write_files(page, tmp_path)}
    assert written == {"lab.yaml", "webhook-example.json", "expected-output.txt"}, written
    lab = load_lab(tmp_path / "lab.yaml")  # the page's lab.yaml loads
    assert lab.notifications is not None and lab.notifications.email[0].port == 587
    example = json.loads((tmp_path / "webhook-example.json").read_text())
    assert example.keys() == Alert("trip", "x").as_dict().keys()
    scripts = [b for b in blocks(page) if b.file is None]
    assert [b.lang for b in scripts] == ["python"], scripts
    said = run_script(scripts[0], tmp_path, timeout=100).stdout
    assert said == (tmp_path / "expected-output.txt").read_text(), said
