"""The device server's reply cache: a retried request id gets the reply it already had, never a
second actuation (PROTOCOL.md, "retries").

Bounded in entries and bytes; the newest reply always stays, however large, older ones go first.
An evicted id is remembered (up to ``max_evicted``), so a retry of it is refused clearly instead of
running again.
"""
from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class CachedReply:
    op: str
    frames: list[Any]
    nbytes: int


def frames_nbytes(frames: list[Any]) -> int:
    total = 0
    for f in frames:
        total += len(f) if type(f) is bytes else memoryview(f).nbytes
    return total


class ReplyCache:
    def __init__(self, max_entries: int, max_bytes: int, max_evicted: int = 4096):
        self.max_entries, self.max_bytes, self.max_evicted = int(max_entries), int(max_bytes), int(max_evicted)
        self._entries: collections.OrderedDict[Hashable, CachedReply] = collections.OrderedDict()
        self._evicted: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedReply | None:
        return self._entries.get(key)

    def was_evicted(self, key: Hashable) -> bool:
        return key in self._evicted

    def remember(self, key: Hashable, op: str, frames: list[Any]) -> None:
        nbytes = frames_nbytes(frames)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._entries[key] = CachedReply(op, frames, nbytes)
        self.nbytes += nbytes
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self.nbytes > self.max_bytes):
            old_key, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self._evicted[old_key] = None
            if len(self._evicted) > self.max_evicted:
                self._evicted.popitem(last=False)
