"""PhyLL: physical local learning — layer-local contrastive training with no twin and no backprop
through the physics (Momeni et al., Science 382, 1297 (2023); reference code MomeniAli/PhyLL).

The network is a stack of blocks. Block ``l`` takes a vector ``h`` (length d) and computes::

    u = map(h)                         # d values in [0, 1] (per-sample min-max), the controls' inputs
    P = physics(u)                     # one physical pass per row: traces, binned and standardised
    z = W_l [P ; h] + b_l              # the block's digital linear layer on [physics output ; input]
    g = cos(|z|, p_l)                  # goodness: p_l a fixed random unit vector ("prototype")

The first block's ``h`` is the sample's features behind ``label_slots`` zero slots, the label
overlaid on slot y (`overlay`); the next block's ``h`` is this block's ``z``, detached.

**Training**, per minibatch: a positive copy (true label) and a negative copy (a wrong label drawn
uniformly, fresh every minibatch) run through the blocks; each block measures both copies in one
call (**2 physical passes per training sample per block**), then takes ``steps_per_pass`` Adam steps
on its own loss ``log(1 + exp(−τ (g₊ − g₋)))`` from the stored measurements, and hands its
detached outputs on. The physics is only ever measured, never differentiated: it returns arrays.
**Inference** overlays every label and takes the largest goodness summed over the blocks
(**n_classes × blocks passes per sample**).

Two presets (`PRESETS`, `phyll_preset`):

- ``"paper"`` — as published, quirks included, to reproduce it: the overlay value is max|x| over
  the **whole batch** (so a sample's encoding depends on what else is in its batch, and inference
  depends on the evaluation batch); the input is min-max normalised **in place** (the microwave
  code), so the skip path sees the normalised vector, not the block's input; features shifted by
  the training split's minimum so they are all >= 0 (the paper's loader); full batch, τ = 4, Adam
  lr 5e-4 (acoustic; the microwave code used 2.5e-4), 10 optimiser steps per physical pass. (The
  published prototypes were also repeated to a fixed 270 rows, which only breaks batches above
  270; here they broadcast.)
- ``"default"`` — the quirks fixed: the overlay value is max|x| **of each sample**, the
  normalisation does not touch the skip path, no shift; otherwise the same.

Both standardise the physical outputs (per output feature, with the mean and standard deviation of
the first training batch measured, then frozen): a bench's units (OSA watts ~1e-7, VNA dB ~−40)
must not decide whether the linear layer sees the physics. Set ``standardize=False`` to feed raw
traces as the published code did with its forward models.

**Per-bench input mapping.** ``input_map`` turns a block's input h into d values ``u`` in [0, 1]:
per-sample min-max (``"minmax"``, the microwave code, the default of both presets), ``|h| / ||h||``
(``"abs-l2"``, the acoustic code) or a fixed ``sigmoid(h)``. They go on d of the system's C
control channels, each on ``repeat`` channels (default ``C // d``) placed by
`labpnn.training.network.assign_channels` (``layout``, default ``"grouped"``); the other channels
are held at ``rest``. d > C is an error. Quantising rigs quantise, as configured: for the microwave
bench as published (2 meta-atom bits per input, 4 levels), configure the rig with
``[rig.metasurface] bits_per_control = 2`` and ``atoms`` listing 2·d meta-atoms, so the rig has d
controls and quantises each onto ``floor(3u + 1/2) / 3`` (``drivers/metasurface.quantise_controls``;
the paper's level thresholds were just above the sample's minimum, 1/4 and 3/4 of its range;
the rig's are 1/6, 1/2 and 5/6). With the default 1 bit per control each input is one binary
meta-atom (u >= 0.5: ON).
``output_bins`` sums the S trace pixels into that many equal-width bins (an OSA's 512 pixels into
a few dozen features); None keeps every pixel.

**Baselines** (`PhyLL(settings, physics=...)`): ``physics="zeros"`` replaces the physical block's
output by zeros of the same width, every digital path kept (what the skip connection alone can
do; no physical pass); ``physics="digital"`` replaces it by a trainable digital layer
``tanh(V u + c)`` of the same width, trained by the same block-local loss (the equal-size digital
network). Both are ``kind="digital"``; PhyLL itself is ``"hybrid"`` (its digital linear layers
classify with the physics).

This module never imports the twin package.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from labpnn.contract import measure_of
from labpnn.training.counting import PassCounter
from labpnn.training.network import assign_channels

PHYSICS = ("system", "zeros", "digital")
INPUT_MAPS = ("minmax", "abs-l2", "sigmoid")


@dataclass(frozen=True)
class PhyLLSettings:
    """PhyLL's knobs; see the module docstring for the presets."""

    blocks: int = 2
    hidden: int = 20  #: width of each block's output z
    label_slots: int | None = None  #: zero slots in front of the features (None: n_classes + 1, the paper's 8)
    tau: float = 4.0  #: loss temperature τ (the optics code used 5)
    lr: float = 5e-4  #: Adam learning rate of each block's digital layer
    steps_per_pass: int = 10  #: optimiser steps on the stored measurements per physical pass
    batch_size: int | None = None  #: None: the whole training split at once (as published)
    overlay: str = "sample"  #: "sample": max|x| of each sample | "batch": of the whole batch (paper)
    inplace_norm: bool = False  #: paper quirk: the skip path sees the min-max-normalised input
    shift_min: bool = False  #: paper's loader: features shifted by the training minimum (all >= 0)
    #: "minmax": per-sample min-max to [0, 1] (the microwave code) | "abs-l2": |h| / ||h|| (the acoustic
    #: code) | "sigmoid": sigmoid(h), fixed
    input_map: str = "minmax"
    repeat: int | None = None  #: control channels per input (None: C // d)
    layout: str = "grouped"  #: where the inputs go (`labpnn.training.network.assign_channels`)
    rest: float = 0.0  #: the value held on the channels that carry no input
    output_bins: int | None = None  #: sum trace pixels into this many bins (None: every pixel)
    standardize: bool = True  #: standardise physical outputs with the first training batch's statistics
    eval_batch: int = 128  #: samples per evaluation call (× n_classes rows)
    seed: int = 0  #: prototypes and initial weights
    #: the skip path (the block's input beside the physical output, as published). False: the digital
    #: layer sees the physical output only, so the input reaches the classifier through the physics
    #: alone — the layout in which the physics is necessary (its zeros ablation is at chance)
    skip: bool = True


