"""The benches: one module per bench, the one place that names a bench's parameters.

A bench module (`optical`, `testrig`; acoustic and microwave next) says how to start its simulated
instruments (``simulated_rig``: emulators -> the real drivers -> a connected `Rig`), what its rig
configuration is (``rig_section``: what its ``examples/*-sim.toml`` holds) and how ``labpnn sim
BENCH`` runs it (``sim_main``). ``labpnn sim`` (`cli`), ``labpnn demo`` (`demo`), the benchmark
scripts and the tests all take a bench from here (`get_bench`).

May import everything below it (training, twin, remote, sessions, config, rig, contract) and
``labpnn.sim_instruments`` / ``labpnn.drivers``: it is where emulators meet the real drivers.
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: bench name -> module
BENCHES = {"optical": "labpnn.benches.optical", "acoustic": "labpnn.benches.acoustic",
           "microwave": "labpnn.benches.microwave",
           "test": "labpnn.benches.testrig"}


def get_bench(name: str) -> ModuleType:
    """The module of bench ``name`` (ValueError naming the benches there are)."""
    try:
        return importlib.import_module(BENCHES[name])
    except KeyError:
        raise ValueError(f"unknown bench {name!r} (have: {', '.join(sorted(BENCHES))})") from None
