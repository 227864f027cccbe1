"""``labpnn sim BENCH``: start a bench's simulated instruments on 127.0.0.1.

The emulators live in ``labpnn.sim_instruments`` and run standalone; this only picks one."""
from __future__ import annotations

import argparse

BENCHES = {"optical": "labpnn.sim_instruments.optical_bench"}


def cli_sim(parser: argparse.ArgumentParser):
    parser.add_argument("bench", choices=sorted(BENCHES), help="which bench to simulate")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the bench's own options (see --help after the bench)")

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(BENCHES[args.bench]).main(args.options) or 0)

    return handler
