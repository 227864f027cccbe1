"""Classification datasets for physical neural networks, split and scaled the same way every time.

Three sources, one result type (`Dataset`):

- ``"vowels"`` — Hillenbrand et al. (1995) vowel formants of 50 women, shipped in ``labpnn/training/data``
  (258 samples, 7 vowels, 12 features: F1–F3 at steady state and at 20/50/80 % of the duration);
- ``"digits"`` — scikit-learn's bundled 8×8 handwritten digits (1797 samples, 10 classes). A bench
  with a few dozen control channels cannot take 64 features *and* trainable parameters, so
  ``digits_pool=2`` (the default through `load_dataset`) averages 2×2 pixel blocks: 16 features;
- a file of your own: CSV with a header row of feature columns and a ``label`` column (any other
  non-numeric column is an error), or NPZ with arrays ``X`` [N, F] and ``y`` [N].

Splits are stratified and deterministic for a given ``seed`` (train / validation / test, 60/20/20
by default). Features are standardised with a mean and standard deviation fitted on the training
split only; the same transform is applied to validation and test. No torch here.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

VOWELS_FILE = "hillenbrand1995_women_vowels.csv"
BUILTIN = ("vowels", "digits")


@dataclass
class Dataset:
    """A split, scaled classification dataset. Features are float32, labels int64 in [0, n_classes)."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    feature_names: list[str]
    #: the standardisation fitted on the training split: x_scaled = (x - mean) / scale
    mean: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(repr=False, default_factory=lambda: np.ones(0))
    seed: int = 0
    source: str = ""
    #: a feature reduction applied after scaling (`reduce_features`), or None
    reduction: dict[str, Any] | None = None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``."""
        if which == "train":
            return self.X_train, self.y_train
        if which in ("validation", "val"):
            return self.X_val, self.y_val
        if which == "test":
            return self.X_test, self.y_test
        raise ValueError(f"no split named {which!r} (have: train, validation, test)")

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "validation": len(self.y_val), "test": len(self.y_test)}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "seed": self.seed, "n_features": self.n_features,
                "n_classes": self.n_classes, "classes": self.class_names, **self.sizes(),
                **({"reduction": self.reduction} if self.reduction else {})}


# -- raw loaders ----------------------------------------------------------------------------------
def load_vowels() -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The shipped vowel formants: ``(X float64[258, 12], y int64[258], class_names, feature_names)``."""
    text = files("labpnn.training").joinpath("data", VOWELS_FILE).read_text()
    rows = list(csv.reader(text.splitlines()))
    header, body = rows[0], [r for r in rows[1:] if r]
    feature_names = header[2:]
    classes = sorted({r[1] for r in body})
    X = np.array([[float(v) for v in r[2:]] for r in body])
    y = np.array([classes.index(r[1]) for r in body], dtype=np.int64)
    return X, y, classes, feature_names


def load_digits_features(pool: int = 1) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """scikit-learn's bundled digits; ``pool`` > 1 averages ``pool``×``pool`` pixel blocks."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64)
    if pool > 1:
        if 8 % pool:
            raise ValueError(f"digits pooling must divide 8, got {pool}")
        side = 8 // pool
        images = images.reshape(-1, side, pool, side, pool).mean(axis=(2, 4))
    side = images.shape[1]
    names = [f"pixel_{r}_{c}" for r in range(side) for c in range(side)]
    return images.reshape(len(images), -1), digits.target.astype(np.int64), [str(c) for c in range(10)], names


#: header names taken as the label column when there is no ``label`` column (case-insensitive)
LABEL_NAMES = ("label", "class", "target", "y")


def load_file(path: str | Path, *, label_column: str | None = None
              ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """A CSV (header row; feature columns and a label column) or an NPZ (``X``, ``y``).

    CSV rules: the label column is ``label_column`` if given, else the first header named
    ``label``, ``class``, ``target`` or ``y`` (any case); without one it is an error naming the
    columns found (no guessing: a wrong guess would train on the labels). Labels may be strings
    (class names, kept) or numbers (numeric order). Every other cell must be a number: an empty
    or non-numeric cell is an error naming its line, column and value. A file with one class
    is an error. (Features that exceed a bench's channels are reduced later, by the trainer.)"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            missing = {"X", "y"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: an NPZ dataset needs arrays X and y (missing {sorted(missing)})")
            X, labels = np.asarray(data["X"], np.float64), np.asarray(data["y"])
        if X.ndim != 2 or labels.ndim != 1 or len(X) != len(labels):
            raise ValueError(f"{path}: X must be [N, F] and y [N], got {X.shape} and {labels.shape}")
        feature_names = [f"x{i}" for i in range(X.shape[1])]
    else:
        X, labels, feature_names = _read_csv(path, label_column)
    if not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(f"{path}: features contain NaN or inf (first at data row {bad[0] + 1}, "
                         f"column {feature_names[bad[1]]!r})")
    if X.shape[1] == 0:
        raise ValueError(f"{path}: no feature columns besides the label")
    classes = _sorted_labels(labels)
    if len(classes) < 2:
        raise ValueError(f"{path}: only one class ({classes[0] if classes else 'none'!r}) in "
                         f"{len(labels)} rows; a classifier needs at least two")
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[str(v)] for v in labels], dtype=np.int64)
    return X, y, classes, feature_names


