"""Throughput of the optical bench through the whole stack, and where the time goes.

Compares, in one run, at zero instrument latency and at a realistic one (mask settle and OSA
sweep time configured in the emulators):

- physics  — a direct call of the SHG model (`SHGBench.shot`), the floor no stack can beat;
- shaper   — the WaveShaper driver's `apply` alone (profile build + HTTP upload + emulator parse);
- osa      — the AQ6370 driver's `acquire` alone (sweep + status polling + binary trace read);
- rig      — `Rig.measure` in-process (drivers -> emulators -> physics);
- server   — `RigClient` -> device server -> the same rig.

Software overhead = wall time minus the configured instrument time (settle + sweep per row);
target: under 5 % of the instrument time at the realistic setting.

    python scripts/bench_optical.py [--rows 16] [--settle-ms 20] [--sweep-ms 200] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from labpnn.config import build_rig, load_config
from labpnn.sim_instruments.optical_bench import OpticalBenchEmulators
from labpnn.sim_instruments.shg import OpticalBenchConfig, SHGBench


def _rig_config(emu: OpticalBenchEmulators):
    config = load_config("examples/optical-sim.toml")
    config.rig.shaper.url = emu.shaper_url
    config.rig.osa.resource = emu.osa_resource
    return config


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats``."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(settle_s: float, sweep_s: float, rows: int, repeats: int) -> dict[str, float]:
    """Seconds per row for each stage."""
    batch = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    out: dict[str, float] = {}
    physics = SHGBench(OpticalBenchConfig())
    shaper = load_config("examples/optical-sim.toml").rig.shaper  # the rig the emulators are driven through
    attn = shaper.attn_max_db * (1 - batch.astype(np.float64)) + shaper.attn_min_db * batch

    def direct():
        for row in attn:
            physics.set_mask_channels(row)
            physics.shot()

    out["physics"] = _time(direct, repeats) / rows
    with OpticalBenchEmulators(shaper_port=0, osa_port=0, settle_s=settle_s, sweep_s=sweep_s) as emu:
        config = _rig_config(emu)
        with build_rig(config) as rig:
            shaper, osa = rig.actuators[0], rig.sensors[0]
            out["shaper"] = _time(lambda: [shaper.apply(r) for r in batch], repeats) / rows
            out["osa"] = _time(lambda: [osa.acquire() for _ in batch], repeats) / rows
            out["rig"] = _time(lambda: rig.measure(batch).raise_for_error(), repeats) / rows
            try:
                from labpnn.remote.client import RigClient
                from labpnn.remote.server import DeviceServer
            except ImportError:
                return out
            with DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="") as server, \
                    RigClient(server.address) as client:
                client.run(batch[:1])
                out["server"] = _time(lambda: client.run(batch), repeats) / rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="rows per batch")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per stage (median)")
    parser.add_argument("--settle-ms", type=float, default=20.0, help="realistic mask settle time")
    parser.add_argument("--sweep-ms", type=float, default=200.0, help="realistic OSA sweep time")
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 8, 2
    settings = [("zero latency", 0.0, 0.0),
                (f"realistic ({args.settle_ms:g} ms settle + {args.sweep_ms:g} ms sweep)",
                 args.settle_ms / 1e3, args.sweep_ms / 1e3)]
    for label, settle, sweep in settings:
        per_row = measure(settle, sweep, args.rows, args.repeats)
        instrument = settle + sweep
        print(f"\n{label}: {args.rows} rows x 64 controls -> 512 pixels, median of {args.repeats}")
        print(f"{'stage':<10}{'ms/row':>10}{'rows/s':>10}{'vs physics':>12}{'overhead ms':>13}{'overhead %':>12}")
        for stage, seconds in per_row.items():
            extra = seconds - instrument if stage in ("rig", "server") else float("nan")
            share = 100 * extra / instrument if instrument and stage in ("rig", "server") else float("nan")
            print(f"{stage:<10}{seconds * 1e3:>10.2f}{1 / seconds:>10.1f}"
                  f"{per_row['physics'] / seconds:>12.3f}{extra * 1e3:>13.2f}{share:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
