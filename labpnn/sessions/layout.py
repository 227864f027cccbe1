"""The session file's HDF5 layout: the datasets and attributes that writer and reader share, and
`_SegmentFile`, which creates and appends to one segment file (the writing side of the layout).

Sessions: every batch a physical system runs, raw, to HDF5 — crash-safe, readable while it grows.

`SessionWriter` appends `Measurement`s to one HDF5 file per session in SWMR mode: every dataset and
attribute is created first, then ``swmr_mode`` is switched on, then rows are only appended and the
file flushed on batch boundaries. Writes happen on a writer thread behind a bounded queue: `append`
copies the arrays and returns at once; a full queue blocks the caller (back-pressure, nothing is
dropped). A write failure (disk full, file size limit) becomes a `SessionWriteError` raised by the
next ``append`` / ``event`` / ``flush`` / ``close``; everything flushed before it stays readable.
`RecordingSystem` wraps any `PhysicalSystem` so that every batch it runs is logged; `open_session`
reads a finished or a growing session (SWMR reader) and follows its segments. Replay lives in
``labpnn.sessions.replay``. Twin checkpoints and training metrics go in their own files, never in a session.

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

import contextlib
import functools
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5s

from labpnn.contract import Measurement

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
        f.attrs["creator"] = "labpnn.sessions.SessionWriter"
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


#: segment files whose flush failed: never closed (HDF5 may crash closing them), never touched again
_ABANDONED: list[_SegmentFile] = []


def segment_path(path: str | Path, index: int) -> Path:
    """The file of segment ``index`` of the session whose first file is ``path`` (NAME.segK.h5)."""
    path = Path(path)
    if index == 0:
        return path
    return path.with_name(f"{path.stem}.seg{index}{path.suffix or '.h5'}")
