"""Data-parallel training over several copies of a rig with `torch.distributed` (gloo on CPU).

One process per rig, launched by ``torchrun`` (``torchrun --nproc-per-node N -m labpnn train
--rig ADDR_0 ... --rig ADDR_N-1``; rank *i* drives rig *i*). Every rank holds the same network and
optimiser; each global minibatch is split by rank (``idx[rank::world]``), every rank measures its
share on its own rig, and one all-reduce per step sums the gradients (each rank's loss is already
divided by the *global* batch, so the sum is the global mean gradient) together with the step's
loss, hits and a stop flag. The stop flag is how a failed rig stops the run: the rank whose
instrument failed raises it, every rank sees it in the same step, and all of them checkpoint and
leave (`RunStopped`). A rank that vanishes altogether shows up as a failed collective, within the
group's timeout (set from the rig client's timeout: gloo's default is 30 minutes).

`Solo` is the same interface for one process and one rig: the trainer's loop is written once.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """Training stopped on every rank because a rig (or a rank) failed; the checkpoint written at
    the stop resumes it, on the rigs that are left."""

    def __init__(self, message: str, *, checkpoint: str | None = None, failed: Sequence[int] = ()):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.failed = list(failed)


class Solo:
    """One process, one rig: every collective is the identity."""

    rank, world, distributed = 0, 1, False

    def split(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def reduce_step(self, grads: list[torch.Tensor], loss: float, correct: float, failed: bool):
        return grads, loss, correct, [0] if failed else []

    def reduce_validation(self, acc: float, loss: float, failed: bool):
        return acc, loss, [0] if failed else []

    def failed_ranks(self, failed: bool) -> list[int]:
        return [0] if failed else []

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass


class DataParallel(Solo):
    """The collectives of one data-parallel run (an initialised default process group). ``steps``:
    the group of the training loop's collectives, whose timeout bounds how long a rank waits for a
    vanished one; setting up (each rank calibrating its own twin) and the final gather run on the
    default group, whose timeout is long."""

    distributed = True

    def __init__(self, steps=None):
        import torch.distributed as dist

        self.dist, self.steps = dist, steps
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def split(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.rank::self.world]

    def reduce_step(self, grads: list[torch.Tensor], loss: float, correct: float, failed: bool):
        """``(summed gradients, global loss sum, global hits, ranks that failed)`` in one all-reduce.
        A rank that failed sends zeros for its gradients (they are not used: the step is dropped)."""
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads] +
                         [torch.tensor([loss, correct], dtype=torch.float64), self._flags(failed)])
        self._all_reduce(flat, group=self.steps)
        out, at = [], 0
        for g in grads:
            out.append(flat[at:at + g.numel()].reshape(g.shape).to(g.dtype))
            at += g.numel()
        return out, float(flat[at]), float(flat[at + 1]), _failed(flat[at + 2:])

    def reduce_validation(self, acc: float, loss: float, failed: bool):
        """The worst rig's validation: lowest accuracy, highest loss (every rank then selects the
        same epoch), and the ranks that failed."""
        worst = torch.tensor([acc, -loss], dtype=torch.float64)
        flags = self._flags(failed)
        self._all_reduce(worst, op=self.dist.ReduceOp.MIN, group=self.steps)
        self._all_reduce(flags, group=self.steps)
        return float(worst[0]), float(-worst[1]), _failed(flags)

    def failed_ranks(self, failed: bool) -> list[int]:
        """The ranks that failed in setting up (calibrating their rigs, fitting their twins): on the
        default group, whose timeout allows for one rank calibrating much longer than another."""
        flags = self._flags(failed)
        self._all_reduce(flags)
        return _failed(flags)

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's values into every rank's ``tensors`` (in place)."""
        for t in tensors:
            self._collective(self.dist.broadcast, t, src=0)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._collective(self.dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (on the training loop's group: a vanished rank costs its timeout)."""
        self._collective(self.dist.barrier, group=self.steps)

    def _flags(self, failed: bool) -> torch.Tensor:
        flags = torch.zeros(self.world, dtype=torch.float64)
        flags[self.rank] = float(failed)
        return flags

    def _all_reduce(self, t: torch.Tensor, op=None, group=None) -> None:
        self._collective(self.dist.all_reduce, t, op=op if op is not None else self.dist.ReduceOp.SUM, group=group)

    def _collective(self, fn, *args, group=None, **kwargs) -> None:
        try:
            fn(*args, group=group, **kwargs)
        except RuntimeError as exc:  # gloo: a peer closed its connection, or the group's timeout passed
            raise RunStopped(f"rank {self.rank}: another rank is gone ({exc})", failed=[-1]) from exc


def _failed(flags: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(flags > 0.5).flatten()]


def parameter_digest(params: Sequence[torch.Tensor]) -> str:
    """A short hash of the parameters' bytes: equal on every rank after every step, or the ranks
    have parted ways."""
    h = hashlib.sha1()
    for p in params:
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def launched() -> bool:
    """True inside a ``torchrun`` launch of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(*, step_timeout_s: float, setup_timeout_s: float = 3 * 3600.0) -> DataParallel:
    """Join the ``torchrun`` process group (gloo). Setting up — each rank calibrating and fitting
    its own twin — may take long, so the default group waits ``setup_timeout_s``; the training
    loop's collectives run on a group that waits ``step_timeout_s`` (from the rig client's
    timeout), so a rank that vanishes stops the others within that."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=setup_timeout_s))
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=step_timeout_s))
    parallel = DataParallel(group)
    log.info("data-parallel: rank %d of %d (step timeout %.0f s)", parallel.rank, parallel.world, step_timeout_s)
    return parallel


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
