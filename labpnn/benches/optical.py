"""The optical bench: a femtosecond pulse shaper (WaveShaper, REST) and an OSA (AQ6370, SCPI)
around a chi(2) crystal — the SHG bench of the PAT paper (physics: `labpnn.sim_instruments.shg`).

64 shaper channels carry the controls (x in [0, 1] -> attenuation ``30 (1 - x)`` dB: the 0-30 dB
range the demo's network was tuned on); the OSA reads 512 pixels over 770-780 nm.
``examples/optical-sim.toml`` holds this rig with the emulators' default ports (a test keeps the
two equal), ``examples/optical-lab.toml`` the same drivers on a real bench.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from labpnn.config import build_rig, parse_config
from labpnn.rig import Rig

NAME = "optical"
SUMMARY = "SHG bench: 64-channel pulse shaper -> chi(2) crystal -> 512-pixel OSA"

#: the [rig] table of examples/optical-sim.toml, without the instruments' addresses
RIG: dict[str, Any] = {
    "kind": "optical",
    "shaper": {"n_channels": 64, "band_start_thz": 191.48, "band_stop_thz": 195.32, "attn_min_db": 0.0,
               "attn_max_db": 30.0, "attn_resolution_db": 0.01, "settle_s": 0.0},
    "osa": {"start_nm": 770.0, "stop_nm": 780.0, "points": 512, "resolution_nm": 0.05, "termination": "\n"},
}


def rig_section(shaper_url: str, osa_resource: str) -> dict[str, Any]:
    """The bench's [rig] table with the instruments at these addresses."""
    section = copy.deepcopy(RIG)
    section["shaper"]["url"] = shaper_url
    section["osa"]["resource"] = osa_resource
    return section


@contextlib.contextmanager
def simulated_rig(*, settle_s: float = 0.0, sweep_s: float = 0.0, seed: int = 0, copy_seed: int = 0) -> Iterator[Rig]:
    """A connected `Rig` on the emulators (random loopback ports), closed and stopped on exit.
    ``settle_s`` is the shaper's settle time per mask and ``sweep_s`` the OSA's sweep time (zero:
    the emulators answer at once; a realistic bench is ~20 ms + ~200 ms). ``copy_seed`` picks the
    copy of the bench (0: the nominal one; others differ in crystal, shaper ripple and calibration,
    OSA calibration, oscillator: `labpnn.sim_instruments.shg`, item 8); ``seed`` its noise and drift."""
    from labpnn.sim_instruments.optical_bench import OpticalBenchEmulators
    from labpnn.sim_instruments.shg import OpticalBenchConfig

    emulators = OpticalBenchEmulators(OpticalBenchConfig(seed=seed, copy_seed=copy_seed), shaper_port=0, osa_port=0,
                                      settle_s=settle_s, sweep_s=sweep_s).start()
    try:
        config = parse_config({"name": "optical-sim",
                               "rig": rig_section(emulators.shaper_url, emulators.osa_resource)}, "optical bench")
        rig = build_rig(config).connect()
        try:
            yield rig
        finally:
            rig.close()
    finally:
        emulators.stop()


def sim_main(argv: list[str]) -> int:
    """``labpnn sim optical``: the two emulators on 127.0.0.1 until SIGINT/SIGTERM."""
    from labpnn.sim_instruments.optical_bench import main

    return int(main(argv) or 0)
