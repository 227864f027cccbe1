"""Generality suite: PAT on the physics (the simulated optical bench; ``--bench``) vs a digital logistic
regression on the same seeded splits, for datasets of many shapes, at the defaults
(`labpnn.training.defaults`: everything chosen from the data and the bench).

Datasets: scikit-learn's bundled iris (4 features, 3 classes), wine (13, 3), breast cancer (30, 2)
and digits (64 pixels, 10 classes: more features than fit, so PCA), seeded ``make_classification``
sets (4, 10), (8, 5), (20, 8) (all features informative, one cluster per class, class_sep 2: a
linear classifier does well), and the shipped vowels (12, 7).

Per dataset: one calibration sweep steered at the operating region of split 0's initial network
and a twin refitted toward the default noise-ratio target (`calibrate_to_target`), shared by that
dataset's splits; then per split (60/20/20, stratified, seed = split index) a PAT run with the
defaults, evaluated once on the physics. Reported: test accuracy on the physics (mean ± s.e. over
splits), the logistic baseline, the gap, the worst class's recall (lowest over splits), physical
passes per run (training + validation + test; the calibration, shared, separately), wall time,
and a note: goals (within 5 points of the baseline, every class's recall >= 50 %) met, or why not
— "capacity" when the model misses on its own twin too (twin-only accuracy also short: one
layer's spectrum cannot separate the classes), "sim-to-real" when it fits the twin but not the
physics. ``--extra`` adds variants on the same splits and twin (deeper, or a labelled hybrid
readout) for the datasets where the physical network misses. ``--capacity`` also trains the same network on the twin alone
(in-silico) per split, so the note can tell a capacity limit (it misses on its own twin too)
from a training one (it fits the twin, PAT does not carry it to the physics).

    python scripts/bench_datasets.py --quick                          # ~2-3 min: iris, wine, 1 split, short
    python scripts/bench_datasets.py --splits 5                       # everything (hours on 2 shared cores)
    python scripts/bench_datasets.py --datasets iris mc4x10 --splits 2 --extra layers=2 readout=hybrid
    python scripts/bench_datasets.py --bench microwave --datasets vowels --splits 5 --skip-defaults \
        --extra features=6 repeat=2 readout=hybrid --extra features=6 repeat=2 readout=hybrid freeze_physical=true
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

SUITE = ("iris", "wine", "breast_cancer", "digits", "mc4x10", "mc8x5", "mc20x8", "vowels")


def load(name: str, seed: int):
    """The dataset ``name`` split with ``seed`` (`labpnn.training.datasets.make_dataset`)."""
    from labpnn.training.datasets import load_dataset, make_dataset

    if name == "vowels":
        return load_dataset("vowels", seed=seed)
    if name.startswith("mc"):
        from sklearn.datasets import make_classification

        f, k = (int(v) for v in name[2:].split("x"))
        X, y = make_classification(n_samples=max(600, 150 * k), n_features=f, n_informative=f, n_redundant=0,
                                   n_classes=k, n_clusters_per_class=1, class_sep=2.0, random_state=0)
        return make_dataset(X, y, [str(c) for c in range(k)], [f"x{i}" for i in range(f)], name=name, seed=seed,
                            source=f"make_classification({f} features, {k} classes, class_sep 2, random_state 0)")
    import sklearn.datasets as skd

    bunch = getattr(skd, f"load_{name}")()
    return make_dataset(bunch.data, bunch.target, [str(c) for c in bunch.target_names],
                        [str(c) for c in getattr(bunch, "feature_names", range(bunch.data.shape[1]))],
                        name=name, seed=seed, source=f"scikit-learn load_{name}")


def merge_runs(paths) -> list[dict]:
    """The runs of several bench_datasets.json files, one per (dataset, variant, split): the last
    file's wins."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            merged[(r["dataset"], r["variant"], r["split"])] = r
    return list(merged.values())


def mean_se(values):
    v = np.asarray(values, float)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)


def parse_extra(spec: str) -> dict:
    key, _, value = spec.partition("=")
    parsed = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return {key.replace("-", "_"): parsed}


