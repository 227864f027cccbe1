"""The microwave bench: a reverberant cavity reconfigured by a programmable metasurface (48 binary
meta-atoms behind a serial controller), read by a VNA measuring S21 over 4.5-5.5 GHz — PhyLL's
microwave system (physics: `labpnn.sim_instruments.metasurface_cavity`).

Controls: one per meta-atom, in [0, 1], quantised to the atom's two states (x >= 0.5: ON); the rig
reports the states it set as ``applied`` with the ``quantised`` flag. Outputs: |S21| (linear) at 20
frequencies — linear rather than dB because a twin learns it better (the dB scale magnifies deep
fades) — or Re/Im with ``output = "reim"`` (what a Touchstone export needs).
``examples/microwave-sim.toml`` holds this rig with the emulators' default addresses,
``examples/microwave-lab.toml`` the same drivers on a real cavity.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from labpnn.config import build_rig, parse_config
from labpnn.rig import Rig

NAME = "microwave"
SUMMARY = "metasurface cavity: 48 binary meta-atoms (serial controller) -> |S21| at 20 frequencies (VNA)"
N_META = 48

#: the [rig] table of examples/microwave-sim.toml, without the instruments' addresses
RIG: dict[str, Any] = {
    "kind": "microwave",
    "metasurface": {"baud": 115200, "n_bits": 256, "atoms": list(range(N_META)), "bits_per_control": 1,
                    "settle_s": 0.002, "verify": True, "timeout_s": 5.0},
    "vna": {"dialect": "pna", "start_hz": 4.5e9, "stop_hz": 5.5e9, "points": 20, "if_bandwidth_hz": 10e3,
            "power_dbm": -10.0, "output": "mag", "data_format": "REAL,32", "byte_order": "SWAP"},
}


#: the [network] table: one meta-atom per input feature, spread over the surface, so that the
#: trainable parameters keep at least 32 of the 48 atoms (the vowels: 12 inputs, 36 parameters)
NETWORK: dict[str, Any] = {"repeat": 1, "layout": "spread"}


def rig_section(serial_port: str, vna_resource: str, **vna: Any) -> dict[str, Any]:
    """The bench's [rig] table with the instruments at these addresses (``vna``: VNA overrides,
    e.g. ``output="reim"``)."""
    section = copy.deepcopy(RIG)
    section["metasurface"]["port"] = serial_port
    section["vna"].update(resource=vna_resource, **vna)
    return section


@contextlib.contextmanager
def emulators(*, seed: int = 0, copy_seed: int = 0, settle_s: float = 0.0) -> Iterator[tuple[str, str]]:
    """``labpnn sim microwave`` in its own process (as the instruments are: separate hardware, so the
    cavity's computations never stall the controller's replies through this process's GIL); yields
    (the controller's serial port, the VNA's VISA resource) and stops it on exit."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from labpnn.sim_instruments.serving import stop_with_parent

    link = Path(tempfile.mkdtemp(prefix="labpnn-mw-")) / "metasurface"
    settle_ms = 1e3 * (RIG["metasurface"]["settle_s"] + settle_s)
    proc = subprocess.Popen([sys.executable, "-m", "labpnn.sim_instruments.microwave_bench", "--vna-port", "0",
                             "--link", str(link), "--seed", str(seed), "--copy-seed", str(copy_seed),
                             "--settle-ms", str(settle_ms)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"},
                            preexec_fn=stop_with_parent)  # a killed benchmark leaves no emulator behind
    try:
        first = proc.stdout.readline().split()
        if len(first) != 2 or first[0] != "vna":
            raise RuntimeError(f"the microwave emulators did not start: {' '.join(first)} {proc.stderr.read()}")
        proc.stdout.readline()
        yield str(link), first[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        link.parent.rmdir() if link.parent.exists() and not any(link.parent.iterdir()) else None


@contextlib.contextmanager
def simulated_rig(*, settle_s: float = 0.0, sweep_s: float = 0.0, seed: int = 0, copy_seed: int = 0,
                  **vna: Any) -> Iterator[Rig]:
    """A connected `Rig` on the emulators (`emulators`: the controller on a pseudo-terminal, the VNA
    on a random loopback port, in their own process), closed and stopped on exit. The sweep time
    follows from points and IF bandwidth (the emulator's, as a real VNA's); ``settle_s`` adds to the
    metasurface's own settle time; ``sweep_s`` is accepted for the common bench interface and
    ignored; ``vna``: VNA settings for the rig (e.g. ``output="reim"``)."""
    with emulators(seed=seed, copy_seed=copy_seed, settle_s=settle_s) as (serial_port, vna_resource):
        config = parse_config({"name": "microwave-sim", "rig": rig_section(serial_port, vna_resource, **vna),
                               "network": NETWORK}, "microwave bench")
        rig = build_rig(config).connect()
        try:
            yield rig
        finally:
            rig.close()


def sim_main(argv: list[str]) -> int:
    """``labpnn sim microwave``: the controller (pty) and VNA emulators until SIGINT/SIGTERM."""
    from labpnn.sim_instruments.microwave_bench import main

    return int(main(argv) or 0)
