"""PhyLL (labpnn.training.phyll): the pieces against hand computations, the pass accounting with a
spy, training on a system whose ``run`` returns plain arrays, the twin never imported, the presets'
quirks, the baselines, and end to end through a real device server."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from labpnn.training.counting import PassCounter
from labpnn.training.datasets import make_dataset
from labpnn.training.methods import Method, train_method
from labpnn.training.phyll import (
    PRESETS,
    PhyLL,
    goodness,
    minmax_rows,
    overlay,
    overlay_value,
    phyll_loss,
    phyll_preset,
    phyll_with_baselines,
    random_prototype,
    wrong_labels,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SmoothSystem:
    """A plain `PhysicalSystem`: ``run`` takes and returns numpy arrays, so there is nothing to
    differentiate through. A fixed random smooth map ``y = tanh(x W + b)^2`` (deterministic)."""

    def __init__(self, n_controls: int = 24, n_outputs: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.W = rng.normal(0, 2 / np.sqrt(n_controls), (n_controls, n_outputs))
        self.b = rng.normal(0, 0.5, n_outputs)
        self.n_controls, self.n_outputs = n_controls, n_outputs

    def describe(self):
        return {"n_controls": self.n_controls, "n_outputs": self.n_outputs,
                "axis": {"name": "pixel", "unit": "", "values": list(range(self.n_outputs))},
                "limits": {}, "instruments": {}, "settings": {}}

    def run(self, controls):
        return (np.tanh(np.asarray(controls, np.float64) @ self.W + self.b) ** 2).astype(np.float32)


class Spy:
    """Passes through to a system; checks every batch is a float32 numpy array in [0, 1] (never a
    tensor), and books the rows by the counter's kind at call time."""

    def __init__(self, system, counter_ref: list):
        self.system, self.counter_ref = system, counter_ref
        self.rows: dict[str, int] = {}
        self.calls = 0

    def describe(self):
        return self.system.describe()

    def run(self, controls):
        assert type(controls) is np.ndarray and controls.dtype == np.float32, type(controls)
        assert controls.min() >= 0.0 and controls.max() <= 1.0
        kind = self.counter_ref[0].kind if self.counter_ref else "?"
        self.rows[kind] = self.rows.get(kind, 0) + len(controls)
        self.calls += 1
        return self.system.run(controls)


