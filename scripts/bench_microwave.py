"""Benchmark: the simulated microwave bench (metasurface cavity + controller + VNA) end to end.

Everything runs through the real stack: the metasurface-controller emulator on a pseudo-terminal and
the VNA emulator on a loopback socket -> pyserial / PyVISA drivers -> `Rig` -> `DeviceServer` ->
`RigClient`. Default bench settings: 48 binary meta-atoms, |S21| in dB at 20 points over 4.5-5.5 GHz,
10 kHz IF bandwidth, 115,200 baud.

1. **Throughput.** Configurations per second through the whole stack (server -> controller -> VNA
   -> back), against the instrument time a configuration needs (the pattern's bytes and the `#OK`
   on the wire at the baud rate, the controller's shift and latch, the settle time, the sweep time
   from points and IF bandwidth: the physical limit) and against the physics alone (the cavity's
   S21 for one configuration, no I/O); with the pattern read back after every write (the driver's default) and without. The rig
   overlaps rows (`Rig._measure_overlapped`): row i's trace is read while row i+1's pattern is on
   the wire, and the read-back travels during the settle time and the sweep.
2. **Twin.** A calibration sweep of ``--calibration-rows`` (uniform binary patterns + repeats for
   the noise floor) at the VNA's spec noise, a twin fitted to it: held-out R^2 (pooled over
   frequencies) and the noise ratio (held-out MSE / repeat variance; 1.0 is the floor).
3. **Accuracy on the vowels**, over ``--seeds`` seeded splits, on the physics: PAT, in-silico, PAT with
   the metasurface parameters frozen (only the element-wise affine maps train: what training the
   meta-atoms adds), a logistic regression on the quantised inputs (the bits the metasurface's input
   atoms received from the trained PAT network: what a linear readout of the inputs alone does) and
   a logistic regression on the features.

    python scripts/bench_microwave.py            # the full benchmark
    python scripts/bench_microwave.py --quick    # a smoke run (1 split, a few epochs)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def instrument_time_s(rig_section: dict, n_bits: int, sweep_time_s: float, latch_s: float) -> float:
    """The time one configuration needs on the instruments: the pattern command on the wire (10 bit
    times per byte), the controller's shift and latch (it answers `#OK` only after them), the `#OK`
    on the wire, the metasurface's settle time (counted from the `#OK`), the VNA's sweep."""
    ms = rig_section["metasurface"]
    wire_bytes = len("!0x") + n_bits // 4 + 1 + len("#OK\n")
    return wire_bytes * 10 / ms["baud"] + latch_s + ms["settle_s"] + sweep_time_s


def throughput(rows: int, repeats: int) -> list[dict]:
    from labpnn.benches import get_bench
    from labpnn.config import build_rig, parse_config
    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer
    from labpnn.sim_instruments.metasurface_cavity import CavityConfig, MetasurfaceCavity
    from labpnn.sim_instruments.metasurface_controller import LATCH_S
    from labpnn.sim_instruments.vna_emulator import sweep_time_s

    bench = get_bench("microwave")
    vna = bench.RIG["vna"]
    sweep = sweep_time_s(vna["points"], vna["if_bandwidth_hz"])
    limit = instrument_time_s(bench.RIG, bench.RIG["metasurface"]["n_bits"], sweep, LATCH_S)
    cavity = MetasurfaceCavity(CavityConfig(drift_scale=0.0))
    freqs = np.linspace(vna["start_hz"], vna["stop_hz"], vna["points"])
    states = (np.random.default_rng(0).random((rows, bench.N_META)) >= 0.5).astype(np.int64)
    cavity.channel(states[0], freqs)  # the per-band precompute, once
    started = time.perf_counter()
    for s in states:
        cavity.measure(s, freqs, if_bandwidth_hz=vna["if_bandwidth_hz"], power_dbm=vna["power_dbm"])
    physics = (time.perf_counter() - started) / rows
    out = []
    # the emulators run in their own process, as instruments do: in this one they would share the GIL
    # with the stack being measured
    with bench.emulators() as (serial_port, vna_resource):
        config = parse_config({"name": "microwave-sim", "rig": bench.rig_section(serial_port, vna_resource)}, "bench")
        for verify in (True, False):
            with build_rig(config).connect() as rig, \
                    DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="") as server, \
                    RigClient(server.address) as client:
                client.configure({"metasurface": {"verify": verify}})
                x = np.random.default_rng(1).random((rows, bench.N_META), dtype=np.float32)
                client.run(x[:4])  # warm: the first sweep's precompute
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    client.run(x)
                    times.append((time.perf_counter() - t) / rows)
                per_row = statistics.median(times)
            out.append({"verify": verify, "stack_s_per_config": per_row, "configs_per_s": 1 / per_row,
                        "instrument_s_per_config": limit, "limit_configs_per_s": 1 / limit,
                        "fraction_of_limit": limit / per_row, "physics_s_per_config": physics,
                        "stack_over_physics": per_row / physics,
                        "fraction_per_repeat": [limit / t for t in times]})
    return out


def accuracy(args) -> dict:
    import torch

    from labpnn.benches import get_bench
    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer
    from labpnn.sessions import SessionWriter
    from labpnn.training.datasets import load_dataset, logistic_baseline
    from labpnn.training.trainer import calibrate_and_fit, train

    torch.set_num_threads(1)
    results: dict = {"runs": []}
    opts = dict(repeat=1, layout="spread", lr=args.lr, batch_size=16)
    with get_bench("microwave").simulated_rig() as rig, \
            DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="") as server, RigClient(server.address) as client:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cal_path = out / f"calibration-{int(time.time())}.h5"
        t0 = time.perf_counter()
        with SessionWriter(cal_path, client.describe()) as writer:
            twin, fit, calibration = calibrate_and_fit(client, args.calibration_rows, writer=writer, seed=0,
                                                       twin_seconds=args.twin_seconds, progress=not args.quiet)
        results["twin"] = {"rows": int(len(calibration[0])), "seconds": time.perf_counter() - t0,
                           "holdout_r2": fit.get("holdout_r2"), "noise_ratio": fit.get("noise_ratio"),
                           "levels": twin.levels}
        print(f"twin: {results['twin']}", flush=True)
        for seed in range(args.seeds):
            ds = load_dataset("vowels", seed=seed)
            row = {"seed": seed, "logistic": logistic_baseline(ds)["test"]}
            for name, method, extra in (("pat", "pat", {}), ("insilico", "insilico", {}),
                                        ("pat_frozen", "pat", {"freeze_physical": True})):
                try:
                    r = train(client, ds, method=method, twin=twin, calibration=calibration, epochs=args.epochs,
                              seed=seed, progress=False, **opts, **extra)
                except TypeError as exc:  # an option this trainer does not have
                    row[name] = None
                    print(f"{name}: skipped ({exc})", flush=True)
                    continue
                row[name] = r.test_accuracy
                row[f"{name}_passes"] = r.passes
                if name == "pat":
                    row["logistic_quantised_inputs"] = quantised_input_baseline(r.network, ds)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    return results


def quantised_input_baseline(net, ds) -> float:
    """Logistic regression on the bits the trained network's first layer puts on its input atoms
    (its input encoding, thresholded as the binary metasurface does)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    layer = net.layers[0]

    def bits(X):
        with torch.no_grad():
            controls = layer.encode(torch.as_tensor(X))
        return (controls[:, layer.input_channels] >= 0.5).numpy().astype(np.float32)

    clf = LogisticRegression(max_iter=2000).fit(bits(ds.X_train), ds.y_train)
    return float(clf.score(bits(ds.X_test), ds.y_test))


