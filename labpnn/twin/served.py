"""`TwinSystem`: a fitted twin served as a rig (``labpnn serve --twin TWIN.pt``), labelled as a twin.

For developing training code, teaching, and rigs known only from recorded data
(``labpnn import`` -> ``labpnn twin fit`` -> ``labpnn serve --twin``). It is a `PhysicalSystem`:

- ``run``/``measure``: the twin's prediction of the traces, plus Gaussian noise with the variance
  the twin measured on the rig's repeats (``twin.meta["noise_model"]``: ``var = a + b max(y, 0)``,
  shot + read noise; else the scalar ``noise_var``; ``noise=False`` turns it off). Controls are
  validated like a rig's (`labpnn.contract.validate_controls`, then the rig's control limits) and
  quantised to the rig's levels when the twin learned a quantised rig (``applied`` then says so);
- ``describe()``: the describe of the rig the twin was fitted on (its axis, limits, channels),
  when the checkpoint records it (twins fitted from sessions since this module exists; older ones
  record the rig's name, axis name and instruments only and get pixel indices as axis), with a
  name that says twin, the instruments replaced by the twin itself (the rig's are kept under
  ``twin.rig``) and a ``"twin"`` key: checkpoint path and hash, what it was fitted on, its
  held-out noise ratio, the noise model served;
- every `Measurement` carries ``meta={"twin": {...}}`` (the device server forwards ``meta`` in
  each run reply) and every row the ``FLAG_REPLAY_APPROX`` flag (modelled, not measured).

A session recorded from it (``serve --twin --record``, or a client's `SessionWriter` with the
served describe) stores that describe, so it is marked: `labpnn.twin.fit.fit_twin_from_sessions`
and ``labpnn twin fit`` refuse it (a twin of a twin learns the twin, not the physics).

This module imports torch; the device server does not: ``labpnn serve`` (`labpnn.serve`) builds a
`TwinSystem` only when ``--twin`` is given and hands it to the server as any other system.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from labpnn.contract import Measurement, validate_controls
from labpnn.drivers.roles import FLAG_QUANTISED, FLAG_REPLAY_APPROX
from labpnn.protocols.errors import Aborted, BadSetting, LimitExceeded
from labpnn.twin.model import Twin, jsonable, load_twin

__all__ = ["TWIN_LABEL", "TwinSystem", "is_twin_describe"]

#: what a twin's describe() says it is, in so many words
TWIN_LABEL = "digital twin: a model's predictions plus synthetic noise, not measurements of the physics"
_CHUNK = 4096


def is_twin_describe(describe: Mapping[str, Any] | None) -> bool:
    """True if a system's (or a session's stored) describe says it is a served twin."""
    return bool(describe) and isinstance(describe.get("twin"), Mapping)


class TwinSystem:
    """A fitted `Twin` (or the path of a `save_twin` checkpoint) as a labelled `PhysicalSystem`.

    ``seed`` seeds the noise (the same batches in the same order give the same traces);
    ``noise=False`` serves the twin's mean prediction. ``rig_describe`` overrides the rig
    description the checkpoint records (e.g. a session's ``describe`` for a twin fitted from
    arrays). ``device`` is where the twin runs (``"cpu"`` by default)."""

    def __init__(self, twin: Twin | str | Path, *, seed: int = 0, noise: bool = True,
                 rig_describe: Mapping[str, Any] | None = None, device: str = "cpu"):
        self.path: str | None = None
        self.sha256: str | None = None
        if isinstance(twin, (str, Path)):
            path = Path(twin)
            self.path = str(path.resolve())
            self.sha256 = _sha256(path)
            twin = load_twin(path, map_location=device)
        self.twin = twin.eval()
        self.n_controls, self.n_outputs = int(twin.n_controls), int(twin.n_outputs)
        self.seed, self.noise = int(seed), bool(noise)
        meta = dict(twin.meta or {})
        self.noise_model = _noise_model(meta) if self.noise else None
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()
        self._description = self._build_describe(meta, rig_describe)
        self._label = {"path": self.path, "sha256": self.sha256, "noise": self.noise_model is not None}
        self.busy_s = 0.0
        self.rows_served = 0

    # -- PhysicalSystem --------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return jsonable(self._description)

    def run(self, controls: Any) -> np.ndarray:
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: Any, *, abort: threading.Event | None = None, progress: Any = None) -> Measurement:
        """The twin's traces for a batch, with the measured noise. Refuses a bad batch whole
        (`InvalidControls`, or `LimitExceeded` outside the rig's control limits) before anything runs."""
        batch = validate_controls(controls, self.n_controls)
        lo, hi = self._control_limits
        if lo > 0.0 or hi < 1.0:
            outside = (batch < lo) | (batch > hi)
            if outside.any():
                row, col = np.argwhere(outside)[0]
                raise LimitExceeded(f"the rig's control limits are [{lo}, {hi}]; row {row}, channel {col} is "
                                    f"{float(batch[row, col])!r}",
                                    details={"row": int(row), "channel": int(col), "limits": [lo, hi]})
        applied = batch if batch.flags.writeable else batch.copy()  # torch wants writable arrays (zmq frames are not)
        if self.twin.levels is not None:  # the rig set states: report the states, as it would
            top = self.twin.levels - 1
            applied = (np.floor(batch * top + 0.5) / top).astype(np.float32)
        started = time.perf_counter()
        out = np.empty((batch.shape[0], self.n_outputs), np.float32)
        stamps = np.empty(batch.shape[0], np.float64)
        done = 0
        error = None
        with self._lock:
            for i in range(0, batch.shape[0], _CHUNK):
                if abort is not None and abort.is_set():
                    error = Aborted(f"aborted after {done} of {batch.shape[0]} rows", details={"n_done": done})
                    break
                mean = self.twin.predict(applied[i:i + _CHUNK]).astype(np.float64)
                if self.noise_model is not None:
                    a, b = self.noise_model
                    var = np.maximum(a + b * np.maximum(mean, 0.0), 0.0)
                    mean = mean + np.sqrt(var) * self._rng.standard_normal(mean.shape)
                out[i:i + mean.shape[0]] = mean
                done += mean.shape[0]
                stamps[i:done] = time.time()
                if progress is not None:
                    progress(done)
            busy = time.perf_counter() - started
            self.busy_s += busy
            self.rows_served += done
        flags = np.full(done, FLAG_REPLAY_APPROX, np.uint32)
        if self.twin.levels is not None:
            flags[(applied[:done] != batch[:done]).any(1)] |= FLAG_QUANTISED
        return Measurement(batch, out[:done], np.ascontiguousarray(applied[:done]), stamps[:done], flags, error,
                           busy, meta={"twin": dict(self._label)})

    def configure(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """A served twin has no instrument settings: its noise and seed are fixed when it is served."""
        raise BadSetting("a served twin has no settings to configure (noise and seed are chosen when it is "
                         "served: labpnn serve --twin TWIN.pt [--no-noise] [--seed N])")

    def close(self) -> None:
        pass

    # -- description -------------------------------------------------------------------------------
    @property
    def _control_limits(self) -> tuple[float, float]:
        lim = (self._description.get("limits") or {}).get("controls") or [0.0, 1.0]
        return float(lim[0]), float(lim[1])

    def _build_describe(self, meta: dict[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
        c, s = self.n_controls, self.n_outputs
        rig = dict(override or meta.get("describe") or {})
        if not rig:  # older twins: what fit_twin_from_sessions recorded of the rig
            system = dict(meta.get("system") or {})
            rig = {k: system[k] for k in ("name", "axis", "instruments") if system.get(k) is not None}
        rig.pop("twin", None)  # a twin fitted on a twin's data (allowed on purpose): say so below, once
        if rig and (int(rig.get("n_controls", c)) != c or int(rig.get("n_outputs", s)) != s):
            raise ValueError(f"the rig description has {rig.get('n_controls')} -> {rig.get('n_outputs')} "
                             f"channels, the twin {c} -> {s}")
        rig_name = str(rig.get("name") or "rig")
        axis = dict(rig.get("axis") or {})
        values = axis.get("values")
        if values is None or len(values) != s:
            name = str(axis.get("name") or "")
            axis = {"name": f"{name} (index)" if name and name != "index" else "index", "unit": "1",
                    "values": list(range(s))}
        limits = dict(rig.get("limits") or {})
        limits.setdefault("controls", [0.0, 1.0])
        fit = dict(meta.get("fit") or {})
        if self.noise_model is not None:
            a, b = self.noise_model
            noise = {"served": True, "model": "gaussian, var = a + b * max(y, 0)", "a": a, "b": b}
        else:
            noise = {"served": False, "why": "noise=False" if not self.noise else
                     "the twin recorded no repeat noise (no noise_var / noise_model)"}
        data = [{k: src.get(k) for k in ("path", "n_rows", "tags") if k in src} for src in meta.get("data") or []]
        twin_info = {
            "label": TWIN_LABEL,
            "path": self.path,
            "sha256": self.sha256,
            "fitted_on": data,
            "fitted_on_twin_data": bool(meta.get("fitted_on_twin_data")),
            "rig": {k: rig.get(k) for k in ("name", "instruments", "settings") if rig.get(k) is not None},
            "rig_description": "recorded at fit time" if (override or meta.get("describe")) else
                               ("partial (older twin: name, axis name, instruments)" if rig else "none recorded"),
            "noise_ratio": fit.get("noise_ratio"),
            "holdout_nmse": fit.get("holdout_nmse"),
            "holdout_r2": fit.get("holdout_r2"),
            "noise_var": meta.get("noise_var"),
            "noise": noise,
            "seed": self.seed,
            "levels": self.twin.levels,
            "config": self.twin.config(),
        }
        desc: dict[str, Any] = {
            "name": f"twin of {rig_name}",
            "n_controls": c,
            "n_outputs": s,
            "axis": axis,
            "limits": limits,
            "instruments": {"twin": f"labpnn digital twin {self.sha256[:12] if self.sha256 else '(in memory)'}"
                                    " — not the physics"},
            "settings": {"twin": {"noise": self.noise_model is not None, "seed": self.seed}},
            "twin": twin_info,
        }
        if rig.get("channels") is not None:
            desc["channels"] = rig["channels"]
        return desc


def _noise_model(meta: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(a, b)`` of ``var = a + b max(y, 0)`` from a twin's meta (the fit's repeats), or None."""
    model = meta.get("noise_model") or (meta.get("fit") or {}).get("noise_model")
    if model and model.get("a") is not None:
        return float(model["a"]), float(model.get("b") or 0.0)
    var = meta.get("noise_var")
    if var is None:
        var = (meta.get("fit") or {}).get("noise_var")
    return (float(var), 0.0) if var else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
