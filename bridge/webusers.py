"""The people who log in to the lab page: lab.yaml's ``users`` (roles) and their passwords.

lab.yaml::

    users:                            # who may act from the lab page (reading needs no login)
      ana: operator                   # operator: pause/resume/stop/abort campaigns, approve or
                                      # deny agents' proposals, reset, e-stop
      ben: viewer                     # viewer: e-stop only (stopping is never the risky way)
    user_passwords: users.passwords   # their hashed passwords (relative to lab.yaml; the default)

A role is one of :data:`ROLES`; what each may do is :data:`PERMISSIONS`. Deny by default:
a user not in lab.yaml cannot log in whatever the password file says, and a user without a
password set cannot log in at all. ``labbridge users passwd NAME --lab lab.yaml`` sets a
password (:mod:`bridge.webcli`).

Passwords are people's: low entropy, so each is stored as scrypt (:func:`hashlib.scrypt`,
N=2^15, r=8, p=1: 32 MiB and ~1 s per check measured on a 2-core machine at load
average ~25, a random 16-byte salt per password),
never the password. The file (JSON, mode 0600, written atomically, read again when it
changes: :class:`bridge.secretfile.SecretFile`) is refused if others can read it.
Checks compare in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.secretfile import SecretFile
from safety.yamldoc import YamlDoc

__all__ = [
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "PERMISSIONS",
    "ROLES",
    "PasswordFileError",
    "PasswordStore",
    "UsersConfig",
    "hash_password",
    "parse_users",
    "verify_password",
]

#: a user's name (also who the journal names for what they do)
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
#: what each role may do from the lab page; reading needs no login at all
PERMISSIONS: Mapping[str, frozenset[str]] = {
    "viewer": frozenset({"estop"}),
    "operator": frozenset({"estop", "control", "reset", "approve"}),
}
ROLES = tuple(PERMISSIONS)
DEFAULT_PASSWORD_FILE = "users.passwords"
MIN_PASSWORD_CHARS = 8
#: longer input is refused before it is hashed
MAX_PASSWORD_CHARS = 1024
_FORMAT = "labbridge-user-passwords"
_VERSION = 1
#: scrypt's cost: N (CPU/memory), r (block size), p (parallelism); 128*N*r bytes of memory
_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024


class PasswordFileError(ValueError):
    """The password file cannot be used (the message names the file and what to do)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of ``password`` with a new random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=32
    )
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (a :func:`hash_password` string) was made of."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(want),
        )
    except (ValueError, TypeError):  # a malformed entry (or cost beyond maxmem) never matches
        return False
    return hmac.compare_digest(got, want)


@functools.cache
def _dummy_hash() -> str:
    """A hash of nothing anyone knows, checked for users without a password."""
    return hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class PasswordRecord:
    user: str
    scrypt: str
    set: str
    set_by: str

    def as_dict(self) -> dict[str, Any]:
        return {"scrypt": self.scrypt, "set": self.set, "set_by": self.set_by}


