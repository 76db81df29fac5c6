"""``python -m bridge.mcpchild FD``: the MCP HTTP transport's process (:mod:`bridge.mcpproc`).

Started by the lab service with one end of a socket pair as ``FD``; reads its set-up from
it, listens on the HTTP bind, forwards each admitted call to the service and exits when the
service closes the link (or dies). It ignores SIGINT (Ctrl-C reaches the whole process
group: the service shuts it down in order) and runs at nice +:data:`~bridge.mcpproc.NICE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys

from bridge.httpserve import BindError, serve_asgi
from bridge.mcpproc import NICE, ChildLink, read_message
from bridge.mcpserver import http_app
from bridge.mcptools import LabTools

log = logging.getLogger("bridge.mcpchild")


async def _serve(fd: int) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    link = ChildLink(reader, writer)
    data = await read_message(reader)
    if data is None:
        return 1
    setup = pickle.loads(data)  # from the service that started this process
    lab, stations, bind = setup["lab"], setup["stations"], setup["bind"]

    def app(base: str) -> object:
        return http_app(
            lambda auth: LabTools.forwarding(lab, stations, auth, link.call), lab, bind, base
        )

    try:
        async with serve_asgi(app, bind, name="mcp-http") as base:
            await link.send_json({"ready": f"{base}/mcp"})
            await link.run()
    except BindError as exc:
        await link.send_json({"failed": str(exc)})
        return 1
    finally:
        writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_serve(int(args[0])))


if __name__ == "__main__":
    sys.exit(main())
