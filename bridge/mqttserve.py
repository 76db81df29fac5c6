"""``labbridge serve``: the lab's service on the MQTT campaign API until it is stopped.

:func:`serve` opens the :class:`~bridge.service.LabService`, puts the
:class:`~bridge.mqttapi.MqttApi` on the broker, runs the notifications and whatever else
it hosts (the lab page, the MCP transport), and on the way out aborts the running
campaigns and closes the stations; :func:`serve_command` is the command line's entry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bridge.campaigns import join_ray
from bridge.labconfig import LabConfig, load_lab
from bridge.labmqtt import mqtt_settings
from bridge.mqttapi import ApiError, ApiSettings, MqttApi
from bridge.service import LabService
from safety.yamldoc import ConfigError

__all__ = ["serve", "serve_command"]


async def serve(
    lab: LabConfig,
    settings: ApiSettings,
    *,
    ray_address: str | None = None,
    operator: str = "operator",
    rejoin: bool = False,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    on_online: Callable[[MqttApi, LabService], None] | None = None,
    hosted: Sequence[Callable[[LabService], contextlib.AbstractAsyncContextManager[Any]]] = (),
    page_url: Callable[[], str | None] | None = None,
) -> str:
    """Run the lab's MQTT campaign API until ``stop`` is set or SIGINT/SIGTERM arrives.

    On the way out every running campaign is aborted (its stations tripped into the
    safe state), every station is closed (instruments safe-stated), and the retained
    status goes ``offline``. A second signal gives up waiting. ``on_online``: called once
    the API is subscribed and serving (default: print that it is). ``hosted``: other
    front ends on the same service (``serve --mcp-http``: :func:`bridge.mcpserver.mcp_http`),
    each entered once the service is open and left after it shut down; what each yields is
    printed. ``rejoin``: a campaign's station whose Ray node died rejoins it once the node
    is back, recovered in ``operator``'s name (``serve --rejoin``). lab.yaml's ``notifications:`` are sent while it serves (:mod:`bridge.notify`; the
    MQTT alerts over this API's link; ``page_url``: the lab page's URL, when one is served).
    Returns why it stopped.
    """
    from bridge.notify import notifications

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    stop = stop or asyncio.Event()
    why: list[str] = []

    def on_signal(name: str) -> None:
        if why and main_task is not None:
            main_task.cancel()
            return
        why.append(name)
        print(
            f"\n{name}: stopping: campaigns aborted, every station to its safe state",
            file=sys.stderr,
        )
        stop.set()

    # Ray's driver installs its own SIGTERM handler in ray.init: start (or join) Ray first
    join_ray(lab, ray_address)
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
    api = MqttApi(settings, lab.bridge_id)
    final = "shut down"
    try:
        await api.connect()
        try:
            async with (
                LabService(
                    lab, ray_address=ray_address, operator=operator, rejoin=rejoin
                ) as service,
                contextlib.AsyncExitStack() as fronts,
            ):
                extra = [await fronts.enter_async_context(host(service)) for host in hosted]
                api.notifier = await fronts.enter_async_context(
                    notifications(
                        lab.notifications, service, lab.bridge_id, link=api.link, page_url=page_url
                    )
                )
                await api.attach(service)  # subscribed: requests are served from now on
                if on_online is not None:
                    on_online(api, service)
                else:
                    also = "".join(f"; also serving {x}" for x in extra)
                    print(
                        f"labbridge serve: {lab.bridge_id} online at {settings.url} "
                        f"(topics {api.root}/...; stations {', '.join(service.stations)}{also}); "
                        "Ctrl-C to stop",
                        file=sys.stderr,
                    )
                await stop.wait()
                reason = f"{why[0] if why else 'stop requested'}: labbridge serve shutting down"
                await api.detach()
                await service.shutdown(reason, who=operator)
                await api.flush()
            final = f"shut down ({why[0] if why else 'stop requested'})"
        except BaseException as exc:
            final = f"stopped: {type(exc).__name__}: {exc}" if str(exc) else "stopped"
            raise
        finally:
            await api.close(final)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return final


# ======================================================================== CLI
def serve_command(args: argparse.Namespace) -> int:
    """Run ``labbridge serve``; 0 after an orderly shutdown, 1 on a config or broker error."""
    prog = "labbridge serve"
    try:
        lab = load_lab(args.lab)
        settings = mqtt_settings(lab, args.broker)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    from bridge.campaigns import StationUnavailable
    from bridge.notify import recording_url
    from bridge.servicetypes import ServiceError

    hosted, pages = [], list[str]()
    refusals: tuple[type[Exception], ...] = (
        ApiError,
        StationUnavailable,
        ConfigError,
        ServiceError,
        OSError,
    )
    if getattr(args, "mcp_http", None):  # MCP on the same service (bridge/mcpserver.py)
        from bridge.mcpserver import McpError, mcp_http, parse_bind

        try:
            bind = parse_bind(args.mcp_http, args.mcp_tls_cert, args.mcp_tls_key)
        except McpError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        hosted.append(lambda service: mcp_http(service, bind))
        refusals += (McpError,)
    if getattr(args, "web", None):  # the lab page on the same service (bridge/webapp.py)
        from bridge.httpserve import BindError
        from bridge.webapp import lab_page
        from bridge.webcli import web_bind

        try:
            web = web_bind(args.web, args.web_tls_cert, args.web_tls_key)
        except BindError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        hosted.append(lambda service: recording_url(lab_page(service, web), pages))
        refusals += (BindError,)
    try:
        final = asyncio.run(
            serve(
                lab,
                settings,
                ray_address=args.ray_address,
                operator=args.operator,
                rejoin=args.rejoin,
                hosted=hosted,
                page_url=lambda: pages[0] if pages else None,
            )
        )
    except refusals as exc:
        if getattr(args, "debug", False):  # --debug: the traceback, not the line
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(f"{prog}: {final}", file=sys.stderr)
    return 0
