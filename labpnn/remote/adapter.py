"""`SystemAdapter`: one face for whatever the device server serves — a `Rig` (``measure`` with abort
and progress), a `ReplayRig`, a recording wrapper, or a plain `PhysicalSystem` (``describe`` /
``run`` only)."""
from __future__ import annotations

import inspect
import threading
import time
from typing import Any

import numpy as np

from labpnn.contract import Measurement, validate_controls
from labpnn.protocols.errors import BadSetting, InstrumentFailure, LabpnnError


class SystemAdapter:
    """A uniform face over a Rig-like object (``measure(controls, abort=...)``) or a plain
    `PhysicalSystem` (``describe``/``run`` only)."""

    def __init__(self, system: Any):
        self.system = system
        self._measure = getattr(system, "measure", None)
        self._kwargs: set[str] = set()
        if self._measure is not None:
            try:
                params = inspect.signature(self._measure).parameters
                if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                    self._kwargs = {"abort", "progress"}
                else:
                    self._kwargs = {"abort", "progress"} & set(params)
            except (TypeError, ValueError):
                self._kwargs = set()
        self._own_busy = 0.0
        self.description = self.describe()
        self.n_controls = int(self.description["n_controls"])
        self.n_outputs = int(self.description["n_outputs"])

    @property
    def reports_progress(self) -> bool:
        return "progress" in self._kwargs

    def describe(self) -> dict[str, Any]:
        desc = dict(self.system.describe())
        for key in ("n_controls", "n_outputs"):
            if key not in desc:
                raise ValueError(f"the system's describe() has no {key!r}")
        return desc

    @property
    def busy_s(self) -> float:
        busy = getattr(self.system, "busy_s", None)
        return float(busy) if isinstance(busy, (int, float)) else self._own_busy

    def measure(self, controls: np.ndarray, abort: threading.Event, progress) -> Measurement:
        if self._measure is not None:
            kwargs = {}
            if "abort" in self._kwargs:
                kwargs["abort"] = abort
            if "progress" in self._kwargs:
                kwargs["progress"] = progress
            m = self._measure(controls, **kwargs)
        else:
            batch = validate_controls(controls, self.n_controls)
            started = time.perf_counter()
            try:
                traces = np.asarray(self.system.run(batch), dtype=np.float32)
            except LabpnnError:
                raise
            except Exception as exc:
                m = Measurement(batch, np.empty((0, self.n_outputs), np.float32),
                                np.empty((0, self.n_controls), np.float32), np.empty(0), np.empty(0, np.uint32),
                                InstrumentFailure(f"{type(exc).__name__}: {exc}", details={"n_done": 0}))
            else:
                busy = time.perf_counter() - started
                n = traces.shape[0]
                m = Measurement(batch, traces, batch.copy(), np.full(n, time.time()), np.zeros(n, np.uint32),
                                None, busy)
        self._own_busy += float(m.busy_s or 0.0)
        return m

    def configure(self, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
        configure = getattr(self.system, "configure", None)
        if configure is None:
            raise BadSetting("this system has no settings to configure")
        try:
            return dict(configure(settings) or {})
        except (ValueError, TypeError) as exc:
            raise BadSetting(str(exc)) from None