def blobs(n_per_class: int = 40, n_classes: int = 3, n_features: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, (n_classes, n_features))
    X = np.concatenate([c + rng.normal(0, 0.6, (n_per_class, n_features)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return make_dataset(X, y, [f"c{i}" for i in range(n_classes)], [f"f{i}" for i in range(n_features)],
                        name="blobs", seed=seed)


def spied(system):
    ref: list = []
    spy = Spy(system, ref)
    counter = PassCounter(spy)
    ref.append(counter)
    return spy, counter


# -- the pieces, by hand ---------------------------------------------------------------------------
def test_overlay_hand_example():
    x = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    labels = torch.tensor([2, 0])
    # the paper: max|x| over the whole batch (3), on slot y of 3 zero slots
    got = overlay(x, labels, 3, overlay_value(x, "batch"))
    assert torch.equal(got, torch.tensor([[0, 0, 3, 1, -3], [3, 0, 0, 2, 0.5]]))
    # fixed: each sample's own max|x| (3 and 2)
    got = overlay(x, labels, 3, overlay_value(x, "sample"))
    assert torch.equal(got, torch.tensor([[0, 0, 3, 1, -3], [2, 0, 0, 2, 0.5]]))


def test_minmax_rows_hand_example():
    h = torch.tensor([[0.0, 2.0, 4.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, 1.0, 0.0, 3.0]])
    want = torch.tensor([[0, 0.5, 1, 0.25], [0.5, 0.5, 0.5, 0.5], [0, 0.5, 0.25, 1]])
    assert torch.equal(minmax_rows(h), want)  # these quotients are exact in binary


def test_goodness_and_loss_hand_example():
    p = torch.tensor([0.6, 0.8])  # a unit vector
    z = torch.tensor([[3.0, -4.0], [1.0, 0.0]])
    g = goodness(z, p)
    # |z| = (3, 4): cos = (1.8 + 3.2) / 5 = 1; |z| = (1, 0): cos = 0.6
    assert g.tolist() == pytest.approx([1.0, 0.6], abs=1e-6)  # float32 rounding
    # log(1 + exp(-4 (1 - 0.6))) and log(1 + exp(-4 (0.6 - 1))), averaged
    want = (math.log(1 + math.exp(-1.6)) + math.log(1 + math.exp(1.6))) / 2
    assert float(phyll_loss(g, g.flip(0), 4.0)) == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.9839007408883389, abs=1e-12)


def test_prototypes_are_fixed_random_unit_vectors():
    a = random_prototype(20, torch.Generator().manual_seed(3))
    b = random_prototype(20, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and float(a.norm()) == pytest.approx(1.0, abs=1e-6)
    system = SmoothSystem()
    ds = blobs()
    method = PhyLL(phyll_preset(blocks=2, batch_size=40, steps_per_pass=2))
    counter = PassCounter(system)
    method.setup(counter, ds.X_train, ds.y_train)
    before = [b.prototype.clone() for b in method.blocks]
    assert not torch.allclose(before[0], before[1])
    method.train_epoch(counter, ds.X_train, ds.y_train, torch.Generator().manual_seed(0))
    assert all(torch.equal(b.prototype, p) for b, p in zip(method.blocks, before, strict=True))


def test_wrong_labels_are_uniform_and_wrong():
    gen = torch.Generator().manual_seed(0)
    y = torch.full((70000,), 2)
    neg = wrong_labels(y, 7, gen)
    assert not (neg == y).any()
    counts = torch.bincount(neg, minlength=7).double() / len(y)
    assert counts[2] == 0
    # 6 wrong labels, each 1/6; the binomial standard deviation at n = 70000 is 0.0014
    assert torch.allclose(counts[torch.arange(7) != 2], torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.006)


def test_controls_placement_hand_example():
    system = SmoothSystem(n_controls=10, n_outputs=4)
    method = PhyLL(phyll_preset(blocks=1, label_slots=2, repeat=2, layout="blocks", rest=0.25))
    X = np.array([[1.0, 3.0], [0.0, 1.0]], np.float32)
    method.setup(PassCounter(system), X, np.array([0, 1]))
    h = torch.tensor([[0.0, 4.0, 1.0, 3.0]])  # slots (0, 4) then the features (1, 3)
    controls, u = method.controls(0, h)
    assert torch.equal(u, torch.tensor([[0.0, 1.0, 0.25, 0.75]]))
    # each input on 2 adjacent channels (layout "blocks"), the last 2 channels at rest
    assert controls.tolist() == [[0.0, 0.0, 1.0, 1.0, 0.25, 0.25, 0.75, 0.75, 0.25, 0.25]]
    # the acoustic code's map: |h| / ||h|| (||(0, 4, 1, 3)|| = sqrt(26))
    method = PhyLL(phyll_preset(blocks=1, label_slots=2, repeat=2, layout="blocks", input_map="abs-l2"))
    method.setup(PassCounter(system), X, np.array([0, 1]))
    _, u = method.controls(0, h)
    assert torch.allclose(u, torch.tensor([[0.0, 4.0, 1.0, 3.0]]) / math.sqrt(26), atol=1e-7)
    with pytest.raises(ValueError, match="control channels"):
        PhyLL(phyll_preset(label_slots=9)).setup(PassCounter(system), X, np.array([0, 1]))


# -- presets and their quirks -------------------------------------------------------------------------
def test_presets_differ_only_in_the_documented_quirks():
    paper, default = PRESETS["paper"], PRESETS["default"]
    diff = {k for k in paper.__dataclass_fields__ if getattr(paper, k) != getattr(default, k)}
    assert diff == {"overlay", "inplace_norm", "shift_min"}
    assert (paper.overlay, paper.inplace_norm, paper.shift_min) == ("batch", True, True)
    assert (paper.tau, paper.steps_per_pass, paper.batch_size, paper.lr) == (4.0, 10, None, 5e-4)
    with pytest.raises(ValueError, match="unknown PhyLL preset"):
        phyll_preset("nope")


def test_paper_skip_path_sees_the_normalised_input_default_does_not():
    system, ds = SmoothSystem(), blobs()
    seen = {}
    for name in ("paper", "default"):
        method = PhyLL(phyll_preset(name, blocks=1))
        method.setup(PassCounter(system), ds.X_train, ds.y_train)
        block = method.blocks[0]
        hook = block.linear.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
        method.logits(PassCounter(system), ds.X_val[:5])
        hook.remove()
        skip = seen[name][:, method.n_phys:]
        x = torch.as_tensor(ds.X_val[:5]) - method.shift
        h = overlay(x.repeat(3, 1), torch.arange(3).repeat_interleave(5), method.slots,
                    overlay_value(x, method.settings.overlay) if name == "paper"
                    else overlay_value(x, "sample").repeat(3))
        want = minmax_rows(h) if name == "paper" else h
        assert torch.allclose(skip, want, atol=1e-6), name


def test_paper_overlay_depends_on_the_batch_default_does_not():
    """The published overlay uses the batch's max|x|: a sample's prediction depends on what else
    is evaluated with it. The default's does not (on a deterministic system)."""
    system, ds = SmoothSystem(), blobs()
    for name, depends in (("paper", True), ("default", False)):
        method = PhyLL(phyll_preset(name, blocks=2))
        counter = PassCounter(system)
        method.setup(counter, ds.X_train, ds.y_train)
        method.train_epoch(counter, ds.X_train, ds.y_train, torch.Generator().manual_seed(0))
        alone = method.logits(counter, ds.X_val[:1])
        with_others = method.logits(counter, ds.X_val)[:1]
        assert (not np.allclose(alone, with_others, atol=1e-5)) == depends, name


# -- passes, and nothing differentiated through the physics ---------------------------------------
def test_plain_array_system_trains_and_the_spy_counts_two_passes_per_block_per_sample():
    ds = blobs()
    spy, counter = spied(SmoothSystem())
    blocks, K = 2, ds.n_classes
    method = PhyLL(phyll_preset(blocks=blocks, batch_size=24, steps_per_pass=5, lr=5e-3))
    assert isinstance(method, Method) and method.kind == "hybrid"
    with counter.counting("train"):
        method.setup(counter, ds.X_train, ds.y_train)
    assert spy.rows == {}  # setup measures nothing
    gen = torch.Generator().manual_seed(0)
    N = len(ds.y_train)
    with counter.counting("train"):
        stats = method.train_epoch(counter, ds.X_train, ds.y_train, gen)
    assert spy.rows == {"train": 2 * N * blocks} and stats["passes"] == 2 * N * blocks
    assert spy.calls == blocks * math.ceil(N / 24)  # positives and negatives of a block in one call
    with counter.counting("validation"):
        method.logits(counter, ds.X_val)
    assert spy.rows["validation"] == K * blocks * len(ds.y_val)
    acc, passes, history = train_method(spy, ds, method, epochs=8, seed=0, counter=counter)
    assert acc >= 0.85, history  # 3 well-separated blobs; chance is 1/3
    assert passes == counter.passes and passes["train"] == spy.rows["train"]


@pytest.mark.slow
def test_never_imports_the_twin():
    """Train PhyLL (and set up SPSA and a reservoir) in a fresh interpreter: labpnn.twin is never imported."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        import torch
        torch.set_num_threads(1)
        from test_phyll import SmoothSystem, blobs
        from labpnn.training.counting import PassCounter
        from labpnn.training.methods import train_method
        from labpnn.training.phyll import PhyLL, phyll_preset
        from labpnn.training.spsa import SPSA
        from labpnn.training.reservoir import Reservoir
        ds = blobs()
        train_method(SmoothSystem(), ds, PhyLL(phyll_preset(blocks=2, steps_per_pass=2)), epochs=1)
        for m in (SPSA(batch_size=60, perturbations=1), Reservoir()):
            train_method(SmoothSystem(), ds, m, epochs=1)
        bad = sorted(m for m in sys.modules if m == "labpnn.twin" or m.startswith("labpnn.twin."))
        bad += sorted(m for m in sys.modules if m.startswith("labpnn.sim_instruments"))
        print("IMPORTED", bad)
        sys.exit(1 if bad else 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "IMPORTED []" in out.stdout


# -- the baselines ------------------------------------------------------------------------------------
def test_baselines_zeros_and_equal_size_digital():
    ds = blobs()
    spy, counter = spied(SmoothSystem())
    phyll, zeros, digital = phyll_with_baselines(phyll_preset(blocks=2, batch_size=40, steps_per_pass=3))
    assert [m.kind for m in (phyll, zeros, digital)] == ["hybrid", "digital", "digital"]
    for m in (phyll, zeros, digital):
        m.setup(counter, ds.X_train, ds.y_train)
    # the same digital paths, of the same sizes
    shapes = [[tuple(b.linear.weight.shape) for b in m.blocks] for m in (phyll, zeros, digital)]
    assert shapes[0] == shapes[1] == shapes[2]
    assert [tuple(b.digital.weight.shape) for b in digital.blocks] == [(16, 8), (16, 20)]
    gen = torch.Generator().manual_seed(0)
    for m in (zeros, digital):
        stats = m.train_epoch(counter, ds.X_train, ds.y_train, gen)
        m.logits(counter, ds.X_val)
        assert stats["passes"] == 0
    assert spy.rows == {}  # neither baseline touched the physics
    P, _ = zeros._physical(counter, 0, torch.ones(3, 8))
    assert torch.equal(P, torch.zeros(3, 16))


def test_without_the_skip_path_only_the_physics_carries_the_input():
    ds = blobs()
    spy, counter = spied(SmoothSystem())
    settings = phyll_preset(blocks=1, batch_size=24, steps_per_pass=5, lr=5e-3, skip=False)
    phyll, zeros, _ = phyll_with_baselines(settings)
    for m in (phyll, zeros):
        m.setup(counter, ds.X_train, ds.y_train)
    assert tuple(phyll.blocks[0].linear.weight.shape) == (settings.hidden, 16)  # the 16 physical outputs only
    # with the physics replaced by zeros every label scores the same: the ablation is at chance
    logits = zeros.logits(counter, ds.X_val)
    assert torch.allclose(torch.as_tensor(logits), torch.as_tensor(logits)[:, :1].expand_as(torch.as_tensor(logits)))
    acc, _, history = train_method(spy, ds, phyll, epochs=8, seed=0, counter=counter)
    assert acc >= 0.85, history  # the blobs, through the physics alone


# -- end to end through a real device server -----------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_through_a_device_server(make_server, make_client):
    server = make_server(rig=dict(n_controls=24, n_outputs=32, noise=0.005))
    client = make_client(server)
    ds = blobs()
    method = PhyLL(phyll_preset(blocks=2, batch_size=32, steps_per_pass=5, lr=5e-3))
    acc, passes, history = train_method(client, ds, method, epochs=6, seed=0)
    N, blocks, K = len(ds.y_train), 2, ds.n_classes
    assert passes["train"] == 6 * 2 * N * blocks
    assert passes["validation"] == 6 * K * blocks * len(ds.y_val)
    assert passes["test"] == K * blocks * len(ds.y_test)
    assert server.sim.actuations == sum(passes.values())  # the rig ran exactly the rows counted
    assert acc >= 0.8, history
