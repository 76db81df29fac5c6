"""The command line of the MQTT campaign API: ``labbridge serve`` (its parser; the service
is :mod:`bridge.mqttapi`) and the clients ``labbridge estop``, ``reset`` and ``status``.

Imports only the standard library at import time (the broker link, the lab config and
the service on use), so that ``labbridge --help`` and ``labbridge estop --help`` stay
fast. Requests are published on ``labbridge/<bridge_id>/<request>/<user>`` as the
logged-in user (docs/mqtt-api.md, "Identity").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.mqttlink import ApiSettings

__all__ = [
    "add_mqtt_client_parsers",
    "add_serve_parser",
    "estop_command",
    "main",
    "request",
    "reset_command",
    "status_command",
]


# ===================================================================  clients
async def request(
    settings: ApiSettings,
    bridge_id: str,
    topic: str,
    payload: dict[str, Any],
    *,
    timeout: float = 10.0,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Send one request (``topic`` relative to the bridge's root, without the user level:
    ``estop``, ``campaigns/start``, ...) as the link's user and wait for its reply.

    Uses the MQTT v5 response topic and correlation data when the broker speaks v5,
    else ``reply_to``/``correlation_id`` in the payload. Returns ``(reply, status)``:
    the reply (None if none came within ``timeout``) and the service's retained
    status as seen before sending (None if there is none).
    """
    from bridge.mqttlink import MqttLink, dumps, parse_payload, topic_root

    root = topic_root(bridge_id)
    client_id = f"labbridge-cli-{secrets.token_hex(4)}"
    user = settings.username or "anonymous"
    reply_topic = f"{root}/replies/{user}/{client_id}"
    link = MqttLink(replace(settings, client_id=client_id, session_expiry_s=0))
    await link.open([(reply_topic, 1), (f"{root}/status", 1)])
    try:
        status = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while status is None:
                    msg = await link.messages.get()
                    if msg.topic == f"{root}/status":
                        data, _ = parse_payload(msg.payload)
                        status = data if isinstance(data, dict) else None
        correlation = secrets.token_hex(8)
        body = dict(payload)
        if link.protocol == "5":
            await link.send(
                f"{root}/{topic}/{user}",
                dumps(body),
                response_topic=reply_topic,
                correlation_data=correlation.encode(),
                wait=True,
            )
        else:
            body.update(reply_to=reply_topic, correlation_id=correlation)
            await link.send(f"{root}/{topic}/{user}", dumps(body), wait=True)
        reply = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while reply is None:
                    msg = await link.messages.get()
                    if msg.topic != reply_topic:
                        continue
                    data, _ = parse_payload(msg.payload)
                    ours = msg.correlation_data == correlation.encode() or (
                        isinstance(data, dict) and data.get("correlation_id") == correlation
                    )
                    if ours and isinstance(data, dict):
                        reply = data
        return reply, status
    finally:
        await link.close()


def _client_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--lab", type=Path, help="lab config: its mqtt settings and bridge_id")
    where.add_argument("--broker", help="broker URL, mqtt[s]://[user@]host[:port][?options]")
    p.add_argument("--bridge-id", default=None, help="the bridge (default: the lab's bridge_id)")
    p.add_argument("--user", default=None, help="MQTT user (default: the lab's or the URL's)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--password-env", default=None, help="read the password from this variable")
    secret.add_argument("--password-file", type=Path, default=None, help="read it from this file")
    p.add_argument("--ca", type=Path, default=None, help="CA file of an mqtts:// broker")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")


def _client_settings(args: argparse.Namespace) -> tuple[ApiSettings, str]:
    from bridge.labconfig import load_lab
    from bridge.labmqtt import mqtt_settings, parse_broker_url
    from bridge.mqttlink import ApiSettings

    if args.lab is not None:
        lab = load_lab(args.lab)
        settings, bridge_id = mqtt_settings(lab), lab.bridge_id
    else:
        fields = parse_broker_url(args.broker)
        settings = ApiSettings(**fields, source="--broker")
        bridge_id = "labbridge"
    if args.bridge_id:
        bridge_id = args.bridge_id
    changes: dict[str, Any] = {}
    if args.user is not None:
        changes.update(username=args.user, password_env=None, password_file=None)
    if args.password_env is not None:
        changes.update(password_env=args.password_env, password_file=None)
    if args.password_file is not None:
        changes.update(password_file=args.password_file, password_env=None)
    if args.ca is not None:
        changes["ca"] = args.ca
    return replace(settings, **changes, session_expiry_s=0), bridge_id


