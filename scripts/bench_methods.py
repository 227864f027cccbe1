"""Every training method on every simulated bench, one table: vowels, the same seeded splits for all.

Benches (optical, acoustic, microwave; a bench that cannot be started reads "not built") x methods x
physical depth (1, 2, 3). For each bench and split (``load_dataset("vowels", seed=split)``: the
seeded 60/20/20 split; the test split has 52 samples, one sample is 1.9 points) one simulated rig is
started and every method runs on it in turn:

- ``insilico`` and ``pat`` (physical): `labpnn.training.trainer.train` with the trainer's own
  defaults (`labpnn.training.defaults`), sharing **one** calibration sweep and twin per bench and
  split (`calibrate_to_target`, steered toward the controls of the deepest network asked for); its
  passes (and wall time) are counted in the totals of both;
- ``phyll`` (hybrid; ``phyll_preset("default")``), ``phyll-paper`` (hybrid, optional) and its two
  ablations ``phyll-zeros`` (physics -> zeros) and ``phyll-digital`` (an equal-size digital
  network), both digital; ``phyll-noskip`` (hybrid: the same without the skip path, so the input
  reaches the classifier through the physics only — the layout in which the physics is necessary)
  and its ``phyll-noskip-zeros`` ablation (at chance by construction); ``spsa`` (physical,
  `SPSASettings` defaults);
- the depth-free baselines: ``reservoir`` (physical: the element-wise readout a physical network
  has), ``reservoir-ridge`` (hybrid) and ``logistic`` (digital).

Depth is PAT's and in-silico's ``layers``, SPSA's network ``layers`` and PhyLL's ``blocks``.

Reported per bench, method and depth: test accuracy on the physics (mean +- s.e. over the splits);
the paired difference to PAT at the same depth (depth-free rows: to PAT at depth 1) and, for PhyLL,
to its physics -> zeros ablation (mean +- s.e. of the per-split differences); physical passes
(calibration + setup + training; validation excluded) at the first validation accuracy >= 90 % and
>= 95 % (median over the splits that got there, and how many did); all physical passes; wall time.
Every method runs its shipped preset, printed with the table. Epochs are per-method budgets
(`EPOCHS`, printed); ``--epochs N`` gives every trained method N, ``--epoch-scale f`` cuts every
trained method's budget by the same factor (the reservoir's and logistic's epochs make no training
pass and are not cut). Under the table, the issue's goals, each judged by its (paired) mean +- 2 s.e.:
met, MISSED, or undecided at this number of splits. ``--order depths`` (default) runs every split at
one depth before the next depth, so a table stopped early has all its splits at the shallow depths
and ``--resume`` adds the deeper ones later.

Writes to ``--out``: ``runs_<bench>.jsonl`` (one line per run, histories included; ``--resume`` skips
the runs already there), ``table.md``, ``table.txt``, ``table_compact.md`` (a row per method and depth,
a column per bench), ``accuracy_vs_passes.png``.

    python scripts/bench_methods.py --quick                   # smoke run: 1 bench, 1 split, depth 1
    python scripts/bench_methods.py --benches optical acoustic microwave --splits 3 --epochs 4 --jobs 3
    python scripts/bench_methods.py --table-only --out runs/bench_methods      # redraw from runs.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCHES = ("optical", "acoustic", "microwave")
#: method -> kind, depth-free
METHODS: dict[str, tuple[str, bool]] = {
    "insilico": ("physical", False), "pat": ("physical", False), "phyll": ("hybrid", False),
    "phyll-paper": ("hybrid", False), "spsa": ("physical", False), "phyll-zeros": ("digital", False),
    "phyll-digital": ("digital", False), "phyll-noskip": ("hybrid", False), "phyll-noskip-zeros": ("digital", False),
    "reservoir": ("physical", True), "reservoir-ridge": ("hybrid", True), "logistic": ("digital", True),
}
DEFAULT_METHODS = ("insilico", "pat", "phyll", "spsa", "phyll-zeros", "phyll-digital", "phyll-noskip",
                   "phyll-noskip-zeros", "reservoir", "reservoir-ridge", "logistic")
#: per-method epoch budgets (None: the trainer's own rule, 60 epochs on the vowels). PhyLL and its
#: ablations: PAT's 60; SPSA: its preset's planned 500 iterations at 5 minibatches of 32 per epoch;
#: the reservoirs: 5 epochs of readout fitting (no training pass); logistic: one fit.
EPOCHS: dict[str, int | None] = {"insilico": None, "pat": None, "phyll": 60, "phyll-paper": 60, "phyll-zeros": 60,
                                 "phyll-digital": 60, "phyll-noskip": 60, "phyll-noskip-zeros": 60, "spsa": 100,
                                 "reservoir": 5, "reservoir-ridge": 5, "logistic": 1}
UNSCALED = ("reservoir", "reservoir-ridge", "logistic")  #: their epochs make no physical training pass
TARGETS = (0.90, 0.95)
#: PhyLL's variants: (what replaces the physics, the skip path); skip=False makes the physics necessary
PHYLL_VARIANTS = {"phyll": ("system", True), "phyll-zeros": ("zeros", True), "phyll-digital": ("digital", True),
                  "phyll-noskip": ("system", False), "phyll-noskip-zeros": ("zeros", False)}
ABLATION = {"phyll": "phyll-zeros", "phyll-paper": "phyll-zeros", "phyll-digital": "phyll-zeros",
            "phyll-noskip": "phyll-noskip-zeros"}


# -- the runs ------------------------------------------------------------------------------------------
def resolve_epochs(args) -> dict[str, int | None]:
    epochs = dict(EPOCHS)
    if args.epoch_scale != 1.0:
        for k, v in epochs.items():
            if k not in UNSCALED:
                epochs[k] = max(1, round((60 if v is None else v) * args.epoch_scale))
    for item in args.epochs or []:
        if "=" in item:
            k, v = item.split("=", 1)
            if k not in METHODS:
                raise SystemExit(f"--epochs: unknown method {k!r} (have: {', '.join(METHODS)})")
            epochs[k] = int(v)
        else:
            for k in epochs:
                if k not in UNSCALED:
                    epochs[k] = int(item)
    return epochs


def make_method(name: str, depth: int):
    from labpnn.training.methods import LogisticMethod
    from labpnn.training.phyll import PhyLL, phyll_preset
    from labpnn.training.reservoir import Reservoir
    from labpnn.training.spsa import SPSA

    if name in PHYLL_VARIANTS:
        physics, skip = PHYLL_VARIANTS[name]
        return PhyLL(phyll_preset("default", blocks=depth, skip=skip), physics=physics)
    if name == "phyll-paper":
        return PhyLL(phyll_preset("paper", blocks=depth))
    if name == "spsa":
        return SPSA(layers=depth)
    if name == "reservoir":
        return Reservoir()
    if name == "reservoir-ridge":
        return Reservoir(readout="ridge")
    if name == "logistic":
        return LogisticMethod()
    raise ValueError(name)


def settings_of(method) -> str:
    s = getattr(method, "settings", None)
    if s is not None:
        return repr(s)
    return f"{type(method).__name__}(C={getattr(method, 'C', '?')})"


def first_crossing(points: list[tuple[int, float]], target: float) -> int | None:
    """Passes at the first (passes, val_acc) point with val_acc >= target."""
    for passes, acc in points:
        if acc >= target - 1e-12:
            return int(passes)
    return None


def curve_from_method(history: list[dict]) -> list[tuple[int, float]]:
    pts = []
    for row in history:
        if row.get("selected") or "val_acc" not in row:
            continue
        p = row["passes"]
        pts.append((int(p.get("calibration", 0) + p.get("train", 0)), float(row["val_acc"])))
    return pts


def run_trainer(rig, ds, name: str, depth: int, split: int, epochs: int | None, twin, calibration,
                cal: dict[str, Any], log) -> dict[str, Any]:
    from labpnn.training.trainer import train

    res = train(rig, ds, method="pat" if name == "pat" else "insilico", twin=twin, calibration=calibration,
                layers=depth, epochs=epochs, seed=split, progress=False)
    passes = dict(res.passes)
    passes["calibration"] = passes.get("calibration", 0) + cal["passes"]
    curve = [(cal["passes"] + int(h["train_passes"]), float(h["val_acc"])) for h in res.history]
    return {"test_acc": res.test_accuracy, "val_acc": res.val_accuracy, "best_epoch": res.best_epoch,
            "epochs": int(res.settings["epochs"]), "passes": passes, "curve": curve,
            "seconds": res.seconds + cal["seconds"], "train_seconds": res.seconds,
            "twin_test_acc": res.twin_test_accuracy,
            "settings": {k: res.settings[k] for k in ("layers", "epochs", "batch_size", "lr", "lr_schedule", "repeat",
                                                      "layout", "pooling", "readout", "encoding", "features")},
            "history": res.history}


def run_method(rig, ds, name: str, depth: int, split: int, epochs: int, val_points: int, log) -> dict[str, Any]:
    from labpnn.training.counting import PassCounter
    from labpnn.training.methods import train_method

    method = make_method(name, depth)
    counter = PassCounter(rig)
    started = time.perf_counter()
    val_every = 1 if name in UNSCALED else max(1, epochs // max(1, val_points))
    acc, passes, hist = train_method(rig, ds, method, epochs=epochs, seed=split, counter=counter,
                                     val_every=val_every, log=log)
    sel = hist[-1]
    return {"test_acc": acc, "val_acc": sel["val_acc"], "best_epoch": sel["epoch"], "epochs": epochs,
            "val_every": val_every, "passes": dict(passes), "curve": curve_from_method(hist),
            "seconds": time.perf_counter() - started, "settings": settings_of(method), "history": hist}


def shared_calibration(rig, ds, split: int, max_depth: int, args, cache: Path | None = None
                       ) -> tuple[Any, Any, dict[str, Any]]:
    """One calibration sweep and twin for PAT and in-silico on this bench and split. With ``cache``
    (a directory) they are kept there and reused, so a resumed table trains every depth of a split
    on the same twin without measuring the sweep again (its passes still count, from the info)."""
    from labpnn.training.counting import PassCounter
    from labpnn.training.trainer import (
        TrainSettings,
        calibrate_to_target,
        operating_controls,
        resolve_settings,
    )
    from labpnn.twin import load_twin, save_twin

    if cache is not None and (cache / "info.json").exists():
        data = np.load(cache / "calibration.npz")
        return (load_twin(cache / "twin.pt"), (data["controls"], data["traces"]),
                {**json.loads((cache / "info.json").read_text()), "reused": True})

    st, _ = resolve_settings(TrainSettings(layers=max_depth, seed=split), rig.describe(), ds)
    rows = args.calibration_rows or st.calibration_rows
    budget = args.calibration_budget or (st.calibration_budget if not args.calibration_rows else 3 * rows)
    twin_seconds = args.twin_seconds or st.twin_seconds
    centres = operating_controls(rig, ds, TrainSettings(layers=max_depth, seed=split))
    counter = PassCounter(rig)
    started = time.perf_counter()
    with counter.counting("calibration"):
        twin, fit, calibration = calibrate_to_target(counter, rows, centres=centres, target=st.twin_target,
                                                     budget=budget, seed=split, twin_seconds=twin_seconds,
                                                     twin_core=st.twin_core)
    info = {"passes": int(counter.passes["calibration"]), "seconds": time.perf_counter() - started,
            "rows": rows, "budget": budget, "twin_seconds": twin_seconds, "target": st.twin_target,
            "operating_noise_ratio": fit.get("operating_noise_ratio"), "target_met": fit.get("target_met"),
            "rounds": len(fit.get("rounds", []))}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        save_twin(twin, cache / "twin.pt")
        np.savez(cache / "calibration.npz", controls=calibration[0], traces=calibration[1])
        (cache / "info.json").write_text(json.dumps(info, default=_jsonable))  # last: marks the cache complete
    return twin, calibration, info


def bench_worker(bench: str, args, out: Path) -> None:
    """Every split, method and depth on ``bench``; one JSON line per run appended to ``out``."""
    torch.set_num_threads(1)
    from labpnn.benches import get_bench
    from labpnn.training.datasets import load_dataset

    epochs = resolve_epochs(args)
    done = set()
    if args.resume and out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:
                done.add((r["bench"], r["method"], r["depth"], r["split"]))
    log = (lambda s: print(f"[{bench}] {s}", flush=True)) if args.verbose else None

    def write(row: dict[str, Any]) -> None:
        with open(out, "a") as fh:
            fh.write(json.dumps(row, default=_jsonable) + "\n")

    try:
        module = get_bench(bench)
    except Exception as e:  # noqa: BLE001 - a bench that is not there reads "not built"
        write({"bench": bench, "not_built": f"{type(e).__name__}: {e}"})
        return
    depth_free = [m for m in args.methods if METHODS[m][1]]
    deep = [m for m in args.methods if not METHODS[m][1]]
    # waves: with --order depths every split is run at the first depth before any at the next, so a
    # table cut short by time has all its splits at the shallow depths (--resume fills the rest)
    waves = [[(m, None) for m in depth_free] + [(m, args.depths[0]) for m in deep]]
    waves += [[(m, d) for m in deep] for d in args.depths[1:]]
    if args.order == "splits":
        waves = [[job for wave in waves for job in wave]]
    for wave, split in ((w, s) for w in waves for s in range(args.first_split, args.first_split + args.splits)):
        ds = load_dataset("vowels", seed=split)
        jobs = [(m, d) for m, d in wave if (bench, m, d, split) not in done]
        if not jobs:
            continue
        with contextlib.ExitStack() as stack:
            try:
                rig = stack.enter_context(module.simulated_rig(seed=split))
            except Exception as e:  # noqa: BLE001
                write({"bench": bench, "not_built": f"{type(e).__name__}: {e}", "split": split})
                return
            print(f"[{bench}] split {split}: {rig.describe()['n_controls']} controls, "
                  f"{rig.describe()['n_outputs']} outputs", flush=True)
            twin = calibration = cal = None
            for name, depth in jobs:
                kind = METHODS[name][0]
                row: dict[str, Any] = {"bench": bench, "method": name, "kind": kind, "depth": depth, "split": split}
                t0 = time.perf_counter()
                try:
                    if name in ("pat", "insilico"):
                        if twin is None:
                            cache = Path(args.out) / "calibrations" / f"{bench}-split{split}-depth{max(args.depths)}"
                            twin, calibration, cal = shared_calibration(rig, ds, split, max(args.depths), args, cache)
                            print(f"[{bench}] split {split}: calibration {cal['passes']} passes, "
                                  f"{cal['seconds']:.0f} s, noise ratio {cal['operating_noise_ratio']:.2f}"
                                  + (" (reused from its cache)" if cal.get("reused") else ""),
                                  flush=True)
                        row.update(run_trainer(rig, ds, name, depth, split, epochs[name], twin, calibration, cal, log))
                        row["calibration"] = cal
                    else:
                        row.update(run_method(rig, ds, name, depth or 1, split, epochs[name], args.val_points, log))
                except Exception as e:  # noqa: BLE001 - record it, carry on with the next run
                    row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                               seconds=time.perf_counter() - t0)
                write(row)
                print(f"[{bench}] split {split} {name} depth {depth}: "
                      + (f"ERROR {row['error']}" if "error" in row else
                         f"test {row['test_acc']:.3f}, passes {sum(row['passes'].values())}, "
                         f"{row['seconds']:.0f} s"), flush=True)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


# -- the table -----------------------------------------------------------------------------------------
def mean_se(values) -> tuple[float, float, int]:
    v = np.asarray(values, float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan, len(v)


def fmt_pm(m: float, s: float, n: int, scale: float = 100.0, signed: bool = False) -> str:
    if n == 0 or math.isnan(m):
        return "–"
    sign = "+" if signed else ""
    se = "" if math.isnan(s) else f" ± {s * scale:.1f}"
    return f"{m * scale:{sign}.1f}{se} (n={n})"


def load_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for f in sorted(out.glob("runs*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                runs.append(json.loads(line))
    # a rerun (--resume after an error) replaces the earlier line of the same run
    keyed: dict[tuple, dict] = {}
    for r in runs:
        key = (r["bench"], r.get("method"), r.get("depth"), r.get("split"), "not_built" in r)
        if key not in keyed or "error" in keyed[key] or "error" not in r:
            keyed[key] = r
    return list(keyed.values())


def by_run(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The finished runs by (bench, method, depth, split)."""
    return {(r["bench"], r["method"], r["depth"], r["split"]): r for r in runs if "test_acc" in r}


