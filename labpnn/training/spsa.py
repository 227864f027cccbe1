"""SPSA: model-free training of the PAT network (`labpnn.training.network`) on the physics alone.

Simultaneous perturbation stochastic approximation (Spall, IEEE TAC 37, 332 (1992); "Implementation
of the simultaneous perturbation algorithm", IEEE TAES 34, 817 (1998)). All trainable parameters θ
of the network (input scales and offsets, the physical parameters, output affine maps, the readout
temperature or the hybrid classifier) are perturbed together along a random Rademacher direction Δ
(entries ±1), and the loss is measured on the physics at both ends::

    ĝ = [L(θ + c_k Δ) − L(θ − c_k Δ)] / (2 c_k) · Δ⁻¹          (Δ⁻¹ = Δ for ±1 entries)

two physical evaluations of the minibatch loss per estimate, ``perturbations`` estimates averaged
per step, with Spall's gains ``a_k = a / (A + k + 1)^0.602`` and ``c_k = c / (k + 1)^0.101`` (A
defaults to 10 % of the planned iterations). ``optimizer="sgd"`` steps ``θ ← θ − a_k ĝ``;
``optimizer="adam"`` (the default, the practical recipe) feeds ĝ to Adam at ``adam_lr``.

**Common random numbers, as far as a bench allows.** Every evaluation in a step uses the same
minibatch, and all 2 × ``perturbations`` variants of a layer go to the physics in **one** call
(rows interleaved +, −, +, − ...), so slow drift is common to both ends of each difference. A
bench's shot noise cannot be shared; average more perturbations instead.

**Quantised physical parameters (discrete SPSA, in blocks).** On a rig that sets its controls to a
few states (a binary metasurface: `labpnn.contract.control_levels` of the controls as applied in
the setup measurement), a perturbation of c = 0.05 of a latent parameter almost never crosses a
quantisation threshold, so the estimate would see none of the physical parameters. There, each
physical parameter θᵢ is perturbed as in Wang & Spall's discrete SPSA (Proc. ACC 2011): about the
midpoint πᵢ of the grid cell holding θᵢ, by half the level spacing s, so its two evaluations are
the two neighbouring states (for binary atoms: OFF and ON) and ĝᵢ = (L₊ − L₋) / s · Δᵢ. The latent
θᵢ keeps accumulating these estimates and the rig sets the state nearest to it. Digital parameters
(input scales and offsets, output maps, the readout) keep the continuous c_k — in perturbations of
their own (`blocks`): flipping every atom at once moves the loss so much that, shared, it swamps
the digital parameters' estimates (the simulated cavity in-process, vowels, 25 epochs: 2–8 % test
accuracy shared, 17–35 % in blocks, 14–35 % with no discrete step). What the discrete step buys is
not settled: at 100 epochs 63.5 / 63.5 / 71.2 % in blocks against 30.8 / 59.6 / 76.9 % without it
(splits 0–2; paired +10.3 ± 11.5 points); without it the atoms still move, by Adam's random walk of
the latents across the threshold.

**The calibrated range.** Perturbed physical parameters are clamped into ``control_range`` by the
layer's encoding (so the physics never sees a control outside it), and after every step the
parameters are projected back (`PhysicalNetwork.project_`).

**Passes.** Setup runs the training split through the physics once (``layers`` passes per
sample) to place the readout bins and standardise the hidden features (`init_affine`); each step
costs ``2 × perturbations × batch × layers`` passes. ``train_epoch`` reports the passes it spent,
``setup_passes`` those of the setup. The network is ``kind="physical"`` with the physical readout
(the physics classifies), ``"hybrid"`` with ``readout="hybrid"``.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from labpnn.contract import control_levels, measure_of
from labpnn.training.counting import FirstMeasurement, PassCounter
from labpnn.training.network import PhysicalNetwork, build_network
from labpnn.training.pat import PhysicsForward


@dataclass(frozen=True)
class SPSASettings:
    """SPSA's knobs. The shipped preset (these defaults): a one-layer physical network, minibatches
    of 32, 4 perturbations averaged per step, c = 0.05 (a twentieth of the control range: above the
    loss noise of the benches here, below the scale on which their responses bend), Adam at 0.02."""

    layers: int = 1
    readout: str = "physical"  #: "physical" (argmax of pooled outputs) | "hybrid" (digital classifier)
    repeat: int | None = None  #: channels per input feature (None: as the trainer, a quarter of the channels free)
    layout: str = "spread"
    control_range: tuple[float, float] = (0.0, 1.0)  #: the calibrated range; parameters never leave it
    pooling: str = "balanced"  #: readout bin placement from the setup measurement (`init_affine`)
    batch_size: int = 32
    perturbations: int = 4  #: Rademacher directions averaged per step
    c: float = 0.05  #: perturbation size c (c_k = c / (k + 1)^gamma)
    gamma: float = 0.101
    a: float = 0.05  #: step size a of plain SPSA (a_k = a / (A + k + 1)^alpha)
    A: float | None = None  #: stability constant (None: 10 % of ``iterations``)
    alpha: float = 0.602
    iterations: int = 500  #: the planned number of steps (sets A)
    optimizer: str = "adam"  #: "adam" (ĝ fed to Adam) | "sgd" (θ ← θ − a_k ĝ)
    adam_lr: float = 0.02
    seed: int = 0


def spall_gains(k: int, s: SPSASettings) -> tuple[float, float]:
    """``(a_k, c_k)`` at iteration ``k`` (from 0)."""
    A = s.A if s.A is not None else 0.1 * s.iterations
    return s.a / (A + k + 1) ** s.alpha, s.c / (k + 1) ** s.gamma


def spsa_estimate(loss_plus: torch.Tensor, loss_minus: torch.Tensor, deltas: torch.Tensor,
                  c: float | torch.Tensor, moved: torch.Tensor | None = None) -> torch.Tensor:
    """The averaged estimate ``mean_p [L₊ₚ − L₋ₚ] / (2c) · Δₚ⁻¹`` for Rademacher rows ``deltas`` [P, n];
    ``c`` a scalar or one perturbation size per parameter [n]. With ``moved`` (bool [P, n]: which
    parameters perturbation p moved), each parameter averages only the perturbations that moved it."""
    each = (loss_plus - loss_minus)[:, None] / (2.0 * torch.as_tensor(c) * deltas)
    if moved is None:
        return each.mean(0)
    return (each * moved).sum(0) / moved.sum(0).clamp_min(1)


def discrete_perturbation(theta: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centre, half)`` for parameters a rig quantises onto ``levels`` states k / (levels − 1):
    the midpoint of the grid cell holding each θ and half the spacing, so ``centre ± half`` are
    the two states either side of θ (Wang & Spall's discrete SPSA)."""
    spacing = 1.0 / (levels - 1)
    cell = torch.floor(theta / spacing).clamp(0, levels - 2)
    return (cell + 0.5) * spacing, torch.full_like(theta, spacing / 2)


