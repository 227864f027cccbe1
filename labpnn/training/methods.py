"""Training methods behind one small protocol, and a driver that runs any of them on the physics.

A `Method` is whatever turns a physical system into a classifier: PhyLL (`labpnn.training.phyll`),
SPSA on the PAT network (`labpnn.training.spsa`), a reservoir (`labpnn.training.reservoir`), and the
baselines that keep them honest (PhyLL with its physics replaced by zeros, an equal-size digital
network, a digital logistic regression: `LogisticMethod` below).

Every method measures **only** through the `PassCounter` it is handed (``measure_of(counter, ...)``
or ``PhysicsForward(counter)``), so every physical pass is counted; the caller sets the kind
(``with counter.counting("train"): method.train_epoch(...)``). A method never imports the twin.

``kind`` says what classifies, as every report must:

- ``"physical"``: the physics classifies; only element-wise digital affine maps around it
  (a scale and an offset per channel), as in the PAT paper;
- ``"hybrid"``: a denser digital part (a digital matrix, a digital classifier) shares the work;
- ``"digital"``: no physics at all (a baseline; it makes no physical pass).

`train_method` is the small driver used by the tests and the benchmark: setup (counted
``train``), epochs of training, validation **on the physics** after each epoch, the
best-validation model (highest accuracy, then lowest loss) kept, and one test on the physics.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from labpnn.contract import PhysicalSystem
from labpnn.training.counting import PassCounter
from labpnn.training.datasets import Dataset

KINDS = ("physical", "hybrid", "digital")


@runtime_checkable
class Method(Protocol):
    """A training method (see the module docstring)."""

    name: str  #: "phyll", "spsa", "reservoir", ...
    kind: str  #: "physical" | "hybrid" | "digital" (see the module docstring)

    def setup(self, counter: PassCounter, X_train: np.ndarray, y_train: np.ndarray) -> None:
        """Build the model for this system and data; may measure (the caller counts it ``train``)."""

    def train_epoch(self, counter: PassCounter, X: np.ndarray, y: np.ndarray,
                    gen: torch.Generator) -> dict[str, float]:
        """One epoch over ``(X, y)``; returns statistics (at least ``loss``; ``passes``: the
        physical passes this epoch spent)."""

    def logits(self, counter: PassCounter, X: np.ndarray) -> np.ndarray:
        """Class scores float[N, n_classes] for ``X``, evaluated on the physics (argmax = class)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


def accuracy_and_loss(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of class scores ``logits`` [N, K] against labels ``y``."""
    z = torch.as_tensor(np.asarray(logits, np.float64))
    t = torch.as_tensor(np.asarray(y, np.int64))
    loss = float(torch.nn.functional.cross_entropy(z, t))
    return float((z.argmax(1) == t).double().mean()), loss


def train_method(system: PhysicalSystem, ds: Dataset, method: Method, epochs: int, seed: int = 0, *,
                 counter: PassCounter | None = None, val_every: int = 1,
                 log: Callable[[str], None] | None = None) -> tuple[float, dict[str, int], list[dict[str, Any]]]:
    """Train ``method`` on ``system`` for ``epochs`` epochs; returns ``(test accuracy on the
    physics, physical passes by kind, history)``.

    Setup and training are counted ``train``, validation ``validation``, the one test ``test``.
    Validation runs after every ``val_every``-th epoch and after the last; the model with the best
    validation accuracy (then the lowest validation loss) is restored before the test. Each
    history row: epoch, the method's statistics (``train_*``), ``val_acc``, ``val_loss``, passes so
    far by kind, seconds. A ``counter`` given is used (its counts keep accumulating)."""
    counter = counter if counter is not None else PassCounter(system)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with counter.counting("train"):
        method.setup(counter, ds.X_train, ds.y_train)
    best: dict[str, Any] = {"acc": -1.0, "loss": math.inf, "epoch": 0, "state": copy.deepcopy(method.state_dict())}
    history: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        with counter.counting("train"):
            stats = method.train_epoch(counter, ds.X_train, ds.y_train, gen)
        row: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": float(v) for k, v in stats.items()}}
        if epoch % max(1, val_every) == 0 or epoch == epochs:
            with counter.counting("validation"):
                val_acc, val_loss = accuracy_and_loss(method.logits(counter, ds.X_val), ds.y_val)
            row.update(val_acc=val_acc, val_loss=val_loss)
            if val_acc > best["acc"] or (val_acc == best["acc"] and val_loss < best["loss"]):
                best = {"acc": val_acc, "loss": val_loss, "epoch": epoch, "state": copy.deepcopy(method.state_dict())}
        row.update(passes=dict(counter.passes), seconds=time.perf_counter() - started)
        history.append(row)
        if log is not None:
            log(f"{method.name} epoch {epoch}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "seconds"))
    method.load_state_dict(best["state"])
    with counter.counting("test"):
        test_acc, test_loss = accuracy_and_loss(method.logits(counter, ds.X_test), ds.y_test)
    history.append({"epoch": best["epoch"], "selected": True, "val_acc": best["acc"], "test_acc": test_acc,
                    "test_loss": test_loss, "passes": dict(counter.passes),
                    "seconds": time.perf_counter() - started})
    return test_acc, dict(counter.passes), history


# -- the digital baseline every hybrid row stands beside ------------------------------------------------
class LogisticMethod:
    """A digital multinomial logistic regression on the same features (no physics, no pass).
    ``C``: the inverse regularisation strength (scikit-learn's)."""

    name = "logistic"
    kind = "digital"

    def __init__(self, C: float = 1.0):
        self.C = float(C)
        self.clf = None

    def setup(self, counter: PassCounter, X_train: np.ndarray, y_train: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        self.clf = LogisticRegression(C=self.C, max_iter=5000)

    def train_epoch(self, counter: PassCounter, X: np.ndarray, y: np.ndarray, gen: torch.Generator) -> dict[str, float]:
        if not hasattr(self.clf, "coef_"):  # deterministic: one fit is every epoch's fit
            self.clf.fit(X, y)
        return {"loss": float(-np.log(np.clip(self.clf.predict_proba(X)[np.arange(len(y)), y], 1e-12, 1)).mean()),
                "passes": 0.0}

    def logits(self, counter: PassCounter, X: np.ndarray) -> np.ndarray:
        scores = np.asarray(self.clf.decision_function(X), np.float64)
        return np.stack([-scores / 2, scores / 2], 1) if scores.ndim == 1 else scores

    def state_dict(self) -> dict:
        return {"clf": copy.deepcopy(self.clf)}

    def load_state_dict(self, d: dict) -> None:
        self.clf = copy.deepcopy(d["clf"])
