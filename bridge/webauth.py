"""Who is at the lab page: logins, sessions, CSRF and roles (the rules are here, the routes
in :mod:`bridge.webapp`).

* **Login** against lab.yaml's ``users`` and the password file (:mod:`bridge.webusers`):
  the scrypt check runs on a worker thread, one at a time (the event loop that serves
  e-stops never hashes), and a user's failed logins slow the next ones down (1 s after
  the fifth failure, doubling up to :data:`MAX_LOCKOUT_S`); every refusal says the same
  "wrong user or password".
* **Sessions** live in this process (a restart logs everyone out): a random id in a cookie
  that is ``HttpOnly``, ``SameSite=Strict``, ``Path=/`` and ``Secure`` when served over TLS;
  it expires :data:`SESSION_IDLE_S` after its last use and :data:`SESSION_MAX_S` after the
  login. At most :data:`MAX_SESSIONS` at once (the oldest goes).
* **CSRF**: every state-changing request is a ``POST`` with a JSON body (a cross-site form
  cannot send one without a preflight), an ``Origin`` header, when the browser sends one,
  equal to the page's own, and (once logged in) the session's CSRF token in the
  ``X-CSRF-Token`` header, which only the page's own script can read (``/api/state``).
* **Roles**: what a user may do is lab.yaml's role (:data:`bridge.webusers.PERMISSIONS`),
  looked up at every request; reading needs no login.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from bridge.webusers import MAX_PASSWORD_CHARS, PERMISSIONS, USER_NAME, UsersConfig

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "AuthRefused",
    "Session",
    "Sessions",
]

COOKIE = "labbridge_session"
CSRF_HEADER = "x-csrf-token"
SESSION_IDLE_S = 8 * 3600.0
SESSION_MAX_S = 24 * 3600.0
MAX_SESSIONS = 1000
#: failed logins of one user before the next ones are slowed down
FREE_FAILURES = 5
MAX_LOCKOUT_S = 300.0


class AuthRefused(PermissionError):
    """A request refused for who sent it: ``status`` 401 (log in), 403 (not allowed) or 429."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    id: str
    user: str
    csrf: str
    created: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return now - self.used > SESSION_IDLE_S or now - self.created > SESSION_MAX_S


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0


class Sessions:
    """The logged-in sessions of one lab page, and the logins that make them."""

    def __init__(self, users: UsersConfig, *, secure: bool) -> None:
        self.users = users
        self.store = users.store()
        self.secure = secure
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._failures: dict[str, _Failures] = {}
        self._hashing = asyncio.Semaphore(1)

    # ------------------------------------------------------------------ login
    async def login(self, user: Any, password: Any) -> Session:
        """A new session for ``user``; :class:`AuthRefused` (one line) otherwise."""
        if not isinstance(user, str) or not isinstance(password, str):
            raise AuthRefused("give a user and a password", 400)
        if not USER_NAME.match(user) or not 0 < len(password) <= MAX_PASSWORD_CHARS:
            raise AuthRefused("wrong user or password", 401)
        now = time.monotonic()
        failures = self._failures.get(user)
        if failures is not None and failures.until > now:
            raise AuthRefused(
                f"too many failed logins for {user}: try again in {failures.until - now:.0f} s",
                429,
            )
        ok = user in self.users.roles
        async with self._hashing:  # one scrypt at a time, off the event loop
            # hashed even for an unknown user: the answer's timing does not say who exists
            checked = await asyncio.to_thread(self.store.check, user, password)
        if not (ok and checked):
            f = self._failures.setdefault(user, _Failures())
            f.count += 1
            if f.count >= FREE_FAILURES:
                f.until = time.monotonic() + min(MAX_LOCKOUT_S, 2.0 ** (f.count - FREE_FAILURES))
            if len(self._failures) > MAX_SESSIONS:  # bounded: forget the oldest entries
                self._failures.pop(next(iter(self._failures)))
            raise AuthRefused("wrong user or password", 401)
        self._failures.pop(user, None)
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32))
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def logout(self, session: Session | None) -> None:
        if session is not None:
            self._sessions.pop(session.id, None)

    # --------------------------------------------------------------- requests
    def session(self, cookie: str | None) -> Session | None:
        """The live session of a cookie value, or None (unknown, expired, user removed)."""
        if not cookie or len(cookie) > 128:
            return None
        found = self._sessions.get(cookie)
        now = time.monotonic()
        if found is None:
            return None
        if found.expired(now) or found.user not in self.users.roles:
            self._sessions.pop(cookie, None)
            return None
        found.used = now
        self._sessions.move_to_end(cookie)
        return found

    def permissions(self, session: Session | None) -> list[str]:
        if session is None:
            return []
        return sorted(PERMISSIONS[self.users.roles[session.user]])

    def require(self, session: Session | None, action: str, csrf: str | None, what: str) -> Session:
        """The session if it may ``action`` and the request carries its CSRF token."""
        if session is None:
            raise AuthRefused(f"log in to {what}", 401)
        if not csrf or not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
            raise AuthRefused(
                "the request lacks this session's CSRF token (X-CSRF-Token): reload the page", 403
            )
        if not self.users.may(session.user, action):
            role = self.users.roles.get(session.user, "none")
            raise AuthRefused(
                f"{session.user} ({role}) may not {what}: lab.yaml's users give that to operators",
                403,
            )
        return session

    def cookie(self, session: Session) -> dict[str, Any]:
        """``Response.set_cookie`` arguments for ``session``."""
        return {
            "key": COOKIE,
            "value": session.id,
            "httponly": True,
            "samesite": "strict",
            "secure": self.secure,
            "path": "/",
        }