#: "paper": as published, quirks included; "default": the quirks fixed (module docstring)
PRESETS: dict[str, PhyLLSettings] = {
    "paper": PhyLLSettings(overlay="batch", inplace_norm=True, shift_min=True),
    "default": PhyLLSettings(),
}


def phyll_preset(name: str = "default", **overrides: Any) -> PhyLLSettings:
    """A preset (``"paper"`` or ``"default"``) with any field overridden."""
    try:
        return replace(PRESETS[name], **overrides)
    except KeyError:
        raise ValueError(f"unknown PhyLL preset {name!r} (have: {', '.join(PRESETS)})") from None


# -- the pieces, each checked against a hand computation in the tests --------------------------------
def overlay(x: torch.Tensor, labels: torch.Tensor, slots: int, value: torch.Tensor | float) -> torch.Tensor:
    """``[B, slots + F]``: ``slots`` zeros in front of the features, slot ``labels[i]`` of row i set
    to ``value`` (a scalar — the paper's batch max — or one value per row)."""
    B = x.shape[0]
    h = x.new_zeros(B, slots + x.shape[1])
    h[:, slots:] = x
    value = torch.as_tensor(value, dtype=x.dtype).expand(B) if torch.as_tensor(value).ndim == 0 else value
    h[torch.arange(B), labels] = value
    return h


def overlay_value(x: torch.Tensor, mode: str) -> torch.Tensor:
    """max|x| of the whole batch (``"batch"``, the paper) or of each row (``"sample"``)."""
    if mode == "batch":
        return x.abs().max()
    if mode == "sample":
        return x.abs().amax(1)
    raise ValueError(f"unknown overlay mode {mode!r} (have: sample, batch)")


def minmax_rows(h: torch.Tensor) -> torch.Tensor:
    """Each row mapped onto [0, 1] by its own min and max (a constant row -> 0.5)."""
    lo, hi = h.amin(1, keepdim=True), h.amax(1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (h - lo) / torch.where(span > 0, span, 1.0), torch.full_like(h, 0.5))


def goodness(z: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """``cos(|z|, p)`` per row."""
    return F.cosine_similarity(z.abs(), prototype.expand_as(z), dim=1, eps=1e-6)


def phyll_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, tau: float) -> torch.Tensor:
    """``mean log(1 + exp(−τ (g₊ − g₋)))``."""
    return F.softplus(-tau * (g_pos - g_neg)).mean()


def random_prototype(n: int, gen: torch.Generator) -> torch.Tensor:
    """A fixed random unit vector (normal entries, normalised)."""
    p = torch.randn(n, generator=gen)
    return p / p.norm()


