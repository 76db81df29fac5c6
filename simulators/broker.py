"""MQTT brokers for tests and the simulated bench, on loopback only.

* :class:`MosquittoBroker` runs the real ``mosquitto`` binary as a subprocess
  with a generated config: one listener on ``127.0.0.1`` (a free port),
  persistence off, optional users (a password file hashed like
  ``mosquitto_passwd``: PBKDF2-SHA512, ``$7$``), an optional ACL, and an optional
  TLS listener with a throw-away CA and server certificate (made with the
  ``cryptography`` package if installed, else the ``openssl`` CLI). It is the
  broker of CI and of labs. :meth:`MosquittoBroker.restart` is the
  ``broker-restart`` fault: stop and start again on the same ports, retained
  messages lost (persistence is off), clients have to reconnect.
* :class:`EmbeddedBroker` runs amqtt in-process on its own thread and event
  loop, for ``labbridge sim`` on a machine that only has ``pip install``.
  amqtt speaks MQTT 3.1.1 only and would bind 0.0.0.0 unless told: it is bound
  to 127.0.0.1 here.
* :func:`start_broker` picks mosquitto if installed, else the embedded one.

Every broker has the same small, synchronous interface: ``start()``,
``stop()`` (idempotent), ``restart()``, ``url`` (``mqtt://127.0.0.1:PORT``, no
path, no query), ``protocol`` (``"5"`` or ``"3.1.1"``: the newest version it
speaks) and ``client_url(prefix, **options)`` which builds a client URL with a
topic prefix (adding ``protocol=3.1.1`` for the embedded broker). Starting and
stopping take milliseconds (mosquitto) to ~0.1 s (amqtt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from simulators._proc import bound_to_parent
from simulators.brokercerts import (
    BrokerUnavailable,
    make_test_certificates,
    mosquitto_password_line,
    tls_tooling,
)

log = logging.getLogger(__name__)

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/opt/homebrew/sbin")


def mosquitto_binary() -> str | None:
    """Path of the ``mosquitto`` binary, also looking in sbin dirs (often not on a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which("mosquitto", path=path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, deadline: float, alive: Any = None) -> bool:
    """Poll until ``host:port`` accepts a TCP connection (True) or the deadline passes."""
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.01)
    return False


class Broker(Protocol):
    """What every broker here offers (see the module docstring)."""

    host: str
    port: int
    protocol: str

    @property
    def url(self) -> str: ...

    def client_url(self, prefix: str = "", *, user: str | None = None, **options: Any) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self, down_s: float = 0.0) -> None: ...


def _client_url(
    scheme: str, host: str, port: int, prefix: str, user: str | None, options: dict[str, Any]
) -> str:
    auth = f"{quote(user, safe='')}@" if user else ""
    path = "/" + prefix.strip("/") if prefix.strip("/") else ""
    query = urlencode({k: v for k, v in options.items() if v is not None})
    return f"{scheme}://{auth}{host}:{port}{path}" + (f"?{query}" if query else "")


class _FaultWatcher:
    """Restart the broker on the world's ``broker-restart`` fault (edge-triggered)."""

    def watch(self, world: Any) -> None:
        """Restart this broker whenever ``broker-restart`` is injected into ``world.faults``.

        The restart runs in the injecting thread (mosquitto: a few ms). The
        fault parameter ``down_s`` (real seconds, default 0) keeps the broker
        down that long, so clients see connection refusals and back off.
        """

        def on_fault(name: str, params: dict[str, Any]) -> None:
            if name == "broker-restart" and self.running:
                self.restart(down_s=float(params.get("down_s", 0.0)))

        world.faults.on_inject(on_fault)

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def restart(self, down_s: float = 0.0) -> None:
        raise NotImplementedError


