"""Physics-aware training (PAT): the forward pass on the physics, the backward pass on the twin.

Wright, Onodera et al., "Deep physical neural networks trained with backpropagation", Nature 601,
549 (2022). The whole training contract is `PAT` below:

- ``forward`` sends the controls to the `PhysicalSystem` **once** (the whole batch in one
  ``measure``/``run``) and returns exactly the traces it measured — no twin, no post-processing;
- ``backward`` returns the twin's vector-Jacobian product evaluated at the controls **as the
  instruments applied them** (``Measurement.applied``: the controls as sent, unless the system
  reports that it quantised or limited them — then the values it really used), and never touches
  the physics.

The three ways a physical layer can turn controls into traces are small callables, so a network
runs unchanged on any of them: `PATForward` (train on the physics), `TwinForward` (in-silico
training, and twin-only predictions) and `PhysicsForward` (evaluation: physics, no gradient).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from labpnn.contract import PhysicalSystem, measure_of

#: a twin: controls float32[B, C] -> traces float32[B, S] in measurement units, differentiable
TwinLike = Callable[[torch.Tensor], torch.Tensor]


class PAT(torch.autograd.Function):
    """``PAT.apply(controls, system, twin) -> traces``: physics forward, twin-VJP backward."""

    @staticmethod
    def forward(ctx, controls: torch.Tensor, system: PhysicalSystem, twin: TwinLike) -> torch.Tensor:
        sent = controls.detach().cpu().numpy().astype(np.float32, copy=False)
        measured = measure_of(system, sent).raise_for_error()  # the one call to the physics
        ctx.save_for_backward(torch.tensor(np.asarray(measured.applied, np.float32)).to(controls))
        ctx.twin = twin
        return torch.tensor(np.asarray(measured.traces, np.float32)).to(controls)

    @staticmethod
    def backward(ctx, grad_traces: torch.Tensor):
        (applied,) = ctx.saved_tensors
        with torch.enable_grad():
            x = applied.detach().requires_grad_(True)
            (grad_controls,) = torch.autograd.grad(ctx.twin(x), x, grad_traces)
        return grad_controls, None, None


def pat(controls: torch.Tensor, system: PhysicalSystem, twin: TwinLike) -> torch.Tensor:
    """Measure ``controls`` on ``system``; gradients flow back through ``twin`` (see `PAT`)."""
    return PAT.apply(controls, system, twin)


# -- how a layer's controls become traces ----------------------------------------------------------
class PATForward:
    """Physics forward, twin backward (see `PAT`). Costs one physical pass per row."""

    kind = "pat"

    def __init__(self, system: PhysicalSystem, twin: TwinLike):
        self.system, self.twin = system, twin

    def __call__(self, controls: torch.Tensor) -> torch.Tensor:
        return pat(controls, self.system, self.twin)


class TwinForward:
    """The twin alone (in-silico training; twin-predicted traces). No physical pass."""

    kind = "twin"

    def __init__(self, twin: TwinLike):
        self.twin = twin

    def __call__(self, controls: torch.Tensor) -> torch.Tensor:
        return self.twin(controls)


class PhysicsForward:
    """The physics alone, no gradient (evaluation and deployment)."""

    kind = "physics"

    def __init__(self, system: PhysicalSystem):
        self.system = system

    def __call__(self, controls: torch.Tensor) -> torch.Tensor:
        sent = controls.detach().cpu().numpy().astype(np.float32, copy=False)
        traces = measure_of(self.system, sent).raise_for_error().traces
        return torch.tensor(np.asarray(traces, np.float32)).to(controls)


class LiveTwin(nn.Module):
    """The current twin of something that refines one (``OnlineTwinFitter``: ``.twin``), looked up
    at every call — so a PAT backward uses the newest snapshot, whatever the forward saw."""

    def __init__(self, source):
        super().__init__()
        self._source = [source]  # a list, so nn.Module does not register the fitter

    @property
    def current(self) -> TwinLike:
        return self._source[0].twin

    def forward(self, controls: torch.Tensor) -> torch.Tensor:
        return self.current(controls)
