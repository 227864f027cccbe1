"""The PAT contract, with physics != twin: forward = exactly the physics, backward = the twin's
VJP at the controls as applied, one physical call per forward and none in backward."""
from __future__ import annotations

import time

import numpy as np
import torch

from labpnn.contract import Measurement
from labpnn.training.pat import PAT, LiveTwin, PATForward, PhysicsForward, TwinForward, pat

torch.set_num_threads(1)
C, S = 8, 20


class Physics:
    """A noisy nonlinear system that is deliberately NOT the twin. Counts its calls; can quantise
    the controls it applies (as a real shaper with 0.01 dB steps does) and report it."""

    def __init__(self, quantum: float | None = None):
        rng = np.random.default_rng(1)
        self.w = rng.normal(size=(C, S)).astype(np.float32)
        self.noise = np.random.default_rng(2)
        self.quantum = quantum
        self.calls = 0
        self.last: Measurement | None = None

    def describe(self):
        return {"n_controls": C, "n_outputs": S}

    def measure(self, controls):
        self.calls += 1
        controls = np.asarray(controls, np.float32)
        applied = controls if self.quantum is None else (np.round(controls / self.quantum) * self.quantum).astype(np.float32)
        traces = (np.sin(3 * applied @ self.w) ** 2 + 0.05 * self.noise.standard_normal((len(controls), S))).astype(np.float32)
        n = len(controls)
        self.last = Measurement(controls, traces, applied, np.full(n, time.time()), np.zeros(n, np.uint32))
        return self.last

    def run(self, controls):
        return self.measure(controls).traces


class Twin(torch.nn.Module):
    """A smooth model with its own weights: a different function from `Physics`."""

    def __init__(self, seed: int = 3):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(C, S, generator=gen))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(x @ self.w) ** 2


def test_forward_returns_exactly_what_the_physics_measured():
    phys, twin = Physics(), Twin()
    x = torch.rand(5, C, requires_grad=True)
    y = pat(x, phys, twin)
    assert torch.equal(y.detach(), torch.from_numpy(phys.last.traces))  # bit for bit
    assert not torch.allclose(y.detach(), twin(x.detach()), atol=0.1)  # and the twin is a different function
    assert y.requires_grad


def test_gradient_is_the_twins_vjp_at_the_inputs_sent():
    phys, twin = Physics(), Twin()
    x = torch.rand(6, C, requires_grad=True)
    v = torch.randn(6, S)
    y = pat(x, phys, twin)
    (y * v).sum().backward()
    _, expected = torch.autograd.functional.vjp(twin, x.detach(), v)
    torch.testing.assert_close(x.grad, expected)


def test_gradient_uses_the_controls_as_applied_when_the_system_quantises():
    phys, twin = Physics(quantum=0.1), Twin()
    x = torch.rand(4, C, requires_grad=True)
    v = torch.randn(4, S)
    (pat(x, phys, twin) * v).sum().backward()
    applied = torch.from_numpy(phys.last.applied)
    assert not torch.equal(applied, x.detach())
    _, at_applied = torch.autograd.functional.vjp(twin, applied, v)
    torch.testing.assert_close(x.grad, at_applied)


def test_physics_called_once_per_forward_and_never_in_backward():
    phys, twin = Physics(), Twin()
    x = torch.rand(16, C, requires_grad=True)
    y = pat(x, phys, twin)
    assert phys.calls == 1 and twin.calls == 0  # the whole batch in one call; no twin in forward
    y.sum().backward()
    assert phys.calls == 1 and twin.calls == 1  # backward: the twin once, the physics never
    assert twin.w.grad is None  # the twin's own parameters are not trained by PAT


def test_gradients_flow_to_parameters_upstream_of_the_physics():
    phys, twin = Physics(), Twin()
    theta = torch.nn.Parameter(torch.full((C,), 0.5))
    x = torch.rand(3, C)
    y = pat(torch.sigmoid(x + theta), phys, twin)
    y.sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


def test_forward_kinds():
    phys, twin = Physics(), Twin()
    x = torch.rand(3, C, requires_grad=True)
    assert PATForward(phys, twin)(x).requires_grad and phys.calls == 1
    out = PhysicsForward(phys)(x)
    assert phys.calls == 2 and not out.requires_grad
    torch.testing.assert_close(TwinForward(twin)(x), twin(x))
    assert phys.calls == 2  # the twin path never touches the physics


def test_live_twin_backward_uses_the_newest_snapshot():
    class Source:
        twin = Twin(seed=3)

    phys = Physics()
    x = torch.rand(4, C, requires_grad=True)
    v = torch.randn(4, S)
    y = pat(x, phys, LiveTwin(Source))
    Source.twin = Twin(seed=4)  # refined between forward and backward
    (y * v).sum().backward()
    _, expected = torch.autograd.functional.vjp(Source.twin, x.detach(), v)
    torch.testing.assert_close(x.grad, expected)


def test_pat_function_is_small():
    import inspect

    source = inspect.getsource(PAT)
    body = [line for line in source.splitlines() if line.strip() and not line.strip().startswith(('"""', "#"))]
    assert len(body) <= 22
