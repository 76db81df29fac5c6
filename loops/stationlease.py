"""A station's lease: nothing acts on a bench without a live owner (:class:`Lease`).

The campaign that uses a station (its owner: the process running
:class:`~loops.campaign.CampaignRunner`) takes a lease on the station actor with its
epoch (:meth:`Journal.take_ownership <loops.journal.Journal.take_ownership>`: each
run or resume of a campaign takes the next one) and renews it every
:data:`RENEW_S` real seconds. The actor checks the lease before every recipe step
and every :data:`POLL_S` while a step acts or waits; when the owner stops renewing
(``kill -9``, a crash, a partition) for :data:`LEASE_S`, the lease is *lost*: the
station trips (every instrument to its safe state, latched, the reason naming the
lost owner), the running recipe stops, and nothing more is journaled as its progress.

Fencing: a lease is taken with an epoch; a call with an older epoch is refused
(:class:`~loops.journal.StaleOwner`), and a lost epoch stays lost (only a new owner,
with a higher epoch, takes the station again). The journal refuses progress writes
of an old epoch as well. Hand-over: a new owner (a higher epoch) takes the station
only once the old lease is released, lost or run out (:class:`LeaseHeld` until then):
an old owner that is still alive (stalled, stopped) has its station tripped by its
own lease running out before anyone else acts on it. Bound: after the owner's last renewal reaches the actor,
its lease ends within ``LEASE_S`` and the station trips within ``LEASE_S + 2 * POLL_S``
(measured in ``tests/test_lease.py``).

Times are real (``time.monotonic`` in the actor's process), not a simulated bench's
clock: an owner dies in real time.
"""

from __future__ import annotations

import math
import time
from typing import Any

from loops.journal import StaleOwner
from loops.stationerrors import StationError

__all__ = ["LEASE_S", "POLL_S", "RENEW_S", "Lease", "LeaseHeld", "OwnerLost", "StaleOwner"]

#: how long a lease lasts without a renewal (real seconds): five renewal periods, so a
#: campaign process stalled for a few seconds on a loaded machine does not trip its stations
LEASE_S = 5.0
#: how often an owner renews its leases (real seconds)
RENEW_S = 1.0
#: how often the station actor looks at its lease (real seconds); a lease found run out
#: is looked at once more after this long (renewals queued behind a stall arrive first)
POLL_S = 0.1


class OwnerLost(StationError):
    """The station's owner stopped renewing its lease (or released it): the station acts
    for nobody until a new owner takes it with a higher epoch."""


class LeaseHeld(StationError):
    """A newer owner asked for a station whose older owner's lease is still live: it takes
    the station once that lease is released or runs out (the station trips then)."""


