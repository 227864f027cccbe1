"""Fitting a twin (`fit_twin`, `fit_twin_from_sessions`) and the figures that judge it.

Fit (`fit_twin`): rows are ordered by time; the LAST ``holdout`` fraction is held out (controls
the fit never saw, measured after every training row), a random ``val`` fraction of the rest drives
early stopping, Adam with a cosine schedule that runs on whichever is further along, epochs or the
wall-clock budget. Metrics, all on the held-out rows, in measurement units:

* ``holdout_mse``: mean over rows and pixels of (prediction - measurement)^2;
* ``holdout_nmse``: SSE / SST pooled over all pixels (SST about the per-pixel held-out mean),
  so ``holdout_r2 = 1 - holdout_nmse`` is the *pooled* R^2; ``holdout_r2_pixel_mean`` is the mean
  of per-pixel R^2 over pixels whose held-out variance is non-zero;
* ``noise_var``: the noise floor sigma^2 — for each set of repeated measurements of one control
  vector, the unbiased (ddof=1) sample variance across repeats per pixel, pooled over sets
  (sum of squared deviations / sum of (n_repeats - 1)) and averaged over pixels;
* ``noise_ratio = holdout_mse / noise_var``: a measurement is itself noisy, so even a perfect twin
  has ``holdout_mse = noise_var``; 1.0 is the floor no model can beat;
* ``noise_model``: ``var ~ a + b max(y, 0)`` fitted to the same repeats (shot + read noise), so
  that `labpnn.twin.online` can judge batches brighter or dimmer than the calibration mix.

Rows tagged ``noise`` (repeats, see `labpnn.twin.calibrate`) give sigma^2, are trained on and are
never held out; without them, bit-identical control vectors anywhere in the data are used.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from labpnn.contract import control_levels
from labpnn.twin.metrics import (
    control_groups,
    fit_noise_model,
    noise_variance,
    regression_metrics,
)
from labpnn.twin.model import CORES, Twin, jsonable

log = logging.getLogger(__name__)

#: tags whose rows a twin is fitted on by default (everything measured on purpose, not tests)
FIT_TAGS = ("calibration", "noise", "train", "other")
#: the tag of repeated measurements of the same controls (the noise floor)
NOISE_TAG = "noise"





# ------------------------------------------------------------------------------------------
# fitting
# ------------------------------------------------------------------------------------------
@dataclass
class FitReport:
    """What a fit did and how good it is. All ``holdout_*`` numbers are on rows measured after
    every training row, with controls the fit never saw (see the module docstring for
    definitions: nmse and r2 are pooled over pixels, noise_var is the repeat variance)."""

    n_train: int
    n_val: int
    n_holdout: int
    epochs: int
    steps: int
    seconds: float
    stopped: str  #: "epochs" | "patience" | "max_seconds"
    best_epoch: int
    val_mse: float  #: best validation MSE (measurement units)
    holdout_mse: float | None
    holdout_nmse: float | None  #: SSE / SST pooled over pixels
    holdout_r2: float | None  #: 1 - holdout_nmse (pooled R^2)
    holdout_r2_pixel_mean: float | None  #: mean over pixels of per-pixel R^2
    noise_var: float | None  #: sigma^2: unbiased repeat variance, pooled, mean over pixels
    noise_groups: int  #: how many repeated control vectors sigma^2 came from
    noise_ratio: float | None  #: holdout_mse / noise_var (1.0 = the noise floor)
    #: var ~ a + b * max(y, 0) fitted to the repeats (`labpnn.twin.metrics.fit_noise_model`)
    noise_model: dict[str, float] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    data: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    def summary(self) -> str:
        def f(x: float | None, spec: str = ".4g") -> str:
            return "n/a" if x is None else format(x, spec)

        return (
            f"fit: {self.n_train} train / {self.n_val} val / {self.n_holdout} held-out rows, "
            f"{self.epochs} epochs ({self.steps} steps) in {self.seconds:.1f} s, stopped by {self.stopped}\n"
            f"held-out: MSE {f(self.holdout_mse)}, NMSE {f(self.holdout_nmse)}, "
            f"R2 {f(self.holdout_r2, '.5f')} (pooled; per-pixel mean {f(self.holdout_r2_pixel_mean, '.4f')})\n"
            f"noise floor sigma^2 {f(self.noise_var)} from {self.noise_groups} repeated controls; "
            f"noise ratio {f(self.noise_ratio, '.3f')} (1.0 = floor)"
        )


def split_by_time(
    n_rows: int,
    *,
    holdout: float,
    val: float,
    order: np.ndarray | None = None,
    never_holdout: np.ndarray | None = None,
    controls: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, val, holdout)`` row indices. ``order`` sorts rows by time (default: as given);
    the last ``holdout`` fraction of the rows not in ``never_holdout`` is held out, minus any
    whose control vector also occurs among the other rows (held-out controls are unseen);
    ``val`` is a random fraction of the rest."""
    order = np.arange(n_rows) if order is None else np.asarray(order)
    eligible = np.ones(n_rows, bool)
    if never_holdout is not None:
        eligible[np.asarray(never_holdout)] = False
    candidates = order[eligible[order]]
    n_hold = int(round(holdout * n_rows)) if 0 < holdout < 1 else int(holdout)
    n_hold = min(max(n_hold, 0), len(candidates))
    held = candidates[len(candidates) - n_hold:] if n_hold else np.empty(0, np.int64)
    is_held = np.zeros(n_rows, bool)
    is_held[held] = True
    if controls is not None and n_hold:
        groups = control_groups(controls)
        seen = np.zeros(int(groups.max()) + 1, bool)
        seen[groups[~is_held]] = True
        clash = is_held & seen[groups]
        is_held &= ~clash
        held = held[is_held[held]]
    rest = np.flatnonzero(~is_held)
    rng = np.random.default_rng(seed)
    n_val = int(round(val * len(rest))) if 0 < val < 1 else int(val)
    n_val = min(max(n_val, 1 if len(rest) > 1 else 0), max(len(rest) - 1, 0))
    perm = rng.permutation(rest)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val]), np.asarray(held, np.int64)