def _run_client(
    args: argparse.Namespace, topic: str, payload: dict[str, Any], prog: str
) -> tuple[int, dict[str, Any] | None]:
    from bridge.mqttlink import ApiError, topic_root
    from safety.yamldoc import ConfigError

    try:
        settings, bridge_id = _client_settings(args)
        reply, status = asyncio.run(
            request(settings, bridge_id, topic, payload, timeout=args.timeout)
        )
    except (ConfigError, ApiError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1, None
    if reply is None:
        state = (status or {}).get("state", "unknown: no retained status")
        print(
            f"{prog}: no reply from {topic_root(bridge_id)} within {args.timeout:g} s "
            f"(service status: {state})",
            file=sys.stderr,
        )
        return 2, None
    return (0 if reply.get("ok") else 1), reply


def estop_command(args: argparse.Namespace) -> int:
    """``labbridge estop --reason TEXT``: trip every station of the bridge over MQTT."""
    if args.clear_retained:
        return _clear_retained_estop(args)
    if not args.reason:
        print("labbridge estop: --reason is required (why: it is recorded)", file=sys.stderr)
        return 1
    payload: dict[str, Any] = {"reason": args.reason}
    if args.note:
        payload["note"] = args.note
    code, reply = _run_client(args, "estop", payload, "labbridge estop")
    if reply is None:
        return code
    if args.json:
        print(json.dumps(reply, indent=2))
        return code
    ms = float(reply.get("elapsed_s") or 0.0) * 1e3
    print(f"e-stop by {reply.get('who')} ({reply.get('reason')}): {ms:.0f} ms")
    for name, st in (reply.get("stations") or {}).items():
        if "error" in st:
            print(f"  {name}: ERROR {st['error']}")
            continue
        what = "already tripped" if st.get("already_tripped") else "tripped"
        failed = f"; FAILED: {', '.join(st['failed'])}" if st.get("failed") else ""
        print(f"  {name}: {what}, safe: {', '.join(st.get('safe') or []) or '-'}{failed}")
    for cid in reply.get("campaigns_aborted") or []:
        print(f"  campaign {cid} aborted")
    for w in reply.get("warnings") or []:
        print(f"  note: {w}")
    return code


def _clear_retained_estop(args: argparse.Namespace) -> int:
    """Publish the empty retained message that clears a retained e-stop of this user (the
    service, over MQTT v5, does not take it for an e-stop)."""
    from bridge.mqttlink import ApiError, topic_root
    from safety.yamldoc import ConfigError

    prog = "labbridge estop --clear-retained"

    async def clear(settings: ApiSettings, bridge_id: str) -> str:
        from bridge.mqttlink import MqttLink

        topic = f"{topic_root(bridge_id)}/estop/{settings.username or 'anonymous'}"
        link = MqttLink(replace(settings, client_id=f"labbridge-cli-{secrets.token_hex(4)}"))
        await link.open()
        try:
            if link.protocol != "5":
                raise ApiError(
                    f"the broker speaks MQTT {link.protocol}: there, an empty message on "
                    f"{topic} is an e-stop like any other; clear a retained e-stop only where "
                    "MQTT v5 is spoken (or stop the service first)"
                )
            await link.send(topic, b"", retain=True, wait=True)
        finally:
            await link.close()
        return topic

    try:
        settings, bridge_id = _client_settings(args)
        topic = asyncio.run(clear(settings, bridge_id))
    except (ConfigError, ApiError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(f"retained e-stop on {topic} cleared (nothing was tripped)")
    return 0


def reset_command(args: argparse.Namespace) -> int:
    """``labbridge reset --who NAME --why TEXT``: unlatch the stations over MQTT."""
    payload: dict[str, Any] = {"why": args.why}
    if args.note:
        payload["note"] = args.note
    if args.drain:
        payload["drain"] = True
    if args.station:
        payload["stations"] = args.station
    code, reply = _run_client(args, "reset", payload, "labbridge reset")
    if reply is None:
        return code
    if args.json:
        print(json.dumps(reply, indent=2))
        return code
    for name, st in (reply.get("stations") or {}).items():
        if st.get("ok"):
            what = "reset" if st.get("was_tripped") else "was not tripped"
            if st.get("drained_ml") is not None:
                what += f", vial drained ({st['drained_ml']:.2f} mL)"
            print(f"  {name}: {what}")
        else:
            print(f"  {name}: still latched: {st.get('error')}")
    for e in reply.get("errors") or []:
        if not any(e.startswith(f"{n}:") for n in reply.get("stations") or {}):
            print(f"  error: {e}")
    return code


def status_command(args: argparse.Namespace) -> int:
    """``labbridge status``: print the bridge's retained status (and campaigns') over MQTT."""
    from bridge.mqttlink import ApiError, topic_root
    from safety.yamldoc import ConfigError

    prog = "labbridge status"
    try:
        settings, bridge_id = _client_settings(args)
        found = asyncio.run(_read_retained(settings, bridge_id, args.campaign or [], args.timeout))
    except (ConfigError, ApiError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    status = found.get("status")
    if args.json:
        print(json.dumps(found, indent=2))
        missing = [c for c in args.campaign or [] if f"campaign:{c}" not in found]
        return 0 if status and not missing else 2
    if status is None:
        print(f"{prog}: no retained status on {topic_root(bridge_id)}/status: never served here")
        return 2
    state = status.get("state")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(status.get("t") or 0)))
    why = f": {status['reason']}" if status.get("reason") else ""
    print(f"{bridge_id}: {state}{why} (status of {when})")
    for name, st in (status.get("stations") or {}).items():
        if not st.get("ok"):
            print(f"  station {name}: ERROR {st.get('error')}")
            continue
        trip = st.get("trip") or {}
        flags = ["TRIPPED: " + str(trip.get("reason", "")) if st.get("tripped") else "ok"]
        if st.get("campaign"):
            flags.append(f"campaign {st['campaign']}")
        if st.get("experiment"):
            flags.append(f"running {st['experiment']}")
        print(f"  station {name}: {'; '.join(flags)}")
    for cid, c in (status.get("campaigns") or {}).items():
        if cid not in (args.campaign or []):
            print(f"  campaign {cid}: {c.get('state')}")
    code = 0
    for cid in args.campaign or []:
        cs = found.get(f"campaign:{cid}")
        if cs is None:
            print(f"  campaign {cid}: no status retained (no such campaign here?)")
            code = 2
            continue
        p = cs.get("progress") or {}
        best = (p.get("best") or {}).get("value")
        shown = "-" if best is None else f"{best:.4g}"
        print(
            f"  campaign {cid}: {cs.get('state')}, {p.get('experiments')}/{p.get('budget')} "
            f"experiments, best {shown}" + (f" ({cs['reason']})" if cs.get("reason") else "")
        )
    return code


async def _read_retained(
    settings: ApiSettings, bridge_id: str, campaigns: Sequence[str], timeout: float
) -> dict[str, Any]:
    from bridge.mqttlink import MqttLink, parse_payload, topic_root

    root = topic_root(bridge_id)
    client_id = f"labbridge-cli-{secrets.token_hex(4)}"
    wanted = {f"{root}/status": "status"}
    wanted.update({f"{root}/campaigns/{c}/status": f"campaign:{c}" for c in campaigns})
    link = MqttLink(replace(settings, client_id=client_id, session_expiry_s=0))
    await link.open([(t, 1) for t in wanted])
    found: dict[str, Any] = {}
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(timeout, 2.0)):
                while len(found) < len(wanted):
                    msg = await link.messages.get()
                    if msg.topic in wanted:
                        data, _ = parse_payload(msg.payload)
                        found[wanted[msg.topic]] = data
    finally:
        await link.close()
    return found


