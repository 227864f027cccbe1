"""The device server's lock/lease and reply cache as small classes (the server's own tests drive
them over the wire; these pin down their rules one by one)."""
from __future__ import annotations

import pytest

from labpnn.protocols.errors import Locked, NotLocked
from labpnn.remote.lease import LockLease, identity_hash
from labpnn.remote.reply_cache import ReplyCache


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(lease_s=10.0):
    clock, busy = Clock(), set()
    return LockLease(lease_s, busy=lambda who: who in busy, clock=clock), clock, busy


def test_take_renew_release():
    lock, clock, _ = make()
    with pytest.raises(NotLocked):
        lock.require("alice")
    assert lock.take("alice") is False and lock.holder == "alice"
    assert lock.take("alice", 3.0) is True and lock.lease_s == 3.0  # a renewal may change the lease
    with pytest.raises(Locked) as err:
        lock.take("bob")
    assert err.value.details["holder"] == identity_hash("alice") and "alice" not in str(err.value)
    with pytest.raises(Locked):
        lock.release("bob")
    assert lock.release("alice") is True and lock.holder is None
    assert lock.release("alice") is False


def test_the_lease_runs_out_after_silence_but_not_while_the_holder_has_jobs():
    lock, clock, busy = make(lease_s=10.0)
    lock.take("alice")
    clock.t += 9.0
    lock.touch("alice")  # a request: the lease starts again
    clock.t += 9.0
    assert lock.remaining() == pytest.approx(1.0) and not lock.expire()
    busy.add("alice")  # a long batch is not silence
    clock.t += 60.0
    assert lock.remaining() == 10.0 and not lock.expire()
    busy.discard("alice")
    assert lock.expire() and lock.holder is None and lock.remaining() is None
    lock.take("bob")  # the rig is free for the next client
    assert lock.holder == "bob"


def test_touch_from_another_client_does_not_extend_the_lease():
    lock, clock, _ = make(lease_s=5.0)
    lock.take("alice")
    clock.t += 4.0
    lock.touch("bob")
    clock.t += 2.0
    with pytest.raises(NotLocked):
        lock.require("alice")  # expired


def test_reply_cache_bounds_entries_and_bytes_and_remembers_evictions():
    cache = ReplyCache(max_entries=2, max_bytes=100)
    cache.remember(("a", "1"), "run", [b"x" * 10])
    cache.remember(("a", "2"), "run", [b"x" * 10])
    cache.remember(("a", "3"), "run", [b"x" * 10])
    assert ("a", "1") not in cache and cache.was_evicted(("a", "1")) and len(cache) == 2
    assert cache.get(("a", "3")).frames == [b"x" * 10] and cache.nbytes == 20
    cache.remember(("a", "4"), "run", [memoryview(b"y" * 500)])  # the newest stays, however large
    assert len(cache) == 1 and ("a", "4") in cache and cache.nbytes == 500
    cache.remember(("a", "4"), "run", [b"z"])  # replacing an entry frees its bytes
    assert cache.nbytes == 1


def test_evicted_ids_are_bounded_too():
    cache = ReplyCache(max_entries=1, max_bytes=10**6, max_evicted=3)
    for i in range(10):
        cache.remember(("a", str(i)), "run", [b""])
    assert not cache.was_evicted(("a", "0")) and cache.was_evicted(("a", "8"))
