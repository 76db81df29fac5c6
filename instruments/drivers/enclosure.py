"""Enclosure module driver: lid switch, LED light, heartbeat, over MQTT.

Works over any pub/sub transport with the :class:`MqttTransport` interface
(``publish``/``subscribe`` with topics relative to the URL's prefix); it does
not import paho.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

from instruments.deadline import bounded
from instruments.declare import ACTUATE, Call, Param, Set, declare
from instruments.driver import Channel, Driver, retry_idempotent, run_all
from instruments.errors import (
    DeviceRejected,
    LinkLostError,
    ProtocolError,
    TransportTimeout,
)
from instruments.transports.base import Transport

log = logging.getLogger(__name__)


class _Message(Protocol):
    topic: str
    payload: bytes
    retain: bool


class _PubSub(Protocol):
    """What the driver needs of its transport (``MqttTransport`` has it)."""

    url: str

    async def publish(
        self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False
    ) -> None: ...

    async def subscribe(
        self, topic_filter: str, qos: int = 0, *, queue: asyncio.Queue[Any] | None = None
    ) -> Any: ...


class Enclosure(Driver):
    """The enclosure module (ESP32/Pico-W class): lid switch, LED light, heartbeat.

    Protocol (PROTOCOLS.md "Enclosure module"), topics under
    ``<prefix>/enclosure/<id>/``, JSON payloads:

    * ``state`` (retained, device →) ``{"lid": "open"|"closed", "light": {"on": bool,
      "intensity": 0..1}, "uptime_s": float}``;
    * ``heartbeat`` (device →) ``{"seq": int, "t": float}`` every 0.5 s;
    * ``cmd`` (→ device) ``{"light": {"on": bool, "intensity": float}, "id": str}``,
      answered on ``cmd/ack`` with ``{"id": str, "ok": bool, "error": str?}``;
    * ``status`` (retained) ``online``, the device's Last Will ``offline``.

    ``set_light`` targets a state, so it is idempotent and retried (``attempts``,
    a fresh ``id`` each time); ``ok: false`` raises :class:`DeviceRejected`, no
    ack within ``timeout`` s :class:`TransportTimeout`. A background task
    consumes what the device publishes; a malformed payload is logged, counted
    (``errors``) and kept as ``last_error`` (a :class:`ProtocolError`) and never
    stops the task. Heartbeat age is measured on this machine's monotonic clock
    (real seconds). Units: intensity is a fraction 0..1.
    """

    kind: ClassVar[str] = "enclosure"
    safe_state_calls = (Call("set_light", on=False),)

    def __init__(
        self,
        transport: Transport,
        *,
        enclosure_id: str = "enc-1",
        timeout: float = 2.0,
        attempts: int = 2,
        name: str | None = None,
    ) -> None:
        for needed in ("publish", "subscribe"):
            if not callable(getattr(transport, needed, None)):
                raise TypeError(
                    f"Enclosure needs a pub/sub (MQTT) transport, got {type(transport).__name__} for {transport.url}"
                )
        if not enclosure_id or any(c in enclosure_id for c in "/+#"):
            raise ValueError(f"enclosure_id must be a non-empty topic level, got {enclosure_id!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts!r}")
        super().__init__(transport, name=name or f"enclosure {enclosure_id}@{transport.url}")
        self.enclosure_id = enclosure_id
        self.timeout = timeout
        self.attempts = attempts
        self.root = f"enclosure/{enclosure_id}"
        self._pubsub: _PubSub = transport  # type: ignore[assignment]
        self._queue: asyncio.Queue[Any] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._state: dict[str, Any] | None = None
        self._state_waiters: list[
            tuple[Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]
        ] = []
        self._online: bool | None = None
        self._heartbeat_mono: float | None = None
        self._heartbeat_seq: int | None = None
        self._heartbeat_t: float | None = None
        self.state_updates = 0
        self.heartbeats = 0
        self.errors = 0
        self.last_error: ProtocolError | None = None

    # -------------------------------------------------------------- channels
    @property
    def channels(self) -> Mapping[str, Channel]:
        return {
            "light": Channel(
                "light",
                "",
                kind="bool",
                doc="LED light on/off as commanded (read: light_on)",
                readable=False,
            ),
            "intensity": Channel(
                "intensity", "1", minimum=0.0, maximum=1.0, doc="LED intensity, fraction of full"
            ),
            "lid": Channel(
                "lid", "", kind="enum", allowed=("open", "closed"), settable=False, doc="lid switch"
            ),
            "light_on": Channel(
                "light_on", "", kind="bool", settable=False, doc="LED light on (device state)"
            ),
            "uptime_s": Channel(
                "uptime_s",
                "s",
                minimum=0.0,
                settable=False,
                doc="the device's uptime as last reported, None when it reports none",
            ),
            "online": Channel(
                "online",
                "",
                kind="bool",
                settable=False,
                doc="the device's retained status is online (its Last Will: offline)",
            ),
            "heartbeat_age_s": Channel(
                "heartbeat_age_s",
                "s",
                minimum=0.0,
                settable=False,
                doc="since the last heartbeat (this machine's clock), None before the first",
            ),
            "heartbeat_seq": Channel(
                "heartbeat_seq",
                "",
                kind="int",
                minimum=0,
                settable=False,
                doc="the last heartbeat's sequence number, None before the first",
            ),
        }

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["enclosure_id"] = self.enclosure_id
        return out

    # -------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        """Open the transport, subscribe to state/heartbeat/status/cmd/ack, start the consumer.

        On failure everything opened so far is closed again before raising.
        """
        await self.transport.open()
        if self._consumer is not None:
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queue = queue
        self._consumer = asyncio.create_task(
            self._consume(queue), name=f"enclosure-{self.enclosure_id}-consumer"
        )
        try:
            for leaf in ("cmd/ack", "status", "state", "heartbeat"):
                await self._pubsub.subscribe(
                    f"{self.root}/{leaf}", qos=1 if leaf != "heartbeat" else 0, queue=queue
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the consumer task (awaited), fail pending commands, close the transport. Idempotent."""
        task, self._consumer = self._consumer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue is not None:
            unsubscribe = getattr(self.transport, "unsubscribe", None)
            if unsubscribe is not None:
                for leaf in ("cmd/ack", "status", "state", "heartbeat"):
                    with contextlib.suppress(Exception):
                        await unsubscribe(f"{self.root}/{leaf}", self._queue)
            self._queue = None
        error = LinkLostError(self.url, f"{self.name}: driver closed")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._pending.clear()
        for _, fut in self._state_waiters:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._state_waiters.clear()
        await self.transport.close()

    # ------------------------------------------------------------- consumer
    async def _consume(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            msg = await queue.get()
            try:
                self._handle(msg)
            except ProtocolError as exc:
                self._protocol_error(exc)
            except Exception as exc:  # never let one bad message stop the consumer
                self._protocol_error(
                    ProtocolError(self.name, f"cannot handle {msg.topic}: {exc!r}", msg.payload)
                )

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.errors += 1
        self.last_error = exc
        log.warning("%s", exc)

    def _json(self, msg: _Message, what: str) -> dict[str, Any]:
        try:
            data = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(self.name, f"{what} is not valid JSON", msg.payload) from None
        if not isinstance(data, dict):
            raise ProtocolError(self.name, f"{what} is not a JSON object", msg.payload)
        return data

    def _handle(self, msg: _Message) -> None:
        leaf = (
            msg.topic[len(self.root) + 1 :] if msg.topic.startswith(self.root + "/") else msg.topic
        )
        if leaf == "state":
            self._on_state(msg)
        elif leaf == "heartbeat":
            self._on_heartbeat(msg)
        elif leaf == "status":
            self._on_status(msg)
        elif leaf == "cmd/ack":
            self._on_ack(msg)

    def _on_state(self, msg: _Message) -> None:
        if not msg.payload:  # retained state cleared
            return
        data = self._json(msg, "state")
        lid = data.get("lid")
        light = data.get("light")
        if lid not in ("open", "closed"):
            raise ProtocolError(
                self.name, f"state has lid {lid!r}, expected 'open' or 'closed'", msg.payload
            )
        if not isinstance(light, dict) or not isinstance(light.get("on"), bool):
            raise ProtocolError(self.name, "state has no light.on boolean", msg.payload)
        intensity = light.get("intensity", 0.0)
        if not _is_number(intensity) or not 0.0 <= float(intensity) <= 1.0:
            raise ProtocolError(
                self.name, f"state has light.intensity {intensity!r}, expected 0..1", msg.payload
            )
        uptime = data.get("uptime_s")
        if uptime is not None and not _is_number(uptime):
            raise ProtocolError(
                self.name, f"state has uptime_s {uptime!r}, expected a number", msg.payload
            )
        state = {
            "lid": lid,
            "light_on": light["on"],
            "intensity": float(intensity),
            "uptime_s": float(uptime) if uptime is not None else None,
        }
        self._state = state
        self.state_updates += 1
        for pred, fut in list(self._state_waiters):
            if not fut.done() and pred(state):
                fut.set_result(dict(state))

    def _on_heartbeat(self, msg: _Message) -> None:
        data = self._json(msg, "heartbeat")
        seq, t = data.get("seq"), data.get("t")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ProtocolError(
                self.name, f"heartbeat has seq {seq!r}, expected an integer", msg.payload
            )
        if t is not None and not _is_number(t):
            raise ProtocolError(self.name, f"heartbeat has t {t!r}, expected a number", msg.payload)
        self._heartbeat_mono = time.monotonic()
        self._heartbeat_seq = seq
        self._heartbeat_t = float(t) if t is not None else None
        self.heartbeats += 1

    def _on_status(self, msg: _Message) -> None:
        text = msg.payload.decode("utf-8", "replace").strip()
        if text == "online":
            self._online = True
        elif text == "offline":
            self._online = False
        elif text == "":  # retained status cleared
            self._online = None
        else:
            raise ProtocolError(
                self.name, f"status {text!r}, expected 'online' or 'offline'", msg.payload
            )

    def _on_ack(self, msg: _Message) -> None:
        data = self._json(msg, "cmd/ack")
        ack_id, ok = data.get("id"), data.get("ok")
        if not isinstance(ok, bool):
            raise ProtocolError(
                self.name, f"cmd/ack has ok {ok!r}, expected true/false", msg.payload
            )
        if ack_id is None and not ok and len(self._pending) == 1:
            # The device could not read our id (e.g. it could not parse the command).
            ack_id = next(iter(self._pending))
        fut = self._pending.get(ack_id) if isinstance(ack_id, str) else None
        if fut is None:
            log.debug("%s: ack for unknown command id %r (another client's?)", self.name, ack_id)
            return
        if not fut.done():
            fut.set_result(data)

    # -------------------------------------------------------------- commands
    @declare(
        ACTUATE,
        on=Param(bool, doc="LED light on/off"),
        intensity=Param(
            float,
            min=0.0,
            max=1.0,
            optional=True,
            keeps="intensity",
            fill_when={"on": True},
            doc="fraction of full brightness; left out: the known one is re-sent",
        ),
        sets=[Set("light", arg="on"), Set("intensity", arg="intensity")],
        safer_when={"on": False, "intensity": None},
    )
    async def set_light(self, on: bool, intensity: float | None = None) -> None:
        """Light on/off, optionally at ``intensity`` (fraction 0..1; None keeps the device's).

        Waits for the ack. The device owns the range check (0..1, see
        ``channels``): an out-of-range intensity comes back as ``ok: false``
        and raises :class:`DeviceRejected`; a non-number raises TypeError here.
        """
        if not isinstance(on, bool):
            raise TypeError(f"on must be a bool, got {on!r}")
        light: dict[str, Any] = {"on": on}
        if intensity is not None:
            if not _is_number(intensity):
                raise TypeError(f"intensity must be a finite number, got {intensity!r}")
            light["intensity"] = float(intensity)

        async def attempt() -> None:
            await self._command({"light": light})

        await retry_idempotent(attempt, attempts=self.attempts, what=f"{self.name} set_light")

    async def _command(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._consumer is None:
            raise LinkLostError(self.url, f"{self.name}: driver is not open")
        cmd_id = uuid.uuid4().hex[:12]
        cmd = {**body, "id": cmd_id}
        text = json.dumps(cmd, separators=(",", ":"))
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[cmd_id] = fut
        try:
            await self._pubsub.publish(f"{self.root}/cmd", text, qos=1)
            try:
                ack = await bounded(fut, self.timeout)
            except TimeoutError:
                raise TransportTimeout(
                    self.url,
                    f"{self.name}: no cmd/ack for command {text} within {self.timeout:g} s",
                ) from None
        finally:
            self._pending.pop(cmd_id, None)
        if not ack.get("ok"):
            error = ack.get("error")
            raise DeviceRejected(
                self.name, text, "ok:false", str(error) if error else "no reason given"
            )
        return ack

    async def safe_state(self) -> None:
        """Light off (acknowledged). Idempotent."""
        await run_all({"light off": lambda: self.set_light(False)}, self.name)

    # ---------------------------------------------------------------- state
    @property
    def lid(self) -> str | None:
        """``"open"``, ``"closed"``, or None before the first state."""
        return self._state["lid"] if self._state else None

    @property
    def online(self) -> bool | None:
        """The device's retained status: True online, False offline (Last Will), None unknown."""
        return self._online

    @property
    def state(self) -> dict[str, Any] | None:
        """The last state received (lid, light_on, intensity, uptime_s), or None."""
        return dict(self._state) if self._state else None

    def heartbeat_age(self) -> float | None:
        """Seconds (real, this machine) since the last heartbeat; None if none was ever seen."""
        if self._heartbeat_mono is None:
            return None
        return time.monotonic() - self._heartbeat_mono

    async def wait_for_state(
        self,
        timeout: float | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The current state if it satisfies ``predicate`` (default: any), else the next one that does.

        Raises :class:`TransportTimeout` after ``timeout`` s (default the driver's).
        """
        pred = predicate or (lambda _s: True)
        if self._state is not None and pred(self._state):
            return dict(self._state)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (pred, fut)
        self._state_waiters.append(entry)
        limit = self.timeout if timeout is None else timeout
        try:
            return await bounded(fut, limit)
        except TimeoutError:
            raise TransportTimeout(
                self.url, f"{self.name}: no matching state within {limit:g} s"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._state_waiters.remove(entry)

    async def read(self) -> dict[str, Any]:
        """``lid``, ``light_on``, ``intensity`` (0..1), ``uptime_s`` (device's, as last reported),
        ``online``, ``heartbeat_age_s`` (s), ``heartbeat_seq``. Waits for a first state."""
        state = await self.wait_for_state()
        age = self.heartbeat_age()
        return {
            **state,
            "online": self._online,
            "heartbeat_age_s": age,
            "heartbeat_seq": self._heartbeat_seq,
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["Enclosure"]
