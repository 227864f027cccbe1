"""`SessionWriter`: appends `Measurement`s and events to a session from a background writer (the
layout: `labpnn.sessions.layout`; the engine, thread or process: `labpnn.sessions.engine`).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from labpnn.contract import Measurement
from labpnn.protocols.errors import ErrorCode
from labpnn.sessions.engine import _RING_HEADER, _Engine, _pump, _send_msg
from labpnn.sessions.layout import (
    _TAG_BYTES,
    TAG_VOCABULARY,
    SessionWriteError,
    _axis_of,
    _Batch,
    _decode,
    _dumps,
    _encode_name,
    _jsonable,
    segment_path,
)
from labpnn.sessions.layout import provenance as collect_provenance

log = logging.getLogger(__name__)


_OPEN_WRITERS: weakref.WeakSet[SessionWriter] = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:  # so queued batches reach the disk when a script just ends
    for writer in list(_OPEN_WRITERS):
        with contextlib.suppress(Exception):
            writer.close()


def _immutable(a: Any) -> bool:
    """True for an array nobody can change: read-only all the way down to an immutable buffer
    (``bytes``, or a received ZeroMQ frame: what `RigClient` measurements are made of). `append`
    need not copy those."""
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    if isinstance(a, memoryview):
        return a.readonly and isinstance(a.obj, (bytes, zmq.Frame))
    return isinstance(a, bytes)


class SessionWriter:
    """Append `Measurement`s (and events) to a session file from a background writer.

    ``writer="thread"`` (default) writes from a thread of this process; ``writer="process"``
    from a separate process fed through a shared-memory ring (``ring_mib``), so HDF5 never holds
    this process's GIL — use it where acquisition is fast (a device server at full rate, a
    trainer on a zero-latency rig); it costs ~0.3 s to start.

    ``append`` copies the arrays it is given (into the ring, for a writer process), so the caller
    may reuse or mutate its buffers at once; with a writer thread ``copy=False`` hands them over
    instead. It returns the batch id at once; the write happens behind a queue of
    ``queue_batches`` batches, and a full queue (or ring) blocks ``append`` until the writer
    catches up (back-pressure; nothing is dropped). The writer flushes the file after every pass
    over the queue, i.e. on batch boundaries. ``flush()`` waits until everything appended so far
    is on disk. A failed write is raised as `SessionWriteError` from the next call and from
    ``close()``; nothing flushed before is lost.

    ``describe`` is the system's ``describe()``: n_controls (C), n_outputs (S) and the axis fix the
    row shape of the first segment. ``provenance`` is merged over `provenance()` (collected here).
    The file must not exist (a session is never overwritten).
    """

    def __init__(self, path: str | Path, describe: Mapping[str, Any], *,
                 provenance: Mapping[str, Any] | None = None, compression: str | None = None,
                 queue_batches: int = 32, chunk_rows: int = 64, writer: str = "thread",
                 ring_mib: int = 128):
        if compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        if queue_batches < 1 or chunk_rows < 1:
            raise ValueError("queue_batches and chunk_rows must be >= 1")
        if writer not in ("thread", "process"):
            raise ValueError(f"writer must be 'thread' or 'process', got {writer!r}")
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path}: a session file already exists there (never overwritten)")
        self.describe: dict[str, Any] = _jsonable(dict(describe))
        prov = collect_provenance()
        prov.update(_jsonable(dict(provenance or {})))
        self.provenance = prov
        self.session_id = uuid.uuid4().hex
        self.mode = writer
        self._tags: dict[str, int] = {t: i for i, t in enumerate(TAG_VOCABULARY)}
        self._shape = (int(self.describe.get("n_controls", 0)), int(self.describe.get("n_outputs", 0)))
        if self._shape[0] <= 0 or self._shape[1] <= 0:
            raise ValueError("describe must give n_controls and n_outputs (both > 0)")
        self._axis = _axis_of(self.describe, self._shape[1])
        self.segments: list[Path] = [self.path]
        self.describe_current: dict[str, Any] = self.describe  #: describe of the current segment
        self._lock = threading.Lock()
        self._next_batch = 0
        self._error: SessionWriteError | None = None
        self._closed = False
        self._queue_batches = int(queue_batches)
        #: rows / batches / events queued, bytes queued, seconds writing, seconds callers were blocked
        self.stats = {"rows": 0, "batches": 0, "events": 0, "bytes": 0, "write_s": 0.0, "blocked_s": 0.0,
                      "flushes": 0}
        init = {"path": self.path, "describe": self.describe, "provenance": self.provenance,
                "session_id": self.session_id, "compression": compression, "chunk_rows": int(chunk_rows)}
        if writer == "thread":
            self._engine: _Engine | None = _Engine(**init)
            self._queue: queue.Queue = queue.Queue(maxsize=self._queue_batches)
            self._thread = threading.Thread(target=self._run, name=f"session-writer:{self.path.name}",
                                            daemon=True)
            self._thread.start()
        else:
            self._engine = None
            self._start_process(init, int(ring_mib) * 2**20)
        _OPEN_WRITERS.add(self)

    @property
    def _check_space(self) -> bool:
        return self._engine.check_space if self._engine is not None else True

    @_check_space.setter
    def _check_space(self, value: bool) -> None:  # tests turn the free-space check off
        if self._engine is not None:
            self._engine.check_space = bool(value)
        else:
            self._send(("check_space", bool(value)))

    # -- public API ----------------------------------------------------------------------------
    def append(self, measurement: Measurement, tag: str = "train", *, copy: bool = True) -> int:
        """Queue one batch (its completed rows) under ``tag``; return its batch id."""
        self._check_open()
        m = measurement
        n = m.n_done
        copy = copy and self.mode == "thread"  # a writer process copies into its ring anyway

        def take(a, dt):
            if copy and not _immutable(a):
                return np.array(a, dt, order="C")
            return np.ascontiguousarray(a, dt)

        traces = take(m.traces, np.float32)
        controls = np.asarray(m.controls)
        if controls.ndim != 2 or traces.ndim != 2 or controls.shape[0] < n:
            raise ValueError(f"measurement arrays have inconsistent shapes: controls {controls.shape}, "
                             f"traces {traces.shape}")
        sent = take(controls[:n], np.float32)
        applied = take(m.applied, np.float32)
        stamps = take(m.timestamps, np.float64).reshape(-1)
        flags = take(m.flags, np.uint32).reshape(-1)
        if applied.shape != sent.shape or stamps.shape[0] != n or flags.shape[0] != n:
            raise ValueError(f"measurement arrays have inconsistent shapes: controls {controls.shape}, "
                             f"applied {applied.shape}, traces {traces.shape}, timestamps {stamps.shape}, "
                             f"flags {flags.shape}")
        shape = (int(controls.shape[1]), int(traces.shape[1]))
        meta = _dumps(m.meta).encode() if m.meta else b""
        error = b""
        if m.error is not None:
            code = getattr(m.error, "code", ErrorCode.INTERNAL)
            error = _decode(getattr(code, "value", code)).encode()[:16]
        with self._lock:
            code_ = self._tag_code(tag)
            if shape != self._shape:
                describe = dict(self.describe_current, n_controls=shape[0], n_outputs=shape[1])
                if shape[1] != self._shape[1]:
                    describe["axis"] = {"name": "index", "unit": "1", "values": list(range(shape[1]))}
                self._new_segment_locked(describe, f"row shape changed from {self._shape} to {shape}")
            batch_id = self._next_batch
            self._next_batch += 1
            item = _Batch(batch_id, code_, sent, applied, traces, stamps, flags, int(controls.shape[0]),
                          time.time(), float(m.busy_s), error, meta)
            self.stats["rows"] += n
            self.stats["batches"] += 1
            self.stats["bytes"] += item.nbytes
            self._put(("batch", item))
        return batch_id

    def event(self, kind: str, message: str = "", **data: Any) -> None:
        """Append ``{kind, message, data}`` to the event log (JSON; numpy values are converted)."""
        self._check_open()
        _encode_name(kind, _TAG_BYTES, "event kind")
        now = time.time()
        blob = _dumps({"kind": kind, "message": str(message), "time": now, "data": data}).encode()
        with self._lock:
            self.stats["events"] += 1
            self._put(("event", (now, kind, blob)))

    def new_segment(self, describe: Mapping[str, Any], reason: str = "describe changed") -> Path:
        """Continue the session in a new segment file with this ``describe`` (the row shape or
        the output axis changed). Returns the new file's path."""
        self._check_open()
        with self._lock:
            return self._new_segment_locked(_jsonable(dict(describe)), reason)

    def needs_new_segment(self, describe: Mapping[str, Any]) -> bool:
        """True if ``describe`` has another row shape or output axis than the current segment."""
        shape = (int(describe.get("n_controls", 0)), int(describe.get("n_outputs", 0)))
        if shape != self._shape:
            return True
        name, unit, values = _axis_of(_jsonable(dict(describe)), shape[1])
        old = self._axis
        return (name, unit) != old[:2] or not np.array_equal(values, old[2])

    def flush(self) -> None:
        """Block until everything appended so far is written and flushed; raise a pending error."""
        self._check_open()
        if self._engine is not None:
            done = threading.Event()
            self._put(("flush", done))
            while not done.wait(0.5):
                if not self._thread.is_alive():
                    break
        else:
            with self._lock:
                token = self._next_token = getattr(self, "_next_token", 0) + 1
                self._send(("flush", token))
            self._wait_reply(lambda msg: msg[0] == "flushed" and msg[1] == token)
        self._raise_pending()

    def close(self) -> None:
        """Write what is queued, log a ``close`` event, close the files; raise a pending error."""
        if self._closed:
            self._raise_pending()
            return
        with contextlib.suppress(SessionWriteError):
            self.event("close", "session closed", rows=self.stats["rows"], batches=self.stats["batches"])
        self._closed = True
        _OPEN_WRITERS.discard(self)
        if self._engine is not None:
            if self._thread.is_alive():
                self._put(("close", None))
                self._thread.join()
            self.stats["write_s"], self.stats["flushes"] = self._engine.write_s, self._engine.flushes
            if self._engine.error is not None and self._error is None:
                self._error = self._engine.error
        else:
            self._stop_process()
        self._raise_pending()

    @property
    def error(self) -> SessionWriteError | None:
        self._poll_replies()
        return self._error

    @property
    def n_batches(self) -> int:
        return self._next_batch

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original exception behind a write error
            try:
                self.close()
            except SessionWriteError as err:
                log.error("%s", err)

    def __repr__(self) -> str:
        return f"SessionWriter({str(self.path)!r}, batches={self._next_batch}, writer={self.mode!r})"

    # -- internals (caller side) ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SessionWriteError(f"{self.path}: the session writer is closed")
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._engine is not None:
            if self._engine.error is not None and self._error is None:
                self._error = self._engine.error
        else:
            self._poll_replies()
        if self._error is not None:
            raise self._error

    def _tag_code(self, tag: str) -> int:
        code = self._tags.get(tag)
        if code is None:
            if not isinstance(tag, str):
                raise TypeError(f"tag must be a string, got {tag!r}")
            _encode_name(tag, _TAG_BYTES, "tag")
            if len(self._tags) >= 256:
                raise ValueError("a session holds at most 256 distinct tags")
            code = self._tags[tag] = len(self._tags)
            self._put(("tag", tag))
        return code

    def _new_segment_locked(self, describe: dict[str, Any], reason: str) -> Path:
        index = len(self.segments)
        path = segment_path(self.path, index)
        if path.exists():
            raise FileExistsError(f"{path}: segment file already exists")
        self.segments.append(path)
        self._shape = (int(describe.get("n_controls", 0)), int(describe.get("n_outputs", 0)))
        self._axis = _axis_of(describe, self._shape[1])
        self.describe_current = describe
        now = time.time()
        blob = _dumps({"kind": "segment", "message": f"{reason}; continuing in {path.name}", "time": now,
                       "data": {"segment": index, "file": path.name, "shape": list(self._shape)}}).encode()
        self._put(("event", (now, "segment", blob)))  # logged in the segment that ends
        self._put(("segment", (path, describe, index)))
        return path

    def _put(self, item: tuple) -> None:
        if self._engine is None:
            self._put_process(item)
            return
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:
            pass
        started = time.perf_counter()
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    raise SessionWriteError(f"{self.path}: the writer thread has stopped") from None
        self.stats["blocked_s"] += time.perf_counter() - started

    # -- writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self._engine
        assert engine is not None
        closing = False
        try:
            while not closing:
                items = [self._queue.get()]
                while len(items) < 256:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                closing, waiters = engine.process(items)
                for waiter in waiters:
                    waiter.set()
        finally:
            engine.close_files()

    # -- writer process ----------------------------------------------------------------------------
    def _start_process(self, init: dict[str, Any], ring_bytes: int) -> None:
        import mmap
        import tempfile

        # The ring is a memory-mapped file (in RAM under /dev/shm where there is one): no
        # multiprocessing machinery, so a script without a __main__ guard works too.
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, ring_path = tempfile.mkstemp(prefix="labpnn-ring-", dir=where)
        self._ring_path = ring_path
        with os.fdopen(fd, "r+b") as fh:
            fh.truncate(_RING_HEADER + ring_bytes)
            self._ring = mmap.mmap(fh.fileno(), _RING_HEADER + ring_bytes)
        self._ring_size = ring_bytes
        self._tail = np.ndarray((1,), np.uint64, buffer=self._ring, offset=0)
        self._tail[0] = 0
        self._head = 0
        code = "from labpnn.sessions.engine import _writer_child; _writer_child()"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._requests = self._proc.stdin
        self._reply_q: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(self._proc.stdout, self._reply_q), daemon=True,
                         name=f"session-writer-replies:{self.path.name}").start()
        self._send({"init": init, "ring_path": ring_path, "ring_size": ring_bytes})
        first = self._wait_reply(lambda msg: msg[0] in ("ready", "failed"))
        if first[0] == "failed":
            self._proc.wait(10)
            self._release_ring()
            if first[2]:
                raise FileExistsError(first[1])
            raise SessionWriteError(f"{self.path}: the writer process could not create the session: {first[1]}")

    def _send(self, message: Any) -> None:
        try:
            _send_msg(self._requests, message)
        except (OSError, ValueError) as exc:
            raise SessionWriteError(f"{self.path}: the writer process has stopped ({exc})") from None

    def _poll_replies(self) -> None:
        if self._engine is not None or getattr(self, "_reply_q", None) is None:
            return
        while True:
            try:
                msg = self._reply_q.get_nowait()
            except queue.Empty:
                return
            self._on_reply(msg)

    def _on_reply(self, msg: tuple | None) -> None:
        if msg is None:
            self._child_gone = True
            if self._error is None and not getattr(self, "_closed_reply", False):
                self._error = SessionWriteError(f"{self.path}: the writer process has stopped "
                                                f"(exit code {self._proc.poll()})")
        elif msg[0] == "error" and self._error is None:
            self._error = SessionWriteError(msg[1])
        elif msg[0] == "closed":
            self.stats["write_s"], self.stats["flushes"] = msg[1]["write_s"], msg[1]["flushes"]
            self._closed_reply = True

    def _wait_reply(self, wanted) -> tuple:
        while True:
            try:
                msg = self._reply_q.get(timeout=0.5)
            except queue.Empty:
                if self._proc.poll() is not None and self._reply_q.empty():
                    raise SessionWriteError(f"{self.path}: the writer process has stopped "
                                            f"(exit code {self._proc.returncode})") from None
                continue
            self._on_reply(msg)
            if msg is not None and wanted(msg):
                return msg
            if msg is None:
                raise SessionWriteError(f"{self.path}: the writer process has stopped "
                                        f"(exit code {self._proc.poll()})")

    def _ring_place(self, nbytes: int) -> int | None:
        """A position in the ring for ``nbytes`` (64-byte aligned, contiguous), waiting while the
        ring is full (back-pressure); None if the array is too large for the ring."""
        size = self._ring_size
        nbytes = -(-nbytes // 64) * 64
        if nbytes > size // 2:
            return None
        pos = self._head
        if pos % size + nbytes > size:  # does not fit before the end: skip to the start
            pos += size - pos % size
        started = None
        while pos + nbytes - int(self._tail[0]) > size:
            if started is None:
                started = time.perf_counter()
            self._poll_replies()
            if self._error is not None:
                raise self._error
            time.sleep(0.0002)
        if started is not None:
            self.stats["blocked_s"] += time.perf_counter() - started
        self._head = pos + nbytes
        return pos

    def _put_process(self, item: tuple) -> None:
        kind, payload = item
        if kind == "batch":
            b: _Batch = payload
            places = {}
            for name in ("controls", "applied", "traces", "timestamps", "flags"):
                a = getattr(b, name)
                pos = self._ring_place(a.nbytes) if a.nbytes else None
                if pos is None:  # empty, or too large for the ring: inline in the message
                    places[name] = (0, a.shape, a.dtype.str, a.tobytes())
                else:
                    offset = _RING_HEADER + pos % self._ring_size
                    np.ndarray(a.shape, a.dtype, buffer=self._ring, offset=offset)[...] = a
                    places[name] = (pos, a.shape, a.dtype.str, None)
            header = {"batch_id": b.batch_id, "tag": b.tag, "n_sent": b.n_sent, "time": b.time,
                      "busy_s": b.busy_s, "error": b.error, "meta": b.meta}
            self._send(("batch", (header, places)))
        else:
            self._send(item)
        self._poll_replies()

    def _stop_process(self) -> None:
        try:
            self._send(("close", None))
            self._wait_reply(lambda msg: msg[0] == "closed")
        except SessionWriteError as exc:
            if self._error is None:
                self._error = exc
        with contextlib.suppress(OSError, ValueError):
            self._requests.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._poll_replies()
        self._release_ring()

    def _release_ring(self) -> None:
        self._tail = None  # type: ignore[assignment]
        with contextlib.suppress(Exception):
            self._ring.close()
        with contextlib.suppress(OSError):
            os.unlink(self._ring_path)