class Lease:
    """One station's lease (module docstring); not thread-safe (the actor's event loop)."""

    def __init__(self, station: str) -> None:
        self.station = station
        self.owner: str | None = None
        self.epoch: int | None = None  # the highest epoch that took the lease
        self.ttl_s = LEASE_S
        self.expires = 0.0  # time.monotonic()
        self.held = False
        self.timed_out = False  # the current epoch's lease ran out (not released)
        self.lost: str | None = None  # why the current epoch's lease ended

    def as_dict(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "epoch": self.epoch,
            "held": self.held,
            "ttl_s": self.ttl_s,
            "remaining_s": max(0.0, self.expires - time.monotonic()) if self.held else 0.0,
            "lost": self.lost,
        }

    def take(self, owner: str, epoch: int, ttl_s: float = LEASE_S) -> dict[str, Any]:
        """Take or renew the lease for ``owner`` at ``epoch`` for ``ttl_s`` real seconds.

        Raises :class:`StaleOwner` for an epoch older than one seen, :class:`OwnerLost` for
        the epoch whose lease was lost or released (a new owner needs a higher epoch),
        :class:`LeaseHeld` for a newer epoch while the older one's lease is held (it has
        not run out, or has and is not yet declared lost)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ValueError(f"lease epoch must be an int >= 1, got {epoch!r}")
        if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"lease length must be a number of seconds > 0, got {ttl_s!r}")
        self._refuse_older(epoch, f"lease for {owner}")
        if epoch == self.epoch and not self.held:
            raise OwnerLost(
                f"station {self.station}: the lease of epoch {epoch} ended ({self.lost}); "
                "a new owner takes the station with a higher epoch"
            )
        if self.held and epoch == self.epoch and str(owner) != self.owner:
            raise LeaseHeld(
                f"station {self.station} is leased by {self.owner} (epoch {epoch}): "
                f"{owner} cannot renew another owner's lease"
            )
        if self.held and self.epoch is not None and epoch > self.epoch:
            left = self.expires - time.monotonic()
            raise LeaseHeld(
                f"station {self.station} is leased by {self.owner} (epoch {self.epoch}) for "
                f"{max(0.0, left):.1f} s more: epoch {epoch} takes it once that lease is "
                "released or runs out (the station trips then)"
            )
        self.owner, self.epoch, self.ttl_s = str(owner), epoch, float(ttl_s)
        self.expires, self.held, self.lost = time.monotonic() + self.ttl_s, True, None
        self.timed_out = False
        return self.as_dict()

    def take_over(self, owner: str, old_epoch: int, epoch: int, ttl_s: float) -> dict[str, Any]:
        """Move the live lease of ``old_epoch`` to ``owner`` at ``epoch`` (a newer owner of
        the same campaign that proved the old one dead: it holds the campaign's lock file
        and took the next epoch in the journal, which fences the old epoch's writes); from
        now on calls of ``old_epoch`` are refused (:class:`StaleOwner`). Raises
        :class:`OwnerLost` when that lease is no longer live (released, run out: the station
        tripped or trips; take it with :meth:`take` then), :class:`StaleOwner` when the lease
        belongs to another epoch (another campaign's owner, or one newer than ``epoch``)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= old_epoch:
            raise ValueError(f"take-over epoch must be an int > {old_epoch}, got {epoch!r}")
        if self.epoch != old_epoch:
            raise StaleOwner(
                f"station {self.station}: take-over of epoch {old_epoch} refused; the lease is "
                f"epoch {self.epoch}'s ({self.owner})"
            )
        if not self.held or self.overdue():
            raise OwnerLost(
                f"station {self.station}: the lease of epoch {old_epoch} is no longer live "
                f"({self.lost or 'run out'}): not taken over"
            )
        previous = self.owner
        self.owner, self.epoch = None, None  # take() below: as a fresh lease of ``epoch``
        self.held = False
        try:
            return self.take(owner, epoch, ttl_s)
        except BaseException:
            self.owner, self.epoch, self.held = previous, old_epoch, True
            raise

    def release(self, epoch: int) -> None:
        """The owner is done with the station (a campaign that ended); its epoch is over."""
        if epoch == self.epoch and self.held:
            self.held, self.lost = False, f"released by {self.owner}"

    def overdue(self) -> bool:
        """The held lease has run out (not yet declared lost: :meth:`expire`)."""
        return self.held and time.monotonic() > self.expires

    def expire(self) -> str | None:
        """If the held lease ran out just now: mark it lost and return why (else None)."""
        if self.held and time.monotonic() > self.expires:
            self.held, self.timed_out = False, True
            self.lost = (
                f"owner lost: {self.owner} (epoch {self.epoch}) did not renew its lease "
                f"within {self.ttl_s:g} s"
            )
            return self.lost
        return None

    def check(self, epoch: int | None) -> None:
        """Before anything acts for the caller at ``epoch``: raise unless it holds a live lease.

        A station never leased acts unfenced (``epoch`` None: a tool, ``labbridge setup``);
        once leased, a call without the owner's epoch, with an older one, or after the
        lease ran out is refused (:class:`StaleOwner`, :class:`OwnerLost`)."""
        if self.epoch is None:
            if epoch is not None:
                raise OwnerLost(f"station {self.station}: no lease taken for epoch {epoch}")
            return
        if epoch is None:
            if self.held:
                raise StaleOwner(
                    f"station {self.station} is leased by {self.owner} (epoch {self.epoch}): "
                    "a call without the owner's epoch is refused"
                )
            return
        self._refuse_older(epoch, "call")
        if not self.held:  # the actor's lease watch declares a lease lost (stationactor)
            raise OwnerLost(f"station {self.station}: {self.lost}; not acting for epoch {epoch}")

    def _refuse_older(self, epoch: int, what: str) -> None:
        if self.epoch is not None and epoch < self.epoch:
            raise StaleOwner(
                f"station {self.station}: {what} from epoch {epoch} refused; epoch "
                f"{self.epoch} ({self.owner}) owns it now"
            )
