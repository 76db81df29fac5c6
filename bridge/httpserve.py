"""Serving an ASGI app on one socket with uvicorn: the MCP server's and the lab page's HTTP.

:class:`HttpBind` is where one listens (loopback unless TLS: secrets never cross a network
in clear) and :func:`parse_bind` reads it from ``HOST:PORT``; :func:`serve_asgi` runs an app
on it while a block runs. uvicorn runs without its own signal handling: labbridge's process
owns the signals (``serve``, ``sim``, ``mcp`` stop their services in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["BindError", "HttpBind", "parse_bind", "serve_asgi"]


class BindError(RuntimeError):
    """An HTTP front end cannot start as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class HttpBind:
    """Where an HTTP front end listens, and its TLS certificate and key (PEM files).

    ``secrets``: what would cross the network in clear without TLS (for the refusal);
    ``tls_options``: the command-line options that give the certificate and key.
    """

    host: str
    port: int
    certfile: Path | None = None
    keyfile: Path | None = None
    secrets: str = "bearer tokens"
    tls_options: str = "mcp: --tls-cert and --tls-key; serve: --mcp-tls-cert and --mcp-tls-key"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def check(self) -> None:
        """Refuse a bind that would send secrets in clear beyond this machine, half a TLS
        pair, or a certificate that does not load."""
        if (self.certfile is None) != (self.keyfile is None):
            raise BindError(f"TLS needs both a certificate and a key ({self.tls_options})")
        if self.certfile is None and not self.loopback:
            raise BindError(
                f"{self.host} is not a loopback address: {self.secrets} would cross the network "
                f"in clear; give a TLS certificate and key ({self.tls_options}) or bind 127.0.0.1"
            )
        if self.certfile is not None and self.keyfile is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.certfile, self.keyfile
                )
            except (OSError, ssl.SSLError) as exc:
                raise BindError(f"cannot load the TLS certificate and key: {exc}") from None


def parse_bind(
    text: str,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    **options: Any,
) -> HttpBind:
    """``HOST:PORT`` (``[::1]:8765`` for IPv6) -> a checked :class:`HttpBind` (``options``:
    its ``secrets`` and ``tls_options`` words)."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BindError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8765)")
    bind = HttpBind(host, int(port_text), certfile, keyfile, **options)
    bind.check()
    return bind


def _uvicorn_server(config: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: labbridge's process owns the signals."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


@contextlib.asynccontextmanager
async def serve_asgi(
    make_app: Callable[[str], Any],
    bind: HttpBind,
    *,
    name: str,
    graceful_s: int = 2,
) -> AsyncIterator[str]:
    """Serve the ASGI app ``make_app(base_url)`` on ``bind`` while the block runs; yields the
    base URL (``http[s]://host:port``; port 0 picks a free one, so the app learns its URL
    only once the socket is bound). ``name``: for the task and logs.

    On exit uvicorn stops taking connections and gives open ones ``graceful_s`` to end
    (long-lived responses, e.g. event streams, must end by themselves before that)."""
    import uvicorn

    bind.check()
    family, kind, proto, _, address = socket.getaddrinfo(
        bind.host, bind.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
    # so; with it on, every HTTP response waited ~40 ms for a delayed ACK on loopback
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {bind.host}:{bind.port}: {exc}") from None
    port = sock.getsockname()[1]
    scheme = "https" if bind.certfile is not None else "http"
    host = f"[{bind.host}]" if ":" in bind.host else bind.host
    base = f"{scheme}://{host}:{port}"
    try:
        app = make_app(base)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=graceful_s,
        ssl_certfile=bind.certfile,
        ssl_keyfile=bind.keyfile,
    )
    uv = _uvicorn_server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]), name=name)
    try:
        while not uv.started:  # uvicorn has no started event
            if task.done():
                task.result()
                raise BindError(f"the {name} server on {base} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("%s on %s", name, base)
        yield base
    finally:
        uv.should_exit = True
        with contextlib.suppress(Exception):
            await task
        sock.close()