def rademacher(n_rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n_rows, n), generator=gen).float() * 2.0 - 1.0


class SPSA:
    """SPSA on the PAT network (see the module docstring)."""

    name = "spsa"

    def __init__(self, settings: SPSASettings | None = None, **overrides: Any):
        self.settings = replace(settings or SPSASettings(), **overrides)
        if self.settings.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.settings.optimizer!r} (have: adam, sgd)")
        self.kind = "physical" if self.settings.readout == "physical" else "hybrid"
        self.net: PhysicalNetwork | None = None
        self.k = 0
        self.measured = 0  #: physical passes (rows) this method has measured
        self.setup_passes = 0
        self.levels: int | None = None  #: states per control on a quantising rig (set by `setup`)

    # -- construction ------------------------------------------------------------------------------
    def setup(self, counter: PassCounter, X_train: np.ndarray, y_train: np.ndarray) -> None:
        s = self.settings
        d = counter.describe()
        C, S = int(d["n_controls"]), int(d["n_outputs"])
        n_features, n_classes = int(X_train.shape[1]), int(np.max(y_train)) + 1
        repeat = int(s.repeat or max(1, (C * 3 // 4) // n_features))
        self.net = build_network(C, n_features, n_classes, layers=s.layers, repeat=repeat, n_outputs=S,
                                 layout=s.layout, control_range=s.control_range, readout=s.readout, seed=s.seed)
        before = counter.passes.get(counter.kind, 0)
        probe = FirstMeasurement(counter)  # the first layer's batch: what the rig applied
        self.net.init_affine(torch.as_tensor(np.asarray(X_train, np.float32)), PhysicsForward(probe),
                             repool=s.pooling)
        self.setup_passes = counter.passes.get(counter.kind, 0) - before
        self.measured += self.setup_passes
        self.levels = control_levels(probe.first.applied)  #: None: the rig applies controls as sent
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        physical = {id(layer.theta) for layer in self.net.layers}
        self.is_physical = torch.cat([torch.full((p.numel(),), id(p) in physical) for p in self.params])
        self.opt = torch.optim.Adam(self.params, lr=s.adam_lr) if s.optimizer == "adam" else None
        self.k = 0

    # -- parameters as one vector ------------------------------------------------------------------
    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def assign(self, theta: torch.Tensor) -> None:
        i = 0
        for p in self.params:
            p.copy_(theta[i:i + p.numel()].view_as(p))
            i += p.numel()

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        net = self.net
        if net.readout == "physical":
            return net.log_tau.exp() * (pooled - net.mu) / net.sigma
        return net.classifier((pooled - net.mu) / net.sigma)

    @torch.no_grad()
    def losses(self, counter: PassCounter, thetas: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the network at each parameter vector in ``thetas`` on ``(x, y)``: per
        layer, every variant's controls in one call to the physics (``len(thetas) × B`` rows)."""
        B = len(x)
        xs = [x] * len(thetas)
        for li, layer in enumerate(self.net.layers):
            controls = []
            for v, theta in enumerate(thetas):
                self.assign(theta)
                controls.append(layer.encode(xs[v]))
            m = measure_of(counter, torch.cat(controls).numpy().astype(np.float32)).raise_for_error()
            self.measured += m.n_done
            traces = torch.from_numpy(np.array(m.traces, np.float32)).split(B)
            last = li == len(self.net.layers) - 1
            for v, theta in enumerate(thetas):
                self.assign(theta)
                pooled = layer.pooling(traces[v])
                xs[v] = self._head(pooled) if last else layer.out_scale * pooled + layer.out_offset
        return torch.stack([F.cross_entropy(z, y) for z in xs])

    # -- the Method protocol -----------------------------------------------------------------------
    def step(self, counter: PassCounter, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> float:
        """One SPSA step on the minibatch ``(x, y)``; returns the mean measured loss."""
        s = self.settings
        theta = self.flat()
        a_k, c_k = spall_gains(self.k, s)
        centre, half = self.perturbation(theta, c_k)
        deltas = rademacher(s.perturbations, len(theta), gen)
        moved = self.blocks(len(deltas))
        thetas = [torch.where(m, centre + sign * half * delta, theta) for delta, m in zip(deltas, moved)
                  for sign in (1.0, -1.0)]
        L = self.losses(counter, thetas, x, y)
        g = spsa_estimate(L[0::2], L[1::2], deltas, half, moved)
        self.assign(theta)
        if self.opt is None:
            self.assign(theta - a_k * g)
        else:
            i = 0
            for p in self.params:
                p.grad = g[i:i + p.numel()].view_as(p).clone()
                i += p.numel()
            self.opt.step()
        self.net.project_()
        self.k += 1
        return float(L.mean())

    def perturbation(self, theta: torch.Tensor, c_k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Where to perturb about and by how much, per parameter: θ ± c_k, except physical
        parameters on a quantising rig (`discrete_perturbation`)."""
        centre, half = theta.clone(), torch.full_like(theta, c_k)
        if self.levels is not None:
            mask = self.is_physical
            centre[mask], half[mask] = discrete_perturbation(theta[mask], self.levels)
        return centre, half

    def blocks(self, n_perturbations: int) -> torch.Tensor:
        """Which parameters each perturbation moves (bool [P, n]): all of them, except on a
        quantising rig, where perturbations alternate between the digital parameters and the
        physical ones (starting with the step's parity, so one perturbation per step still
        reaches both)."""
        if self.levels is None:
            return torch.ones(n_perturbations, len(self.is_physical), dtype=torch.bool)
        return torch.stack([self.is_physical if (p + self.k) % 2 else ~self.is_physical
                            for p in range(n_perturbations)])

    def train_epoch(self, counter: PassCounter, X: np.ndarray, y: np.ndarray, gen: torch.Generator) -> dict[str, float]:
        X_t, y_t = torch.as_tensor(np.asarray(X, np.float32)), torch.as_tensor(np.asarray(y, np.int64))
        perm = torch.randperm(len(y_t), generator=gen)
        before = self.measured
        losses = []
        for start in range(0, len(perm), self.settings.batch_size):
            idx = perm[start:start + self.settings.batch_size]
            losses.append(self.step(counter, X_t[idx], y_t[idx], gen) * len(idx))
        a_k, c_k = spall_gains(self.k, self.settings)
        return {"loss": float(sum(losses) / len(perm)), "passes": float(self.measured - before),
                "c_k": c_k, "a_k": a_k, "iterations": float(self.k)}

    @torch.no_grad()
    def logits(self, counter: PassCounter, X: np.ndarray) -> np.ndarray:
        counted = PassCounter(counter, serialize=False)  # to book the rows measured here too
        out = self.net(torch.as_tensor(np.asarray(X, np.float32)), PhysicsForward(counted))
        self.measured += counted.total
        return out.numpy().astype(np.float64)

    def state_dict(self) -> dict:
        return {"net": copy.deepcopy(self.net.state_dict()), "k": self.k, "settings": asdict(self.settings)}

    def load_state_dict(self, d: dict) -> None:
        self.net.load_state_dict(d["net"])
        self.k = int(d["k"])


__all__ = ["SPSA", "SPSASettings", "discrete_perturbation", "rademacher", "spall_gains", "spsa_estimate"]
