"""Yokogawa AQ6370 optical spectrum analyser over PyVISA (pyvisa-py, ``TCPIP::host::port::SOCKET``).

`AQ6370` is a pymeasure `Instrument`: the settings are declarative properties (validated,
followed by a ``:SYST:ERR?`` check). Two parts talk to the PyVISA resource directly, because
pymeasure's adapter does not fit them:

- the LAN login (``OPEN "user"`` -> ``AUTHENTICATE CRAM-MD5.`` -> password -> ``ready``), sent
  without logging the password;
- binary traces ``#<n><len><bytes>`` read by their declared length with the termination
  character switched off (with it on, pyvisa-py ends a low-level read at every 0x0A byte inside
  the floats; pymeasure's ``binary_values`` reads byte by byte until timeout), then the
  terminator. `parse_ieee_block` is the pure decoder.

Byte order: the AQ6370 sends little-endian floats. `check_wavelength_axis` verifies it on the X
axis (it must be increasing and inside [start, stop]); a block that only passes when
byte-swapped raises `OSAError` (never silently corrected).

`OSASensor` wraps it as the `labpnn.drivers.roles.Sensor` role. Timeouts, socket errors, SCPI
errors all become `OSAError` naming the command and the instrument's message.

Terminators: ``"\\n"`` by default (the emulator); pass ``"\\r\\n"`` for a real AQ6370 on its LAN port.
Imports nothing of labpnn except the roles.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from pymeasure.instruments import Instrument
from pymeasure.instruments.validators import strict_discrete_set, strict_range

from .roles import FLAG_SATURATED
from .scpi import IO_ERRORS as _IO_ERRORS
from .scpi import CommandError, SCPIInstrument, ieee_block_header, parse_ieee_block

__all__ = [
    "AQ6370",
    "DATA_FORMATS",
    "OSAError",
    "OSASensor",
    "POINTS_RANGE",
    "RESOLUTIONS_M",
    "WAVELENGTH_RANGE_M",
    "check_wavelength_axis",
    "ieee_block_header",
    "parse_ieee_block",
]

WAVELENGTH_RANGE_M = (600e-9, 1700e-9)
POINTS_RANGE = (101, 50001)
#: Resolution bandwidths the AQ6370 offers (metres).
RESOLUTIONS_M = (0.02e-9, 0.05e-9, 0.1e-9, 0.2e-9, 0.5e-9, 1e-9, 2e-9)
DATA_FORMATS = ("REAL,32", "REAL,64", "ASCII")
_DTYPES = {"REAL,32": np.dtype("<f4"), "REAL,64": np.dtype("<f8")}


class OSAError(CommandError):
    """The OSA failed a command: ``command`` is what was sent, ``message`` what went wrong."""


# -- pure codecs -----------------------------------------------------------------------------------
def _axis_ok(x: np.ndarray, low: float, high: float) -> bool:
    with np.errstate(all="ignore"):
        return bool(x.size and np.isfinite(x).all() and (np.diff(x) > 0).all() and x[0] >= low and x[-1] <= high)


def check_wavelength_axis(x: np.ndarray, start_m: float, stop_m: float, *, rtol: float = 1e-6) -> None:
    """Raise `OSAError` unless ``x`` is finite, strictly increasing and inside [start, stop].

    ``rtol`` (relative to ``stop_m``) absorbs float32 rounding. If the byte-swapped values would
    pass, the message says the byte order is wrong.
    """
    x = np.asarray(x)
    tol = rtol * max(abs(start_m), abs(stop_m))
    low, high = start_m - tol, stop_m + tol
    if _axis_ok(x, low, high):
        return
    if x.dtype.kind == "f" and _axis_ok(x.byteswap(), low, high):
        raise OSAError(":TRAC:X?", "the wavelength axis decodes as increasing within "
                       f"[{start_m:g}, {stop_m:g}] m only when byte-swapped: the block is not little-endian")
    head = ", ".join(f"{v:g}" for v in x[:3].tolist())
    raise OSAError(":TRAC:X?", f"the wavelength axis is not increasing within [{start_m:g}, {stop_m:g}] m "
                   f"({x.size} values, starting {head})")


# -- validators ------------------------------------------------------------------------------------
def _points(value: Any, values: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or value != int(value):
        raise ValueError(f"sweep points must be a whole number, got {value!r}")
    return int(strict_range(int(value), values))


def _nearest(value: Any, values: tuple[float, ...]) -> float:
    """The allowed value within 1e-6 (relative) of ``value``, else ValueError."""
    for allowed in values:
        if math.isclose(float(value), allowed, rel_tol=1e-6):
            return allowed
    raise ValueError(f"resolution {value!r} m is not one of {', '.join(f'{v:g}' for v in values)} m")


def _data_format(value: Any, values: tuple[str, ...]) -> str:
    text = str(value).upper().replace(" ", "")
    text = {"ASC": "ASCII", "REAL": "REAL,64"}.get(text, text)
    return strict_discrete_set(text, values)


def _y_scale(value: Any, values: tuple[str, ...]) -> str:
    text = str(value).upper()
    text = {"LINEAR": "LIN", "LOGARITHMIC": "LOG"}.get(text, text)
    return strict_discrete_set(text, values)


_Y_SCALE_REPLIES = {"0": "LOG", "1": "LIN", "LOG": "LOG", "LIN": "LIN", "LOGARITHMIC": "LOG", "LINEAR": "LIN"}


class AQ6370(SCPIInstrument):
    """Yokogawa AQ6370 OSA.

    :param adapter: a VISA resource name (``"TCPIP::192.168.1.30::10001::SOCKET"``) or an adapter.
    :param read_termination, write_termination: ``"\\n"`` by default; ``"\\r\\n"`` for the real
        instrument's LAN port.
    :param timeout_s: VISA I/O timeout; at least 30 s on a real instrument (its auto-offset stalls
        it for ~30 s every ~10 minutes).
    """

    error_type = OSAError
    error_query = ":SYST:ERR?"
    max_errors = 32

    def __init__(self, adapter, name: str = "Yokogawa AQ6370", *, read_termination: str = "\n",
                 write_termination: str = "\n", timeout_s: float = 30.0, **kwargs):
        super().__init__(adapter, name, read_termination=read_termination, write_termination=write_termination,
                         timeout_s=timeout_s, **kwargs)

    # -- declarative settings (manual: remote commands, SENSe / FORMat / DISPlay subsystems)
    wavelength_start = Instrument.control(
        ":SENS:WAV:STAR?", ":SENS:WAV:STAR %.10g",
        """Control the sweep start wavelength in metres (600e-9 .. 1700e-9).""",
        validator=strict_range, values=WAVELENGTH_RANGE_M, check_set_errors=True,
    )
    wavelength_stop = Instrument.control(
        ":SENS:WAV:STOP?", ":SENS:WAV:STOP %.10g",
        """Control the sweep stop wavelength in metres (600e-9 .. 1700e-9).""",
        validator=strict_range, values=WAVELENGTH_RANGE_M, check_set_errors=True,
    )
    sweep_points = Instrument.control(
        ":SENS:SWE:POIN?", ":SENS:SWE:POIN %d",
        """Control the number of sampling points per sweep (101 .. 50001).""",
        validator=_points, values=POINTS_RANGE, cast=lambda v: int(float(v)), check_set_errors=True,
    )
    resolution = Instrument.control(
        ":SENS:BWID:RES?", ":SENS:BWID:RES %.10g",
        """Control the resolution bandwidth in metres (0.02, 0.05, 0.1, 0.2, 0.5, 1 or 2 nm).""",
        validator=_nearest, values=RESOLUTIONS_M, check_set_errors=True,
    )
    data_format = Instrument.control(
        ":FORM:DATA?", ":FORM:DATA %s",
        """Control the trace transfer format: ``"REAL,32"``, ``"REAL,64"`` (little-endian IEEE
        blocks) or ``"ASCII"`` (the default after ``*RST``).""",
        validator=_data_format, values=DATA_FORMATS, cast=str, maxsplit=0,
        get_process=lambda v: _data_format(v, DATA_FORMATS), check_set_errors=True,
    )
    y_scale = Instrument.control(
        ":DISP:TRAC:Y1:SPAC?", ":DISP:TRAC:Y1:SPAC %s",
        """Control the level scale: ``"LIN"`` (traces in W) or ``"LOG"`` (dBm). The instrument
        may answer 0 (LOG) / 1 (LIN).""",
        validator=_y_scale, values=("LIN", "LOG"), cast=str,
        get_process=lambda v: _Y_SCALE_REPLIES.get(str(v).strip().upper(), str(v)), check_set_errors=True,
    )
    operation_event = Instrument.measurement(
        ":STAT:OPER:EVEN?",
        """Get (and clear) the operation status event register; bit 0 = sweep complete.""",
        cast=lambda v: int(float(v)),
    )

    def login(self, user: str, password: str = "") -> None:
        """LAN login: ``OPEN "user"`` -> ``AUTHENTICATE CRAM-MD5.``, password -> ``ready``.

        The password is written below the adapter's logging layer, so it never reaches a log.
        """
        reply = self.ask(f'OPEN "{user}"').strip()
        if not reply.upper().startswith("AUTHENTICATE"):
            raise OSAError(f'OPEN "{user}"', f"login refused: {reply!r}")
        self._last_command = "<password>"
        try:
            self.adapter._write(password)  # bypasses Adapter.write's debug log of the command
            reply = self.read().strip()
        except _IO_ERRORS as exc:
            raise OSAError("<password>", f"login failed: {exc}") from exc
        if reply.lower() != "ready":
            raise OSAError("<password>", f"login refused for user {user!r}: {reply!r}")

    def read_trace(self, axis: str, trace: str = "TRA", data_format: str | None = None) -> np.ndarray:
        """``:TRAC:X? TRA`` (metres) or ``:TRAC:Y? TRA`` (W when LIN) as float64/float32.

        ``data_format`` is the transfer format now set (queried if not given).
        """
        axis = axis.upper()
        if axis not in ("X", "Y"):
            raise ValueError(f"axis must be 'X' or 'Y', got {axis!r}")
        command = f":TRAC:{axis}? {trace}"
        fmt = _data_format(data_format, DATA_FORMATS) if data_format else self.data_format
        if fmt in _DTYPES:
            return self.query_block(command, _DTYPES[fmt])
        reply = self.ask(command).strip()
        try:
            return np.array([float(v) for v in reply.split(",") if v.strip()])
        except ValueError:
            raise OSAError(command, f"unreadable ASCII trace starting {reply[:40]!r}") from None

    def single_sweep(self, timeout_s: float = 60.0, *, poll_min_s: float = 0.001,
                     poll_max_s: float = 0.002) -> None:
        """``*CLS``, ``:INIT:SMOD SING``, ``:INIT``, then poll ``:STAT:OPER:EVEN?`` until bit 0.

        Polls every 1 ms at first, the interval doubling up to 2 ms (a longer interval adds its
        overshoot to every sweep: 20 ms would cost ~5 % of a 200 ms sweep). Raises `OSAError` if the
        sweep has not finished after ``timeout_s`` (keep it >= 30 s on a real instrument).
        """
        self.write("*CLS")
        self.write(":INIT:SMOD SING")
        self.write(":INIT")
        deadline = time.monotonic() + timeout_s
        interval = poll_min_s
        while True:
            event = self.operation_event
            if isinstance(event, int) and event & 1:
                return
            if not isinstance(event, int):
                raise OSAError(":STAT:OPER:EVEN?", f"unreadable reply {event!r}")
            if time.monotonic() >= deadline:
                raise OSAError(":INIT", f"sweep did not complete within {timeout_s:g} s "
                               f"(:STAT:OPER:EVEN? still {event})")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, poll_max_s)


# -- the Sensor role ---------------------------------------------------------------------------------
_SENSOR_SETTINGS = ("start_m", "stop_m", "points", "resolution_m", "data_format", "full_scale_w",
                    "sweep_timeout_s")


def _positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}: must be a finite number > 0, got {value!r}")
    return float(value)


class OSASensor:
    """An AQ6370 as a `Sensor`: one single sweep per `acquire`, trace in W (linear scale).

    :param address: VISA resource name, e.g. ``"TCPIP::192.168.1.30::10001::SOCKET"``.
    :param user, password: LAN login (skipped when ``user`` is None).
    :param start_m, stop_m, points, resolution_m: applied on `connect` when given, else the
        instrument's current values are kept.
    :param data_format: transfer format (``"REAL,32"`` default).
    :param full_scale_w: a trace reaching it gets ``FLAG_SATURATED`` (None: never).
    :param sweep_timeout_s: how long one sweep may take (>= 30 s on a real instrument).

    The wavelength axis is read once after every (re)configuration — a sweep, then
    ``:TRAC:X?`` — checked (increasing, inside [start, stop], little-endian, ``points`` long)
    and cached; `acquire` reads only Y.
    """

    def __init__(self, address: str, *, name: str = "osa", user: str | None = None, password: str = "",
                 read_termination: str = "\n", write_termination: str = "\n", timeout_s: float = 30.0,
                 sweep_timeout_s: float = 60.0, trace: str = "TRA", start_m: float | None = None,
                 stop_m: float | None = None, points: int | None = None, resolution_m: float | None = None,
                 data_format: str = "REAL,32", full_scale_w: float | None = None):
        self.address = address
        self.name = name
        self.user, self._password = user, password
        self.read_termination, self.write_termination = read_termination, write_termination
        self.timeout_s = _positive("timeout_s", timeout_s)
        if trace not in ("TRA", "TRB", "TRC", "TRD", "TRE", "TRF", "TRG"):
            raise ValueError(f"trace: must be one of TRA..TRG, got {trace!r}")
        self.trace = trace
        self._settings: dict[str, Any] = {"start_m": None, "stop_m": None, "points": None,
                                          "resolution_m": None, "data_format": "REAL,32",
                                          "full_scale_w": None, "sweep_timeout_s": 60.0}
        self.inst: AQ6370 | None = None
        self._identity = ""
        self._axis: np.ndarray | None = None
        self.configure(start_m=start_m, stop_m=stop_m, points=points, resolution_m=resolution_m,
                       data_format=data_format, full_scale_w=full_scale_w, sweep_timeout_s=sweep_timeout_s)
        self.n_outputs = int(self._settings["points"] or 0)

    # -- Instrument role
    def connect(self) -> None:
        """Open the resource, log in (optional), apply the settings, set LIN scale, read the axis.

        Sends: [login], ``*CLS``, ``:TRAC:ACT TRA``, ``*IDN?``, each given setting then
        ``:FORM:DATA <fmt>`` (each followed by ``:SYST:ERR?``), the read-backs
        (``:SENS:WAV:STAR?``, ``:SENS:WAV:STOP?``, ``:SENS:SWE:POIN?``, ``:SENS:BWID:RES?``),
        ``:DISP:TRAC:Y1:SPAC LIN`` (+ ``:SYST:ERR?``), then one sweep and ``:TRAC:X? TRA``.
        """
        if self.inst is not None:
            return
        try:
            inst = AQ6370(self.address, read_termination=self.read_termination,
                          write_termination=self.write_termination, timeout_s=self.timeout_s)
        except (*_IO_ERRORS, ValueError) as exc:
            raise OSAError("", f"cannot open {self.address}: {exc}") from exc
        self.inst = inst
        try:
            if self.user is not None:
                inst.login(self.user, self._password)
            inst.clear()
            inst.write(f":TRAC:ACT {self.trace}")
            self._identity = inst.id
            given = ("start_m", "stop_m", "points", "resolution_m")
            self._apply({key: self._settings[key] for key in given if self._settings[key] is not None}
                        | {"data_format": self._settings["data_format"]})
            inst.y_scale = "LIN"
            self.axis()
        except OSAError as exc:
            self.close()
            raise OSAError(exc.command, f"{exc.message} (connecting to {self.address})") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        inst, self.inst = self.inst, None
        self._axis = None
        if inst is not None:
            try:
                inst.adapter.close()
            except _IO_ERRORS:
                pass

    def identify(self) -> str:
        """The ``*IDN?`` reply (read on connect)."""
        if not self._identity:
            self._identity = self._require().id
        return self._identity

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def configure(self, **settings: Any) -> None:
        """Validate and apply start_m, stop_m, points, resolution_m, data_format, full_scale_w,
        sweep_timeout_s (``ValueError`` naming the setting; nothing changes on error). Changing
        the sweep re-reads the wavelength axis (one sweep)."""
        checked: dict[str, Any] = {}
        for key, value in settings.items():
            if key not in _SENSOR_SETTINGS:
                raise ValueError(f"unknown setting {key!r} (have: {', '.join(_SENSOR_SETTINGS)})")
            if value is None and key in ("start_m", "stop_m", "points", "resolution_m", "full_scale_w"):
                checked[key] = None
                continue
            try:
                if key in ("start_m", "stop_m"):
                    checked[key] = float(strict_range(_positive(key, value), WAVELENGTH_RANGE_M))
                elif key == "points":
                    checked[key] = _points(value, POINTS_RANGE)
                elif key == "resolution_m":
                    checked[key] = _nearest(_positive(key, value), RESOLUTIONS_M)
                elif key == "data_format":
                    checked[key] = _data_format(value, DATA_FORMATS)
                else:
                    checked[key] = _positive(key, value)
            except ValueError as exc:
                msg = str(exc)
                raise ValueError(msg if msg.startswith(f"{key}:") else f"{key}: {msg}") from None
        new = self._settings | checked
        if new["start_m"] is not None and new["stop_m"] is not None and new["start_m"] >= new["stop_m"]:
            raise ValueError(f"stop_m: must be above start_m ({new['start_m']:g}), got {new['stop_m']:g}")
        if self.inst is None:
            self._settings = new
            return
        self._settings["full_scale_w"] = new["full_scale_w"]
        self._settings["sweep_timeout_s"] = new["sweep_timeout_s"]
        inst_keys = ("start_m", "stop_m", "points", "resolution_m", "data_format")
        changes = {k: checked[k] for k in inst_keys if checked.get(k) is not None}
        if changes:
            self._apply(changes)
            self.axis()

    def _apply(self, changes: dict[str, Any]) -> None:
        """Send instrument settings (stop before start when the window moves up), read them back
        and mark the axis stale (the caller re-reads it)."""
        inst = self._require()
        if "start_m" in changes and "stop_m" in changes and self._settings.get("stop_m") is not None \
                and changes["start_m"] >= self._settings["stop_m"]:
            order = ("stop_m", "start_m", "points", "resolution_m", "data_format")
        else:
            order = ("start_m", "stop_m", "points", "resolution_m", "data_format")
        props = {"start_m": "wavelength_start", "stop_m": "wavelength_stop", "points": "sweep_points",
                 "resolution_m": "resolution", "data_format": "data_format"}
        self._axis = None
        for key in order:
            if key in changes:
                setattr(inst, props[key], changes[key])
        if "data_format" in changes:
            self._settings["data_format"] = changes["data_format"]
        try:
            self._settings.update(start_m=float(inst.wavelength_start), stop_m=float(inst.wavelength_stop),
                                  points=int(inst.sweep_points), resolution_m=float(inst.resolution))
        except (TypeError, ValueError) as exc:
            raise OSAError(inst._last_command, f"unreadable reply: {exc}") from None
        self.n_outputs = self._settings["points"]

    def _require(self) -> AQ6370:
        if self.inst is None:
            raise OSAError("", f"{self.name}: not connected (call connect() first)")
        return self.inst

    # -- Sensor role
    def _read_axis(self) -> np.ndarray:
        inst = self._require()
        raw = inst.read_trace("X", self.trace, self._settings["data_format"])
        check_wavelength_axis(raw, self._settings["start_m"], self._settings["stop_m"])
        x = raw.astype(np.float64)
        if x.size != self.n_outputs:
            raise OSAError(f":TRAC:X? {self.trace}", f"{x.size} wavelengths for {self.n_outputs} sweep points")
        self._axis = x
        return x

    def axis(self) -> dict[str, Any]:
        """``{"name": "wavelength", "unit": "m", "values": [...]}`` (a sweep if not read yet)."""
        if self._axis is None:
            self._require().single_sweep(self._settings["sweep_timeout_s"])
            self._read_axis()
        return {"name": "wavelength", "unit": "m", "values": self._axis.tolist()}

    def acquire(self) -> tuple[np.ndarray, int]:
        """One single sweep, then ``:TRAC:Y? TRA``: (float32[n_outputs] in W, flag bits)."""
        inst = self._require()
        inst.single_sweep(self._settings["sweep_timeout_s"])
        if self._axis is None:
            self._read_axis()
        y = inst.read_trace("Y", self.trace, self._settings["data_format"])
        if y.size != self.n_outputs:
            raise OSAError(f":TRAC:Y? {self.trace}", f"{y.size} values for {self.n_outputs} sweep points")
        trace = y.astype(np.float32)
        flags = 0
        full = self._settings["full_scale_w"]
        if full is not None and trace.size and float(np.nanmax(trace)) >= full:
            flags |= FLAG_SATURATED
        return trace, flags
