"""The session writer's engine: the write passes over the open segment files (`_Engine`), run in
a writer thread or in a writer process fed through a shared-memory ring (`_writer_child`), and the
checks and errors of a write pass (free space, file size limit)."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import queue
import shutil
import struct
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from labpnn.sessions.layout import (
    _FREE_SPACE_SLACK,
    TAG_VOCABULARY,
    SessionWriteError,
    _Batch,
    _dumps,
    _SegmentFile,
)

log = logging.getLogger(__name__)


class _Engine:
    """The writing side of a session, in the writer thread or in the writer process: the open
    segment files, the write passes, and the first error (after which nothing more is written)."""

    def __init__(self, path: Path, describe: dict[str, Any], provenance: dict[str, Any], session_id: str,
                 compression: str | None, chunk_rows: int, check_space: bool = True):
        self.path, self.provenance, self.session_id = path, provenance, session_id
        self.compression, self.chunk_rows, self.check_space = compression, chunk_rows, check_space
        self.tags = list(TAG_VOCABULARY)
        self.error: SessionWriteError | None = None
        self.error_in_file = False
        self.write_s = 0.0
        self.flushes = 0
        self.first = self.current = self.open_segment(path, describe, 0)

    def open_segment(self, path: Path, describe: Mapping[str, Any], index: int) -> _SegmentFile:
        C, S = int(describe.get("n_controls", 0)), int(describe.get("n_outputs", 0))
        if C <= 0 or S <= 0:
            raise ValueError("describe must give n_controls and n_outputs (both > 0)")
        return _SegmentFile(path, describe=describe, provenance=self.provenance, index=index,
                            first_file=self.path.name, session_id=self.session_id, tags=self.tags,
                            compression=self.compression, chunk_rows=self.chunk_rows,
                            n_controls=C, n_outputs=S)

    def process(self, items: list[tuple]) -> tuple[bool, list[Any]]:
        """One pass: write the items' batches and events, flush once (on a batch boundary).
        Returns (closing, flush waiters)."""
        batches: list[_Batch] = []
        events: list[tuple[float, str, bytes]] = []
        waiters: list[Any] = []
        closing = False
        started = time.perf_counter()
        for kind, payload in items:
            if kind == "batch":
                batches.append(payload)
            elif kind == "event":
                events.append(payload)
            elif kind == "flush":
                waiters.append(payload)
            elif kind == "close":
                closing = True
            elif kind == "tag":
                self.guard(self.write, batches, events)
                batches, events = [], []
                self.tags.append(payload)
                self.guard(self.current.add_tag, payload)
            elif kind == "segment":
                self.guard(self.write, batches, events)
                batches, events = [], []
                self.guard(self.switch_segment, *payload)
        self.guard(self.write, batches, events)
        self.write_s += time.perf_counter() - started
        return closing, waiters

    def guard(self, fn, *args) -> None:
        """Run a write step unless an earlier one failed; turn a failure into SessionWriteError."""
        if self.error is not None:
            return
        try:
            fn(*args)
        except _NoSpace as exc:  # refused before touching the file: it is consistent, say why in it
            self.error = _write_error(exc, self.current.path, self.current)
            log.error("%s", self.error)
            with contextlib.suppress(Exception):
                blob = _dumps({"kind": "write_error", "message": str(self.error), "time": time.time(),
                               "data": {"errno": exc.errno}}).encode()
                self.current.write_events([(time.time(), "write_error", blob)])
                self.current.flush()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the caller
            self.error_in_file = True
            self.error = _write_error(exc, self.current.path, self.current)
            log.error("%s", self.error)
            self.current.detach()

    def write(self, batches: list[_Batch], events: list[tuple[float, str, bytes]]) -> None:
        if not batches and not events:
            return
        seg = self.current
        if self.check_space:
            need = sum(b.nbytes for b in batches) + sum(len(e[2]) + 64 for e in events)
            _check_free_space(seg.path, need)
        seg.write_batches(batches)
        seg.write_events(events)
        seg.flush()
        self.flushes += 1

    def switch_segment(self, path: Path, describe: dict[str, Any], index: int) -> None:
        new = self.open_segment(path, describe, index)
        self.first.add_segment(path.name)
        self.first.flush()
        if self.current is not self.first:
            self.current.close()
        self.current = new

    def close_files(self) -> None:
        for seg in {id(self.current): self.current, id(self.first): self.first}.values():
            if self.error is not None and self.error_in_file:
                continue  # detached after the failed write: never closed (see _SegmentFile.detach)
            try:
                seg.close()
            except Exception as exc:  # noqa: BLE001
                self.error_in_file = True
                seg.detach()
                if self.error is None:
                    self.error = _write_error(exc, seg.path, seg)


_RING_HEADER = 64  # bytes at the start of the shared ring: [0:8] tail (consumed position), uint64


def _send_msg(fh, obj: Any) -> None:
    """One framed message on a private pipe between a writer and its own writer process (never on
    a network: the wire protocol does not pickle)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(struct.pack("<Q", len(data)))
    fh.write(data)
    fh.flush()


