"""Reservoirs: the physics with fixed random parameters, only a readout trained — the floor every
trained physical network must clear.

The network is the PAT network of `labpnn.training.network` (`build_network`: inputs repeated on
control channels through random element-wise affine maps, the other channels at random physical
parameters), frozen as built. Setup measures the training split through it once (``layers``
passes per sample, counted ``train``), which also places the readout bins and standardises the
hidden features (`PhysicalNetwork.init_affine`, ``pooling``); after that, training makes **no**
physical pass. Evaluation costs ``layers`` passes per sample.

Two readouts (``readout``):

- ``"elementwise"`` — ``kind="physical"``: the same element-wise readout a physical network has,
  one scale and one offset per class on the standardised pooled outputs (logit_k = s_k z_k + o_k),
  fitted by Adam on cross-entropy over the stored measurements. The physics classifies. Stands
  beside the physical methods (PAT, SPSA with the physical readout).
- ``"ridge"`` — ``kind="hybrid"``: ridge regression from every trace pixel (standardised on the
  training split) to one-hot labels, the penalty chosen by leave-one-out cross-validation
  (scikit-learn's ``RidgeClassifierCV``: closed form, no extra pass). Stands beside the hybrid
  methods (PhyLL, hybrid readouts), with `labpnn.training.methods.LogisticMethod`.

Shipped preset (the defaults of `ReservoirSettings`): one layer, inputs spread over three
quarters of the channels, balanced readout bins, 200 Adam steps per epoch at 0.05 for the
element-wise readout, ridge penalties 1e-3 … 1e4.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from labpnn.contract import measure_of
from labpnn.training.counting import PassCounter
from labpnn.training.network import PhysicalNetwork, build_network


@dataclass(frozen=True)
class ReservoirSettings:
    readout: str = "elementwise"  #: "elementwise" (physical) | "ridge" (hybrid)
    layers: int = 1
    repeat: int | None = None  #: channels per input feature (None: a quarter of the channels stay parameters)
    layout: str = "spread"
    control_range: tuple[float, float] = (0.0, 1.0)
    pooling: str = "balanced"
    lr: float = 0.05  #: Adam, element-wise readout
    steps: int = 200  #: Adam steps per epoch on the stored measurements (element-wise readout)
    alphas: tuple[float, ...] = tuple(float(v) for v in np.logspace(-3, 4, 15))  #: ridge penalties tried
    seed: int = 0


class _Recorder:
    """A `through` that measures on the physics and keeps the last traces."""

    def __init__(self, counter: PassCounter):
        self.counter, self.last, self.rows = counter, None, 0

    def __call__(self, controls: torch.Tensor) -> torch.Tensor:
        m = measure_of(self.counter, controls.detach().numpy().astype(np.float32)).raise_for_error()
        self.rows += m.n_done
        self.last = torch.from_numpy(np.array(m.traces, np.float32))
        return self.last


class Reservoir:
    """A fixed random physical network with a trained readout (see the module docstring)."""

    def __init__(self, settings: ReservoirSettings | None = None, **overrides: Any):
        self.settings = replace(settings or ReservoirSettings(), **overrides)
        if self.settings.readout not in ("elementwise", "ridge"):
            raise ValueError(f"unknown readout {self.settings.readout!r} (have: elementwise, ridge)")
        ridge = self.settings.readout == "ridge"
        self.name = "reservoir-ridge" if ridge else "reservoir"
        self.kind = "hybrid" if ridge else "physical"
        self.net: PhysicalNetwork | None = None
        self.measured = 0  #: physical passes (rows) measured so far
        self.setup_passes = 0

    def setup(self, counter: PassCounter, X_train: np.ndarray, y_train: np.ndarray) -> None:
        s = self.settings
        d = counter.describe()
        C, S = int(d["n_controls"]), int(d["n_outputs"])
        n_features, K = int(X_train.shape[1]), int(np.max(y_train)) + 1
        repeat = int(s.repeat or max(1, (C * 3 // 4) // n_features))
        self.net = build_network(C, n_features, K, layers=s.layers, repeat=repeat, n_outputs=S, layout=s.layout,
                                 control_range=s.control_range, readout="physical", seed=s.seed)
        for p in self.net.parameters():
            p.requires_grad_(False)
        rec = _Recorder(counter)
        with torch.no_grad():
            self.net.init_affine(torch.as_tensor(np.asarray(X_train, np.float32)), rec, repool=s.pooling)
        self.setup_passes = rec.rows
        self.measured += rec.rows
        self.train_traces = rec.last.double()  # the last layer's traces of the training split
        self.scale = torch.ones(K, dtype=torch.float64, requires_grad=True)
        self.offset = torch.zeros(K, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.scale, self.offset], lr=s.lr)
        self.ridge = None

    # -- features from the last layer's traces ---------------------------------------------------------
    def _standardised_pooled(self, traces: torch.Tensor) -> torch.Tensor:
        last = self.net.layers[-1]
        pooled = last.pooling(traces.float()).double()
        return (pooled - self.net.mu.double()) / self.net.sigma.double()

    def _scores(self, traces: torch.Tensor) -> np.ndarray:
        if self.settings.readout == "ridge":
            feats = (traces.numpy() - self.pixel_mean) / self.pixel_scale
            scores = np.asarray(self.ridge.decision_function(feats), np.float64)
            return np.stack([-scores / 2, scores / 2], 1) if scores.ndim == 1 else scores
        with torch.no_grad():
            return (self.scale * self._standardised_pooled(traces) + self.offset).numpy()

    def train_epoch(self, counter: PassCounter, X: np.ndarray, y: np.ndarray, gen: torch.Generator) -> dict[str, float]:
        """Fits the readout on the setup's measurements of the training split (no physical pass;
        ``X`` must be the split ``setup`` measured)."""
        y_t = torch.as_tensor(np.asarray(y, np.int64))
        if len(y_t) != len(self.train_traces):
            raise ValueError("a reservoir trains on the training split its setup measured")
        if self.settings.readout == "ridge":
            if self.ridge is None:
                from sklearn.linear_model import RidgeClassifierCV

                tr = self.train_traces.numpy()
                self.pixel_mean = tr.mean(0)
                self.pixel_scale = np.where(tr.std(0) > 0, tr.std(0), 1.0)
                self.ridge = RidgeClassifierCV(alphas=self.settings.alphas).fit(
                    (tr - self.pixel_mean) / self.pixel_scale, y_t.numpy())
            scores = torch.as_tensor(self._scores(self.train_traces))
            return {"loss": float(F.cross_entropy(scores, y_t)), "passes": 0.0, "alpha": float(self.ridge.alpha_)}
        z = self._standardised_pooled(self.train_traces)
        for _ in range(self.settings.steps):
            loss = F.cross_entropy(self.scale * z + self.offset, y_t)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return {"loss": float(loss.detach()), "passes": 0.0}

    @torch.no_grad()
    def logits(self, counter: PassCounter, X: np.ndarray) -> np.ndarray:
        rec = _Recorder(counter)
        x = torch.as_tensor(np.asarray(X, np.float32))
        for layer in self.net.layers[:-1]:
            x = layer(x, rec)
        rec(self.net.layers[-1].encode(x))
        self.measured += rec.rows
        return self._scores(rec.last.double())

    def state_dict(self) -> dict:
        return {"scale": self.scale.detach().clone(), "offset": self.offset.detach().clone(),
                "ridge": copy.deepcopy(self.ridge), "settings": asdict(self.settings)}

    def load_state_dict(self, d: dict) -> None:
        with torch.no_grad():
            self.scale.copy_(d["scale"])
            self.offset.copy_(d["offset"])
        self.ridge = copy.deepcopy(d["ridge"])
