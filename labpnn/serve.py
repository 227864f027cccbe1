"""``labpnn serve``: a rig from a config (``--config RIG.toml``), or a fitted twin served as a rig
(``--twin TWIN.pt``), behind a `DeviceServer`.

The device server and everything a rig needs stay torch-free (the lab PC may not have it):
``labpnn serve --config`` never imports torch. ``--twin`` is the one path that does: this module
(the command-line layer, above `labpnn.twin`) builds a `labpnn.twin.served.TwinSystem` — labelled
as a twin in its describe() and in every run reply's ``meta`` — and hands it to the server like
any other system.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from labpnn.config import ConfigError, ServerSection
from labpnn.remote.server import DeviceServer, InsecureBind


def cli_serve(parser: argparse.ArgumentParser):
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="RIG.toml", help="rig configuration file")
    what.add_argument("--twin", metavar="TWIN.pt",
                      help="serve a fitted twin (`labpnn twin fit`) as a rig, labelled as a twin (needs torch)")
    parser.add_argument("--bind", help="request socket address (default: [server] bind, or tcp://127.0.0.1:5555)")
    parser.add_argument("--publish", help="live stream address, '' to disable (default: [server] publish)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback address without CURVE (anyone on the network can drive the rig)")
    parser.add_argument("--curve-keys", metavar="DIR",
                        help="CURVE keys: DIR/server.key_secret and DIR/authorized/*.key (client public keys)")
    parser.add_argument("--publish-traces", action="store_true", help="attach full traces to the live stream")
    parser.add_argument("--record", metavar="DIR", help="record every batch served into a session in DIR")
    twin = parser.add_argument_group("--twin options")
    twin.add_argument("--seed", type=int, default=0, help="seed of the twin's noise (default 0)")
    twin.add_argument("--no-noise", action="store_true",
                      help="serve the twin's mean prediction, without the repeat noise it measured")
    twin.add_argument("--device", default="cpu", help="where the twin runs (default cpu)")
    twin.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")

    def handler(args: argparse.Namespace) -> int:
        if args.twin is None:
            for flag, given in (("--seed", args.seed != 0), ("--no-noise", args.no_noise),
                                ("--device", args.device != "cpu"), ("--threads", args.threads is not None)):
                if given:
                    print(f"labpnn serve: {flag} applies to --twin only", file=sys.stderr)
                    return 2
            built = _rig_from_config(args.config)
        else:
            built = _twin_system(args)
        if isinstance(built, int):
            return built
        system, section, name = built
        if args.record:  # a lab-side record of everything the system does, whoever asks
            from labpnn.sessions import record_to

            system = record_to(args.record, system, name=name, on_write_error="warn")
            print(f"labpnn serve: recording to {system.writer.path}", flush=True)
        try:
            try:
                server = DeviceServer(system, section, bind=args.bind, publish=args.publish,
                                      insecure=args.insecure, curve_keys=args.curve_keys, name=name,
                                      publish_traces=args.publish_traces)
            except (InsecureBind, FileNotFoundError, ValueError) as exc:
                print(f"labpnn serve: {exc}", file=sys.stderr)
                return 2
            server.serve_announced()
        finally:
            close = getattr(system, "close", None)
            if close is not None:
                close()
        return 0

    return handler


def _rig_from_config(path: str) -> tuple[Any, ServerSection, str] | int:
    from labpnn.config import build_rig, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"labpnn serve: {exc}", file=sys.stderr)
        return 2
    try:
        rig = build_rig(config)
    except (ConfigError, ValueError) as exc:
        print(f"labpnn serve: {exc}", file=sys.stderr)
        return 2
    connect = getattr(rig, "connect", None)
    if connect is not None:
        connect()
    return rig, config.server, config.name


def _twin_system(args: argparse.Namespace) -> tuple[Any, ServerSection, str] | int:
    try:
        from labpnn.twin.served import TwinSystem  # imports torch: only on this path
    except ImportError as exc:
        print(f"labpnn serve: --twin needs torch (the training extra: pip install 'labpnn[train]'): {exc}",
              file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        system = TwinSystem(args.twin, seed=args.seed, noise=not args.no_noise, device=args.device)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        print(f"labpnn serve: cannot load the twin {args.twin}: {exc}", file=sys.stderr)
        return 2
    desc = system.describe()
    info = desc["twin"]
    ratio = info.get("noise_ratio")
    noise = info["noise"]
    print(f"labpnn serve: serving a DIGITAL TWIN, not the physics: {args.twin} "
          f"(fitted on {len(info['fitted_on'])} session file(s), held-out noise ratio "
          f"{'n/a' if ratio is None else format(ratio, '.2f')}; noise "
          f"{'a + b*max(y,0) as measured' if noise['served'] else 'off'})", flush=True)
    return system, ServerSection(), desc["name"]
