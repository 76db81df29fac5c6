"""How an MCP tool call reaches the lab service: its agent's rate first, then the service.

:class:`CallGate` wraps every tool and resource of :class:`~bridge.mcptools.LabTools`:

0. over HTTP, :class:`RequestGate` first: an agent's requests past ``HARD_CAP`` times its
   rate of calls (a client that ignores "busy") get HTTP 429 with ``Retry-After``,
   refused before the MCP server reads them, for the cost of parsing the HTTP request;
1. the agent is authenticated and its rate of calls checked (its quota's
   ``tool_calls_per_s``/``tool_call_burst``, one :class:`~bridge.ratelimit.RateLimiter`
   bucket per agent): past it the call is refused at once, unread ("busy: ... retry in
   0.05 s"), and the service never sees it;
2. the call then runs: over stdio (one agent, in the service's process) where it came in;
   over HTTP the transport runs in a process of its own (:mod:`bridge.mcpproc`) and
   ``forward`` sends the call to the service's process, which runs it there.

So over HTTP, parsing requests, sessions, JSON-RPC and refusing a flood never run in the
interpreter that handles e-stops: an agent flooding the server does not delay one.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp_types import CallToolResult, InputRequiredResult
from pydantic import ValidationError

from bridge.agents import Agent, AuthError
from bridge.quotaconfig import Quotas
from bridge.ratelimit import RateLimiter

__all__ = ["HARD_CAP", "CallGate", "Forward", "LabMCP", "RequestGate"]

#: where the transport's process sends an admitted call: (name, arguments, the caller's
#: bearer token, a resource?) -> its result
Forward = Callable[[str, dict[str, Any], str, bool], Awaitable[Any]]

#: an agent's HTTP requests may come this many times faster than its tool calls before
#: they are refused unread (HTTP 429): for a caller that ignores "busy" (a refusal through
#: the MCP server costs ~10x one here, all of it on the interpreter the e-stop shares)
HARD_CAP = 2.0

T = TypeVar("T")


def _one_line(exc: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
    ]
    text = "; ".join(parts)
    return text if len(text) <= 500 else text[:497] + "..."


class LabMCP(MCPServer):
    """:class:`MCPServer` whose argument errors are one line naming each field (the SDK's
    are pydantic's multi-line report)."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(
                    f"{name}: invalid arguments: {_one_line(exc.__cause__)} (see the tool's "
                    "input schema)"
                ) from exc.__cause__
            raise


class CallGate:
    """Admission and dispatch of MCP calls (module docstring). ``identify``: the agent of a
    call's context (:meth:`LabTools.agent <bridge.mcptools.LabTools.agent>`); ``quotas``:
    the lab's; ``forward``: ``(name, keyword arguments, resource?) -> result``, where an
    admitted call goes when it runs in another process (None: it runs here)."""

    def __init__(
        self,
        identify: Callable[[Context[Any, Any]], Agent],
        quotas: Quotas,
        forward: Callable[[str, dict[str, Any], bool], Awaitable[Any]] | None = None,
    ) -> None:
        self.identify = identify
        self.quotas = quotas
        self.forward = forward
        self._calls = RateLimiter(20.0, 40.0)

    def admit(self, agent: Agent) -> None:
        """Refuse the call (:class:`ToolError`, not acted on) once the agent is past its
        rate of tool calls."""
        quota = self.quotas.for_proposer(agent.proposer)
        if quota is None or self._calls.admit(
            agent.name, rate=quota.tool_calls_per_s, burst=quota.tool_call_burst
        ):
            return
        wait = self._calls.retry_after(agent.name, rate=quota.tool_calls_per_s)
        raise ToolError(
            f"busy: agent {agent.name} made more than {quota.tool_calls_per_s:g} tool calls a "
            f"second (bursts of {quota.tool_call_burst}; {quota.where}): not acted on; retry "
            f"in {max(wait, 0.001):.3f} s"
        )

    def wrap(
        self, fn: Callable[..., Coroutine[Any, Any, T]], *, resource: bool = False
    ) -> Callable[..., Coroutine[Any, Any, T]]:
        """``fn`` (a tool, or a resource with ``resource``) behind the gate; the signature
        (and so the tool's schema) is ``fn``'s."""

        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> T:
            ctx = kwargs.get("ctx")
            if ctx is not None:
                try:
                    self.admit(self.identify(ctx))
                except (AuthError, ToolError) as exc:
                    text = " ".join(str(exc).split())
                    raise (ResourceError(text) if resource else ToolError(text)) from None
            if self.forward is not None:
                if args:  # the SDK passes arguments by name
                    raise TypeError(f"{fn.__name__}: positional arguments are not forwarded")
                result: T = await self.forward(fn.__name__, dict(kwargs), resource)
                return result
            return await fn(*args, **kwargs)

        return call


class RequestGate:
    """ASGI middleware in front of the MCP HTTP app: HTTP 429 (``Retry-After``) for an
    agent's requests past :data:`HARD_CAP` times its quota's rate of tool calls (and
    burst). A request whose token does not authenticate passes on: the transport answers
    it 401. ``authenticate``: bearer token -> :class:`~bridge.agents.Agent`."""

    def __init__(self, app: Any, authenticate: Callable[[str], Agent], quotas: Quotas) -> None:
        self.app = app
        self.authenticate = authenticate
        self.quotas = quotas
        self._requests = RateLimiter(20.0 * HARD_CAP, 40.0 * HARD_CAP)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST":
            refused = self._refused(scope)
            if refused is not None:
                await self._busy(send, *refused)
                return
        await self.app(scope, receive, send)

    def _refused(self, scope: Any) -> tuple[str, float] | None:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if not header[:7].lower() == b"bearer ":
            return None
        try:
            agent = self.authenticate(header[7:].decode("latin-1").strip())
        except (AuthError, UnicodeDecodeError):
            return None
        quota = self.quotas.for_proposer(agent.proposer)
        if quota is None:
            return None
        rate, burst = quota.tool_calls_per_s * HARD_CAP, quota.tool_call_burst * HARD_CAP
        if self._requests.admit(agent.name, rate=rate, burst=burst):
            return None
        wait = max(self._requests.retry_after(agent.name, rate=rate), 0.001)
        return (
            f"busy: agent {agent.name} sent more than {rate:g} requests a second, told busy "
            f"({quota.where}): refused unread; retry in {wait:.3f} s",
            wait,
        )

    @staticmethod
    async def _busy(send: Any, text: str, wait: float) -> None:
        body = json.dumps({"error": "busy", "error_description": text}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(max(1, math.ceil(wait))).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
