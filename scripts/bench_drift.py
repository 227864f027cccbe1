"""Benchmark: the drift probes' statistic D without drift (the null distribution the alarm threshold
is chosen from) and after attenuation steps, on the default simulated optical bench.

The bench: `SHGBench(OpticalBenchConfig())` (64 shaper channels -> 512 pixels, the bench's own noise
and slow per-shot drift: 0.1 % pulse energy and 0.003 nm per 1,000 shots), in-process, controls
mapped as the optical bench's shaper does (``attn_dB = 30 (1 - x)``), traces in uW. A training-like
stream: batches of 16 rows around 32 operating points that travel, over the run, from one random
set to another (what training does to the controls); a `labpnn.training.drift.DriftProbe` (4 rows
of the first batch, reference measured twice) probes after every 4th batch. Every probe is judged
by several probes at once (one measurement, several references): ``refresh`` 0 (the first reference
for good) and the default 0.1. At the end, D of the probe rows with every channel's attenuation
raised by 0.1 / 0.3 / 1 dB, against the refreshed reference.

Cases: the operating points' control range (``dim`` 0.3-0.9: 3-21 dB; ``full`` 0-1; ``bright``
0.8-1.0: 0-6 dB, where the SH is strongest and a relative drift shows most) and the drift scale
(x1: the bench; x3 on the bright case: a bench three times less stable).

    python scripts/bench_drift.py                  # 200,000 shots per run, 3 seeds
    python scripts/bench_drift.py --quick          # 20,000 shots, 1 seed
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

CASES = {"dim": (0.3, 0.9, 1.0), "full": (0.0, 1.0, 1.0), "bright": (0.8, 1.0, 1.0), "bright, drift x3": (0.8, 1.0, 3.0)}
REFRESH = (0.0, 0.1)
STEPS_DB = (0.1, 0.3, 1.0)


def run_case(lo: float, hi: float, drift: float, shots: int, seed: int, batch: int = 16, every: int = 4) -> dict:
    from labpnn.benches.optical import OpticalPhysics
    from labpnn.training.drift import DriftProbe

    plant = OpticalPhysics(seed=seed, drift_scale=drift, resolution_db=1e-9)
    n_ch = plant.bench.config.n_channels
    rng = np.random.default_rng(seed)
    start, end = rng.uniform(lo, hi, (32, n_ch)), rng.uniform(lo, hi, (32, n_ch))
    n_batches = int(shots / (batch + 4 / every))

    def rows(k: int) -> np.ndarray:
        t = min(1.0, k / n_batches)
        x = ((1 - t) * start + t * end)[rng.integers(0, 32, batch)] + 0.1 * rng.standard_normal((batch, n_ch))
        return np.clip(x, 0, 1).astype(np.float32)

    probes = [DriftProbe(plant, refresh=a, threshold=np.inf, seed=seed) for a in REFRESH]
    probes[0].start(rows(0))
    for p in probes[1:]:
        p.controls, p.noise_model = probes[0].controls, probes[0].noise_model
        p.reference, p.reference_fraction = probes[0].reference.copy(), probes[0].reference_fraction
    k = 0
    while plant.bench.shots < shots:
        plant.run(rows(k))
        k += 1
        if k % every == 0:
            m = plant.run(probes[0].controls).astype(np.float64)
            for p in probes:
                p._measure = lambda m=m: m  # one measurement, judged against each reference
                p.probe()
    ref = probes[REFRESH.index(0.1)]
    steps = {}
    for db in STEPS_DB:
        plant.offset_db = db
        steps[db] = ref.statistic(plant.run(ref.controls))
    out = {"shots": plant.bench.shots, "probes": len(ref.history), "steps": steps}
    for a, p in zip(REFRESH, probes, strict=True):
        d = np.array([s.statistic for s in p.history])
        out[a] = {"median": float(np.median(d)), "p99": float(np.quantile(d, 0.99)), "max": float(d.max())}
    return out


def _agg(runs: list[dict], refresh: float) -> str:
    return (f"{np.median([r[refresh]['median'] for r in runs]):.2f} / {max(r[refresh]['p99'] for r in runs):.2f} / "
            f"{max(r[refresh]['max'] for r in runs):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--quick", action="store_true", help="20,000 shots, 1 seed")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shots, args.seeds = 20_000, 1
    print(f"D without drift over {args.shots:,} shots per run (probes after every 4th batch of 16), and D after "
          f"steps; {args.seeds} seed(s) per case")
    print(f"{'case':<18} {'probes':>7} {'refresh 0: median / p99 / max':>31} {'refresh 0.1: median / p99 / max':>33}   "
          + "   ".join(f"+{db:g} dB" for db in STEPS_DB))
    results = {}
    for name in args.cases:
        lo, hi, drift = CASES[name]
        runs = []
        for seed in range(args.seeds):
            started = time.perf_counter()
            runs.append(run_case(lo, hi, drift, args.shots, seed))
            print(f"  ({name}, seed {seed}: {time.perf_counter() - started:.0f} s)", file=sys.stderr)
        results[name] = runs
        steps = "   ".join(f"{min(r['steps'][db] for r in runs):>7.1f}" for db in STEPS_DB)
        print(f"{name:<18} {sum(r['probes'] for r in runs):>7} {_agg(runs, 0.0):>31} {_agg(runs, 0.1):>33}   {steps}")
    print("(median: of the runs' medians; p99, max: the largest over the runs; steps: the smallest D over the runs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: [{**{str(a): v for a, v in r.items() if a in REFRESH}, "shots": r["shots"],
                            "probes": r["probes"], "steps": {str(d): s for d, s in r["steps"].items()}} for r in runs]
                       for k, runs in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
