"""``labpnn train``: train a physical network on a rig (a device server, or a config run in-process),
or data-parallel on several copies of a rig under ``torchrun`` (one ``--rig`` per process)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labpnn.contract import PhysicalSystem
from labpnn.training import parallel as dp
from labpnn.training.trainer import train


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=("pat", "insilico", "phyll", "phyll-paper", "spsa", "reservoir",
                                             "reservoir-ridge"), default="pat",
                        help="pat, insilico (with a twin); phyll, spsa, reservoir (model-free: no twin)")
    parser.add_argument("--dataset", default="vowels", help="vowels, digits, or a CSV/NPZ file")
    parser.add_argument("--twin", help="a twin checkpoint (default: calibrate and fit one)")
    parser.add_argument("--layers", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--epochs", type=int, help="default: ~8,000 training passes / the training rows, in [8, 60]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="default: from the training rows, 16-64")
    parser.add_argument("--lr", type=float, help="default: 0.05 x sqrt(batch / 16)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), help="default: cosine beyond 600 steps")
    parser.add_argument("--readout", choices=("physical", "hybrid"), default="physical",
                        help="hybrid: a digital linear classifier on the last layer (a hybrid network)")
    parser.add_argument("--session", help="record every batch to this session file (HDF5)")
    parser.add_argument("--report", help="write report.json and PNGs to this directory")
    parser.add_argument("--online-twin", action=argparse.BooleanOptionalAction, default=None,
                        help="refine the twin online from training batches (default: on for PAT with 2+ layers)")
    parser.add_argument("--drift-probe-rows", type=int,
                        help="with --online-twin: rows re-measured to tell drift (default 4; 0: no drift alarms)")
    parser.add_argument("--drift-probe-every", type=int, help="re-measure them after every K-th training batch (4)")
    parser.add_argument("--drift-threshold", type=float,
                        help="drift alarm above this change / repeat noise (default 3: 2.4x the largest "
                        "no-drift value measured on the optical bench)")
    parser.add_argument("--checkpoint", help="checkpoint file, written after every epoch")
    parser.add_argument("--resume", help="resume from this checkpoint")
    parser.add_argument("--calibration-rows", type=int,
                        help="first calibration sweep (without --twin; default 60 per control channel)")
    parser.add_argument("--calibration-budget", type=int,
                        help="most calibration rows to reach --twin-target (default 3x the first sweep)")
    parser.add_argument("--twin-target", type=float,
                        help="twin noise ratio on the operating region to reach (default 1.5; 1.0 = noise floor)")
    parser.add_argument("--twin-seconds", type=float, help="twin fitting time per round (without --twin; default 120)")
    parser.add_argument("--twin-core", choices=("residual_mlp", "modulus"),
                        help="the twin's core (without --twin; default: the bench's, else residual_mlp)")
    parser.add_argument("--hidden", type=int, help="pooled features between physical layers (default: as the input)")
    parser.add_argument("--features", type=int, help="input features (fewer: PCA on the training split; "
                        "default: all that fit in 60%% of the control channels)")
    parser.add_argument("--repeat", type=int, help="control channels per input feature (default: fill ~60%% of them)")
    parser.add_argument("--layout", help="first layer's channel layout (default grouped:0.15-0.85)")
    parser.add_argument("--pooling", choices=("balanced", "equal-mass", "equal-width"),
                        help="readout bin placement (default balanced: every class can win)")
    parser.add_argument("--hidden-layout", help="deeper layers' channel layout (default: --layout)")
    parser.add_argument("--chunk-rows", type=int, default=0, help="PAT pipelining: rows per chunk (0: off)")
    parser.add_argument("--in-flight", type=int, default=2, help="PAT pipelining: chunks in flight")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """`TrainSettings` fields from `add_training_arguments` options (unset ones None: chosen by
    `labpnn.training.defaults`)."""
    opts = {"batch_size": args.batch_size, "lr": args.lr, "lr_schedule": args.lr_schedule, "readout": args.readout,
            "repeat": args.repeat, "features": args.features, "pooling": args.pooling,
            "calibration_rows": args.calibration_rows, "calibration_budget": args.calibration_budget,
            "twin_target": args.twin_target, "twin_seconds": args.twin_seconds, "twin_core": args.twin_core,
            "chunk_rows": args.chunk_rows, "in_flight": args.in_flight, "hidden": args.hidden}
    for name in ("drift_probe_rows", "drift_probe_every", "drift_threshold"):  # not chosen by the defaults
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.layout:
        opts["layout"] = args.layout
    if args.hidden_layout:
        opts["hidden_layout"] = args.hidden_layout
    return opts


def cli_train(parser: argparse.ArgumentParser):
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--rig", action="append",
                       help="device server address, e.g. tcp://127.0.0.1:5555; several (one per process) to train "
                       "data-parallel under torchrun --nproc-per-node N: rank i drives the i-th")
    where.add_argument("--config", help="a rig config (RIG.toml) to run in-process")
    parser.add_argument("--rig-timeout", type=float, default=10.0,
                        help="seconds a rig may stay silent (x3 attempts) before it counts as failed (default 10); "
                        "data-parallel, a vanished rank is given twice that")
    add_training_arguments(parser)

    def handler(args: argparse.Namespace) -> int:
        try:
            parallel, address = _join(args)
        except ValueError as exc:
            print(f"labpnn train: {exc}", file=sys.stderr)
            return 2
        session = args.session
        if parallel is not None and session:  # each rank records its own rig
            session = str(Path(session).with_suffix(f".rank{parallel.rank}{Path(session).suffix or '.h5'}"))
        try:
            with _open_system(args, address) as system:
                result = train(system, args.dataset, method=args.method, twin=args.twin, layers=args.layers,
                               epochs=args.epochs, seed=args.seed, session=session, report_dir=args.report,
                               online_twin=args.online_twin, checkpoint=args.checkpoint, resume=args.resume,
                               progress=not args.quiet, announce=_announce if parallel is None or parallel.rank == 0
                               else None, parallel=parallel, **training_options(args))
        except dp.RunStopped as stop:
            where = f"rank {parallel.rank}: " if parallel is not None else ""
            print(f"labpnn train: {where}stopped: {stop}" + (
                f"; checkpoint {stop.checkpoint}: resume with --resume {stop.checkpoint} on the rigs left"
                if stop.checkpoint else " (no --checkpoint given: nothing to resume from)"), file=sys.stderr)
            return 3
        finally:
            if parallel is not None:
                dp.stop()
        if parallel is None or parallel.rank == 0:
            print(json.dumps({k: v for k, v in result.summary().items() if k not in ("events", "twin_fit")},
                             indent=2))
        return 0

    return handler


def _join(args: argparse.Namespace):
    """``(DataParallel or None, this process's rig address)``: one ``--rig`` trains alone; several
    need ``torchrun`` with one process per rig."""
    rigs = args.rig or []
    if not dp.launched():
        if len(rigs) > 1:
            raise ValueError(f"{len(rigs)} rigs given: launch with `torchrun --nproc-per-node {len(rigs)} -m labpnn "
                             "train --rig ... --rig ...` (one process per rig)")
        return None, rigs[0] if rigs else None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if len(rigs) != world:
        raise ValueError(f"torchrun started {world} processes but {len(rigs)} --rig were given: one rig per process")
    if args.method not in ("pat", "insilico"):
        raise ValueError(f"--method {args.method} does not run data-parallel (pat and insilico do)")
    return dp.start(step_timeout_s=2 * 3 * args.rig_timeout), rigs[rank]


def _announce(line: str) -> None:
    """A chosen setting and its reason, on stderr (stdout carries the JSON summary)."""
    print(f"setting {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _open_system(args, address: str | None) -> Iterator[PhysicalSystem]:
    if address:
        from labpnn.remote.client import RigClient

        client = RigClient(address, timeout_s=args.rig_timeout)
        try:
            yield client
        finally:
            client.close()
    else:
        from labpnn.config import build_rig, load_config

        rig = build_rig(load_config(args.config)).connect()
        try:
            yield rig
        finally:
            rig.close()
