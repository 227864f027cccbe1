"""Train a physical neural network on a physical system: PAT or in-silico, with every pass counted.

``train(system, dataset, method="pat", ...)`` does the whole job:

1. wraps the system in a `PassCounter` (physical passes by kind: calibration, train, validation,
   test — a pass is one row of controls run on the rig) and, with ``session=``, a
   `RecordingSystem`, so every batch lands in the session under the matching tag;
2. builds the network (`make_network` -> `labpnn.network.build_network`);
3. without a ``twin``: a calibration sweep (`labpnn.calibrate`: half uniform, half jittered around
   the controls the initial network sends, plus repeats for the noise floor; tag
   ``calibration``/``noise``) and a twin fitted to it (`labpnn.twin.fit_twin`);
4. initialises the network from a twin forward of the training set (no physical pass): pooling
   bins re-placed so each pooled output starts with the same mean intensity, affine maps
   standardising the hidden features;
5. trains with Adam on minibatches — ``method="pat"``: physics forward, twin backward
   (`labpnn.pat.PATForward`); ``method="insilico"``: the twin alone, zero training passes;
   parameters are projected back into the control range after every step;
6. after every epoch evaluates the validation split **on the physics** and keeps the best model
   (highest validation accuracy, then lowest validation loss); checkpoints (and ``resume=``);
7. evaluates the test split **once, on the physics**, with the selected model (and, for
   reference, on the twin: the sim-to-real gap);
8. writes ``report.json`` and PNGs (learning curves, confusion matrix, twin vs measured traces) to
   ``report_dir``.

``online_twin=True`` (PAT only) refines the twin in the background from every training batch
measured (`labpnn.online.OnlineTwinFitter`, fed without ever blocking the training loop; PAT's
backward uses the newest snapshot through `labpnn.pat.LiveTwin`). The fitter's drift alarms are
logged in the session, the fitter raises its own learning rate for a while, and the trainer
measures a small recalibration batch around the current operating point (tag ``calibration``)
and feeds it to the fitter.

Duty cycle: the rig's busy time (the device server's ``busy_s`` when the system is a
`RigClient`, else the measurements' own ``busy_s``) over the wall time of the training steps
(online refinement included; calibration and evaluation excluded), reported per run. A PAT step
is one physical call per layer for the whole minibatch; the trainer's own work between calls
(twin VJP, optimiser step, feeding the fitter) is a few milliseconds, so at a real bench's
latency (~20 ms settle + ~200 ms sweep per row) the rig is busy > 99 % of the time.
Optional pipelining (``chunk_rows``): a minibatch is split into chunks run by ``in_flight``
worker threads, each doing its chunk's forward (physics) and backward (twin VJP), with the
gradients summed in chunk order before one optimiser step (the same gradient as the whole
minibatch); with a `RigClient` the next chunk is queued at the server while the VJP of the
previous one runs. It pays off only when the rig is remote and a row takes about as long as the
trainer's per-step work; with the emulators in the same process it is slower (GIL), so it is off
by default.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from labpnn.contract import Measurement, PhysicalSystem, measure_of
from labpnn.datasets import Dataset, load_dataset, logistic_baseline
from labpnn.network import PhysicalNetwork, build_network, network_from_state
from labpnn.pat import LiveTwin, PATForward, PhysicsForward, TwinForward
from labpnn.twin import jsonable

log = logging.getLogger(__name__)

KINDS = ("calibration", "train", "validation", "test")
CHECKPOINT_FORMAT = "labpnn-pnn-checkpoint/1"


# -- counting physical passes -----------------------------------------------------------------------
class PassCounter:
    """A `PhysicalSystem` that counts physical passes (rows run) and instrument time by kind.

    ``with counter.counting("validation"): ...`` sets the kind (and the session tag of a wrapped
    `RecordingSystem`). ``on_train(measurement)`` is called for every training batch (to feed an
    online twin fitter). Calls are serialised with a lock unless the innermost system is known to
    take concurrent calls (a `RigClient` queues them at the server; a `Rig` has its own lock)."""

    def __init__(self, system: PhysicalSystem, *, on_train: Callable[[Measurement], None] | None = None,
                 serialize: bool | None = None):
        self.system = system
        self.on_train = on_train
        self.kind = "train"
        self.passes = {k: 0 for k in KINDS}
        self.busy_s = {k: 0.0 for k in KINDS}
        self.batches = {k: 0 for k in KINDS}
        self._count_lock = threading.Lock()
        self._call_lock = threading.Lock() if (serialize if serialize is not None else _needs_lock(system)) else None

    @contextlib.contextmanager
    def counting(self, kind: str) -> Iterator[PassCounter]:
        old = self.kind
        self._set_kind(kind)
        try:
            yield self
        finally:
            self._set_kind(old)

    def _set_kind(self, kind: str) -> None:
        self.kind = kind
        if hasattr(self.system, "writer") and hasattr(self.system, "tag"):  # a RecordingSystem
            self.system.tag = kind

    def describe(self) -> Mapping[str, Any]:
        return self.system.describe()

    def run(self, controls: np.ndarray) -> np.ndarray:
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: np.ndarray) -> Measurement:
        kind = self.kind
        if self._call_lock is not None:
            with self._call_lock:
                m = measure_of(self.system, controls)
        else:
            m = measure_of(self.system, controls)
        with self._count_lock:
            self.passes[kind] = self.passes.get(kind, 0) + m.n_done
            self.busy_s[kind] = self.busy_s.get(kind, 0.0) + float(m.busy_s or 0.0)
            self.batches[kind] = self.batches.get(kind, 0) + 1
        if kind == "train" and self.on_train is not None and m.n_done:
            self.on_train(m)
        return m

    @property
    def total(self) -> int:
        return int(sum(self.passes.values()))


def _innermost(system: Any) -> Any:
    seen = 0
    while hasattr(system, "system") and seen < 8:
        system, seen = system.system, seen + 1
    return system


def _needs_lock(system: Any) -> bool:
    inner = _innermost(system)
    names = {c.__name__ for c in type(inner).__mro__}
    return not ({"RigClient", "Rig"} & names)


def _server_busy(system: Any) -> float | None:
    """The device server's cumulative busy time, if the innermost system is a `RigClient`."""
    inner = _innermost(system)
    status = getattr(inner, "status", None)
    if status is None or type(inner).__name__ != "RigClient":
        return None
    try:
        return float(status()["busy_s"])
    except Exception:  # a status hiccup must not stop training
        return None