def paired(by: dict[tuple, dict[str, Any]], bench: str, a: str, da, b: str, db) -> tuple[float, float, int]:
    """Mean, s.e. and n of test accuracy (a at depth da) − (b at depth db), over the splits both ran."""
    splits = sorted({k[3] for k in by if k[:3] == (bench, a, da)} & {k[3] for k in by if k[:3] == (bench, b, db)})
    return mean_se([by[(bench, a, da, s)]["test_acc"] - by[(bench, b, db, s)]["test_acc"] for s in splits])


def summarise(runs: list[dict[str, Any]], benches, methods, depths) -> list[dict[str, Any]]:
    ok = [r for r in runs if "test_acc" in r]
    by = by_run(runs)
    rows = []
    for bench in benches:
        nb = [r for r in runs if r["bench"] == bench and "not_built" in r]
        if nb and not any(r["bench"] == bench for r in ok):
            rows.append({"bench": bench, "not_built": nb[0]["not_built"]})
            continue
        for method in methods:
            kind, free = METHODS[method]
            for depth in ([None] if free else depths):
                cell = sorted((r for r in ok if (r["bench"], r["method"], r["depth"]) == (bench, method, depth)),
                              key=lambda r: r["split"])
                errors = [r for r in runs if (r["bench"], r.get("method"), r.get("depth")) == (bench, method, depth)
                          and "error" in r and (bench, method, depth, r["split"]) not in by]
                if not cell and not errors:
                    continue
                row = {"bench": bench, "method": method, "kind": kind, "depth": depth, "n": len(cell),
                       "errors": [e["error"] for e in errors],
                       "acc": mean_se([r["test_acc"] for r in cell]),
                       "passes": float(np.mean([sum(r["passes"].values()) for r in cell])) if cell else math.nan,
                       "train_passes": float(np.mean([r["passes"].get("calibration", 0) + r["passes"].get("train", 0)
                                                      for r in cell])) if cell else math.nan,
                       "seconds": float(np.mean([r["seconds"] for r in cell])) if cell else math.nan,
                       "epochs": sorted({r.get("epochs") for r in cell}, key=str)}
                ref_depth = 1 if free else depth
                refs = {"PAT": ("pat", ref_depth)}
                if method in ABLATION:
                    refs["zeros"] = (ABLATION[method], depth)
                for label, (m2, d2) in refs.items():
                    if m2 == method and d2 == depth:
                        continue
                    row[f"vs_{label}"] = paired(by, bench, method, depth, m2, d2)
                for t in TARGETS:
                    hits = [first_crossing([tuple(p) for p in r["curve"]], t) for r in cell]
                    got = [h for h in hits if h is not None]
                    row[f"to_{int(t * 100)}"] = (float(np.median(got)) if got else None, len(got), len(cell))
                rows.append(row)
    return rows


