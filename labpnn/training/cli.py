"""``labpnn train``: train a physical network on a rig (a device server, or a config run in-process)."""
from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from labpnn.contract import PhysicalSystem
from labpnn.training.trainer import train


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=("pat", "insilico"), default="pat")
    parser.add_argument("--dataset", default="vowels", help="vowels, digits, or a CSV/NPZ file")
    parser.add_argument("--twin", help="a twin checkpoint (default: calibrate and fit one)")
    parser.add_argument("--layers", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--readout", choices=("physical", "hybrid"), default="physical",
                        help="hybrid: a digital linear classifier on the last layer (a hybrid network)")
    parser.add_argument("--session", help="record every batch to this session file (HDF5)")
    parser.add_argument("--report", help="write report.json and PNGs to this directory")
    parser.add_argument("--online-twin", action="store_true", help="refine the twin online from training batches")
    parser.add_argument("--checkpoint", help="checkpoint file, written after every epoch")
    parser.add_argument("--resume", help="resume from this checkpoint")
    parser.add_argument("--calibration-rows", type=int, default=4000, help="calibration sweep size (without --twin)")
    parser.add_argument("--twin-seconds", type=float, default=120.0, help="twin fitting budget (without --twin)")
    parser.add_argument("--hidden", type=int, help="pooled features between physical layers (default: as the input)")
    parser.add_argument("--repeat", type=int, default=3, help="control channels per input feature")
    parser.add_argument("--layout", help="first layer's channel layout (default grouped:0.15-0.85)")
    parser.add_argument("--hidden-layout", help="deeper layers' channel layout (default: --layout)")
    parser.add_argument("--chunk-rows", type=int, default=0, help="PAT pipelining: rows per chunk (0: off)")
    parser.add_argument("--in-flight", type=int, default=2, help="PAT pipelining: chunks in flight")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """`TrainSettings` fields from `add_training_arguments` options (unset ones left at their defaults)."""
    opts = {"batch_size": args.batch_size, "lr": args.lr, "readout": args.readout, "repeat": args.repeat,
            "calibration_rows": args.calibration_rows, "twin_seconds": args.twin_seconds,
            "chunk_rows": args.chunk_rows, "in_flight": args.in_flight, "hidden": args.hidden}
    if args.layout:
        opts["layout"] = args.layout
    if args.hidden_layout:
        opts["hidden_layout"] = args.hidden_layout
    return opts


def cli_train(parser: argparse.ArgumentParser):
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--rig", help="device server address, e.g. tcp://127.0.0.1:5555")
    where.add_argument("--config", help="a rig config (RIG.toml) to run in-process")
    add_training_arguments(parser)

    def handler(args: argparse.Namespace) -> int:
        with _open_system(args) as system:
            result = train(system, args.dataset, method=args.method, twin=args.twin, layers=args.layers,
                           epochs=args.epochs, seed=args.seed, session=args.session, report_dir=args.report,
                           online_twin=args.online_twin, checkpoint=args.checkpoint, resume=args.resume,
                           progress=not args.quiet, **training_options(args))
        print(json.dumps({k: v for k, v in result.summary().items() if k not in ("events", "twin_fit")}, indent=2))
        return 0

    return handler


@contextlib.contextmanager
def _open_system(args) -> Iterator[PhysicalSystem]:
    if args.rig:
        from labpnn.remote.client import RigClient

        client = RigClient(args.rig)
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