# -- calibration and twin ----------------------------------------------------------------------------
def _bar(total: int, desc: str, unit: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def calibrate_and_fit(system: PhysicalSystem, n_rows: int, *, writer=None, centres: np.ndarray | None = None,
                      near_fraction: float = 0.5, jitter: float = 0.08, seed: int = 0, twin_seconds: float = 120.0,
                      progress: bool = False):
    """Measure a calibration sweep (``labpnn.calibrate``: uniform rows, plus ``near_fraction`` of
    them jittered around ``centres`` — the controls the initial network sends — and repeats for
    the noise floor) and fit a twin to it. Returns ``(twin, fit report dict, (controls, traces))``."""
    from labpnn.calibrate import calibrate, near_sampler
    from labpnn.twin import fit_twin

    sampler = near_sampler(centres, jitter) if centres is not None and near_fraction > 0 else None
    cal = calibrate(system, n_rows, writer, seed=seed, sampler=sampler, sampler_fraction=near_fraction,
                    progress=progress, keep_data=True)
    noise = cal.tags == "noise"
    twin, report = fit_twin(cal.controls, cal.traces, noise_mask=noise, noise_var=cal.noise_var,
                            max_seconds=twin_seconds, seed=seed, progress=progress)
    fit = {k: v for k, v in report.to_dict().items() if k not in ("history", "data")}
    return twin, fit, (cal.controls, cal.traces)


# -- settings and results ------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    method: str = "pat"  #: "pat" | "insilico"
    layers: int = 1
    epochs: int = 60
    batch_size: int = 16
    lr: float = 0.05
    lr_schedule: str = "constant"  #: "constant" | "cosine" (decays to lr / 20 at the last epoch)
    clip: float | None = None  #: clip the gradient's global norm to this (None: no clipping)
    seed: int = 0
    hidden: int | None = None  #: pooled features between layers (default: the dataset's feature count)
    repeat: int = 3  #: control channels per input feature
    layout: str = "grouped:0.15-0.85"  #: first layer's channel layout (`labpnn.network.assign_channels`)
    hidden_layout: str | None = None  #: deeper layers' layout (default: ``layout``)
    encoding: str = "sigmoid"
    pooling: str = "equal-mass"
    readout: str = "physical"  #: "physical" (argmax of pooled outputs) | "hybrid" (digital classifier)
    control_range: tuple[float, float] = (0.0, 1.0)
    theta_init: tuple[float, float] = (0.0, 1.0)  #: initial parameters, uniform in this fraction of the range
    target: float = 0.95  #: validation accuracy whose first crossing is reported in training passes
    online_twin: bool = False
    chunk_rows: int = 0  #: PAT pipelining: rows per chunk (0: the whole minibatch in one pass)
    in_flight: int = 2  #: chunks in flight (worker threads) when chunk_rows > 0
    calibration_rows: int = 4000
    twin_seconds: float = 120.0
    eval_batch: int = 256
    max_train_passes: int | None = None  #: stop after the epoch that crosses this budget
    recalibration_rows: int = 128  #: rows measured near the operating point after a drift alarm


@dataclass
class TrainResult:
    network: PhysicalNetwork
    test_accuracy: float
    val_accuracy: float
    best_epoch: int
    passes: dict[str, int]
    passes_to_target: int | None
    history: list[dict[str, float]]
    settings: dict[str, Any]
    dataset: dict[str, Any]
    confusion: list[list[int]]
    twin_test_accuracy: float | None = None  #: the same model evaluated on the twin (the sim-to-real gap)
    digital_baseline: dict[str, float] | None = None
    duty_cycle: dict[str, float] | None = None
    report_dir: str | None = None
    session: str | None = None
    seconds: float = 0.0
    twin_fit: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("network", "history")}
        d["network"] = self.network.name
        return d


