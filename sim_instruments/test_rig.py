"""The built-in test rig: a fixed random nonlinear map with noise and a configurable latency.

It stands in for a bench in tests and benchmarks. It is a real `PhysicalSystem` (``describe`` /
``run``) and also plays both roles a `Rig` composes (actuator: ``apply``; sensor: ``acquire``), so a
config can serve it through the same `Rig` that serves real instruments.

The map, for one row x in [0, 1]^C (W1, b1, W2, b2 fixed by ``seed``)::

    h = tanh(W1 x + b1)                         # C -> H
    y = (W2 h + b2)^2 + noise * N(0, 1)         # H -> S, W2 smooth along the output axis

Latency means the acquisition ends no earlier than ``latency_s`` after ``apply`` (the rig sleeps
until that deadline), so software cost is never booked as instrument time. ``zero_cost=True`` skips
the map and the noise entirely and returns a constant trace: a rig with no cost at all, for
transport benchmarks. Without latency the rig measures a whole batch at once (``measure_batch``,
vectorised: the same map and the noise drawn in the same order as row by row). A batched matrix
product (gemm) and a row product (gemv) need not round alike, nor do two processors' BLAS kernels:
`rounding_bound` gives how far two float32 evaluations of the map may differ, for tests that compare
two computations rather than copied bytes.

Imports nothing from the rest of labpnn (sim_instruments stands outside, like a real bench).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def sleep_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``deadline`` (spins for the last 0.5 ms)."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left - 0.0005 if left > 0.001 else 0)


class SimTestRig:
    name = "testrig"
    settle_s = 0.0

    def __init__(
        self,
        n_controls: int = 16,
        n_outputs: int = 512,
        *,
        hidden: int = 32,
        noise: float = 0.01,
        latency_s: float = 0.0,
        zero_cost: bool = False,
        max_mean_control: float = 1.0,
        seed: int = 0,
    ):
        self.n_controls, self.n_outputs, self.hidden = int(n_controls), int(n_outputs), int(hidden)
        self.noise, self.latency_s, self.zero_cost = float(noise), float(latency_s), bool(zero_cost)
        self.max_mean_control, self.seed = float(max_mean_control), int(seed)
        weights = np.random.default_rng(seed)
        self._w1 = weights.normal(0, 2.0 / np.sqrt(n_controls), (n_controls, hidden)).astype(np.float32)
        self._b1 = weights.normal(0, 0.5, hidden).astype(np.float32)
        # Rows of W2 are sums of Gaussian bumps along the output axis, so traces look like spectra.
        pixels = np.arange(n_outputs)[None, :]
        centres = weights.uniform(0, n_outputs, (hidden, 1))
        widths = weights.uniform(0.02, 0.1, (hidden, 1)) * n_outputs
        bumps = np.exp(-0.5 * ((pixels - centres) / widths) ** 2)
        self._w2 = (weights.normal(0, 1.0, (hidden, 1)) * bumps / np.sqrt(hidden)).astype(np.float32)
        self._b2 = (0.3 * np.exp(-0.5 * ((pixels[0] - n_outputs / 2) / (n_outputs / 4)) ** 2)).astype(
            np.float32
        )
        self._noise_rng = np.random.default_rng([seed, 1])
        self._zero_trace = np.zeros(n_outputs, np.float32)
        self._zero_batch = self._zeros(0)
        self._row = np.zeros(n_controls, np.float32)
        self._deadline = 0.0
        self.actuations = 0  #: rows applied since creation (tests count these)

    # -- Instrument role ---------------------------------------------------------------------
    def identify(self) -> str:
        return f"labpnn,SimTestRig,{self.n_controls}x{self.n_outputs},seed={self.seed}"

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def settings(self) -> dict[str, Any]:
        return {"noise": self.noise, "latency_s": self.latency_s, "zero_cost": self.zero_cost,
                "max_mean_control": self.max_mean_control}

    def configure(self, **settings: Any) -> None:
        checked = {}
        for key, value in settings.items():
            if key not in ("noise", "latency_s", "max_mean_control", "zero_cost"):
                raise ValueError(f"unknown setting {key!r} (have: noise, latency_s, max_mean_control, zero_cost)")
            if key == "zero_cost":
                if not isinstance(value, bool):
                    raise ValueError("zero_cost must be true or false")
            elif not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
            checked[key] = value
        for key, value in checked.items():
            setattr(self, key, type(getattr(self, key))(value))

    # -- Actuator role -----------------------------------------------------------------------
    def check(self, controls: np.ndarray) -> None:
        if self.max_mean_control >= 1.0:  # no limit: controls are already checked to lie in [0, 1]
            return
        means = controls.mean(axis=1)
        if (means > self.max_mean_control).any():
            row = int(np.argmax(means > self.max_mean_control))
            raise ValueError(
                f"row {row}: mean control {means[row]:.3f} exceeds the safety limit "
                f"max_mean_control={self.max_mean_control}"
            )

    def apply(self, controls: np.ndarray) -> np.ndarray:
        self._deadline = time.perf_counter() + self.latency_s
        self._row = controls
        self.actuations += 1
        return controls

    def safe_state(self) -> None:
        self._row = np.zeros(self.n_controls, np.float32)

    # -- Sensor role -------------------------------------------------------------------------
    def axis(self) -> dict[str, Any]:
        return {"name": "pixel", "unit": "1", "values": list(range(self.n_outputs))}

    def acquire(self) -> tuple[np.ndarray, int]:
        if self.zero_cost:
            trace = self._zero_trace
        else:
            hidden = np.tanh(self._row @ self._w1 + self._b1)
            trace = (hidden @ self._w2 + self._b2) ** 2
            if self.noise:
                trace += self.noise * self._noise_rng.standard_normal(self.n_outputs, np.float32)
        if self.latency_s:
            sleep_until(self._deadline)
        return trace, 0

    # -- BatchInstrument ---------------------------------------------------------------------
    def _zeros(self, rows: int) -> np.ndarray:
        block = np.zeros((rows, self.n_outputs), np.float32)
        block.flags.writeable = False
        self._zero_batch = block
        return block

    def measure_batch(self, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        if self.latency_s:
            return None  # rows take time: let the rig go row by row, so an abort can stop between them
        rows = controls.shape[0]
        self.actuations += rows
        self._row = controls[-1]
        if self.zero_cost:  # no cost at all: the same read-only block of zeros for every batch of this size
            traces = self._zero_batch if self._zero_batch.shape[0] == rows else self._zeros(rows)
        else:
            hidden = np.tanh(controls @ self._w1 + self._b1)
            traces = (hidden @ self._w2 + self._b2) ** 2
            if self.noise:
                traces += self.noise * self._noise_rng.standard_normal(traces.shape, np.float32)
        return traces, np.zeros(rows, np.uint32)

    def rounding_bound(self, controls: np.ndarray) -> np.ndarray:
        """float64[B, S]: how far two float32 evaluations of the map at ``controls`` (same weights, same
        noise values) may differ, whatever order their kernels sum in. Forward error analysis with
        ``eps`` = float32 epsilon, doubled because both evaluations err: a sum of n products errs by at
        most ``n eps (|A| @ |x|)``; tanh (a few ulp; slope <= 1) passes its input's error on; squaring
        doubles the relative error; adding the noise rounds once more."""
        eps = float(np.finfo(np.float32).eps)
        x = np.abs(np.asarray(controls, np.float64))
        w1, b1 = np.abs(self._w1.astype(np.float64)), np.abs(self._b1.astype(np.float64))
        w2, b2 = self._w2.astype(np.float64), self._b2.astype(np.float64)
        hidden = np.tanh(np.asarray(controls, np.float64) @ self._w1 + self._b1)
        dz = 2 * (self.n_controls + 1) * eps * (x @ w1 + b1)
        dh = dz + 2 * 4 * eps * np.abs(hidden)
        u = hidden @ w2 + b2
        du = dh @ np.abs(w2) + 2 * (self.hidden + 1) * eps * (np.abs(hidden) @ np.abs(w2) + np.abs(b2))
        y = u**2
        dy = 2 * np.abs(u) * du + du**2 + 2 * 2 * eps * y
        noise_add = 2 * eps * (y + 6 * self.noise)  # |noise| < 6 sigma
        return dy + noise_add

    # -- PhysicalSystem ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_controls": self.n_controls,
            "n_outputs": self.n_outputs,
            "axis": self.axis(),
            "limits": {"controls": [0.0, 1.0], "max_mean_control": self.max_mean_control},
            "instruments": {self.name: self.identify()},
            "settings": {self.name: self.settings()},
        }

    def run(self, controls: np.ndarray) -> np.ndarray:
        controls = np.asarray(controls, np.float32)
        if controls.ndim != 2 or controls.shape[1] != self.n_controls:
            raise ValueError(f"controls must have shape (B, {self.n_controls}), got {controls.shape}")
        if not np.isfinite(controls).all() or controls.min() < 0 or controls.max() > 1:
            raise ValueError("controls must be finite and in [0, 1]")
        self.check(controls)
        batch = self.measure_batch(np.ascontiguousarray(controls))
        if batch is not None:
            return batch[0]
        out = np.empty((controls.shape[0], self.n_outputs), np.float32)
        for i, row in enumerate(controls):
            self.apply(row)
            out[i] = self.acquire()[0]
        return out