def _recv_msg(fh) -> Any:
    head = fh.read(8)
    if len(head) < 8:
        raise EOFError("pipe closed")
    (n,) = struct.unpack("<Q", head)
    data = fh.read(n)
    if len(data) < n:
        raise EOFError("pipe closed")
    return pickle.loads(data)


def _pump(fh, out: queue.Queue) -> None:
    """Read framed messages into a queue until the pipe closes (then put None)."""
    try:
        while True:
            out.put(_recv_msg(fh))
    except (EOFError, OSError, ValueError):
        out.put(None)


def _writer_child() -> None:
    """Entry point of a writer process (``python -c "...; _writer_child()"``): framed messages on
    stdin (batches with their arrays in a memory-mapped ring file, events, commands), replies on
    the original stdout (flush acknowledgements, the first error, final stats). Ends on ``close``
    or when the parent goes away (end of stdin), closing the files either way."""
    import mmap

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the reply pipe
    requests = sys.stdin.buffer
    hello = _recv_msg(requests)
    with open(hello["ring_path"], "r+b") as fh:
        ring = mmap.mmap(fh.fileno(), hello["ring_size"] + _RING_HEADER)
    with contextlib.suppress(OSError):  # both sides have it mapped: no file is left behind, whoever dies
        os.unlink(hello["ring_path"])
    tail = np.ndarray((1,), np.uint64, buffer=ring, offset=0)
    size = hello["ring_size"]
    try:
        engine = _Engine(**hello["init"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        _send_msg(replies, ("failed", f"{type(exc).__name__}: {exc}", isinstance(exc, FileExistsError)))
        return
    _send_msg(replies, ("ready",))
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(requests, inbox), daemon=True).start()
    reported = closing = False
    try:
        while not closing:
            messages = [inbox.get()]
            while len(messages) < 256:
                try:
                    messages.append(inbox.get_nowait())
                except queue.Empty:
                    break
            items, end = [], None
            for message in messages:
                kind, payload = message if message is not None else ("close", None)
                if kind == "batch":
                    header, places = payload
                    arrays = {}
                    for name, (pos, shape, dtype, inline) in places.items():
                        if inline is not None:
                            arrays[name] = np.frombuffer(inline, dtype).reshape(shape)
                        else:
                            arrays[name] = np.ndarray(shape, dtype, buffer=ring, offset=_RING_HEADER + pos % size)
                            end = pos + -(-arrays[name].nbytes // 64) * 64
                    items.append(("batch", _Batch(**header, **arrays)))
                elif kind == "check_space":
                    engine.check_space = bool(payload)
                else:
                    items.append((kind, payload))
            closing, waiters = engine.process(items)
            del items, messages
            if end is not None:
                tail[0] = max(int(tail[0]), end)
            if engine.error is not None and not reported:
                reported = True
                _send_msg(replies, ("error", str(engine.error)))
            for token in waiters:
                _send_msg(replies, ("flushed", token))
    finally:
        engine.close_files()
        with contextlib.suppress(Exception):
            if engine.error is not None and not reported:
                _send_msg(replies, ("error", str(engine.error)))
            _send_msg(replies, ("closed", {"write_s": engine.write_s, "flushes": engine.flushes}))
        replies.close()
        os._exit(0)  # the files are closed; do not wait for the stdin reader at interpreter exit


class _NoSpace(OSError):
    """A write pass refused before it touched the file (the disk or the size limit is too small)."""


def _check_free_space(path: Path, need: int) -> None:
    """Refuse a write pass that would not fit: free space on the disk, and the process's file
    size limit (RLIMIT_FSIZE) where there is one. Raises OSError(ENOSPC) before touching the file."""
    need += _FREE_SPACE_SLACK
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise _NoSpace(errno.ENOSPC, f"only {free / 2**20:.1f} MiB free on the disk, a write needs "
                                    f"{need / 2**20:.1f} MiB")
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY:
        size = path.stat().st_size
        if size + need > soft:
            raise _NoSpace(errno.EFBIG, f"the file size limit ({soft / 2**20:.1f} MiB) leaves "
                                       f"{max(0, soft - size) / 2**20:.1f} MiB, a write needs "
                                       f"{need / 2**20:.1f} MiB")


def _write_error(exc: BaseException, path: Path, seg: _SegmentFile | None) -> SessionWriteError:
    text = " ".join(str(exc).split())
    code = getattr(exc, "errno", None)
    full = code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)) or any(
        s in text for s in ("No space left", "File too large", "Disk quota", "errno = 28", "errno = 27"))
    saved = (f"; the {seg.flushed_batches} batches and {seg.flushed_events} events of {seg.path.name} "
             "flushed before stay readable") if seg else ""
    what = "disk full or file size limit reached" if full else "write failed"
    err = SessionWriteError(f"{path}: {what} while writing the session{saved}; nothing more is "
                            f"recorded ({'OSError' if isinstance(exc, OSError) else type(exc).__name__}: {text})")
    err.__cause__ = exc
    return err