def run_dataset(rig, name: str, args, log, save=None) -> list[dict]:
    from labpnn.training.trainer import (
        TrainSettings,
        calibrate_to_target,
        operating_controls,
        resolve_settings,
        train,
    )

    ds0 = load(name, 0)
    overrides = {"epochs": args.epochs} if args.epochs else {}
    settings, chosen = resolve_settings(TrainSettings(**overrides), rig.describe(), ds0)
    t0 = time.perf_counter()
    centres = operating_controls(rig, ds0, settings)
    twin, fit, calibration = calibrate_to_target(
        rig, args.calibration_rows or settings.calibration_rows, centres=centres, target=settings.twin_target,
        budget=args.calibration_budget or settings.calibration_budget,
        twin_seconds=args.twin_seconds or settings.twin_seconds, twin_core=settings.twin_core, seed=0)
    cal = {"rows": fit["rows_measured"], "seconds": time.perf_counter() - t0, "rounds": len(fit["rounds"]),
           "noise_ratio": fit["operating_noise_ratio"], "target_met": fit["target_met"]}
    log(f"{name}: twin on {cal['rows']} rows in {cal['rounds']} round(s), noise ratio {cal['noise_ratio']:.2f} "
        f"on the operating region ({cal['seconds']:.0f} s)")
    variants = ([] if args.skip_defaults else [("defaults", {})]) + (
        [(",".join(group), {k: v for e in group for k, v in parse_extra(e).items()}) for group in args.extra if group])
    runs = []
    for split in range(args.splits):
        ds = load(name, split)
        for label, extra in variants:
            if label != "defaults" and args.extra_splits is not None and split >= args.extra_splits:
                continue
            t1 = time.perf_counter()
            r = train(rig, ds, method="pat", twin=twin, calibration=calibration, seed=split, progress=False,
                      **{**overrides, **extra})
            p = r.passes
            run = {"dataset": name, "variant": label, "split": split, "test": r.test_accuracy,
                   "twin_test": r.twin_test_accuracy, "logistic": r.digital_baseline["test"],
                   "min_recall": min(r.recall), "passes": p["train"] + p["validation"] + p["test"],
                   "seconds": time.perf_counter() - t1, "network": r.network.name,
                   "shape": [len(ds.class_names), ds.n_features, len(ds.y_train)],
                   "features_used": r.dataset["n_features"], "calibration": cal,
                   "settings": {k: r.settings[k] for k in ("repeat", "layout", "batch_size", "lr", "epochs",
                                                          "lr_schedule", "features", "layers", "readout")},
                   "placement_min_share": (min(r.readout_placement["shares"]) if r.readout_placement else None),
                   # where training took the network: controls at the range's ends, the twin's error there
                   "operating_point": next(({k: e[k] for k in ("first", "selected")} for e in r.events
                                            if e["kind"] == "operating_point"), None)}
            if args.capacity and label == "defaults":
                # the same network trained on the twin alone: what one layer of this bench (as its twin
                # sees it) can do at these settings, whatever happens on the physics
                r_is = train(rig, ds, method="insilico", twin=twin, calibration=calibration, seed=split,
                             progress=False, **overrides)
                run["capacity"] = r_is.twin_test_accuracy
                run["insilico_test"] = r_is.test_accuracy
            runs.append(run)
            if save is not None:
                save(runs)
            log(f"{name} split {split} {label}: test {run['test']:.3f} (twin-only {run['twin_test']:.3f}), logistic "
                f"{run['logistic']:.3f}, worst recall {run['min_recall']:.2f}, {run['passes']} passes, "
                f"{run['seconds']:.0f} s")
    return runs


def note(rs: list[dict]) -> str:
    m, _ = mean_se([r["test"] for r in rs])
    base = float(np.mean([r["logistic"] for r in rs]))
    capacity = [r["capacity"] for r in rs if "capacity" in r]
    worst = min(r["min_recall"] for r in rs)
    missed = []
    if base - m > 0.05:
        missed.append("gap > 5 pts")
    if worst < 0.5:
        missed.append("a class's recall < 50 %")
    if not missed:
        return "goals met"
    if not capacity:  # the PAT network on its own twin: did it learn the task there at least?
        on_twin = float(np.mean([r["twin_test"] for r in rs]))
        if base - on_twin > 0.05:
            lower = " - lower than on the physics: the twin is the weaker model there" if on_twin < m - 0.05 else ""
            why = (f"as low on its own twin ({100 * on_twin:.0f} %{lower}): not learnt (capacity or training; "
                   "--capacity tells which)")
        else:
            why = f"{100 * on_twin:.0f} % on its own twin: lost between twin and physics"
        return f"MISSED ({', '.join(missed)}); {why}"
    cap = float(np.mean(capacity))
    why = (f"capacity: trained on its twin alone it reaches only {100 * cap:.0f} %" if base - cap > 0.05
           else f"not capacity (on its twin alone {100 * cap:.0f} %): PAT does not carry it to the physics")
    return f"MISSED ({', '.join(missed)}); {why}"


