"""Hardware roles as small structural protocols (in the spirit of bluesky's ``protocols.py``).

A driver satisfies a role by having the methods; it never inherits from anything here. The `Rig`
(in ``labpnn.rig``) composes one or more actuators and sensors into a `PhysicalSystem`.

Conventions every role shares:
- ``name`` is the instrument's short name in the rig config (``"shaper"``, ``"osa"``).
- ``identify()`` returns the instrument's identity string (e.g. the ``*IDN?`` reply).
- ``settings()`` returns the current settings as a plain JSON-able dict; ``configure(**kw)``
  validates and applies new ones, raising ``ValueError`` naming the bad setting.
- Drivers raise their own exceptions (subclasses of ``InstrumentError`` below); the rig turns
  them into protocol errors. Drivers never import torch, and never import the rest of labpnn.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

#: Per-row flag bits, as carried in a ``run`` reply (see protocols/PROTOCOL.md).
FLAG_SATURATED = 1 << 0  #: at least one pixel at the sensor's full scale
FLAG_QUANTISED = 1 << 1  #: the controls applied differ from those sent (instrument resolution)
FLAG_LIMITED = 1 << 2  #: a safety limit clipped the controls applied
FLAG_REPLAY_APPROX = 1 << 8  #: a replay answered from a near or modelled record, not an exact one


class InstrumentError(RuntimeError):
    """An instrument failed or refused a command (vanished, timed out, reported an error)."""


class BatchFailed(InstrumentError):
    """A `BatchInstrument` failed part-way through a batch: rows ``[0, len(traces))`` were measured
    and are kept (traces float32[n_done, S], flags uint32[n_done]); the rest never ran."""

    def __init__(self, message: str, traces: np.ndarray, flags: np.ndarray):
        super().__init__(message)
        self.traces, self.flags = traces, flags


@runtime_checkable
class Instrument(Protocol):
    name: str

    def identify(self) -> str: ...

    def connect(self) -> None: ...

    def close(self) -> None: ...

    def settings(self) -> dict[str, Any]: ...

    def configure(self, **settings: Any) -> None: ...


@runtime_checkable
class Actuator(Instrument, Protocol):
    """Applies one control vector of ``n_controls`` values in [0, 1]."""

    n_controls: int
    #: seconds to wait after ``apply`` returns before a sensor may acquire
    settle_s: float

    def check(self, controls: np.ndarray) -> None:
        """Raise ``ValueError`` if any row of a float32[B, n_controls] batch breaks a safety limit."""

    def apply(self, controls: np.ndarray) -> np.ndarray:
        """Apply one row (float32[n_controls], in [0, 1]); return the row actually applied."""

    def safe_state(self) -> None:
        """Put the instrument in its safe state (e.g. block all light)."""


@runtime_checkable
class Sensor(Instrument, Protocol):
    """Acquires one trace of ``n_outputs`` values."""

    n_outputs: int

    def axis(self) -> dict[str, Any]:
        """The output axis: ``{"name": str, "unit": str, "values": list[float]}``."""

    def acquire(self) -> tuple[np.ndarray, int]:
        """Acquire one trace: (float32[n_outputs], flag bits)."""


@runtime_checkable
class BatchInstrument(Instrument, Protocol):
    """Optional, for an instrument that is both a rig's only actuator and its only sensor and can
    measure a whole batch itself: a simulator, or hardware that sequences a list of patterns
    against a trigger. The rig then makes one call instead of a Python loop over rows."""

    def measure_batch(self, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Apply and acquire every row of ``controls`` (float32[B, C], already validated):
        (traces float32[B, S], flags uint32[B]). Return None to decline, so the rig goes row by
        row (e.g. when rows take long enough that an abort between them matters). On a failure
        after some rows, raise `BatchFailed` carrying the rows done, so they are kept."""


@runtime_checkable
class OverlappedActuator(Actuator, Protocol):
    """Optional: `apply` in three steps, so that a rig can overlap a row's slow I/O with the sensor's
    (the metasurface controller: the next pattern's bytes travel on the serial line while the
    previous trace is read; the read-back travels while the cavity settles and the sensor sweeps).
    ``apply(row)`` must equal ``begin_apply(row)``, ``end_apply()``, ``end_verify()``. The rig calls
    ``begin_apply`` for a row only after the sensors' ``end_sweep`` of the previous row has returned.
    An actuator may also offer ``prepare(row)``: the rig calls it with the next row during the
    current row's settle time, so that ``begin_apply`` with that row only has to send it."""

    def begin_apply(self, controls: np.ndarray) -> np.ndarray:
        """Start applying one row (send it) without waiting; return the row actually applied."""

    def end_apply(self) -> float | None:
        """Wait until the instrument has taken the row; return when it confirmed it
        (``time.perf_counter()``, from which ``settle_s`` counts), or None for "now"."""

    def end_verify(self) -> None:
        """Finish any check of the row begun by ``end_apply`` (a read-back); raise if it fails."""


@runtime_checkable
class OverlappedSensor(Sensor, Protocol):
    """Optional: `acquire` in steps, so that a rig can check the actuators while a measurement runs
    and read a trace while the next row is being applied. ``acquire()`` must equal
    ``begin_sweep()``, ``end_sweep()``, ``fetch()``."""

    def begin_sweep(self) -> None:
        """Start a measurement and return at once."""

    def end_sweep(self) -> None:
        """Return when the measurement has ended (the actuators may then change)."""

    def fetch(self) -> tuple[np.ndarray, int]:
        """The last measurement's trace: (float32[n_outputs], flag bits); called before the next one."""
