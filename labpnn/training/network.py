"""Physical neural networks: physical layers cascaded with element-wise digital affine maps.

A `PhysicalLayer` uses one pass of a physical system (controls float32[B, C] -> traces float32[B, S])
as a layer with ``n_in`` input features and ``n_out`` output features:

1. **Encoding (fixed).** Each input feature is repeated on ``repeat`` control channels
   (`assign_channels`). ``layout`` says where the ``n_in * repeat`` input channels go; the
   remaining channels carry the trainable parameters theta:

   - ``"grouped"``: evenly spaced, each feature's copies next to each other (f0 f0 f0 f1 f1 f1 …),
     so in a nonlinear spectral process (SHG: the output at ω_i + ω_j mixes channels i and j) a
     feature's copies interact mostly with themselves and their neighbours — the outputs keep
     distinct, less correlated features layer after layer;
   - ``"spread"``: evenly spaced, features cyclic (f0 f1 … f11 f0 f1 …);
   - ``"blocks"``: inputs on the first channels, then the parameters;
   - ``"KIND:a-b"``: spread the inputs only over the fraction [a, b] of the band (e.g.
     ``"grouped:0.15-0.85"`` keeps them on the bright centre of a Gaussian pulse spectrum, with
     parameters interleaved and on the dim edges).
2. **Digital affine before encoding (trainable, element-wise).** Input channel j gets
   ``s_j * x[f(j)] + o_j`` — one scale and one offset per input channel.
3. **Controls in the calibrated range.** Encoded values are squashed into ``control_range``
   ``(lo, hi)`` (default ``(0, 1)``; use the range the calibration covered): ``encoding="sigmoid"``
   (default) gives ``lo + (hi - lo) * sigmoid(v)``, smooth, its gradient never exactly zero;
   ``encoding="clamp"`` gives ``clamp(v, lo, hi)`` (zero gradient outside). A final clamp to
   ``[lo, hi]`` catches float rounding. Parameters theta are clamped to the same range in
   the forward pass, and `PhysicalNetwork.project_` puts them back inside after each optimiser
   step, so the physics never sees a control outside ``[lo, hi]`` ⊆ [0, 1].
4. **The physics** — whatever turns controls into traces: PAT (physics forward, twin backward), the
   twin alone, or the physics alone (``labpnn.training.pat``), passed to ``forward`` as ``through``.
5. **Pooling (fixed during training).** Output pixels are summed in ``n_out`` contiguous bins
   (`Pooling`). `PhysicalNetwork.init_affine` places them once, before training, inside the window
   where the layer's mean trace over the training set carries signal, with edges that give each
   bin an equal share of that mean intensity (``"equal-mass"``; or ``"equal-width"``).
6. **Digital affine after pooling (trainable, element-wise)** — for hidden layers, a scale and an
   offset per output feature, feeding the next layer.

`PhysicalNetwork` cascades layers. With ``readout="physical"`` (the default) the last layer's
pooled outputs are the class scores: logits ``= exp(log_tau) * (pooled - mu) / sigma`` with one
shared positive temperature and fixed scalars mu, sigma, so the class is exactly
``argmax(pooled)`` — the physics does the classifying. ``readout="hybrid"`` puts a digital linear
classifier on the last layer's pooled features: a hybrid physical-digital network, named so.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

Through = Callable[[torch.Tensor], torch.Tensor]


# -- fixed parts ---------------------------------------------------------------------------------
def assign_channels(n_controls: int, n_in: int, repeat: int, layout: str = "spread"):
    """``(input_channels, feature_of_channel, param_channels)`` as int64 arrays (see the module
    docstring for the layouts)."""
    n_inputs = n_in * repeat
    if n_in < 1 or repeat < 1:
        raise ValueError("n_in and repeat must be at least 1")
    if n_inputs > n_controls:
        raise ValueError(f"{n_in} features x {repeat} repeats = {n_inputs} input channels, but the "
                         f"system has only {n_controls} control channels")
    kind, _, span = layout.partition(":")
    lo_f, hi_f = (float(v) for v in span.split("-")) if span else (0.0, 1.0)
    lo_c, hi_c = lo_f * (n_controls - 1), hi_f * (n_controls - 1)
    if kind in ("spread", "grouped"):
        inputs = np.round(np.linspace(lo_c, hi_c, n_inputs)).astype(np.int64)
        if len(np.unique(inputs)) < n_inputs:
            raise ValueError(f"the span {span} of {n_controls} channels cannot hold {n_inputs} input channels")
        feature = (np.arange(n_inputs, dtype=np.int64) % n_in if kind == "spread"
                   else np.repeat(np.arange(n_in, dtype=np.int64), repeat))
    elif kind == "blocks":
        inputs = np.arange(n_inputs, dtype=np.int64)
        feature = np.repeat(np.arange(n_in, dtype=np.int64), repeat)
    else:
        raise ValueError(f"unknown channel layout {layout!r} (have: spread, grouped, blocks)")
    params = np.setdiff1d(np.arange(n_controls, dtype=np.int64), inputs)
    return inputs, feature, params


class Pooling(nn.Module):
    """Sum output pixels in contiguous bins: ``pooled[:, k] = traces[:, edges[k]:edges[k+1]].sum()``."""

    def __init__(self, n_outputs: int, edges: Sequence[int]):
        super().__init__()
        edges = np.asarray(edges, np.int64)
        if edges.ndim != 1 or len(edges) < 2 or (np.diff(edges) <= 0).any() or edges[0] < 0 \
                or edges[-1] > n_outputs:
            raise ValueError(f"bin edges must increase strictly inside [0, {n_outputs}], got {edges.tolist()}")
        matrix = np.zeros((len(edges) - 1, n_outputs), np.float32)
        for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            matrix[k, lo:hi] = 1.0
        self.register_buffer("matrix", torch.from_numpy(matrix))
        self.register_buffer("edges", torch.from_numpy(edges))

    @property
    def n_bins(self) -> int:
        return int(self.matrix.shape[0])

    def forward(self, traces: torch.Tensor) -> torch.Tensor:
        return traces @ self.matrix.T

    @classmethod
    def equal_width(cls, n_outputs: int, n_bins: int, window: tuple[int, int] | None = None) -> Pooling:
        lo, hi = window or (0, n_outputs)
        if hi - lo < n_bins:
            raise ValueError(f"a window of {hi - lo} pixels cannot hold {n_bins} bins")
        return cls(n_outputs, np.round(np.linspace(lo, hi, n_bins + 1)).astype(np.int64))

    @classmethod
    def from_traces(cls, mean_trace: np.ndarray, n_bins: int, *, threshold: float = 0.01,
                    mode: str = "equal-mass") -> Pooling:
        """Bins inside the window where ``mean_trace`` exceeds ``threshold`` × its maximum;
        ``mode="equal-mass"`` places edges so each bin holds the same share of the mean intensity,
        ``"equal-width"`` splits the window evenly."""
        trace = np.clip(np.asarray(mean_trace, np.float64), 0, None)
        n = len(trace)
        above = np.flatnonzero(trace > threshold * trace.max()) if trace.max() > 0 else np.arange(n)
        lo, hi = int(above[0]), int(above[-1]) + 1
        if hi - lo < n_bins:  # too narrow: widen symmetrically
            pad = n_bins - (hi - lo)
            lo, hi = max(0, lo - pad), min(n, hi + pad)
        if mode == "balanced":  # without rows to balance on: equal mass (see `balanced`)
            mode = "equal-mass"
        if mode == "equal-width":
            return cls.equal_width(n, n_bins, (lo, hi))
        if mode != "equal-mass":
            raise ValueError(f"unknown pooling mode {mode!r} (have: equal-mass, equal-width)")
        cum = np.concatenate([[0.0], np.cumsum(trace[lo:hi])])
        targets = np.linspace(0, cum[-1], n_bins + 1)[1:-1]
        inner = lo + np.searchsorted(cum, targets)
        return cls(n, _one_pixel_apart(np.concatenate([[lo], inner, [hi]])))


    @classmethod
    def balanced(cls, traces: np.ndarray, n_bins: int, *, threshold: float = 0.01, min_share: float = 1 / 3,
                 iterations: int = 400, step: float = 0.1) -> tuple[Pooling, dict[str, Any]]:
        """Readout bins under which every bin can win: the bins of ``from_traces`` (equal mass on
        the mean of ``traces`` [N, S]) if each is the argmax for at least ``min_share`` of its
        fair share (1 / n_bins) of the rows; else re-placed. Equal mass equalises the bins'
        means, not their spreads: a bin on a steep, bright part of the spectrum swings more
        from row to row and takes the argmax, a flat one never does. The re-placement keeps the
        window and moves the edges by mass shares q (multiplicative updates: a bin that wins too
        often gives up mass, one that rarely wins gains it), keeping the placement whose worst
        bin wins most often. Returns ``(pooling, report)``; the report gives the win shares
        before and after."""
        traces = np.asarray(traces, np.float64)
        mean = np.clip(traces.mean(0), 0, None)
        n = traces.shape[1]
        start = cls.from_traces(mean, n_bins, threshold=threshold, mode="equal-mass")

        def shares(edges: np.ndarray) -> np.ndarray:
            cum = np.concatenate([np.zeros((len(traces), 1)), np.cumsum(traces, 1)], 1)
            pooled = cum[:, edges[1:]] - cum[:, edges[:-1]]
            return np.bincount(pooled.argmax(1), minlength=n_bins) / len(traces)

        edges0 = start.edges.numpy().astype(np.int64)
        w0 = shares(edges0)
        fair = 1.0 / n_bins
        report: dict[str, Any] = {"rule": f"every bin the argmax for >= {min_share:.2f} x 1/{n_bins} of the rows",
                                  "shares_equal_mass": np.round(w0, 4).tolist(), "replaced": False}
        if w0.min() >= min_share * fair:
            report["shares"] = report["shares_equal_mass"]
            return start, report
        lo, hi = int(edges0[0]), int(edges0[-1])
        cum_mean = np.concatenate([[0.0], np.cumsum(mean[lo:hi])])
        q = np.full(n_bins, fair)
        best = (w0.min(), -np.abs(w0 - fair).max(), edges0, w0)
        w = w0
        for _ in range(iterations):
            q = q * np.exp(step * np.clip((fair - w) / fair, -1.0, 1.0))
            q /= q.sum()
            inner = lo + np.searchsorted(cum_mean, cum_mean[-1] * np.cumsum(q)[:-1])
            edges = _one_pixel_apart(np.concatenate([[lo], inner, [hi]]))
            w = shares(edges)
            score = (w.min(), -np.abs(w - fair).max())
            if score > best[:2]:
                best = (*score, edges.copy(), w)
            if w.min() >= 0.8 * fair:
                break
        report.update(replaced=True, shares=np.round(best[3], 4).tolist(), edges=best[2].tolist())
        return cls(n, best[2]), report


def _one_pixel_apart(edges: np.ndarray) -> np.ndarray:
    """Bin edges moved apart so every bin holds at least one pixel, the window's two ends fixed
    (inner edges pushed up past their left neighbour, then pulled down below their right one)."""
    edges = np.asarray(edges, np.int64).copy()
    for k in range(1, len(edges) - 1):
        edges[k] = max(edges[k], edges[k - 1] + 1)
    for k in range(len(edges) - 2, 0, -1):
        edges[k] = min(edges[k], edges[k + 1] - 1)
    return edges


# -- the layer -----------------------------------------------------------------------------------
class PhysicalLayer(nn.Module):
    def __init__(self, n_in: int, pooling: Pooling, *, n_controls: int, repeat: int = 3,
                 layout: str = "spread", control_range: tuple[float, float] = (0.0, 1.0),
                 encoding: str = "sigmoid", affine_out: bool = True, theta_init: tuple[float, float] = (0.0, 1.0),
                 seed: int = 0):
        super().__init__()
        lo, hi = (float(v) for v in control_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"control_range must satisfy 0 <= lo < hi <= 1, got {control_range}")
        if encoding not in ("sigmoid", "clamp"):
            raise ValueError(f"unknown encoding {encoding!r} (have: sigmoid, clamp)")
        inputs, feature, params = assign_channels(n_controls, n_in, repeat, layout)
        self.n_in, self.n_out, self.n_controls = n_in, pooling.n_bins, n_controls
        self.repeat, self.layout, self.encoding, self.control_range = repeat, layout, encoding, (lo, hi)
        self.register_buffer("input_channels", torch.from_numpy(inputs))
        self.register_buffer("feature_of_channel", torch.from_numpy(feature))
        self.register_buffer("param_channels", torch.from_numpy(params))
        self.pooling = pooling
        gen = torch.Generator().manual_seed(seed)
        n_inputs = len(inputs)
        # random signs and magnitudes make the repeated copies of a feature different from the start
        sign = torch.where(torch.rand(n_inputs, generator=gen) < 0.5, -1.0, 1.0)
        self.in_scale = nn.Parameter(sign * (0.5 + torch.rand(n_inputs, generator=gen)))
        self.in_offset = nn.Parameter(torch.zeros(n_inputs))
        a, b = theta_init  # initial parameters: uniform in this fraction of the control range
        self.theta = nn.Parameter(lo + (hi - lo) * (a + (b - a) * torch.rand(len(params), generator=gen)))
        self.affine_out = affine_out
        if affine_out:
            self.out_scale = nn.Parameter(torch.ones(self.n_out))
            self.out_offset = nn.Parameter(torch.zeros(self.n_out))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features float[B, n_in] -> controls float32[B, C] inside ``control_range``."""
        lo, hi = self.control_range
        v = self.in_scale * x[:, self.feature_of_channel] + self.in_offset
        if self.encoding == "sigmoid":
            v = lo + (hi - lo) * torch.sigmoid(v)
        v = v.clamp(lo, hi)  # also catches float rounding of lo + (hi - lo) * sigmoid just above hi
        controls = x.new_empty(x.shape[0], self.n_controls)
        controls[:, self.input_channels] = v
        controls[:, self.param_channels] = self.theta.clamp(lo, hi).expand(x.shape[0], -1)
        return controls

    def pooled(self, x: torch.Tensor, through: Through) -> torch.Tensor:
        return self.pooling(through(self.encode(x)))

    def forward(self, x: torch.Tensor, through: Through) -> torch.Tensor:
        y = self.pooled(x, through)
        return self.out_scale * y + self.out_offset if self.affine_out else y

    @torch.no_grad()
    def project_(self) -> None:
        self.theta.clamp_(*self.control_range)


