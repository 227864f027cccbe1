"""The digital twin: a torch model of ``controls float32[B, C] -> traces float32[B, S]``.

PAT's backward pass is the twin's vector-Jacobian product, so the twin is only as good as its fit.
It learns from measurements only (session rows, or arrays the caller measured) and never imports
``labpnn.sim_instruments``: a simulated bench is fitted exactly like a real one.

Model: ``Twin`` = `ControlFeatures` (per-channel standardisation; by default each control x in
[0, 1] also gets the generic features exp(-k x), exp(-k (1 - x)), k = 1, 3, 6) -> a core network ->
per-pixel output de-normalisation, so the core works on O(1) numbers while ``forward`` speaks
measurement units. The default core is `ResidualMLP`: width/depth configurable, gated (SwiGLU)
residual blocks by default (plain MLP blocks on request), SiLU so that the Jacobian PAT uses is
smooth, plus a linear skip from input to output. ``core="modulus"`` (`ModulusMLP`) is for a system
read as magnitudes of coherent fields (a microphone's spectrum at the drive tones, |S21|): each
output is the magnitude of complex-affine fields of the controls — interference, exact for a linear
wave system — plus a small `ResidualMLP` for what is not (speaker compression, multiple
scattering); on the acoustic cavity it fits 3.2x closer than the default MLP without drift, and
with drift reaches a held-out noise ratio of 1.31 against 3.2 (6,256 rows, 90 s). Any
``nn.Module`` mapping ``[B, F] -> [B, S]`` can be plugged in (``core=``; F = C with
``features="linear"``, the default for a custom core).
Float32, CPU or GPU (``device=``).

Checkpoints (`save_twin` / `load_twin`) store plain state only: weights, the model's settings and
what it was fitted on; fitting lives in `labpnn.twin.fit`.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

FORMAT = "labpnn-twin/1"


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------
class GatedBlock(nn.Module):
    """``W_o (SiLU(W_a h) * (W_b h))`` — a gated-linear-unit feed-forward block (SwiGLU). The
    product gives the block multiplicative interactions between its inputs, which smooth maps
    made of products (intensities of sums of fields, say) need and plain MLPs must approximate."""

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or width
        self.a, self.b, self.o = nn.Linear(width, hidden), nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, h: Tensor) -> Tensor:
        return self.o(nn.functional.silu(self.a(h)) * self.b(h))


class ResidualMLP(nn.Module):
    """``h = Linear(C, W)(x)``, then ``depth`` residual blocks ``h = h + block(h)``, then
    ``Linear(W, S)`` plus a linear skip ``Linear(C, S)(x)``. ``block="gated"`` (default) uses
    `GatedBlock`; ``block="mlp"`` uses ``Linear(SiLU(Linear(SiLU(h))))``. Every block's last
    layer starts at zero, so a fresh network is shallow and blocks grow in as training needs them.
    Activations are smooth (SiLU), so the Jacobian PAT uses is smooth too."""

    def __init__(self, n_in: int, n_out: int, width: int = 256, depth: int = 2, linear_skip: bool = True,
                 block: str = "gated"):
        super().__init__()
        if block not in ("gated", "mlp"):
            raise ValueError("block must be 'gated' or 'mlp'")
        self.n_in, self.n_out, self.width, self.depth, self.block = int(n_in), int(n_out), int(width), int(depth), block
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            if block == "gated":
                b = GatedBlock(width)
                last = b.o
            else:
                b = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
                last = b[3]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.blocks.append(b)
        self.act = nn.SiLU() if block == "mlp" else nn.Identity()
        self.out = nn.Linear(width, n_out)
        self.skip = nn.Linear(n_in, n_out) if linear_skip else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        y = self.out(self.act(h))
        if self.skip is not None:
            y = y + self.skip(x)
        return y


class ModulusMLP(nn.Module):
    """``sqrt(sum_r |A_r x + b_r|^2) + ResidualMLP(x)`` per output, ``A_r x + b_r`` complex (real and
    imaginary parts of all ``rank`` fields from one ``Linear(C, 2 rank S)``): the magnitude of a
    field that is linear in the controls, as a tone amplitude's microphone reading is — ``rank``
    fields rather than one so that gradient descent passes the field's zeros (one field is the
    physics; 4 fitted a synthetic one closer) — plus a small residual network (default width 16: on
    measured data a wide residual fits the noise; 16 was best of 8-256 on the acoustic cavity)."""

    def __init__(self, n_in: int, n_out: int, width: int = 16, depth: int = 1, block: str = "gated", rank: int = 4):
        super().__init__()
        self.n_in, self.n_out, self.rank = int(n_in), int(n_out), int(rank)
        self.field = nn.Linear(n_in, 2 * self.rank * n_out)
        self.residual = ResidualMLP(n_in, n_out, width, depth, block=block)

    def forward(self, x: Tensor) -> Tensor:
        z = self.field(x).view(x.shape[0], 2 * self.rank, self.n_out)
        # the small floor keeps the gradient finite where the field crosses zero
        return torch.sqrt((z * z).sum(1) + 1e-6) + self.residual(x)


#: the built-in cores by name (a checkpoint's ``core.kind``): class, default width, depth and fitting
#: epochs (`labpnn.twin.fit.fit_twin`; its time budget bounds them too)
CORES: dict[str, tuple[type[nn.Module], int, int, int]] = {
    "residual_mlp": (ResidualMLP, 256, 2, 100),
    "modulus": (ModulusMLP, 16, 1, 1000),
}


class ControlFeatures(nn.Module):
    """Per-channel features of controls in [0, 1]: the control itself and, for ``features="exp"``,
    ``exp(-k x)`` and ``exp(-k (1 - x))`` for each rate k (default 1, 3, 6) — a fixed, generic
    basis of monotone curves that lets the network express quantities exponential in a control
    (e.g. an attenuation set linearly in dB) without learning the exponential itself. Each
    feature is standardised with statistics of the training controls (buffers)."""

    def __init__(self, n_controls: int, features: str = "exp", rates: Sequence[float] = (1.0, 3.0, 6.0)):
        super().__init__()
        if features not in ("exp", "linear"):
            raise ValueError("features must be 'exp' or 'linear'")
        self.n_controls, self.kind = int(n_controls), features
        self.rates = tuple(float(r) for r in rates) if features == "exp" else ()
        self.n_features = self.n_controls * (1 + 2 * len(self.rates))
        self.register_buffer("_rates", torch.tensor(self.rates, dtype=torch.float32))
        self.register_buffer("mean", torch.zeros(self.n_features))
        self.register_buffer("std", torch.ones(self.n_features))

    def raw(self, controls: Tensor) -> Tensor:
        if not self.rates:
            return controls
        k = self._rates[None, :, None]
        x = controls[:, None, :]
        return torch.cat([controls, torch.exp(-k * x).flatten(1), torch.exp(-k * (1 - x)).flatten(1)], 1)

    def forward(self, controls: Tensor) -> Tensor:
        return (self.raw(controls) - self.mean) / self.std


class Twin(nn.Module):
    """``controls [B, C] -> traces [B, S]`` in measurement units (float32, any device).

    ``forward`` = ``core(features(controls)) * out_std + out_mean`` where `ControlFeatures`
    standardises the controls per channel (and, with ``features="exp"``, the default for the
    built-in core, adds exponential features). The normalisation constants are buffers (saved,
    moved with ``.to()``); ``meta`` is a plain JSON-able dict: data the twin was fitted on,
    settings, fit metrics. ``core`` names a built-in core (``"residual_mlp"``, the default, or
    ``"modulus"``; ``width``/``depth`` default to its entry in `CORES`) or is a plugged-in module mapping
    ``[B, n_features] -> [B, S]`` (with ``features="linear"``, the default for every core but the
    residual MLP, ``n_features == n_controls``)."""

    def __init__(
        self,
        n_controls: int,
        n_outputs: int,
        *,
        width: int | None = None,
        depth: int | None = None,
        block: str = "gated",
        features: str | None = None,
        rates: Sequence[float] = (1.0, 3.0, 6.0),
        core: nn.Module | str | None = None,
        core_spec: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        levels: int | None = None,
    ):
        super().__init__()
        self.n_controls, self.n_outputs = int(n_controls), int(n_outputs)
        if levels is not None and not 2 <= int(levels) <= 256:
            raise ValueError(f"levels must be None (continuous controls) or 2..256, got {levels}")
        #: the rig sets each control to one of `levels` states k / (levels - 1) (a metasurface's
        #: meta-atoms): the twin quantises its input alike, passing gradients straight through
        self.levels = None if levels is None else int(levels)
        if core is None:
            core = "residual_mlp"
        if isinstance(core, str) and core not in CORES:
            raise ValueError(f"unknown twin core {core!r} (have: {', '.join(CORES)})")
        if features is None:
            features = "exp" if core == "residual_mlp" else "linear"
        self.features = ControlFeatures(self.n_controls, features, rates)
        if isinstance(core, str):
            cls, default_width, default_depth, _ = CORES[core]
            width = default_width if width is None else width
            depth = default_depth if depth is None else depth
            core_spec = {"kind": core, "width": int(width), "depth": int(depth), "block": block}
            core = cls(self.features.n_features, self.n_outputs, int(width), int(depth), block=block)
        elif core_spec is None:
            core_spec = {"kind": "custom", "class": f"{type(core).__module__}:{type(core).__qualname__}"}
        self.core = core
        self.core_spec = dict(core_spec)
        self.register_buffer("out_mean", torch.zeros(self.n_outputs))
        self.register_buffer("out_std", torch.ones(self.n_outputs))
        self.meta: dict[str, Any] = jsonable(dict(meta or {}))

    # -- normalisation --------------------------------------------------------------------
    @torch.no_grad()
    def set_normalisation(self, controls: Any, traces: Any) -> Twin:
        """Mean/std of each control feature and of each output pixel. A pixel's std is floored
        at 1e-3 of the largest pixel std (dark pixels are not blown up)."""
        x = torch.as_tensor(np.asarray(controls, np.float32)).to(self.out_mean.device)
        y = torch.as_tensor(np.asarray(traces, np.float32)).to(self.out_mean.device)
        f = self.features.raw(x)
        f_std = f.std(0) if f.shape[0] > 1 else torch.ones_like(f[0])
        self.features.mean.copy_(f.mean(0))
        self.features.std.copy_(torch.where(f_std > 1e-6, f_std, torch.ones_like(f_std)))
        y_std = y.std(0) if y.shape[0] > 1 else torch.ones_like(y[0])
        self.out_mean.copy_(y.mean(0))
        floor = max(float(y_std.max()) * 1e-3, 1e-30)
        self.out_std.copy_(y_std.clamp_min(floor))
        return self

    def normalise_traces(self, traces: Tensor) -> Tensor:
        return (traces - self.out_mean) / self.out_std

    def forward_normalised(self, controls: Tensor) -> Tensor:
        """The core's output: traces in normalised units (what the fit's loss sees)."""
        return self.core(self.features(controls))

    def forward(self, controls: Tensor) -> Tensor:
        if self.levels is not None:  # straight-through: the states in the forward, identity backward
            top = self.levels - 1
            controls = controls + (torch.floor(controls.clamp(0, 1) * top + 0.5) / top - controls).detach()
        return self.forward_normalised(controls) * self.out_std + self.out_mean

    # -- conveniences ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.out_mean.device

    @torch.no_grad()
    def predict(self, controls: Any, *, batch_size: int = 4096) -> np.ndarray:
        """NumPy in, NumPy out (float32), in chunks, no autograd."""
        x = np.asarray(controls, np.float32)
        out = np.empty((x.shape[0], self.n_outputs), np.float32)
        was_training = self.training
        self.eval()
        try:
            for i in range(0, x.shape[0], batch_size):
                chunk = torch.from_numpy(x[i:i + batch_size]).to(self.device)
                out[i:i + batch_size] = self(chunk).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def config(self) -> dict[str, Any]:
        return {"n_controls": self.n_controls, "n_outputs": self.n_outputs, "core": dict(self.core_spec),
                "features": self.features.kind, "rates": list(self.features.rates), "levels": self.levels}

    def snapshot(self) -> Twin:
        """An independent frozen copy (eval mode, parameters without grad) on the same device.
        Gradients still flow to the *inputs*, which is what PAT's backward needs."""
        twin = copy.deepcopy(self)
        twin.eval()
        for p in twin.parameters():
            p.grad = None
            p.requires_grad_(False)
        return twin


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def save_twin(twin: Twin, path: str | Path) -> Path:
    """A torch checkpoint: ``{"format", "config", "state", "meta"}`` with CPU tensors and plain
    Python values only, so `load_twin` can use ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in twin.state_dict().items()}
    payload = {"format": FORMAT, "config": jsonable(twin.config()), "state": state,
               "meta": jsonable(twin.meta)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_twin(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    core: nn.Module | Callable[..., nn.Module] | None = None,
    trust_core_class: bool = False,
) -> Twin:
    """Load a `save_twin` checkpoint (``weights_only=True``: no code runs while reading it).

    A twin with a plugged-in core needs that core back: pass ``core`` (a fresh module of the same
    shape, or a callable ``(n_features, n_outputs) -> module``), or ``trust_core_class=True`` to
    import the class named in the checkpoint and call it with ``(n_features, n_outputs)``."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a labpnn twin checkpoint (format {FORMAT})")
    config = payload["config"]
    spec = dict(config["core"])
    n_c, n_s = int(config["n_controls"]), int(config["n_outputs"])
    feats = {"features": config.get("features", "linear"), "rates": config.get("rates") or (1.0, 3.0, 6.0),
             "levels": config.get("levels")}
    if spec.get("kind") in CORES:
        twin = Twin(n_c, n_s, core=spec["kind"], width=spec["width"], depth=spec["depth"],
                    block=spec.get("block", "mlp"), meta=payload["meta"], **feats)
    else:
        if core is None and trust_core_class:
            module_name, _, qualname = str(spec["class"]).partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            core = obj
        if core is None:
            raise ValueError(
                f"{path}: the twin has a custom core ({spec.get('class')}); pass core= or "
                "trust_core_class=True to rebuild it"
            )
        n_f = ControlFeatures(n_c, feats["features"], feats["rates"]).n_features
        module = core if isinstance(core, nn.Module) else core(n_f, n_s)
        twin = Twin(n_c, n_s, core=module, core_spec=spec, meta=payload["meta"], **feats)
    twin.load_state_dict(payload["state"])
    return twin.to(map_location)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """Plain Python containers/scalars only (what JSON and ``torch.load(weights_only=True)`` accept);
    numpy values and tensors become lists and numbers, paths and devices strings."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (Path, torch.device, torch.dtype)):
            return str(o)
        if isinstance(o, Tensor):
            return o.detach().cpu().tolist()
        return repr(o)

    return json.loads(json.dumps(obj, default=default, allow_nan=True))
