"""One place per bench: the bench modules, the example configs a user reads, `labpnn sim`."""
from __future__ import annotations

from pathlib import Path

import pytest

from labpnn.benches import BENCHES, get_bench
from labpnn.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_the_optical_example_is_the_rig_the_demo_serves():
    config = load_config(REPO / "examples" / "optical-sim.toml")
    optical = get_bench("optical")
    example = config.rig.model_dump()
    served = optical.rig_section(example["shaper"]["url"], example["osa"]["resource"])
    from labpnn.config import parse_config

    assert parse_config({"rig": served}).rig.model_dump() == example
    assert example["shaper"]["attn_max_db"] == 30.0


def test_every_bench_module_offers_the_same_face():
    for name in BENCHES:
        bench = get_bench(name)
        assert name == bench.NAME and bench.SUMMARY
        assert callable(bench.simulated_rig) and callable(bench.sim_main)
    with pytest.raises(ValueError, match="unknown bench 'nope' \\(have: "):
        get_bench("nope")


def test_the_test_bench_gives_a_connected_rig():
    with get_bench("test").simulated_rig(seed=3) as rig:
        assert rig.describe()["n_controls"] == 16 and rig.run(rig.validate([[0.5] * 16])).shape == (1, 512)
