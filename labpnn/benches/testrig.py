"""The built-in test rig as a bench: a fixed random nonlinear map (16 controls -> 512 outputs) with
noise and a per-row latency (`labpnn.sim_instruments.test_rig`); ``examples/test-rig.toml``."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from labpnn.config import build_rig, parse_config
from labpnn.rig import Rig

NAME = "test"
SUMMARY = "built-in test rig: a random nonlinear map with noise and latency"

RIG: dict[str, Any] = {"kind": "test", "n_controls": 16, "n_outputs": 512}


@contextlib.contextmanager
def simulated_rig(*, settle_s: float = 0.0, sweep_s: float = 0.0, seed: int = 0) -> Iterator[Rig]:
    """A connected `Rig` on the test rig, with a latency of ``settle_s + sweep_s`` per row."""
    config = parse_config({"name": "test-rig", "rig": {**RIG, "latency_s": settle_s + sweep_s, "seed": seed}},
                          "test bench")
    rig = build_rig(config).connect()
    try:
        yield rig
    finally:
        rig.close()


def sim_main(argv: list[str]) -> int:
    print("the test rig runs inside `labpnn serve --config examples/test-rig.toml`; there is nothing to start")
    return 2
