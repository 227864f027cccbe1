"""``labpnn demo``: the main job, end to end, on a simulated bench — nothing leaves 127.0.0.1.

1. starts the simulated bench (``--bench``, from `labpnn.benches`: for the optical bench the
   WaveShaper and AQ6370 emulators, zero latency, behind the real drivers and `Rig`, serving the
   rig of ``examples/optical-sim.toml``) and a `DeviceServer` on loopback serving it; everything
   after that goes through a `RigClient`;
2. calibrates (a sweep steered toward the controls the initial network sends, plus repeats for
   the noise floor; ``calibration.h5``) and fits the twin (``twin.pt``);
3. trains the vowel classifier with PAT and in-silico (same twin, same split, same seed), each
   recording its own session and report (``pat/``, ``insilico/``), both evaluated on the physics;
4. prints a results table and where the files are, and shuts everything down.

``--quick`` is a short version (small calibration, short fit, a few epochs) for smoke tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from labpnn.benches import BENCHES, get_bench

log = logging.getLogger(__name__)

def simulated_bench(bench: str = "optical", *, settle_s: float = 0.0, sweep_s: float = 0.0, seed: int = 0):
    """A connected `Rig` on bench ``bench``'s simulated instruments (`labpnn.benches`), closed on exit."""
    return get_bench(bench).simulated_rig(settle_s=settle_s, sweep_s=sweep_s, seed=seed)


def run_demo(out_dir: str | Path | None = None, *, bench: str = "optical", quick: bool = False, seed: int = 0,
             layers: int = 1, epochs: int | None = None, online_twin: bool | None = None, settle_s: float = 0.0,
             sweep_s: float = 0.0,
             progress: bool = True, dataset: str = "vowels", calibration_rows: int | None = None,
             twin_seconds: float | None = None) -> dict[str, Any]:
    """Run the main job; returns the summary written to ``OUT/demo.json``."""
    import torch

    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer
    from labpnn.sessions import SessionWriter, provenance
    from labpnn.training.datasets import load_dataset
    from labpnn.training.trainer import (
        TrainSettings,
        calibrate_and_fit,
        operating_controls,
        resolve_settings,
        train,
    )
    from labpnn.twin import save_twin

    out = Path(out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    cal_rows = calibration_rows or (400 if quick else 4000)
    twin_seconds = twin_seconds or (15.0 if quick else 75.0)
    epochs = epochs or (3 if quick else 40)
    started = time.perf_counter()
    ds = load_dataset(dataset, seed=seed)
    summary: dict[str, Any] = {"bench": bench, "dataset": ds.summary(), "layers": layers, "seed": seed,
                               "quick": quick, "out": str(out)}
    with simulated_bench(bench, settle_s=settle_s, sweep_s=sweep_s, seed=seed) as rig, \
            DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="", name=f"demo-{bench}") as server, \
            RigClient(server.address) as client:
        summary["server"] = server.address
        print(f"bench {bench!r} served at {server.address}; outputs in {out}/", flush=True)
        settings = TrainSettings(layers=layers, seed=seed)
        writer = SessionWriter(out / "calibration.h5", client.describe(), provenance={"seeds": {"calibration": seed}})
        try:
            t0 = time.perf_counter()
            twin, fit, calibration = calibrate_and_fit(
                client, cal_rows, writer=writer, centres=operating_controls(client, ds, settings), seed=seed,
                twin_seconds=twin_seconds, twin_core=resolve_settings(settings, client.describe(), ds)[0].twin_core,
                progress=progress)
        finally:
            writer.close()
        save_twin(twin, out / "twin.pt")
        summary["calibration"] = {"rows": int(len(calibration[0])), "seconds": time.perf_counter() - t0,
                                  "twin_holdout_nmse": fit.get("holdout_nmse"), "twin_noise_ratio": fit.get("noise_ratio")}
        print(f"calibrated {len(calibration[0])} rows and fitted the twin in {time.perf_counter() - t0:.0f} s "
              f"(held-out NMSE {fit.get('holdout_nmse') or float('nan'):.3f})", flush=True)
        results = {}
        for method in ("pat", "insilico"):
            torch.manual_seed(seed)
            r = train(client, ds, method=method, twin=twin, calibration=calibration, layers=layers, epochs=epochs,
                      seed=seed, session=out / method / "session.h5", report_dir=out / method,
                      online_twin=online_twin, progress=progress)
            results[method] = r.summary()
            results[method]["report"] = str(out / method / "report.json")
    summary["results"] = {m: {k: r[k] for k in ("test_accuracy", "val_accuracy", "best_epoch", "passes",
                                                "passes_to_target", "twin_test_accuracy", "digital_baseline",
                                                "duty_cycle", "seconds", "report", "session")}
                          for m, r in results.items()}
    summary["seconds"] = time.perf_counter() - started
    summary["provenance"] = provenance(seeds={"demo": seed})
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    res = summary["results"]
    base = next(iter(res.values()))["digital_baseline"] or {}
    lines = [
        "",
        f"vowels on the simulated {summary['bench']} bench, {summary['layers']} physical layer(s), seed {summary['seed']}"
        f" — accuracy measured on the physics ({summary['dataset']['test']} test samples)",
        f"{'method':<10} {'test acc':>9} {'val acc':>8} {'train passes':>13} {'to 95% val':>11} "
        f"{'eval passes':>12} {'twin-only test':>15}",
    ]
    for method, r in res.items():
        p = r["passes"]
        to_target = r["passes_to_target"]
        lines.append(f"{method:<10} {r['test_accuracy']:>9.3f} {r['val_accuracy']:>8.3f} {p['train']:>13d} "
                     f"{('-' if to_target is None else str(to_target)):>11} {p['validation'] + p['test']:>12d} "
                     f"{r['twin_test_accuracy']:>15.3f}")
    lines.append(f"{'logistic':<10} {base.get('test', float('nan')):>9.3f} {base.get('validation', float('nan')):>8.3f}"
                 "   (digital linear classifier on the same split)")
    cal = summary["calibration"]
    lines.append(f"calibration: {cal['rows']} passes (shared), twin held-out NMSE {cal['twin_holdout_nmse']:.3f}")
    lines.append(f"files: {summary['out']}/  (demo.json, calibration.h5, twin.pt, pat/, insilico/: report.json, "
                 "PNGs, session.h5)")
    lines.append(f"total {summary['seconds']:.0f} s")
    return "\n".join(lines)


def cli_demo(parser: argparse.ArgumentParser):
    parser.add_argument("--quick", action="store_true", help="a short version (smoke test)")
    parser.add_argument("--bench", choices=sorted(BENCHES), default="optical")
    parser.add_argument("--out", help="output directory (default runs/demo-TIMESTAMP)")
    parser.add_argument("--layers", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--online-twin", action=argparse.BooleanOptionalAction, default=None,
                        help="refine the twin online during PAT (default: on with 2+ layers)")
    parser.add_argument("--settle-ms", type=float, default=0.0, help="shaper settle time per row (default 0)")
    parser.add_argument("--sweep-ms", type=float, default=0.0, help="OSA sweep time per row (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def handler(args: argparse.Namespace) -> int:
        logging.getLogger("labpnn").setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
        run_demo(args.out, bench=args.bench, quick=args.quick, seed=args.seed, layers=args.layers, epochs=args.epochs,
                 online_twin=args.online_twin, settle_s=args.settle_ms / 1e3, sweep_s=args.sweep_ms / 1e3,
                 progress=not args.quiet)
        return 0

    return handler
