"""Agents' bearer tokens, stored hashed: the file ``labbridge agents issue/revoke/list`` keeps.

A token is ``lbt_`` + 43 URL-safe characters: 32 random bytes from :mod:`secrets`. It is
shown once, when it is issued; the file keeps only its SHA-256, the actions it may be
used for and who issued it when. One token per agent: issuing again replaces the old one
(which stops working at once); revoking removes it.

Why SHA-256 and not a slow password hash (scrypt, argon2): a slow hash makes each guess of
a *low-entropy* secret (a password a person chose) expensive. A token has 256 bits of
entropy; finding one whose SHA-256 is in the file takes about 2^256 hashes at any speed,
so stretching adds nothing -- and every MCP HTTP request verifies its token, where a
fast hash keeps that at microseconds. Comparisons use :func:`hmac.compare_digest`.

The file (JSON, ``agent_tokens`` in lab.yaml, default ``agents.tokens`` next to it) is
written atomically (a temporary file in the same folder, fsync'ed, then renamed over it),
mode 0600; a file others can read or write is refused, as ssh refuses such a key. It is
read again whenever it changes on disk, so a revocation takes effect on the next request
of a running server, without a restart (:class:`bridge.secretfile.SecretFile` keeps it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.secretfile import SecretFile

__all__ = [
    "ACTIONS",
    "TOKEN_PREFIX",
    "TokenFileError",
    "TokenRecord",
    "TokenStore",
    "token_hash",
]

TOKEN_PREFIX = "lbt_"
#: what a token may be used for (lab.yaml's scopes say on which campaigns and stations)
ACTIONS = ("read", "propose", "start", "control")
#: longer than any token we issue: longer input is refused unhashed
MAX_TOKEN_CHARS = 128
_FORMAT = "labbridge-agent-tokens"
_VERSION = 1


class TokenFileError(ValueError):
    """The token file cannot be used (the message names the file and what to do)."""


def token_hash(token: str) -> str:
    """The SHA-256 of a token, hex (what the file keeps)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """One agent's token as stored: never the token, its hash."""

    agent: str
    sha256: str
    scopes: tuple[str, ...]
    issued: str
    issued_by: str

    @property
    def fingerprint(self) -> str:
        """A short, public name for the token (the start of its hash): for lists and logs."""
        return self.sha256[:12]

    def as_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "scopes": list(self.scopes),
            "issued": self.issued,
            "issued_by": self.issued_by,
        }


class TokenStore:
    """The hashed tokens of one lab (see the module docstring); safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: SecretFile[dict[str, TokenRecord]] = SecretFile(
            self.path,
            what="the agent token file",
            parse=self._parse,
            missing=dict,
            error_cls=TokenFileError,
            fix="it is written by `labbridge agents issue`; restore it or issue the tokens again",
        )

    # ------------------------------------------------------------------ reads
    def records(self) -> dict[str, TokenRecord]:
        """Agent -> its token record, as the file says now (read again when it changed)."""
        return dict(self._file.load())

    def lookup(self, token: str) -> TokenRecord | None:
        """The record whose hash is the token's, or None (also for anything not shaped like
        one of our tokens, which is never hashed)."""
        if (
            not isinstance(token, str)
            or not token.startswith(TOKEN_PREFIX)
            or len(token) > MAX_TOKEN_CHARS
        ):
            return None
        digest = token_hash(token)
        found = None
        for record in self.records().values():  # every entry compared, in constant time each
            if hmac.compare_digest(record.sha256, digest):
                found = record
        return found

    def _parse(self, data: Any) -> dict[str, TokenRecord]:
        def bad(problem: str) -> TokenFileError:
            return TokenFileError(
                f"the agent token file {self.path}: {problem} (it is written by "
                "`labbridge agents issue`; do not edit it by hand)"
            )

        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise bad(f'not a labbridge agent token file (no "format": "{_FORMAT}")')
        if data.get("version") != _VERSION:
            raise bad(f"version {data.get('version')!r}, this labbridge reads version {_VERSION}")
        tokens = data.get("tokens")
        if not isinstance(tokens, dict):
            raise bad('"tokens" must be a mapping of agent -> token record')
        out: dict[str, TokenRecord] = {}
        for agent, rec in tokens.items():
            if not isinstance(rec, dict):
                raise bad(f"agent {agent!r}: its record must be a mapping")
            digest, scopes = rec.get("sha256"), rec.get("scopes")
            if not isinstance(digest, str) or len(digest) != 64:
                raise bad(f"agent {agent!r}: sha256 must be 64 hex digits")
            if not isinstance(scopes, list) or not set(scopes) <= set(ACTIONS):
                raise bad(f"agent {agent!r}: scopes must be a list of {', '.join(ACTIONS)}")
            out[str(agent)] = TokenRecord(
                str(agent),
                digest,
                tuple(scopes),
                str(rec.get("issued", "")),
                str(rec.get("issued_by", "")),
            )
        return out

    # ----------------------------------------------------------------- writes
    def issue(self, agent: str, scopes: Sequence[str] = ACTIONS, *, who: str) -> str:
        """A new token for ``agent`` (replacing its old one): returns the token itself, the
        only time it exists outside the agent's hands; the file keeps its hash."""
        unknown = [s for s in scopes if s not in ACTIONS]
        if unknown or not scopes:
            raise ValueError(f"scopes must be some of {', '.join(ACTIONS)}, got {list(scopes)}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(
            agent,
            token_hash(token),
            tuple(a for a in ACTIONS if a in scopes),
            time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            who,
        )
        with self._file.locked():
            records = self.records()
            records[agent] = record
            self._write(records)
        return token

    def revoke(self, agent: str) -> TokenRecord | None:
        """Remove ``agent``'s token (it stops working at once); the record removed, or None."""
        with self._file.locked():
            records = self.records()
            gone = records.pop(agent, None)
            if gone is not None:
                self._write(records)
        return gone

    def _write(self, records: dict[str, TokenRecord]) -> None:
        data = {
            "format": _FORMAT,
            "version": _VERSION,
            "note": "agents' bearer tokens, SHA-256 hashed; written by `labbridge agents`",
            "tokens": {a: r.as_dict() for a, r in sorted(records.items())},
        }
        self._file.write(data)