# ======================================================================== CLI
def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``labbridge serve --lab lab.yaml [--broker URL]``."""
    p = subparsers.add_parser(
        "serve",
        help="serve the lab's MQTT campaign API",
        description=(
            "Open the lab's stations (Ray, one station actor per bench) and serve the MQTT "
            "campaign API under labbridge/<bridge_id>/: start campaigns, agent proposals, "
            "pause/resume/stop/abort, e-stop and reset, retained status and per-experiment "
            "results (docs/mqtt-api.md). SIGINT/SIGTERM: running campaigns are aborted with "
            "every station in its safe state, the station actors are ended, and the status goes "
            "offline. On a cluster started with `ray start` (--ray-address, lab.yaml "
            "ray.address) the station actors outlive a killed service: started again within "
            "their lease (lab.yaml ray.lease_s, default 5 s), the service takes them over and "
            "carries on the campaigns they run, their experiments finishing "
            "(docs/cluster.md, 'When the service restarts')."
        ),
    )
    p.add_argument("--lab", type=Path, required=True, help="lab config (lab.yaml)")
    p.add_argument(
        "--broker",
        default=None,
        help="broker URL mqtt[s]://[user@]host[:port][?password_env=VAR] (default: mqtt.url in lab.yaml)",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster")
    p.add_argument(
        "--operator",
        default=os.environ.get("USER") or "operator",
        help=(
            "recorded as who stopped campaigns on shutdown, and as who recovered a station "
            "that rejoins (--rejoin) (default $USER)"
        ),
    )
    p.add_argument(
        "--rejoin",
        action="store_true",
        help=(
            "a campaign's station whose Ray node dies rejoins the campaign once the node is "
            "back, after a recovery in --operator's name (trip, reset, drain; docs/cluster.md)"
        ),
    )
    from bridge.agentcli import add_http_arguments  # the MCP server's, on the same service

    add_http_arguments(p, "--mcp-http", "--mcp-tls-cert", "--mcp-tls-key")
    from bridge.webcli import add_web_arguments  # the lab page, on the same service

    add_web_arguments(p)
    p.set_defaults(handler=_serve_command)
    return p


def _serve_command(args: argparse.Namespace) -> int:
    from bridge.mqttserve import serve_command

    return serve_command(args)


def add_mqtt_client_parsers(subparsers: Any) -> None:
    """``labbridge estop``, ``labbridge reset`` and ``labbridge status`` over MQTT."""
    estop = subparsers.add_parser(
        "estop",
        help="e-stop every station of a served lab (over MQTT)",
        description=(
            "Publish an e-stop to labbridge/<bridge_id>/estop and print what each station did. "
            "A software e-stop is layered above the bench's hardware e-stop, never a replacement."
        ),
    )
    _client_args(estop)
    estop.add_argument("--reason", default=None, help="why (recorded; required)")
    estop.add_argument(
        "--clear-retained",
        action="store_true",
        help="clear a retained e-stop published by this user (trips nothing; MQTT v5 brokers)",
    )
    estop.add_argument("--note", default=None, help="a note, logged (who e-stops is the MQTT user)")
    estop.add_argument("--json", action="store_true", help="print the reply as JSON")
    estop.set_defaults(handler=estop_command)
    reset = subparsers.add_parser(
        "reset",
        help="reset tripped stations of a served lab (over MQTT)",
        description=(
            "Unlatch tripped stations whose monitors have cleared; who and why are recorded. "
            "Nothing is switched back on."
        ),
    )
    _client_args(reset)
    reset.add_argument(
        "--note", default=None, help="a note, logged (who resets is the MQTT user, recorded)"
    )
    reset.add_argument("--why", required=True, help="why it is safe now (recorded)")
    reset.add_argument("--station", action="append", default=None, help="only this station")
    reset.add_argument(
        "--drain",
        action="store_true",
        help="also empty the vial through the guard (an experiment stopped half-way)",
    )
    reset.add_argument("--json", action="store_true", help="print the reply as JSON")
    reset.set_defaults(handler=reset_command)
    status = subparsers.add_parser(
        "status",
        help="show a served lab's status (over MQTT)",
        description="Print the retained status of labbridge/<bridge_id> and of campaigns.",
    )
    _client_args(status)
    status.add_argument("--campaign", action="append", default=None, help="also this campaign")
    status.add_argument("--json", action="store_true", help="print the statuses as JSON")
    status.set_defaults(handler=status_command)


def main(argv: list[str] | None = None) -> int:
    """``python -m bridge.mqttcli serve|estop|reset|status ...`` (the same as ``labbridge ...``)."""
    parser = argparse.ArgumentParser(prog="labbridge", description="The MQTT campaign API.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_parser(sub)
    add_mqtt_client_parsers(sub)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose == 0:
        logging.getLogger("bleak").setLevel(logging.ERROR)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
