"""The MCP HTTP transport in a process of its own, its calls run by the lab service.

``labbridge serve --mcp-http`` / ``labbridge mcp --http``: the service's process starts
``python -m bridge.mcpchild`` (:func:`transport_process`), a child at a lower CPU priority
(nice +:data:`NICE`) that listens on the HTTP bind and does everything an agent's request
costs before it is a call the lab should run: TLS, HTTP, sessions, JSON-RPC, the bearer
token, the agent's rate (:mod:`bridge.mcpcalls`), the arguments against the tool's schema.
Only an admitted call crosses to the service's process, over a socket pair: its name,
arguments and the caller's bearer token, which the service authenticates again (the child
never vouches for an identity); the service runs it (:meth:`LabTools.run_forwarded
<bridge.mcptools.LabTools.run_forwarded>`) and sends back the result or the one-line
refusal. So a flood of requests costs the interpreter and the core that dispatch e-stops
nothing (benchmarks/agents.py measures it).

The link: each message a 4-byte big-endian length and the bytes. The first, from the
service to the child, is the child's set-up (pickled: the lab config, the stations, the
bind; the child trusts its parent). Every other message is JSON: the child's ``ready``
(its URL) or ``failed`` (why it could not listen), then ``call`` / ``cancel`` from the
child and ``result`` / ``error`` replies from the service. At most :data:`MAX_IN_FLIGHT`
calls run at once (more are refused "busy"). The child ends when the link closes (the
service closed it, or died: the child never outlives it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import pickle
import socket
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver.exceptions import ResourceError, ToolError

from bridge.httpserve import BindError, HttpBind
from bridge.mcptools import LabTools
from bridge.service import LabService
from instruments.deadline import bounded

log = logging.getLogger(__name__)

__all__ = ["MAX_IN_FLIGHT", "NICE", "ChildLink", "read_message", "transport_process"]

#: the transport process's niceness above the service's (CPU goes to the lab first)
NICE = 10
#: calls from the transport running in the service at once
MAX_IN_FLIGHT = 64
#: the largest message on the link (a report with its images is the largest result)
MAX_MESSAGE = 64 * 1024 * 1024
#: the transport process has this long (s) to listen, and to end once told
START_S = 60.0
STOP_S = 10.0

_HEADER = struct.Struct(">I")


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """The next message, or None at the end of the link."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if size > MAX_MESSAGE:
            raise ConnectionError(f"a message of {size} B on the MCP link (at most {MAX_MESSAGE})")
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None


class _Writer:
    """Whole messages onto the link, one at a time."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._lock = asyncio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._lock:
            self.writer.write(_HEADER.pack(len(data)) + data)
            await self.writer.drain()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(json.dumps(message).encode())

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# ====================================================================== service side
@contextlib.asynccontextmanager
async def transport_process(
    service: LabService, tools: LabTools, bind: HttpBind
) -> AsyncIterator[str]:
    """Start the transport's process for ``service`` on ``bind`` and run the calls it
    forwards with ``tools`` while the block runs; yields the MCP endpoint's URL."""
    bind.check()
    ours, theirs = socket.socketpair()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge.mcpchild",
            str(theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    reader, raw = await asyncio.open_unix_connection(sock=ours)
    writer = _Writer(raw)
    link = _ServiceLink(tools, writer)
    serving: asyncio.Task[None] | None = None
    try:
        setup = {"lab": service.lab, "stations": list(service.stations), "bind": bind}
        await writer.send(pickle.dumps(setup))
        first = await bounded(read_message(reader), START_S)
        answer = json.loads(first) if first is not None else {"failed": "it ended at start"}
        if "ready" not in answer:
            raise BindError(f"the MCP server's process could not start: {answer.get('failed')}")
        serving = asyncio.create_task(link.serve(reader), name="mcp-link")
        log.info("MCP server on %s (process %d)", answer["ready"], proc.pid)
        yield str(answer["ready"])
    finally:
        await link.cancel_all()
        await writer.close()  # the child's end of the link: it stops serving and exits
        try:
            await bounded(proc.wait(), STOP_S)
        except TimeoutError:
            log.warning("the MCP server's process %d did not end: killed", proc.pid)
            proc.kill()
            await proc.wait()
        if serving is not None:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)


