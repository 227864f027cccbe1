"""``labpnn export SESSION --touchstone DIR``: a session's S-parameter measurements as Touchstone
files (scikit-rf), one 2-port file per measured row, the rig's configuration and the VNA settings
in the comment lines.

Only what was measured is written: a microwave rig records S21 (Re then Im when its VNA's
``output = "reim"``), so S11, S12 and S22 are written as NaN — never filled from reciprocity or
anything else. A session holding magnitudes only (``output = "db"`` or ``"mag"``) is refused:
phases that were never measured cannot be exported.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from labpnn.sessions.reader import open_session


class ExportProblem(ValueError):
    """A session that cannot be exported as asked (the message says why)."""


def s21_layout(describe: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """``(frequencies in Hz, instrument name)`` of a session whose traces are S21 as Re then Im;
    `ExportProblem` otherwise."""
    axis = describe.get("axis") or {}
    settings = describe.get("settings") or {}
    vna = next((name for name, s in settings.items() if isinstance(s, Mapping) and "output" in s
                and "start_hz" in s), None)
    if vna is None or axis.get("unit") != "Hz":
        raise ExportProblem("this session was not recorded from a VNA (no instrument with S-parameter "
                            "settings, output axis not in Hz): there is nothing to write as Touchstone")
    output = settings[vna]["output"]
    if output != "reim":
        raise ExportProblem(f"this session holds |S21| {'in dB' if output == 'db' else 'magnitudes'} only "
                            f"({vna}.output = {output!r}); Touchstone needs complex S-parameters, and phases "
                            f"that were never measured are not invented. Record with output = \"reim\".")
    values = np.asarray(axis.get("values", []), np.float64)
    half = values.size // 2
    if values.size % 2 or not np.array_equal(values[:half], values[half:]):
        raise ExportProblem("the output axis is not frequencies twice (Re then Im): not a VNA 'reim' trace")
    return values[:half], vna


def export_touchstone(session: str | Path, out_dir: str | Path, *, rows: slice | np.ndarray | None = None,
                      name: str = "row") -> list[Path]:
    """Write rows of ``session`` as ``OUT/NAME{row:06d}.s2p``; returns the paths."""
    import skrf

    out = Path(out_dir)
    with open_session(session) as reader:
        freqs, vna = s21_layout(reader.describe)
        index = np.arange(reader.n_rows)[rows if rows is not None else slice(None)]
        if index.size == 0:
            raise ExportProblem("no rows selected")
        traces = np.asarray(reader.traces[np.sort(index)], np.float64)
        applied = np.asarray(reader.applied[np.sort(index)], np.float32)
        tags = np.asarray(reader.tags)[np.sort(index)]
        describe, provenance, session_id = reader.describe, reader.provenance, reader.session_id
    out.mkdir(parents=True, exist_ok=True)
    frequency = skrf.Frequency.from_f(freqs, unit="Hz")
    header = [f"labpnn session {Path(session).name} (session id {session_id})",
              f"rig {describe.get('name', '')}: {json.dumps(describe.get('instruments', {}))}",
              f"VNA settings ({vna}): {json.dumps(describe['settings'][vna])}",
              "measured: S21 only; S11, S12 and S22 were not measured and are written as NaN",
              f"labpnn {provenance.get('versions', {}).get('labpnn', '')}"]
    paths = []
    for k, row in enumerate(np.sort(index)):
        n = freqs.size
        s = np.full((n, 2, 2), np.nan + 1j * np.nan, complex)
        s[:, 1, 0] = traces[k, :n] + 1j * traces[k, n:]
        controls = "".join("1" if v >= 0.5 else "0" for v in applied[k]) if applied.shape[1] <= 512 else "..."
        comments = "\n".join([*header, f"row {int(row)} (tag {tags[k]}), controls as applied: {controls}"])
        network = skrf.Network(frequency=frequency, s=s, name=f"{name}{int(row):06d}", comments=comments)
        path = out / f"{name}{int(row):06d}"
        network.write_touchstone(str(path), form="ri")
        paths.append(path.with_suffix(".s2p"))
    return paths


def _rows(spec: str | None) -> slice | None:
    if not spec:
        return None
    start, _, stop = spec.partition(":")
    if not _:
        return slice(int(start), int(start) + 1)
    return slice(int(start) if start else None, int(stop) if stop else None)


def cli_export(parser: argparse.ArgumentParser):
    parser.add_argument("session", help="a session recorded from a microwave rig with output = \"reim\"")
    parser.add_argument("--touchstone", required=True, metavar="DIR", help="write one .s2p per row into DIR")
    parser.add_argument("--rows", help="rows to export, as N or START:STOP (default: all)")

    def handler(args: argparse.Namespace) -> int:
        try:
            paths = export_touchstone(args.session, args.touchstone, rows=_rows(args.rows))
        except (ExportProblem, FileNotFoundError) as exc:
            print(f"labpnn export: {exc}", file=sys.stderr)
            return 2
        print(f"labpnn export: {len(paths)} Touchstone file(s) in {args.touchstone}/")
        return 0

    return handler
