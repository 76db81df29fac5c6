"""The command line for agents: ``labbridge agents issue|revoke|list`` and ``labbridge mcp``.

Imports only the standard library at import time (the lab config, the token store and the
MCP SDK on use), so that ``labbridge --help`` stays fast. docs/agents.md shows them in use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TOKEN_ENV", "add_agent_parsers", "agents_command", "main", "mcp_command"]

#: the environment variable that holds the stdio transport's agent token
TOKEN_ENV = "LABBRIDGE_AGENT_TOKEN"


def _lab(args: argparse.Namespace, prog: str) -> Any:
    from bridge.labconfig import load_lab
    from safety.yamldoc import ConfigError

    try:
        return load_lab(args.lab)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def _scopes(text: str) -> list[str]:
    from bridge.agenttokens import ACTIONS

    scopes = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in scopes if s not in ACTIONS]
    if bad or not scopes:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated list of {', '.join(ACTIONS)}"
        )
    return scopes


def agents_command(args: argparse.Namespace) -> int:
    """``labbridge agents issue|revoke|list``: 0 when done, 1 with the reason on stderr."""
    from bridge.agenttokens import ACTIONS, TokenFileError

    prog = f"labbridge agents {args.action}"
    lab = _lab(args, prog)
    if lab is None:
        return 1
    agents, store = lab.agents.agents, lab.agents.store()
    try:
        if args.action == "list":
            return _list(lab, store, args.json)
        name = args.name
        if args.action == "issue":
            if name not in agents:
                known = ", ".join(agents) or "none"
                print(
                    f"{prog}: no agent {name!r} in {lab.source}'s agents (agents: {known}): add "
                    "it there with its scopes first (deny by default)",
                    file=sys.stderr,
                )
                return 1
            who = os.environ.get("USER") or "operator"
            token = store.issue(name, args.scope or list(ACTIONS), who=who)
            record = store.records()[name]
            print(token)  # alone on stdout: TOKEN=$(labbridge agents issue ...)
            print(
                f"{prog}: token for agent:{name} ({', '.join(record.scopes)}; fingerprint "
                f"{record.fingerprint}) written hashed to {store.path}. It is shown once: give "
                "it to the agent now (an old token of this agent no longer works).",
                file=sys.stderr,
            )
            return 0
        gone = store.revoke(name)
        if gone is None:
            print(f"{prog}: agent {name!r} has no token in {store.path}", file=sys.stderr)
            return 1
        print(
            f"agent:{name}'s token (fingerprint {gone.fingerprint}) revoked: refused from its "
            "next request on"
        )
        return 0
    except TokenFileError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


def _list(lab: Any, store: Any, as_json: bool) -> int:
    records = store.records()
    rows = []
    for name in [*lab.agents.agents, *(n for n in records if n not in lab.agents.agents)]:
        config = lab.agents.agents.get(name)
        rec = records.get(name)
        rows.append(
            {
                "agent": name,
                "in_lab_yaml": config is not None,
                "scopes": config.as_dict() if config is not None else None,
                "token": None
                if rec is None
                else {
                    "fingerprint": rec.fingerprint,
                    "actions": list(rec.scopes),
                    "issued": rec.issued,
                    "issued_by": rec.issued_by,
                },
            }
        )
    if as_json:
        print(json.dumps({"token_file": str(store.path), "agents": rows}, indent=2))
        return 0
    print(f"agents of {lab.source} (tokens: {store.path})")
    for row in rows:
        tok = row["token"]
        has = (
            f"token {tok['fingerprint']} for {', '.join(tok['actions'])}, issued {tok['issued']} "
            f"by {tok['issued_by']}"
            if tok
            else "no token"
        )
        if not row["in_lab_yaml"]:
            print(f"  {row['agent']}: NOT IN lab.yaml (its token is refused); {has}")
            continue
        grants = (
            "; ".join(f"{k}: {', '.join(v)}" for k, v in row["scopes"].items() if v)
            or "nothing (deny by default)"
        )
        print(f"  {row['agent']}: {grants}; {has}")
    return 0


def mcp_command(args: argparse.Namespace) -> int:
    """``labbridge mcp``: serve until the client leaves or a signal; 1 on a refusal.

    A refusal it can tell before opening anything (no token, a token that does not
    authenticate, a bind beyond loopback without TLS) comes first, before the heavy imports."""
    import asyncio

    from bridge.agents import Authenticator, AuthError

    prog = "labbridge mcp"
    token = os.environ.get(TOKEN_ENV, "").strip()
    if args.http is None and not token:
        print(
            f"{prog}: no agent token: set {TOKEN_ENV} to the token `labbridge agents issue "
            "NAME` printed (the stdio transport serves that one agent)",
            file=sys.stderr,
        )
        return 1
    lab = _lab(args, prog)
    if lab is None:
        return 1
    try:
        if args.http is None:
            Authenticator(lab.agents).authenticate(token)
    except AuthError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    from bridge.campaigns import StationUnavailable
    from bridge.mcpserver import McpError, parse_bind, serve_http, serve_stdio
    from bridge.servicetypes import ServiceError

    try:
        if args.http is None:
            why = asyncio.run(
                serve_stdio(lab, token, ray_address=args.ray_address, operator=args.operator)
            )
        else:
            bind = parse_bind(args.http, args.tls_cert, args.tls_key)

            def online(url: str) -> None:
                print(f"{prog}: {lab.bridge_id} on {url}; Ctrl-C to stop", file=sys.stderr)

            why = asyncio.run(
                serve_http(
                    lab,
                    bind,
                    ray_address=args.ray_address,
                    operator=args.operator,
                    on_online=online,
                )
            )
    except (McpError, AuthError, ServiceError, StationUnavailable, OSError) as exc:
        if getattr(args, "debug", False):  # --debug: the traceback, not the line
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"{prog}: stopped ({why})", file=sys.stderr)
    return 0


def add_agent_parsers(subparsers: Any) -> None:
    """``labbridge agents ...`` and ``labbridge mcp``."""
    agents = subparsers.add_parser(
        "agents",
        help="issue, revoke and list agents' tokens (MCP)",
        description=(
            "Agents (docs/agents.md) are named in lab.yaml's agents, with what each may read, "
            "propose to, start and control; their bearer tokens are kept hashed in the file "
            "agent_tokens names (default agents.tokens next to lab.yaml, mode 0600)."
        ),
    )
    actions = agents.add_subparsers(dest="action", metavar="ACTION", required=True)
    issue = actions.add_parser(
        "issue",
        help="print a new token for an agent (once; replaces its old one)",
        description="Print a new bearer token for an agent of lab.yaml (stdout, alone; shown "
        "once) and keep its hash. The agent's old token stops working.",
    )
    issue.add_argument("name", help="the agent (as named in lab.yaml's agents)")
    issue.add_argument(
        "--scope",
        type=_scopes,
        default=None,
        help="only these actions (comma-separated: read,propose,start,control; default all "
        "that lab.yaml grants)",
    )
    revoke = actions.add_parser("revoke", help="revoke an agent's token (at once)")
    revoke.add_argument("name", help="the agent")
    listing = actions.add_parser("list", help="the agents, their scopes and tokens (no secrets)")
    listing.add_argument("--json", action="store_true", help="as JSON")
    for p in (issue, revoke, listing):
        p.add_argument("--lab", type=Path, required=True, help="lab config (lab.yaml)")
    agents.set_defaults(handler=agents_command)

    mcp = subparsers.add_parser(
        "mcp",
        help="serve the lab to agents over the Model Context Protocol",
        description=(
            "Open the lab and serve it to agents over MCP (docs/agents.md): over stdio for the "
            "agent whose token is in $LABBRIDGE_AGENT_TOKEN (an MCP client starts this command), "
            "or with --http HOST:PORT over streamable HTTP, each request carrying its agent's "
            "bearer token. Tools read the lab, dry-run and propose experiments; none commands "
            "an instrument. To serve MCP next to the MQTT API, use `labbridge serve --mcp-http`."
        ),
    )
    mcp.add_argument("--lab", type=Path, required=True, help="lab config (lab.yaml)")
    add_http_arguments(mcp, "--http", "--tls-cert", "--tls-key")
    mcp.add_argument("--ray-address", default=None, help="join this Ray cluster")
    mcp.add_argument(
        "--operator",
        default=os.environ.get("USER") or "operator",
        help="recorded as who stopped campaigns on shutdown (default $USER)",
    )
    mcp.set_defaults(handler=mcp_command)


def add_http_arguments(p: argparse.ArgumentParser, http: str, cert: str, key: str) -> None:
    """The MCP HTTP transport's options (``mcp --http``, ``serve --mcp-http``)."""
    p.add_argument(
        http,
        default=None,
        metavar="HOST:PORT",
        help="serve MCP over streamable HTTP at http://HOST:PORT/mcp (loopback unless TLS)",
    )
    p.add_argument(cert, type=Path, default=None, metavar="PEM", help="TLS certificate")
    p.add_argument(key, type=Path, default=None, metavar="PEM", help="TLS private key")


def main(argv: list[str] | None = None) -> int:
    """``python -m bridge.agentcli agents|mcp ...`` (the same as ``labbridge ...``)."""
    import logging

    parser = argparse.ArgumentParser(prog="labbridge", description="Agents and MCP.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_agent_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
