"""Benchmark: PAT vs in-silico on the simulated optical bench, vowels, 1-3 physical layers.

Everything runs through the real stack: WaveShaper + AQ6370 emulators (zero latency) -> drivers ->
`Rig` -> `DeviceServer` on loopback -> `RigClient` -> trainer. One calibration sweep (steered toward
the controls the initial networks send, plus noise repeats) and one twin serve every run; then for
each of ``--seeds`` seeded splits (60/20/20, stratified) and each depth, PAT and in-silico train
with the same settings and are evaluated on the physics. Reported per method and depth: test
accuracy on the physics (mean ± standard error over the splits), training passes to reach the
target on the validation split (median; how many runs reached it), the twin-only test accuracy,
and a digital logistic regression on the same splits beside them. For PAT at 2+ layers, the test
accuracy with each hidden layer bypassed (`labpnn.training.ablation`: the layer replaced by the
identity on its features, nothing retrained), so every layer is shown to matter.

Every run trains for the library's default epochs (`labpnn.training.defaults`: ~16,000 training
passes per layer, 60 epochs on the vowels at every depth — the same number of optimiser steps);
``--passes N`` gives each run a budget of N passes in all instead (fewer steps for deeper
networks: the setting of the figures before issue 15). ``--inprocess`` runs the same bench
physics (`labpnn.sim_instruments.shg.SHGBench`, seed 0, the emulators' model) in-process without
the instruments' emulators, drivers and device server — ~200x faster per row, for diagnosis and
for the full table on a small machine; the figures are the same physics but not the same stack.

Then the duty cycle: one short PAT run at the optical bench's realistic latency (``--settle-ms``,
``--sweep-ms``; default 20 + 200 ms per row) with the online twin on: the device server's busy
time (``RigClient.status()["busy_s"]`` deltas) over the wall time of the training steps (twin
refinement included; calibration and evaluation excluded).

    python scripts/bench_pat.py                 # the full benchmark (~45 min on 2 cores)
    python scripts/bench_pat.py --quick         # 2 seeds, 1 layer, short runs, short duty run
    python scripts/bench_pat.py --skip-duty --layers 1 2 3 --seeds 5 --out runs/bench_pat
    python scripts/bench_pat.py --skip-duty --inprocess   # the same table in a few minutes
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def mean_se(values):
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--passes", type=int, default=None,
                   help="training-pass budget per run, all layers together (default: the library's epochs, the "
                   "same at every depth)")
    p.add_argument("--calibration-rows", type=int, default=4000)
    p.add_argument("--twin-seconds", type=float, default=90.0)
    p.add_argument("--online-twin", choices=("auto", "on", "off"), default="auto",
                   help="refine the twin online in the accuracy runs (auto: the library's default, on for 2+ layers)")
    p.add_argument("--inprocess", action="store_true",
                   help="the bench's physics in-process (no emulators, drivers or server): fast, same physics")
    p.add_argument("--settle-ms", type=float, default=20.0)
    p.add_argument("--sweep-ms", type=float, default=200.0)
    p.add_argument("--duty-epochs", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=0, help="duty run: PAT pipelining chunk rows (0: off)")
    p.add_argument("--skip-duty", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/bench_pat")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.layers, args.passes = 2, [1], 1600
        args.calibration_rows, args.twin_seconds, args.duty_epochs = 800, 20.0, 1
        args.settle_ms, args.sweep_ms = 5.0, 20.0
    online = {"auto": None, "on": True, "off": False}[args.online_twin]

    torch.set_num_threads(1)
    from labpnn.benches.demo import simulated_bench
    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer
    from labpnn.training.ablation import bypass_accuracies
    from labpnn.training.datasets import load_dataset, logistic_baseline
    from labpnn.training.pat import PhysicsForward
    from labpnn.training.trainer import (
        TrainSettings,
        _operating_controls,
        calibrate_and_fit,
        make_network,
        train,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "runs": []}
    started = time.perf_counter()

    if not args.skip_accuracy:
        with accuracy_system(args.inprocess) as client:
            d = client.describe()
            ds0 = load_dataset("vowels", seed=0)
            centres = np.concatenate([
                _operating_controls(make_network(int(d["n_controls"]), int(d["n_outputs"]), ds0,
                                                 TrainSettings(layers=L, seed=0)), torch.from_numpy(ds0.X_train))
                for L in sorted(set(args.layers))])
            t0 = time.perf_counter()
            twin, fit, calibration = calibrate_and_fit(client, args.calibration_rows, centres=centres, seed=0,
                                                       twin_seconds=args.twin_seconds, progress=False)
            results["calibration"] = {"rows": int(len(calibration[0])), "seconds": time.perf_counter() - t0,
                                      "holdout_nmse": fit.get("holdout_nmse"), "noise_ratio": fit.get("noise_ratio")}
            print(f"calibration: {len(calibration[0])} rows, twin held-out NMSE {fit.get('holdout_nmse'):.3f}, "
                  f"noise ratio {fit.get('noise_ratio') or float('nan'):.1f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            for seed in range(args.seeds):
                ds = load_dataset("vowels", seed=seed)
                base = logistic_baseline(ds)
                results["runs"].append({"method": "logistic", "layers": 0, "seed": seed, "test": base["test"],
                                        "val": base["validation"]})
                for layers in args.layers:
                    epochs = max(1, args.passes // (layers * len(ds.y_train))) if args.passes else None
                    for method in ("pat", "insilico"):
                        t1 = time.perf_counter()
                        r = train(client, ds, method=method, twin=twin, calibration=calibration, layers=layers,
                                  epochs=epochs, seed=seed, online_twin=online, progress=False)
                        run = {"method": method, "layers": layers, "seed": seed,
                               "epochs": int(r.settings["epochs"]), "online_twin": r.settings["online_twin"],
                               "test": r.test_accuracy, "val": r.val_accuracy, "twin_test": r.twin_test_accuracy,
                               "passes": r.passes, "passes_to_target": r.passes_to_target,
                               "best_epoch": r.best_epoch, "seconds": time.perf_counter() - t1}
                        if method == "pat" and layers > 1:  # every layer matters: each hidden one bypassed
                            run["bypass"] = bypass_accuracies(r.network, ds.X_test, ds.y_test, PhysicsForward(client))
                        results["runs"].append(run)
                        print(f"seed {seed} {method:<8} {layers} layer(s): test {r.test_accuracy:.3f} "
                              f"val {r.val_accuracy:.3f} twin {r.twin_test_accuracy:.3f} "
                              f"to-target {r.passes_to_target} ({run['seconds']:.0f} s)"
                              + "".join(f"; bypass {b['bypassed']}: {b['accuracy']:.3f}" for b in run.get("bypass", [])
                                        if b["accuracy"] is not None), flush=True)
                        (out / "bench_pat.json").write_text(json.dumps(results, indent=2, default=str))

    if not args.skip_duty:
        ds = load_dataset("vowels", seed=0)
        # the twin for the duty run comes from a quick zero-latency calibration (not part of the figure)
        with simulated_bench("optical", seed=1) as rig, \
                DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="") as server, RigClient(server.address) as client:
            centres = _operating_controls(make_network(64, 512, ds, TrainSettings(seed=0)),
                                          torch.from_numpy(ds.X_train))
            twin, _, calibration = calibrate_and_fit(client, 256 if args.quick else 1024, centres=centres, seed=0,
                                                     twin_seconds=20.0 if args.quick else 45.0, progress=False)
        settle, sweep = args.settle_ms / 1e3, args.sweep_ms / 1e3
        with simulated_bench("optical", settle_s=settle, sweep_s=sweep, seed=1) as rig, \
                DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="") as server, RigClient(server.address) as client:
            r = train(client, ds, method="pat", twin=twin, calibration=calibration, layers=1,
                      epochs=args.duty_epochs, seed=0, online_twin=True, chunk_rows=args.chunk_rows,
                      in_flight=2, progress=False)
            duty = dict(r.duty_cycle)
            duty.update({"settle_ms": args.settle_ms, "sweep_ms": args.sweep_ms, "train_passes": r.passes["train"],
                         "chunk_rows": args.chunk_rows, "rig_s_per_row": duty["busy_s"] / max(1, r.passes["train"])})
            results["duty"] = duty
            print(f"duty cycle at {args.settle_ms:g} ms settle + {args.sweep_ms:g} ms sweep: "
                  f"{duty['duty_cycle']:.4f} (rig busy {duty['busy_s']:.1f} s of {duty['wall_s']:.1f} s of training "
                  f"steps, {r.passes['train']} passes, online twin on)", flush=True)

    results["seconds"] = time.perf_counter() - started
    (out / "bench_pat.json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    return 0


def accuracy_system(inprocess: bool):
    """The system the accuracy runs train on: the simulated bench through the whole stack, or
    (``inprocess``) its physics called directly."""
    import contextlib

    if inprocess:
        from labpnn.benches.optical import OpticalPhysics

        return contextlib.nullcontext(OpticalPhysics(seed=0))
    from labpnn.benches.demo import simulated_bench
    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer

    stack = contextlib.ExitStack()
    rig = stack.enter_context(simulated_bench("optical", seed=0))
    server = stack.enter_context(DeviceServer(rig, bind="tcp://127.0.0.1:*", publish=""))
    client = stack.enter_context(RigClient(server.address))

    @contextlib.contextmanager
    def opened():
        with stack:
            yield client
    return opened()


def table(results) -> str:
    runs = results["runs"]
    lines = []
    if runs:
        lines.append("")
        where = ("the optical bench's physics in-process" if results["args"].get("inprocess")
                 else "simulated optical bench at zero latency")
        lines.append(f"vowels, {where}: test accuracy on the physics (mean ± s.e. over seeded splits)")
        lines.append(f"{'method':<10} {'layers':>6} {'test acc':>16} {'twin-only':>10} {'passes to 95% val':>26}"
                     "   test acc with a hidden layer bypassed (identity)")
        for method in ("pat", "insilico", "logistic"):
            for layers in sorted({r["layers"] for r in runs if r["method"] == method}):
                rs = [r for r in runs if r["method"] == method and r["layers"] == layers]
                m, se = mean_se([r["test"] for r in rs])
                twin = (f"{np.mean([r['twin_test'] for r in rs]):.3f}" if "twin_test" in rs[0] else "-")
                reached = [r["passes_to_target"] for r in rs if r.get("passes_to_target") is not None]
                if method == "logistic":
                    to = "-"
                elif method == "insilico":  # no training passes at all; did the deployed model get there?
                    to = f"0 passes; reached {len(reached)}/{len(rs)}"
                else:
                    to = (f"median {statistics.median(reached):.0f} ({len(reached)}/{len(rs)} runs)" if reached
                          else f"not reached (0/{len(rs)})")
                bypass = []
                for j, b in enumerate(rs[0].get("bypass", [])):
                    accs = [r["bypass"][j]["accuracy"] for r in rs if r["bypass"][j]["accuracy"] is not None]
                    name = f"layer {b['bypassed'] + 1}" if isinstance(b["bypassed"], int) else b["bypassed"]
                    bypass.append(f"{name} {np.mean(accs):.3f}" if accs else f"{name} n/a")
                lines.append(f"{method:<10} {layers if layers else '-':>6} {m:>9.3f} ± {se:.3f} {twin:>10} {to:>26}"
                             + ("   " + ", ".join(bypass) if bypass else ""))
    if "duty" in results:
        d = results["duty"]
        lines.append(f"rig duty cycle (server busy / training-step wall time, {d['settle_ms']:g} + {d['sweep_ms']:g} ms "
                     f"per row, online twin on): {d['duty_cycle']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
