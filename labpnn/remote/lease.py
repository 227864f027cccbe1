"""The device server's lock: one controller at a time, held under a lease (PROTOCOL.md, "lock").

A client takes the lock with ``lock`` and keeps it while it talks to the server; the lease runs
out ``lease_s`` after its last request, so a client that vanished frees the rig. While the holder
has jobs queued or running the lease does not run down (a long batch is not silence).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from labpnn.protocols.errors import Locked, NotLocked

log = logging.getLogger(__name__)


def identity_hash(identity: str) -> str:
    """A short public name for a client identity (tokens and keys never leave the server)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


class LockLease:
    """Who holds the lock and until when. ``busy(identity)`` says whether that client has jobs in
    the server (its lease is then paused); ``clock`` is injectable for tests."""

    def __init__(self, lease_s: float, busy: Callable[[str], bool], clock: Callable[[], float] = time.monotonic):
        self.default_lease_s = float(lease_s)
        self.holder: str | None = None
        self.lease_s = self.default_lease_s
        self._last_seen = 0.0
        self._busy, self._clock = busy, clock

    def touch(self, identity: str) -> None:
        """A request (or a finished job) from ``identity``: the holder's lease starts again."""
        if identity == self.holder:
            self._last_seen = self._clock()

    def remaining(self) -> float | None:
        """Seconds left on the lease (None: nobody holds the lock)."""
        if self.holder is None:
            return None
        if self._busy(self.holder):
            return self.lease_s
        return max(0.0, self._last_seen + self.lease_s - self._clock())

    def expire(self) -> bool:
        """Release the lock if its lease ran out; True if it did."""
        if (self.holder is not None and not self._busy(self.holder)
                and self._clock() > self._last_seen + self.lease_s):
            log.info("lease of %s expired after %.1f s of silence; lock released",
                     identity_hash(self.holder), self.lease_s)
            self.holder = None
            return True
        return False

    def require(self, identity: str) -> None:
        """Raise unless ``identity`` holds the lock (`NotLocked` if nobody does, `Locked` if another)."""
        self.expire()
        if self.holder == identity:
            return
        if self.holder is None:
            raise NotLocked("this operation needs the lock: send 'lock' first")
        raise self._locked()

    def take(self, identity: str, lease_s: float | None = None) -> bool:
        """Take (or renew) the lock for ``identity``; True if it was a renewal. `Locked` if another
        client holds it."""
        self.expire()
        if self.holder not in (None, identity):
            raise self._locked()
        renewed = self.holder == identity
        if not renewed:
            log.info("lock taken by %s (lease %.1f s)", identity_hash(identity), lease_s or self.default_lease_s)
        self.holder, self.lease_s, self._last_seen = identity, float(lease_s or self.default_lease_s), self._clock()
        return renewed

    def release(self, identity: str) -> bool:
        """Release the lock held by ``identity``; False if nobody held it; `Locked` if another does."""
        self.expire()
        if self.holder is None:
            return False
        if self.holder != identity:
            raise Locked(f"another client ({identity_hash(self.holder)}) holds the lock",
                         details={"holder": identity_hash(self.holder)})
        self.holder = None
        log.info("lock released by %s", identity_hash(identity))
        return True

    def _locked(self) -> Locked:
        return Locked(f"another client ({identity_hash(self.holder)}) holds the lock",
                      details={"holder": identity_hash(self.holder),
                               "lease_remaining_s": round(self.remaining() or 0.0, 3)})
