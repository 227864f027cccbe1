"""Files written before the subpackage move (tests/fixtures/pre_move, made by the flat layout)
still open, replay and resume: sessions are plain HDF5, checkpoints plain state."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from labpnn.sessions import ReplayRig, open_session
from labpnn.training.checkpoint import load_network
from labpnn.training.datasets import make_dataset
from labpnn.training.trainer import train
from labpnn.twin.model import load_twin

OLD = Path(__file__).parent / "fixtures" / "pre_move"


def test_a_session_from_before_the_move_opens_and_replays():
    with open_session(OLD / "session.h5") as s:
        assert s.n_rows == 48 and s.n_batches == 3
        assert set(s.tags) == {"calibration"}
        assert any(e["kind"] == "note" for e in s.events)
        controls, traces = np.array(s.controls), np.array(s.traces)
    with ReplayRig([OLD / "session.h5"]) as rig:
        np.testing.assert_array_equal(rig.run(controls[5:9]), traces[5:9])  # bytes copied from the file


def test_a_twin_from_before_the_move_loads_and_predicts():
    twin = load_twin(OLD / "twin.pt")
    with open_session(OLD / "session.h5") as s:
        x, y = np.array(s.controls), np.array(s.traces)
    pred = twin.predict(x)
    assert pred.shape == y.shape and np.isfinite(pred).all()
    assert np.mean((pred - y) ** 2) < np.var(y)  # it learnt something, it was not re-initialised


def test_a_training_checkpoint_from_before_the_move_resumes(tmp_path):
    net = load_network(OLD / "train.ckpt")
    assert net.config["n_features"] == 3 and net.config["n_classes"] == 2
    ck = tmp_path / "train.ckpt"
    shutil.copy(OLD / "train.ckpt", ck)
    shutil.copy(OLD / "train.ckpt.twin.pt", tmp_path / "train.ckpt.twin.pt")
    rng = np.random.default_rng(0)  # the same dataset the fixture was trained on (make_fixtures.py)
    rng.random((48, 8), dtype=np.float32)
    X = rng.random((60, 3)).astype(np.float32)
    ds = make_dataset(X, (X[:, 0] > 0.5).astype(np.int64), ["a", "b"], ["f0", "f1", "f2"], name="fixture", seed=0)
    with ReplayRig([OLD / "session.h5"], mode="nearest") as rig:
        result = train(rig, ds, method="insilico", epochs=3, seed=0, resume=ck, checkpoint=ck, progress=False,
                       repeat=1, batch_size=8)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # epochs 1-2 came from the old checkpoint
    assert any(e["kind"] == "resume" for e in result.events)
