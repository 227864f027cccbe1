"""Counting physical passes: every method reports what it spent on the physics, by kind.

A pass is one row of controls run on the rig. `PassCounter` wraps any `PhysicalSystem` and books
each measured row under the current kind (calibration, train, validation, test; ``probe`` for
the drift probes, `labpnn.training.drift`, which appears only once one is measured); ``server_busy``
reads the device server's instrument time when the rig is remote (for the duty cycle)."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from labpnn.contract import Measurement, PhysicalSystem, measure_of

KINDS = ("calibration", "train", "validation", "test")


class PassCounter:
    """A `PhysicalSystem` that counts physical passes (rows run) and instrument time by kind.

    ``with counter.counting("validation"): ...`` sets the kind (and the session tag of a wrapped
    `RecordingSystem`). ``on_train(measurement)`` is called for every training batch (to feed an
    online twin fitter). Calls are serialised with a lock unless the innermost system is known to
    take concurrent calls (a `RigClient` queues them at the server; a `Rig` has its own lock)."""

    def __init__(self, system: PhysicalSystem, *, on_train: Callable[[Measurement], None] | None = None,
                 serialize: bool | None = None):
        self.system = system
        self.on_train = on_train
        self.kind = "train"
        self.passes = {k: 0 for k in KINDS}
        self.busy_s = {k: 0.0 for k in KINDS}
        self.batches = {k: 0 for k in KINDS}
        self._count_lock = threading.Lock()
        self._call_lock = threading.Lock() if (serialize if serialize is not None else _needs_lock(system)) else None

    @contextlib.contextmanager
    def counting(self, kind: str) -> Iterator[PassCounter]:
        old = self.kind
        self._set_kind(kind)
        try:
            yield self
        finally:
            self._set_kind(old)

    def _set_kind(self, kind: str) -> None:
        self.kind = kind
        if hasattr(self.system, "writer") and hasattr(self.system, "tag"):  # a RecordingSystem
            self.system.tag = kind

    def describe(self) -> Mapping[str, Any]:
        return self.system.describe()

    def run(self, controls: np.ndarray) -> np.ndarray:
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: np.ndarray, *, kind: str | None = None) -> Measurement:
        """Measure and count under the current kind, or under ``kind`` for this call alone (its
        session tag too, through a `RecordingSystem`): a probe measured between two training
        batches by another thread is never booked as training, nor a training batch as a probe."""
        tag = kind
        kind = self.kind if kind is None else kind
        if self._call_lock is not None:
            with self._call_lock:
                m = self._measure(controls, tag)
        else:
            m = self._measure(controls, tag)
        with self._count_lock:
            self.passes[kind] = self.passes.get(kind, 0) + m.n_done
            self.busy_s[kind] = self.busy_s.get(kind, 0.0) + float(m.busy_s or 0.0)
            self.batches[kind] = self.batches.get(kind, 0) + 1
        if kind == "train" and self.on_train is not None and m.n_done:
            self.on_train(m)
        return m

    def _measure(self, controls: np.ndarray, tag: str | None) -> Measurement:
        if tag is not None and hasattr(self.system, "writer") and hasattr(self.system, "tag"):  # a RecordingSystem
            return self.system.measure(controls, tag=tag)
        return measure_of(self.system, controls)

    @property
    def total(self) -> int:
        return int(sum(self.passes.values()))


def _innermost(system: Any) -> Any:
    seen = 0
    while hasattr(system, "system") and seen < 8:
        system, seen = system.system, seen + 1
    return system


def _needs_lock(system: Any) -> bool:
    inner = _innermost(system)
    names = {c.__name__ for c in type(inner).__mro__}
    return not ({"RigClient", "Rig"} & names)


def server_busy(system: Any) -> float | None:
    """The device server's cumulative busy time, if the innermost system is a `RigClient`."""
    inner = _innermost(system)
    status = getattr(inner, "status", None)
    if status is None or type(inner).__name__ != "RigClient":
        return None
    try:
        return float(status()["busy_s"])
    except Exception:  # a status hiccup must not stop training
        return None


class FirstMeasurement:
    """Passes through to a system and keeps the first batch it measures (for the report)."""

    def __init__(self, system):
        self.system, self.first = system, None

    def describe(self):
        return self.system.describe()

    def measure(self, controls):
        m = self.system.measure(controls)
        if self.first is None:
            self.first = m
        return m

    def run(self, controls):
        return self.measure(controls).raise_for_error().traces
