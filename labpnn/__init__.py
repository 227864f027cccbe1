"""labpnn: turn a physical system into a trainable neural-network layer.

The public API, under the names users type::

    import labpnn
    with labpnn.RigClient("tcp://127.0.0.1:5555") as rig: ...      # a device server's rig
    labpnn.train(rig, "vowels", method="pat")                        # needs the ``train`` extra

Every name resolves lazily, on first use: ``import labpnn`` imports neither torch nor the network
side, so a lab PC without torch imports it in milliseconds. A training name (``train``,
``fit_twin_from_sessions``, ``load_twin``, ``PhysicalNetwork``, ...) on an install without the
``train`` extra raises an ImportError that says how to install it.

The package, one subpackage per job (each docstring says what it owns and may import):
``contract`` / ``rig`` / ``config`` / ``cli`` at the top; ``sessions`` (HDF5), ``remote`` (device
server, client, CURVE, monitor), ``twin`` (digital twin), ``training`` (networks, PAT, trainer),
``benches`` (one module per bench, the demo); ``drivers``, ``protocols`` and ``sim_instruments``
beside them (their own folders).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

#: name -> module for the names `import labpnn` offers
PUBLIC: dict[str, str] = {
    "PhysicalSystem": "labpnn.contract",
    "Measurement": "labpnn.contract",
    "Rig": "labpnn.rig",
    "build_rig": "labpnn.config",
    "load_config": "labpnn.config",
    "RigClient": "labpnn.remote.client",
    "DeviceServer": "labpnn.remote.server",
    "SessionWriter": "labpnn.sessions.writer",
    "open_session": "labpnn.sessions.reader",
    "RecordingSystem": "labpnn.sessions.recording",
    "ReplayRig": "labpnn.sessions.replay",
    "calibrate": "labpnn.twin.calibrate",
    # the trainer side: the `train` extra (torch, scikit-learn)
    "Twin": "labpnn.twin.model",
    "load_twin": "labpnn.twin.model",
    "save_twin": "labpnn.twin.model",
    "fit_twin": "labpnn.twin.fit",
    "fit_twin_from_sessions": "labpnn.twin.fit",
    "load_dataset": "labpnn.training.datasets",
    "PhysicalNetwork": "labpnn.training.network",
    "build_network": "labpnn.training.network",
    "train": "labpnn.training.trainer",
    "TrainSettings": "labpnn.training.trainer",
    "load_network": "labpnn.training.trainer",
}

#: modules that a missing ``train`` extra makes unimportable
EXTRA_MODULES = ("torch", "sklearn")


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose ``names`` (name -> module) are imported on
    first use (PEP 562) and then cached in the package's namespace."""

    def __getattr__(name: str) -> Any:
        module_name = names.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in EXTRA_MODULES:
                raise ImportError(
                    f"{package}.{name} needs the training extra ({exc.name} is not installed): "
                    "pip install 'labpnn[train]' (and torch==2.13.0 first for a CPU build)") from exc
            raise
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, PUBLIC)
__all__ = sorted(PUBLIC)
