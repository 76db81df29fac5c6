"""``labbridge mcp``: the lab's Model Context Protocol server, over stdio or streamable HTTP.

Who owns the lab (one process at a time: :class:`~bridge.service.LabService` holds a lock
beside the journal, and a second one is refused):

* ``labbridge mcp --lab lab.yaml`` (stdio) opens the lab itself, for the one agent whose
  token is in ``$LABBRIDGE_AGENT_TOKEN``; an MCP client starts it as a subprocess, and
  closing the client's session closes the lab (running campaigns aborted, every station
  safe-stated). It refuses to start without a valid token.
* ``labbridge mcp --lab lab.yaml --http 127.0.0.1:8765`` opens the lab itself and serves
  any number of agents, each request authenticated by its bearer token.
* ``labbridge serve --lab lab.yaml --mcp-http 127.0.0.1:8765`` serves MCP from the lab
  service the MQTT campaign API uses: MQTT and MCP share one service (the way to have
  both).

HTTP listens on loopback unless told otherwise; any other address needs ``--tls-cert``
and ``--tls-key`` (bearer tokens never cross a network in clear). The HTTP transport runs
in a process of its own (:mod:`bridge.mcpproc`): requests are parsed, and each agent's
rate of calls checked, there; only admitted calls run in the service (:mod:`bridge.mcpcalls`),
so a flooding agent never delays an e-stop. Tokens are checked on
every request against the hashed token file (:mod:`bridge.agenttokens`), read again when
it changes: a revoked token is refused from its next request on. The tools are
:mod:`bridge.mcptools`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from bridge.agents import Authenticator, AuthError
from bridge.campaigns import join_ray
from bridge.httpserve import BindError, HttpBind, parse_bind
from bridge.labconfig import LabConfig
from bridge.mcpcalls import RequestGate
from bridge.mcpdescribe import build_server
from bridge.mcpproc import transport_process
from bridge.mcptools import LabTools
from bridge.service import LabService

log = logging.getLogger(__name__)

__all__ = [
    "BearerTokens",
    "HttpBind",
    "McpError",
    "mcp_http",
    "parse_bind",
    "serve_http",
    "serve_stdio",
]

#: the largest HTTP request body: a program.md at its limit, JSON-escaped, and then some
MAX_BODY_BYTES = 256 * 1024
#: MCP sessions open at once over HTTP (the SDK refuses more with 503)
MAX_SESSIONS = 256
#: an HTTP session idle this long (s) is closed; its agent opens a new one
SESSION_IDLE_S = 600.0


#: ``labbridge mcp`` cannot start as asked (the message says why and what to do); the bind's
#: own refusals (:mod:`bridge.httpserve`) are this same class
McpError = BindError


class BearerTokens:
    """The SDK's token verifier: a bearer token -> its agent (:class:`AccessToken` with the
    agent's name as ``client_id`` and the token's actions as ``scopes``), or None."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            agent = self.auth.authenticate(token)
        except AuthError as exc:
            log.warning("MCP: bearer token refused: %s", exc)
            return None
        return AccessToken(token=token, client_id=agent.name, scopes=sorted(agent.token_scopes))


# ====================================================================== HTTP
def http_app(
    tools: Callable[[Authenticator], LabTools], lab: LabConfig, bind: HttpBind, base: str
) -> Any:
    """The MCP server's ASGI app at ``base`` for the tools ``tools(auth)``: bearer tokens,
    sessions and bounds, behind :class:`~bridge.mcpcalls.RequestGate`."""
    auth = Authenticator(lab.agents)
    server = build_server(
        tools(auth),
        auth=AuthSettings(issuer_url=base, resource_server_url=None),  # type: ignore[arg-type]
        token_verifier=BearerTokens(auth),
    )
    return RequestGate(  # a client that ignores "busy": 429, unread
        server.streamable_http_app(
            host=bind.host,
            max_request_body_size=MAX_BODY_BYTES,
            max_sessions=MAX_SESSIONS,
            session_idle_timeout=SESSION_IDLE_S,
        ),
        auth.authenticate,
        lab.quotas,
    )


@contextlib.asynccontextmanager
async def mcp_http(service: LabService, bind: HttpBind) -> AsyncIterator[str]:
    """Serve MCP over streamable HTTP for ``service`` while the block runs, from a process
    of its own (:mod:`bridge.mcpproc`); yields the endpoint's URL
    (``http[s]://host:port/mcp``; port 0 picks a free one)."""
    tools = LabTools(service, Authenticator(service.lab.agents))
    async with transport_process(service, tools, bind) as url:
        yield url


# ===================================================================== runners
@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at stderr meanwhile: processes started now (Ray's) inherit that, never the
    stdio transport's wire."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _signals(stop: asyncio.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop`` (after Ray's own handler is in: call after join_ray)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove


async def serve_stdio(
    lab: LabConfig, token: str, *, ray_address: str | None = None, operator: str = "operator"
) -> str:
    """Serve MCP on this process's stdin/stdout for the agent of ``token`` until the client
    closes the session (or SIGINT/SIGTERM); opens and closes the lab. Returns why it ended."""
    auth = Authenticator(lab.agents)
    agent = auth.authenticate(token)  # before anything opens
    with _stdout_to_stderr():
        join_ray(lab, ray_address)
        stop = asyncio.Event()
        remove = _signals(stop)
        try:
            service = await LabService(lab, ray_address=ray_address, operator=operator).open()
        except BaseException:
            remove()
            raise
    print(
        f"labbridge mcp: {lab.bridge_id} for {agent.proposer} over stdio (stations "
        f"{', '.join(service.stations)})",
        file=sys.stderr,
    )
    why = "the client closed the session"
    try:
        server = build_server(LabTools(service, auth, token=token))
        run = asyncio.create_task(server.run_stdio_async(), name="mcp-stdio")
        halt = asyncio.create_task(stop.wait(), name="mcp-stop")
        await asyncio.wait({run, halt}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            why = "signal"
        for task in (run, halt):
            task.cancel()
        await asyncio.gather(run, halt, return_exceptions=True)
    finally:
        await service.close(f"labbridge mcp: {why}")
        remove()
    return why


async def serve_http(
    lab: LabConfig,
    bind: HttpBind,
    *,
    ray_address: str | None = None,
    operator: str = "operator",
    on_online: Callable[[str], None] | None = None,
) -> str:
    """Open the lab and serve MCP over HTTP on ``bind`` until SIGINT/SIGTERM."""
    bind.check()
    join_ray(lab, ray_address)
    stop = asyncio.Event()
    remove = _signals(stop)
    try:
        async with LabService(lab, ray_address=ray_address, operator=operator) as service:
            async with mcp_http(service, bind) as url:
                if on_online is not None:
                    on_online(url)
                await stop.wait()
    finally:
        remove()
    return "signal"