def table(runs: list[dict]) -> str:
    lines = ["| dataset (features x classes, train rows) | network | PAT test on the physics | logistic | gap "
             "| worst-class recall | passes / run | s / run | twin noise ratio (rows) | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in runs:
        if (r["dataset"], r["variant"]) not in keys:
            keys.append((r["dataset"], r["variant"]))
    order = list(dict.fromkeys(name for name, _ in keys))  # a dataset's variants right after its defaults
    keys.sort(key=lambda k: (order.index(k[0]), k[1] != "defaults"))
    for name, variant in keys:
        rs = [r for r in runs if r["dataset"] == name and r["variant"] == variant]
        m, se = mean_se([r["test"] for r in rs])
        base = float(np.mean([r["logistic"] for r in rs]))
        k, f, n = rs[0]["shape"]
        used = rs[0]["features_used"]
        shape = f"{name} ({f}{'' if used == f else f' -> PCA {used}'} x {k}, {n})"
        net = rs[0]["network"].replace(" network", "") + ("" if variant == "defaults" else f" [{variant}]")
        cal = rs[0]["calibration"]
        lines.append(f"| {shape} | {net} | {100 * m:.1f} ± {100 * se:.1f} % (n={len(rs)}) | {100 * base:.1f} % "
                     f"| {100 * (base - m):+.1f} | {100 * min(r['min_recall'] for r in rs):.0f} % "
                     f"| {np.mean([r['passes'] for r in rs]):.0f} | {np.mean([r['seconds'] for r in rs]):.0f} "
                     f"| {cal['noise_ratio']:.2f} ({cal['rows']}) | {note(rs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(SUITE), choices=SUITE)
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--bench", default="optical", help="the simulated bench (labpnn.benches): optical, "
                   "acoustic (its in-process path) or microwave (its emulators, in their own process)")
    p.add_argument("--epochs", type=int, help="override the chosen epochs (default: the rule's)")
    p.add_argument("--calibration-rows", type=int, help="override the first sweep (default: the rule's)")
    p.add_argument("--calibration-budget", type=int, help="override the calibration budget (default: the rule's)")
    p.add_argument("--twin-seconds", type=float, help="override the fitting time per round (default: the rule's)")
    p.add_argument("--extra", nargs="*", action="append", default=[],
                   help="a variant on the same splits and twin, e.g. layers=2 or readout=hybrid; repeat "
                        "--extra for several (e.g. the same with freeze_physical=true)")
    p.add_argument("--capacity", action="store_true",
                   help="per split, also train in-silico (on the twin alone) to tell capacity from training")
    p.add_argument("--extra-splits", type=int, help="run the --extra variant on the first N splits only")
    p.add_argument("--skip-defaults", action="store_true", help="run only the --extra variant (the defaults' "
                   "rows are in another run's JSON; merge them with --table)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of these runs' JSON files "
                   "(merged, in order; a later file's rows for the same dataset, variant and split replace "
                   "an earlier one's)")
    p.add_argument("--quick", action="store_true", help="iris and wine, 1 split, 3 epochs, a small twin (CI)")
    p.add_argument("--out", default="runs/bench_datasets")
    args = p.parse_args(argv)
    if args.table:
        print(table(merge_runs(args.table)))
        return 0
    if args.skip_defaults and not any(args.extra):
        p.error("--skip-defaults needs an --extra variant to run")
    if args.quick:
        args.datasets = [d for d in args.datasets if d in ("iris", "wine")] or ["iris", "wine"]
        args.splits, args.epochs = 1, args.epochs or 3
        args.calibration_rows, args.calibration_budget = 1000, 1000
        args.twin_seconds = args.twin_seconds or 20.0

    torch.set_num_threads(1)
    from labpnn.benches import get_bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"args": vars(args), "runs": []}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    with get_bench(args.bench).simulated_rig(seed=0) as rig:
        def save(runs_so_far):  # after every run: a stopped suite keeps what it measured
            partial = {**results, "runs": results["runs"] + runs_so_far}
            (out / "bench_datasets.json").write_text(json.dumps(partial, indent=2, default=str))

        for name in args.datasets:
            results["runs"] += run_dataset(rig, name, args, log, save)
    results["seconds"] = time.perf_counter() - started
    (out / "bench_datasets.json").write_text(json.dumps(results, indent=2, default=str))
    print()
    print(f"simulated {args.bench} bench, PAT at the chosen defaults, "
          f"{args.splits} split(s); total {results['seconds']:.0f} s")
    print(table(results["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
