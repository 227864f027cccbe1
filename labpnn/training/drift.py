"""Drift probes: is the *physics* still the physics it was? (`DriftProbe`)

A twin's error is the wrong witness for drift: it also rises wherever training carries the
operating point beyond the data the twin was fitted on (extrapolation), while the physics has not
changed at all. A repeated measurement is the right witness. A `DriftProbe` keeps a small fixed
set of **probe rows** (``rows`` control vectors, by default 4 rows of the first training batch:
the operating region at the start), measures them ``reference_repeats`` (2) times back to back as
the **reference**, and re-measures them after every ``every``-th training batch — through the
trainer's `labpnn.training.counting.PassCounter` under their own kind, ``"probe"`` (and, in a
session, their own tag), so every report shows what the probes cost.

**The statistic** of one probe, with ``m`` the fresh measurement and ``r`` the reference, over
every probe row and output::

    D = sum w (m - r)^2 / ((1 + f) v)  /  sum w,     v = a + b max(r, 0),     w = 1 + max(r, 0)^2 / v

``v`` is the repeat noise variance at each output's own level (read noise plus shot noise, the
form of `labpnn.twin.metrics.fit_noise_model`), fitted to the reference repeats themselves
(`repeat_noise_model`), so it is the back-to-back noise of this very bench and needs no twin;
``f v`` is the noise left in the reference (``f = 1 / reference_repeats`` at the start). Each
term has mean 1 without drift, whatever the weights, so D ~ 1. The weights ``w`` (1 + the
element's signal-to-noise ratio squared) make D a matched test for what drifts do to a bench —
change the signal by some fraction (pulse energy, coupling, alignment) — which shows in
proportion to each element's SNR: on the optical bench's dim rows a plain mean over the ~2,000
mostly dark pixels gave D = 3.6 for a +1 dB step, the weighted mean 10.5.

Measured on the simulated optical bench (`scripts/bench_drift.py`: 64 channels, 512 pixels, its
own noise and slow drift; 3 seeds x 200,000 shots per case, probes after every 4th batch of 16
rows while the operating points travel): without drift D has median 0.90-0.97 and never exceeded
1.26 in 26,469 probes (dim, full-range and bright rows); with the drift three times stronger,
2.31 (bright rows; 15.1 with a reference never refreshed). A +1 dB step gave D >= 23 (dim rows)
and >= 820 (bright rows); 10.5 on the rows a fresh vowel network sends; +0.3 dB, 3.2-100.
Hence `DEFAULT_THRESHOLD` = 3: 2.4x the largest no-drift D, 3.5x below the smallest +1 dB D.

**Alarm.** ``D > threshold`` raises a `labpnn.twin.online.DriftAlarm` (``noise_ratio`` = D): put
on ``alarms``, passed to ``on_alarm`` (the trainer: the online twin fitter starts adapting),
written to the session as ``drift_alarm``. The alarm stands until a later probe is back at or
below ``threshold``: then ``drift_recovered`` (the physics is stable again, in its new state) and
the next drift can raise again. While an alarm stands, further exceedances refresh the reference
but raise nothing new (one recalibration per change, not one per probe).

**Reference refresh.** (1) After an alarm the probe that raised it becomes the reference
(``f = 1``): the new regime is judged against itself, not against the physics before the step.
(2) Slowly, otherwise: every probe at or below the threshold moves the reference toward itself by
``refresh`` (an exponential average over ~1/refresh probes; ``f`` is updated to the variance that
average keeps). A bench's own slow drift (on the simulated optical bench 0.1 % pulse energy and
0.003 nm per 1,000 shots) is therefore compared over ~1/refresh probes, never accumulated over a
whole run: slow changes are the online twin's to follow, steps are alarms. ``refresh=0`` keeps
the first reference for good (then the threshold must also cover the slow drift of a whole run).

Cost: ``rows`` passes every ``every`` training batches (with the defaults, 4 rows per 4 batches:
6 % of PAT's training passes at the default batches of 16 rows, 1.6 % at 64), plus ``rows x
reference_repeats`` once — against the 128 rows each false alarm of the twin-error alarm used to
spend. A step is seen by the first probe after it: within ``every`` batches.

Limits: D measures a change against the repeat noise of a few rows, and its excess falls with the
square of the noise: at 6x the optical bench's noise (tests/test_twin_online.py's plant) a +1 dB
step gives D = 2.5-5.5, not reliably above 3 — such a bench needs brighter probe rows or a lower
threshold (from its own null distribution, measured as above). A change that only touches
controls far from the probe rows goes unseen by them (the twin's error still shows it, as
``twin_quality``).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from labpnn.twin.online import DriftAlarm

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_THRESHOLD", "DriftProbe", "ProbeScore", "repeat_noise_model"]

#: D above this raises an alarm; chosen from the measured null distribution (module docstring,
#: `scripts/bench_drift.py`): no-drift D <= 1.26 on the optical bench, a +1 dB step >= 10.5
DEFAULT_THRESHOLD = 3.0


@dataclass
class ProbeScore:
    """One probe: when, what it measured against the reference, and what came of it."""

    probe: int  #: index of the probe (0-based)
    batch: int  #: training batches observed when it was measured
    statistic: float  #: D (see the module docstring)
    reference_fraction: float  #: f: the reference's own noise, in units of one measurement's
    alarm: bool = False
    recovered: bool = False
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftProbe:
    """Re-measures a fixed set of probe rows and raises a `DriftAlarm` when the physics changed.

    ``system`` is what the rows are measured through: a `PassCounter` (the rows are then counted,
    and recorded, under ``kind``) or any `PhysicalSystem`. Typical use::

        probe = DriftProbe(counter, every=4, writer=writer, on_alarm=fitter.drift)
        counter.on_train = lambda m: (fitter.feed(...), probe.observe(m))   # the first batch: reference
        while not probe.alarms.empty(): handle(probe.alarms.get_nowait())
    """

    def __init__(self, system: Any, *, rows: int = 4, every: int = 4, threshold: float = DEFAULT_THRESHOLD,
                 refresh: float = 0.1, reference_repeats: int = 2, noise_model: dict[str, float] | None = None,
                 kind: str = "probe", writer: Any = None, on_alarm: Callable[[DriftAlarm], None] | None = None,
                 seed: int = 0):
        if rows < 1 or every < 1 or reference_repeats < 1:
            raise ValueError("rows, every and reference_repeats must be >= 1")
        if not 0 <= refresh < 1:
            raise ValueError("refresh must lie in [0, 1)")
        if noise_model is None and reference_repeats < 2:
            raise ValueError("without a noise_model the reference must be measured at least twice")
        self.system, self.n_rows, self.every = system, int(rows), int(every)
        self.threshold, self.refresh, self.reference_repeats = float(threshold), float(refresh), int(reference_repeats)
        self.noise_model = dict(noise_model) if noise_model else None
        self.kind, self.writer, self.on_alarm = kind, writer, on_alarm
        self.alarms: queue.Queue[DriftAlarm] = queue.Queue()
        self.history: list[ProbeScore] = []
        self.controls: np.ndarray | None = None  #: the probe rows, once chosen
        self.reference: np.ndarray | None = None
        self.reference_fraction = 1.0
        self.batches = 0  #: training batches observed
        self.measured = 0  #: rows this probe measured (reference included)
        self.in_alarm = False
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()

    # -- public ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.reference is not None

    def start(self, controls: Any) -> DriftProbe:
        """Choose the probe rows from ``controls`` (``rows`` of them, spread over the given rows;
        all of them if there are no more) and measure the reference."""
        x = np.array(controls, np.float32, ndmin=2)
        if len(x) > self.n_rows:
            x = x[np.sort(self._rng.choice(len(x), self.n_rows, replace=False))]
        with self._lock:
            self.controls = np.ascontiguousarray(x)
            reps = [self._measure() for _ in range(self.reference_repeats)]
            y = np.stack(reps)  # [repeats, rows, outputs]
            if self.noise_model is None:
                self.noise_model = repeat_noise_model(y)
            self.reference = y.mean(0)
            self.reference_fraction = 1.0 / self.reference_repeats
        log.info("drift probes: %d rows every %d training batches, threshold %g, noise model %s",
                 len(x), self.every, self.threshold, self.noise_model)
        return self

    def observe(self, measurement: Any = None) -> ProbeScore | None:
        """Count one training batch; the first one (``measurement.applied``, or its controls)
        chooses the probe rows if `start` was not called; every ``every``-th is followed by a probe.
        Returns the probe's score when one was measured. Thread-safe (a pipelined trainer calls it
        from several threads)."""
        with self._lock:
            self.batches += 1
            if not self.ready:
                if measurement is not None:
                    applied = getattr(measurement, "applied", None)
                    rows = np.asarray(applied if applied is not None else measurement.controls)
                    n = int(getattr(measurement, "n_done", len(rows)))
                    if n:
                        self.start(rows[:n])
                return None
            if self.batches % self.every:
                return None
            return self.probe()

    def probe(self) -> ProbeScore:
        """Measure the probe rows now and judge them against the reference."""
        with self._lock:
            if not self.ready:
                raise RuntimeError("DriftProbe.start(controls) first")
            m = self._measure()
            d = self.statistic(m)
            score = ProbeScore(len(self.history), self.batches, d, self.reference_fraction, time=time.time())
            if d > self.threshold:
                if not self.in_alarm:
                    self._raise(score)
                self.reference, self.reference_fraction = m, 1.0  # the new regime is its own reference
            else:
                if self.in_alarm:
                    self._recover(score)
                a = self.refresh
                if a:
                    self.reference = self.reference + a * (m - self.reference)
                    self.reference_fraction = (1 - a) ** 2 * self.reference_fraction + a * a
            self.history.append(score)
            return score

    def statistic(self, traces: Any) -> float:
        """D of ``traces`` (the probe rows' measurement) against the current reference."""
        m = np.asarray(traces, np.float64)
        r = self.reference
        v = self._variance(r)
        w = 1.0 + np.maximum(r, 0) ** 2 / v  # 1 + (signal / noise)^2: what a relative change would show
        return float(np.sum(w * (m - r) ** 2 / ((1.0 + self.reference_fraction) * v)) / np.sum(w))

    def summary(self) -> dict[str, Any]:
        d = np.array([s.statistic for s in self.history])
        return {"rows": self.n_rows, "every": self.every, "threshold": self.threshold, "refresh": self.refresh,
                "probes": len(self.history), "passes": self.measured,
                "alarms": int(sum(s.alarm for s in self.history)),
                "statistic_median": float(np.median(d)) if len(d) else None,
                "statistic_max": float(d.max()) if len(d) else None, "noise_model": self.noise_model}

    # -- internals -------------------------------------------------------------------------
    def _measure(self) -> np.ndarray:
        x = self.controls
        measure = getattr(self.system, "measure", None)
        if measure is not None and hasattr(self.system, "passes"):  # a PassCounter: book under our kind
            m = measure(x, kind=self.kind)
        else:
            from labpnn.contract import measure_of

            m = measure_of(self.system, x)
        m.raise_for_error()
        self.measured += int(m.n_done)
        return np.asarray(m.traces, np.float64)

    def _variance(self, y: np.ndarray) -> np.ndarray:
        nm = self.noise_model or {"a": 0.0, "b": 0.0}
        v = nm["a"] + nm["b"] * np.maximum(y, 0)
        floor = 1e-12 * float(np.mean(y * y)) + 1e-300  # a noiseless system: any change is drift
        return np.maximum(v, floor)

    def _raise(self, score: ProbeScore) -> None:
        self.in_alarm = True
        score.alarm = True
        alarm = DriftAlarm(
            batch=score.batch, noise_ratio=score.statistic, threshold=self.threshold, time=score.time,
            message=(f"physics drift: probe {score.probe} after training batch {score.batch} differs from its "
                     f"reference by {score.statistic:.2f}x the repeat noise (threshold {self.threshold:g})"),
        )
        log.warning(alarm.message)
        self.alarms.put(alarm)
        self._event("drift_alarm", alarm.message, batch=score.batch, probe=score.probe, noise_ratio=score.statistic,
                    threshold=self.threshold)
        if self.on_alarm is not None:
            try:
                self.on_alarm(alarm)
            except Exception:
                log.exception("on_alarm callback failed")

    def _recover(self, score: ProbeScore) -> None:
        self.in_alarm = False
        score.recovered = True
        msg = (f"physics stable again: probe {score.probe} after training batch {score.batch} within "
               f"{score.statistic:.2f}x the repeat noise of the reference taken at the alarm")
        log.info(msg)
        self._event("drift_recovered", msg, batch=score.batch, probe=score.probe, noise_ratio=score.statistic)

    def _event(self, kind: str, message: str, **data: Any) -> None:
        if self.writer is None:
            return
        try:
            self.writer.event(kind, message, **data)
        except Exception:
            log.exception("could not log %s to the session", kind)


def repeat_noise_model(repeats: Any, *, iterations: int = 8) -> dict[str, float]:
    """``{"a", "b"}`` of ``var(y) ~ a + b max(y, 0)`` from ``repeats[k, row, output]`` (k >= 2
    measurements of the same rows), scaled so that D of the repeats themselves is 1.

    Each element's sample variance scatters about its true variance by a chi-square factor (with
    k = 2, one degree of freedom: often 0, now and then 5x), so a plain least-squares fit can be
    turned by a few elements — even to a negative slope — and D, whose weights favour the bright
    elements, would inherit the error. So: a start from the dim and the bright elements' mean
    variances, iteratively reweighted least squares with weights 1 / (a + b y)^2 (the gamma-family
    fit of a sample variance) constrained to a, b >= 0, and one scale so that the weighted mean
    of variance / model (D's own weights) is 1."""
    y = np.asarray(repeats, np.float64)
    if y.ndim != 3 or y.shape[0] < 2:
        raise ValueError("repeats must be [k >= 2, rows, outputs]")
    mean = np.maximum(y.mean(0), 0).ravel()
    var = y.var(0, ddof=1).ravel()
    order = np.argsort(mean)
    dim, bright = order[: max(1, len(order) // 2)], order[-max(1, len(order) // 10):]
    a = float(var[dim].mean())
    b = max(0.0, (float(var[bright].mean()) - a) / max(float(mean[bright].mean()), 1e-300))
    for _ in range(iterations):
        w = 1.0 / np.maximum(a + b * mean, 1e-300) ** 2
        a, b = _nonnegative_line(mean, var, w)
    floor = 1e-12 * float(var.mean()) + 1e-300
    a = max(a, floor)
    model = a + b * mean
    weight = 1.0 + mean**2 / model
    scale = float(np.sum(weight * var / model) / np.sum(weight))
    return {"a": a * scale, "b": b * scale}


def _nonnegative_line(x: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least squares ``v ~ a + b x`` with a, b >= 0."""
    sw, swx, swxx = w.sum(), (w * x).sum(), (w * x * x).sum()
    swv, swxv = (w * v).sum(), (w * x * v).sum()
    det = sw * swxx - swx * swx
    if det > 0:
        a, b = (swxx * swv - swx * swxv) / det, (sw * swxv - swx * swv) / det
        if a >= 0 and b >= 0:
            return float(a), float(b)
    # on the boundary: the better of a = 0 and b = 0
    cands = [(max(swv / sw, 0.0), 0.0), (0.0, max(swxv / swxx, 0.0) if swxx > 0 else 0.0)]
    return min(cands, key=lambda ab: float((w * (v - ab[0] - ab[1] * x) ** 2).sum()))
