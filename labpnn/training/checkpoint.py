"""Training checkpoints: everything needed to resume after an epoch, as plain state (state dicts,
numbers, lists: no pickled classes, so a checkpoint outlives a move of the code), with the twin
of the moment saved next to it (``CHECKPOINT.twin.pt``)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from labpnn.training.network import PhysicalNetwork, network_from_state
from labpnn.twin.model import jsonable, save_twin

CHECKPOINT_FORMAT = "labpnn-pnn-checkpoint/1"


def twin_path(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name + ".twin.pt")


def save_checkpoint(path, net, opt, epoch, history, best, passes_to_target, gen, counter, duty, settings, ds,
                     twin_source) -> None:
    """Everything needed to resume after ``epoch``; the current twin goes next to it
    (``CHECKPOINT.twin.pt``, a `labpnn.twin.save_twin` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    twin = getattr(twin_source, "twin", twin_source)
    if hasattr(twin, "core_spec"):
        save_twin(twin, twin_path(path))
    payload = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "network": net.state_dict(),
               "network_config": net.config, "optimizer": opt.state_dict(), "history": history, "best": best,
               "passes_to_target": passes_to_target, "generator": gen.get_state(), "passes": dict(counter.passes),
               "duty": duty, "settings": jsonable(asdict(settings)), "dataset": ds.summary()}
    tmp = path.with_name(path.name + ".tmp")
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