class PhysicalNetwork(nn.Module):
    """Physical layers in cascade; see the module docstring for the readout."""

    def __init__(self, layers: Sequence[PhysicalLayer], n_classes: int, *, readout: str = "physical"):
        super().__init__()
        if readout not in ("physical", "hybrid"):
            raise ValueError(f"unknown readout {readout!r} (have: physical, hybrid)")
        self.layers = nn.ModuleList(layers)
        self.readout, self.n_classes = readout, n_classes
        last = self.layers[-1]
        if readout == "physical":
            if last.n_out != n_classes:
                raise ValueError(f"a physical readout needs {n_classes} pooled outputs, got {last.n_out}")
            if last.affine_out:
                raise ValueError("the last layer of a physical readout must not have an output affine map")
            self.log_tau = nn.Parameter(torch.tensor(float(np.log(3.0))))
            self.register_buffer("mu", torch.tensor(0.0))
            self.register_buffer("sigma", torch.tensor(1.0))
        else:
            self.classifier = nn.Linear(last.n_out, n_classes)
            self.register_buffer("mu", torch.zeros(last.n_out))
            self.register_buffer("sigma", torch.ones(last.n_out))
        self.config: dict[str, Any] = {}
        self.placement: dict[str, Any] | None = None  #: how `init_affine` placed the readout bins

    @property
    def name(self) -> str:
        kind = "physical" if self.readout == "physical" else "hybrid physical-digital"
        return f"{len(self.layers)}-layer {kind} network"

    def forward(self, x: torch.Tensor, through: Through, *, skip: Collection[int] = ()) -> torch.Tensor:
        """Class scores. ``skip``: hidden layers replaced by the identity on their features
        (`labpnn.training.ablation`: does every layer matter?)."""
        for k, layer in enumerate(self.layers[:-1]):
            if k not in skip:
                x = layer(x, through)
        pooled = self.layers[-1].pooled(x, through)
        if self.readout == "physical":
            return self.log_tau.exp() * (pooled - self.mu) / self.sigma
        return self.classifier((pooled - self.mu) / self.sigma)

    @torch.no_grad()
    def project_(self) -> None:
        for layer in self.layers:
            layer.project_()

    @torch.no_grad()
    def init_affine(self, x: torch.Tensor, through: Through, *, repool: str | None = "equal-mass") -> None:
        """Data-informed initialisation, layer by layer, running ``x`` ``through`` (e.g. the twin:
        no physical pass). With ``repool`` each layer's bins are first re-placed on its mean
        trace over ``x`` (`Pooling.from_traces`, so every pooled output starts with the same mean
        intensity — for the last layer, no class is favoured at the start; ``repool="balanced"``:
        the same, but a physical readout's bins are re-placed if some class would rarely win,
        `Pooling.balanced`, its report in ``self.placement``); then the output affine
        maps are set so each hidden feature has zero mean and unit variance over ``x``, and the
        readout's mu and sigma likewise (temperature 1)."""
        self.placement = None
        for i, layer in enumerate(self.layers):
            traces = through(layer.encode(x))
            last = i == len(self.layers) - 1
            if repool == "balanced" and last and self.readout == "physical":
                layer.pooling, self.placement = Pooling.balanced(traces.numpy(), layer.n_out)
                layer.pooling.to(traces.device)
            elif repool:
                mode = "equal-mass" if repool == "balanced" else repool
                layer.pooling = Pooling.from_traces(traces.mean(0).numpy(), layer.n_out, mode=mode)
            y = layer.pooling(traces)
            if i < len(self.layers) - 1:
                mean, std = y.mean(0), y.std(0).clamp_min(1e-30)
                layer.out_scale.copy_(1.0 / std)
                layer.out_offset.copy_(-mean / std)
                x = layer.out_scale * y + layer.out_offset
        if self.readout == "physical":
            self.mu.copy_(y.mean())
            self.sigma.copy_(y.std().clamp_min(1e-30))
            self.log_tau.fill_(0.0)
        else:
            self.mu.copy_(y.mean(0))
            self.sigma.copy_(y.std(0).clamp_min(1e-30))


