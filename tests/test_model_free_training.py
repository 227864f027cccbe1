"""The model-free methods run through the one trainer: a session with every pass tagged, passes
counted by kind, selection on validation, one test on the physics, a report — no twin fitted."""
from __future__ import annotations

import json

import numpy as np
import pytest

from labpnn.sessions import open_session
from labpnn.training.datasets import make_dataset
from labpnn.training.trainer import train


def small_task():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4))
    y = np.repeat(np.arange(3), 30)
    X = (centres[y] + 0.3 * rng.normal(size=(90, 4))).astype(np.float32)
    return make_dataset(X, y, ["a", "b", "c"], [f"f{i}" for i in range(4)], name="blobs", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["phyll", "spsa", "reservoir", "reservoir-ridge"])
def test_a_model_free_method_trains_through_the_trainer_and_a_device_server(method, make_server, make_client, tmp_path):
    server = make_server(rig={"n_controls": 32, "n_outputs": 64, "seed": 2})  # PhyLL: hidden width 20 <= C
    client = make_client(server, timeout_s=30)
    ds = small_task()
    result = train(client, ds, method=method, epochs=2, seed=0, progress=False, session=tmp_path / "s.h5",
                   report_dir=tmp_path / "report")
    assert 0.0 <= result.test_accuracy <= 1.0 and result.passes["calibration"] == 0  # no twin, no calibration
    assert result.passes["test"] >= len(ds.y_test) and result.passes["validation"] >= len(ds.y_val)
    assert result.settings["kind"] in ("physical", "hybrid")
    with open_session(tmp_path / "s.h5") as s:
        tags = set(np.asarray(s.tags).astype(str))
        assert {"train", "validation", "test"} <= tags and s.n_rows == sum(result.passes.values())
    assert server.sim.actuations == sum(result.passes.values())  # every pass the rig made is counted
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["test_accuracy"] == result.test_accuracy and method.split("-")[0] in report["network"]
