"""Network building blocks: channel assignment, pooling, controls in range, physical readout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labpnn.training.network import (
    PhysicalLayer,
    PhysicalNetwork,
    Pooling,
    assign_channels,
    build_network,
    network_from_state,
)

torch.set_num_threads(1)


def toy_physics(controls: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear map 64 -> 128 standing in for a bench (all positive, spectrum-like)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(controls.shape[1], 128, generator=gen)
    return (torch.exp(2 * controls) @ w) ** 2 / 1e4


@pytest.mark.parametrize("layout", ["spread", "grouped", "blocks", "grouped:0.15-0.85", "spread:0.1-0.9"])
def test_channel_assignment_partitions_the_channels(layout):
    inputs, feature, params = assign_channels(64, 12, 3, layout)
    assert len(inputs) == 36 and len(params) == 28
    assert sorted(np.concatenate([inputs, params]).tolist()) == list(range(64))
    assert np.bincount(feature).tolist() == [3] * 12  # each feature on exactly `repeat` channels
    if layout.startswith("grouped"):
        assert feature.tolist() == np.repeat(np.arange(12), 3).tolist()
    if layout.startswith("spread"):
        assert feature[:12].tolist() == list(range(12))
    if ":" in layout:  # inputs inside the span, parameters also on the edges
        assert inputs.min() >= 6 and inputs.max() <= 57 and 0 in params and 63 in params


def test_channel_assignment_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="only 16 control channels"):
        assign_channels(16, 12, 3)
    with pytest.raises(ValueError, match="cannot hold"):
        assign_channels(64, 12, 3, "grouped:0.4-0.6")
    with pytest.raises(ValueError, match="unknown channel layout"):
        assign_channels(64, 12, 3, "zigzag")


def test_pooling_sums_contiguous_bins():
    pool = Pooling(10, [1, 3, 4, 9])
    x = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    expected = torch.stack([x[:, 1:3].sum(1), x[:, 3:4].sum(1), x[:, 4:9].sum(1)], 1)
    torch.testing.assert_close(pool(x), expected)
    with pytest.raises(ValueError):
        Pooling(10, [3, 3, 5])


def test_pooling_from_traces_equal_mass_inside_the_signal_window():
    trace = np.zeros(200)
    trace[50:150] = np.exp(-0.5 * ((np.arange(100) - 50) / 15) ** 2)
    pool = Pooling.from_traces(trace, 7)
    edges = pool.edges.numpy()
    assert edges[0] >= 45 and edges[-1] <= 155
    masses = pool(torch.tensor(trace, dtype=torch.float32)[None])[0].numpy()
    assert masses.max() / masses.min() < 1.6  # about equal shares
    width = Pooling.from_traces(trace, 7, mode="equal-width").edges.numpy()
    assert np.ptp(np.diff(width)) <= 1


def test_pooling_from_traces_many_bins_on_few_uneven_outputs_stay_inside():
    # 12 bins on 20 outputs whose mass sits in a few: pushing edges apart must not run past the end
    trace = np.array([5, 0.1, 0.1, 9, 0.1, 0.1, 8, 0.1, 0.1, 0.1, 7, 0.1, 0.1, 0.1, 0.1, 6, 0.1, 0.1, 0.1, 5.0])
    edges = Pooling.from_traces(trace, 12).edges.numpy()
    assert edges[0] == 0 and edges[-1] == 20 and np.all(np.diff(edges) >= 1)
    # the re-placement for a balanced readout, too: rows where the last outputs always win
    rows = np.tile(trace, (50, 1)) * (1 + 0.1 * np.random.default_rng(0).standard_normal((50, 20)))
    rows[:, -3:] *= 5
    pool, report = Pooling.balanced(rows, 12)
    edges = pool.edges.numpy()
    assert report["replaced"] and edges[0] == 0 and edges[-1] == 20 and np.all(np.diff(edges) >= 1)


def test_controls_always_inside_the_control_range():
    pool = Pooling.equal_width(128, 7)
    for encoding in ("sigmoid", "clamp"):
        layer = PhysicalLayer(12, pool, n_controls=64, repeat=3, control_range=(0.1, 0.9), encoding=encoding)
        with torch.no_grad():
            layer.theta.uniform_(-5, 5)  # parameters pushed far outside
            layer.in_scale.fill_(100.0)
        x = torch.randn(50, 12) * 10
        c = layer.encode(x)
        assert c.shape == (50, 64)
        assert float(c.detach().min()) >= 0.1 and float(c.detach().max()) <= 0.9
        layer.project_()
        assert float(layer.theta.detach().min()) >= 0.1 and float(layer.theta.detach().max()) <= 0.9
        # parameter channels carry theta, identical for every row
        torch.testing.assert_close(c[:, layer.param_channels], layer.theta.expand(50, -1))


def test_physical_readout_classifies_by_argmax_of_pooled_outputs():
    net = build_network(64, 12, 7, layers=2, n_outputs=128, seed=1)
    x = torch.randn(40, 12)
    net.init_affine(x, toy_physics)
    logits = net(x, toy_physics)
    hidden = net.layers[0](x, toy_physics)
    pooled = net.layers[1].pooled(hidden, toy_physics)
    assert torch.equal(logits.argmax(1), pooled.argmax(1))
    assert net.readout == "physical" and "hybrid" not in net.name
    assert not hasattr(net, "classifier")
    # no digital matrix anywhere: every parameter is element-wise (1-D) or a scalar
    assert all(p.dim() <= 1 for p in net.parameters())


def test_init_affine_standardises_hidden_features_without_favouring_a_class():
    net = build_network(64, 12, 7, layers=2, n_outputs=128, seed=0)
    x = torch.randn(200, 12)
    net.init_affine(x, toy_physics)
    with torch.no_grad():
        h = net.layers[0](x, toy_physics)
        pooled = net.layers[1].pooled(h, toy_physics)
    torch.testing.assert_close(h.mean(0), torch.zeros(12), atol=1e-4, rtol=0)
    torch.testing.assert_close(h.std(0), torch.ones(12), atol=1e-3, rtol=0)
    share = pooled.mean(0) / pooled.mean(0).sum()
    assert float(share.max() / share.min()) < 1.5  # re-pooled: classes start on an equal footing


def test_hybrid_is_named_and_has_a_digital_classifier():
    net = build_network(64, 12, 7, layers=1, n_outputs=128, readout="hybrid", readout_bins=16)
    assert isinstance(net.classifier, torch.nn.Linear) and "hybrid" in net.name
    assert net(torch.randn(3, 12), toy_physics).shape == (3, 7)


def test_save_and_rebuild():
    net = build_network(64, 12, 7, layers=2, n_outputs=128, seed=2)
    x = torch.randn(30, 12)
    net.init_affine(x, toy_physics)
    again = network_from_state(net.config, net.state_dict())
    torch.testing.assert_close(again(x, toy_physics), net(x, toy_physics))
    assert isinstance(again, PhysicalNetwork)


def test_bypassing_a_hidden_layer_passes_its_features_on_unchanged():
    from labpnn.training.ablation import bypass_accuracies, forward_bypassing

    net = build_network(64, 12, 7, layers=3, n_outputs=128, seed=3)
    x = torch.randn(40, 12)
    net.init_affine(x, toy_physics)
    with torch.no_grad():
        torch.testing.assert_close(forward_bypassing(net, x, toy_physics, set()), net(x, toy_physics))
        skip0 = forward_bypassing(net, x, toy_physics, {0})  # layer 1 receives the raw features
        expect = net.log_tau.exp() * (net.layers[2].pooled(net.layers[1](x, toy_physics), toy_physics) - net.mu) / net.sigma
        torch.testing.assert_close(skip0, expect)
    y = np.arange(40) % 7
    report = bypass_accuracies(net, x.numpy(), y, toy_physics)
    assert [r["bypassed"] for r in report] == [0, 1, "all hidden"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report)
    with pytest.raises(ValueError, match="cannot be bypassed"):  # the readout layer makes the class scores
        forward_bypassing(net, x, toy_physics, {2})
    assert bypass_accuracies(build_network(64, 12, 7, layers=1, n_outputs=128), x.numpy(), y, toy_physics) == []
    wide = build_network(64, 12, 7, layers=2, hidden=16, n_outputs=128)  # 12 -> 16 features: no identity
    assert bypass_accuracies(wide, x.numpy(), y, toy_physics)[0]["accuracy"] is None
