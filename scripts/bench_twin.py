"""Benchmark: twin quality vs number of calibration samples on the default simulated optical bench.

For each size N the script measures a calibration sweep of N rows in total (uniform controls plus
repeated controls for the noise floor, as ``labpnn calibrate`` does), fits the default twin
(`labpnn.twin.fit_twin`: exp control features, gated residual MLP 256x2, Adam + cosine, early stopping,
wall-clock budget) and reports:

- the fit's own held-out rows (the last 10 % of the sweep, by time): noise ratio, R^2 (pooled);
- a common test set measured after every sweep (2,000 fresh uniform rows) against a common noise
  floor (256 controls x 4 repeats measured with it): the same yardstick for every N;
- fit wall time and epochs (the machine is shared: the load average is recorded).

Each size gets a fresh bench (same physics, its own noise and drift realisation, drift starting
from nominal), so sizes compare like with like; with ``--via-emulators`` one bench runs on.

The bench: `SHGBench(OpticalBenchConfig())` (64 shaper channels -> 512-pixel SH spectrum, noise,
per-shot drift, model gap), controls mapped like the optical bench's shaper (`labpnn.benches.optical`,
= examples/optical-sim.toml: ``attn_dB = 30 (1 - x)``, 0.01 dB steps; ``--attn-max-db 10`` gives the
0-10 dB range the README's twin figures were first measured on), traces in W as the OSA reports them. It runs
in-process by default; ``--via-emulators`` drives it through the real drivers (WaveShaper REST +
AQ6370 SCPI emulators on 127.0.0.1, the optical `Rig` of examples/optical-sim.toml) instead.

    python scripts/bench_twin.py                 # 1k, 5k, 20k samples, 120 s fits
    python scripts/bench_twin.py --quick         # 1k and 3k samples, 20 s fits
    python scripts/bench_twin.py --sizes 20000 --threads 2 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def emulated_rig(config_path: str):
    """The optical Rig of a config, its instruments served by emulators on free local ports."""
    from labpnn.config import build_rig, load_config
    from labpnn.sim_instruments.optical_bench import OpticalBenchEmulators

    emulators = OpticalBenchEmulators(shaper_port=0, osa_port=0).start()
    cfg = load_config(config_path)
    cfg.rig.shaper.url = emulators.shaper_url
    cfg.rig.osa.resource = emulators.osa_resource
    rig = build_rig(cfg).connect()
    return rig, emulators


def common_test_set(system, *, n_test: int, repeats: tuple[int, int], seed: int):
    from labpnn.twin.calibrate import calibrate

    res = calibrate(system, n_test, None, batch_size=256, repeats=repeats, seed=seed, progress=False,
                    keep_data=True)
    noise = res.tags == "noise"
    return res.controls[~noise], res.traces[~noise], res.noise_var


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000],
                   help="calibration rows in total (incl. the noise repeats)")
    p.add_argument("--quick", action="store_true", help="sizes 1000 3000, 20 s fits, 1000 test rows")
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--block", default="gated", choices=["gated", "mlp"])
    p.add_argument("--features", default="exp", choices=["exp", "linear"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--attn-max-db", type=float, help="shaper range (default: the optical bench's, 30 dB)")
    p.add_argument("--test-rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--via-emulators", metavar="RIG.toml", nargs="?", const="examples/optical-sim.toml",
                   help="measure through the real drivers and emulators (default config: examples/optical-sim.toml)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.max_seconds, args.test_rows = [1000, 3000], 20.0, 1000

    import torch

    from labpnn.twin import fit_twin, regression_metrics
    from labpnn.twin.calibrate import calibrate

    torch.set_num_threads(args.threads)
    emulators = None
    if args.via_emulators:
        system, emulators = emulated_rig(args.via_emulators)
    rows = []
    try:
        for k, n in enumerate(args.sizes):
            if emulators is None:  # a fresh bench per size: every sweep starts from the nominal drift state
                from labpnn.benches.optical import OpticalPhysics

                system = OpticalPhysics(seed=args.seed + k, attn_max_db=args.attn_max_db)
            n_distinct = 32 if n < 2000 else 64
            repeats = (n_distinct, 4)
            n_cal = n - n_distinct * 4
            started = time.perf_counter()
            cal = calibrate(system, n_cal, None, batch_size=256, repeats=repeats, seed=args.seed + 10 * k,
                            progress=args.progress, keep_data=True)
            measure_s = time.perf_counter() - started
            load_before = os.getloadavg()[0]
            twin, rep = fit_twin(cal.controls, cal.traces, noise_mask=cal.tags == "noise", width=args.width,
                                 depth=args.depth, block=args.block, features=args.features,
                                 batch_size=args.batch_size, epochs=args.epochs,
                                 max_seconds=args.max_seconds, seed=args.seed, progress=args.progress)
            load_after = os.getloadavg()[0]
            x_test, y_test, noise_test = common_test_set(system, n_test=args.test_rows, repeats=(256, 4),
                                                         seed=10_000 + k)
            test = regression_metrics(twin.predict(x_test), y_test, noise_test)
            row = {"samples": int(cal.n_rows), "noise_rows": int(cal.n_noise_rows), "measure_s": measure_s,
                   "fit_s": rep.seconds, "epochs": rep.epochs, "best_epoch": rep.best_epoch, "stopped": rep.stopped,
                   "holdout_rows": rep.n_holdout, "holdout_noise_ratio": rep.noise_ratio,
                   "holdout_r2": rep.holdout_r2, "noise_var": rep.noise_var,
                   "test_rows": int(len(x_test)), "test_noise_var": noise_test,
                   "test_noise_ratio": test.get("noise_ratio"), "test_r2": test["r2"],
                   "load_avg": [load_before, load_after]}
            rows.append(row)
            print(f"N={row['samples']:>6}: held-out noise ratio {rep.noise_ratio:.3f} (R2 {rep.holdout_r2:.4f}), "
                  f"common test {row['test_noise_ratio']:.3f} (R2 {test['r2']:.4f}); fit {rep.seconds:.0f} s, "
                  f"{rep.epochs} epochs ({rep.stopped}); load {load_before:.1f}", flush=True)
    finally:
        if emulators is not None:
            system.close()
            emulators.stop()
    print()
    print("| samples | held-out noise ratio | held-out R2 | common-test noise ratio | fit s | epochs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['samples']} | {r['holdout_noise_ratio']:.3f} | {r['holdout_r2']:.4f} | "
              f"{r['test_noise_ratio']:.3f} | {r['fit_s']:.0f} | {r['epochs']} |")
    if args.json:
        info = {"argv": sys.argv[1:], "settings": vars(args), "torch": torch.__version__,
                "machine": platform.machine(), "cpus": os.cpu_count(), "results": rows}
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
