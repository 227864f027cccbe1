"""Benchmark: the simulated acoustic bench (4 speakers -> a reverberant box -> 4 microphones).

1. **Rows per second** through the real audio path (jackd on its dummy backend and the physics as a
   JACK client in their own process, the sounddevice driver with its reference chirp, `Rig`,
   `DeviceServer`, `RigClient`), against the audio time a shot needs (the physical limit: shots
   stream back to back, one shot length each), and through the in-process path (the same shots
   and physics on a simulated clock).
2. **Twin**: a calibration sweep on the in-process path (uniform tone amplitudes + repeats for the
   noise floor) and a twin fitted to it: noise ratio (held-out MSE / repeat variance; 1.0 is the
   floor) and held-out R^2.
3. **Accuracy on the vowels** (the ``cavity`` preset, in-process), over ``--seeds`` seeded splits, on
   the physics: PAT, in-silico, PAT with the physical parameters (tone amplitudes) frozen (only the
   element-wise affine maps train: what training the physics adds), and a digital logistic
   regression on the same splits.

    python scripts/bench_acoustic.py            # the full benchmark
    python scripts/bench_acoustic.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def real_path(rows: int) -> dict:
    """Rows/s through the real audio path vs the audio time of the shots."""
    from labpnn.benches import get_bench
    from labpnn.config import build_rig, parse_config
    from labpnn.drivers.audio_shots import ShotPlan
    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer
    from labpnn.sim_instruments.acoustic_jack import JackServer, available, portaudio_available

    for ok, reason in (available(), portaudio_available()):
        if not ok:
            return {"skipped": reason}
    name = f"lpb-{os.getpid()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JACK_DEFAULT_SERVER": name, "OPENBLAS_NUM_THREADS": "1"}
    os.environ["JACK_DEFAULT_SERVER"] = name
    bench = get_bench("acoustic")
    section = bench.rig_section(path="jack")
    plan = ShotPlan(**section["plan"])
    with JackServer(name, rate=48000, period=1024, channels=8):
        sim = subprocess.Popen([sys.executable, "-m", "labpnn", "sim", "acoustic", "--no-jackd", "--server-name", name],
                               stdout=subprocess.PIPE, text=True, env=env)
        try:
            while (line := sim.stdout.readline()) and line.strip() != "ready":
                pass
            import sounddevice as sd

            sd._terminate()
            sd._initialize()
            config = parse_config({"name": "acoustic-sim", "rig": section})
            with build_rig(config).connect() as rig, \
                    DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="") as server, \
                    RigClient(server.address, timeout_s=120) as client:
                x = np.random.default_rng(0).random((rows, plan.n_controls), dtype=np.float32)
                client.run(x[:2])
                started = time.perf_counter()
                m = client.measure(x)
                elapsed = time.perf_counter() - started
                remeasured = int(np.count_nonzero(m.flags))
            sd._terminate()  # PortAudio's JACK client must go before jackd does
        finally:
            sim.terminate()
            sim.wait(20)
    sd._initialize()
    audio = rows * plan.duration_s
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "audio_s_per_row": plan.duration_s,
            "limit_rows_per_s": 1 / plan.duration_s, "fraction_of_limit": audio / elapsed,
            "remeasured_rows": remeasured}


def in_process(rows: int) -> dict:
    from labpnn.benches import get_bench

    with get_bench("acoustic").simulated_rig() as rig:
        x = np.random.default_rng(0).random((rows, 20), dtype=np.float32)
        rig.run(x[:4])
        started = time.perf_counter()
        rig.run(x)
        elapsed = time.perf_counter() - started
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed}


def accuracy(args) -> dict:
    import torch

    from labpnn.benches import get_bench
    from labpnn.training.datasets import load_dataset, logistic_baseline
    from labpnn.training.trainer import TrainSettings, calibrate_and_fit, resolve_settings, train

    torch.set_num_threads(1)
    out: dict = {"runs": []}
    opts = dict(repeat=1, layout="blocks", lr=args.lr, readout=args.readout)
    with get_bench("acoustic").simulated_rig() as rig:
        t0 = time.perf_counter()
        core = args.twin_core or resolve_settings(TrainSettings(), rig.describe(), load_dataset("vowels"))[0].twin_core
        twin, fit, calibration = calibrate_and_fit(rig, args.calibration_rows, seed=0, twin_seconds=args.twin_seconds,
                                                   twin_core=core, progress=not args.quiet)
        out["twin"] = {"core": core, "rows": int(len(calibration[0])), "seconds": time.perf_counter() - t0,
                       "noise_ratio": fit.get("noise_ratio"), "holdout_r2": fit.get("holdout_r2")}
        print(f"twin: {out['twin']}", flush=True)
        for seed in range(args.seeds):
            ds = load_dataset("vowels", seed=seed)
            row = {"seed": seed, "logistic": logistic_baseline(ds)["test"]}
            for name, method, extra in (("pat", "pat", {}), ("insilico", "insilico", {}),
                                        ("pat_frozen", "pat", {"freeze_physical": True})):
                if name not in args.methods:
                    continue
                try:
                    r = train(rig, ds, method=method, twin=twin, calibration=calibration, epochs=args.epochs, seed=seed,
                              progress=False, **opts, **extra)
                except TypeError as exc:  # an option this trainer does not have
                    print(f"{name}: skipped ({exc})", flush=True)
                    continue
                row[name], row[f"{name}_passes"] = r.test_accuracy, r.passes
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--calibration-rows", type=int, default=4000)
    p.add_argument("--twin-seconds", type=float, default=90.0)
    p.add_argument("--twin-core", choices=["residual_mlp", "modulus"], default=None,
                   help="the twin's core (default: the bench's, from its [network] table)")
    p.add_argument("--rows", type=int, default=24, help="rows through the real audio path")
    p.add_argument("--readout", choices=["physical", "hybrid"], default="physical",
                   help="physical: the class is the argmax of pooled microphone readings; hybrid: a digital "
                        "linear classifier on them (labelled so)")
    p.add_argument("--methods", nargs="+", choices=["pat", "insilico", "pat_frozen"],
                   default=["pat", "insilico", "pat_frozen"])
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="runs/bench_acoustic")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.calibration_rows, args.twin_seconds, args.rows = 1, 3, 400, 15.0, 8
    report: dict = {"args": vars(args), "load": os.getloadavg()}
    if not args.skip_real:
        report["real_path"] = real_path(args.rows)
        r = report["real_path"]
        if "skipped" in r:
            print(f"real audio path: skipped ({r['skipped']})")
        else:
            print(f"real audio path: {r['rows_per_s']:.2f} rows/s vs {r['limit_rows_per_s']:.2f} rows/s of audio time "
                  f"= {r['fraction_of_limit']:.2f} of the physical limit ({r['remeasured_rows']} rows remeasured)")
    report["in_process"] = in_process(max(16, args.rows))
    print(f"in-process path: {report['in_process']['rows_per_s']:.1f} rows/s")
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(args)
        runs = report["accuracy"]["runs"]
        print(f"\nvowels on the simulated acoustic cavity, {args.readout} readout, {len(runs)} split(s), test "
              "accuracy on the physics (mean ± s.e.):")
        for key in ("pat", "insilico", "pat_frozen", "logistic"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                m, se = mean_se(vals)
                print(f"  {key:<12} {100 * m:5.1f} ± {100 * se:4.1f} %")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_acoustic.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
