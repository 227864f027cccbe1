"""Training checkpoints: everything needed to resume after an epoch, as plain state (state dicts,
numbers, lists: no pickled classes, so a checkpoint outlives a move of the code), with the twin
of the moment saved next to it (``CHECKPOINT.twin.pt``)."""
from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from labpnn.training.network import PhysicalNetwork, network_from_state
from labpnn.twin.model import jsonable, save_twin

CHECKPOINT_FORMAT = "labpnn-pnn-checkpoint/1"


def twin_path(checkpoint: str | Path, rig: str | None = None) -> Path:
    """Where the twin of a checkpoint lives: ``CHECKPOINT.twin.pt``; in a data-parallel run each
    rig's own twin, ``CHECKPOINT.rig-<address>.twin.pt`` (copies of a bench differ, so a rank
    resumed on a rig takes that rig's twin)."""
    p = Path(checkpoint)
    if rig is None:
        return p.with_name(p.name + ".twin.pt")
    return p.with_name(f"{p.name}.rig-{re.sub(r'[^A-Za-z0-9._-]+', '_', rig).strip('_')}.twin.pt")


def save_checkpoint(path, net, opt, epoch, history, best, passes_to_target, gen, counter, duty, settings, ds,
                    twin_source, *, step: int = 0, rig: str | None = None, shared: bool = True) -> None:
    """Everything needed to resume after ``epoch`` (and ``step`` minibatches of the next, for a run
    stopped mid-epoch: ``gen`` is then the generator before that epoch's permutation); the current
    twin goes next to it (`twin_path`, a `labpnn.twin.save_twin` file). ``shared=False`` writes
    only the twin (a data-parallel rank other than 0: the rest is the same on every rank)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    twin = getattr(twin_source, "twin", twin_source)
    if hasattr(twin, "core_spec"):
        save_twin(twin, twin_path(path, rig))
    if not shared:
        return
    payload = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "network": net.state_dict(),
               "network_config": net.config, "optimizer": opt.state_dict(), "history": history, "best": best,
               "passes_to_target": passes_to_target, "generator": gen.get_state(), "passes": dict(counter.passes),
               "duty": duty, "settings": jsonable(asdict(settings)), "dataset": ds.summary()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # survivors of a lost rank may write at once
    torch.save(payload, tmp)
    tmp.replace(path)


def load_network(path: str | Path) -> PhysicalNetwork:
    """The selected (best-validation) network stored in a training checkpoint."""
    ck = torch.load(Path(path), map_location="cpu", weights_only=False)
    return network_from_state(ck["network_config"], ck["best"]["state"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    ck = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a labpnn PNN checkpoint")
    return ck
