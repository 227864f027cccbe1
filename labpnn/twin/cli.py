"""``labpnn twin``: fit, evaluate and describe digital twins.

::

    labpnn twin fit calib.h5 [more.h5 ...] -o twin.pt [--plot fit.png] [--json]
                    [--core residual_mlp|modulus --width 256 --depth 3 --epochs 300 --max-seconds 120]
    labpnn twin eval twin.pt session.h5 [--tags train] [--json]
    labpnn twin show twin.pt [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a twin to session files (rows ordered by time; the last "
                       "--holdout fraction is held out)")
    p.add_argument("sessions", nargs="+", help="session files (HDF5)")
    p.add_argument("-o", "--output", required=True, help="twin checkpoint to write (.pt)")
    p.add_argument("--tags", nargs="+", default=None,
                   help="row tags to fit on (default: calibration noise train other)")
    p.add_argument("--core", default="residual_mlp", choices=["residual_mlp", "modulus"],
                   help="residual_mlp (generic, default) or modulus (|a field linear in the controls| + a small "
                        "MLP: for magnitudes of coherent fields, e.g. spectra at drive tones or |S21|)")
    p.add_argument("--width", type=int, default=None, help="default: 256 (residual_mlp), 16 (modulus)")
    p.add_argument("--depth", type=int, default=None, help="default: 2 (residual_mlp), 1 (modulus)")
    p.add_argument("--block", default="gated", choices=["gated", "mlp"], help="residual block type")
    p.add_argument("--features", default=None, choices=["exp", "linear"],
                   help="control features: exp adds exp(-k x), exp(-k (1-x)) per channel (default for "
                        "residual_mlp); linear (default for modulus)")
    p.add_argument("--epochs", type=int, default=None, help="default: 100 (residual_mlp), 1000 (modulus); --max-seconds bounds them")
    p.add_argument("--max-seconds", type=float, default=120.0, help="wall-clock budget of the fit")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=40, help="early stopping: epochs without val improvement")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction (or count) of the latest rows held out")
    p.add_argument("--val", type=float, default=0.1, help="random fraction of the rest for early stopping")
    p.add_argument("--loss", choices=["raw", "normalised"], default="raw")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="predicted vs measured held-out traces")
    p.add_argument("--json", action="store_true", help="print the fit report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-twin-data", action="store_true",
                   help="fit on sessions recorded from a served twin (`labpnn serve --twin`) too; refused by "
                        "default: a twin fitted to them learns that twin, not the physics")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a twin on session rows (MSE, R2, noise ratio)")
    p.add_argument("twin", help="twin checkpoint (.pt)")
    p.add_argument("sessions", nargs="+")
    p.add_argument("--tags", nargs="+", default=None, help="row tags to score (default: all but noise)")
    p.add_argument("--noise-var", type=float, default=None,
                   help="noise floor sigma^2 (default: from the sessions' noise rows, else the twin's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print a twin checkpoint's architecture, data and fit metrics")
    p.add_argument("twin")
    p.add_argument("--json", action="store_true")


def cli_twin(parser: argparse.ArgumentParser):
    sub = parser.add_subparsers(dest="action", required=True)
    _add_fit(sub)
    _add_eval(sub)
    _add_show(sub)

    def handler(args: argparse.Namespace) -> int:
        return {"fit": _fit, "eval": _eval, "show": _show}[args.action](args)

    return handler


def _fit(args: argparse.Namespace) -> int:
    import torch

    from labpnn.twin.fit import FIT_TAGS, TwinDataRefused, fit_twin_from_data, load_sessions
    from labpnn.twin.model import save_twin

    if args.threads:
        torch.set_num_threads(args.threads)
    tags = tuple(args.tags) if args.tags else FIT_TAGS
    data = load_sessions(args.sessions, tags=tags)
    try:  # sessions recorded from a served twin are refused before anything is fitted
        twin, report = fit_twin_from_data(
            data, tags=tags, allow_twin_data=args.allow_twin_data, core=args.core, width=args.width,
            depth=args.depth, block=args.block, features=args.features, epochs=args.epochs,
            max_seconds=args.max_seconds, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            patience=args.patience, holdout=args.holdout, val=args.val, loss=args.loss, device=args.device,
            seed=args.seed, progress=not args.no_progress,
            meta={"command": "labpnn twin fit " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])})
    except TwinDataRefused as exc:
        print(f"labpnn twin fit: refused: {exc}", file=sys.stderr)
        return 2
    save_twin(twin, args.output)
    if args.plot:
        hold = _rows(twin.meta["split"]["holdout"])
        plot_fit(twin, data.controls[hold], data.traces[hold], args.plot, report=report.to_dict(),
                 axis=data.describe.get("axis"))
    if args.json:
        print(json.dumps({"twin": str(args.output), **report.to_dict()}, indent=2))
    else:
        print(report.summary())
        print(f"twin written to {args.output}" + (f"; plot in {args.plot}" if args.plot else ""))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from labpnn.twin.fit import load_sessions
    from labpnn.twin.metrics import noise_from_repeats, regression_metrics
    from labpnn.twin.model import load_twin

    twin = load_twin(args.twin, map_location=args.device)
    data = load_sessions(args.sessions, tags=None)
    noise_var = args.noise_var
    if noise_var is None and data.noise_mask.any():
        noise_var, _ = noise_from_repeats(data.controls[data.noise_mask], data.traces[data.noise_mask])
    if noise_var is None:
        noise_var = twin.meta.get("noise_var")
    rows = np.isin(data.tags, args.tags) if args.tags else ~data.noise_mask
    if not rows.any():
        print("no rows to score", file=sys.stderr)
        return 1
    metrics = regression_metrics(twin.predict(data.controls[rows]), data.traces[rows], noise_var)
    metrics = {"rows": int(rows.sum()), "noise_var": noise_var, **metrics}
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return 0


def _show(args: argparse.Namespace) -> int:
    from labpnn.twin.model import load_twin

    twin = load_twin(args.twin)
    info = {"config": twin.config(), "parameters": sum(p.numel() for p in twin.parameters()), "meta": twin.meta}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        fit = twin.meta.get("fit", {})
        print(f"{args.twin}: {twin.n_controls} controls -> {twin.n_outputs} outputs, core {twin.core_spec}, "
              f"{info['parameters']} parameters")
        for src in twin.meta.get("data", []):
            print(f"  data: {src.get('path')} ({src.get('n_rows')} rows, tags {src.get('tags')})")
        if fit:
            print(f"  held-out MSE {fit.get('holdout_mse')}, R2 {fit.get('holdout_r2')}, "
                  f"noise ratio {fit.get('noise_ratio')}")
    return 0


def _rows(ranges: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.empty(0, np.int64)


def plot_fit(twin: Any, controls: np.ndarray, traces: np.ndarray, path: str | Path, *,
             report: dict[str, Any] | None = None, axis: dict[str, Any] | None = None, n_traces: int = 4) -> Path:
    """Held-out traces, measured vs predicted (the brightest, median and dimmest rows), and a
    predicted-vs-measured scatter of every pixel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    pred = twin.predict(controls) if len(controls) else np.empty_like(traces)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    x = np.arange(traces.shape[1])
    xlabel = "pixel"
    if axis and axis.get("values") is not None and len(axis["values"]) == traces.shape[1]:
        x = np.asarray(axis["values"], float)
        xlabel = f"{axis.get('name', '')} [{axis.get('unit', '')}]"
    if len(traces):
        order = np.argsort(traces.sum(1))
        picks = np.unique(order[np.linspace(0, len(order) - 1, min(n_traces + 1, len(order))).astype(int)])[::-1]
        for ax, i in zip(axes.ravel()[:5], picks[:5]):
            ax.plot(x, traces[i], lw=1, label="measured")
            ax.plot(x, pred[i], lw=1, label="twin")
            ax.set_title(f"held-out row {int(i)}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
        axes.ravel()[0].legend(fontsize=8)
        ax = axes.ravel()[5]
        ax.plot(traces.ravel(), pred.ravel(), ",", alpha=0.3)
        lim = [float(min(traces.min(), pred.min())), float(max(traces.max(), pred.max()))]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("measured")
        ax.set_ylabel("twin")
        ax.set_title("all held-out pixels", fontsize=9)
    if report:
        def f(v: Any, spec: str) -> str:
            return "n/a" if v is None else format(v, spec)

        fig.suptitle(f"twin fit: held-out R2 {f(report.get('holdout_r2'), '.4f')} (pooled), "
                     f"noise ratio {f(report.get('noise_ratio'), '.2f')} (1 = noise floor), "
                     f"{report.get('n_train')} train rows, {f(report.get('seconds'), '.0f')} s")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
