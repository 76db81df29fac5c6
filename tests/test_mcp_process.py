"""The MCP HTTP transport in a process of its own (bridge/mcpproc.py, bridge/mcpchild.py).

A simulated lab (tests/test_mcp.py's agents) on a :class:`~bridge.service.LabService` with
:func:`~bridge.mcpserver.mcp_http` on a real socket on 127.0.0.1: the socket is the child's
(not this process's), the child runs niced, a call through it is answered by the service,
the service authenticates the forwarded token again (a forged or revoked one, or a name
that is no tool, is refused there), a child that dies leaves the service running and the
agents told plainly, and a child whose service goes away ends by itself. Real Ray (the
session's), real processes, no mocks.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from mcp.server.mcpserver.exceptions import ToolError
from test_mcp import agent_lab, call, http_agent

from bridge.agents import Authenticator
from bridge.httpserve import BindError
from bridge.mcpproc import NICE, read_message
from bridge.mcpserver import HttpBind, mcp_http
from bridge.mcptools import LabTools
from bridge.service import LabService


def _listener(port: int) -> psutil.Process:
    """The process listening on ``port`` (127.0.0.1)."""
    for proc in psutil.Process().children(recursive=True):
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                return proc
    raise AssertionError(f"no child of this process listens on {port}")


@pytest.mark.timeout(180)
async def test_the_transport_runs_niced_in_its_own_process_and_the_service_answers(
    ray_session: Any, tmp_path: Path
) -> None:
    async with agent_lab(tmp_path) as alab, LabService(alab.lab()) as service:
        async with mcp_http(service, HttpBind("127.0.0.1", 0)) as url:
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            child = _listener(port)
            assert child.pid != os.getpid()
            assert "bridge.mcpchild" in " ".join(child.cmdline())
            assert child.nice() == psutil.Process().nice() + NICE
            async with http_agent(url, alab.tokens["alice"]) as agent:
                lab = await call(agent, "lab")  # run by the service, answered through the child
                assert lab["you"]["agent"] == "agent:alice"
                assert list(lab["stations"]) == ["bench-a"]

            # what the child forwards is checked again in the service: identity from the
            # token, never from the child
            tools = LabTools(service, Authenticator(service.lab.agents))
            with pytest.raises(ToolError, match="not valid"):
                await tools.run_forwarded("lab", {}, "lbt_not-a-token")
            alab.lab().agents.store().revoke("bob")
            with pytest.raises(ToolError, match="not valid"):  # revoked
                await tools.run_forwarded("lab", {}, alab.tokens["bob"])
            with pytest.raises(ToolError, match="no tool or resource 'estop'"):
                await tools.run_forwarded("estop", {}, alab.tokens["alice"])

            # the child dies: the service carries on, the agent's next request fails plainly
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            status = await service.estop("the MCP transport died: still trips", who="test")
            assert status["ok"], status
        assert not child.is_running()


@pytest.mark.timeout(120)
async def test_a_port_in_use_is_one_clear_error(ray_session: Any, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        async with agent_lab(tmp_path) as alab, LabService(alab.lab()) as service:
            with pytest.raises(BindError, match="cannot listen on 127.0.0.1:"):
                async with mcp_http(service, HttpBind("127.0.0.1", taken.getsockname()[1])):
                    pass
            assert not [
                p
                for p in psutil.Process().children(recursive=True)
                if "bridge.mcpchild" in " ".join(p.cmdline())
            ]
    finally:
        taken.close()


@pytest.mark.timeout(120)
async def test_the_transport_ends_when_its_service_goes_away(tmp_path: Path) -> None:
    """The service's end of the link closes (as when it is killed): the child exits."""
    async with agent_lab(tmp_path) as alab:
        ours, theirs = socket.socketpair()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge.mcpchild",
            str(theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
        )
        theirs.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            setup = {"lab": alab.lab(), "stations": ["bench-a"], "bind": HttpBind("127.0.0.1", 0)}
            data = pickle.dumps(setup)
            writer.write(len(data).to_bytes(4, "big") + data)
            await writer.drain()
            ready = await asyncio.wait_for(read_message(reader), 60)
            assert ready is not None and b'"ready": "http://127.0.0.1:' in ready, ready
            writer.close()  # what the kernel does for a service killed with -9
            await writer.wait_closed()
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