class PasswordStore:
    """The hashed passwords of one lab's users (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: SecretFile[dict[str, PasswordRecord]] = SecretFile(
            self.path,
            what="the password file",
            parse=self._parse,
            missing=dict,
            error_cls=PasswordFileError,
            fix="it is written by `labbridge users passwd`; restore it or set the passwords again",
        )

    def records(self) -> dict[str, PasswordRecord]:
        """User -> their password record, as the file says now."""
        return dict(self._file.load())

    def check(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s (False for a user without one, after the same
        scrypt work: the time taken does not say who has a password). Slow on purpose:
        call it off the event loop."""
        if not 0 < len(password) <= MAX_PASSWORD_CHARS:
            return False
        record = self.records().get(user)
        if record is None:
            verify_password(password, _dummy_hash())
            return False
        return verify_password(password, record.scrypt)

    def set(self, user: str, password: str, *, who: str) -> None:
        """Set ``user``'s password (replacing the old one)."""
        if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
            raise ValueError(
                f"a password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters "
                f"long (got {len(password)})"
            )
        record = PasswordRecord(
            user, hash_password(password), time.strftime("%Y-%m-%dT%H:%M:%S%z"), who
        )
        with self._file.locked():
            records = self.records()
            records[user] = record
            self._write(records)

    def remove(self, user: str) -> bool:
        """Remove ``user``'s password (they can no longer log in); whether there was one."""
        with self._file.locked():
            records = self.records()
            gone = records.pop(user, None)
            if gone is not None:
                self._write(records)
        return gone is not None

    def _write(self, records: Mapping[str, PasswordRecord]) -> None:
        self._file.write(
            {
                "format": _FORMAT,
                "version": _VERSION,
                "note": "lab page users' passwords, scrypt-hashed; written by `labbridge users`",
                "users": {u: r.as_dict() for u, r in sorted(records.items())},
            }
        )

    def _parse(self, data: Any) -> dict[str, PasswordRecord]:
        def bad(problem: str) -> PasswordFileError:
            return PasswordFileError(
                f"the password file {self.path}: {problem} (it is written by `labbridge users "
                "passwd`; do not edit it by hand)"
            )

        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise bad(f'not a labbridge password file (no "format": "{_FORMAT}")')
        if data.get("version") != _VERSION:
            raise bad(f"version {data.get('version')!r}, this labbridge reads version {_VERSION}")
        users = data.get("users")
        if not isinstance(users, dict):
            raise bad('"users" must be a mapping of user -> password record')
        out: dict[str, PasswordRecord] = {}
        for user, rec in users.items():
            if not isinstance(rec, dict) or not str(rec.get("scrypt", "")).startswith("scrypt$"):
                raise bad(f"user {user!r}: its record must have an scrypt hash")
            out[str(user)] = PasswordRecord(
                str(user), str(rec["scrypt"]), str(rec.get("set", "")), str(rec.get("set_by", ""))
            )
        return out


@dataclass(frozen=True)
class UsersConfig:
    """lab.yaml's ``users`` (name -> role) and ``user_passwords``."""

    password_file: Path = Path(DEFAULT_PASSWORD_FILE)
    roles: Mapping[str, str] = field(default_factory=dict)
    source: str = "<lab>"

    def store(self) -> PasswordStore:
        return PasswordStore(self.password_file)

    def may(self, user: str, action: str) -> bool:
        """lab.yaml's role of ``user`` allows ``action`` (``estop``, ``control``, ``reset``)."""
        role = self.roles.get(user)
        return role is not None and action in PERMISSIONS[role]


def parse_users(users: Any, password_file: Any, doc: YamlDoc, base: Path) -> UsersConfig:
    """Validate lab.yaml's ``users`` and ``user_passwords``; errors name file, line and field."""
    path = Path(DEFAULT_PASSWORD_FILE)
    if password_file is not None:
        if not isinstance(password_file, str) or not password_file.strip():
            raise doc.error(
                f"must be a file path (the hashed password file), got {password_file!r}",
                ("user_passwords",),
            )
        path = Path(password_file).expanduser()
    if not path.is_absolute():
        path = base / path
    if users is None:
        return UsersConfig(path, {}, doc.source)
    if not isinstance(users, Mapping):
        raise doc.error(
            f"must be a mapping of user name -> role ({', '.join(ROLES)}), got "
            f"{type(users).__name__}",
            ("users",),
        )
    roles: dict[str, str] = {}
    for name, role in users.items():
        at: tuple[Any, ...] = ("users", name)
        if not isinstance(name, str) or not USER_NAME.match(name):
            raise doc.error(f"{name!r} is not a user name (letters, digits, _ . @ -)", at)
        if role not in ROLES:
            raise doc.error(
                f"role {role!r} is not one of {', '.join(ROLES)} (viewer: e-stop only; operator: "
                "also pause, resume, stop and abort campaigns, approve or deny agents' proposals "
                "and reset stations)",
                at,
            )
        roles[name] = str(role)
    return UsersConfig(path, roles, doc.source)
