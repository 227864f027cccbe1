"""The one contract: a physical system is a batched function ``float32[B, C] -> float32[B, S]``.

Everything the trainer touches — the in-process `Rig`, `RigClient`, `ReplayRig`, a recording
wrapper — satisfies `PhysicalSystem`. Systems that can say more than the traces (timestamps,
controls actually applied, per-row flags, partial failure) also offer ``measure()`` returning a
`Measurement`; `measure_of()` gives one for any system.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from labpnn.protocols.errors import InvalidControls, LabpnnError


@runtime_checkable
class PhysicalSystem(Protocol):
    def describe(self) -> Mapping[str, Any]:
        """A plain mapping with at least ``n_controls`` (C), ``n_outputs`` (S), ``axis``
        (``{"name", "unit", "values"}``), ``limits``, ``instruments`` (name -> identity) and
        ``settings`` (name -> dict)."""

    def run(self, controls: np.ndarray) -> np.ndarray:
        """Measure a batch: controls float32[B, C] in [0, 1] -> traces float32[B, S]."""


@dataclass
class Measurement:
    """Everything a batch produced. Rows ``[0, n_done)`` completed; if ``error`` is set, the rows
    after them were not measured (the instrument failed or the run was aborted)."""

    controls: np.ndarray  #: float32[B, C] as sent
    traces: np.ndarray  #: float32[n_done, S]
    applied: np.ndarray  #: float32[n_done, C] as the instruments applied them
    timestamps: np.ndarray  #: float64[n_done] unix time at which each row's acquisition ended
    flags: np.ndarray  #: uint32[n_done] bit field, see ``labpnn.drivers.roles.FLAG_*``
    error: LabpnnError | None = None
    busy_s: float = 0.0  #: instrument time spent on this batch (apply -> acquired, per row)
    meta: dict[str, Any] = field(default_factory=dict)  #: e.g. {"replay": "nearest"}

    @property
    def n_done(self) -> int:
        return int(self.traces.shape[0])

    def raise_for_error(self) -> Measurement:
        if self.error is not None:
            raise self.error
        return self


def measure_of(system: PhysicalSystem, controls: np.ndarray) -> Measurement:
    """A `Measurement` from any system: its own ``measure()`` if it has one, else built from
    ``run()`` (applied = sent, timestamps = completion time, no flags)."""
    measure = getattr(system, "measure", None)
    if measure is not None:
        return measure(controls)
    import time

    controls = np.asarray(controls, dtype=np.float32)
    traces = np.asarray(system.run(controls), dtype=np.float32)
    now = time.time()
    n = traces.shape[0]
    return Measurement(
        controls=controls,
        traces=traces,
        applied=controls.copy(),
        timestamps=np.full(n, now),
        flags=np.zeros(n, np.uint32),
    )


def validate_controls(controls: Any, n_controls: int) -> np.ndarray:
    """Check a batch before anything moves; return it as C-contiguous float32[B, C].

    Rejects the batch whole, with a message naming the first offending row and channel."""
    arr = np.asarray(controls)
    if arr.dtype != np.float32:
        if arr.dtype.kind not in "fiu":
            raise InvalidControls(f"controls must be float32, got dtype {arr.dtype}")
        arr = arr.astype(np.float32)
    if arr.ndim != 2 or arr.shape[1] != n_controls:
        raise InvalidControls(
            f"controls must have shape (B, {n_controls}), got {tuple(arr.shape)}",
            details={"expected_channels": n_controls, "shape": list(arr.shape)},
        )
    if arr.shape[0] == 0:
        raise InvalidControls("empty batch: controls must have at least one row")
    finite = np.isfinite(arr)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise InvalidControls(
            f"controls contain NaN or inf (first at row {row}, channel {col})",
            details={"row": int(row), "channel": int(col)},
        )
    outside = (arr < 0.0) | (arr > 1.0)
    if outside.any():
        row, col = np.argwhere(outside)[0]
        raise InvalidControls(
            f"controls must lie in [0, 1]; row {row}, channel {col} is {float(arr[row, col])!r}",
            details={"row": int(row), "channel": int(col), "value": float(arr[row, col])},
        )
    return np.ascontiguousarray(arr)


def control_levels(applied: Any, max_levels: int = 16) -> int | None:
    """The number of states the rig set its controls to, read off controls as applied: L when every
    value is one of k / (L - 1) for some L <= ``max_levels`` (a binary metasurface: 2), else None
    (continuous, or a fine grid such as a shaper's 0.01 dB steps)."""
    x = np.unique(np.asarray(applied, np.float64))
    if x.size == 0 or x.size > max_levels:
        return None
    for levels in range(2, max_levels + 1):
        grid = x * (levels - 1)
        if np.allclose(grid, np.round(grid), atol=1e-5):
            return levels
    return None
