"""Sessions: every batch a physical system runs, raw, to HDF5 — crash-safe, readable while it grows.

`SessionWriter` appends `Measurement`s to one HDF5 file per session in SWMR mode: every dataset and
attribute is created first, then ``swmr_mode`` is switched on, then rows are only appended and the
file flushed on batch boundaries. Writes happen on a writer thread behind a bounded queue: `append`
copies the arrays and returns at once; a full queue blocks the caller (back-pressure, nothing is
dropped). A write failure (disk full, file size limit) becomes a `SessionWriteError` raised by the
next ``append`` / ``event`` / ``flush`` / ``close``; everything flushed before it stays readable.
`RecordingSystem` wraps any `PhysicalSystem` so that every batch it runs is logged; `open_session`
reads a finished or a growing session (SWMR reader) and follows its segments. Replay lives in
``labpnn.replay``. Twin checkpoints and training metrics go in their own files, never in a session.

Session file layout (format ``labpnn-session/1``; NeXus-flavoured, so silx / HDFView plot it)::

    /                                   NX_class=NXroot, default="entry", labpnn_format, session_id
    /entry                              NXentry, default="data"
        @describe        JSON           the system's describe() when this segment started
        @provenance      JSON           versions, git revision, host, python, seeds, argv, time
        @start_time      ISO 8601 UTC
        @segment_index   int            0 for NAME.h5, k for NAME.segK.h5
        @first_file      str            basename of segment 0 (NAME.h5)
        segments         S255[k]        file names of all segments, in order (grows in segment 0
                                        only; later segments hold their own name)
        tag_names        S32[t]         tag vocabulary: code -> name; starts as calibration, train,
                                        eval, test, validation, noise, other; new tags are appended
        /data                           NXdata, signal="traces", axes=[".", "output_axis"]
            traces       float32[N, S]  raw traces, one row per measured control vector
            controls     float32[N, C]  controls as sent (in [0, 1])
            applied      float32[N, C]  controls as the instruments applied them
            timestamps   float64[N]     unix time at which the row's acquisition ended (NaN: unknown)
            flags        uint32[N]      per-row bit field (labpnn.drivers.roles.FLAG_*)
            batch_id     int64[N]       batch each row belongs to (session-wide, from 0)
            tag          uint8[N]       code into /entry/tag_names
            output_axis  float64[S]     @units, @long_name: the output axis (describe()["axis"])
        /controls                       NXdata, signal="controls": hard links to data/controls and
            controls, applied, channel  data/applied plus a channel index, for a heat-map view
        /batches                        NXcollection
            table        compound[K]    one row per batch: id, first_row (within this segment file),
                                        n_rows, n_sent (n_rows < n_sent: the batch failed), tag,
                                        time (handed to the writer), busy_s (instrument time),
                                        error (S16 wire code: ABORTED, INSTRUMENT, ... or ""),
                                        meta_end; written after the batch's rows: the commit record
            meta         uint8[M]       batch k's Measurement.meta as UTF-8 JSON in
                                        meta[meta_end[k-1]:meta_end[k]] (empty: none), e.g.
                                        {"replay": "nearest", ...} or a client's server batch id
        /events                         NXcollection, append-only event log
            time         float64[E]     unix time
            kind         S32[E]         configure, abort, instrument_error, refused, segment, ...
            end          int64[E]       end offset of the event's JSON in `json`
            json         uint8[M]       concatenated UTF-8 JSON objects {kind, message, data}

Every per-row dataset has the same length after each flush, and the batch table is written after
the rows it describes. HDF5 flushes are not atomic, so a SIGKILL landing inside a flush can leave
the raw per-row datasets of unequal length; the reader therefore takes, per segment, the rows of
the longest prefix of complete batches (consecutive ids, tiling the rows from 0, present in every
per-row dataset) and shows whole batches only, all arrays of one length (``Segment.
uncommitted_rows`` counts what it ignored). Rows are chunked by ``chunk_rows`` (64; whole aligned
chunks are written with ``write_direct_chunk``) and extended by exact sizes; there is no raw-data
chunk cache; compression is off by default (``"lzf"`` or ``"gzip"`` with shuffle on request). Only
the rows a batch completed are stored (``Measurement.controls[:n_done]``); ``n_sent`` and ``error``
in the batch table and an ``abort`` / ``instrument_error`` event say what was lost.

A full disk: before each write pass the writer checks the free space (and the process's file size
limit) and refuses the pass without touching the file, logging a ``write_error`` event in the
space kept in reserve. If a write fails anyway (another process filled the disk), the file's
descriptor is pointed at the null device so that nothing HDF5 still holds (extents whose data
never arrived) reaches the file: it keeps exactly what the last successful flush left in it.

Segments: when the row shape (C or S) or the output axis changes, the session continues in
``NAME.seg1.h5``, ``NAME.seg2.h5``, ... (same layout); segment 0 lists them in ``/entry/segments``
(a pre-created resizable dataset, since no attribute may be added under SWMR) and a ``segment``
event records why. Batch ids and global row indices run on across segments.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import logging
import os
import pickle
import platform
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zmq
from h5py import h5s

from labpnn.contract import Measurement, measure_of
from labpnn.protocols.errors import ErrorCode, LabpnnError

log = logging.getLogger(__name__)

FORMAT = "labpnn-session/1"
#: Tag codes 0..6; other tags get the next free codes (at most 255 per session).
TAG_VOCABULARY = ("calibration", "train", "eval", "test", "validation", "noise", "other")
PER_ROW = ("traces", "controls", "applied", "timestamps", "flags", "batch_id", "tag")
#: One row per batch in /entry/batches/table (a single compound dataset: one extent, one write per pass).
BATCH_DTYPE = np.dtype([("id", "<i8"), ("first_row", "<i8"), ("n_rows", "<i8"), ("n_sent", "<i8"),
                        ("tag", "u1"), ("time", "<f8"), ("busy_s", "<f8"), ("error", "S16"),
                        ("meta_end", "<i8")])
BATCH_FIELDS = BATCH_DTYPE.names
_TAG_BYTES = 32
_NAME_BYTES = 255
_CHUNK_BYTES = 4 * 2**20  # at most this many bytes per chunk of a 2-D dataset
_FREE_SPACE_SLACK = 256 * 2**10  # keep this much free beyond what a write pass needs (metadata)


class SessionWriteError(RuntimeError):
    """The session could not be written (disk full, size limit, I/O error, writer closed).

    Everything flushed before the failure stays readable. ``measurement`` is set when a
    `RecordingSystem` measured a batch it could no longer record."""

    def __init__(self, message: str, *, measurement: Measurement | None = None):
        super().__init__(message)
        self.measurement = measurement


class SessionFormatError(ValueError):
    """A file that is not a labpnn session (or a damaged one)."""


# ------------------------------------------------------------------------------------------------
# provenance and JSON helpers


@functools.lru_cache(maxsize=1)
def _git_revision() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}


def provenance(seeds: Any = None) -> dict[str, Any]:
    """Where a session came from: package versions (labpnn, numpy, h5py + HDF5, pyzmq, pydantic;
    torch only if something already imported it), the git revision of the labpnn checkout (if it
    is one), host, platform, python, pid, command line, time and the given ``seeds``."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {}
    for dist in ("labpnn", "numpy", "h5py", "pyzmq", "pydantic"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    versions["hdf5"] = h5py.version.hdf5_version
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = str(getattr(torch, "__version__", "unknown"))
    return {
        "versions": versions,
        "git": _git_revision(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "time": _iso(time.time()),
        "seeds": _jsonable(seeds),
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value") and isinstance(getattr(obj, "value", None), (str, int)):
        return obj.value  # Enum
    return repr(obj)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True, separators=(",", ":"))


def _jsonable(obj: Any) -> Any:
    return json.loads(_dumps(obj))


def _axis_of(describe: Mapping[str, Any], n_outputs: int) -> tuple[str, str, np.ndarray]:
    axis = describe.get("axis") or {}
    name = str(axis.get("name") or "index")
    unit = str(axis.get("unit") or "1")
    try:
        values = np.asarray(axis.get("values"), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape[0] != n_outputs:
        values = np.arange(n_outputs, dtype=np.float64)
        if name != "index":
            name, unit = f"{name} (index)", "1"
    return name, unit, values


def _encode_name(text: str, limit: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if not raw or len(raw) > limit:
        raise ValueError(f"{what} must be 1..{limit} bytes of UTF-8, got {text!r}")
    return raw


def _decode(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return str(raw)


# ------------------------------------------------------------------------------------------------
# writer


@dataclass
class _Batch:
    batch_id: int
    tag: int
    controls: np.ndarray
    applied: np.ndarray
    traces: np.ndarray
    timestamps: np.ndarray
    flags: np.ndarray
    n_sent: int
    time: float
    busy_s: float
    error: bytes
    meta: bytes  #: JSON of Measurement.meta, b"" if empty

    @property
    def n(self) -> int:
        return int(self.traces.shape[0])

    @property
    def nbytes(self) -> int:
        return self.traces.nbytes + self.controls.nbytes * 2 + self.n * 24


class _SegmentFile:
    """One open segment file on the writer side: its datasets and how many rows they hold."""

    def __init__(self, path: Path, *, describe: Mapping[str, Any], provenance: Mapping[str, Any],
                 index: int, first_file: str, session_id: str, tags: Sequence[str],
                 compression: str | None, chunk_rows: int, n_controls: int, n_outputs: int):
        self.path = path
        self.index = index
        self.n_controls, self.n_outputs = n_controls, n_outputs
        self.axis = _axis_of(describe, n_outputs)
        self.n_rows = self.n_batches = self.n_events = self.n_json = self.n_meta = 0
        self.flushed_batches = self.flushed_events = 0
        self.n_tags = len(tags)
        self.n_segments = 1
        # No raw-data chunk cache: every pass is flushed anyway, so a cache only adds a copy.
        f = self.file = h5py.File(path, "w-", libver=("v110", "latest"), rdcc_nbytes=0)
        try:
            self._create(describe, provenance, first_file, session_id, tags, compression, chunk_rows)
            f.swmr_mode = True
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def _create(self, describe, provenance, first_file, session_id, tags, compression, chunk_rows):
        f = self.file
        C, S = self.n_controls, self.n_outputs
        f.attrs["NX_class"] = "NXroot"
        f.attrs["default"] = "entry"
        f.attrs["labpnn_format"] = FORMAT
        f.attrs["session_id"] = session_id
        f.attrs["creator"] = "labpnn.session.SessionWriter"
        f.attrs["file_name"] = self.path.name
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        entry.attrs["describe"] = _dumps(describe)
        entry.attrs["provenance"] = _dumps(provenance)
        entry.attrs["start_time"] = _iso(time.time())
        entry.attrs["segment_index"] = self.index
        entry.attrs["first_file"] = first_file
        entry.attrs["title"] = str(describe.get("name", "session"))
        entry.attrs["tag_vocabulary"] = _dumps(list(TAG_VOCABULARY))
        self.segments = entry.create_dataset("segments", data=np.array([self.path.name.encode()],
                                                                      dtype=f"S{_NAME_BYTES}"),
                                             maxshape=(None,), chunks=(16,))
        self.tag_names = entry.create_dataset(
            "tag_names", data=np.array([t.encode() for t in tags], dtype=f"S{_TAG_BYTES}"),
            maxshape=(256,), chunks=(16,))

        comp: dict[str, Any] = {}
        self.compressed = bool(compression)
        if compression:
            comp = {"compression": compression, "shuffle": True}

        def rows(group, name, tail, dtype, chunk, **extra):
            return group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                                        chunks=(chunk, *tail), **extra)

        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "traces"
        data.attrs["axes"] = np.array([".", "output_axis"], dtype=h5py.string_dtype())
        data.attrs["output_axis_indices"] = 1
        trace_rows = max(1, min(chunk_rows, _CHUNK_BYTES // max(1, 4 * S)))
        control_rows = max(1, min(chunk_rows, _CHUNK_BYTES // max(1, 4 * C)))
        self.ds = {
            "traces": rows(data, "traces", (S,), np.float32, trace_rows, **comp),
            "controls": rows(data, "controls", (C,), np.float32, control_rows, **comp),
            "applied": rows(data, "applied", (C,), np.float32, control_rows, **comp),
            "timestamps": rows(data, "timestamps", (), np.float64, 1024),
            "flags": rows(data, "flags", (), np.uint32, 1024),
            "batch_id": rows(data, "batch_id", (), np.int64, 1024),
            "tag": rows(data, "tag", (), np.uint8, 1024),
        }
        name, unit, values = self.axis
        axis = data.create_dataset("output_axis", data=values)
        axis.attrs["units"] = unit
        axis.attrs["long_name"] = name
        self.ds["traces"].attrs["long_name"] = "raw traces"
        self.ds["controls"].attrs["long_name"] = "controls as sent"
        self.ds["applied"].attrs["long_name"] = "controls as applied"
        for key in ("controls", "applied"):
            self.ds[key].attrs["units"] = "1 (normalised to [0, 1])"
        self.ds["timestamps"].attrs["units"] = "s"
        self.ds["timestamps"].attrs["long_name"] = "unix time at the end of the row's acquisition"
        self.ds["flags"].attrs["long_name"] = "flags (labpnn.drivers.roles.FLAG_*)"
        self.ds["tag"].attrs["long_name"] = "tag code (see /entry/tag_names)"

        ctl = entry.create_group("controls")
        ctl.attrs["NX_class"] = "NXdata"
        ctl.attrs["signal"] = "controls"
        ctl.attrs["axes"] = np.array([".", "channel"], dtype=h5py.string_dtype())
        ctl.attrs["channel_indices"] = 1
        ctl["controls"] = self.ds["controls"]
        ctl["applied"] = self.ds["applied"]
        ctl.create_dataset("channel", data=np.arange(C, dtype=np.int64))

        batches = entry.create_group("batches")
        batches.attrs["NX_class"] = "NXcollection"
        self.table = rows(batches, "table", (), BATCH_DTYPE, 256)
        self.meta = rows(batches, "meta", (), np.uint8, 16384)
        batches.attrs["description"] = ("table: one row per batch (id, first_row, n_rows, n_sent, tag, time, "
                                        "busy_s, error, meta_end); batch k's Measurement.meta is the JSON "
                                        "meta[meta_end[k-1]:meta_end[k]] (empty: no meta)")
        events = entry.create_group("events")
        events.attrs["NX_class"] = "NXcollection"
        events.attrs["description"] = ("append-only event log: event i is json[end[i-1]:end[i]] "
                                       "(UTF-8 JSON {kind, message, data})")
        self.eds = {
            "time": rows(events, "time", (), np.float64, 256),
            "kind": rows(events, "kind", (), f"S{_TAG_BYTES}", 256),
            "end": rows(events, "end", (), np.int64, 256),
            "json": rows(events, "json", (), np.uint8, 16384),
        }

    # -- appends (writer thread only) ----------------------------------------------------------
    @staticmethod
    def _put_rows(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
        """Write rows ``start..`` (within the extent) with the low-level API: a third of the
        per-call cost of ``Dataset.write_direct``, which matters with a dozen datasets a batch."""
        values = np.ascontiguousarray(values, dtype=ds.dtype)
        fspace = ds.id.get_space()
        fspace.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
        ds.id.write(h5s.create_simple(values.shape), fspace, values)

    @classmethod
    def _extend(cls, ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
        end = start + values.shape[0]
        ds.id.set_extent((end, *ds.shape[1:]))
        if values.shape[0]:
            cls._put_rows(ds, start, values)

    def _write_rows(self, ds: h5py.Dataset, first: int, values: np.ndarray) -> None:
        """Rows ``first..`` of a 2-D dataset: whole aligned chunks go straight to the file
        (``write_direct_chunk``: no selection machinery, no copy), the ragged ends through the
        library. Without compression only (a direct chunk bypasses the filters)."""
        rows = int(ds.chunks[0])
        n = values.shape[0]
        if self.compressed or n < rows:
            self._put_rows(ds, first, values)
            return
        lo = -(-first // rows) * rows  # first chunk boundary at or after `first`
        hi = (first + n) // rows * rows  # last chunk boundary at or before the end
        if lo > first:
            self._put_rows(ds, first, values[: lo - first])
        for start in range(lo, hi, rows):
            ds.id.write_direct_chunk((start, 0), values[start - first:start - first + rows])
        if hi < first + n:  # (n >= rows, so hi >= lo)
            self._put_rows(ds, hi, values[hi - first:])

    def write_batches(self, batches: list[_Batch]) -> None:
        if not batches:
            return
        start = self.n_rows
        counts = [b.n for b in batches]
        firsts = np.cumsum([start, *counts])
        end = int(firsts[-1])
        # The wide arrays are written batch by batch (no concatenated copy), the narrow ones at once.
        for name in ("traces", "controls", "applied"):
            ds = self.ds[name]
            ds.id.set_extent((end, *ds.shape[1:]))
            for b, first in zip(batches, firsts[:-1].tolist(), strict=True):
                if b.n:
                    self._write_rows(ds, first, getattr(b, name))
        one = len(batches) == 1
        narrow = {
            "timestamps": batches[0].timestamps if one else np.concatenate([b.timestamps for b in batches]),
            "flags": batches[0].flags if one else np.concatenate([b.flags for b in batches]),
            "batch_id": np.repeat(np.array([b.batch_id for b in batches], np.int64), counts),
            "tag": np.repeat(np.array([b.tag for b in batches], np.uint8), counts),
        }
        for name, values in narrow.items():
            self._extend(self.ds[name], start, values)
        self.n_rows = end
        blob = b"".join(b.meta for b in batches)
        table = np.zeros(len(batches), BATCH_DTYPE)
        table["id"] = [b.batch_id for b in batches]
        table["first_row"] = firsts[:-1]
        table["n_rows"] = counts
        table["n_sent"] = [b.n_sent for b in batches]
        table["tag"] = [b.tag for b in batches]
        table["time"] = [b.time for b in batches]
        table["busy_s"] = [b.busy_s for b in batches]
        table["error"] = [b.error for b in batches]
        table["meta_end"] = self.n_meta + np.cumsum([len(b.meta) for b in batches])
        if blob:
            self._extend(self.meta, self.n_meta, np.frombuffer(blob, np.uint8))
            self.n_meta += len(blob)
        self._extend(self.table, self.n_batches, table)  # last: the commit record of these rows
        self.n_batches += len(batches)

    def write_events(self, events: list[tuple[float, str, bytes]]) -> None:
        if not events:
            return
        blobs = [e[2] for e in events]
        ends = self.n_json + np.cumsum([len(b) for b in blobs])
        self._extend(self.eds["json"], self.n_json, np.frombuffer(b"".join(blobs), np.uint8))
        self._extend(self.eds["end"], self.n_events, ends.astype(np.int64))
        self._extend(self.eds["kind"], self.n_events,
                     np.array([e[1].encode()[:_TAG_BYTES] for e in events], f"S{_TAG_BYTES}"))
        self._extend(self.eds["time"], self.n_events, np.array([e[0] for e in events], np.float64))
        self.n_json = int(ends[-1])
        self.n_events += len(events)

    def add_tag(self, name: str) -> None:
        self._extend(self.tag_names, self.n_tags, np.array([name.encode()], f"S{_TAG_BYTES}"))
        self.n_tags += 1

    def add_segment(self, name: str) -> None:
        self._extend(self.segments, self.n_segments, np.array([name.encode()], f"S{_NAME_BYTES}"))
        self.n_segments += 1

    def flush(self) -> None:
        self.file.flush()
        self.flushed_batches, self.flushed_events = self.n_batches, self.n_events

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def detach(self) -> None:
        """After a failed write: point the file's descriptor at the null device, so that nothing
        HDF5 still holds in memory (new extents whose data never reached the disk) is written
        later — by a close, or by the library's clean-up at exit. The file keeps exactly what the
        last successful flush left in it."""
        _ABANDONED.append(self)
        with contextlib.suppress(Exception):  # never freed: freeing h5py objects of a file whose
            import ctypes  # writes failed can crash the interpreter (seen with HDF5 2.0)

            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self))
        try:
            fd = int(self.file.id.get_vfd_handle())
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except Exception as exc:  # noqa: BLE001 - best effort (another driver, another OS)
            log.warning("could not detach %s after a write error: %s", self.path, exc)


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


def segment_path(path: str | Path, index: int) -> Path:
    """The file of segment ``index`` of the session whose first file is ``path`` (NAME.segK.h5)."""
    path = Path(path)
    if index == 0:
        return path
    return path.with_name(f"{path.stem}.seg{index}{path.suffix or '.h5'}")


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
        prov = globals()["provenance"]()
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
        code = "from labpnn.session import _writer_child; _writer_child()"
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


class _NoSpace(OSError):
    """A write pass refused before it touched the file (the disk or the size limit is too small)."""


#: segment files whose flush failed: never closed (HDF5 may crash closing them), never touched again
_ABANDONED: list[_SegmentFile] = []


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


# ------------------------------------------------------------------------------------------------
# recording wrapper


class RecordingSystem:
    """A `PhysicalSystem` that records every batch the wrapped system runs into a session.

    ``measure`` / ``run`` / ``measure_many`` append each `Measurement` under the current ``tag``;
    ``configure`` logs a ``configure`` event (and starts a new segment if the row shape or axis
    changed); failed or refused batches, aborts and instrument errors are logged as events. Other
    attributes are passed through to the wrapped system.

    ``on_write_error="raise"`` (default) raises `SessionWriteError` (carrying the measurement) once
    the session cannot be written; ``"warn"`` logs it once and goes on without recording (for a
    device server that must keep serving). ``owns_writer=True`` closes the writer in ``close()``.
    """

    def __init__(self, system: Any, writer: SessionWriter, tag: str = "train", *,
                 on_write_error: str = "raise", owns_writer: bool = False):
        if on_write_error not in ("raise", "warn"):
            raise ValueError("on_write_error must be 'raise' or 'warn'")
        self.system = system
        self.writer = writer
        self.tag = tag
        self.on_write_error = on_write_error
        self.owns_writer = owns_writer
        self._warned = False
        self._accepts = _keyword_arguments(getattr(system, "measure", None))

    @property
    def tag(self) -> str:
        return self._tag

    @tag.setter
    def tag(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"tag must be a string, got {value!r}")
        _encode_name(value, _TAG_BYTES, "tag")
        self._tag = value

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[RecordingSystem]:
        """``with rec.tagged("calibration"): ...`` records under ``tag`` inside the block."""
        old = self.tag
        self.tag = tag
        try:
            yield self
        finally:
            self.tag = old

    # -- PhysicalSystem ----------------------------------------------------------------------
    def describe(self) -> Mapping[str, Any]:
        return self.system.describe()

    def run(self, controls: np.ndarray) -> np.ndarray:
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: np.ndarray, abort: threading.Event | None = None, **kwargs: Any) -> Measurement:
        """Measure through the wrapped system and record the result. ``abort`` and other keyword
        arguments (e.g. a server's ``progress``) are passed on if the wrapped ``measure`` takes them."""
        tag = self.tag
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k in self._accepts}
        if abort is not None and "abort" in self._accepts:
            kwargs["abort"] = abort
        try:
            m = self.system.measure(controls, **kwargs) if kwargs else measure_of(self.system, controls)
        except LabpnnError as exc:
            self._event("refused", exc.message, code=exc.code.value, details=exc.details, tag=tag)
            raise
        except Exception as exc:
            self._event("error", f"{type(exc).__name__}: {exc}", tag=tag)
            raise
        return self._record(m, tag)

    def measure_many(self, batches: Any, *args: Any, **kwargs: Any) -> Any:
        """The wrapped system's ``measure_many`` (several batches in flight), each result recorded.
        A list comes back as a list, an iterator as an iterator."""
        many = getattr(self.system, "measure_many", None)
        tag = self.tag
        if many is None:
            return [self.measure(b) for b in batches]
        results = many(batches, *args, **kwargs)
        if isinstance(results, list):
            return [self._record(m, tag) if isinstance(m, Measurement) else m for m in results]
        return (self._record(m, tag) if isinstance(m, Measurement) else m for m in results)

    def configure(self, settings: Mapping[str, Any]) -> Any:
        try:
            result = self.system.configure(settings)
        except Exception as exc:
            self._event("configure_failed", str(exc), settings=settings)
            raise
        names = ", ".join(map(str, settings)) or "nothing"
        self._event("configure", f"configured {names}", settings=settings, result=result)
        try:
            describe = self.system.describe()
            if self.writer.needs_new_segment(describe):
                self.writer.new_segment(describe, "configure changed the row shape or the output axis")
        except SessionWriteError as exc:
            self._write_failed(exc, None)
        return result

    def safe_state(self) -> None:
        fn = getattr(self.system, "safe_state", None)
        if fn is not None:
            fn()
            self._event("safe_state", "actuators put in their safe state")

    def close(self) -> None:
        try:
            fn = getattr(self.system, "close", None)
            if fn is not None:
                fn()
        finally:
            if self.owns_writer:
                try:
                    self.writer.close()
                except SessionWriteError as exc:
                    if self.on_write_error == "raise":
                        raise
                    log.error("session %s is incomplete: %s", self.writer.path, exc)

    def __enter__(self) -> RecordingSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("system", "writer"):
            raise AttributeError(name)
        return getattr(self.system, name)

    # -- internals -----------------------------------------------------------------------------
    def _record(self, m: Measurement, tag: str) -> Measurement:
        try:
            batch = self.writer.append(m, tag)
            if m.error is not None:
                err = m.error
                kind = "abort" if getattr(err, "code", None) == ErrorCode.ABORTED else "instrument_error"
                self.writer.event(kind, getattr(err, "message", str(err)), batch=batch,
                                  code=getattr(getattr(err, "code", None), "value", None),
                                  n_done=m.n_done, n_sent=int(np.shape(m.controls)[0]),
                                  details=getattr(err, "details", {}), tag=tag)
        except SessionWriteError as exc:
            self._write_failed(exc, m)
        return m

    def _event(self, kind: str, message: str, **data: Any) -> None:
        try:
            self.writer.event(kind, message, **data)
        except SessionWriteError as exc:
            self._write_failed(exc, None)

    def _write_failed(self, exc: SessionWriteError, m: Measurement | None) -> None:
        if self.on_write_error == "raise":
            raise SessionWriteError(str(exc), measurement=m) from exc
        if not self._warned:
            self._warned = True
            log.error("recording stopped: %s", exc)


def _keyword_arguments(fn: Any) -> frozenset[str]:
    """Names a callable takes as keywords (all of ``abort``/``progress`` if it takes ``**kwargs``)."""
    if fn is None:
        return frozenset()
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"abort", "progress"})
    return frozenset(name for name, p in params.items()
                     if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def record_to(directory: str | Path, system: Any, *, name: str | None = None, tag: str = "train",
              seeds: Any = None, on_write_error: str = "raise", writer: str = "process",
              **writer_options: Any) -> RecordingSystem:
    """Wrap ``system`` so that everything it runs is recorded in a new session file in ``directory``
    (``NAME-YYYYmmdd-HHMMSS.h5``; for ``labpnn serve --record DIR``). The wrapper owns the writer:
    closing it closes the session. The writer is a separate process by default, so that HDF5 never
    holds the GIL of the process that serves the rig."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    describe = system.describe()
    stem = name or str(describe.get("name", "session"))
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "session"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"{stem}-{stamp}.h5"
    k = 1
    while path.exists() or segment_path(path, 1).exists():
        k += 1
        path = directory / f"{stem}-{stamp}-{k}.h5"
    session = SessionWriter(path, describe, provenance={"seeds": _jsonable(seeds)}, writer=writer, **writer_options)
    return RecordingSystem(system, session, tag, on_write_error=on_write_error, owns_writer=True)


# ------------------------------------------------------------------------------------------------
# reader


@dataclass
class Batch:
    """One recorded batch. Unpacks as ``batch_id, tag, rows`` (rows: a slice of global row
    indices); the arrays are read when the batch is yielded."""

    batch_id: int
    tag: str
    rows: slice
    controls: np.ndarray
    applied: np.ndarray
    traces: np.ndarray
    timestamps: np.ndarray
    flags: np.ndarray
    n_sent: int
    error: str  #: "" or the wire error code (ABORTED, INSTRUMENT, ...)
    segment: int
    meta: dict[str, Any]  #: the Measurement's meta (e.g. {"replay": "nearest"}), {} if none

    def __iter__(self):
        return iter((self.batch_id, self.tag, self.rows))


class Segment:
    """One segment file of a session, read with SWMR. Row counts cover complete batches only."""

    def __init__(self, path: Path, index: int):
        self.path = Path(path)
        self.index = index
        try:
            self.file = h5py.File(self.path, "r", swmr=True)
        except OSError as exc:
            raise SessionFormatError(f"{self.path}: cannot open as an HDF5 session: {exc}") from exc
        try:
            entry = self.file["entry"]
            self.describe: dict[str, Any] = json.loads(entry.attrs["describe"])
            self.provenance: dict[str, Any] = json.loads(entry.attrs["provenance"])
            self.start_time = _decode(entry.attrs.get("start_time", ""))
            self.session_id = _decode(self.file.attrs.get("session_id", ""))
            self.format = _decode(self.file.attrs.get("labpnn_format", ""))
            data = entry["data"]
            self.ds = {name: data[name] for name in PER_ROW}
            self.btable = entry["batches"]["table"]
            self.meta_ds = entry["batches"]["meta"]
            self.eds = {name: entry["events"][name] for name in ("time", "kind", "end", "json")}
            self.tag_ds = entry["tag_names"]
            self.segments_ds = entry["segments"]
            axis = data["output_axis"]
            self.axis = {"name": _decode(axis.attrs.get("long_name", "index")),
                         "unit": _decode(axis.attrs.get("units", "1")), "values": axis[()]}
        except (KeyError, ValueError) as exc:
            self.file.close()
            raise SessionFormatError(f"{self.path}: not a labpnn session file ({exc})") from exc
        self.row_offset = 0
        self.n_rows = self.n_batches = 0
        self._table: dict[str, np.ndarray] = {}
        self._sync()

    @property
    def shape(self) -> tuple[int, int]:
        """(C, S): controls per row, outputs per row."""
        return int(self.ds["controls"].shape[1]), int(self.ds["traces"].shape[1])

    def refresh(self) -> None:
        for ds in (*self.ds.values(), self.btable, *self.eds.values(), self.tag_ds, self.segments_ds,
                   self.meta_ds):
            ds.refresh()
        self._sync()

    def _sync(self) -> None:
        rows = min(ds.shape[0] for ds in self.ds.values())
        nb = self.btable.shape[0]
        raw = self.btable[:nb]
        table = {name: raw[name] for name in BATCH_FIELDS}
        ends = table["first_row"] + table["n_rows"]
        # The batch table is the commit record: keep the longest prefix of batches that tile the
        # rows from 0 with consecutive ids and whose rows exist in every per-row dataset (a write
        # cut off by a crash or a full disk can leave extents without data, or zeroed entries).
        starts = np.concatenate([[0], ends[:-1]])
        ids_ok = table["id"] == (table["id"][0] + np.arange(nb)) if nb else np.zeros(0, bool)
        meta_ok = (table["meta_end"] <= self.meta_ds.shape[0]) & (
            table["meta_end"] >= np.concatenate([[0], table["meta_end"][:-1]]))
        bad = np.flatnonzero((ends > rows) | (table["first_row"] != starts) | (table["n_rows"] < 0) | ~ids_ok
                             | ~meta_ok)
        if bad.size:
            nb = int(bad[0])
            table = {k: v[:nb] for k, v in table.items()}
        self._table = table
        self.n_batches = nb
        self.n_rows = int(ends[nb - 1]) if nb else 0
        #: rows in some per-row dataset beyond the last complete batch: a write cut off by a crash
        #: (or still in flight, for a growing file). Never shown as data.
        self.uncommitted_rows = max(ds.shape[0] for ds in self.ds.values()) - self.n_rows

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        ds = self.ds[name]
        sel = rows if rows is not None else slice(0, self.n_rows)
        start, stop, _ = sel.indices(self.n_rows)
        out = np.empty((max(0, stop - start), *ds.shape[1:]), ds.dtype)
        if out.shape[0]:
            ds.read_direct(out, source_sel=np.s_[start:stop])
        return out

    def read_rows(self, name: str, rows: Any) -> np.ndarray:
        """The rows at indices ``rows`` (any order, repeats allowed), read from the file."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        ds = self.ds[name]
        if rows.size == 0:
            return np.empty((0, *ds.shape[1:]), ds.dtype)
        wanted, inverse = np.unique(rows, return_inverse=True)
        if wanted[0] < 0 or wanted[-1] >= self.n_rows:
            raise IndexError(f"{self.path}: rows outside [0, {self.n_rows})")
        return ds[wanted][inverse]  # h5py reads increasing, unique indices

    def tag_names(self) -> list[str]:
        return [_decode(t) for t in self.tag_ds[()]]

    def events(self) -> list[dict[str, Any]]:
        n = min(ds.shape[0] for ds in (self.eds["time"], self.eds["kind"], self.eds["end"]))
        ends = self.eds["end"][:n]
        size = self.eds["json"].shape[0]
        n = int(np.searchsorted(ends, size, side="right")) if n else 0
        if n == 0:
            return []
        blob = self.eds["json"][: int(ends[n - 1])].tobytes()
        out, start = [], 0
        times = self.eds["time"][:n]
        for i in range(n):
            end = int(ends[i])
            try:
                ev = json.loads(blob[start:end].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                ev = {"kind": _decode(self.eds["kind"][i]), "message": "(undecodable event)", "data": {}}
            start = end
            ev["time"] = float(times[i])
            ev["segment"] = self.index
            out.append(ev)
        return out

    def batch_table(self) -> dict[str, np.ndarray]:
        return self._table

    def batch_meta(self) -> list[dict[str, Any]]:
        """``Measurement.meta`` of every complete batch ({} when there was none)."""
        if not self.n_batches:
            return []
        ends = self._table["meta_end"]
        blob = self.meta_ds[: int(ends[-1])].tobytes() if ends[-1] else b""
        out, start = [], 0
        for end in ends.tolist():
            out.append(json.loads(blob[start:end]) if end > start else {})
            start = end
        return out

    def segment_names(self) -> list[str]:
        return [_decode(s) for s in self.segments_ds[()]]

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class SessionReader:
    """A session (all its segments) read with SWMR: finished, or still being written.

    Arrays are read on access (and cached until ``refresh()`` finds new rows); global row indices
    run across segments. When segments differ in row shape, the concatenated array properties raise
    and ``segments[i]`` gives each segment's arrays. ``describe`` and ``axis`` are those of the
    first segment; the event log merges all segments in time order.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such session file")
        first = Segment(path, 0)
        index = int(first.file["entry"].attrs.get("segment_index", 0))
        if index != 0:
            first_name = _decode(first.file["entry"].attrs["first_file"])
            first.close()
            path = path.with_name(first_name)
            first = Segment(path, 0)
        self.path = path
        self.segments: list[Segment] = [first]
        self._cache: dict[str, Any] = {}
        self._open_new_segments()

    # -- metadata ------------------------------------------------------------------------------
    @property
    def describe(self) -> dict[str, Any]:
        return self.segments[0].describe

    @property
    def provenance(self) -> dict[str, Any]:
        return self.segments[0].provenance

    @property
    def session_id(self) -> str:
        return self.segments[0].session_id

    @property
    def axis(self) -> dict[str, Any]:
        return self.segments[0].axis

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.segments)

    @property
    def n_batches(self) -> int:
        return sum(s.n_batches for s in self.segments)

    @property
    def tag_names(self) -> list[str]:
        """Tag vocabulary of the last segment (a superset of the earlier ones')."""
        return self.segments[-1].tag_names()

    @property
    def events(self) -> list[dict[str, Any]]:
        if "events" not in self._cache:
            evs = [e for s in self.segments for e in s.events()]
            evs.sort(key=lambda e: e["time"])
            self._cache["events"] = evs
        return self._cache["events"]

    # -- arrays --------------------------------------------------------------------------------
    def _concat(self, name: str) -> np.ndarray:
        if name not in self._cache:
            parts = [s.read(name) for s in self.segments]
            if len(parts) == 1:
                self._cache[name] = parts[0]
            else:
                tails = {p.shape[1:] for p in parts}
                if len(tails) > 1:
                    raise ValueError(f"{self.path}: segments have different row shapes "
                                     f"({sorted(s.shape for s in self.segments)}); use .segments[i].read({name!r})")
                self._cache[name] = np.concatenate(parts)
        return self._cache[name]

    controls = property(lambda self: self._concat("controls"), doc="float32[N, C] controls as sent")
    applied = property(lambda self: self._concat("applied"), doc="float32[N, C] controls as applied")
    traces = property(lambda self: self._concat("traces"), doc="float32[N, S] raw traces")
    timestamps = property(lambda self: self._concat("timestamps"), doc="float64[N] unix time per row")
    flags = property(lambda self: self._concat("flags"), doc="uint32[N] per-row flags")
    batch_ids = property(lambda self: self._concat("batch_id"), doc="int64[N] batch id per row")

    @property
    def tag_codes(self) -> np.ndarray:
        return self._concat("tag")

    @property
    def tags(self) -> np.ndarray:
        """Tag name per row (numpy str array)."""
        if "tags" not in self._cache:
            parts = []
            for s in self.segments:
                names = s.tag_names()
                lut = np.array(names + [f"tag{k}" for k in range(len(names), 256)], dtype=str)
                parts.append(lut[s.read("tag").astype(np.intp)])
            self._cache["tags"] = np.concatenate(parts) if parts else np.zeros(0, str)
        return self._cache["tags"]

    def select(self, tags: str | Sequence[str] | None = None, *, batches: Sequence[int] | None = None) -> np.ndarray:
        """Global row indices (int64, ascending) whose tag is in ``tags`` and/or whose batch id is
        in ``batches``."""
        mask = np.ones(self.n_rows, bool)
        if tags is not None:
            mask &= np.isin(self.tags, [tags] if isinstance(tags, str) else list(tags))
        if batches is not None:
            mask &= np.isin(self.batch_ids, np.asarray(list(batches), np.int64))
        return np.flatnonzero(mask).astype(np.int64)

    def batches(self, tags: str | Sequence[str] | None = None) -> Iterator[Batch]:
        """Every complete batch in recording order (across segments), optionally only ``tags``."""
        wanted = None if tags is None else ({tags} if isinstance(tags, str) else set(tags))
        for seg in self.segments:
            names = seg.tag_names()
            table = seg.batch_table()
            metas = seg.batch_meta()
            for k in range(seg.n_batches):
                code = int(table["tag"][k])
                tag = names[code] if code < len(names) else f"tag{code}"
                if wanted is not None and tag not in wanted:
                    continue
                first, n = int(table["first_row"][k]), int(table["n_rows"][k])
                local = slice(first, first + n)
                yield Batch(
                    batch_id=int(table["id"][k]), tag=tag,
                    rows=slice(seg.row_offset + first, seg.row_offset + first + n),
                    controls=seg.read("controls", local), applied=seg.read("applied", local),
                    traces=seg.read("traces", local), timestamps=seg.read("timestamps", local),
                    flags=seg.read("flags", local), n_sent=int(table["n_sent"][k]),
                    error=_decode(table["error"][k]), segment=seg.index, meta=metas[k],
                )

    def batch_meta(self) -> list[dict[str, Any]]:
        """``Measurement.meta`` of every batch, in batch order ({} when there was none)."""
        return [m for seg in self.segments for m in seg.batch_meta()]

    def batch_table(self) -> dict[str, np.ndarray]:
        """The batch table of all segments (first_row as global row index; meta_end per segment)."""
        parts = []
        for seg in self.segments:
            t = dict(seg.batch_table())
            t["first_row"] = t["first_row"] + seg.row_offset
            t["segment"] = np.full(seg.n_batches, seg.index, np.int64)
            parts.append(t)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # -- growing sessions ----------------------------------------------------------------------
    def refresh(self) -> int:
        """Catch up with a session still being written; return the number of new rows."""
        before = self.n_rows
        for seg in self.segments:
            seg.refresh()
        self._open_new_segments()
        self._cache.clear()
        return self.n_rows - before

    def _open_new_segments(self) -> None:
        names = self.segments[0].segment_names()
        for index in range(len(self.segments), len(names)):
            try:
                self.segments.append(Segment(self.path.with_name(names[index]), index))
            except (SessionFormatError, FileNotFoundError) as exc:
                log.warning("segment %s of %s not readable yet: %s", names[index], self.path, exc)
                break
        offset = 0
        for seg in self.segments:
            seg.row_offset = offset
            offset += seg.n_rows

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        self._cache.clear()

    def __enter__(self) -> SessionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SessionReader({str(self.path)!r}, rows={self.n_rows}, segments={len(self.segments)})"


def open_session(path: str | Path) -> SessionReader:
    """Open a session (finished or growing) for reading; ``path`` may name any of its segments."""
    return SessionReader(path)


__all__ = [
    "FORMAT", "TAG_VOCABULARY", "Batch", "RecordingSystem", "Segment", "SessionFormatError",
    "SessionReader", "SessionWriteError", "SessionWriter", "open_session", "provenance",
    "record_to", "segment_path",
]