def _read_csv(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with path.open(newline="") as fh:
        rows = [(n, r) for n, r in enumerate(csv.reader(fh), start=1) if r and any(v.strip() for v in r)]
    if not rows:
        raise ValueError(f"{path}: empty file")
    header = [h.strip() for h in rows[0][1]]
    wanted = [label_column] if label_column else list(LABEL_NAMES)
    lowered = [h.lower() for h in header]
    li = next((lowered.index(w.lower()) for w in wanted if w.lower() in lowered), None)
    if li is None:
        want = repr(label_column) if label_column else "'label' (or class, target, y)"
        raise ValueError(f"{path}: no label column {want} in the header; columns found: {', '.join(header)}")
    feature_names = [h for i, h in enumerate(header) if i != li]
    if len(rows) < 2:
        raise ValueError(f"{path}: a header and no data rows")
    X = np.empty((len(rows) - 1, len(feature_names)))
    labels = []
    for k, (line, r) in enumerate(rows[1:]):
        if len(r) != len(header):
            raise ValueError(f"{path}, line {line}: {len(r)} values, the header has {len(header)} columns")
        j = 0
        for i, v in enumerate(r):
            if i == li:
                continue
            try:
                X[k, j] = float(v)
            except ValueError:
                shown = repr(v) if v.strip() else "an empty cell"
                raise ValueError(f"{path}, line {line}, column {header[i]!r}: {shown} is not a number (every "
                                 f"column except the label {header[li]!r} must be numeric)") from None
            j += 1
        labels.append(r[li].strip())
    return X, np.array(labels), feature_names


def _sorted_labels(labels: np.ndarray) -> list[str]:
    uniq = sorted({str(v) for v in labels})
    try:  # numeric labels in numeric order
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


# -- splitting and scaling ------------------------------------------------------------------------
def split_indices(y: np.ndarray, fractions=(0.6, 0.2, 0.2), seed: int = 0):
    """Stratified, deterministic ``(train, validation, test)`` index arrays."""
    from sklearn.model_selection import train_test_split

    f_train, f_val, f_test = (float(f) for f in fractions)
    if min(f_train, f_val, f_test) <= 0 or abs(f_train + f_val + f_test - 1) > 1e-6:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, train_size=f_train, stratify=y, random_state=seed)
    val, test = train_test_split(rest, train_size=f_val / (f_val + f_test), stratify=y[rest],
                                 random_state=seed + 1)
    return np.sort(train), np.sort(val), np.sort(test)


def make_dataset(X, y, class_names, feature_names, *, name: str, seed: int = 0,
                 fractions=(0.6, 0.2, 0.2), source: str = "") -> Dataset:
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.int64)
    counts = np.bincount(y, minlength=len(class_names))
    if (counts < 3).any():
        raise ValueError(f"{name}: every class needs at least 3 samples to split (counts {counts.tolist()})")
    train, val, test = split_indices(y, fractions, seed)
    mean = X[train].mean(axis=0)
    scale = X[train].std(axis=0)
    scale[scale == 0] = 1.0

    def t(rows):
        return ((X[rows] - mean) / scale).astype(np.float32)

    return Dataset(name, t(train), y[train], t(val), y[val], t(test), y[test], list(class_names),
                   list(feature_names), mean.astype(np.float32), scale.astype(np.float32), seed, source)


def load_dataset(name: str | Path, *, seed: int = 0, fractions=(0.6, 0.2, 0.2), digits_pool: int = 2) -> Dataset:
    """``"vowels"``, ``"digits"`` or a path to a CSV/NPZ file, split with ``seed`` and scaled."""
    key = str(name)
    if key == "vowels":
        X, y, classes, feats = load_vowels()
        source = "Hillenbrand et al., JASA 97, 3099 (1995), women, 12 formant features"
    elif key == "digits":
        X, y, classes, feats = load_digits_features(digits_pool)
        source = f"scikit-learn load_digits, {8 // digits_pool}x{8 // digits_pool} (pool {digits_pool})"
    else:
        path = Path(key)
        if not path.exists():
            raise ValueError(f"unknown dataset {key!r}: use {' or '.join(BUILTIN)} or a CSV/NPZ file path")
        X, y, classes, feats = load_file(path)
        source, key = str(path), path.stem
    return make_dataset(X, y, classes, feats, name=key, seed=seed, fractions=fractions, source=source)


def reduce_features(ds: Dataset, n: int) -> Dataset:
    """``ds`` with its (standardised) features projected on the first ``n`` principal components
    of the training split, each component standardised on the training split again. The
    fallback for more features than a bench's channels can take (`labpnn.training.defaults`)."""
    if n >= ds.n_features:
        return ds
    if n < 1:
        raise ValueError(f"cannot reduce to {n} features")
    mean = ds.X_train.astype(np.float64).mean(0)
    _, sv, vt = np.linalg.svd(ds.X_train.astype(np.float64) - mean, full_matrices=False)
    comps = vt[:n]
    explained = float((sv[:n] ** 2).sum() / max((sv ** 2).sum(), 1e-300))
    z_train = (ds.X_train - mean) @ comps.T
    scale = z_train.std(0)
    scale[scale == 0] = 1.0

    def t(X):
        return (((X - mean) @ comps.T) / scale).astype(np.float32)

    reduction = {"method": "pca", "from": ds.n_features, "to": n, "explained_variance": explained,
                 "fitted_on": "train"}
    return replace(ds, X_train=t(ds.X_train), X_val=t(ds.X_val), X_test=t(ds.X_test),
                   feature_names=[f"pc{i + 1}" for i in range(n)], reduction=reduction)


def logistic_baseline(ds: Dataset, *, C: float = 1.0) -> dict[str, float]:
    """A digital linear classifier (multinomial logistic regression) on the same splits."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=5000).fit(ds.X_train, ds.y_train)
    return {"validation": float(clf.score(ds.X_val, ds.y_val)), "test": float(clf.score(ds.X_test, ds.y_test))}
