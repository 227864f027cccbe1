"""Train a physical neural network on a physical system: PAT or in-silico, with every pass counted.

``train(system, dataset, method="pat", ...)`` does the whole job:

1. wraps the system in a `PassCounter` (physical passes by kind: calibration, train, validation,
   test — a pass is one row of controls run on the rig) and, with ``session=``, a
   `RecordingSystem`, so every batch lands in the session under the matching tag;
2. builds the network (`make_network` -> `labpnn.training.network.build_network`);
0. chooses every setting the caller left unset from the data and the bench
   (`labpnn.training.defaults`: channels per feature, layout, readout bins, batch, learning rate,
   epochs, calibration size, the twin's target), each with a reason (``announce``d, and in the
   report); a dataset with more features than fit is reduced by PCA on its training split;
3. without a ``twin``: a calibration sweep (`labpnn.twin.calibrate`: half uniform, half jittered around
   the controls the initial network sends, plus repeats for the noise floor; tag
   ``calibration``/``noise``) and a twin fitted to it (`labpnn.twin.fit_twin`), refitted with more
   rows near those controls until its noise ratio there meets the target or the budget is spent
   (`calibrate_to_target`);
4. initialises the network from a twin forward of the training set (no physical pass): pooling
   bins re-placed so each pooled output starts with the same mean intensity (a physical
   readout's bins moved further if some class would rarely win: `Pooling.balanced`), affine maps
   standardising the hidden features;
5. trains with Adam on minibatches — ``method="pat"``: physics forward, twin backward
   (`labpnn.training.pat.PATForward`); ``method="insilico"``: the twin alone, zero training passes;
   parameters are projected back into the control range after every step;
6. after every epoch evaluates the validation split **on the physics** and keeps the best model
   (highest validation accuracy, then lowest validation loss); checkpoints (and ``resume=``);
7. evaluates the test split **once, on the physics**, with the selected model (and, for
   reference, on the twin: the sim-to-real gap);
8. writes ``report.json`` and PNGs (learning curves, confusion matrix, twin vs measured traces) to
   ``report_dir``.

``online_twin=True`` (PAT only; the default for PAT with 2+ layers, off for 1) refines the twin in
the background from every training batch measured (`labpnn.twin.online.OnlineTwinFitter`, fed without ever blocking the training loop; PAT's
backward uses the newest snapshot through `labpnn.training.pat.LiveTwin`). Drift is told by probes
(`labpnn.training.drift`): 4 rows of the first training batch re-measured after every 4th training
batch (passes of kind ``probe``); when they change by more than ``drift_threshold`` x their repeat
noise, a ``drift_alarm`` is logged, the fitter adapts at once and, after the epoch, the trainer
measures a small recalibration batch around the current operating point (tag ``calibration``) and
feeds it to the fitter. The twin's own error is reported as ``twin_quality`` and raises no alarm:
it rises as much where training carries the network beyond the twin's data as after a drift.

Data-parallel (``parallel=``, `labpnn.training.parallel`): one process per copy of a rig under
``torchrun``; each minibatch is split by rank, gradients summed in one all-reduce per step with
a stop flag, validation taken on the worst rig, the test measured on every rig; a failed rig stops
every rank after a checkpoint that resumes mid-epoch on the rigs left.

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

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from labpnn.contract import PhysicalSystem
from labpnn.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, twin_path
from labpnn.training.counting import KINDS, FirstMeasurement, PassCounter, server_busy
from labpnn.training.datasets import Dataset, load_dataset, logistic_baseline, reduce_features
from labpnn.training.network import PhysicalNetwork, build_network
from labpnn.training.parallel import RunStopped, Solo, parameter_digest
from labpnn.training.pat import LiveTwin, PATForward, PhysicsForward, TwinForward
from labpnn.twin.model import jsonable

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "KINDS", "TrainResult", "TrainSettings", "calibrate_and_fit", "calibrate_to_target",
           "confusion_matrix", "evaluate", "make_network", "operating_controls", "resolve_settings", "train"]


# -- calibration and twin ----------------------------------------------------------------------------
def _bar(total: int, desc: str, unit: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def calibrate_and_fit(system: PhysicalSystem, n_rows: int, *, writer=None, centres: np.ndarray | None = None,
                      near_fraction: float = 0.5, jitter: float = 0.08, seed: int = 0, twin_seconds: float = 120.0,
                      twin_core: str = "residual_mlp", progress: bool = False):
    """Measure a calibration sweep (``labpnn.twin.calibrate``: uniform rows, plus ``near_fraction`` of
    them jittered around ``centres`` — the controls the initial network sends — and repeats for
    the noise floor) and fit a twin to it. Returns ``(twin, fit report dict, (controls, traces))``."""
    from labpnn.twin.calibrate import calibrate, near_sampler
    from labpnn.twin.fit import fit_twin

    sampler = near_sampler(centres, jitter) if centres is not None and near_fraction > 0 else None
    cal = calibrate(system, n_rows, writer, seed=seed, sampler=sampler, sampler_fraction=near_fraction,
                    progress=progress, keep_data=True)
    noise = cal.tags == "noise"
    twin, report = fit_twin(cal.controls, cal.traces, noise_mask=noise, noise_var=cal.noise_var,
                            max_seconds=twin_seconds, seed=seed, core=twin_core, progress=progress)
    fit = {k: v for k, v in report.to_dict().items() if k not in ("history", "data")}
    return twin, fit, (cal.controls, cal.traces)


def calibrate_to_target(system: PhysicalSystem, n_rows: int, *, centres: np.ndarray, target: float = 1.5,
                        budget: int | None = None, writer=None, seed: int = 0, twin_seconds: float = 120.0,
                        probe_rows: int = 256, near_fraction: float = 0.5, jitter: float = 0.08,
                        twin_core: str = "residual_mlp", progress: bool = False):
    """`calibrate_and_fit`, then judged where training will operate: ``probe_rows`` fresh rows
    near ``centres`` (the controls the network sends; never fitted on before they are judged),
    their noise ratio = twin MSE / the noise the repeats predict at their brightness
    (`labpnn.twin.metrics.expected_noise_var`; 1.0 = the floor). Above ``target``, the probe and
    ``n_rows / 2`` more rows measured near ``centres`` join the data, the twin is refitted and
    judged on a fresh probe — until it meets the target or the rows measured reach ``budget``
    (default 3 x ``n_rows``). Returns ``(twin, fit dict with "rounds", "operating_noise_ratio",
    "target", "target_met", (controls, traces))``."""
    from labpnn.twin.calibrate import calibrate, near_sampler
    from labpnn.twin.fit import fit_twin
    from labpnn.twin.metrics import expected_noise_var

    budget = int(budget if budget is not None else 3 * n_rows)
    sampler = near_sampler(centres, jitter)
    cal = calibrate(system, n_rows, writer, seed=seed, sampler=sampler, sampler_fraction=near_fraction,
                    progress=progress, keep_data=True)
    controls, traces = np.asarray(cal.controls, np.float32), np.asarray(cal.traces, np.float32)
    noise = np.asarray(cal.tags) == "noise"
    rounds: list[dict[str, Any]] = []
    for k in range(1, 100):
        twin, report = fit_twin(controls, traces, noise_mask=noise, noise_var=cal.noise_var, max_seconds=twin_seconds,
                                seed=seed + k - 1, core=twin_core, progress=progress)
        probe = calibrate(system, probe_rows, writer, seed=seed + 1000 * k, sampler=sampler, sampler_fraction=1.0,
                          repeats=(0, 0), progress=False, keep_data=True)
        px, py = np.asarray(probe.controls, np.float32), np.asarray(probe.traces, np.float32)
        mse = float(((twin.predict(px) - py) ** 2).mean())
        floor = (expected_noise_var(report.noise_model, py) if report.noise_model else report.noise_var) or math.nan
        ratio = mse / floor if floor > 0 else math.nan
        rounds.append({"round": k, "rows": int(len(controls)), "fit_noise_ratio": report.noise_ratio,
                       "operating_noise_ratio": ratio, "fit_seconds": report.seconds})
        log.info("twin round %d: %d rows, noise ratio %.2f on the operating region (target %.2f)",
                 k, len(controls), ratio, target)
        measured = len(controls) + len(px)
        if not ratio > target or measured >= budget:
            break
        extra = max(1, min(n_rows // 2, budget - measured))
        more = calibrate(system, extra, writer, seed=seed + 1000 * k + 1, sampler=sampler, sampler_fraction=1.0,
                         repeats=(0, 0), progress=progress, keep_data=True)
        controls = np.concatenate([controls, px, np.asarray(more.controls, np.float32)])
        traces = np.concatenate([traces, py, np.asarray(more.traces, np.float32)])
        noise = np.concatenate([noise, np.zeros(len(px) + len(more.controls), bool)])
    fit = {k: v for k, v in report.to_dict().items() if k not in ("history", "data")}
    fit.update(rounds=rounds, operating_noise_ratio=ratio, target=target, target_met=bool(ratio <= target),
               rows_measured=int(measured), budget=budget)
    return twin, fit, (controls, traces)


# -- settings and results ------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """Every knob of a run. Fields left None are chosen from the data and the bench by
    `labpnn.training.defaults.choose_defaults` (each with a reason, in the report)."""

    method: str = "pat"  #: "pat" | "insilico"
    layers: int = 1
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None  #: "constant" | "cosine" (decays to lr / 20 at the last epoch)
    clip: float | None = None  #: clip the gradient's global norm to this (None: no clipping)
    seed: int = 0
    hidden: int | None = None  #: pooled features between layers (default: the dataset's feature count)
    features: int | None = None  #: input features (fewer than the dataset's: PCA on the training split)
    repeat: int | None = None  #: control channels per input feature
    layout: str | None = None  #: first layer's channel layout (`labpnn.training.network.assign_channels`)
    hidden_layout: str | None = None  #: deeper layers' layout (default: ``layout``)
    encoding: str = "sigmoid"
    pooling: str | None = None  #: "balanced" | "equal-mass" | "equal-width" (`PhysicalNetwork.init_affine`)
    readout: str = "physical"  #: "physical" (argmax of pooled outputs) | "hybrid" (digital classifier)
    control_range: tuple[float, float] = (0.0, 1.0)
    theta_init: tuple[float, float] = (0.0, 1.0)  #: initial parameters, uniform in this fraction of the range
    target: float = 0.95  #: validation accuracy whose first crossing is reported in training passes
    #: refine the twin online from the training batches (`forwards`); None: on for PAT with 2+ physical
    #: layers when the twin can be refined (a `labpnn.twin.Twin`) — the twin is calibrated where the initial network operates, and deeper layers' inputs move
    #: away from there during training (3 layers, vowels, optical bench: 90.8 -> 93.8 %, +3.1 ± 0.5 paired, 5 seeds)
    online_twin: bool | None = None
    chunk_rows: int = 0  #: PAT pipelining: rows per chunk (0: the whole minibatch in one pass)
    in_flight: int = 2  #: chunks in flight (worker threads) when chunk_rows > 0
    calibration_rows: int | None = None  #: the first calibration sweep
    calibration_budget: int | None = None  #: the most calibration rows measured to reach ``twin_target``
    twin_target: float | None = None  #: noise ratio on the operating region the twin is refitted toward
    twin_seconds: float | None = None
    twin_core: str | None = None  #: `labpnn.twin.model.CORES`: "residual_mlp" | "modulus"
    eval_batch: int = 256
    max_train_passes: int | None = None  #: stop after the epoch that crosses this budget
    recalibration_rows: int = 128  #: rows measured near the operating point after a drift alarm
    #: keep the physical parameters (theta) at their random start: only the element-wise affine maps
    #: train — the baseline that shows what training the physics adds
    freeze_physical: bool = False
    #: drift probes (with ``online_twin``; `labpnn.training.drift`): this many rows of the first training
    #: batch, re-measured after every ``drift_probe_every``-th training batch (passes of kind "probe");
    #: a drift alarm (and a recalibration) when they differ from their reference by more than
    #: ``drift_threshold`` x the repeat noise. 0 rows: no probes, no drift alarms.
    drift_probe_rows: int = 4
    drift_probe_every: int = 4
    drift_threshold: float = 3.0


def resolve_settings(settings: TrainSettings, describe: dict[str, Any], ds: Dataset):
    """``(settings with every None field chosen, the Defaults)`` for ``ds`` on a system that
    ``describe``s itself (`labpnn.training.defaults.choose_defaults`; explicit fields win)."""
    from labpnn.training.defaults import CHOSEN, choose_defaults

    given = {k: getattr(settings, k) for k in CHOSEN if getattr(settings, k, None) is not None}
    chosen = choose_defaults(describe, n_features=ds.n_features, n_classes=ds.n_classes,
                             n_train=len(ds.y_train), overrides=given)
    values = chosen.values()
    return replace(settings, **{k: values[k] for k in CHOSEN}), chosen


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
    #: every setting chosen from the data and the bench: {name: {value, reason, source}}
    defaults: dict[str, Any] | None = None
    #: where the readout bins went and how often each class wins at the start (through the twin)
    readout_placement: dict[str, Any] | None = None
    recall: list[float] | None = None  #: per class, on the test split, on the physics
    #: data-parallel: one entry per rig (rank, address, test accuracy on that rig's physics, passes,
    #: session, the parameters' hash after every step); ``test_accuracy`` is then the worst rig's
    rigs: list[dict[str, Any]] | None = None

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("network", "history")}
        d["network"] = self.network.name
        return d


def make_network(n_controls: int, n_outputs: int, ds: Dataset, settings: TrainSettings) -> PhysicalNetwork:
    """The network `train` uses (before its data-informed initialisation). On a system with few
    channels the repeat count is lowered so that at least a quarter of the channels stay free for
    parameters, and a layout span that cannot hold the inputs is widened to the whole band.
    Settings left None are chosen (`resolve_settings`); a dataset with more features than
    chosen must be reduced first (`labpnn.training.datasets.reduce_features`, as `train` does)."""
    settings, _ = resolve_settings(settings, {"n_controls": n_controls, "n_outputs": n_outputs}, ds)
    if settings.features < ds.n_features:
        raise ValueError(f"{ds.n_features} features do not fit {n_controls} channels: reduce them to "
                         f"{settings.features} first (labpnn.training.datasets.reduce_features)")
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
    settings, _ = resolve_settings(settings, d, ds)
    ds = reduce_features(ds, settings.features)
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


#: methods that need no twin: the same trainer runs them (sessions, pass counting, selection on the
#: validation split, one test on the physics, the report) through `labpnn.training.methods`
MODEL_FREE = ("phyll", "phyll-paper", "spsa", "reservoir", "reservoir-ridge")


def make_model_free(name: str, settings: TrainSettings):
    """The `labpnn.training.methods.Method` for ``name``, with its shipped preset."""
    if name in ("phyll", "phyll-paper"):
        from labpnn.training.phyll import PhyLL, phyll_preset

        return PhyLL(phyll_preset("paper" if name == "phyll-paper" else "default", seed=settings.seed))
    if name == "spsa":
        from labpnn.training.spsa import SPSA

        return SPSA(layers=settings.layers, seed=settings.seed)
    from labpnn.training.reservoir import Reservoir

    return Reservoir(readout="ridge" if name == "reservoir-ridge" else "elementwise", seed=settings.seed)


def _train_model_free(system: PhysicalSystem, ds: Dataset, settings: TrainSettings, *, session, report_dir):
    """`train` for a method that needs no twin (`MODEL_FREE`)."""
    from labpnn.training.methods import train_method
    from labpnn.training.report import write_report

    epochs = settings.epochs or 30
    with _Run(system, ds, settings, session=session) as run:
        method = make_model_free(settings.method, settings)
        run.event("method", f"{settings.method}: a {method.kind} method, no twin")
        test_acc, _, history = train_method(run.counter, ds, method, epochs, seed=settings.seed, counter=run.counter,
                                            log=log.info)
        selected = history[-1]
        rows = [h for h in history if "val_acc" in h and not h.get("selected")]
        to_target = next((h["passes"]["train"] for h in rows if h["val_acc"] >= settings.target), None)
        with torch.no_grad(), run.counter.counting("test"):  # predictions for the confusion matrix
            pred = np.asarray(method.logits(run.counter, ds.X_test)).argmax(1)
        result = TrainResult(
            network=_Named(f"{method.name} ({method.kind})"), test_accuracy=float(test_acc),
            val_accuracy=float(selected["val_acc"]), best_epoch=int(selected["epoch"]),
            passes=dict(run.counter.passes), passes_to_target=to_target,
            history=[{"epoch": h["epoch"], "train_loss": h.get("train_loss", math.nan),
                      "train_acc": h.get("train_acc", math.nan), "val_acc": h["val_acc"],
                      "val_loss": h.get("val_loss", math.nan), "train_passes": h["passes"]["train"],
                      "eval_passes": h["passes"]["validation"], "seconds": h["seconds"]} for h in rows],
            settings={**jsonable(asdict(settings)), "epochs": epochs, "kind": method.kind},
            dataset=ds.summary(), confusion=confusion_matrix(ds.y_test, pred, ds.n_classes).tolist(),
            digital_baseline=logistic_baseline(ds), report_dir=str(report_dir) if report_dir is not None else None,
            session=str(session) if session is not None else None, seconds=time.perf_counter() - run.started,
            events=run.events)
        run.event("test", f"test accuracy on the physics {test_acc:.4f} ({settings.method}, {method.kind})",
                  accuracy=test_acc, passes=dict(run.counter.passes))
        if report_dir is not None:
            write_report(result, report_dir, class_names=ds.class_names,
                         provenance_seeds={"train": settings.seed, "split": ds.seed})
        return result


class _Named:
    """What a report needs of a model that is not a `PhysicalNetwork`: its name."""

    def __init__(self, name: str):
        self.name = name


# -- the training loop --------------------------------------------------------------------------------
def train(system: PhysicalSystem, dataset: Dataset | str | Path = "vowels", *, method: str = "pat",
          twin=None, layers: int = 1, epochs: int | None = None, seed: int = 0, session: str | Path | None = None,
          report_dir: str | Path | None = None, online_twin: bool | None = None, checkpoint: str | Path | None = None,
          resume: str | Path | None = None, progress: bool = True, calibration=None,
          announce: Callable[[str], None] | None = None, parallel: Solo | None = None, **options: Any) -> TrainResult:
    """Train a ``layers``-deep physical network on ``system`` (see the module docstring).

    ``twin``: a `labpnn.twin.Twin` (or a path to one); None calibrates and fits one (with
    ``resume``: the twin saved next to the checkpoint). ``calibration``: ``(controls, traces)``
    the twin was fitted on, replayed by the online twin fitter.
    ``options``: any `TrainSettings` field (batch_size, lr, hidden, repeat, readout, target,
    chunk_rows, in_flight, calibration_rows, twin_seconds, ...); those left None are chosen from the
    data and the bench (`labpnn.training.defaults`), and ``announce`` (e.g. ``print``) gets one
    line per choice with its reason before anything is measured.

    ``parallel``: a `labpnn.training.parallel.DataParallel` when this process is one rank of a
    data-parallel run over several rigs (``system`` is this rank's rig); the default trains alone.
    A rig that fails mid-run stops the run on every rank with `RunStopped`, after a checkpoint
    (when ``checkpoint`` is given) from which ``resume`` continues, mid-epoch, on the rigs left."""
    parallel = parallel or Solo()
    settings = TrainSettings(method=method, layers=layers, epochs=epochs, seed=seed, online_twin=online_twin,
                             **options)
    if settings.method not in ("pat", "insilico", *MODEL_FREE):
        raise ValueError(f"unknown method {settings.method!r} (have: pat, insilico, {', '.join(MODEL_FREE)})")
    full = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, seed=seed)
    if settings.method in MODEL_FREE:
        if parallel.distributed:
            raise ValueError(f"{settings.method} does not run data-parallel (pat and insilico do)")
        return _train_model_free(system, full, settings, session=session, report_dir=report_dir)
    settings, chosen = resolve_settings(settings, system.describe(), full)
    ds = reduce_features(full, settings.features)
    for line in chosen.lines():
        log.info("setting %s", line)
        if announce is not None:
            announce(line)
    torch.manual_seed(seed)
    with _Run(system, ds, settings, session=session, full=full, chosen=chosen, parallel=parallel) as run:
        net = make_network(int(run.describe["n_controls"]), int(run.describe["n_outputs"]), ds, settings)
        failed = None
        try:
            twin, calibration = run.twin(twin, net, resume=resume, calibration=calibration, progress=progress)
        except Exception as exc:
            if not parallel.distributed:
                raise
            log.exception("rank %d: calibrating the rig failed", parallel.rank)
            failed = exc
        if ranks := parallel.failed_ranks(failed is not None):  # nothing trained yet: stop, nothing to keep
            raise RunStopped(_failure_message(ranks, parallel, failed, "calibration"), failed=ranks) from failed
        if settings.online_twin is None:  # the default: on for deep PAT, if the twin can be refined online
            settings = run.settings = replace(settings, online_twin=settings.method == "pat" and settings.layers > 1
                                              and hasattr(twin, "snapshot"))
        net.init_affine(run.X, TwinForward(twin), repool=settings.pooling)
        parallel.broadcast_(list(net.state_dict().values()))  # every rank starts from rank 0's network
        if net.placement is not None:
            run.placement = net.placement
            shares = net.placement["shares"]
            run.event("readout", ("readout bins re-placed" if net.placement["replaced"] else "readout bins of equal mass")
                      + f": the rarest class wins {min(shares):.3f} of the training rows through the twin "
                      f"(fair share {1 / len(shares):.3f})", **net.placement)
        if settings.freeze_physical:
            for layer in net.layers:
                layer.theta.requires_grad_(False)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=settings.lr)
        state = _State.start(net, seed, run.counter) if resume is None else _State.resume(resume, net, opt, run)
        with run.forwards(twin, calibration) as (train_forward, pool):
            bar = run.bar(settings.epochs - state.epoch, progress)
            try:
                for epoch in range(state.epoch + 1, settings.epochs + 1):
                    loss, acc = _epoch(net, opt, run, train_forward, pool, state, epoch)
                    run.handle_alarms(net)
                    val_acc, val_loss = run.validate(net)
                    state.record(net, epoch, loss, acc, val_acc, val_loss, run, bar)
                    if checkpoint is not None:
                        run.checkpoint(checkpoint, net, opt, state, twin)
                    if (settings.max_train_passes is not None
                            and run.counter.passes["train"] >= settings.max_train_passes):
                        run.event("budget", f"stopped after epoch {epoch}: {run.counter.passes['train']} training passes")
                        break
            except RunStopped as stop:
                if checkpoint is not None:
                    run.checkpoint(checkpoint, net, opt, state, twin, stopped_by=stop.failed)
                    stop.checkpoint = str(checkpoint)
                run.event("stopped", f"{stop} (after {state.step} step(s) of epoch {state.epoch + 1}"
                          + (f"; checkpoint {checkpoint})" if checkpoint is not None else ")"), failed=stop.failed)
                if -1 not in stop.failed:  # every rank alive: leave together, each with its checkpoint written
                    with contextlib.suppress(RunStopped):
                        run.parallel.barrier()
                raise
        return run.finish(net, state, report_dir=report_dir)


def _epoch(net, opt, run: _Run, forward, pool, state: _State, epoch: int) -> tuple[float, float]:
    """One pass over the training set in minibatches; returns (mean loss, accuracy). Books the
    rig's busy time and the wall time in ``state.duty``. Data-parallel, every rank draws the same
    permutation and measures its share of each minibatch (`labpnn.training.parallel`); a resumed
    epoch skips the ``state.step`` minibatches done before the stop."""
    settings, parallel = run.settings, run.parallel
    if settings.lr_schedule == "cosine":
        frac = (epoch - 1) / max(1, settings.epochs - 1)
        for group in opt.param_groups:
            group["lr"] = settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
    state.epoch_gen = state.gen.get_state()  # a checkpoint mid-epoch redraws this epoch's permutation
    perm = torch.randperm(len(run.X), generator=state.gen)
    params = [p for p in net.parameters() if p.requires_grad]
    loss_sum = correct_sum = 0.0
    busy0, busy_meas0 = server_busy(run.counter), run.counter.busy_s["train"]
    started = time.perf_counter()
    with run.counter.counting("train"):
        for step, i in enumerate(range(0, len(perm), settings.batch_size)):
            if step < state.step:
                continue
            idx = perm[i:i + settings.batch_size]
            mine, failed = parallel.split(idx), None
            try:
                loss, correct, grads = _step_gradients(net, params, run.X, run.y, mine, forward, settings.chunk_rows,
                                                       pool, n_total=len(idx))
            except Exception as exc:  # noqa: BLE001 — a failed rig stops every rank cleanly, whatever it raised
                log.exception("rank %d: the rig failed in step %d of epoch %d", parallel.rank, step, epoch)
                failed = exc
                loss, correct, grads = 0.0, 0.0, [torch.zeros_like(p) for p in params]
            grads, loss, correct, ranks = parallel.reduce_step(grads, loss, correct, failed is not None)
            if ranks:
                raise RunStopped(_failure_message(ranks, parallel, failed, f"step {step} of epoch {epoch}"),
                                 failed=ranks) from failed
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            if settings.clip:
                nn.utils.clip_grad_norm_(params, settings.clip)
            opt.step()
            net.project_()
            state.step = step + 1
            if parallel.distributed:
                run.digests.append(parameter_digest(params))
            loss_sum += loss
            correct_sum += correct
    state.step = 0
    busy1 = server_busy(run.counter)
    state.duty["wall_s"] += time.perf_counter() - started
    state.duty["busy_s"] += (busy1 - busy0 if busy0 is not None and busy1 is not None
                             else run.counter.busy_s["train"] - busy_meas0)
    return loss_sum / len(perm), correct_sum / len(perm)


class _Seen:
    """The physics forward, keeping what it measured: the controls sent and the traces back."""

    def __init__(self, physics):
        self.physics, self.controls, self.traces = physics, [], []

    def __call__(self, controls: torch.Tensor) -> torch.Tensor:
        traces = self.physics(controls)
        self.controls.append(controls.detach())
        self.traces.append(traces.detach())
        return traces

    @torch.no_grad()
    def operating_point(self, twin, control_range) -> dict[str, float]:
        """Where the network operates, measured on the rows seen (every layer's): ``controls_at_edges``,
        the share of controls within 1 % of the ends of the control range (saturated encodings, or
        parameters pushed to a limit), and ``twin_error``, the twin's RMS error on those traces
        relative to their RMS (no physical pass: the traces are the ones just measured). A twin
        error that grows during training while the validation accuracy stalls says training has
        carried the network where its twin no longer knows the physics."""
        if not self.controls:
            return {}
        c, t = torch.cat(self.controls), torch.cat(self.traces)
        lo, hi = control_range
        margin = 0.01 * (hi - lo)
        out = {"controls_at_edges": float(((c <= lo + margin) | (c >= hi - margin)).float().mean())}
        if twin is not None:
            err = (twin(c).to(t) - t).pow(2).mean().sqrt() / t.pow(2).mean().sqrt().clamp_min(1e-30)
            out["twin_error"] = float(err)
        return out


def _failure_message(ranks: list[int], parallel: Solo, failed: BaseException | None, where: str) -> str:
    if failed is not None:
        return f"rig of rank {parallel.rank} failed in {where}: {type(failed).__name__}: {failed}"
    return f"rig of rank(s) {', '.join(map(str, ranks))} failed in {where}: stopping with them"


@dataclass
class _State:
    """What an epoch leaves behind, and what a checkpoint keeps: history, the best model so far
    (highest validation accuracy, then lowest validation loss), the passes to the target, the
    shuffling generator, the duty-cycle sums and the last epoch done."""

    history: list[dict[str, float]]
    best: dict[str, Any]
    passes_to_target: int | None
    gen: torch.Generator
    duty: dict[str, Any]
    epoch: int = 0  #: the last epoch completed
    step: int = 0  #: minibatches of epoch ``epoch + 1`` done (a run stopped mid-epoch)
    epoch_gen: torch.Tensor | None = None  #: the generator's state before that epoch's permutation

    @classmethod
    def start(cls, net: PhysicalNetwork, seed: int, counter: PassCounter) -> _State:
        return cls([], {"acc": -1.0, "loss": math.inf, "epoch": 0, "state": copy.deepcopy(net.state_dict())}, None,
                   torch.Generator().manual_seed(seed),
                   {"busy_s": 0.0, "wall_s": 0.0,
                    "source": "server" if server_busy(counter) is not None else "measurements"})

    @classmethod
    def resume(cls, path: str | Path, net: PhysicalNetwork, opt, run: _Run) -> _State:
        ck = load_checkpoint(path)
        net.load_state_dict(ck["network"])
        opt.load_state_dict(ck["optimizer"])
        state = cls.start(net, run.settings.seed, run.counter)
        state.history, state.best, state.passes_to_target = ck["history"], ck["best"], ck["passes_to_target"]
        state.epoch, state.step = int(ck["epoch"]), int(ck.get("step", 0))
        state.gen.set_state(ck["generator"])
        for kind, n in ck["passes"].items():
            run.counter.passes[kind] = run.counter.passes.get(kind, 0) + int(n)
        state.duty = ck.get("duty", state.duty)
        run.event("resume", f"resumed from {path} after epoch {state.epoch}"
                  + (f" and {state.step} step(s) of the next" if state.step else ""))
        return state

    def record(self, net, epoch, loss, acc, val_acc, val_loss, run: _Run, bar) -> None:
        passes = run.counter.passes
        self.epoch = epoch
        self.history.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_acc": val_acc,
                             "val_loss": val_loss, "train_passes": passes["train"],
                             "eval_passes": passes["validation"], "seconds": time.perf_counter() - run.started,
                             **run.operating})
        if self.passes_to_target is None and val_acc >= run.settings.target:
            self.passes_to_target = passes["train"]
        if val_acc > self.best["acc"] or (val_acc == self.best["acc"] and val_loss < self.best["loss"]):
            self.best = {"acc": val_acc, "loss": val_loss, "epoch": epoch, "state": copy.deepcopy(net.state_dict())}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_acc:.3f}", passes=passes["train"])


class _Run:
    """The surroundings of one training run: the session it records to, the pass counter, the
    event log, the twin (given, resumed or calibrated and fitted), the online fitter, and the end:
    model selection, the one test on the physics, the report."""

    def __init__(self, system: PhysicalSystem, ds: Dataset, settings: TrainSettings, *,
                 session: str | Path | None, full: Dataset | None = None, chosen=None, parallel: Solo | None = None):
        self.system, self.ds, self.settings, self.session = system, ds, settings, session
        self.parallel = parallel or Solo()
        self.digests: list[str] = []  #: data-parallel: the parameters' hash after every step
        self.full = full if full is not None else ds  #: the dataset before any feature reduction
        self.chosen = chosen
        self.placement: dict[str, Any] | None = None
        self.started = time.perf_counter()
        self.events: list[dict[str, Any]] = []
        self.writer = None
        self.fitter = None
        self.live_twin = None  #: the twin training steps use (`forwards`), for the operating-point figures
        self.operating: dict[str, float] = {}  #: the last validation's operating point (`_Seen.operating_point`)
        self.twin_fit: dict[str, Any] | None = None
        self.base_twin = None
        base: PhysicalSystem = system
        if session is not None:
            from labpnn.sessions import RecordingSystem, SessionWriter, provenance

            Path(session).parent.mkdir(parents=True, exist_ok=True)
            self.writer = SessionWriter(session, system.describe(),
                                        provenance={**provenance(seeds={"train": settings.seed, "split": ds.seed}),
                                                    "training": jsonable(asdict(settings)), "dataset": ds.summary()})
            base = RecordingSystem(system, self.writer, tag="train")
        # the online fitter never stalls training: a batch it has no room for is dropped (it logs that)
        self.counter = PassCounter(base, on_train=lambda m: self.fitter.feed(m.applied, m.traces, block=False)
                                   if self.fitter is not None else None)
        self.physics = PhysicsForward(self.counter)
        self.describe = self.counter.describe()
        #: which rig this is (a data-parallel run's report lists them): the server's address, else its name
        self.rig = str(getattr(system, "address", None) or self.describe.get("name", "rig"))
        self.X, self.y = torch.from_numpy(ds.X_train), torch.from_numpy(ds.y_train)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    def event(self, kind: str, message: str, **data: Any) -> None:
        self.events.append({"time": time.time(), "kind": kind, "message": message, **jsonable(data)})
        log.info("%s: %s", kind, message)
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.event(kind, message, **jsonable(data))

    def bar(self, epochs: int, enabled: bool):
        return _bar(epochs, f"train {self.settings.method}", "epoch", enabled)

    def twin(self, twin, net: PhysicalNetwork, *, resume, calibration, progress: bool):
        """The twin to train with (given, saved next to the checkpoint being resumed, or calibrated
        and fitted now), in eval mode, frozen as a snapshot; and the calibration it was fitted on."""
        if twin is None and resume is not None:  # this rig's own twin (a data-parallel run's), else the run's
            twin = next((t for t in (twin_path(resume, self.rig), twin_path(resume)) if t.exists()), None)
        if isinstance(twin, (str, Path)):
            from labpnn.twin.model import load_twin

            twin = load_twin(twin)
        if twin is None:
            cal_counter = PassCounter(self.system)  # calibrate() records into the session itself
            with cal_counter.counting("calibration"):
                st = self.settings
                twin, self.twin_fit, calibration = calibrate_to_target(
                    cal_counter, st.calibration_rows, writer=self.writer, centres=_operating_controls(net, self.X),
                    target=st.twin_target, budget=st.calibration_budget, seed=st.seed,
                    twin_seconds=st.twin_seconds, twin_core=st.twin_core, progress=progress)
            self.counter.passes["calibration"] += cal_counter.passes["calibration"]
            self.counter.busy_s["calibration"] += cal_counter.busy_s["calibration"]
            fit = self.twin_fit
            self.event("twin_fit", f"twin fitted on {len(calibration[0])} calibration rows in {len(fit['rounds'])} "
                       f"round(s): noise ratio {fit['operating_noise_ratio']:.2f} on the operating region, target "
                       f"{fit['target']:g} " + ("met" if fit["target_met"] else
                                                f"NOT met within the budget of {fit['budget']} rows"),
                       holdout_nmse=fit.get("holdout_nmse"), noise_ratio=fit.get("noise_ratio"),
                       operating_noise_ratio=fit["operating_noise_ratio"], target_met=fit["target_met"])
        twin.eval()
        self.base_twin = twin.snapshot() if hasattr(twin, "snapshot") else twin
        return self.base_twin, calibration

    @contextlib.contextmanager
    def forwards(self, twin, calibration):
        """``(training forward, chunk pool)``: PAT (physics forward, twin backward through the
        online fitter's newest twin when ``online_twin``) or the twin alone (in-silico)."""
        settings = self.settings
        live_twin: nn.Module = twin
        self.drift, on_train = None, self.counter.on_train
        if settings.online_twin and settings.method == "pat":
            from labpnn.training.drift import DriftProbe
            from labpnn.twin.online import OnlineTwinFitter

            fitter = self.fitter = OnlineTwinFitter(twin, writer=self.writer, replay=calibration, seed=settings.seed)
            live_twin = LiveTwin(self.fitter)
            self.fitter.start()
            self.event("online_twin", "online twin refinement on")
            if settings.drift_probe_rows > 0:  # the physics' drift is told by repeated rows, not by the twin's error
                every = settings.drift_probe_every
                probe = self.drift = DriftProbe(
                    self.counter, rows=settings.drift_probe_rows, every=every, threshold=settings.drift_threshold,
                    writer=self.writer, seed=settings.seed,
                    on_alarm=lambda alarm: fitter.drift(alarm, lookback_batches=every))
                self.counter.on_train = lambda m: (on_train is not None and on_train(m), probe.observe(m))
                self.event("drift_probes", f"drift probes: {settings.drift_probe_rows} rows of the first training "
                           f"batch, re-measured after every {every} training batches (threshold "
                           f"{settings.drift_threshold:g} x the repeat noise)")
        self.live_twin = live_twin
        pool = (ThreadPoolExecutor(max_workers=max(1, settings.in_flight), thread_name_prefix="pat-chunk")
                if settings.method == "pat" and settings.chunk_rows > 0 else None)
        try:
            yield (PATForward(self.counter, live_twin) if settings.method == "pat" else TwinForward(twin)), pool
        finally:
            self.counter.on_train = on_train
            if pool is not None:
                pool.shutdown()
            if self.drift is not None:
                summary = self.drift.summary()
                self.event("drift_probes", f"drift probes: {summary['probes']} probe(s), {summary['passes']} passes, "
                           f"{summary['alarms']} alarm(s), statistic median {summary['statistic_median'] or 0:.2f} "
                           f"max {summary['statistic_max'] or 0:.2f}", **summary)
            if self.fitter is not None:
                self.fitter.stop()
                self.base_twin = self.fitter.twin

    def validate(self, net: PhysicalNetwork) -> tuple[float, float]:
        """Validation accuracy and loss on the physics; data-parallel, every rank measures the whole
        validation split on its own rig and all of them keep the worst rig's figures (so every
        rank selects the same model, and the model selected is judged on its worst rig)."""
        failed = None
        acc = loss = math.nan
        seen = _Seen(self.physics)
        try:
            with self.counter.counting("validation"):
                acc, loss, _ = evaluate(net, self.ds.X_val, self.ds.y_val, seen, batch=self.settings.eval_batch)
            self.operating = seen.operating_point(self.live_twin, self.settings.control_range)
        except Exception as exc:  # noqa: BLE001 — as in a training step: stop every rank cleanly
            log.exception("rank %d: the rig failed during validation", self.parallel.rank)
            failed = exc
        worst_acc, worst_loss, ranks = self.parallel.reduce_validation(acc, loss, failed is not None)
        if ranks:
            raise RunStopped(_failure_message(ranks, self.parallel, failed, "validation"), failed=ranks) from failed
        if self.parallel.distributed:
            self.event("validation", f"rig {self.rig}: validation accuracy {acc:.4f} (worst rig {worst_acc:.4f})",
                       rig=self.rig, accuracy=acc, worst=worst_acc)
        return worst_acc, worst_loss

    def checkpoint(self, path: str | Path, net: PhysicalNetwork, opt, state: _State, twin, *,
                   stopped_by: list[int] | None = None) -> None:
        """Rank 0 writes the shared checkpoint (every rank's network and optimiser are the same);
        every rank writes its own rig's twin next to it. After a stop caused by a vanished rank,
        rank 0 may be the one gone: then every survivor writes it (the same content)."""
        parallel = self.parallel
        rig = self.rig if parallel.distributed else None
        shared = parallel.rank == 0 or -1 in (stopped_by or [])
        gen = state.gen
        if state.step:  # stopped mid-epoch: resume redraws this epoch's permutation and skips the steps done
            gen = torch.Generator()
            gen.set_state(state.epoch_gen)
        save_checkpoint(path, net, opt, state.epoch, state.history, state.best, state.passes_to_target, gen,
                        self.counter, state.duty, self.settings, self.ds, self.fitter or twin, step=state.step,
                        rig=rig, shared=shared)

    def handle_alarms(self, net: PhysicalNetwork) -> None:
        _handle_alarms(getattr(self, "drift", None), self.fitter, self.counter, net, self.X,
                       self.settings.recalibration_rows, self.event, self.settings.seed)

    def finish(self, net: PhysicalNetwork, state: _State, *, report_dir: str | Path | None) -> TrainResult:
        """Select the best-validation model, evaluate it once on the physics (and on the twin, for
        the sim-to-real gap), write the report. Data-parallel, every rank tests on its own rig and
        rank 0 writes one report of them all, judged on the worst rig."""
        from labpnn.training.report import write_report

        settings, ds, counter, parallel = self.settings, self.ds, self.counter, self.parallel
        net.load_state_dict(state.best["state"])
        first, best = (state.history[0] if state.history else {}), next(
            (h for h in state.history if h["epoch"] == state.best["epoch"]), {})
        if "twin_error" in first and "twin_error" in best:
            self.event("operating_point", f"epoch {first['epoch']} -> selected epoch {best['epoch']}: controls at "
                       f"the range's ends {first['controls_at_edges']:.0%} -> {best['controls_at_edges']:.0%}, the "
                       f"twin's error on the validation traces {first['twin_error']:.3f} -> {best['twin_error']:.3f}"
                       " (RMS, relative; it includes the repeat noise)", first=first, selected=best)
        capture = FirstMeasurement(counter)
        try:
            with counter.counting("test"):
                test_acc, _, pred = evaluate(net, ds.X_test, ds.y_test, PhysicsForward(capture),
                                             batch=settings.eval_batch)
            error = None
        except Exception as exc:
            if not parallel.distributed:
                raise
            log.exception("rank %d: the rig failed during the test", parallel.rank)  # the others' tests still count
            test_acc, pred, error = math.nan, np.full(len(ds.y_test), -1), f"{type(exc).__name__}: {exc}"
        twin_acc, _, _ = evaluate(net, ds.X_test, ds.y_test, TwinForward(self.base_twin), batch=settings.eval_batch)
        cm = confusion_matrix(ds.y_test, np.where(pred < 0, 0, pred), ds.n_classes)
        rigs = None
        if parallel.distributed:
            rigs = parallel.gather({"rank": parallel.rank, "rig": self.rig, "test_accuracy": test_acc,
                                    "twin_test_accuracy": twin_acc, "passes": dict(counter.passes),
                                    "recall": [float(v) for v in cm.diagonal() / np.maximum(cm.sum(1), 1)],
                                    "session": str(self.session) if self.session is not None else None,
                                    "twin_fit": (self.twin_fit or {}).get("operating_noise_ratio"),
                                    "error": error, "digests": self.digests})
            measured = [r["test_accuracy"] for r in rigs if r["error"] is None]
            test_acc = min(measured) if measured else math.nan  # judged on the worst rig
        baseline = logistic_baseline(self.full)  # on the dataset's own features, before any reduction
        if ds.reduction:
            baseline["test_on_reduced_features"] = logistic_baseline(ds)["test"]
        duty = state.duty
        result = TrainResult(
            network=net, test_accuracy=test_acc, val_accuracy=float(state.best["acc"]),
            best_epoch=int(state.best["epoch"]), passes_to_target=state.passes_to_target,
            passes=dict(counter.passes) if rigs is None else {k: sum(r["passes"].get(k, 0) for r in rigs)
                                                              for k in counter.passes},
            history=state.history, settings=jsonable(asdict(settings)), dataset=ds.summary(),
            confusion=cm.tolist(), twin_test_accuracy=twin_acc,
            digital_baseline=baseline, defaults=self.chosen.to_dict() if self.chosen is not None else None,
            readout_placement=self.placement,
            recall=[float(v) for v in cm.diagonal() / np.maximum(cm.sum(1), 1)],
            duty_cycle=({**duty, "duty_cycle": duty["busy_s"] / duty["wall_s"] if duty["wall_s"] else None}
                        if settings.method == "pat" else None),
            report_dir=str(report_dir) if report_dir is not None else None,
            session=str(self.session) if self.session is not None else None,
            seconds=time.perf_counter() - self.started, twin_fit=self.twin_fit, events=self.events, rigs=rigs)
        self.event("test", f"test accuracy on the physics {test_acc:.4f} ({settings.method}, {settings.layers} layer(s)"
                   + (f", worst of {len(rigs)} rigs" if rigs else "") + ")",
                   accuracy=test_acc, passes=dict(counter.passes))
        if report_dir is not None and parallel.rank == 0:
            write_report(result, report_dir, traces=capture.first, twin=self.base_twin, class_names=ds.class_names,
                         provenance_seeds={"train": settings.seed, "split": ds.seed},
                         axis=counter.describe().get("axis"))
        return result


def _step_gradients(net, params, X, y, idx, through, chunk_rows, pool, *, n_total: int | None = None):
    """One minibatch: (sum of losses, number correct, gradient of the loss summed over ``idx`` /
    ``n_total``: the mean loss's when ``idx`` is the whole minibatch, this rank's part of it when
    data-parallel). With ``pool`` the minibatch runs as chunks in parallel; gradients are summed in
    chunk order."""
    n = n_total or len(idx)
    if len(idx) == 0:  # a data-parallel rank with no row of a short last minibatch
        return 0.0, 0.0, [torch.zeros_like(p) for p in params]
    if pool is None or chunk_rows <= 0 or chunk_rows >= len(idx):
        return _chunk(net, params, X, y, idx, through, n)
    futures = [pool.submit(_chunk, net, params, X, y, idx[i:i + chunk_rows], through, n)
               for i in range(0, len(idx), chunk_rows)]
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


def _handle_alarms(drift, fitter, counter: PassCounter, net, X, rows: int, event, seed: int) -> None:
    """React to the drift probes' alarms (``drift.alarms``: the physics changed; the online fitter
    was told at once and adapts): log them and measure a small recalibration batch around the
    current operating point (tag ``calibration``), fed to the fitter. The twin's own error never
    raises an alarm (it rises just as much where training extrapolates)."""
    alarms = getattr(drift, "alarms", None) if drift is not None else None
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
    if fitter is not None:
        fitter.feed(m.applied, m.traces)
