"""Benchmark: data-parallel PAT over 1, 2 and 4 copies of the simulated optical bench.

Every copy is its own process (`labpnn.benches.optical.ServedCopy`: `labpnn sim optical --serve`,
emulators + drivers + device server), every rig its own training process under ``torchrun`` (one
rank per rig; one rig runs without torchrun, as a lab would).

1. **Throughput** at the bench's realistic latency (20 ms settle + 200 ms sweep per row) and a fixed
   global batch: training passes per second of training-step wall time (rank 0's, the ranks step
   together) with 1, 2 and 4 rigs, and the ratio to N x one rig (goal >= 0.9). Every rank gets the
   same twin (fitted once at zero latency, ``--twin``): calibration is not what is measured here.
2. **Accuracy** after the same number of epochs, run at ZERO latency (labelled: the latency changes
   the wall time, not the result), every rank calibrating its own twin on its own copy: the test
   accuracy of the data-parallel network on every copy, beside a network trained on copy 0 alone
   and deployed on the others.

    python scripts/bench_many_rigs.py            # both parts (~15-25 min on 2 shared cores)
    python scripts/bench_many_rigs.py --quick    # 1 and 2 rigs, short
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_cmd(addresses: list[str], *options: str) -> list[str]:
    base = ([sys.executable, "-m", "labpnn"] if len(addresses) == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(len(addresses)),
             "-m", "labpnn"])
    return [*base, "train", *(a for addr in addresses for a in ("--rig", addr)), "--quiet", *options]


def run_json(cmd: list[str], cwd: Path) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


@contextlib.contextmanager
def copies(n: int, **timing):
    from labpnn.benches.optical import ServedCopy

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ServedCopy(k, seed=k, **timing)) for k in range(n)]


def fit_shared_twin(work: Path, calibration: list[str]) -> Path:
    """A twin of copy 0, fitted at zero latency, checkpointed (its file next to the checkpoint)."""
    ck = work / "twin-source.pt"
    with copies(1) as (rig,):
        run_json(train_cmd([rig.address], "--epochs", "1", "--checkpoint", str(ck), *calibration), work)
    return ck.with_name(ck.name + ".twin.pt")


def throughput(work: Path, counts: list[int], twin: Path, batch: int, epochs: int) -> list[dict]:
    rows = []
    for n in counts:
        with copies(n, settle_ms=20.0, sweep_ms=200.0) as rigs:
            started = time.perf_counter()
            out = run_json(train_cmd([r.address for r in rigs], "--twin", str(twin), "--epochs", str(epochs),
                                     "--batch-size", str(batch)), work)
            wall = time.perf_counter() - started
        duty = out["duty_cycle"]
        rows.append({"rigs": n, "train_passes": out["passes"]["train"], "step_wall_s": duty["wall_s"],
                     "passes_per_s": out["passes"]["train"] / duty["wall_s"], "run_s": wall})
        print(f"  {n} rig(s): {rows[-1]['passes_per_s']:.2f} training passes/s", file=sys.stderr, flush=True)
    one = rows[0]["passes_per_s"]
    for r in rows:
        r["vs_n_times_one"] = r["passes_per_s"] / (r["rigs"] * one)
    return rows


def accuracy(work: Path, n: int, copies_deployed: int, epochs: int, calibration: list[str]) -> dict:
    """Data-parallel over copies 0..n-1 vs copy 0 alone, both deployed on copies 0..copies_deployed-1
    (zero latency)."""

    from labpnn.remote.client import RigClient
    from labpnn.training.checkpoint import load_network
    from labpnn.training.datasets import load_dataset
    from labpnn.training.pat import PhysicsForward
    from labpnn.training.trainer import evaluate

    ds = load_dataset("vowels", seed=0)

    def deployed(checkpoint: Path, rigs) -> list[float]:
        net, out = load_network(checkpoint), []
        for rig in rigs:
            client = RigClient(rig.address)
            try:
                out.append(evaluate(net, ds.X_test, ds.y_test, PhysicsForward(client))[0])
            finally:
                client.close()
        return out

    with copies(max(n, copies_deployed)) as rigs:
        print(f"accuracy: data-parallel over {n} copies ...", file=sys.stderr, flush=True)
        ck_together, ck_alone = work / "together.pt", work / "alone.pt"
        together = run_json(train_cmd([r.address for r in rigs[:n]], "--epochs", str(epochs), "--checkpoint",
                                      str(ck_together), *calibration), work)
        print("accuracy: copy 0 alone ...", file=sys.stderr, flush=True)
        alone = run_json(train_cmd([rigs[0].address], "--epochs", str(epochs), "--checkpoint", str(ck_alone),
                                   *calibration), work)
        return {"trained_on": n, "data_parallel_report": [r["test_accuracy"] for r in together["rigs"]],
                "data_parallel": deployed(ck_together, rigs), "alone_on_copy0": deployed(ck_alone, rigs),
                "alone_test_reported": alone["test_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rigs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=32, help="global batch (fixed across rig counts)")
    p.add_argument("--throughput-epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=30, help="epochs of the accuracy runs")
    p.add_argument("--accuracy-rigs", type=int, default=2,
                   help="copies trained on together in the accuracy part (the others are deployed on)")
    p.add_argument("--calibration-rows", type=int, help="first calibration sweep (default: the trainer's rule)")
    p.add_argument("--twin-seconds", type=float, help="twin fitting time per round (default: the trainer's)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 and 2 rigs, short runs")
    p.add_argument("--out", default="runs/bench_many_rigs")
    args = p.parse_args()
    if args.quick:
        args.rigs, args.epochs, args.calibration_rows, args.twin_seconds = [1, 2], 2, 400, 5
    calibration = []
    if args.calibration_rows:
        calibration += ["--calibration-rows", str(args.calibration_rows), "--calibration-budget",
                        str(args.calibration_rows)]
    if args.twin_seconds:
        calibration += ["--twin-seconds", str(args.twin_seconds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        if not args.skip_throughput:
            print("fitting one twin for the throughput runs ...", file=sys.stderr, flush=True)
            twin = fit_shared_twin(work, calibration)
            print("throughput at 20 ms settle + 200 ms sweep per row ...", file=sys.stderr, flush=True)
            rows = throughput(work, args.rigs, twin, args.batch, args.throughput_epochs)
        acc = None if args.skip_accuracy else accuracy(work, args.accuracy_rigs, max(args.rigs), args.epochs,
                                                       calibration)
    print(f"\ndata-parallel PAT, optical bench, vowels, global batch {args.batch}, "
          f"{args.throughput_epochs} epoch(s) at 20 ms settle + 200 ms sweep per row\n")
    print("| rigs | training passes | step wall time | passes/s | / (N x one rig) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rigs']} | {r['train_passes']} | {r['step_wall_s']:.1f} s | {r['passes_per_s']:.2f} | "
              f"{r['vs_n_times_one']:.2f} |")
    if acc is not None:
        n = len(acc["data_parallel"])
        print(f"\ntest accuracy on each copy after {args.epochs} epochs (ZERO latency; each rank calibrates its own "
              f"twin on its own copy{'' if args.calibration_rows is None else f', {args.calibration_rows} rows'})\n")
        print("| network | " + " | ".join(f"copy {k}" for k in range(n)) + " | worst |")
        print("|---|" + "---|" * (n + 1))
        for name, values in ((f"data-parallel over copies 0-{acc['trained_on'] - 1}", acc["data_parallel"]),
                             ("trained on copy 0 alone", acc["alone_on_copy0"])):
            print(f"| {name} | " + " | ".join(f"{100 * v:.1f} %" for v in values) + f" | {100 * min(values):.1f} % |")
    (out / "results.json").write_text(json.dumps({"throughput": rows, "accuracy": acc, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