def _cosine(progress: float, floor: float = 0.02) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_twin(
    twin: Twin,
    x: Tensor,
    y: Tensor,
    *,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    epochs: int = 100,
    max_seconds: float | None = 120.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.02,
    patience: int | None = 40,
    patience_steps: int = 2000,
    eval_every: int = 1,
    pixel_weight: Tensor | None = None,
    ema: float | None = None,
    clip_grad: float | None = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``twin`` in place on normalised data already on its device: x [N, C] controls,
    y [N, S] traces in *normalised* units. Keeps (and restores) the best-validation weights.
    The LR follows linear warm-up then cosine decay over whichever is further along: epochs or
    ``max_seconds``. With ``ema`` (decay per step), validation and the result use an exponential
    moving average of the weights (cheap variance reduction against the label noise). Returns a
    small dict of what happened. Early stopping: no validation improvement for ``patience``
    epochs or ``patience_steps`` optimisation steps, whichever is longer (small data sets have
    short epochs), and only in the second half of the schedule (while the learning rate is high,
    the validation loss is noisy; the best weights are kept either way). Gradients are clipped to norm ``clip_grad`` (gated blocks can
    otherwise blow up at high learning rates)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(twin.core.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total_steps = epochs * steps_per_epoch
    if patience is not None:
        patience = max(int(patience), math.ceil(patience_steps / steps_per_epoch))
    w = pixel_weight if pixel_weight is not None else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best = (math.inf, -1, copy.deepcopy(twin.core.state_dict()))
    params = [p for p in twin.core.parameters()]
    averaged = copy.deepcopy(twin.core) if ema else twin.core
    avg_params = [p for p in averaged.parameters()]
    for p in avg_params if ema else []:
        p.requires_grad_(False)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    step, epoch, stopped = 0, 0, "epochs"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # progress = the further along of epochs and the wall-clock budget, in %
        bar = tqdm(total=100, desc="fit twin", unit="%", leave=False,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
        sq = (pred - target) ** 2
        return (sq * w).mean() if w is not None else sq.mean()

    @torch.no_grad()
    def evaluate(xs: Tensor, ys: Tensor) -> float:
        averaged.eval()
        total = 0.0
        for i in range(0, xs.shape[0], 4096):
            pred = averaged(twin.features(xs[i:i + 4096]))
            total += float(loss_fn(pred, ys[i:i + 4096])) * min(4096, xs.shape[0] - i)
        averaged.train()
        return total / max(xs.shape[0], 1)

    twin.train()
    try:
        for epoch in range(1, epochs + 1):  # noqa: B007 - `epoch` is reported after the loop
            perm = torch.randperm(n, generator=gen).to(x.device)
            running = 0.0
            seen = 0
            for i in range(0, n, batch_size):
                elapsed = time.perf_counter() - started
                if max_seconds is not None and elapsed >= max_seconds and seen:
                    break  # the budget is wall clock: stop mid-epoch
                prog = max(step / total_steps, elapsed / max_seconds if max_seconds else 0.0)
                scale = min(1.0, (prog / warmup) if warmup > 0 else 1.0) * _cosine(prog)
                for group in opt.param_groups:
                    group["lr"] = lr * scale
                idx = perm[i:i + batch_size]
                loss = loss_fn(twin.forward_normalised(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad:
                    nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
                opt.step()
                if ema:
                    with torch.no_grad():
                        torch._foreach_lerp_(avg_params, params, 1.0 - min(ema, (1.0 + step) / (10.0 + step)))
                running += float(loss.detach()) * idx.shape[0]
                seen += idx.shape[0]
                step += 1
            train_loss = running / max(seen, 1)
            record = {"epoch": epoch, "train": train_loss, "seconds": time.perf_counter() - started}
            if x_val is not None and x_val.shape[0] and (epoch % eval_every == 0 or epoch == epochs):
                val_loss = evaluate(x_val, y_val)
                record["val"] = val_loss
                if val_loss < best[0]:
                    best = (val_loss, epoch, copy.deepcopy(averaged.state_dict()))
            elif x_val is None or not x_val.shape[0]:
                best = (train_loss, epoch, copy.deepcopy(averaged.state_dict()) if ema else None)
            history.append(record)
            if bar is not None:
                done = max(epoch / epochs, record["seconds"] / max_seconds if max_seconds else 0.0)
                bar.n = min(100, int(100 * done))
                bar.set_postfix(epoch=epoch, train=f"{train_loss:.3g}", val=f"{record.get('val', math.nan):.3g}")
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                stopped = "max_seconds"
                break
            progress_now = max(epoch / epochs, (time.perf_counter() - started) / max_seconds if max_seconds else 0.0)
            if patience is not None and best[1] >= 0 and epoch - best[1] > patience and progress_now >= 0.5:
                stopped = "patience"
                break
    finally:
        if bar is not None:
            bar.close()
    if best[2] is not None:
        twin.core.load_state_dict(best[2])
    twin.eval()
    return {"epochs": epoch, "steps": step, "seconds": time.perf_counter() - started, "stopped": stopped,
            "best_epoch": best[1], "best_val_loss": best[0], "history": history}


def fit_twin(
    controls: Any,
    traces: Any,
    *,
    holdout: float = 0.1,
    val: float = 0.1,
    timestamps: Any = None,
    noise_mask: Any = None,
    noise_var: float | None = None,
    width: int | None = None,
    depth: int | None = None,
    block: str = "gated",
    features: str | None = None,
    rates: Sequence[float] = (1.0, 3.0, 6.0),
    core: nn.Module | str | None = None,
    epochs: int | None = None,
    max_seconds: float | None = 120.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    patience: int | None = 40,
    loss: str = "raw",
    ema: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    data: list[dict[str, Any]] | None = None,
    meta: Mapping[str, Any] | None = None,
    levels: int | str | None = "auto",
) -> tuple[Twin, FitReport]:
    """Fit a twin to measured ``controls [N, C] -> traces [N, S]`` and report on held-out rows.

    ``controls`` are the controls as applied. ``levels="auto"`` reads off them whether the rig set
    each control to a few states (`labpnn.contract.control_levels`: a binary metasurface gives
    2); the twin then quantises its input the same way with a straight-through gradient, so
    in-silico training and PAT see the states the physics sees. An int forces it, None turns it off.

    ``timestamps`` orders rows in time (default: the given order); the last ``holdout`` fraction
    (or that many rows if >= 1) is held out, ``val`` of the rest steers early stopping.
    ``noise_mask`` marks repeated measurements (the session's ``noise`` rows): they give the noise
    floor sigma^2 (unless ``noise_var`` is given), are trained on and never held out. Without
    either, repeated control vectors anywhere in the data are used for sigma^2 if there are any.

    Model: `Twin` with ``features`` (default "exp" for the residual MLP, else "linear") and the
    core ``core`` names — ``"residual_mlp"`` (the default: a `ResidualMLP` of ``width`` x ``depth``
    ``block``s) or ``"modulus"`` (`ModulusMLP`: magnitudes of a field linear in the controls, for
    coherent systems read as magnitudes) — or a plugged-in module. Training: Adam (``lr``, batch
    ``batch_size``), warm-up + cosine decay over whichever runs out first of ``epochs`` (default: the
    core's entry in `CORES`: 100 for the residual MLP; 1,000 for the modulus core, whose field converges
    slowly, as fitting magnitudes does — on the acoustic cavity 100 epochs left it at a noise ratio
    of 1.63, ~500-900 in 90 s reached 1.31-1.40) and
    ``max_seconds`` (wall clock), gradient clipping, the best-validation weights kept, early
    stopping by ``patience`` (see `train_twin`). ``loss="raw"`` weights each pixel's normalised
    error by its variance, i.e. minimises the MSE in measurement units (what ``noise_ratio``
    scores); ``loss="normalised"`` weights every pixel equally.

    Metrics (`FitReport`; definitions in the module docstring): MSE, NMSE = SSE/SST pooled over
    all pixels, R^2 pooled (= 1 - NMSE) and per-pixel mean, sigma^2 = pooled unbiased repeat
    variance averaged over pixels, noise ratio = held-out MSE / sigma^2.

    Returns ``(twin, report)``; the twin is in eval mode on ``device``, with the report, settings,
    ``data`` provenance, the noise floor and the split (``meta["split"]``: row-index ranges into
    the given arrays) in ``twin.meta``."""
    x_np = np.ascontiguousarray(np.asarray(controls, np.float32))
    y_np = np.ascontiguousarray(np.asarray(traces, np.float32))
    if x_np.ndim != 2 or y_np.ndim != 2 or x_np.shape[0] != y_np.shape[0]:
        raise ValueError(f"controls [N, C] and traces [N, S] must have the same N, got {x_np.shape} "
                         f"and {y_np.shape}")
    if x_np.shape[0] < 3:
        raise ValueError(f"need at least 3 rows to fit a twin, got {x_np.shape[0]}")
    if loss not in ("raw", "normalised"):
        raise ValueError("loss must be 'raw' or 'normalised'")
    n_rows = x_np.shape[0]
    order = None if timestamps is None else np.argsort(np.asarray(timestamps), kind="stable")
    noise_rows = None if noise_mask is None else np.flatnonzero(np.asarray(noise_mask, bool))
    train_idx, val_idx, hold_idx = split_by_time(
        n_rows, holdout=holdout, val=val, order=order, never_holdout=noise_rows, controls=x_np, seed=seed)
    rep_rows = noise_rows if noise_rows is not None and len(noise_rows) else np.arange(n_rows)
    rep_groups = control_groups(x_np[rep_rows])
    est_var, noise_groups = noise_variance(y_np[rep_rows], rep_groups)
    noise_model = fit_noise_model(y_np[rep_rows], rep_groups) if noise_groups else None
    if noise_var is None:
        noise_var = est_var
    elif noise_model is not None and est_var:
        noise_model = {k: v * noise_var / est_var for k, v in noise_model.items()}

    device = torch.device(device)
    torch.manual_seed(seed)
    if epochs is None:
        epochs = CORES[core if isinstance(core, str) else "residual_mlp"][3]
    if levels == "auto":
        levels = control_levels(x_np)
    twin = Twin(x_np.shape[1], y_np.shape[1], width=width, depth=depth, block=block, features=features,
                rates=rates, core=core, levels=levels).to(device)
    twin.set_normalisation(x_np[train_idx], y_np[train_idx])

    def tensors(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        xs = torch.from_numpy(x_np[idx]).to(device)
        ys = twin.normalise_traces(torch.from_numpy(y_np[idx]).to(device))
        return xs, ys

    x_tr, y_tr = tensors(train_idx)
    x_va, y_va = tensors(val_idx)
    weight = None
    if loss == "raw":
        var = twin.out_std ** 2
        weight = var / var.mean()
    settings = {"width": twin.core_spec.get("width"), "depth": twin.core_spec.get("depth"), "levels": twin.levels, "core": twin.core_spec, "features": twin.features.kind,
                "rates": list(twin.features.rates), "epochs": epochs,
                "max_seconds": max_seconds, "batch_size": batch_size, "lr": lr,
                "weight_decay": weight_decay, "patience": patience, "loss": loss, "ema": ema, "holdout": holdout,
                "val": val, "seed": seed, "device": str(device), "torch": torch.__version__,
                "threads": torch.get_num_threads()}
    run = train_twin(twin, x_tr, y_tr, x_val=x_va, y_val=y_va, epochs=epochs, max_seconds=max_seconds,
                     batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience,
                     pixel_weight=weight, ema=ema, seed=seed, progress=progress)
    scale = float((twin.out_std ** 2).mean()) if loss == "raw" else None
    val_mse = (run["best_val_loss"] * scale if scale is not None and math.isfinite(run["best_val_loss"])
               else _mse(twin, x_np[val_idx], y_np[val_idx]))
    hold = {}
    if len(hold_idx):
        hold = regression_metrics(twin.predict(x_np[hold_idx]), y_np[hold_idx], noise_var)
    report = FitReport(
        n_train=len(train_idx), n_val=len(val_idx), n_holdout=len(hold_idx), epochs=run["epochs"],
        steps=run["steps"], seconds=run["seconds"], stopped=run["stopped"], best_epoch=run["best_epoch"],
        val_mse=float(val_mse), holdout_mse=hold.get("mse"), holdout_nmse=hold.get("nmse"),
        holdout_r2=hold.get("r2"), holdout_r2_pixel_mean=hold.get("r2_pixel_mean"),
        noise_var=noise_var, noise_groups=noise_groups, noise_ratio=hold.get("noise_ratio"),
        noise_model=noise_model,
        settings=settings, data=list(data or []), history=run["history"],
    )
    twin.meta = jsonable({**dict(meta or {}), "data": report.data, "settings": settings,
                           "fit": {k: v for k, v in report.to_dict().items()
                                   if k not in ("history", "settings", "data")},
                           "split": {"train": _ranges(train_idx), "val": _ranges(val_idx),
                                     "holdout": _ranges(hold_idx)},
                           "noise_var": noise_var, "noise_model": noise_model})
    return twin, report


def _mse(twin: Twin, x: np.ndarray, y: np.ndarray) -> float:
    if not len(x):
        return float("nan")
    return float(((twin.predict(x) - y) ** 2).mean())


# ------------------------------------------------------------------------------------------
# sessions
# ------------------------------------------------------------------------------------------
@dataclass
class SessionData:
    """Rows gathered from one or more session files, in time order."""

    controls: np.ndarray
    traces: np.ndarray
    timestamps: np.ndarray
    tags: np.ndarray
    sources: list[dict[str, Any]]
    describe: dict[str, Any]

    @property
    def noise_mask(self) -> np.ndarray:
        return self.tags == NOISE_TAG


def load_sessions(paths: Sequence[str | Path] | str | Path, *, tags: Iterable[str] | None = FIT_TAGS) -> SessionData:
    """Read the rows tagged ``tags`` (None: all) from session files (`labpnn.sessions`), in time
    order (stable: rows with equal or missing timestamps keep file order)."""
    from labpnn.sessions import open_session

    if isinstance(paths, (str, Path)):
        paths = [paths]
    xs, ys, ts, tg, sources = [], [], [], [], []
    describe: dict[str, Any] = {}
    offset = 0.0
    for path in paths:
        reader = open_session(path)
        try:
            tags_arr = np.asarray(reader.tags).astype(str)
            rows = np.arange(len(tags_arr)) if tags is None else reader.select(tags=tuple(tags))
            rows = np.asarray(rows, np.int64)
            # the controls as the instruments applied them (quantised states, limits): what the twin maps
            ctrl = np.asarray(reader.applied[rows] if len(rows) else
                              np.empty((0, int(reader.describe["n_controls"]))), np.float32)
            trc = np.asarray(reader.traces[rows] if len(rows) else
                             np.empty((0, int(reader.describe["n_outputs"]))), np.float32)
            stamps = np.asarray(reader.timestamps[rows] if len(rows) else np.empty(0), np.float64)
            desc = dict(reader.describe)
            n_total = int(reader.n_rows)
            twin_marks = [seg.describe["twin"] for seg in getattr(reader, "segments", [reader])
                          if isinstance(getattr(seg, "describe", {}).get("twin"), Mapping)]
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()
        if not np.isfinite(stamps).all() or (len(stamps) and stamps.max() <= 0):
            # imported data without real times: keep file order, after earlier files
            stamps = offset + np.arange(len(rows), dtype=np.float64)
        offset = max(offset, float(stamps.max()) + 1 if len(stamps) else offset)
        if describe and (int(desc.get("n_controls", -1)) != int(describe.get("n_controls", -1))
                         or int(desc.get("n_outputs", -1)) != int(describe.get("n_outputs", -1))):
            raise ValueError(f"{path}: shape {desc.get('n_controls')}->{desc.get('n_outputs')} differs "
                             f"from the first session's {describe.get('n_controls')}->{describe.get('n_outputs')}")
        describe = describe or desc
        xs.append(ctrl)
        ys.append(trc)
        ts.append(stamps)
        tg.append(tags_arr[rows])
        counts = {str(t): int(c) for t, c in zip(*np.unique(tags_arr[rows], return_counts=True))}
        source = {"path": str(Path(path).resolve()), "rows": _ranges(rows), "n_rows": int(len(rows)),
                  "n_rows_in_file": n_total, "tags": counts}
        if twin_marks:  # recorded from a twin served as a rig (`labpnn serve --twin`): not the physics
            mark = twin_marks[0]
            source["twin"] = {"path": mark.get("path"), "sha256": mark.get("sha256")}
        sources.append(source)
    controls = np.concatenate(xs) if xs else np.empty((0, 0), np.float32)
    traces = np.concatenate(ys) if ys else np.empty((0, 0), np.float32)
    stamps = np.concatenate(ts) if ts else np.empty(0)
    tags_all = np.concatenate(tg) if tg else np.empty(0, str)
    order = np.argsort(stamps, kind="stable")
    return SessionData(controls[order], traces[order], stamps[order], tags_all[order], sources, describe)


class TwinDataRefused(ValueError):
    """Session rows recorded from a twin served as a rig (`labpnn.twin.served.TwinSystem`): a twin
    fitted to them would learn that twin, not the physics."""


def fit_twin_from_sessions(
    paths: Sequence[str | Path] | str | Path,
    *,
    tags: Iterable[str] | None = FIT_TAGS,
    allow_twin_data: bool = False,
    **kwargs: Any,
) -> tuple[Twin, FitReport]:
    """`fit_twin` on the rows of session files tagged ``tags``; rows tagged ``noise`` give the
    noise floor. The checkpoint's meta records each file, the rows used, the tag filter and the
    rig's describe (``meta["describe"]``, what `labpnn.twin.served.TwinSystem` serves it with).

    Sessions recorded from a served twin (their describe has a ``twin`` key) are refused with
    `TwinDataRefused` unless ``allow_twin_data=True`` (then the twin's meta says so)."""
    return fit_twin_from_data(load_sessions(paths, tags=tags), tags=tags, allow_twin_data=allow_twin_data, **kwargs)


def twin_sources(data: SessionData) -> list[dict[str, Any]]:
    """The sources of ``data`` recorded from a served twin (empty: all measured on a rig)."""
    return [s for s in data.sources if s.get("twin")]


def fit_twin_from_data(data: SessionData, *, tags: Iterable[str] | None = FIT_TAGS, allow_twin_data: bool = False,
                       **kwargs: Any) -> tuple[Twin, FitReport]:
    """`fit_twin` on rows already read by `load_sessions` (row order = the fit's row order).
    Refuses rows recorded from a served twin (`TwinDataRefused`) unless ``allow_twin_data``."""
    from_twin = twin_sources(data)
    if from_twin and not allow_twin_data:
        names = ", ".join(s["path"] for s in from_twin)
        raise TwinDataRefused(
            f"{names}: recorded from a digital twin served as a rig (labpnn serve --twin "
            f"{from_twin[0]['twin'].get('path')}), not from the physics; a twin fitted to it would learn "
            "that twin. Fit on sessions measured on the rig (or allow it on purpose: allow_twin_data=True, "
            "`labpnn twin fit --allow-twin-data`)")
    if data.controls.shape[0] == 0:
        raise ValueError(f"no rows tagged {tuple(tags) if tags else 'anything'} in "
                         f"{[s['path'] for s in data.sources]}")
    desc = data.describe
    axis = dict(desc.get("axis") or {})
    system = {"name": desc.get("name"), "n_controls": desc.get("n_controls"), "n_outputs": desc.get("n_outputs"),
              "axis": {"name": axis.get("name"), "unit": axis.get("unit")},
              "instruments": desc.get("instruments")}
    meta = {**kwargs.pop("meta", {}), "system": system, "describe": dict(desc),
            "tags": list(tags) if tags is not None else None}
    if from_twin:
        meta["fitted_on_twin_data"] = [s["path"] for s in from_twin]
        log.warning("fitting a twin on rows recorded from a served twin (%s), as asked", meta["fitted_on_twin_data"])
    return fit_twin(data.controls, data.traces, timestamps=data.timestamps, noise_mask=data.noise_mask,
                    data=data.sources, meta=meta, **kwargs)


def _ranges(idx: Any) -> list[list[int]]:
    """Sorted row indices as ``[[start, stop), ...]`` runs (compact provenance)."""
    idx = np.unique(np.asarray(idx, np.int64))
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    stops = np.concatenate([idx[breaks] + 1, [idx[-1] + 1]])
    return [[int(a), int(b)] for a, b in zip(starts, stops)]
