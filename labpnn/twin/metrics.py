"""Twin metrics in NumPy (no torch): the noise floor from repeated measurements and held-out
regression scores. Definitions are in `labpnn.twin`'s module docstring."""
from __future__ import annotations

import numpy as np


def noise_variance(traces: np.ndarray, groups: np.ndarray) -> tuple[float | None, int]:
    """The noise floor sigma^2 from repeated measurements: ``groups[i]`` names the control
    vector of row i (rows with the same id are repeats). Per pixel, the unbiased sample variance
    across repeats, pooled over groups (sum of squared deviations / sum of (n - 1)), then averaged
    over pixels. Returns ``(sigma2, n_groups_with_repeats)``; ``(None, 0)`` if there are none."""
    traces = np.asarray(traces, np.float64)
    groups = np.asarray(groups)
    if traces.shape[0] == 0:
        return None, 0
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    keep = counts[inverse] > 1
    if not keep.any():
        return None, 0
    y, g = traces[keep], inverse[keep]
    n_groups = int(g.max()) + 1
    sums = np.zeros((n_groups, y.shape[1]))
    np.add.at(sums, g, y)
    n = np.bincount(g, minlength=n_groups).astype(np.float64)
    means = sums / np.maximum(n, 1)[:, None]
    ss = ((y - means[g]) ** 2).sum()
    dof = float((n[n > 0] - 1).sum())
    return float(ss / dof / y.shape[1]), int((n > 1).sum())


def control_groups(controls: np.ndarray) -> np.ndarray:
    """An id per row; rows with bit-identical control vectors share it."""
    controls = np.ascontiguousarray(np.asarray(controls, np.float32))
    view = controls.view(np.dtype((np.void, controls.dtype.itemsize * controls.shape[1]))).ravel()
    _, inverse = np.unique(view, return_inverse=True)
    return inverse.ravel()


def noise_from_repeats(controls: np.ndarray, traces: np.ndarray) -> tuple[float | None, int]:
    """`noise_variance` with groups found by identical control vectors."""
    if len(controls) == 0:
        return None, 0
    return noise_variance(traces, control_groups(controls))


def regression_metrics(pred: np.ndarray, target: np.ndarray, noise_var: float | None = None) -> dict[str, float]:
    """``mse``, ``nmse`` (pooled SSE/SST), ``r2`` (pooled, = 1 - nmse), ``r2_pixel_mean``
    and, if ``noise_var`` is given, ``noise_ratio = mse / noise_var`` (see the module docstring)."""
    pred = np.asarray(pred, np.float64)
    target = np.asarray(target, np.float64)
    err = ((pred - target) ** 2).sum(0)
    dev = ((target - target.mean(0)) ** 2).sum(0)
    n = max(target.shape[0], 1)
    out = {"mse": float(err.sum() / (n * target.shape[1]))}
    sst = float(dev.sum())
    out["nmse"] = float(err.sum() / sst) if sst > 0 else float("nan")
    out["r2"] = 1.0 - out["nmse"]
    live = dev > 0
    out["r2_pixel_mean"] = float(np.mean(1.0 - err[live] / dev[live])) if live.any() else float("nan")
    if noise_var:
        out["noise_ratio"] = out["mse"] / noise_var
    return out


def fit_noise_model(traces: np.ndarray, groups: np.ndarray) -> dict[str, float] | None:
    """A signal-dependent noise model from repeated measurements: ``var(y) ~ a + b * max(mean, 0)``
    (read/additive noise plus shot noise, the photon-transfer form of any counting detector; with
    purely additive noise b ~ 0). Least squares over every (repeated control, pixel), a and b
    clipped at 0, then scaled so that it reproduces `noise_variance` on the repeats exactly.
    ``None`` without repeats. Used to judge fresh batches whose brightness differs from the
    calibration mix (`expected_noise_var`)."""
    traces = np.asarray(traces, np.float64)
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    keep = counts[inverse] > 1
    if not keep.any():
        return None
    y, g = traces[keep], inverse[keep]
    _, g = np.unique(g, return_inverse=True)
    n_groups = int(g.max()) + 1
    n = np.bincount(g, minlength=n_groups).astype(np.float64)
    sums = np.zeros((n_groups, y.shape[1]))
    np.add.at(sums, g, y)
    means = sums / n[:, None]
    ss = np.zeros_like(sums)
    np.add.at(ss, g, (y - means[g]) ** 2)
    var = ss / (n[:, None] - 1)
    m = np.maximum(means, 0).ravel()
    v = var.ravel()
    design = np.stack([np.ones_like(m), m], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, v, rcond=None)
    a, b = max(float(a), 0.0), max(float(b), 0.0)
    # pooled target (the same weighting as noise_variance: by degrees of freedom)
    dof = (n - 1)[:, None]
    target = float((var * dof).sum() / (dof.sum() * y.shape[1]))
    model = float(((a + b * np.maximum(means, 0)) * dof).sum() / (dof.sum() * y.shape[1]))
    if model <= 0:
        return {"a": target, "b": 0.0}
    scale = target / model
    return {"a": a * scale, "b": b * scale}


def expected_noise_var(noise_model: dict[str, float], traces: np.ndarray) -> float:
    """Mean over rows and pixels of ``a + b * max(y, 0)``: the noise variance a perfect twin's
    MSE would show on these traces."""
    y = np.maximum(np.asarray(traces, np.float64), 0)
    return float(noise_model["a"] + noise_model["b"] * y.mean())
