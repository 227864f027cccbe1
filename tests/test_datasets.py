"""Datasets: the shipped vowels, bundled digits, user CSV/NPZ files; deterministic stratified splits."""
from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest

from labpnn.training.datasets import load_dataset, load_file, load_vowels, logistic_baseline, split_indices


def test_vowels_are_shipped_with_a_citation():
    data = files("labpnn.training").joinpath("data")
    assert data.joinpath("hillenbrand1995_women_vowels.csv").is_file()
    readme = data.joinpath("README.md").read_text()
    assert "Hillenbrand" in readme and "97" in readme and "3099" in readme and "MomeniAli/PhyLL" in readme


def test_vowels_content():
    X, y, classes, features = load_vowels()
    assert X.shape == (258, 12) and y.shape == (258,)
    assert classes == ["ae", "ah", "aw", "er", "ih", "iy", "uw"]
    assert features[:3] == ["F1_ss", "F2_ss", "F3_ss"] and len(features) == 12
    assert np.bincount(y).tolist() == [37, 37, 37, 37, 37, 37, 36]
    assert (X > 100).all() and (X < 5000).all()  # formants in Hz


def test_split_is_stratified_deterministic_and_seeded():
    a, b = load_dataset("vowels", seed=3), load_dataset("vowels", seed=3)
    c = load_dataset("vowels", seed=4)
    assert a.sizes() == {"train": 154, "validation": 52, "test": 52}
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.X_train, c.X_train)
    for y in (a.y_train, a.y_val, a.y_test):  # every vowel in every split, in proportion
        counts = np.bincount(y, minlength=7)
        assert counts.min() >= 0.8 * counts.max() - 1
    train, val, test = split_indices(np.repeat(np.arange(7), 37), seed=0)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))


def test_scaling_is_fitted_on_train_only():
    ds = load_dataset("vowels", seed=0)
    np.testing.assert_allclose(ds.X_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.X_train.std(0), 1, atol=1e-4)
    X, _, _, _ = load_vowels()
    raw_val = ds.X_val * ds.scale + ds.mean  # inverse transform recovers raw formants
    assert np.isin(np.round(raw_val[:, 0]), np.round(X[:, 0])).all()
    assert abs(float(ds.X_val.mean())) > 1e-4  # not refitted on validation


def test_digits_pooled_and_full():
    ds = load_dataset("digits", seed=0)
    assert ds.n_features == 16 and ds.n_classes == 10
    full = load_dataset("digits", seed=0, digits_pool=1)
    assert full.n_features == 64
    assert sum(ds.sizes().values()) == 1797


def test_csv_and_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    labels = np.array(["cat", "dog", "emu"])[np.arange(60) % 3]
    csv = tmp_path / "mine.csv"
    csv.write_text("a,b,label,c\n" + "\n".join(f"{x[0]},{x[1]},{lab},{x[2]}" for x, lab in zip(X, labels, strict=True)))
    ds = load_dataset(csv, seed=1)
    assert ds.name == "mine" and ds.class_names == ["cat", "dog", "emu"] and ds.feature_names == ["a", "b", "c"]
    assert ds.n_features == 3 and sum(ds.sizes().values()) == 60
    npz = tmp_path / "mine.npz"
    np.savez(npz, X=X, y=np.arange(60) % 3)
    ds2 = load_dataset(npz, seed=1)
    assert ds2.class_names == ["0", "1", "2"] and ds2.n_features == 3


def test_bad_files_are_refused_clearly(tmp_path):
    no_label = tmp_path / "x.csv"
    no_label.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="label"):
        load_file(no_label)
    text = tmp_path / "t.csv"
    text.write_text("a,label\nfoo,1\n")
    with pytest.raises(ValueError, match="numeric"):
        load_file(text)
    npz = tmp_path / "bad.npz"
    np.savez(npz, X=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="X and y"):
        load_file(npz)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no-such-thing")


def test_digital_linear_baseline_on_vowels():
    accs = [logistic_baseline(load_dataset("vowels", seed=s))["test"] for s in range(3)]
    assert np.mean(accs) > 0.95
