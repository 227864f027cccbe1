"""SPSA (labpnn.training.spsa): Spall's gains and the estimator by hand, convergence on a small
smooth bench with every pass accounted for, parameters kept in the calibrated range, and end to
end through a real device server."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_phyll import SmoothSystem, blobs, spied

from labpnn.contract import Measurement, measure_of
from labpnn.training.counting import PassCounter
from labpnn.training.methods import Method, train_method
from labpnn.training.spsa import (
    SPSA,
    SPSASettings,
    discrete_perturbation,
    rademacher,
    spall_gains,
    spsa_estimate,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spall_gains_by_hand():
    s = SPSASettings(a=0.2, c=0.1, iterations=100)  # A = 10 % of 100 = 10
    assert spall_gains(0, s) == pytest.approx((0.2 / 11 ** 0.602, 0.1))
    assert spall_gains(9, s) == pytest.approx((0.2 / 20 ** 0.602, 0.1 / 10 ** 0.101))
    assert spall_gains(0, SPSASettings(a=1.0, A=0.0)) == pytest.approx((1.0, 0.05))


def test_estimate_is_exact_for_a_linear_loss_over_all_directions():
    """For L(θ) = w·θ, (L₊ − L₋)/(2c) = w·Δ, so ĝ = (w·Δ) Δ; averaged over all 2ⁿ sign patterns
    the cross terms cancel exactly and ĝ = w."""
    w = torch.tensor([0.5, -2.0, 3.0])
    theta = torch.tensor([0.1, 0.2, 0.3])
    deltas = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))
    c = 0.01
    lp = torch.stack([w @ (theta + c * d) for d in deltas])
    lm = torch.stack([w @ (theta - c * d) for d in deltas])
    assert torch.allclose(spsa_estimate(lp, lm, deltas, c), w, atol=1e-4)  # float32 differences / 2c
    d = rademacher(1000, 5, torch.Generator().manual_seed(0))
    assert set(d.unique().tolist()) == {-1.0, 1.0}


def test_converges_on_a_smooth_bench_and_spends_exactly_the_passes_it_reports():
    ds = blobs(n_classes=3, n_features=4)
    spy, counter = spied(SmoothSystem(n_controls=24, n_outputs=16))
    method = SPSA(readout="hybrid", batch_size=24, perturbations=4, adam_lr=0.05, c=0.1)
    assert isinstance(method, Method) and method.kind == "hybrid" and SPSA().kind == "physical"
    with counter.counting("train"):
        method.setup(counter, ds.X_train, ds.y_train)
    N, P, layers = len(ds.y_train), 4, 1
    assert method.setup_passes == spy.rows["train"] == N * layers  # the training split, once, to place bins
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):
        before = spy.rows["train"]
        with counter.counting("train"):
            stats = method.train_epoch(counter, ds.X_train, ds.y_train, gen)
        assert stats["passes"] == spy.rows["train"] - before == 2 * P * N * layers
        losses.append(stats["loss"])
    assert method.measured == spy.rows["train"] == counter.passes["train"]
    # the loss falls well below its start (each epoch's mean is measured at the perturbed points)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
    with counter.counting("validation"):
        logits = method.logits(counter, ds.X_val)
    assert spy.rows["validation"] == len(ds.y_val) * layers
    assert (logits.argmax(1) == ds.y_val).mean() >= 0.8  # 3 well-separated blobs; chance is 1/3


def test_parameters_and_controls_stay_in_the_calibrated_range():
    ds = blobs()
    lo, hi = 0.2, 0.7
    spy, counter = spied(SmoothSystem())
    sent = []
    inner_run = spy.system.run
    spy.system.run = lambda c: (sent.append(c.copy()), inner_run(c))[1]
    method = SPSA(control_range=(lo, hi), batch_size=30, perturbations=2, c=0.3, adam_lr=0.3, layers=2)
    train_method(spy, ds, method, epochs=3, seed=0, counter=counter)
    controls = np.concatenate(sent)
    assert controls.min() >= lo and controls.max() <= hi  # a big c, a big step: still inside
    for layer in method.net.layers:
        assert float(layer.theta.detach().min()) >= lo and float(layer.theta.detach().max()) <= hi
    # two layers: 2 × P × B per layer per step
    assert counter.passes["train"] == method.setup_passes + 3 * 2 * 2 * len(ds.y_train) * 2


def test_plain_sgd_with_spall_gains_moves_theta():
    ds = blobs()
    counter = PassCounter(SmoothSystem())
    method = SPSA(optimizer="sgd", a=0.5, batch_size=60, perturbations=2)
    method.setup(counter, ds.X_train, ds.y_train)
    before = method.flat().clone()
    method.train_epoch(counter, ds.X_train, ds.y_train, torch.Generator().manual_seed(1))
    assert method.k == 2 and not torch.equal(before, method.flat())
    with pytest.raises(ValueError, match="unknown optimizer"):
        SPSA(optimizer="lbfgs")


def test_discrete_perturbation_straddles_the_neighbouring_states_by_hand():
    centre, half = discrete_perturbation(torch.tensor([0.1, 0.49, 0.5, 0.9, 1.0]), levels=2)
    assert torch.allclose(centre, torch.full((5,), 0.5)) and torch.allclose(half, torch.full((5,), 0.5))
    centre, half = discrete_perturbation(torch.tensor([0.0, 0.4, 1.0]), levels=4)  # states 0, 1/3, 2/3, 1
    assert torch.allclose(centre, torch.tensor([0.5, 1.5, 2.5]) / 3) and torch.allclose(half, torch.full((3,), 1 / 6))
    # a per-parameter c in the estimator: for L = w·θ, each coordinate divides by its own 2c
    w, c = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.01])
    deltas = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)))
    lp = torch.stack([w @ (c * d) for d in deltas])
    assert torch.allclose(spsa_estimate(lp, -lp, deltas, c), w, atol=1e-5)
    moved = torch.tensor([[True, False], [False, True]])  # each parameter averages its own perturbation
    assert torch.allclose(spsa_estimate(torch.tensor([1.0, 4.0]), torch.zeros(2), torch.ones(2, 2), 0.5, moved),
                          torch.tensor([1.0, 4.0]))


class BinaryRig:
    """Quantises every control to OFF/ON at 0.5 (a binary metasurface) and reports the states it
    set, as the microwave rig does."""

    def __init__(self, system):
        self.system, self.sent = system, []

    def describe(self):
        return self.system.describe()

    def measure(self, controls):
        self.sent.append(np.array(controls, np.float32))
        states = (np.asarray(controls) >= 0.5).astype(np.float32)
        m = measure_of(self.system, states)
        return Measurement(controls=np.array(controls, np.float32), traces=m.traces, applied=states,
                           timestamps=m.timestamps, flags=m.flags)

    def run(self, controls):
        return self.measure(controls).traces


def test_on_a_binary_rig_every_physical_parameter_is_perturbed_across_its_threshold():
    """c = 0.05 of a latent in [0, 1] would almost never flip an atom; discrete SPSA evaluates each
    physical parameter at its two states, in perturbations of their own (the digital parameters in
    the others), and a continuous rig keeps the plain perturbation of everything."""
    ds = blobs()
    rig = BinaryRig(SmoothSystem())
    counter = PassCounter(rig)
    P = 2
    method = SPSA(batch_size=len(ds.y_train), perturbations=P)
    method.setup(counter, ds.X_train, ds.y_train)
    assert method.levels == 2
    layer = method.net.layers[0]
    params, inputs = layer.param_channels.numpy(), layer.input_channels.numpy()
    latent = layer.theta.detach().numpy().copy()
    rig.sent.clear()
    method.step(counter, torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train), torch.Generator().manual_seed(0))
    (sent,) = rig.sent  # one call: the 2 × P variants of the one layer
    variants = sent.reshape(2 * P, len(ds.y_train), -1)
    digital, atoms = variants[0:2], variants[2:4]  # step 0: perturbation 0 moves the digital block
    assert np.allclose(digital[:, :, params], latent)  # atoms held at their latent values
    assert not np.allclose(digital[0][:, inputs], digital[1][:, inputs])  # input maps moved
    assert set(np.unique(atoms[:, :, params]).tolist()) == {0.0, 1.0}
    assert (atoms[0][:, params] != atoms[1][:, params]).all()  # + / −: every atom in both states
    assert np.array_equal(atoms[0][:, inputs], atoms[1][:, inputs])  # digital parameters held
    assert method.blocks(1)[0].equal(method.is_physical)  # step 1 starts with the atoms
    continuous = SPSA(batch_size=len(ds.y_train))
    continuous.setup(PassCounter(SmoothSystem()), ds.X_train, ds.y_train)
    assert continuous.levels is None and continuous.blocks(3).all()


@pytest.mark.slow
def test_end_to_end_through_a_device_server(make_server, make_client):
    server = make_server(rig=dict(n_controls=16, n_outputs=32, noise=0.005))
    client = make_client(server)
    ds = blobs()
    method = SPSA(readout="hybrid", batch_size=32, perturbations=2, adam_lr=0.05, c=0.1)
    acc, passes, history = train_method(client, ds, method, epochs=4, seed=0)
    N = len(ds.y_train)
    assert passes["train"] == N + 4 * 2 * 2 * N
    assert passes["validation"] == 4 * len(ds.y_val) and passes["test"] == len(ds.y_test)
    assert server.sim.actuations == sum(passes.values())
    assert acc > 0.5, history  # chance is 1/3