def wrong_labels(y: torch.Tensor, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A label != y for each row, uniform over the n_classes - 1 wrong ones."""
    return (y + torch.randint(1, n_classes, y.shape, generator=gen)) % n_classes


class PhyLLBlock(nn.Module):
    """One block's digital parts: the linear layer on ``[P ; skip]`` (on ``P`` alone without the
    skip path), the fixed prototype, the frozen output standardisation and (``physics="digital"``)
    the layer replacing the physics."""

    def __init__(self, d_in: int, n_phys: int, hidden: int, *, digital: bool, seed: int, skip: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.skip = skip
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.linear = nn.Linear(n_phys + (d_in if skip else 0), hidden)
            self.digital = nn.Linear(d_in, n_phys) if digital else None
        self.register_buffer("prototype", random_prototype(hidden, gen))
        self.register_buffer("out_mean", torch.zeros(n_phys))
        self.register_buffer("out_std", torch.ones(n_phys))
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, phys: torch.Tensor, u: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.digital is not None:
            phys = torch.tanh(self.digital(u))
        return self.linear(torch.cat([phys, skip], 1) if self.skip else phys)


class PhyLL:
    """The PhyLL method (see the module docstring). ``physics``: ``"system"`` (PhyLL),
    ``"zeros"`` or ``"digital"`` (the baselines)."""

    def __init__(self, settings: PhyLLSettings | str = "default", *, physics: str = "system",
                 n_classes: int | None = None):
        self.settings = phyll_preset(settings) if isinstance(settings, str) else settings
        if physics not in PHYSICS:
            raise ValueError(f"unknown physics {physics!r} (have: {', '.join(PHYSICS)})")
        if self.settings.overlay not in ("sample", "batch"):
            raise ValueError(f"unknown overlay mode {self.settings.overlay!r} (have: sample, batch)")
        if self.settings.input_map not in INPUT_MAPS:
            raise ValueError(f"unknown input map {self.settings.input_map!r} (have: {', '.join(INPUT_MAPS)})")
        self.physics = physics
        self.name = "phyll" if physics == "system" else f"phyll-{physics}"
        self.kind = "hybrid" if physics == "system" else "digital"
        self.n_classes = n_classes
        self.blocks: nn.ModuleList | None = None
        self.measured = 0  #: physical passes (rows) this method has measured so far

    # -- construction ------------------------------------------------------------------------------
    def setup(self, counter: PassCounter, X_train: np.ndarray, y_train: np.ndarray) -> None:
        st = self.settings
        d = counter.describe()
        C, S = int(d["n_controls"]), int(d["n_outputs"])
        K = self.n_classes = int(self.n_classes or int(np.max(y_train)) + 1)
        self.slots = int(st.label_slots if st.label_slots is not None else K + 1)
        if self.slots < K:
            raise ValueError(f"{self.slots} label slots cannot hold {K} classes")
        self.shift = float(np.min(X_train)) if st.shift_min else 0.0
        self.n_phys = int(st.output_bins or S)
        if self.n_phys > S:
            raise ValueError(f"output_bins={st.output_bins} exceeds the system's {S} outputs")
        edges = np.round(np.linspace(0, S, self.n_phys + 1)).astype(np.int64)
        self.bin_of_pixel = np.repeat(np.arange(self.n_phys), np.diff(edges))
        self.channels = []
        blocks = []
        for i in range(st.blocks):
            d_in = self.slots + X_train.shape[1] if i == 0 else st.hidden
            if d_in > C:
                raise ValueError(f"block {i + 1} has {d_in} inputs but the system has only {C} control channels "
                                 "(fewer label slots or features, a smaller hidden width, or a bigger bench)")
            repeat = int(st.repeat or max(1, C // d_in))
            inputs, feature, _ = assign_channels(C, d_in, repeat, st.layout)
            self.channels.append((torch.from_numpy(inputs), torch.from_numpy(feature)))
            blocks.append(PhyLLBlock(d_in, self.n_phys, st.hidden, digital=self.physics == "digital",
                                     seed=st.seed * 1000 + i, skip=st.skip))
        self.blocks = nn.ModuleList(blocks)
        self.C = C
        self.opts = [torch.optim.Adam(b.parameters(), lr=st.lr) for b in self.blocks]

    # -- one block's inputs ------------------------------------------------------------------------
    def controls(self, i: int, h: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """``(controls float32[B, C], u)``: block ``i``'s input ``h`` mapped into [0, 1] (``u``) and
        placed on its channels, the rest at ``rest``."""
        kind = self.settings.input_map
        if kind == "minmax":
            u = minmax_rows(h)
        elif kind == "abs-l2":
            u = h.abs() / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            u = torch.sigmoid(h)
        inputs, feature = self.channels[i]
        ctrl = torch.full((h.shape[0], self.C), float(self.settings.rest), dtype=torch.float32)
        ctrl[:, inputs] = u[:, feature].float()
        return ctrl.clamp(0.0, 1.0).numpy(), u

    def _physical(self, counter: PassCounter, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, u)`` for block ``i`` on rows ``h``: one call to the physics for all rows."""
        ctrl, u = self.controls(i, h)
        block = self.blocks[i]
        if self.physics != "system":
            return torch.zeros(h.shape[0], self.n_phys), u
        traces = np.asarray(measure_of(counter, ctrl).raise_for_error().traces, np.float64)
        self.measured += int(traces.shape[0])
        if traces.shape[0] != h.shape[0]:
            raise RuntimeError(f"the system returned {traces.shape[0]} rows for {h.shape[0]}")
        binned = np.zeros((traces.shape[0], self.n_phys))
        np.add.at(binned.T, self.bin_of_pixel, traces.T)
        P = torch.from_numpy(binned).float()
        if self.settings.standardize:
            if not bool(block.calibrated):
                block.out_mean.copy_(P.mean(0))
                block.out_std.copy_(P.std(0).clamp_min(1e-12) if len(P) > 1 else torch.ones(self.n_phys))
                block.calibrated.fill_(True)
            P = (P - block.out_mean) / block.out_std
        return P, u

    def _skip(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u if self.settings.inplace_norm else h

    def _x(self, X: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(X, np.float32)) - self.shift

    # -- the Method protocol -----------------------------------------------------------------------
    def train_epoch(self, counter: PassCounter, X: np.ndarray, y: np.ndarray, gen: torch.Generator) -> dict[str, float]:
        st, K = self.settings, self.n_classes
        x_all, y_all = self._x(X), torch.as_tensor(np.asarray(y, np.int64))
        n = len(y_all)
        perm = torch.randperm(n, generator=gen)
        batch = int(st.batch_size or n)
        losses = np.zeros(len(self.blocks))
        n_batches = passes = 0
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            xb, yb = x_all[idx], y_all[idx]
            value = overlay_value(xb, st.overlay)
            h = torch.cat([overlay(xb, yb, self.slots, value),
                           overlay(xb, wrong_labels(yb, K, gen), self.slots, value)])
            B = len(idx)
            for i, (block, opt) in enumerate(zip(self.blocks, self.opts, strict=True)):
                measured = self.measured
                P, u = self._physical(counter, i, h)  # positives and negatives: 2 B rows, one call
                passes += self.measured - measured
                skip = self._skip(h, u)
                for _ in range(st.steps_per_pass):
                    g = goodness(block(P, u, skip), block.prototype)
                    loss = phyll_loss(g[:B], g[B:], st.tau)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                losses[i] += float(loss.detach())
                with torch.no_grad():
                    h = block(P, u, skip).detach()
            n_batches += 1
        out = {f"loss_block{i + 1}": float(v / n_batches) for i, v in enumerate(losses)}
        out.update(loss=float(losses.sum() / n_batches), passes=float(passes))
        return out

    @torch.no_grad()
    def goodness_per_label(self, counter: PassCounter, X: np.ndarray) -> torch.Tensor:
        """Goodness summed over the blocks, float[N, n_classes]: every label overlaid on every sample."""
        st, K = self.settings, self.n_classes
        x_all = self._x(X)
        value_all = overlay_value(x_all, st.overlay)  # the paper: max over the whole evaluation batch
        out = []
        for start in range(0, len(x_all), st.eval_batch):
            xb = x_all[start:start + st.eval_batch]
            B = len(xb)
            value = value_all if st.overlay == "batch" else overlay_value(xb, "sample")
            vals = value if st.overlay == "batch" else value.repeat(K)
            h = overlay(xb.repeat(K, 1), torch.arange(K).repeat_interleave(B), self.slots, vals)
            total = torch.zeros(K * B)
            for i, block in enumerate(self.blocks):
                P, u = self._physical(counter, i, h)
                h = block(P, u, self._skip(h, u))
                total += goodness(h, block.prototype)
            out.append(total.reshape(K, B).T)
        return torch.cat(out)

    def logits(self, counter: PassCounter, X: np.ndarray) -> np.ndarray:
        """``τ ×`` the summed goodness per label (the argmax is PhyLL's prediction)."""
        return (self.settings.tau * self.goodness_per_label(counter, X)).numpy().astype(np.float64)

    def state_dict(self) -> dict:
        return {"blocks": copy.deepcopy(self.blocks.state_dict()), "shift": self.shift,
                "settings": asdict(self.settings), "physics": self.physics}

    def load_state_dict(self, d: dict) -> None:
        self.blocks.load_state_dict(d["blocks"])
        self.shift = float(d["shift"])


def phyll_with_baselines(settings: PhyLLSettings | str = "default") -> list[PhyLL]:
    """PhyLL and the two baselines it must stand beside: physics replaced by zeros, and the
    equal-size digital network."""
    return [PhyLL(settings), PhyLL(settings, physics="zeros"), PhyLL(settings, physics="digital")]
