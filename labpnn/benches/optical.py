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
import re
import signal
import subprocess
import sys
import time
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


class OpticalPhysics:
    """The optical bench's physics alone as a `labpnn.contract.PhysicalSystem`, in-process (no
    emulators, drivers or sockets: ~0.1 ms a row instead of ~10-25 ms), for benchmarks that need
    many runs: controls in [0, 1] -> shaper attenuation ``attn_max (1 - x) + attn_min x`` dB on the
    shaper's resolution grid, plus ``offset_db`` (an injected step) -> `SHGBench.measure_batch`
    (noise and drift included) -> OSA power in W, as the rig reports it. Labelled in-process in
    describe(); the emulated rig (`simulated_rig`) is what trains and tests use."""

    def __init__(self, *, seed: int = 0, attn_min_db: float | None = None, attn_max_db: float | None = None,
                 resolution_db: float | None = None, **config: Any):
        from labpnn.sim_instruments.shg import OpticalBenchConfig, SHGBench

        shaper = RIG["shaper"]
        self.attn_min_db = shaper["attn_min_db"] if attn_min_db is None else attn_min_db
        self.attn_max_db = shaper["attn_max_db"] if attn_max_db is None else attn_max_db
        self.resolution_db = shaper["attn_resolution_db"] if resolution_db is None else resolution_db
        self.bench = SHGBench(OpticalBenchConfig(seed=seed, **config))
        self.offset_db = 0.0

    def describe(self) -> dict[str, Any]:
        cfg = self.bench.config
        return {"name": "optical-physics-inprocess", "n_controls": cfg.n_channels, "n_outputs": cfg.n_pixels,
                "axis": {"name": "wavelength", "unit": "m", "values": self.bench.default_wavelengths_m.tolist()},
                "limits": {"controls": [0.0, 1.0]}, "instruments": {"bench": "SHGBench (in-process)"},
                "settings": {"attn_min_db": self.attn_min_db, "attn_max_db": self.attn_max_db}}

    def run(self, controls):
        import numpy as np

        x = np.asarray(controls, np.float64)
        attn = np.round((self.attn_max_db * (1 - x) + self.attn_min_db * x) / self.resolution_db) * self.resolution_db
        return self.bench.measure_batch(attn + self.offset_db)[0].astype(np.float32)


class ServedCopy:
    """``labpnn sim optical --serve`` in a process of its own: one copy of the simulated bench behind
    a device server on a free loopback port (``address``), as a lab's second or third bench would
    be. For data-parallel tests and benchmarks; ``kill()`` pulls its plug (SIGKILL)."""

    def __init__(self, copy_seed: int = 0, *, seed: int = 0, settle_ms: float = 0.0, sweep_ms: float = 0.0,
                 start_timeout_s: float = 60.0):
        self.copy_seed = copy_seed
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labpnn", "sim", "optical", "--serve", "tcp://127.0.0.1:0", "--copy-seed",
             str(copy_seed), "--seed", str(seed), "--settle-ms", str(settle_ms), "--sweep-ms", str(sweep_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + start_timeout_s
        for line in self.proc.stdout:
            if m := re.search(r"listening on (tcp://[0-9.]+:[0-9]+)", line):
                self.address = m.group(1)
                return
            if time.monotonic() > deadline:
                break
        self.kill()
        raise RuntimeError(f"the simulated optical bench (copy {copy_seed}) did not start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ServedCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def sim_main(argv: list[str]) -> int:
    """``labpnn sim optical``: the two emulators on 127.0.0.1 until SIGINT/SIGTERM. With
    ``--serve ADDRESS``: the whole simulated rig (emulators, drivers, rig) behind a device server
    at ADDRESS (``tcp://127.0.0.1:0`` picks a free port; the address is printed) — one command per
    copy of the bench for data-parallel training (``--copy-seed N``)."""
    if "--serve" not in argv:
        from labpnn.sim_instruments.optical_bench import main

        return int(main(argv) or 0)
    import argparse

    from labpnn.config import ServerSection
    from labpnn.remote.server import DeviceServer

    parser = argparse.ArgumentParser(prog="labpnn sim optical --serve")
    parser.add_argument("--serve", required=True, metavar="ADDRESS", help="device server address")
    parser.add_argument("--copy-seed", type=int, default=0, help="which copy of the bench (0: the nominal one)")
    parser.add_argument("--seed", type=int, default=0, help="noise and drift seed")
    parser.add_argument("--settle-ms", type=float, default=0.0, help="shaper settle time per mask")
    parser.add_argument("--sweep-ms", type=float, default=0.0, help="OSA sweep time")
    args = parser.parse_args(argv)
    bind = args.serve.replace(":0", ":*") if args.serve.endswith(":0") else args.serve
    with simulated_rig(settle_s=args.settle_ms / 1e3, sweep_s=args.sweep_ms / 1e3, seed=args.seed,
                       copy_seed=args.copy_seed) as rig:
        server = DeviceServer(rig, ServerSection(bind=bind, publish=""), name=f"optical-sim-copy{args.copy_seed}")
        server.serve_announced()
    return 0
