"""One process per campaign: :func:`campaign_lock` (a flock on a file beside the journal).

A second ``run``/``resume`` of a campaign that a live process runs raises
:class:`CampaignBusy` instead of racing it for the same stations and journal rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CampaignBusy", "campaign_lock"]


class CampaignBusy(RuntimeError):
    """Another process already runs this campaign (its lock file is held)."""


@contextlib.contextmanager
def campaign_lock(journal_path: str | Path, campaign_id: str) -> Iterator[Path]:
    """Hold ``<journal>.<campaign>.lock`` (flock) while this process runs the campaign.

    A second ``run``/``resume`` of the same campaign raises :class:`CampaignBusy`
    instead of racing the first one for the same stations and journal rows. The
    kernel drops the lock when the holder dies (kill -9 included).
    """
    path = Path(f"{Path(journal_path).resolve()}.{campaign_id}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise CampaignBusy(
                f"campaign {campaign_id} is already running (pid {holder} holds {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)
