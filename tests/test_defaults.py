"""Training defaults from the data and the bench: the rules for a few shapes, overrides, the
readout bins every class can win, the twin refitted toward its target, user CSV files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labpnn.sim_instruments.test_rig import SimTestRig
from labpnn.training.datasets import load_dataset, load_file, make_dataset, reduce_features
from labpnn.training.defaults import choose_defaults, max_features
from labpnn.training.network import Pooling
from labpnn.training.trainer import calibrate_to_target, train

torch.set_num_threads(1)
OPTICAL = {"n_controls": 64, "n_outputs": 512}  # the simulated optical bench's describe(), as far as it matters


def test_the_vowels_get_what_works_today():
    d = choose_defaults(OPTICAL, n_features=12, n_classes=7, n_train=154)
    assert (d["features"], d["repeat"], d["layout"]) == (12, 3, "grouped:0.15-0.85")
    assert (d["batch_size"], d["lr"], d["lr_schedule"]) == (16, 0.05, "constant")
    assert 40 <= d["epochs"] <= 60 and d["calibration_rows"] == 4000  # 60: 16,000 passes / 154 rows, capped
    assert d["pooling"] == "balanced" and d["twin_target"] == 1.5 and d["calibration_budget"] == 12000


@pytest.mark.parametrize(("shape", "expected"), [
    # (features, classes, training rows) -> (features used, repeat, batch, epochs, schedule)
    ((4, 10, 900), (4, 8, 16, 18, "constant")),  # few features: the cap of 8 copies; many rows: fewer epochs
    ((4, 3, 90), (4, 8, 16, 60, "constant")),  # iris-sized: the most epochs
    ((13, 3, 106), (12, 3, 16, 60, "constant")),  # wine: 13 x 3 copies > 60 % of 64 -> PCA to 12
    ((30, 2, 341), (12, 3, 16, 47, "constant")),
    ((64, 10, 1078), (12, 3, 16, 15, "constant")),  # digits: PCA to 12
])
def test_rules_for_other_shapes(shape, expected):
    f, k, n = shape
    d = choose_defaults(OPTICAL, n_features=f, n_classes=k, n_train=n)
    assert (d["features"], d["repeat"], d["batch_size"], d["epochs"], d["lr_schedule"]) == expected
    assert d["features"] * d["repeat"] <= 0.75 * 64  # >= a quarter of the channels left for parameters
    assert d["lr"] == 0.05


def test_rules_follow_the_bench_and_the_caller_wins():
    small = choose_defaults({"n_controls": 16, "n_outputs": 64}, n_features=3, n_classes=3, n_train=90)
    assert max_features(16) == 3 and small["repeat"] == 3 and small["calibration_rows"] == 1000
    assert small["layout"] == "grouped:0.15-0.85"  # 9 inputs fit channels 2..13
    assert choose_defaults({"n_controls": 16, "n_outputs": 64}, n_features=4, n_classes=3, n_train=90)["features"] == 3
    crowded = choose_defaults(OPTICAL, n_features=12, n_classes=7, n_train=154, overrides={"repeat": 4})
    assert crowded["layout"] == "grouped"  # 48 inputs do not fit channels 9..54: the whole band
    d = choose_defaults(OPTICAL, n_features=12, n_classes=7, n_train=154,
                        overrides={"repeat": 2, "lr": 0.01, "epochs": None, "batch_size": 64})
    by_name = {c.name: c for c in d.choices}
    assert by_name["repeat"].value == 2 and by_name["repeat"].source == "user"
    assert by_name["lr"].value == 0.01 and by_name["epochs"].source == "rule"  # None = unset
    assert by_name["batch_size"].value == 64 and "154 rows" in by_name["epochs"].reason
    assert all(c.reason for c in d.choices)
    assert json.loads(json.dumps(d.to_dict()))["repeat"] == {"value": 2, "reason": "given by the caller",
                                                            "source": "user"}
    with pytest.raises(ValueError, match="2 classes"):
        choose_defaults(OPTICAL, n_features=3, n_classes=1, n_train=10)


def test_balanced_bins_let_every_class_win():
    """Equal-mass bins on a bright, peaked spectrum: the bins on the steep flanks swing with the
    inputs and take the argmax; the flat ones never do until re-placed."""
    rng = np.random.default_rng(0)
    px = np.arange(200)
    envelope = np.exp(-0.5 * ((px - 100) / 30.0) ** 2)
    # rows: the envelope shifted by a random amount (the flanks move, the top barely does)
    shifts = rng.normal(0, 6, 600)
    traces = np.exp(-0.5 * ((px[None] - 100 - shifts[:, None]) / 30.0) ** 2) * (1 + 0.02 * rng.standard_normal((600, 1)))
    start = Pooling.from_traces(envelope, 5)
    pooled = traces @ start.matrix.numpy().T
    assert np.bincount(pooled.argmax(1), minlength=5).min() == 0  # equal mass: some class never wins
    pool, report = Pooling.balanced(traces, 5)
    shares = np.bincount((traces @ pool.matrix.numpy().T).argmax(1), minlength=5) / 600
    assert report["replaced"] and min(report["shares_equal_mass"]) == 0.0
    np.testing.assert_allclose(shares, report["shares"], atol=1e-4)
    assert shares.min() >= 0.2 / 3  # every class wins at least a third of its fair share (1/5)
    # already balanced: left as equal mass
    flat = np.abs(rng.normal(1, 0.3, (400, 50)))
    same, rep = Pooling.balanced(flat, 4)
    assert not rep["replaced"] and same.edges.tolist() == Pooling.from_traces(flat.mean(0), 4).edges.tolist()


def test_reduce_features_fits_pca_on_the_training_split():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 20)) @ rng.normal(size=(20, 20))
    ds = make_dataset(X, np.arange(150) % 3, ["a", "b", "c"], [f"f{i}" for i in range(20)], name="wide")
    small = reduce_features(ds, 5)
    assert small.n_features == 5 and small.X_val.shape == (len(ds.y_val), 5)
    np.testing.assert_allclose(small.X_train.mean(0), 0, atol=1e-5)  # standardised on train
    np.testing.assert_allclose(small.X_train.std(0), 1, atol=1e-4)
    assert small.reduction["from"] == 20 and 0 < small.reduction["explained_variance"] < 1
    assert small.summary()["reduction"]["method"] == "pca"
    assert reduce_features(ds, 20) is ds


class SimTwin(torch.nn.Module):
    """The test rig's own map in torch (a perfect twin but for the noise)."""

    def __init__(self, sim: SimTestRig):
        super().__init__()
        self.w1, self.b1, self.w2, self.b2 = (torch.tensor(a) for a in (sim._w1, sim._b1, sim._w2, sim._b2))

    def forward(self, x):
        return (torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2) ** 2


