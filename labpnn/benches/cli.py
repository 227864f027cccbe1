"""``labpnn sim BENCH``: start a bench's simulated instruments on 127.0.0.1 (the emulators live in
``labpnn.sim_instruments`` and run standalone; the bench module says how)."""
from __future__ import annotations

import argparse

from labpnn.benches import BENCHES, get_bench


def cli_sim(parser: argparse.ArgumentParser):
    parser.add_argument("bench", choices=sorted(b for b in BENCHES if b != "test"), help="which bench to simulate")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the bench's own options (see --help after the bench)")

    def handler(args: argparse.Namespace) -> int:
        return get_bench(args.bench).sim_main(args.options)

    return handler
