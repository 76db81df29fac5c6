"""The command line of the lab page: ``labbridge users passwd|remove|list`` and the ``--web``
options of ``labbridge serve`` and ``labbridge sim``.

Imports only the standard library at import time (the lab config, the password file and
the web server on use), so that ``labbridge --help`` stays fast. docs/web.md shows them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_WEB",
    "add_user_parsers",
    "add_web_arguments",
    "users_command",
    "web_bind",
]

#: where the lab page listens when asked without an address (loopback)
DEFAULT_WEB = "127.0.0.1:8765"


def add_web_arguments(p: argparse.ArgumentParser, *, optional_address: bool = False) -> None:
    """``--web HOST:PORT`` (``sim``: ``--web`` alone means :data:`DEFAULT_WEB`) and its TLS pair."""
    help_text = (
        "serve the lab page at http://HOST:PORT/ (loopback unless TLS"
        + (f"; --web alone: {DEFAULT_WEB}" if optional_address else "")
        + "; port 0: a free one)"
    )
    if optional_address:
        p.add_argument(
            "--web", nargs="?", const=DEFAULT_WEB, default=None, metavar="HOST:PORT", help=help_text
        )
    else:
        p.add_argument("--web", default=None, metavar="HOST:PORT", help=help_text)
    p.add_argument(
        "--web-tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="the lab page's TLS certificate",
    )
    p.add_argument("--web-tls-key", type=Path, default=None, metavar="PEM", help="its private key")


def web_bind(address: str, certfile: Path | None, keyfile: Path | None) -> Any:
    """A checked :class:`~bridge.httpserve.HttpBind` for the lab page (raises
    :class:`~bridge.httpserve.BindError`)."""
    from bridge.httpserve import parse_bind

    return parse_bind(
        address,
        certfile,
        keyfile,
        secrets="passwords and session cookies",
        tls_options="--web-tls-cert and --web-tls-key",
    )


# ===================================================================== users
def add_user_parsers(subparsers: Any) -> None:
    """``labbridge users passwd|remove|list``."""
    users = subparsers.add_parser(
        "users",
        help="set, remove and list the lab page's users' passwords",
        description=(
            "The people who log in to the lab page are lab.yaml's users (name: role, viewer or "
            "operator); their passwords are kept scrypt-hashed in the password file "
            "(user_passwords, default users.passwords next to lab.yaml, mode 0600)."
        ),
    )
    users.add_argument("action", choices=("passwd", "remove", "list"))
    users.add_argument("name", nargs="?", default=None, help="the user (passwd, remove)")
    users.add_argument("--lab", type=Path, required=True, help="lab config (lab.yaml)")
    secret = users.add_mutually_exclusive_group()
    secret.add_argument(
        "--password-env", default=None, help="passwd: read the new password from this variable"
    )
    secret.add_argument(
        "--password-file", type=Path, default=None, help="passwd: read it from this file"
    )
    users.add_argument("--json", action="store_true", help="list: as JSON")
    users.set_defaults(handler=users_command)


def _new_password(args: argparse.Namespace, prog: str) -> str | None:
    if args.password_env is not None:
        value = os.environ.get(args.password_env)
        if value is None:
            print(f"{prog}: ${args.password_env} is not set", file=sys.stderr)
        return value
    if args.password_file is not None:
        try:
            return args.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            print(f"{prog}: cannot read {args.password_file}: {exc}", file=sys.stderr)
            return None
    if not sys.stdin.isatty():
        print(
            f"{prog}: no terminal to ask for the password: give --password-env or --password-file",
            file=sys.stderr,
        )
        return None
    first = getpass.getpass(f"new password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        print(f"{prog}: the two passwords differ; nothing changed", file=sys.stderr)
        return None
    return first


def users_command(args: argparse.Namespace) -> int:
    """``labbridge users ...``: 0 when done, 1 with the reason on stderr."""
    from bridge.labconfig import load_lab
    from bridge.webusers import PERMISSIONS, PasswordFileError
    from safety.yamldoc import ConfigError

    prog = f"labbridge users {args.action}"
    try:
        lab = load_lab(args.lab)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    users, store = lab.users, lab.users.store()
    try:
        if args.action == "list":
            records = store.records()
            rows = [
                {
                    "user": name,
                    "role": users.roles.get(name),
                    "may": sorted(PERMISSIONS[users.roles[name]]) if name in users.roles else [],
                    "password_set": records[name].set if name in records else None,
                }
                for name in [*users.roles, *(n for n in records if n not in users.roles)]
            ]
            if args.json:
                print(json.dumps({"password_file": str(store.path), "users": rows}, indent=2))
                return 0
            print(f"users of {lab.source} (passwords: {store.path})")
            for row in rows:
                role = row["role"] or "NOT in lab.yaml: cannot log in"
                pw = f"password set {row['password_set']}" if row["password_set"] else "no password"
                print(f"  {row['user']}: {role}; {pw}")
            return 0
        if not args.name:
            print(f"{prog}: name the user", file=sys.stderr)
            return 1
        if args.action == "remove":
            if not store.remove(args.name):
                print(f"{prog}: {args.name} has no password in {store.path}", file=sys.stderr)
                return 1
            print(f"{args.name}'s password removed: they can no longer log in")
            return 0
        if args.name not in users.roles:
            known = ", ".join(users.roles) or "none"
            print(
                f"{prog}: no user {args.name!r} in {lab.source}'s users (users: {known}): add "
                "them there with a role first (viewer or operator)",
                file=sys.stderr,
            )
            return 1
        password = _new_password(args, prog)
        if password is None:
            return 1
        store.set(args.name, password, who=os.environ.get("USER") or "operator")
        print(
            f"password of {args.name} ({users.roles[args.name]}) set, scrypt-hashed in {store.path}"
        )
        return 0
    except (PasswordFileError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
