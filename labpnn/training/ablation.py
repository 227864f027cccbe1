"""Does every physical layer matter? A trained network evaluated with one layer bypassed.

Bypassing hidden layer k means: its physics, pooling and output affine map are skipped and its
input features are passed on unchanged as its output features (the identity on features), so
layer k + 1 receives exactly what layer k received. Every other layer, with its trained
parameters and affine maps, runs as trained, on the same ``through`` (the physics, for the
report). Nothing is retrained: the figure says how much the trained network relies on what
layer k's physics does to its features, beyond passing them on. The inputs of every layer are
standardised features (the dataset's, or a hidden layer's after its affine map, standardised
at initialisation), so the identity hands the next layer inputs on the scale it was built for.

Why the identity and not a constant: in a cascade, replacing a layer's output by a constant (its
mean over the training set, measured or through the twin) makes every later layer constant,
so the network answers one class for every row — chance, whatever the layer did; that would
"show" every layer matters without measuring anything.

The identity needs as many features out as in (``hidden`` = the input features, the default).
A hidden layer whose widths differ cannot be bypassed this way and is reported as such; the last
layer cannot be bypassed at all: its pooled outputs are the class scores (a physical readout).
``"all hidden"`` bypasses every hidden layer at once: the readout layer alone on the raw
features, as trained inside the deep network.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from labpnn.training.network import PhysicalNetwork, Through


def forward_bypassing(net: PhysicalNetwork, x: torch.Tensor, through: Through, bypass: set[int]) -> torch.Tensor:
    """``net(x, through)`` with the hidden layers in ``bypass`` replaced by the identity on features."""
    last = len(net.layers) - 1
    for k in bypass:
        if not 0 <= k < last:
            raise ValueError(f"layer {k} cannot be bypassed (hidden layers are 0..{last - 1})")
        layer = net.layers[k]
        if layer.n_in != layer.n_out:
            raise ValueError(f"layer {k} maps {layer.n_in} features to {layer.n_out}: no identity bypass")
    return net(x, through, skip=bypass)


@torch.no_grad()
def bypass_accuracies(net: PhysicalNetwork, X: np.ndarray, y: np.ndarray, through: Through, *,
                      batch: int = 256) -> list[dict[str, Any]]:
    """Accuracy of ``net`` on ``(X, y)`` run ``through`` with each hidden layer bypassed in turn,
    then with all of them (see the module docstring): ``[{"bypassed": k | "all hidden",
    "accuracy": float | None, "note": str}]``, one entry per hidden layer plus one for all
    (none for a one-layer network). Costs ``len(X)`` rows per remaining layer per entry."""
    last = len(net.layers) - 1
    out: list[dict[str, Any]] = []
    cases: list[tuple[Any, set[int]]] = [(k, {k}) for k in range(last)]
    if last > 1:
        cases.append(("all hidden", set(range(last))))
    for name, skip in cases:
        bad = [k for k in skip if net.layers[k].n_in != net.layers[k].n_out]
        if bad:
            out.append({"bypassed": name, "accuracy": None,
                        "note": f"layer(s) {bad} change the feature count: no identity bypass"})
            continue
        preds = [forward_bypassing(net, torch.as_tensor(X[i:i + batch]), through, skip).argmax(1).numpy()
                 for i in range(0, len(X), batch)]
        acc = float((np.concatenate(preds) == np.asarray(y)).mean()) if len(X) else float("nan")
        out.append({"bypassed": name, "accuracy": acc, "note": "identity on features"})
    return out
