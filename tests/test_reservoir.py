"""Reservoirs and the digital baseline (labpnn.training.reservoir, methods.LogisticMethod): fixed
physics, only the readout trains, passes only at setup and evaluation; the kinds every table row
carries; the driver's model selection; end to end through a real device server."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_phyll import SmoothSystem, blobs, spied

from labpnn.training.methods import KINDS, LogisticMethod, Method, accuracy_and_loss, train_method
from labpnn.training.phyll import PhyLL
from labpnn.training.reservoir import Reservoir, ReservoirSettings
from labpnn.training.spsa import SPSA

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_method_says_what_it_is():
    rows = {m.name: m.kind for m in (PhyLL(), PhyLL(physics="zeros"), PhyLL(physics="digital"), SPSA(),
                                      SPSA(readout="hybrid"), Reservoir(), Reservoir(readout="ridge"),
                                      LogisticMethod())}
    assert rows == {"phyll": "hybrid", "phyll-zeros": "digital", "phyll-digital": "digital", "spsa": "hybrid",
                    "reservoir": "physical", "reservoir-ridge": "hybrid", "logistic": "digital"}
    assert SPSA().kind == "physical" and set(rows.values()) <= set(KINDS)


@pytest.mark.parametrize("readout", ["elementwise", "ridge"])
def test_fixed_physics_readout_only_and_passes_only_to_measure(readout):
    ds = blobs()
    spy, counter = spied(SmoothSystem(n_controls=16, n_outputs=24))
    method = Reservoir(ReservoirSettings(readout=readout, steps=100))
    assert isinstance(method, Method)
    with counter.counting("train"):
        method.setup(counter, ds.X_train, ds.y_train)
    N = len(ds.y_train)
    assert method.setup_passes == spy.rows["train"] == N  # one layer: the training split once
    frozen = {k: v.clone() for k, v in method.net.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        with counter.counting("train"):
            stats = method.train_epoch(counter, ds.X_train, ds.y_train, gen)
        assert stats["passes"] == 0
    assert spy.rows["train"] == N  # training measured nothing more
    assert all(torch.equal(v, method.net.state_dict()[k]) for k, v in frozen.items())  # the physics side never moved
    with counter.counting("validation"):
        acc, _ = accuracy_and_loss(method.logits(counter, ds.X_val), ds.y_val)
    assert spy.rows["validation"] == len(ds.y_val)
    assert acc > 0.5  # chance is 1/3; a random smooth map keeps blobs apart
    if readout == "ridge":
        assert stats["alpha"] in method.settings.alphas


def test_elementwise_readout_is_one_scale_and_offset_per_class():
    ds = blobs()
    method = Reservoir()
    counter = spied(SmoothSystem(n_controls=16, n_outputs=24))[1]
    method.setup(counter, ds.X_train, ds.y_train)
    method.train_epoch(counter, ds.X_train, ds.y_train, torch.Generator())
    z = method._standardised_pooled(method.train_traces)
    want = (method.scale * z + method.offset).detach().numpy()
    assert method.scale.shape == method.offset.shape == (ds.n_classes,)
    assert np.allclose(method._scores(method.train_traces), want)
    with pytest.raises(ValueError, match="training split"):
        method.train_epoch(counter, ds.X_val, ds.y_val, torch.Generator())


def test_logistic_baseline_is_digital_and_makes_no_pass():
    ds = blobs()
    spy, counter = spied(SmoothSystem())
    acc, passes, history = train_method(spy, ds, LogisticMethod(), epochs=2, seed=0, counter=counter)
    assert spy.rows == {} and sum(passes.values()) == 0
    assert acc >= 0.9


def test_driver_restores_the_best_validation_model():
    class Scripted:
        """A method whose validation accuracy is scripted per epoch: 0.2, 1.0, 0.4."""

        name, kind = "scripted", "digital"

        def __init__(self):
            self.epoch = 0

        def setup(self, counter, X, y):
            self.K = int(y.max()) + 1

        def train_epoch(self, counter, X, y, gen):
            self.epoch += 1
            return {"loss": 1.0 / self.epoch}

        def logits(self, counter, X):
            good = {1: 0.2, 2: 1.0, 3: 0.4}[self.epoch]
            n = len(X)
            y = self.truth if n == len(self.truth) else np.zeros(n, int)
            pred = np.where(np.arange(n) < good * n, y, (y + 1) % self.K)
            return np.eye(self.K)[pred]

        def state_dict(self):
            return {"epoch": self.epoch}

        def load_state_dict(self, d):
            self.epoch = d["epoch"]

    ds = blobs()
    m = Scripted()
    m.truth = ds.y_val
    acc, passes, history = train_method(SmoothSystem(), ds, m, epochs=3)
    assert [h["val_acc"] for h in history[:3]] == pytest.approx([0.2, 1.0, 0.4], abs=0.03)
    assert history[-1]["selected"] and history[-1]["epoch"] == 2 and m.epoch == 2


@pytest.mark.slow
@pytest.mark.parametrize("readout", ["elementwise", "ridge"])
def test_end_to_end_through_a_device_server(make_server, make_client, readout):
    server = make_server(rig=dict(n_controls=16, n_outputs=48, noise=0.005))
    client = make_client(server)
    ds = blobs()
    acc, passes, history = train_method(client, ds, Reservoir(readout=readout), epochs=3, seed=0)
    assert passes["train"] == len(ds.y_train)
    assert passes["validation"] == 3 * len(ds.y_val) and passes["test"] == len(ds.y_test)
    assert server.sim.actuations == sum(passes.values())
    if readout == "ridge":
        assert acc > 0.5, history  # chance is 1/3
    else:  # the floor: the physics' own argmax, rescaled per class, may be near chance on a random map;
        # the convex readout fit must at least beat the constant prior (loss log 3)
        assert history[0]["train_loss"] < np.log(3), history