class MosquittoBroker(_FaultWatcher):
    """A private mosquitto on 127.0.0.1. See the module docstring.

    ``users`` maps user name to password (anonymous access is then refused);
    ``acl`` is the text of a mosquitto ACL file; ``tls`` adds a second listener
    with a generated server certificate (``ca_file`` is the CA to trust,
    ``tls_url`` the ``mqtts://`` base URL). ``workdir`` holds config, password
    file, certificates and ``mosquitto.log`` (a temporary directory, removed on
    :meth:`stop`, when not given). Use as a context manager or call
    :meth:`start` / :meth:`stop`.
    """

    protocol = "5"

    def __init__(
        self,
        port: int | None = None,
        *,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start_timeout: float = 5.0,
    ) -> None:
        found = binary or mosquitto_binary()
        if found is None:
            raise BrokerUnavailable(
                "mosquitto is not installed (looked on PATH and in /usr/sbin); "
                "install it with 'apt-get install mosquitto' or use EmbeddedBroker"
            )
        self.binary = found
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.users = dict(users or {})
        self.acl = acl
        self.tls = tls
        self.tls_port: int | None = free_port() if tls else None
        self.start_timeout = start_timeout
        self._own_workdir = workdir is None
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.workdir: Path | None = None
        self.ca_file: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self.restarts = 0

    # ----------------------------------------------------------------- URLs
    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise BrokerUnavailable("this broker was started without tls=True")
        return f"mqtts://{self.host}:{self.tls_port}"

    def client_url(
        self, prefix: str = "", *, user: str | None = None, tls: bool = False, **options: Any
    ) -> str:
        """A client URL: ``mqtt[s]://[user@]127.0.0.1:PORT/prefix?options`` (adds ``ca=`` for TLS)."""
        if tls:
            if self.tls_port is None:
                raise BrokerUnavailable("this broker was started without tls=True")
            options.setdefault("ca", str(self.ca_file))
            return _client_url("mqtts", self.host, self.tls_port, prefix, user, options)
        return _client_url("mqtt", self.host, self.port, prefix, user, options)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "mosquitto.log" if self.workdir else None

    def log_text(self) -> str:
        """The broker's log so far (for error messages and debugging)."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")

    # ---------------------------------------------------------------- config
    def _prepare(self) -> None:
        if self.workdir is not None:
            return
        if self._workdir_arg is not None:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = self._workdir_arg
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="lb-mosquitto-"))
        wd = self.workdir
        lines = [
            "# generated by labbridge simulators.broker",
            "persistence false",
            "set_tcp_nodelay true",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {self.port} {self.host}",
        ]
        secret_files: list[Path] = []
        if self.users:
            pw = wd / "passwd"
            pw.write_text(
                "".join(mosquitto_password_line(u, p) + "\n" for u, p in self.users.items())
            )
            secret_files.append(pw)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = wd / "acl"
            acl.write_text(self.acl if self.acl.endswith("\n") else self.acl + "\n")
            secret_files.append(acl)
            lines.append(f"acl_file {acl}")
        if self.tls:
            ca, crt, key = make_test_certificates(wd)
            self.ca_file = ca
            secret_files += [crt, key]
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {ca}",
                f"certfile {crt}",
                f"keyfile {key}",
            ]
        for f in secret_files:
            f.chmod(0o600)
        if os.geteuid() == 0:
            # Started as root, mosquitto would drop to the 'mosquitto' user; the kernel
            # then clears the parent-death signal that stops an orphaned broker
            # (simulators/_proc.py). A loopback-only test broker stays root.
            lines.append("user root")
        (wd / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start mosquitto and wait until every listener accepts connections."""
        with self._lock:
            if self.running:
                return
            self._prepare()
            assert self.workdir is not None
            log_path = self.workdir / "mosquitto.log"
            with open(log_path, "ab") as log_file:
                self._proc = subprocess.Popen(
                    bound_to_parent([self.binary, "-c", str(self.workdir / "mosquitto.conf")]),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + self.start_timeout
            ports = [self.port] + ([self.tls_port] if self.tls_port else [])
            proc = self._proc
            ok = all(
                _wait_port(self.host, p, deadline, alive=lambda: proc.poll() is None) for p in ports
            )
            if not ok:
                self._stop_process()
                raise BrokerUnavailable(
                    f"mosquitto did not start on {self.host}:{self.port} within {self.start_timeout:g} s; "
                    f"log:\n{self.log_text()[-2000:]}"
                )
            log.info("mosquitto started on %s (pid %s)", self.url, proc.pid)

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        else:
            proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        """The ``broker-restart`` fault: stop, stay down ``down_s`` s, start on the same ports."""
        with self._lock:
            self._stop_process()
            if down_s > 0:
                time.sleep(down_s)
            self.restarts += 1
            self.start()

    def stop(self) -> None:
        """Stop the broker (idempotent), reap the process, remove a temporary workdir."""
        with self._lock:
            self._stop_process()
            if self._own_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
                self.ca_file = None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MosquittoBroker {self.url} {'running' if self.running else 'stopped'}>"


class EmbeddedBroker(_FaultWatcher):
    """amqtt in this process, on its own thread and event loop, bound to 127.0.0.1.

    MQTT 3.1.1 only (``protocol == "3.1.1"``; a v5 CONNECT is refused with
    "unsupported protocol version"), anonymous, no TLS: the pip-only default of
    ``labbridge sim``. ``start()`` blocks until the listener accepts connections.
    """

    protocol = "3.1.1"

    def __init__(self, port: int | None = None, *, start_timeout: float = 10.0) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.RLock()
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def client_url(self, prefix: str = "", *, user: str | None = None, **options: Any) -> str:
        """A client URL with the topic prefix and ``protocol=3.1.1``."""
        options.setdefault("protocol", "3.1.1")
        return _client_url("mqtt", self.host, self.port, prefix, user, options)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only anonymous auth: no $SYS publisher task, no packet logger.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    def _run(self) -> None:
        from amqtt.broker import Broker as AmqttBroker

        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            broker = AmqttBroker(self._config(), loop=loop)
            self._stop_event = asyncio.Event()
            try:
                await broker.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop_event.wait()
            finally:
                await broker.shutdown()

        try:
            loop.run_until_complete(main())
            # Let connection handlers that were cancelled by the shutdown finish.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        except BaseException as exc:  # reported by start() or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.error("embedded MQTT broker failed: %s", exc)
        finally:
            loop.close()
            self._loop = None

    def start(self) -> None:
        """Start amqtt on its thread; raise :class:`BrokerUnavailable` if it cannot listen."""
        with self._lock:
            if self.running:
                return
            self._ready.clear()
            self._error = None
            self._thread = threading.Thread(
                target=self._run, name=f"lb-amqtt-{self.port}", daemon=True
            )
            self._thread.start()
            if not self._ready.wait(self.start_timeout) or self._error is not None:
                error = self._error
                self.stop()
                raise BrokerUnavailable(
                    f"embedded MQTT broker (amqtt) did not start on {self.url}: {error or 'timeout'}"
                )
            log.info("embedded MQTT broker (amqtt) started on %s", self.url)

    def stop(self) -> None:
        """Shut amqtt down and join its thread (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            loop, event = self._loop, self._stop_event
            if loop is not None and event is not None:
                with contextlib.suppress(RuntimeError):  # loop already closed
                    loop.call_soon_threadsafe(event.set)
            thread.join(timeout=10)
            if thread.is_alive():
                log.error("embedded MQTT broker thread did not stop within 10 s")

    def restart(self, down_s: float = 0.0) -> None:
        """The ``broker-restart`` fault: stop, stay down ``down_s`` s, start on the same port."""
        with self._lock:
            self.stop()
            if down_s > 0:
                time.sleep(down_s)
            self.restarts += 1
            self.start()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedBroker {self.url} {'running' if self.running else 'stopped'}>"


def start_broker(prefer: str = "mosquitto", **options: Any) -> MosquittoBroker | EmbeddedBroker:
    """Start and return a loopback broker: mosquitto if installed (and preferred), else amqtt.

    ``prefer``: ``"mosquitto"`` (fall back to the embedded broker when the
    binary is missing) or ``"embedded"``. ``options`` go to the broker's
    constructor (``users``/``acl``/``tls`` need mosquitto).
    """
    if prefer not in ("mosquitto", "embedded"):
        raise ValueError(f"prefer must be 'mosquitto' or 'embedded', got {prefer!r}")
    broker: MosquittoBroker | EmbeddedBroker
    if prefer == "mosquitto" and mosquitto_binary() is not None:
        broker = MosquittoBroker(**options)
    else:
        if prefer == "mosquitto":
            log.warning("mosquitto not found; starting the embedded amqtt broker (MQTT 3.1.1 only)")
        unsupported = set(options) - {"port", "start_timeout"}
        if unsupported:
            raise BrokerUnavailable(
                f"the embedded broker does not support {', '.join(sorted(unsupported))}"
            )
        broker = EmbeddedBroker(**options)
    broker.start()
    return broker


__all__ = [
    "Broker",
    "BrokerUnavailable",
    "EmbeddedBroker",
    "MosquittoBroker",
    "free_port",
    "make_test_certificates",
    "mosquitto_binary",
    "mosquitto_password_line",
    "start_broker",
    "tls_tooling",
]
