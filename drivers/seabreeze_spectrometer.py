"""Ocean (Ocean Optics / Ocean Insight) spectrometer as a `Sensor`, via python-seabreeze.

python-seabreeze is optional (``pip install labpnn[seabreeze]``); it is imported inside
`SeabreezeSpectrometer.connect`, so this module imports without it and ``connect()`` raises a
clear `SpectrometerError` when it is missing.

``integration_time_micros`` does not block on the device: after a change the next two frames may
still carry the old exposure, so they are read and discarded.

Imports nothing of labpnn except the roles.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .roles import FLAG_SATURATED, InstrumentError

__all__ = ["SeabreezeSpectrometer", "SpectrometerError"]

_SETTINGS = ("integration_time_micros", "correct_dark_counts", "correct_nonlinearity", "full_scale_counts")


class SpectrometerError(InstrumentError):
    """The spectrometer is missing, vanished or refused a setting."""


class SeabreezeSpectrometer:
    """An Ocean spectrometer (the first available, or the one with ``serial``) as a `Sensor`.

    Traces are ``intensities()`` in counts (float32). ``full_scale_counts`` (default: the
    device's ``max_intensity``) sets ``FLAG_SATURATED`` when a pixel reaches it.
    """

    #: frames read and dropped after the integration time changes
    DISCARD_AFTER_CHANGE = 2

    def __init__(self, serial: str | None = None, *, name: str = "spectrometer",
                 integration_time_micros: int = 10_000, correct_dark_counts: bool = True,
                 correct_nonlinearity: bool = True, full_scale_counts: float | None = None):
        self.serial = serial
        self.name = name
        self.n_outputs = 0
        self._dev: Any = None
        self._wavelengths: np.ndarray | None = None
        self._settings: dict[str, Any] = {"integration_time_micros": 10_000, "correct_dark_counts": True,
                                          "correct_nonlinearity": True, "full_scale_counts": None}
        self._discard = 0
        self.configure(integration_time_micros=integration_time_micros, correct_dark_counts=correct_dark_counts,
                       correct_nonlinearity=correct_nonlinearity, full_scale_counts=full_scale_counts)

    def connect(self) -> None:
        try:
            from seabreeze.spectrometers import Spectrometer
        except ImportError as exc:
            raise SpectrometerError(
                f"{self.name}: python-seabreeze is not installed (pip install 'labpnn[seabreeze]')") from exc
        try:
            self._dev = (Spectrometer.from_serial_number(self.serial) if self.serial
                         else Spectrometer.from_first_available())
        except Exception as exc:  # seabreeze raises its own types per backend
            raise SpectrometerError(f"{self.name}: no spectrometer found ({exc})") from exc
        self._wavelengths = np.asarray(self._dev.wavelengths(), np.float64) * 1e-9
        self.n_outputs = int(self._wavelengths.size)
        if self._settings["full_scale_counts"] is None:
            self._settings["full_scale_counts"] = float(getattr(self._dev, "max_intensity", math.inf))
        self._set_integration(self._settings["integration_time_micros"])

    def close(self) -> None:
        dev, self._dev = self._dev, None
        if dev is not None:
            dev.close()

    def identify(self) -> str:
        dev = self._require()
        return f"Ocean {dev.model} {dev.serial_number}"

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def configure(self, **settings: Any) -> None:
        checked: dict[str, Any] = {}
        for key, value in settings.items():
            if key not in _SETTINGS:
                raise ValueError(f"unknown setting {key!r} (have: {', '.join(_SETTINGS)})")
            if key == "integration_time_micros":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                    raise ValueError(f"{key}: must be a whole number of microseconds > 0, got {value!r}")
                checked[key] = int(value)
            elif key == "full_scale_counts":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not math.isfinite(value) or value <= 0):
                    raise ValueError(f"{key}: must be a number > 0 or None, got {value!r}")
                checked[key] = None if value is None else float(value)
            else:
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: must be true or false, got {value!r}")
                checked[key] = value
        changed = checked.get("integration_time_micros", self._settings["integration_time_micros"]) \
            != self._settings["integration_time_micros"]
        self._settings.update(checked)
        if self._dev is not None and changed:
            self._set_integration(self._settings["integration_time_micros"])

    def _set_integration(self, micros: int) -> None:
        dev = self._require()
        low, high = getattr(dev, "integration_time_micros_limits", (1, math.inf))
        if not low <= micros <= high:
            raise ValueError(f"integration_time_micros: {micros} is outside this device's {low}..{high}")
        dev.integration_time_micros(micros)
        self._discard = self.DISCARD_AFTER_CHANGE

    def _require(self) -> Any:
        if self._dev is None:
            raise SpectrometerError(f"{self.name}: not connected (call connect() first)")
        return self._dev

    def axis(self) -> dict[str, Any]:
        self._require()
        return {"name": "wavelength", "unit": "m", "values": self._wavelengths.tolist()}

    def acquire(self) -> tuple[np.ndarray, int]:
        dev = self._require()
        kwargs = {"correct_dark_counts": self._settings["correct_dark_counts"],
                  "correct_nonlinearity": self._settings["correct_nonlinearity"]}
        try:
            while self._discard:
                dev.intensities(**kwargs)
                self._discard -= 1
            trace = np.asarray(dev.intensities(**kwargs), np.float32)
        except Exception as exc:
            raise SpectrometerError(f"{self.name}: acquisition failed: {exc}") from exc
        full = self._settings["full_scale_counts"]
        flags = FLAG_SATURATED if full is not None and trace.size and float(trace.max()) >= full else 0
        return trace, flags
