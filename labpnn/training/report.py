"""A training run's report: ``report.json`` and the PNGs a person would rather look at (learning
curves, confusion matrix, twin vs measured traces over the rig's output axis)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from labpnn.contract import Measurement
from labpnn.twin.model import jsonable

if TYPE_CHECKING:
    from labpnn.training.trainer import TrainResult


def write_report(result: TrainResult, directory: str | Path, *, traces: Measurement | None = None, twin=None,
                 class_names=None, provenance_seeds=None, axis: Mapping[str, Any] | None = None) -> Path:
    """``report.json`` and PNGs (learning curves, confusion matrix, twin vs measured traces, drawn
    over the rig's output ``axis`` when given)."""
    from labpnn.sessions.layout import provenance

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    summary["provenance"] = provenance(seeds=provenance_seeds)
    summary["history"] = result.history
    summary["files"] = {}
    summary["files"]["learning_curves"] = _plot_curves(result, out / "learning_curves.png")
    summary["files"]["confusion"] = _plot_confusion(np.asarray(result.confusion), class_names, result,
                                                    out / "confusion.png")
    if traces is not None and twin is not None:
        summary["files"]["traces"] = _plot_traces(traces, twin, out / "twin_vs_measured.png", axis=axis)
    (out / "report.json").write_text(json.dumps(jsonable(summary), indent=2))
    return out / "report.json"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(result: TrainResult, path: Path) -> str:
    plt = _plt()
    h = result.history
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if h:
        x = [r["train_passes"] if result.settings["method"] == "pat" else r["epoch"] for r in h]
        a1.plot(x, [r["train_loss"] for r in h], label="train loss")
        a1.plot(x, [r["val_loss"] for r in h], label="validation loss (physics)")
        a2.plot(x, [r["train_acc"] for r in h], label="train accuracy")
        a2.plot(x, [r["val_acc"] for r in h], label="validation accuracy (physics)")
        a2.axhline(result.settings["target"], color="grey", ls=":", lw=1)
        xl = "training passes" if result.settings["method"] == "pat" else "epoch"
        for a in (a1, a2):
            a.set_xlabel(xl)
            a.legend(fontsize=8)
    a1.set_ylabel("cross-entropy")
    a2.set_ylabel("accuracy")
    fig.suptitle(f"{result.settings['method']}, {result.network.name}: test {result.test_accuracy:.3f} on the physics")
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def _plot_confusion(cm: np.ndarray, class_names, result: TrainResult, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(cm, cmap="Blues")
    names = class_names or [str(i) for i in range(len(cm))]
    ax.set_xticks(range(len(cm)), names, rotation=45)
    ax.set_yticks(range(len(cm)), names)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="black" if v < cm.max() / 2 else "white")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.settings['method']}: test on the physics {result.test_accuracy:.3f}")
    return _save_figure(fig, path)


def _plot_traces(m: Measurement, twin, path: Path, n: int = 4, axis: Mapping[str, Any] | None = None) -> str:
    plt = _plt()
    n = min(n, m.n_done)
    with torch.no_grad():
        pred = twin(torch.tensor(np.asarray(m.applied[:n], np.float32))).numpy()
    x, xlabel = np.arange(m.traces.shape[1]), "output pixel"
    values = np.asarray((axis or {}).get("values", []), np.float64)
    if values.shape == x.shape:
        name, unit = axis.get("name", "output"), axis.get("unit", "")
        x, xlabel = (values * 1e9, f"{name} (nm)") if unit == "m" else (
            values, f"{name} ({unit})" if unit not in ("", "1") else name)
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.8 * n + 0.5), sharex=True, squeeze=False)
    for k in range(n):
        ax = axes[k, 0]
        ax.plot(x, m.traces[k], lw=1, label="measured")
        ax.plot(x, pred[k], lw=1, ls="--", label="twin")
        ax.set_ylabel("signal (sensor units)", fontsize=8)  # the OSA reports W
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle("first physical layer, test samples: twin vs measured")
    return _save_figure(fig, path)
