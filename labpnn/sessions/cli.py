"""``labpnn inspect | import``: look into a session, make one from data recorded elsewhere.

- ``labpnn inspect SESSION [--plot out.png] [--json]`` — summary (rig, rows, batches, tags, time span,
  flags, errors, events, provenance); ``--plot`` draws example traces, a trace heat-map and a
  controls heat-map; ``--json`` prints the summary as JSON for scripts.
- ``labpnn import --controls X --traces Y -o SESSION`` — controls -> traces pairs from CSV (one
  measurement per row, header row optional) or NPZ/NPY. Controls in [0, 1] are kept as they are;
  others are refused unless ``--scale-controls LO HI`` or ``--scale-controls auto`` maps them, and
  the scaling is recorded in the session (``describe["import"]`` and the ``import`` event).
(``labpnn replay``, which serves a session, is a command of `labpnn.remote.cli`.)

Imports no torch.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from labpnn.sessions.layout import segment_path
from labpnn.sessions.reader import SessionReader, open_session
from labpnn.sessions.writer import SessionWriter

FLAG_NAMES = {0: "SATURATED", 1: "QUANTISED", 2: "LIMITED", 8: "REPLAY_APPROX"}


class ImportProblem(ValueError):
    """Input files that cannot become a session; the message says which file and why."""


# ------------------------------------------------------------------------------------------------
# inspect


def _sample_index(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def _read_rows(reader: SessionReader, name: str, rows: np.ndarray, segments: list) -> np.ndarray:
    """Rows (global indices, ascending) of a per-row dataset from the given segments."""
    parts = []
    for seg in segments:
        local = rows[(rows >= seg.row_offset) & (rows < seg.row_offset + seg.n_rows)] - seg.row_offset
        if local.size:
            parts.append(seg.ds[name][local])
    return np.concatenate(parts) if parts else np.zeros((0,))


def summarize(reader: SessionReader, *, n_events: int = 8) -> dict[str, Any]:
    """A JSON-able summary of a session (what ``labpnn inspect`` prints)."""
    d = reader.describe
    stamps = reader.timestamps if reader.n_rows else np.zeros(0)
    known = stamps[np.isfinite(stamps)]
    tags = reader.tags
    names, counts = np.unique(tags, return_counts=True) if tags.size else ([], [])
    table = reader.batch_table()
    n_sent = int(table["n_sent"].sum()) if reader.n_batches else 0
    errors = Counter(e.decode() if isinstance(e, bytes) else str(e) for e in table["error"]) if reader.n_batches else {}
    errors.pop("", None)
    flags = reader.flags
    flag_counts = {FLAG_NAMES.get(bit, f"bit{bit}"): int(((flags >> np.uint32(bit)) & 1).sum())
                   for bit in range(32) if flags.size and ((flags >> np.uint32(bit)) & 1).any()}
    events = reader.events
    axis = reader.axis
    values = np.asarray(axis["values"], np.float64)
    prov = reader.provenance
    git = prov.get("git") or {}
    span = float(known.max() - known.min()) if known.size > 1 else 0.0
    summary: dict[str, Any] = {
        "path": str(reader.path),
        "session_id": reader.session_id,
        "format": reader.segments[0].format,
        "name": d.get("name"),
        "n_controls": int(d.get("n_controls", 0)),
        "n_outputs": int(d.get("n_outputs", 0)),
        "axis": {"name": axis["name"], "unit": axis["unit"],
                 "first": float(values[0]) if values.size else None,
                 "last": float(values[-1]) if values.size else None},
        "instruments": d.get("instruments", {}),
        "n_rows": reader.n_rows,
        "n_batches": reader.n_batches,
        "rows_sent": n_sent,
        "batch_errors": dict(errors),
        "tags": {str(k): int(v) for k, v in zip(names, counts, strict=True)},
        "flags": flag_counts,
        "start": known.min().item() if known.size else None,
        "end": known.max().item() if known.size else None,
        "duration_s": span,
        "rows_per_s": (known.size / span) if span > 0 else None,
        "timestamps_unknown": int(stamps.size - known.size),
        "segments": [{"file": seg.path.name, "rows": seg.n_rows, "batches": seg.n_batches,
                      "shape": list(seg.shape), "uncommitted_rows": seg.uncommitted_rows}
                     for seg in reader.segments],
        "uncommitted_rows": sum(seg.uncommitted_rows for seg in reader.segments),
        "events": {"count": len(events), "by_kind": dict(Counter(e.get("kind", "?") for e in events)),
                   "last": events[-n_events:]},
        "provenance": {"versions": prov.get("versions", {}), "git": git, "host": prov.get("host"),
                       "seeds": prov.get("seeds"), "time": prov.get("time")},
    }
    replayed = Counter()
    approximate = 0
    for meta in reader.batch_meta():
        if "replay" in meta:
            replayed[str(meta["replay"])] += 1
            approximate += int(meta.get("n_approximate") or 0)
    if replayed:  # recorded from a replay: say so, and how many rows were not real measurements
        summary["replayed_batches"] = {"by_mode": dict(replayed), "approximate_rows": approximate}
    if "replay" in d:
        summary["replay"] = d["replay"]
    if "import" in d:
        summary["import"] = d["import"]
    return summary


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def format_summary(s: dict[str, Any]) -> str:
    ax = s["axis"]
    lines = [
        f"session     {s['path']}  ({s['format']}, id {s['session_id'][:12]}, "
        f"{len(s['segments'])} segment{'s' if len(s['segments']) != 1 else ''})",
        f"rig         {s['name']}: {s['n_controls']} controls -> {s['n_outputs']} outputs, axis "
        f"{ax['name']} [{ax['unit']}] {ax['first']:g} .. {ax['last']:g}" if ax["first"] is not None else
        f"rig         {s['name']}: {s['n_controls']} controls -> {s['n_outputs']} outputs",
    ]
    for name, ident in (s["instruments"] or {}).items():
        lines.append(f"instrument  {name}: {ident}")
    rows = f"rows        {s['n_rows']} in {s['n_batches']} batches"
    if s["rows_sent"] != s["n_rows"]:
        rows += f" ({s['rows_sent'] - s['n_rows']} rows sent but not measured)"
    if s["uncommitted_rows"]:
        rows += (f"; {s['uncommitted_rows']} rows past the last complete batch ignored "
                 "(a write cut off by a crash, or still in flight)")
    if s["batch_errors"]:
        rows += "; failed batches: " + ", ".join(f"{k} {v}" for k, v in s["batch_errors"].items())
    lines.append(rows)
    if s["start"] is not None:
        rate = f", {s['rows_per_s']:.1f} rows/s" if s["rows_per_s"] else ""
        lines.append(f"time        {_fmt_time(s['start'])} -> {_fmt_time(s['end'])} "
                     f"({s['duration_s']:.1f} s{rate})")
    if s["timestamps_unknown"]:
        lines.append(f"            {s['timestamps_unknown']} rows without a timestamp (imported)")
    lines.append("tags        " + (", ".join(f"{k} {v}" for k, v in s["tags"].items()) or "-"))
    if s["flags"]:
        lines.append("flags       " + ", ".join(f"{k} {v}" for k, v in s["flags"].items()))
    if len(s["segments"]) > 1:
        for seg in s["segments"]:
            lines.append(f"segment     {seg['file']}: {seg['rows']} rows, {seg['batches']} batches, "
                         f"shape {tuple(seg['shape'])}")
    if "replay" in s:
        lines.append(f"replay      {s['replay']}")
    if "replayed_batches" in s:
        rb = s["replayed_batches"]
        lines.append("replayed    batches answered by a replay: " + ", ".join(f"{k} {v}" for k, v in rb["by_mode"].items())
                     + (f"; {rb['approximate_rows']} rows were APPROXIMATE (not measured)" if rb["approximate_rows"]
                        else ""))
    if "import" in s:
        imp = s["import"]
        files = ", ".join(f"{v.get('path', 'array')}" + (f" (sha256 {v['sha256'][:12]})" if "sha256" in v else "")
                          for v in (imp.get("sources") or {}).values())
        scaling = imp.get("controls_scaling")
        how = (f"controls scaled: {scaling.get('kind')}, {scaling.get('formula')}" if scaling
               else "controls kept as they were (already in [0, 1])")
        lines.append(f"import      from {files}; {how}")
    ev = s["events"]
    lines.append(f"events      {ev['count']}" + (": " + ", ".join(f"{k} {v}" for k, v in ev["by_kind"].items())
                                                  if ev["count"] else ""))
    for e in ev["last"]:
        lines.append(f"  {_fmt_time(e.get('time'))}  {e.get('kind', '?'):<16} {str(e.get('message', ''))[:100]}")
    p = s["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    git = p["git"] or {}
    rev = f"git {git.get('revision', '?')[:10]}{' (dirty)' if git.get('dirty') else ''}" if git else "no git revision"
    lines.append(f"provenance  {rev}; host {p['host']}; {versions}")
    if p.get("seeds") is not None:
        lines.append(f"seeds       {p['seeds']}")
    return "\n".join(lines)


def plot_session(reader: SessionReader, out: str | Path, *, max_rows: int = 2000, n_examples: int = 6) -> Path:
    """Example traces, a trace heat-map and a controls heat-map, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    segments = [s for s in reader.segments if s.shape == reader.segments[0].shape]
    n = sum(s.n_rows for s in segments)
    d = reader.describe
    title = (f"{d.get('name', 'session')} — {reader.path.name}: {reader.n_rows} rows, {reader.n_batches} batches"
             + (f" (plotting the {len(segments)} of {len(reader.segments)} segments shaped like the first)"
                if len(segments) < len(reader.segments) else ""))
    fig = plt.figure(figsize=(12, 8), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    ax_tr, ax_map, ax_ctl = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    fig.suptitle(title)
    axis = reader.axis
    values = np.asarray(axis["values"], np.float64)
    xlabel = f"{axis['name']} [{axis['unit']}]"
    if n == 0:
        for ax in (ax_tr, ax_map, ax_ctl):
            ax.text(0.5, 0.5, "no rows yet", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
    rows = _sample_index(n, max_rows)
    traces = _read_rows(reader, "traces", rows, segments).astype(np.float32)
    controls = _read_rows(reader, "controls", rows, segments).astype(np.float32)
    codes = _read_rows(reader, "tag", rows, segments).astype(np.intp)
    names = np.array(reader.tag_names + [f"tag{k}" for k in range(len(reader.tag_names), 256)], dtype=str)
    row_tags = names[codes]
    examples = _sample_index(rows.size, n_examples)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, examples.size)))
    for color, k in zip(colors, examples, strict=False):
        ax_tr.plot(values, traces[k], lw=1, color=color, label=f"row {rows[k]} ({row_tags[k]})")
    ax_tr.set_xlabel(xlabel)
    ax_tr.set_ylabel("trace (raw)")
    ax_tr.set_title("example traces")
    ax_tr.legend(fontsize=7, loc="best")
    lo, hi = np.nanpercentile(traces, [1, 99]) if np.isfinite(traces).any() else (0, 1)
    extent_x = (float(values[0]), float(values[-1])) if values.size > 1 else (0, 1)
    im = ax_map.imshow(traces, aspect="auto", origin="lower", interpolation="nearest", vmin=lo, vmax=hi,
                       extent=(extent_x[0], extent_x[1], 0, rows.size), cmap="magma")
    ax_map.set_xlabel(xlabel)
    ax_map.set_ylabel("row" if rows.size == n else f"row (every {n / rows.size:.1f}th)")
    ax_map.set_title("traces")
    fig.colorbar(im, ax=ax_map, shrink=0.9, label="trace (raw, 1-99 % range)")
    im2 = ax_ctl.imshow(controls.T, aspect="auto", origin="lower", interpolation="nearest", vmin=0, vmax=1,
                        cmap="viridis", extent=(0, rows.size, -0.5, controls.shape[1] - 0.5))
    ax_ctl.set_xlabel("row" if rows.size == n else f"row (sampled, {rows.size} of {n})")
    ax_ctl.set_ylabel("control channel")
    ax_ctl.set_title("controls as sent (tag boundaries marked)")
    changes = np.flatnonzero(row_tags[1:] != row_tags[:-1]) + 1
    for k in [0, *changes.tolist()]:
        ax_ctl.axvline(k, color="white", lw=0.8, ls="--")
        ax_ctl.text(k + 0.5, controls.shape[1] - 0.5, f" {row_tags[k]} ", color="white", fontsize=8, va="top",
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "lw": 0})
    fig.colorbar(im2, ax=ax_ctl, shrink=0.9, label="control (normalised)")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cli_inspect(parser):
    parser.add_argument("session", help="session file (NAME.h5, or any of its segments)")
    parser.add_argument("--plot", metavar="OUT.png", help="draw traces and a controls heat-map to a PNG")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--events", type=int, default=8, metavar="N", help="show the last N events (default 8)")

    def handler(args) -> int:
        try:
            reader = open_session(args.session)
        except (FileNotFoundError, ValueError) as exc:
            print(f"labpnn inspect: {exc}", file=sys.stderr)
            return 2
        with reader:
            summary = summarize(reader, n_events=args.events)
            if args.plot:
                summary["plot"] = str(plot_session(reader, args.plot))
        if args.json:
            print(json.dumps(summary, indent=2, default=_json_safe, allow_nan=False))
        else:
            print(format_summary(summary))
            if args.plot:
                print(f"plot        {summary['plot']}")
        return 0

    return handler


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# ------------------------------------------------------------------------------------------------
# import


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_table(spec: str | Path, *, prefer: str = "", header: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """A 2-D float64 array from ``file.csv`` (``header``: auto / yes / no), ``file.npy``,
    ``file.npz`` (array named ``prefer``, else its only array) or ``file.npz:KEY``. Returns the
    array and a description of the source (path, sha256, header fields)."""
    text = str(spec)
    key = None
    if ":" in text and not Path(text).exists():
        text, key = text.rsplit(":", 1)
    path = Path(text)
    if not path.exists():
        raise ImportProblem(f"{path}: no such file")
    info: dict[str, Any] = {"path": str(path), "sha256": _sha256(path)}
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ImportProblem(f"{path}: not a readable {suffix} file ({exc})") from None
        if suffix == ".npz":
            names = list(loaded.files)
            if key is None:
                key = prefer if prefer in names else (names[0] if len(names) == 1 else None)
            if key is None or key not in names:
                raise ImportProblem(f"{path}: say which array to use as {path}:KEY (has: {', '.join(names)})")
            array = loaded[key]
            info["key"] = key
        else:
            array = loaded
        if array.dtype.kind not in "fiub":
            raise ImportProblem(f"{path}: array of dtype {array.dtype} is not numeric")
        array = np.asarray(array, np.float64)
    else:
        lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise ImportProblem(f"{path}: empty file")
        first = lines[0]
        delimiter = "," if "," in first else "\t" if "\t" in first else ";" if ";" in first else None
        fields = [f.strip().strip('"') for f in (first.split(delimiter) if delimiter else first.split())]
        has_header = {"yes": True, "no": False}.get(header, not all(_is_number(f) for f in fields))
        if has_header:
            info["header"] = fields
        body = lines[1:] if has_header else lines
        try:
            array = np.loadtxt(body, delimiter=delimiter, dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise ImportProblem(f"{path}: not a table of numbers, one measurement per row ({exc})") from None
        info["format"] = "csv"
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ImportProblem(f"{path}: expected a 2-D table (rows = measurements), got shape {array.shape}")
    info["shape"] = list(array.shape)
    return array, info


def scale_controls(controls: np.ndarray, scale: list[str] | None) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Controls in [0, 1] unchanged; others only with ``scale`` = ``["auto"]`` (per-channel min..max)
    or ``[LO, HI]`` (one range for all channels). Returns the controls and the scaling applied."""
    if not np.isfinite(controls).all():
        row, col = np.argwhere(~np.isfinite(controls))[0]
        raise ImportProblem(f"controls contain NaN or inf (row {row}, column {col})")
    inside = controls.min() >= 0.0 and controls.max() <= 1.0
    if not scale:
        if not inside:
            row, col = np.argwhere((controls < 0) | (controls > 1))[0]
            raise ImportProblem(
                f"controls must lie in [0, 1]; row {row}, column {col} is {controls[row, col]!r}. They are "
                "never rescaled silently: pass --scale-controls LO HI (one physical range for all channels) "
                "or --scale-controls auto (each channel's min..max), and the scaling is recorded.")
        return controls, None
    if scale == ["auto"]:
        low, high = controls.min(axis=0), controls.max(axis=0)
        kind = "per-channel min..max of the imported data"
    elif len(scale) == 2 and all(_is_number(v) for v in scale):
        low = np.full(controls.shape[1], float(scale[0]))
        high = np.full(controls.shape[1], float(scale[1]))
        kind = "fixed range"
        if not high[0] > low[0]:
            raise ImportProblem(f"--scale-controls needs LO < HI, got {scale[0]} {scale[1]}")
    else:
        raise ImportProblem(f"--scale-controls takes LO HI or auto, got {' '.join(scale)}")
    width = np.where(high > low, high - low, 1.0)
    scaled = (controls - low) / width
    eps = 1e-9
    if scaled.min() < -eps or scaled.max() > 1 + eps:
        row, col = np.argwhere((scaled < -eps) | (scaled > 1 + eps))[0]
        raise ImportProblem(f"control row {row}, column {col} = {controls[row, col]!r} lies outside the range "
                            f"{low[col]!r}..{high[col]!r} given by --scale-controls")
    scaled = np.clip(scaled, 0.0, 1.0)
    return scaled, {"kind": kind, "formula": "control = (value - low) / (high - low)",
                    "low": low.tolist(), "high": high.tolist()}


def import_session(controls: Any, traces: Any, out: str | Path, *, scale: list[str] | None = None,
                   tag: str = "calibration", name: str | None = None, axis: dict[str, Any] | None = None,
                   batch_rows: int = 256, header: str = "auto", force: bool = False) -> Path:
    """Turn controls -> traces pairs recorded elsewhere into a session at ``out``.

    ``controls`` / ``traces`` are file specs (see `load_table`) or arrays. Timestamps are unknown
    (NaN); applied controls are taken as sent; flags are 0."""
    out = Path(out)
    sources: dict[str, Any] = {}
    arrays = {}
    for what, given in (("controls", controls), ("traces", traces)):
        if isinstance(given, (str, Path)):
            arrays[what], sources[what] = load_table(given, prefer=what, header=header)
        else:
            arrays[what] = np.asarray(given, np.float64)
            if arrays[what].ndim != 2:
                raise ImportProblem(f"{what} must be 2-D (rows = measurements), got shape {arrays[what].shape}")
            sources[what] = {"array": list(arrays[what].shape)}
    x, y = arrays["controls"], arrays["traces"]
    if x.shape[0] != y.shape[0]:
        raise ImportProblem(f"{x.shape[0]} control rows but {y.shape[0]} trace rows: one measurement per row "
                            "in both files (check for a header row: --header yes|no)")
    x01, scaling = scale_controls(x, scale)
    x32 = x01.astype(np.float32)
    y32 = y.astype(np.float32)
    n, C = x32.shape
    S = y32.shape[1]
    if axis is None:
        head = sources["traces"].get("header")
        if head and len(head) == S and all(_is_number(h) for h in head):
            axis = {"name": "output", "unit": "1", "values": [float(h) for h in head]}
        else:
            axis = {"name": "index", "unit": "1", "values": list(range(S))}
    values = axis.get("values")
    if values is None or len(values) != S:
        axis = {**axis, "values": list(range(S))}
    record = {
        "sources": sources,
        "controls_scaling": scaling,
        "float32_rounding": {"controls_max_abs": float(np.abs(x32 - x01).max()),
                             "traces_max_abs": float(np.nanmax(np.abs(y32 - y))) if np.isfinite(y).any() else 0.0},
        "rows": n,
        "time": time.time(),
    }
    describe = {
        "name": name or out.stem,
        "n_controls": C,
        "n_outputs": S,
        "axis": axis,
        "limits": {"controls": [0.0, 1.0]},
        "instruments": {"import": "imported controls/traces pairs (labpnn import)"},
        "settings": {},
        "import": record,
    }
    if force:
        k = 0
        while segment_path(out, k).exists():
            segment_path(out, k).unlink()
            k += 1
    elif out.exists():
        raise ImportProblem(f"{out}: exists already (a session is never overwritten; --force replaces it)")
    from labpnn.contract import Measurement

    stamps = np.full(n, np.nan)
    flags = np.zeros(n, np.uint32)
    with SessionWriter(out, describe, provenance={"import": {k: v for k, v in record.items() if k != "time"}}) as w:
        w.event("import", f"imported {n} rows from {', '.join(str(s.get('path', 'array')) for s in sources.values())}",
                **record)
        for start in range(0, n, max(1, batch_rows)):
            stop = min(n, start + batch_rows)
            w.append(Measurement(x32[start:stop], y32[start:stop], x32[start:stop], stamps[start:stop],
                                 flags[start:stop]), tag, copy=False)
    return out


def cli_import(parser):
    parser.add_argument("--controls", required=True, metavar="X",
                        help="controls: CSV (one measurement per row, header optional), .npy, .npz or .npz:KEY")
    parser.add_argument("--traces", required=True, metavar="Y", help="traces, one per row, same order (same formats)")
    parser.add_argument("-o", "--output", required=True, metavar="SESSION", help="session file to create (.h5)")
    parser.add_argument("--scale-controls", nargs="+", metavar="LO HI|auto",
                        help="map controls outside [0, 1]: LO HI for one physical range, or auto for each "
                             "channel's min..max (recorded in the session); without it they are refused")
    parser.add_argument("--tag", default="calibration", help="tag of the imported rows (default: calibration)")
    parser.add_argument("--name", help="rig name in the session's description (default: the output's stem)")
    parser.add_argument("--axis-name", default=None, help="name of the output axis (e.g. wavelength)")
    parser.add_argument("--axis-unit", default=None, help="unit of the output axis (e.g. nm)")
    parser.add_argument("--axis-values", metavar="FILE", help="output axis values (CSV/NPY, S numbers)")
    parser.add_argument("--header", choices=("auto", "yes", "no"), default="auto",
                        help="CSV header row (auto: a first row that is not all numbers)")
    parser.add_argument("--batch-rows", type=int, default=256, help="rows per batch in the session (default 256)")
    parser.add_argument("--force", action="store_true", help="replace an existing session file")

    def handler(args) -> int:
        try:
            axis = None
            if args.axis_values or args.axis_name or args.axis_unit:
                values = None
                if args.axis_values:
                    values = load_table(args.axis_values, prefer="axis", header=args.header)[0].reshape(-1).tolist()
                axis = {"name": args.axis_name or "output", "unit": args.axis_unit or "1", "values": values}
            out = import_session(args.controls, args.traces, args.output, scale=args.scale_controls,
                                 tag=args.tag, name=args.name, axis=axis, batch_rows=args.batch_rows,
                                 header=args.header, force=args.force)
        except (ImportProblem, FileExistsError, ValueError) as exc:
            print(f"labpnn import: {exc}", file=sys.stderr)
            return 2
        with open_session(out) as reader:
            print(f"labpnn import: wrote {reader.n_rows} rows ({reader.describe['n_controls']} controls -> "
                  f"{reader.describe['n_outputs']} outputs) to {out}")
            scaling = reader.describe["import"]["controls_scaling"]
            if scaling:
                print(f"labpnn import: controls scaled ({scaling['kind']}), recorded in the session")
        return 0

    return handler


# ------------------------------------------------------------------------------------------------
# replay


__all__ = ["ImportProblem", "cli_import", "cli_inspect", "format_summary", "import_session",
           "load_table", "plot_session", "scale_controls", "summarize"]