def make_network(n_controls: int, n_outputs: int, ds: Dataset, settings: TrainSettings) -> PhysicalNetwork:
    """The network `train` uses (before its data-informed initialisation). On a system with few
    channels the repeat count is lowered so that at least a quarter of the channels stay free for
    parameters, and a layout span that cannot hold the inputs is widened to the whole band."""
    widest = max(ds.n_features, settings.hidden or ds.n_features)
    repeat = max(1, min(settings.repeat, (n_controls * 3 // 4) // widest))
    layout, hidden_layout = settings.layout, settings.hidden_layout or settings.layout
    for attempt, hidden_attempt in ((layout, hidden_layout), (layout.partition(":")[0], hidden_layout.partition(":")[0])):
        try:
            return build_network(n_controls, ds.n_features, ds.n_classes, layers=settings.layers,
                                 hidden=settings.hidden, repeat=repeat, n_outputs=n_outputs, layout=attempt,
                                 hidden_layout=hidden_attempt,
                                 control_range=settings.control_range, encoding=settings.encoding,
                                 pooling_mode=settings.pooling, readout=settings.readout,
                                 theta_init=settings.theta_init, seed=settings.seed)
        except ValueError:
            if attempt != layout or ":" not in layout + hidden_layout:
                raise
            log.info("layout %s does not fit %d channels: spreading the inputs over the whole band", layout, n_controls)
    raise AssertionError("unreachable")


def operating_controls(system: PhysicalSystem, ds: Dataset, settings: TrainSettings) -> np.ndarray:
    """Controls a freshly built network would send (to steer a calibration sweep toward them)."""
    d = system.describe()
    net = make_network(int(d["n_controls"]), int(d["n_outputs"]), ds, settings)
    return _operating_controls(net, torch.from_numpy(ds.X_train), seed=settings.seed)


# -- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(net: PhysicalNetwork, X: np.ndarray, y: np.ndarray, through, *, batch: int = 256):
    """``(accuracy, mean cross-entropy, predictions)`` of ``net`` on ``(X, y)`` run ``through``."""
    preds, losses = [], []
    for i in range(0, len(X), batch):
        logits = net(torch.as_tensor(X[i:i + batch]), through)
        preds.append(logits.argmax(1).numpy())
        losses.append(float(nn.functional.cross_entropy(logits, torch.as_tensor(y[i:i + batch]),
                                                        reduction="sum")))
    pred = np.concatenate(preds)
    return float((pred == y).mean()), float(sum(losses) / len(y)), pred


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


# -- the training loop --------------------------------------------------------------------------------
def train(system: PhysicalSystem, dataset: Dataset | str | Path = "vowels", *, method: str = "pat",
          twin=None, layers: int = 1, epochs: int = 60, seed: int = 0, session: str | Path | None = None,
          report_dir: str | Path | None = None, online_twin: bool = False, checkpoint: str | Path | None = None,
          resume: str | Path | None = None, progress: bool = True, calibration=None,
          **options: Any) -> TrainResult:
    """Train a ``layers``-deep physical network on ``system`` (see the module docstring).

    ``twin``: a `labpnn.twin.Twin` (or a path to one); None calibrates and fits one (with
    ``resume``: the twin saved next to the checkpoint). ``calibration``: ``(controls, traces)``
    the twin was fitted on, replayed by the online twin fitter.
    ``options``: any `TrainSettings` field (batch_size, lr, hidden, repeat, readout, target,
    chunk_rows, in_flight, calibration_rows, twin_seconds, ...)."""
    settings = TrainSettings(method=method, layers=layers, epochs=epochs, seed=seed, online_twin=online_twin,
                             **options)
    if settings.method not in ("pat", "insilico"):
        raise ValueError(f"unknown method {settings.method!r} (have: pat, insilico)")
    started = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, seed=seed)
    torch.manual_seed(seed)

    writer = recorder = None
    base: PhysicalSystem = system
    if session is not None:
        from labpnn.session import RecordingSystem, SessionWriter, provenance

        Path(session).parent.mkdir(parents=True, exist_ok=True)
        writer = SessionWriter(session, system.describe(),
                               provenance={**provenance(seeds={"train": seed, "split": ds.seed}),
                                           "training": jsonable(asdict(settings)), "dataset": ds.summary()})
        recorder = RecordingSystem(system, writer, tag="train")
        base = recorder
    fitter_box: list[Any] = []
    # the online fitter never stalls training: a batch it has no room for is dropped (it logs that)
    counter = PassCounter(base, on_train=lambda m: fitter_box[0].feed(m.applied, m.traces, block=False)
                          if fitter_box else None)
    events: list[dict[str, Any]] = []

    def event(kind: str, message: str, **data: Any) -> None:
        events.append({"time": time.time(), "kind": kind, "message": message, **jsonable(data)})
        log.info("%s: %s", kind, message)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.event(kind, message, **jsonable(data))

    try:
        # network (built before the twin: its initial controls steer the calibration) ----------
        describe = counter.describe()
        n_controls, n_outputs = int(describe["n_controls"]), int(describe["n_outputs"])
        net = make_network(n_controls, n_outputs, ds, settings)
        X_train, y_train = torch.from_numpy(ds.X_train), torch.from_numpy(ds.y_train)

        # twin -----------------------------------------------------------------------------------
        twin_fit = None
        if twin is None and resume is not None and _twin_path(resume).exists():
            twin = _twin_path(resume)
        if isinstance(twin, (str, Path)):
            from labpnn.twin import load_twin

            twin = load_twin(twin)
        if twin is None:
            cal_counter = PassCounter(system)  # calibrate() records into the session itself
            with cal_counter.counting("calibration"):
                twin, twin_fit, calibration = calibrate_and_fit(
                    cal_counter, settings.calibration_rows, writer=writer, centres=_operating_controls(net, X_train),
                    seed=seed, twin_seconds=settings.twin_seconds, progress=progress)
            counter.passes["calibration"] += cal_counter.passes["calibration"]
            counter.busy_s["calibration"] += cal_counter.busy_s["calibration"]
            event("twin_fit", f"twin fitted on {len(calibration[0])} calibration rows",
                  holdout_nmse=twin_fit.get("holdout_nmse"), noise_ratio=twin_fit.get("noise_ratio"))
        twin.eval()
        base_twin = twin.snapshot() if hasattr(twin, "snapshot") else twin
        net.init_affine(X_train, TwinForward(base_twin), repool=settings.pooling)
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr)

        # online refinement -----------------------------------------------------------------------
        fitter = None
        live_twin: nn.Module = base_twin
        if settings.online_twin and settings.method == "pat":
            from labpnn.online import OnlineTwinFitter

            fitter = OnlineTwinFitter(base_twin, writer=writer, replay=calibration, seed=seed)
            fitter_box.append(fitter)
            live_twin = LiveTwin(fitter)
            fitter.start()
            event("online_twin", "online twin refinement on")

        # state, possibly resumed -------------------------------------------------------------------
        history: list[dict[str, float]] = []
        best = {"acc": -1.0, "loss": math.inf, "epoch": 0, "state": copy.deepcopy(net.state_dict())}
        passes_to_target: int | None = None
        start_epoch = 1
        gen = torch.Generator().manual_seed(seed)
        duty = {"busy_s": 0.0, "wall_s": 0.0, "source": "server" if _server_busy(counter) is not None else "measurements"}
        if resume is not None:
            ck = torch.load(Path(resume), map_location="cpu", weights_only=False)
            if ck.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{resume}: not a labpnn PNN checkpoint")
            net.load_state_dict(ck["network"])
            opt.load_state_dict(ck["optimizer"])
            history, best, passes_to_target = ck["history"], ck["best"], ck["passes_to_target"]
            start_epoch = int(ck["epoch"]) + 1
            gen.set_state(ck["generator"])
            for kind, n in ck["passes"].items():
                counter.passes[kind] = counter.passes.get(kind, 0) + int(n)
            duty = ck.get("duty", duty)
            event("resume", f"resumed from {resume} after epoch {start_epoch - 1}")

        train_forward = (PATForward(counter, live_twin) if settings.method == "pat" else TwinForward(base_twin))
        physics = PhysicsForward(counter)
        pool = (ThreadPoolExecutor(max_workers=max(1, settings.in_flight), thread_name_prefix="pat-chunk")
                if settings.method == "pat" and settings.chunk_rows > 0 else None)
        params = [p for p in net.parameters() if p.requires_grad]
        bar = _bar(settings.epochs - start_epoch + 1, f"train {settings.method}", "epoch", progress)
        try:
            for epoch in range(start_epoch, settings.epochs + 1):
                if settings.lr_schedule == "cosine":
                    frac = (epoch - 1) / max(1, settings.epochs - 1)
                    for group in opt.param_groups:
                        group["lr"] = settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
                perm = torch.randperm(len(X_train), generator=gen)
                run_loss = run_correct = 0.0
                busy0 = _server_busy(counter)
                busy_meas0 = counter.busy_s["train"]
                t_epoch = time.perf_counter()
                with counter.counting("train"):
                    for i in range(0, len(perm), settings.batch_size):
                        idx = perm[i:i + settings.batch_size]
                        loss_sum, correct, grads = _step_gradients(
                            net, params, X_train, y_train, idx, train_forward, settings.chunk_rows, pool)
                        for p, g in zip(params, grads, strict=True):
                            p.grad = g
                        if settings.clip:
                            nn.utils.clip_grad_norm_(params, settings.clip)
                        opt.step()
                        net.project_()
                        run_loss += loss_sum
                        run_correct += correct
                wall = time.perf_counter() - t_epoch
                busy1 = _server_busy(counter)
                duty["wall_s"] += wall
                duty["busy_s"] += (busy1 - busy0 if busy0 is not None and busy1 is not None
                                   else counter.busy_s["train"] - busy_meas0)
                _handle_alarms(fitter, counter, net, X_train, settings.recalibration_rows, event, seed)
                with counter.counting("validation"):
                    val_acc, val_loss, _ = evaluate(net, ds.X_val, ds.y_val, physics, batch=settings.eval_batch)
                record = {"epoch": epoch, "train_loss": run_loss / len(perm), "train_acc": run_correct / len(perm),
                          "val_acc": val_acc, "val_loss": val_loss, "train_passes": counter.passes["train"],
                          "eval_passes": counter.passes["validation"], "seconds": time.perf_counter() - started}
                history.append(record)
                if passes_to_target is None and val_acc >= settings.target:
                    passes_to_target = counter.passes["train"]
                if val_acc > best["acc"] or (val_acc == best["acc"] and val_loss < best["loss"]):
                    best = {"acc": val_acc, "loss": val_loss, "epoch": epoch,
                            "state": copy.deepcopy(net.state_dict())}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{val_acc:.3f}",
                                    passes=counter.passes["train"])
                if checkpoint is not None:
                    _save_checkpoint(checkpoint, net, opt, epoch, history, best, passes_to_target, gen, counter,
                                     duty, settings, ds, fitter or base_twin)
                if settings.max_train_passes is not None and counter.passes["train"] >= settings.max_train_passes:
                    event("budget", f"stopped after epoch {epoch}: {counter.passes['train']} training passes")
                    break
        finally:
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.shutdown()
            if fitter is not None:
                fitter.stop()
                base_twin = fitter.twin

        # model selection, test on the physics ----------------------------------------------------------
        net.load_state_dict(best["state"])
        capture = _Capture(counter)
        with counter.counting("test"):
            test_acc, _, pred = evaluate(net, ds.X_test, ds.y_test, PhysicsForward(capture), batch=settings.eval_batch)
        twin_acc, _, _ = evaluate(net, ds.X_test, ds.y_test, TwinForward(base_twin), batch=settings.eval_batch)
        cm = confusion_matrix(ds.y_test, pred, ds.n_classes)
        result = TrainResult(
            network=net, test_accuracy=test_acc, val_accuracy=float(best["acc"]), best_epoch=int(best["epoch"]),
            passes=dict(counter.passes), passes_to_target=passes_to_target, history=history,
            settings=jsonable(asdict(settings)), dataset=ds.summary(), confusion=cm.tolist(),
            twin_test_accuracy=twin_acc, digital_baseline=logistic_baseline(ds),
            duty_cycle=({**duty, "duty_cycle": duty["busy_s"] / duty["wall_s"] if duty["wall_s"] else None}
                        if settings.method == "pat" else None),
            report_dir=str(report_dir) if report_dir is not None else None,
            session=str(session) if session is not None else None, seconds=time.perf_counter() - started,
            twin_fit=twin_fit, events=events)
        event("test", f"test accuracy on the physics {test_acc:.4f} ({settings.method}, {settings.layers} layer(s))",
              accuracy=test_acc, passes=dict(counter.passes))
        if report_dir is not None:
            write_report(result, report_dir, traces=capture.first, twin=base_twin, class_names=ds.class_names,
                         provenance_seeds={"train": seed, "split": ds.seed}, axis=counter.describe().get("axis"))
        return result
    finally:
        if writer is not None:
            writer.close()