class _ServiceLink:
    """The service's end: runs each forwarded call in a task of its own."""

    def __init__(self, tools: LabTools, writer: _Writer) -> None:
        self.tools = tools
        self.writer = writer
        self.calls: dict[int, asyncio.Task[None]] = {}
        #: the service is closing the link (its end is not a failure)
        self.closing = False

    async def serve(self, reader: asyncio.StreamReader) -> None:
        while (data := await read_message(reader)) is not None:
            try:
                msg = json.loads(data)
                cid = int(msg["id"])
                if "cancel" in msg:
                    task = self.calls.get(cid)
                    if task is not None:
                        task.cancel()
                elif len(self.calls) >= MAX_IN_FLIGHT:
                    await self.writer.send_json(
                        {"id": cid, "error": f"busy: {MAX_IN_FLIGHT} calls running; retry"}
                    )
                else:
                    name, args, token = str(msg["call"]), dict(msg["args"]), str(msg["token"])
                    self.calls[cid] = asyncio.create_task(
                        self._run(cid, name, args, token), name=f"mcp-call-{name}"
                    )
            except (ValueError, KeyError, TypeError) as exc:  # a bug in the child
                log.error("MCP link: a malformed message from the transport: %s", exc)
                return
            except ConnectionError:
                return
        if not self.closing:
            log.error(
                "the MCP server's process ended: agents cannot reach the lab over MCP until "
                "labbridge is restarted (the lab itself runs on)"
            )

    async def _run(self, cid: int, name: str, args: dict[str, Any], token: str) -> None:
        reply: dict[str, Any]
        try:
            result = await self.tools.run_forwarded(name, args, token)
            reply = {"id": cid, "result": result}
        except (ToolError, ResourceError) as exc:
            reply = {"id": cid, "error": str(exc)}
        except asyncio.CancelledError:
            reply = {"id": cid, "error": "cancelled"}
        except Exception:  # a bug: logged here with its traceback, the agent told so
            log.exception("MCP call %s failed", name)
            reply = {"id": cid, "error": f"{name} failed in the lab service (logged there)"}
        finally:
            self.calls.pop(cid, None)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.writer.send_json(reply)

    async def cancel_all(self) -> None:
        self.closing = True
        for task in list(self.calls.values()):
            task.cancel()
        await asyncio.gather(*self.calls.values(), return_exceptions=True)


# ==================================================================== transport side
class ChildLink:
    """The transport's end: :meth:`call` sends a call and waits for its reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = _Writer(writer)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.closed = False

    async def call(self, name: str, args: dict[str, Any], token: str, resource: bool) -> Any:
        """Run the call in the service (:data:`~bridge.mcpcalls.Forward`)."""
        error = ResourceError if resource else ToolError
        if self.closed:
            raise error("the lab service is not running: try again once it is back")
        cid = next(self._ids)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = reply
        try:
            await self.writer.send_json({"id": cid, "call": name, "args": args, "token": token})
            answer = await reply
        except asyncio.CancelledError:  # the agent went away: so does its call
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.writer.send_json({"id": cid, "cancel": True})
            raise
        finally:
            self._waiting.pop(cid, None)
        if "error" in answer:
            raise error(str(answer["error"]))
        return answer.get("result")

    async def run(self) -> None:
        """Hand each reply to its call until the service closes the link."""
        while (data := await read_message(self.reader)) is not None:
            answer = json.loads(data)
            waiting = self._waiting.get(int(answer["id"]))
            if waiting is not None and not waiting.done():
                waiting.set_result(answer)
        self.closed = True
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_result({"error": "the lab service closed: try again once it is back"})

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.writer.send_json(message)
