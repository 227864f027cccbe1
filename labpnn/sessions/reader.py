"""Reading sessions, finished or growing (SWMR): `open_session`, `SessionReader`, `Segment`, `Batch`."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from labpnn.sessions.layout import BATCH_FIELDS, PER_ROW, SessionFormatError, _decode

log = logging.getLogger(__name__)




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