def encoding_capacity(splits: int = 5, shapes=((12, 1), (12, 2), (12, 3), (8, 2), (6, 2), (5, 3), (4, 4))) -> list[dict]:
    """What binary meta-atoms can carry of the vowels, before any physics: a digital logistic
    regression on the bits a thermometer code puts on the atoms (features reduced by PCA to F, each
    on ``a`` atoms with thresholds at the training split's quantiles 1/(a+1) ... a/(a+1) — what a
    network's per-atom affine map before the quantiser can learn), over seeded splits. An upper
    bound a network on that encoding can hope for with a linear readout."""
    from sklearn.linear_model import LogisticRegression

    from labpnn.training.datasets import load_dataset, reduce_features

    rows = []
    for features, atoms in shapes:
        accs = []
        for seed in range(splits):
            ds = reduce_features(load_dataset("vowels", seed=seed), features)
            q = np.quantile(ds.X_train, np.arange(1, atoms + 1) / (atoms + 1), axis=0)  # [atoms, F]

            def bits(X, q=q):
                return np.concatenate([(level < X).astype(np.float32) for level in q], 1)

            clf = LogisticRegression(max_iter=5000).fit(bits(ds.X_train), ds.y_train)
            accs.append(clf.score(bits(ds.X_test), ds.y_test))
        m, se = mean_se(accs)
        rows.append({"features": features, "atoms_per_feature": atoms, "input_atoms": features * atoms,
                     "logistic_mean": m, "logistic_se": se, "splits": splits})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--calibration-rows", type=int, default=4000)
    p.add_argument("--twin-seconds", type=float, default=90.0)
    p.add_argument("--rows", type=int, default=64, help="throughput: configurations per batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--encoding-capacity", action="store_true",
                   help="only the encodings' capacity: a logistic regression on the atoms' bits (no physics)")
    p.add_argument("--out", default="runs/bench_microwave")
    args = p.parse_args(argv)
    if args.encoding_capacity:
        print("vowels on binary atoms, before any physics: logistic regression on thermometer-coded bits "
              f"({args.seeds} splits)")
        print(f"{'features':>9} {'atoms each':>11} {'input atoms':>12} {'logistic':>16}")
        for r in encoding_capacity(args.seeds):
            print(f"{r['features']:>9} {r['atoms_per_feature']:>11} {r['input_atoms']:>12} "
                  f"{100 * r['logistic_mean']:>9.1f} ± {100 * r['logistic_se']:.1f} %")
        return 0
    if args.quick:
        args.seeds, args.epochs, args.calibration_rows, args.twin_seconds, args.rows = 1, 3, 600, 15.0, 16
    report: dict = {"args": vars(args), "load": os.getloadavg()}
    print("throughput (configurations through server -> controller -> VNA):", flush=True)
    report["throughput"] = throughput(args.rows, args.repeats)
    print(f"{'read-back':>10} {'stack ms/cfg':>13} {'cfg/s':>7} {'limit ms/cfg':>13} {'of limit':>9} "
          f"{'repeats':>10} {'physics ms':>11} {'stack/physics':>14}")
    for t in report["throughput"]:
        spread = f"{min(t['fraction_per_repeat']):.2f}-{max(t['fraction_per_repeat']):.2f}"
        print(f"{'on' if t['verify'] else 'off':>10} {t['stack_s_per_config'] * 1e3:>13.2f} {t['configs_per_s']:>7.1f} "
              f"{t['instrument_s_per_config'] * 1e3:>13.2f} {t['fraction_of_limit']:>9.2f} {spread:>10} "
              f"{t['physics_s_per_config'] * 1e3:>11.2f} {t['stack_over_physics']:>14.1f}")
    print(f"(of limit: the median of {args.repeats} repeats of {args.rows} rows; load average "
          f"{report['load'][0]:.1f} before, {os.getloadavg()[0]:.1f} after)")
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(args)
        runs = report["accuracy"]["runs"]
        print(f"\nvowels on the simulated microwave bench, {len(runs)} split(s), test accuracy on the physics "
              "(mean ± s.e.):")
        for key in ("pat", "insilico", "pat_frozen", "logistic_quantised_inputs", "logistic"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                m, se = mean_se(vals)
                print(f"  {key:<26} {100 * m:5.1f} ± {100 * se:4.1f} %")
        print(f"  twin: {report['accuracy']['twin']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_microwave.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