def _step_gradients(net, params, X, y, idx, through, chunk_rows, pool):
    """One minibatch: (sum of losses, number correct, gradient of the mean loss per parameter).
    With ``pool`` the minibatch runs as chunks in parallel; gradients are summed in chunk order."""
    n = len(idx)
    if pool is None or chunk_rows <= 0 or chunk_rows >= n:
        return _chunk(net, params, X, y, idx, through, n)
    futures = [pool.submit(_chunk, net, params, X, y, idx[i:i + chunk_rows], through, n)
               for i in range(0, n, chunk_rows)]
    results = [f.result() for f in futures]
    grads = [sum(r[2][k] for r in results) for k in range(len(params))]
    return sum(r[0] for r in results), sum(r[1] for r in results), grads


def _chunk(net, params, X, y, idx, through, n_total):
    logits = net(X[idx], through)
    loss = nn.functional.cross_entropy(logits, y[idx], reduction="sum")
    grads = torch.autograd.grad(loss / n_total, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    correct = float((logits.argmax(1) == y[idx]).sum())
    return float(loss.detach()), correct, grads


def _operating_controls(net: PhysicalNetwork, X: torch.Tensor, *, seed: int = 0) -> np.ndarray:
    """Controls the network sends now: layer 1 encodes the training set; deeper layers encode
    standard-normal features (their inputs after the affine maps are standardised)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            z = X if i == 0 else torch.randn(len(X), layer.n_in, generator=gen)
            rows.append(layer.encode(z).numpy())
    return np.concatenate(rows).astype(np.float32)


def _handle_alarms(fitter, counter: PassCounter, net, X, rows: int, event, seed: int) -> None:
    """React to the online fitter's drift alarms: log them and measure a small recalibration batch
    around the current operating point (tag ``calibration``), fed to the fitter. The fitter also
    raises its own learning rate for a while after an alarm."""
    alarms = getattr(fitter, "alarms", None) if fitter is not None else None
    if alarms is None:
        return
    pending = []
    with contextlib.suppress(Exception):
        while True:
            pending.append(alarms.get_nowait())
    if not pending:
        return
    for alarm in pending:
        event("drift_reaction", f"drift alarm: {getattr(alarm, 'message', alarm)}; recalibrating {rows} rows")
    if rows <= 0:
        return
    rng = np.random.default_rng([seed, len(pending), counter.passes["calibration"]])
    centres = _operating_controls(net, X, seed=int(rng.integers(1 << 30)))
    batch = centres[rng.integers(0, len(centres), rows)]
    batch = np.clip(batch + 0.05 * rng.standard_normal(batch.shape), 0, 1).astype(np.float32)
    with counter.counting("calibration"):
        m = counter.measure(batch)
    fitter.feed(m.applied, m.traces)


def _twin_path(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name + ".twin.pt")


class _Capture:
    """Passes through to a system and keeps the first batch it measures (for the report)."""

    def __init__(self, system):
        self.system, self.first = system, None

    def describe(self):
        return self.system.describe()

    def measure(self, controls):
        m = self.system.measure(controls)
        if self.first is None:
            self.first = m
        return m

    def run(self, controls):
        return self.measure(controls).raise_for_error().traces


# -- checkpoints --------------------------------------------------------------------------------------
def _save_checkpoint(path, net, opt, epoch, history, best, passes_to_target, gen, counter, duty, settings, ds,
                     twin_source) -> None:
    """Everything needed to resume after ``epoch``; the current twin goes next to it
    (``CHECKPOINT.twin.pt``, a `labpnn.twin.save_twin` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    twin = getattr(twin_source, "twin", twin_source)
    if hasattr(twin, "core_spec"):
        from labpnn.twin import save_twin

        save_twin(twin, _twin_path(path))
    payload = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "network": net.state_dict(),
               "network_config": net.config, "optimizer": opt.state_dict(), "history": history, "best": best,
               "passes_to_target": passes_to_target, "generator": gen.get_state(), "passes": dict(counter.passes),
               "duty": duty, "settings": jsonable(asdict(settings)), "dataset": ds.summary()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_network(path: str | Path) -> PhysicalNetwork:
    """The selected (best-validation) network stored in a training checkpoint."""
    ck = torch.load(Path(path), map_location="cpu", weights_only=False)
    return network_from_state(ck["network_config"], ck["best"]["state"])


# -- report -------------------------------------------------------------------------------------------
def write_report(result: TrainResult, directory: str | Path, *, traces: Measurement | None = None, twin=None,
                 class_names=None, provenance_seeds=None, axis: Mapping[str, Any] | None = None) -> Path:
    """``report.json`` and PNGs (learning curves, confusion matrix, twin vs measured traces, drawn
    over the rig's output ``axis`` when given)."""
    from labpnn.session import provenance

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


# -- command line -------------------------------------------------------------------------------------
def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=("pat", "insilico"), default="pat")
    parser.add_argument("--dataset", default="vowels", help="vowels, digits, or a CSV/NPZ file")
    parser.add_argument("--twin", help="a twin checkpoint (default: calibrate and fit one)")
    parser.add_argument("--layers", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--readout", choices=("physical", "hybrid"), default="physical",
                        help="hybrid: a digital linear classifier on the last layer (a hybrid network)")
    parser.add_argument("--session", help="record every batch to this session file (HDF5)")
    parser.add_argument("--report", help="write report.json and PNGs to this directory")
    parser.add_argument("--online-twin", action="store_true", help="refine the twin online from training batches")
    parser.add_argument("--checkpoint", help="checkpoint file, written after every epoch")
    parser.add_argument("--resume", help="resume from this checkpoint")
    parser.add_argument("--calibration-rows", type=int, default=4000, help="calibration sweep size (without --twin)")
    parser.add_argument("--twin-seconds", type=float, default=120.0, help="twin fitting budget (without --twin)")
    parser.add_argument("--hidden", type=int, help="pooled features between physical layers (default: as the input)")
    parser.add_argument("--repeat", type=int, default=3, help="control channels per input feature")
    parser.add_argument("--layout", help="first layer's channel layout (default grouped:0.15-0.85)")
    parser.add_argument("--hidden-layout", help="deeper layers' channel layout (default: --layout)")
    parser.add_argument("--chunk-rows", type=int, default=0, help="PAT pipelining: rows per chunk (0: off)")
    parser.add_argument("--in-flight", type=int, default=2, help="PAT pipelining: chunks in flight")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """`TrainSettings` fields from `add_training_arguments` options (unset ones left at their defaults)."""
    opts = {"batch_size": args.batch_size, "lr": args.lr, "readout": args.readout, "repeat": args.repeat,
            "calibration_rows": args.calibration_rows, "twin_seconds": args.twin_seconds,
            "chunk_rows": args.chunk_rows, "in_flight": args.in_flight, "hidden": args.hidden}
    if args.layout:
        opts["layout"] = args.layout
    if args.hidden_layout:
        opts["hidden_layout"] = args.hidden_layout
    return opts


def cli_train(parser: argparse.ArgumentParser):
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--rig", help="device server address, e.g. tcp://127.0.0.1:5555")
    where.add_argument("--config", help="a rig config (RIG.toml) to run in-process")
    add_training_arguments(parser)

    def handler(args: argparse.Namespace) -> int:
        with _open_system(args) as system:
            result = train(system, args.dataset, method=args.method, twin=args.twin, layers=args.layers,
                           epochs=args.epochs, seed=args.seed, session=args.session, report_dir=args.report,
                           online_twin=args.online_twin, checkpoint=args.checkpoint, resume=args.resume,
                           progress=not args.quiet, **training_options(args))
        print(json.dumps({k: v for k, v in result.summary().items() if k not in ("events", "twin_fit")}, indent=2))
        return 0

    return handler


@contextlib.contextmanager
def _open_system(args) -> Iterator[PhysicalSystem]:
    if args.rig:
        from labpnn.client import RigClient

        client = RigClient(args.rig)
        try:
            yield client
        finally:
            client.close()
    else:
        from labpnn.config import build_rig, load_config

        rig = build_rig(load_config(args.config)).connect()
        try:
            yield rig
        finally:
            rig.close()