def test_more_features_than_channels_falls_back_to_pca_and_says_so(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 2, (3, 20))
    y = np.arange(150) % 3
    ds = make_dataset(centres[y] + rng.normal(0, 0.5, (150, 20)), y, ["a", "b", "c"],
                      [f"f{i}" for i in range(20)], name="wide", seed=0)
    sim = SimTestRig(16, 64, noise=0.01, seed=0)
    lines: list[str] = []
    r = train(sim, ds, twin=SimTwin(sim), epochs=2, seed=0, progress=False, announce=lines.append,
              report_dir=tmp_path / "rep")
    assert r.dataset["n_features"] == 3 and r.dataset["reduction"]["from"] == 20  # 3 = 60 % of 16 channels / 3
    assert any(line.startswith("features = 3") and "PCA" in line for line in lines)
    assert r.defaults["features"]["value"] == 3 and r.settings["features"] == 3
    assert r.digital_baseline["test"] > 0.9 and "test_on_reduced_features" in r.digital_baseline
    assert len(r.recall) == 3 and r.readout_placement is not None
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["defaults"]["repeat"]["reason"] and report["readout_placement"]["rule"]


def test_the_twin_is_refitted_toward_its_target_within_the_budget():
    sim = SimTestRig(16, 64, noise=0.01, seed=0)
    centres = np.random.default_rng(0).random((50, 16)).astype(np.float32)
    # an unreachable target: rounds until the budget, and it says so
    twin, fit, (x, t) = calibrate_to_target(sim, 300, centres=centres, target=0.5, budget=700, twin_seconds=2,
                                            probe_rows=64)
    assert not fit["target_met"] and len(fit["rounds"]) >= 2 and fit["rows_measured"] <= 700 + 64
    assert len(x) == len(t) == fit["rounds"][-1]["rows"] and fit["operating_noise_ratio"] > 0.5
    # a generous one: one round
    _, easy, _ = calibrate_to_target(sim, 300, centres=centres, target=1e6, twin_seconds=2, probe_rows=64)
    assert easy["target_met"] and len(easy["rounds"]) == 1 and easy["budget"] == 900


# -- a user's CSV ------------------------------------------------------------------------------------
def write(path, text):
    path.write_text(text)
    return path


def test_csv_string_labels_and_other_label_names(tmp_path):
    rows = "\n".join(f"{i % 5},{(i * 7) % 3},{['setosa', 'virginica'][i % 2]}" for i in range(12))
    X, y, classes, feats = load_file(write(tmp_path / "a.csv", "x1,x2,Species\n" + rows), label_column="Species")
    assert classes == ["setosa", "virginica"] and feats == ["x1", "x2"] and X.shape == (12, 2)
    assert y.tolist() == [i % 2 for i in range(12)]
    _, _, classes2, feats2 = load_file(write(tmp_path / "b.csv", "x1,x2,Class\n" + rows))  # any case
    assert classes2 == ["setosa", "virginica"] and feats2 == ["x1", "x2"]


def test_csv_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"no label column .* columns found: a, b, kind"):
        load_file(write(tmp_path / "nolabel.csv", "a,b,kind\n1,2,x\n3,4,y\n"))
    with pytest.raises(ValueError, match=r"line 3, column 'b': 'n/a' is not a number"):
        load_file(write(tmp_path / "text.csv", "a,b,label\n1,2,x\n3,n/a,y\n"))
    with pytest.raises(ValueError, match=r"line 2, column 'a': an empty cell"):
        load_file(write(tmp_path / "empty.csv", "a,b,label\n,2,x\n3,4,y\n"))
    with pytest.raises(ValueError, match=r"only one class \('x'\)"):
        load_file(write(tmp_path / "one.csv", "a,b,label\n1,2,x\n3,4,x\n"))
    with pytest.raises(ValueError, match=r"line 3: 2 values, the header has 3"):
        load_file(write(tmp_path / "ragged.csv", "a,b,label\n1,2,x\n3,y\n"))
    with pytest.raises(ValueError, match=r"NaN or inf \(first at data row 2, column 'b'\)"):
        load_file(write(tmp_path / "nan.csv", "a,b,label\n1,2,x\n3,nan,y\n"))
    with pytest.raises(ValueError, match="a header and no data rows"):
        load_file(write(tmp_path / "header.csv", "a,b,label\n"))
    with pytest.raises(ValueError, match="at least 3 samples"):  # too few of a class to split
        load_dataset(write(tmp_path / "few.csv", "a,label\n" + "\n".join(f"{i},{'x' if i < 9 else 'y'}"
                                                                           for i in range(10))))
