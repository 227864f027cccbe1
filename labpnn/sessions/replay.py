"""`ReplayRig`: a recorded session answering as a `PhysicalSystem`, so trainer code runs offline.

A batch is answered from the records row by row, in any order: a row matches a recorded row when
every control is within ``tolerance`` of it (max-abs distance over the channels, on the controls
as sent). When the same controls were measured several times, successive requests get the
recorded repeats in turn (recording order, then round again), so replaying a session's own
controls gives back its traces exactly. Controls never measured are refused, the whole batch,
with `NotRecorded` naming the row and how far the nearest record is.

Modes that answer unmeasured controls are opt-in and say so everywhere:
- ``mode="nearest"``: the recorded row nearest (Euclidean) to the request;
- ``mode="twin"``: ``twin(controls float32[B, C]) -> traces float32[B, S]`` (e.g. a fitted digital twin).
``describe()["replay"]`` gives ``{"mode", "tolerance", "source", "rows"}``; every `Measurement`
carries ``meta["replay"] = mode`` plus ``n_approximate`` / ``max_distance`` / ``source_rows``
(-1 for twin rows), and rows not answered from an exact record have `FLAG_REPLAY_APPROX` set.

Controls, applied controls and flags are held in memory; traces too up to ``max_memory_bytes``
(1 GiB), beyond which they stay in the files and each batch reads the rows it needs
(``describe()["replay"]["traces"]`` says which). Imports no torch.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labpnn.contract import Measurement, validate_controls
from labpnn.drivers.roles import FLAG_REPLAY_APPROX
from labpnn.protocols.errors import BadSetting, InvalidControls
from labpnn.sessions.reader import open_session

MODES = ("exact", "nearest", "twin")


class NotRecorded(InvalidControls):
    """Controls that no replayed session measured (wire code INVALID_CONTROLS)."""


class ReplayRig:
    """Serve one or more recorded sessions (same C and S) as a `PhysicalSystem`.

    ``tags`` restricts the records used to rows with those tags (e.g. ``("calibration",)``).
    Traces larger than ``max_memory_bytes`` in all are read from the files as needed (`close()`
    closes them).
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], *, tolerance: float = 1e-6,
                 mode: str = "exact", twin: Callable[[np.ndarray], np.ndarray] | None = None,
                 tags: Sequence[str] | None = None, max_memory_bytes: int = 2**30):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "twin" and twin is None:
            raise ValueError("mode='twin' needs a twin: a callable controls -> traces")
        if not np.isfinite(tolerance) or tolerance < 0:
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
        self.mode, self.tolerance, self.twin = mode, float(tolerance), twin
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("ReplayRig needs at least one session file")
        self.sources = [str(Path(p)) for p in paths]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("controls", "applied", "flags")}
        describe: dict[str, Any] | None = None
        shape = None
        self._readers = []
        kept: list[tuple[Any, np.ndarray]] = []  # (segment, its rows in use)
        try:
            for path in paths:
                reader = open_session(path)
                self._readers.append(reader)
                for seg in reader.segments:
                    if shape is None:
                        shape = seg.shape
                        describe = dict(seg.describe)
                    elif seg.shape != shape:
                        raise ValueError(f"{seg.path}: rows of shape (C, S) = {seg.shape}, but {self.sources[0]} "
                                         f"has {shape}; replay sessions of one shape at a time")
                    rows = np.arange(seg.n_rows)
                    if tags is not None:
                        names = np.array(seg.tag_names() + [""] * 256, dtype=str)
                        rows = rows[np.isin(names[seg.read("tag").astype(np.intp)], list(tags))]
                    for key in parts:
                        parts[key].append(seg.read(key)[rows])
                    kept.append((seg, rows))
            assert describe is not None and shape is not None
            self.n_controls, self.n_outputs = shape
            n_rows = sum(rows.size for _, rows in kept)
            self.traces_in_memory = n_rows * self.n_outputs * 4 <= max_memory_bytes
            if self.traces_in_memory:
                self._traces = np.concatenate([seg.read("traces")[rows] for seg, rows in kept])
                self.close()
            else:  # where each row's trace lies: segment number and row in it
                self._traces = None
                self._segments = [seg for seg, _ in kept]
                self._src_segment = np.concatenate([np.full(rows.size, k, np.int32)
                                                    for k, (_, rows) in enumerate(kept)])
                self._src_row = np.concatenate([rows for _, rows in kept]).astype(np.int64)
        except BaseException:
            self.close()
            raise
        self._controls = np.concatenate(parts["controls"]) + np.float32(0.0)  # -0.0 -> 0.0
        self._applied = np.concatenate(parts["applied"])
        self._flags = np.concatenate(parts["flags"])
        if self._controls.shape[0] == 0:
            raise ValueError(f"no recorded rows to replay in {', '.join(self.sources)}")
        self._index: dict[bytes, np.ndarray] = {}
        groups: dict[bytes, list[int]] = {}
        for i, row in enumerate(self._controls):
            groups.setdefault(row.tobytes(), []).append(i)
        self._index = {k: np.asarray(v, np.int64) for k, v in groups.items()}
        self._turn: dict[bytes, int] = {}
        sums = self._controls.sum(axis=1, dtype=np.float64)
        self._order = np.argsort(sums, kind="stable")
        self._sums = sums[self._order]
        self._sq = (self._controls.astype(np.float64) ** 2).sum(axis=1)
        self._lock = threading.Lock()
        self.rows_answered = 0
        self._describe = describe
        self._describe["name"] = f"replay:{describe.get('name', 'session')}"
        self._describe["replay"] = {"mode": mode, "tolerance": self.tolerance, "source": self.sources,
                                    "rows": int(self._controls.shape[0]),
                                    "traces": "memory" if self.traces_in_memory else "files",
                                    "answers_unmeasured_controls": mode != "exact"}

    # -- PhysicalSystem ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def run(self, controls: np.ndarray) -> np.ndarray:
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: Any, abort: threading.Event | None = None) -> Measurement:
        batch = validate_controls(controls, self.n_controls)
        with self._lock:
            rows, dist, used = self._match(batch)
            missing = np.flatnonzero(rows < 0)
            if missing.size and self.mode == "exact":
                self._refuse(batch, missing)
            for key, count in used.items():
                self._turn[key] = self._turn.get(key, 0) + count
            traces = np.empty((batch.shape[0], self.n_outputs), np.float32)
            applied = np.empty_like(batch)
            flags = np.zeros(batch.shape[0], np.uint32)
            found = rows >= 0
            self._take(rows, found, traces, applied, flags)
            if missing.size:
                if self.mode == "nearest":
                    near, near_dist = self._nearest(batch[missing])
                    rows[missing], dist[missing] = near, near_dist
                    self._take(rows, ~found, traces, applied, flags)
                else:
                    out = np.asarray(self.twin(batch[missing]), np.float32)  # type: ignore[misc]
                    if out.shape != (missing.size, self.n_outputs):
                        raise ValueError(f"twin returned shape {out.shape}, expected {(missing.size, self.n_outputs)}")
                    traces[missing] = out
                    applied[missing] = batch[missing]
                    dist[missing] = np.nan
                flags[missing] |= FLAG_REPLAY_APPROX
            self.rows_answered += batch.shape[0]
        meta = {"replay": self.mode, "n_approximate": int(missing.size),
                "max_distance": float(np.nanmax(dist)) if np.isfinite(dist).any() else None,
                "source_rows": rows.tolist()}
        now = time.time()
        return Measurement(batch, traces, applied, np.full(batch.shape[0], now), flags, meta=meta)

    def configure(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """A replay cannot change the physics: settings equal to those recorded are accepted
        (and returned), anything else is refused."""
        recorded = self._describe.get("settings", {}) or {}
        for name, values in settings.items():
            if name not in recorded:
                raise BadSetting(f"replay: no instrument named {name!r} was recorded (have: {sorted(recorded)})")
            if not isinstance(values, Mapping):
                raise BadSetting(f"settings for {name!r} must be a table of setting = value")
            for key, value in values.items():
                if recorded[name].get(key) != value:
                    raise BadSetting(f"replay: {name}.{key} was {recorded[name].get(key)!r} in the recording; "
                                     f"a replay cannot change it to {value!r}")
        return {name: recorded[name] for name in settings}

    def safe_state(self) -> None:
        pass

    def close(self) -> None:
        """Close the session files (if the traces are read from them, the rig answers no more)."""
        for reader in self._readers:
            reader.close()
        self._readers = []

    def __enter__(self) -> ReplayRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- matching ----------------------------------------------------------------------------
    def _match(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[bytes, int]]:
        """Recorded row per requested row (-1: none within tolerance), its max-abs distance, and
        how many times each record was used (committed only when the batch is answered)."""
        used: dict[bytes, int] = {}
        rows = np.full(batch.shape[0], -1, np.int64)
        dist = np.full(batch.shape[0], np.inf)
        tol = self.tolerance
        slack = self.n_controls * tol * (1 + 1e-9) + 1e-9
        for i, q in enumerate(batch + np.float32(0.0)):
            key = q.tobytes()
            if key not in self._index:
                if tol <= 0:
                    continue
                s = float(q.sum(dtype=np.float64))
                lo, hi = np.searchsorted(self._sums, [s - slack, s + slack])
                if hi <= lo:
                    continue
                cand = self._order[lo:hi]
                d = np.abs(self._controls[cand] - q).max(axis=1)
                best = int(np.argmin(d))
                if d[best] > tol:
                    continue
                key = self._controls[cand[best]].tobytes()
                dist[i] = float(d[best])
            else:
                dist[i] = 0.0
            repeats = self._index[key]
            used[key] = used.get(key, 0) + 1
            rows[i] = repeats[(self._turn.get(key, 0) + used[key] - 1) % repeats.size]
        return rows, dist, used

    def _nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = queries.astype(np.float64)
        best = np.zeros(q.shape[0], np.int64)
        best_d2 = np.full(q.shape[0], np.inf)
        step = 65536
        for start in range(0, self._controls.shape[0], step):
            block = self._controls[start:start + step].astype(np.float64)
            d2 = self._sq[start:start + step, None] - 2.0 * block @ q.T + (q ** 2).sum(axis=1)[None, :]
            arg = np.argmin(d2, axis=0)
            val = d2[arg, np.arange(q.shape[0])]
            better = val < best_d2
            best[better], best_d2[better] = arg[better] + start, val[better]
        maxabs = np.abs(self._controls[best] - queries).max(axis=1).astype(np.float64)
        return best, maxabs

    def _take(self, rows: np.ndarray, which: np.ndarray, traces, applied, flags) -> None:
        if which.any():
            src = rows[which]
            traces[which] = self._traces[src] if self._traces is not None else self._read_traces(src)
            applied[which] = self._applied[src]
            flags[which] = self._flags[src]

    def _read_traces(self, rows: np.ndarray) -> np.ndarray:
        if not self._readers:
            raise RuntimeError("this ReplayRig is closed: its traces are in files it no longer has open")
        out = np.empty((rows.size, self.n_outputs), np.float32)
        segment = self._src_segment[rows]
        for k in np.unique(segment):
            where = np.flatnonzero(segment == k)
            out[where] = self._segments[k].read_rows("traces", self._src_row[rows[where]])
        return out

    def _refuse(self, batch: np.ndarray, missing: np.ndarray) -> None:
        row = int(missing[0])
        _, far = self._nearest(batch[row:row + 1])
        raise NotRecorded(
            f"replay: controls of row {row} were never measured in {', '.join(self.sources)} "
            f"(nearest record is {float(far[0]):.3g} away in max-abs, tolerance {self.tolerance:g}; "
            f"{missing.size} of {batch.shape[0]} rows unmatched). Replay answers recorded controls only; "
            "mode='nearest' (or a twin) answers others approximately, labelled as such.",
            details={"row": row, "n_unmatched": int(missing.size), "distance": float(far[0]),
                     "tolerance": self.tolerance},
        )


__all__ = ["FLAG_REPLAY_APPROX", "MODES", "NotRecorded", "ReplayRig"]