def build_network(n_controls: int, n_features: int, n_classes: int, *, layers: int = 1,
                  hidden: int | None = None, repeat: int = 3, hidden_repeat: int | None = None,
                  mean_trace: np.ndarray | None = None, n_outputs: int | None = None,
                  layout: str = "spread", hidden_layout: str | None = None, control_range=(0.0, 1.0),
                  encoding: str = "sigmoid",
                  pooling_mode: str = "equal-mass", readout: str = "physical", readout_bins: int | None = None,
                  theta_init: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> PhysicalNetwork:
    """A ``layers``-deep network for one system of ``n_controls`` channels. Pooling bins come from
    ``mean_trace`` (a calibration mean; `Pooling.from_traces`) or split ``n_outputs`` pixels evenly.
    ``layout`` places the first layer's inputs, ``hidden_layout`` (default: the same) the deeper
    layers' (whose inputs are pooled spectral bins, in spectral order)."""
    if layers < 1:
        raise ValueError("a network needs at least one physical layer")
    hidden = hidden or n_features
    hidden_repeat = hidden_repeat or repeat
    out_bins = n_classes if readout == "physical" else (readout_bins or max(n_classes, hidden))

    def pool(n_bins):
        if mean_trace is not None:
            return Pooling.from_traces(mean_trace, n_bins, mode=pooling_mode)
        if n_outputs is None:
            raise ValueError("give mean_trace (a calibration mean trace) or n_outputs")
        return Pooling.equal_width(n_outputs, n_bins)

    built = []
    n_in, rep = n_features, repeat
    for i in range(layers):
        last = i == layers - 1
        built.append(PhysicalLayer(
            n_in, pool(out_bins if last else hidden), n_controls=n_controls, repeat=rep,
            layout=layout if i == 0 else (hidden_layout or layout),
            control_range=control_range, encoding=encoding, affine_out=not last, theta_init=tuple(theta_init),
            seed=seed * 1000 + i))
        n_in, rep = hidden, hidden_repeat
    net = PhysicalNetwork(built, n_classes, readout=readout)
    net.config = dict(n_controls=n_controls, n_features=n_features, n_classes=n_classes, layers=layers,
                      hidden=hidden, repeat=repeat, hidden_repeat=hidden_repeat, layout=layout,
                      hidden_layout=hidden_layout,
                      control_range=list(control_range), encoding=encoding, pooling_mode=pooling_mode,
                      readout=readout, readout_bins=readout_bins, theta_init=list(theta_init), seed=seed,
                      n_outputs=int(n_outputs if n_outputs is not None else len(mean_trace)))
    return net


def network_from_state(config: dict[str, Any], state: dict[str, torch.Tensor]) -> PhysicalNetwork:
    """Rebuild a network saved as ``(net.config, net.state_dict())``: pooling edges come from the
    state, so no calibration trace is needed."""
    cfg = dict(config)
    n_outputs = cfg.pop("n_outputs")
    net = build_network(**cfg, n_outputs=n_outputs)
    for i, layer in enumerate(net.layers):
        layer.pooling = Pooling(n_outputs, state[f"layers.{i}.pooling.edges"].numpy())
    net.load_state_dict(state)
    net.config = dict(config)
    return net