def fmt_target(v) -> str:
    med, got, n = v
    if n == 0:
        return "–"
    return f"{med:,.0f} ({got}/{n})" if med is not None else f"never (0/{n})"


def render(rows: list[dict[str, Any]]) -> tuple[str, list[list[str]]]:
    head = ["bench", "method", "kind", "depth", "epochs", "test acc % (mean ± s.e.)", "Δ vs PAT (pts)",
            "Δ vs physics→zeros (pts)", "passes to 90 % val", "passes to 95 % val", "physical passes (all)",
            "wall s"]
    body = []
    for r in rows:
        if "not_built" in r:
            body.append([r["bench"], "not built", "", "", "", "", "", "", "", "", "", ""])
            continue
        err = f" [{len(r['errors'])} failed]" if r["errors"] else ""
        body.append([r["bench"], r["method"] + err, r["kind"], "–" if r["depth"] is None else str(r["depth"]),
                     "/".join(str(e) for e in r["epochs"]),
                     fmt_pm(*r["acc"]),
                     fmt_pm(*r["vs_PAT"], signed=True) if "vs_PAT" in r else "",
                     fmt_pm(*r["vs_zeros"], signed=True) if "vs_zeros" in r else "",
                     fmt_target(r["to_90"]), fmt_target(r["to_95"]),
                     f"{r['passes']:,.0f}" if r["n"] else "–", f"{r['seconds']:.0f}" if r["n"] else "–"])
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    md += "".join("| " + " | ".join(b) + " |\n" for b in body)
    return md, [head, *body]


