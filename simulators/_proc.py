"""Helper processes (mosquitto, dbus-daemon) die with the simulator that started them.

A simulator's helper is stopped by its ``stop()``; but if the Python process
is killed (SIGKILL, ``timeout``, a crashed CI job) nothing runs, and the
broker or bus daemon would live on, orphaned. On Linux the child asks the
kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) by starting
through util-linux's ``setpriv --pdeathsig`` (present on every Debian-like
system; no ``preexec_fn``, which is unsafe with threads). The kernel clears
that setting when the child changes its user id, so a helper must not drop
privileges (the test broker stays ``user root`` when started as root).
"""

from __future__ import annotations

import shutil
import sys


def bound_to_parent(argv: list[str]) -> list[str]:
    """``argv`` prefixed so the child gets SIGTERM when this process dies (Linux); else unchanged."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]