def compact(rows: list[dict[str, Any]], benches) -> str:
    """One line per method and depth, one column per bench: test accuracy (and physical passes)."""
    keys = []
    for r in rows:
        if "not_built" not in r and (r["method"], r["depth"]) not in keys:
            keys.append((r["method"], r["depth"]))
    cell = {(r["bench"], r["method"], r["depth"]): r for r in rows if "not_built" not in r}
    head = ["method", "kind", "depth", *(f"{b}: test % (passes)" for b in benches)]
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    for method, depth in sorted(keys, key=lambda k: (k[1] is None, k[1] or 0)):
        line = [method, METHODS[method][0], "–" if depth is None else str(depth)]
        for b in benches:
            r = cell.get((b, method, depth))
            if r is None or not r["n"]:
                line.append("–")
            else:
                m, se, n = r["acc"]
                acc = f"{100 * m:.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}") + f" (n={n})"
                line.append(acc + (f" ({r['passes']:,.0f})" if r["passes"] else ""))
        md += "| " + " | ".join(line) + " |\n"
    return md


def text_table(cells: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def presets_text(args, epochs: dict[str, int | None], runs: list[dict[str, Any]]) -> str:
    from labpnn.training.phyll import phyll_preset
    from labpnn.training.reservoir import ReservoirSettings
    from labpnn.training.spsa import SPSASettings

    lines = ["Presets (shipped; nothing tuned per cell):",
             f"- PhyLL (phyll, phyll-zeros, phyll-digital; blocks = depth): {phyll_preset('default')}",
             f"- PhyLL paper preset (phyll-paper): {phyll_preset('paper')}",
             "- PhyLL without the skip path (phyll-noskip, phyll-noskip-zeros): the default preset with skip=False",
             f"- SPSA (layers = depth): {SPSASettings()}",
             f"- reservoirs: {ReservoirSettings()} (reservoir-ridge: readout='ridge')",
             "- logistic: scikit-learn LogisticRegression(C=1.0) on the same features",
             "- PAT / in-silico: the trainer's defaults (labpnn.training.defaults); per run:"]
    seen = set()
    for r in runs:
        if r.get("method") in ("pat", "insilico") and "settings" in r:
            s = json.dumps(r["settings"], sort_keys=True)
            if (r["bench"], s) not in seen:
                seen.add((r["bench"], s))
                lines.append(f"  - {r['bench']} (pat and insilico): {s}")
    cals = {}
    for r in runs:
        if "calibration" in r:
            cals.setdefault(r["bench"], []).append(r["calibration"])
    for bench, cs in cals.items():
        c = cs[0]
        ratios = sorted({round(x["operating_noise_ratio"], 2) for x in cs if x.get("operating_noise_ratio")})
        lines.append(f"  - {bench} shared calibration: first sweep {c['rows']} rows, budget {c['budget']}, "
                     f"twin {c['twin_seconds']} s per round, target noise ratio {c['target']}; "
                     f"~{np.mean([x['passes'] for x in cs]):,.0f} passes; reached noise ratios {ratios}")
    lines.append("Epochs per method (None: the trainer's rule): "
                 + ", ".join(f"{k}={v}" for k, v in epochs.items() if k in args.methods))
    lines.append(f"Validation for the Method runs every max(1, epochs // {args.val_points}) epochs; PAT and "
                 "in-silico every epoch (the trainer).")
    return "\n".join(lines) + "\n"


NOTES = """Notes: test accuracy is on the physics (digital rows: no physics), over the same seeded splits
(vowels, 52 test samples: one sample = 1.9 points). Δ: mean ± s.e. of the per-split paired
differences (points) to PAT at the same depth (depth-free rows: PAT at depth 1) and, for the
PhyLL rows, to the physics→zeros ablation at the same depth. Passes to 90/95 % val: physical
passes (calibration + setup + training; validation passes not included) at the first validation
accuracy at or above the target, median over the splits that reached it (k/n reached). Physical
passes (all) and wall s: mean per run, calibration (shared by PAT and in-silico on a bench and
split) counted in both. Kinds: physical (only element-wise digital maps around the physics),
hybrid (a digital matrix or classifier shares the work), digital (no physics).
"""


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in dict.fromkeys(r["bench"] for r in rows if "not_built" not in r)]
    if not benches:
        return
    fig, axes = plt.subplots(1, len(benches), figsize=(6.5 * len(benches), 4.8), squeeze=False)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    styles = {None: "-", 1: "-", 2: "--", 3: ":"}
    for ax, bench in zip(axes[0], benches):
        for r in rows:
            if r.get("bench") != bench or "not_built" in r or not r["n"]:
                continue
            label = r["method"] + ("" if r["depth"] is None else f" d{r['depth']}")
            cell = [x for x in runs if (x["bench"], x.get("method"), x.get("depth")) == (bench, r["method"], r["depth"])
                    and "curve" in x]
            if r["kind"] == "digital":
                ax.axhline(100 * r["acc"][0], color=colours[r["method"]], ls="-.", lw=1,
                           label=f"{label} (digital, test)")
                continue
            n = min(len(x["curve"]) for x in cell)
            if n == 0:
                continue
            xs = np.mean([[p[0] for p in x["curve"][:n]] for x in cell], 0)
            ys = 100 * np.mean([[p[1] for p in x["curve"][:n]] for x in cell], 0)
            ax.plot(np.maximum(xs, 1), ys, styles.get(r["depth"], "-"), marker="o", ms=3,
                    color=colours[r["method"]], label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("physical passes (calibration + training)")
        ax.set_ylabel("validation accuracy % (mean over splits)")
        ax.set_title(f"{bench}, vowels")
        ax.axhline(90, color="grey", lw=0.5)
        ax.axhline(95, color="grey", lw=0.5)
        ax.set_ylim(0, 102)
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: which reservoir floor a trained method must beat: the physical one (element-wise readout) for
#: physical methods, the ridge readout for hybrid ones
FLOOR = {"pat": "reservoir", "insilico": "reservoir", "spsa": "reservoir", "phyll": "reservoir-ridge",
         "phyll-paper": "reservoir-ridge", "phyll-noskip": "reservoir-ridge"}


def verdict(m: float, se: float, n: int, target: float) -> str:
    """An interval's verdict against ``target``: met when mean - 2 s.e. reaches it, missed when mean
    + 2 s.e. stays below, else undecided at this n."""
    if n == 0 or math.isnan(m):
        return "not measured"
    if n < 2 or math.isnan(se):
        return ("met" if m >= target else "missed") + f" (n={n}: no s.e.)"
    if m - 2 * se >= target:
        return "met"
    if m + 2 * se < target:
        return "MISSED"
    return "undecided (within 2 s.e.)"


def judge_goals(runs: list[dict[str, Any]], depths) -> list[str]:
    """The issue's goals, each judged by its (paired) mean ± 2 s.e. over the splits run."""
    ok = [r for r in runs if "test_acc" in r]
    by = by_run(runs)

    def acc(bench, method, depth):
        return mean_se([r["test_acc"] for r in ok if (r["bench"], r["method"], r["depth"]) == (bench, method, depth)])

    def passes(bench, method, depth):
        cell = [sum(r["passes"].values()) for r in ok if (r["bench"], r["method"], r["depth"]) == (bench, method, depth)]
        return f"{np.mean(cell):,.0f}" if cell else "–"

    lines = ["Goals (each judged by its mean ± 2 s.e. over the splits run; paired where two methods are compared):"]
    for bench, target in (("optical", 0.95), ("acoustic", 0.93), ("microwave", 0.93)):
        for d in depths:
            m, se, n = acc(bench, "pat", d)
            lines.append(f"- PAT ≥ {target:.0%} on the {bench} bench at depth {d}: {fmt_pm(m, se, n)} -> "
                         f"{verdict(m, se, n, target)}")
    for bench in ("acoustic", "microwave"):
        for d in depths:
            m, se, n = paired(by, bench, "phyll", d, "pat", d)
            lines.append(f"- PhyLL within 3 points of PAT (no more than 3 below) on the {bench} bench at depth {d}: PhyLL − PAT "
                         f"{fmt_pm(m, se, n, signed=True)} pts (passes: PhyLL {passes(bench, 'phyll', d)}, PAT "
                         f"{passes(bench, 'pat', d)}) -> {verdict(m, se, n, -0.03)}")
    deep = max(depths)
    if deep > 1:
        for bench in BENCHES:
            splits = sorted(s for (b, mth, dd, s) in by if (b, mth, dd) == (bench, "pat", deep)
                            and all((bench, x, dx, s) in by for x in ("pat", "insilico") for dx in (1, deep)))
            growth = [(by[(bench, "pat", deep, s)]["test_acc"] - by[(bench, "insilico", deep, s)]["test_acc"])
                      - (by[(bench, "pat", 1, s)]["test_acc"] - by[(bench, "insilico", 1, s)]["test_acc"])
                      for s in splits]
            m, se, n = mean_se(growth)
            gaps = [paired(by, bench, "pat", d, "insilico", d) for d in depths]
            lines.append(f"- in-silico falls behind PAT as depth grows ({bench}): PAT − in-silico by depth "
                         + ", ".join(f"{d}: {fmt_pm(*g, signed=True)}" for d, g in zip(depths, gaps))
                         + f"; depth {deep} minus depth 1: {fmt_pm(m, se, n, signed=True)} pts -> "
                         f"{verdict(m, se, n, 1e-9)}")
    below = []
    judged = 0
    for bench in BENCHES:
        for method, floor in FLOOR.items():
            for d in depths:
                m, se, n = paired(by, bench, method, d, floor, None)
                if n:
                    judged += 1
                    v = verdict(m, se, n, 1e-9)
                    if v != "met":
                        below.append(f"{bench} {method} d{d} − {floor} {fmt_pm(m, se, n, signed=True)}: {v}")
    lines.append(f"- every trained method above its reservoir floor (physical methods: the element-wise reservoir; "
                 f"hybrid: the ridge reservoir): {judged - len(below)} of {judged} cells shown above it"
                 + ("" if not below else "; not shown: " + "; ".join(below)))
    found = []
    for bench in BENCHES:
        for method in ("phyll", "phyll-noskip"):
            for d in depths:
                m, se, n = paired(by, bench, method, d, ABLATION[method], d)
                if n:
                    found.append((verdict(m, se, n, 1e-9), f"{bench} {method} d{d} − {ABLATION[method]} "
                                                           f"{fmt_pm(m, se, n, signed=True)}"))
    met = [t for v, t in found if v == "met"]
    lines.append("- PhyLL measurably above PhyLL without the physics on at least one bench: "
                 + ("met: " + "; ".join(met) if met else "MISSED" if found else "not measured")
                 + ("" if not found else " (all: " + "; ".join(f"{t} -> {v}" for v, t in found) + ")"))
    return lines


def write_table(args, out: Path) -> str:
    runs = load_runs(out)
    rows = summarise(runs, args.benches, args.methods, args.depths)
    md, cells = render(rows)
    epochs = resolve_epochs(args)
    presets = presets_text(args, epochs, runs)
    goals = "\n".join(judge_goals(runs, args.depths)) + "\n"
    splits = sorted({r["split"] for r in runs if "split" in r and "test_acc" in r})
    header = (f"Vowels, splits {splits}, depths {args.depths}, benches {args.benches}.\n"
              + (f"CUT: {args.cut}\n" if args.cut else ""))
    (out / "table.md").write_text(header + "\n" + md + "\n" + goals + "\n" + NOTES + "\n" + presets)
    (out / "table.txt").write_text(header + "\n" + text_table(cells) + "\n" + goals + "\n" + NOTES + "\n" + presets)
    (out / "table_compact.md").write_text(header + "\n" + compact(rows, args.benches))
    plot(runs, rows, out / "accuracy_vs_passes.png")
    return header + "\n" + md + "\n" + goals + "\n" + NOTES + "\n" + presets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benches", nargs="+", default=list(BENCHES))
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--splits", type=int, default=10, help="seeded splits 0 .. N-1 (the same for every method)")
    p.add_argument("--first-split", type=int, default=0)
    p.add_argument("--epochs", nargs="+", help="N (every trained method) and/or METHOD=N (default: the presets)")
    p.add_argument("--epoch-scale", type=float, default=1.0,
                   help="cut every trained method's epoch budget by this factor (uniformly)")
    p.add_argument("--val-points", type=int, default=5, help="validations per Method run (PhyLL, SPSA)")
    p.add_argument("--calibration-rows", type=int, help="first calibration sweep (default: the trainer's rule)")
    p.add_argument("--calibration-budget", type=int, help="most calibration rows (default: the trainer's rule)")
    p.add_argument("--twin-seconds", type=float, help="twin fitting time per round (default: the trainer's rule)")
    p.add_argument("--order", choices=("depths", "splits"), default="depths",
                   help="depths: every split at a depth before the next depth (default); splits: each split whole")
    p.add_argument("--jobs", type=int, default=1, help="benches run in parallel (one process each)")
    p.add_argument("--quick", action="store_true", help="smoke run: optical, 1 split, depth 1, 2 epochs, few methods")
    p.add_argument("--resume", action="store_true", help="skip the runs already in --out")
    p.add_argument("--table-only", action="store_true", help="only redraw the table and PNG from --out")
    p.add_argument("--cut", default="", help="what was cut (printed with the table)")
    p.add_argument("--verbose", action="store_true", help="a line per epoch")
    p.add_argument("--out", default="runs/bench_methods")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        if args.benches == list(BENCHES):
            args.benches = ["optical"]
        if args.methods == list(DEFAULT_METHODS):
            args.methods = ["insilico", "pat", "phyll", "phyll-zeros", "reservoir", "logistic"]
        args.splits, args.depths = 1, [1]
        args.epochs = args.epochs or ["2"]
        args.calibration_rows = args.calibration_rows or 500
        args.twin_seconds = args.twin_seconds or 15.0
        args.cut = args.cut or "--quick: 1 split, depth 1, 2 epochs for every trained method, 500 calibration rows"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.worker:
        bench_worker(args.worker, args, out / f"runs_{args.worker}.jsonl")
        return 0
    if not args.table_only:
        if not args.resume:
            for f in out.glob("runs*.jsonl"):
                f.unlink()
        print("epochs:", resolve_epochs(args), flush=True)
        started = time.perf_counter()
        if args.jobs <= 1 or len(args.benches) == 1:
            for bench in args.benches:
                bench_worker(bench, args, out / f"runs_{bench}.jsonl")
        else:
            passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
            pending = list(args.benches)
            procs: list[subprocess.Popen] = []
            while pending or procs:
                while pending and len(procs) < args.jobs:
                    bench = pending.pop(0)
                    extra = [] if "--resume" in passthrough else ["--resume"]  # the parent cleared the files
                    procs.append(subprocess.Popen([sys.executable, __file__, *passthrough, *extra,
                                                   "--worker", bench], env={**os.environ}))
                time.sleep(1.0)
                procs = [pr for pr in procs if pr.poll() is None]
        print(f"wall time {time.perf_counter() - started:.0f} s", flush=True)
    print(write_table(args, out), flush=True)
    print(f"wrote {out / 'table.md'}, {out / 'table.txt'}, {out / 'accuracy_vs_passes.png'}, runs*.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
