"""Vector network analyser emulator: SCPI text over a raw TCP socket, Keysight PNA or R&S ZNB dialect.

The VNA measures the transmission S21 of a metasurface cavity (``cavity.measure(states, freqs_hz,
if_bandwidth_hz=, power_dbm=)``, VNA noise included). The metasurface state is *latched when a
sweep starts*: ``pattern_source(t)`` (``t`` on the ``time.monotonic()`` clock) gives the bits the
cavity sees at time ``t`` -- e.g. a controller's ``pattern_at`` -- and the meta-atoms take the bits
listed in ``atoms`` (default ``0 .. cavity.n_meta - 1``). A sweep started before a new pattern has
settled therefore measures the old one.

Sweep timing
------------
``sweep_s = 1.2 * points / IFBW + 0.003`` s (FIELD-NOTES: points / IFBW x 1.1-1.5 plus a few ms;
the cavity model advances its clock by the same; reported by ``SENS1:SWE:TIME?``). A single sweep
(PNA ``SENS1:SWE:MODE SING``, or ``INIT1[:IMM]``) computes its trace at once from the pattern at
its start and publishes it ``sweep_s`` after its start (or when the computation ends, if later);
``*OPC?`` / ``*WAI`` block until then (``*OPC?`` answers ``1``); ``*OPC`` + ``*ESR?`` (bit 0) can be
polled instead. Data queried while a sweep runs is the previous sweep's. A new trigger during a
sweep restarts it. In continuous mode (the state after ``*RST``: PNA ``SENS:SWE:MODE CONT``, ZNB
``INIT:CONT ON``) the emulator does not sweep in the background: each data query returns a sweep
of the pattern seen ``sweep_s`` before the query. A completed single sweep leaves the PNA in HOLD.

Transport
---------
Commands end with ``"\\n"`` (``"\\r\\n"`` accepted); several may share a line separated by ``;``
(a header without a leading ``:`` continues the previous command's path); replies of one line are
joined by ``;`` and end with ``"\\n"``. Several clients share one instrument (a lock serialises
commands; waits happen outside it). A client vanishing mid-line is dropped; a partial line is never
executed. Lines longer than 1 MiB close the connection.

Data transfer
-------------
``FORMat[:DATA] ASCii[,0] | REAL,32 | REAL,64`` (``FORM?`` -> ``ASC,0`` / ``REAL,32`` / ``REAL,64``;
ASCII after ``*RST``, as on the real instruments). REAL data are IEEE 488.2 definite-length blocks
``#<n><len><payload>`` followed by ``"\\n"``; ``FORMat:BORDer SWAPped`` = little-endian,
``NORMal`` = big-endian (NORM after ``*RST``). ``swap_reversed=True`` inverts the two (some R&S
models do: FIELD-NOTES), so a client's byte-order check can be exercised. ASCII data are
comma-separated ``+d.dddddddddddE+dd``.

Commands (case-insensitive, short or long form; ``#`` = numeric suffix, default 1; ``[]`` optional)
------------------------------------------------------------------------------------------------
Both dialects:
``*IDN?``, ``*RST``, ``*CLS``, ``*OPC?``, ``*OPC``, ``*WAI``, ``*ESR?``, ``*OPT?``, ``*TRG``;
``SENSe#:FREQuency:STARt|STOP|CENTer|SPAN <Hz>`` (and ``?``; units HZ/KHZ/MHZ/GHZ accepted; start
above stop moves the other end along); ``SENSe#:SWEep:POINts <n>`` (1..100001);
``SENSe#:BANDwidth|BWIDth[:RESolution] <Hz>`` (1 Hz..15 MHz, rounded up to 1/1.5/2/3/5/7 x 10^n);
``SENSe#:SWEep:TIME?``; ``SOURce#:POWer#[:LEVel][:IMMediate][:AMPLitude] <dBm>`` (dialect range);
``INITiate#[:IMMediate]``; ``INITiate#:CONTinuous ON|OFF|1|0``; ``ABORt``;
``CALCulate#:PARameter:SELect '<name>'``, ``CALCulate#:PARameter:CATalog?``,
``CALCulate#:PARameter:DELete '<name>'``, ``CALCulate#:PARameter:DELete:ALL``;
``CALCulate#:FORMat MLOGarithmic|MLINear|PHASe|REAL|IMAGinary`` (selected measurement);
``CALCulate#:DATA? SDATa|FDATa`` (selected measurement: SDATA = Re, Im interleaved, FDATA = the
formatted values, dB for MLOG); ``FORMat...``; ``SYSTem:ERRor[:NEXT]?``, ``SYSTem:ERRor:COUNt?``.

PNA only (``dialect="pna"``; IDN ``Keysight Technologies,N5222B,SIM000003,A.17.20.07``):
``CALCulate#:PARameter:DEFine[:EXTended] '<name>','<S21>'`` and ``CALCulate#:PARameter:EXTended
'<name>',S21`` (create a measurement, numbered 1, 2, ...); ``CALCulate#:PARameter:CATalog:EXTended?``
-> ``"name,S21,..."``; ``CALCulate#:MEASure#:DATA:SDATA?|FDATA?``, ``CALCulate#:MEASure#:X[:VALues]?``,
``CALCulate#:MEASure#:PARameter?``, ``CALCulate#:MEASure#:FORMat``, ``CALCulate#:MEASure#:X:AXIS:UNIT?``
(``FREQ``), ``CALCulate#:MEASure#:Y:AXIS:UNIT?``; ``SENSe#:X[:VALues]?`` (stimulus, Hz);
``SENSe#:SWEep:MODE HOLD|CONTinuous|GROups|SINGle``; ``SYSTem:CHANnels:CATalog?`` -> ``"1"``;
``SYSTem:MEASurement:CATalog? [ch]`` -> ``"1,2"``; ``OUTPut[:STATe]``. After ``*RST``: measurement
``CH1_S21_1`` (S21, selected), 10 MHz-26.5 GHz, 201 points, 100 kHz, -5 dBm (range -90..+20).

ZNB only (``dialect="znb"``; IDN ``Rohde-Schwarz,ZNB8-4Port,1311601062100000,3.45``):
``CALCulate#:PARameter:SDEFine '<name>','<S21>'``; ``CALCulate#:DATA:STIMulus?``;
``INITiate[:CONTinuous]:ALL ON|OFF``; catalogs in single quotes ``'Trc1,S21'``. After ``*RST``: trace
``Trc1`` (S21, selected), 9 kHz-8.5 GHz, 201 points, 10 kHz, -10 dBm (range -40..+13).

Only S21 and S12 (the same, the cavity is reciprocal) are modelled; defining S11/S22 -> -224.
Only channel 1 exists (another suffix -> -114).

Error queue (``SYSTem:ERRor?`` -> ``0,"No error"`` or the oldest entry; 32 entries, the last
becomes ``-350,"Queue overflow"``): -113 Undefined header (unknown, wrong dialect, or a query of a
set-only header and vice versa), -114 Header suffix out of range, -109 Missing parameter, -224
Illegal parameter value, -222 Data out of range, -200 Execution error (no measurement selected,
a pattern shorter than the wired atoms). A query that fails sends no reply (clients time out).
"""
from __future__ import annotations

import math
import re
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scpi_emulation import ScpiCommands, split_top
from .scpi_emulation import ScpiError as _ScpiError
from .scpi_emulation import undefined as _undefined
from .serving import Served, TrackedConnections

__all__ = ["VNAEmulator", "DIALECTS", "sweep_time_s"]

_MAX_LINE = 1 << 20
_NUM_RE = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)$")
_FREQ_UNITS = {"": 1.0, "HZ": 1.0, "KHZ": 1e3, "MHZ": 1e6, "GHZ": 1e9}
_POWER_UNITS = {"": 1.0, "DBM": 1.0}
_IFBW_RANGE = (1.0, 15e6)
_POINTS_RANGE = (1, 100001)
_FORMATS = {"MLOG": "MLOG", "MLOGARITHMIC": "MLOG", "MLIN": "MLIN", "MLINEAR": "MLIN", "PHAS": "PHAS",
            "PHASE": "PHAS", "REAL": "REAL", "IMAG": "IMAG", "IMAGINARY": "IMAG"}
_Y_UNITS = {"MLOG": "DB", "MLIN": "UNIT", "PHAS": "DEGR", "REAL": "UNIT", "IMAG": "UNIT"}
_MODELLED = ("S21", "S12")
_REFLECTION = ("S11", "S22")


def sweep_time_s(points: int, if_bandwidth_hz: float) -> float:
    """The emulator's sweep time: ``1.2 * points / IFBW + 3 ms``."""
    return 1.2 * points / if_bandwidth_hz + 0.003


def _ifbw_steps() -> np.ndarray:
    mantissas = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    steps = [m * 10.0**e for e in range(0, 8) for m in mantissas]
    return np.array([s for s in steps if _IFBW_RANGE[0] <= s <= _IFBW_RANGE[1]])


_IFBW_STEPS = _ifbw_steps()


@dataclass(frozen=True)
class _Dialect:
    idn: str
    freq_range_hz: tuple[float, float]
    power_range_dbm: tuple[float, float]
    preset_ifbw_hz: float
    preset_power_dbm: float
    preset_measurement: str
    quote: str  # catalog quoting


DIALECTS = {
    "pna": _Dialect("Keysight Technologies,N5222B,SIM000003,A.17.20.07", (10e6, 26.5e9), (-90.0, 20.0),
                    100e3, -5.0, "CH1_S21_1", '"'),
    "znb": _Dialect("Rohde-Schwarz,ZNB8-4Port,1311601062100000,3.45", (9e3, 8.5e9), (-40.0, 13.0),
                    10e3, -10.0, "Trc1", "'"),
}




def _fmt(v: float) -> str:
    return f"{v:+.11E}"


# ---------------------------------------------------------------------- header matching
# A spec is "CALCulate#:PARameter:DEFine:[EXTended]": '#' = the node takes a numeric suffix
# (captured, default 1), '[...]' = optional node, '|' = alternative spellings.
def _node(spec: str):
    opt = spec.startswith("[") and spec.endswith("]")
    spec = spec.strip("[]")
    takes_suffix = spec.endswith("#")
    names = set()
    for alt in spec.rstrip("#").split("|"):
        short = "".join(ch for ch in alt if ch.isupper() or ch.isdigit())
        names.update({short, alt.upper()})
    return names, opt, takes_suffix


def _compile(spec: str):
    return [_node(part) for part in spec.split(":")]


_TOKEN_RE = re.compile(r"^([A-Z]+)(\d*)$")


def _tokens(path: list[str]) -> list[tuple[str, int | None]]:
    out = []
    for part in path:
        m = _TOKEN_RE.match(part)
        if m is None:
            raise _undefined()
        out.append((m.group(1), int(m.group(2)) if m.group(2) else None))
    return out


def _match(tokens, nodes, suffixes: list[int]) -> list[int] | None:
    if not nodes:
        return suffixes if not tokens else None
    names, opt, takes_suffix = nodes[0]
    if tokens:
        name, suffix = tokens[0]
        if name in names and (suffix is None or takes_suffix):
            got = _match(tokens[1:], nodes[1:], suffixes + ([suffix or 1] if takes_suffix else []))
            if got is not None:
                return got
    if opt:
        return _match(tokens, nodes[1:], suffixes + ([1] if takes_suffix else []))
    return None


# ---------------------------------------------------------------------- parameters
def _number(params: str, units: dict) -> float:
    p = params.strip()
    if not p:
        raise _ScpiError(-109, "Missing parameter")
    m = _NUM_RE.match(p)
    if m is None or m.group(2).upper() not in units:
        raise _ScpiError(-224, "Illegal parameter value")
    value = float(m.group(1)) * units[m.group(2).upper()]
    if not math.isfinite(value):
        raise _ScpiError(-224, "Illegal parameter value")
    return value


def _bool(params: str) -> bool:
    p = params.strip().upper()
    if not p:
        raise _ScpiError(-109, "Missing parameter")
    table = {"ON": True, "1": True, "OFF": False, "0": False}
    if p not in table:
        raise _ScpiError(-224, "Illegal parameter value")
    return table[p]


def _unquote(text: str) -> str:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def _string_args(params: str, n: int) -> list[str]:
    args = [_unquote(a) for a in split_top(params, ",")] if params.strip() else []
    if len(args) < n or not all(args[:n]):
        raise _ScpiError(-109, "Missing parameter")
    if len(args) > n:
        raise _ScpiError(-224, "Illegal parameter value")
    return args


# ---------------------------------------------------------------------- state
@dataclass
class _Measurement:
    number: int
    parameter: str
    fmt: str = "MLOG"


@dataclass
class _State:
    start_hz: float
    stop_hz: float
    ifbw_hz: float
    power_dbm: float
    points: int = 201
    data_fmt: str = "ASCII"  # ASCII | REAL,32 | REAL,64
    border: str = "NORM"
    continuous: bool = True
    output: bool = True
    measurements: dict[str, _Measurement] = field(default_factory=dict)
    selected: str | None = None
    sweeping_until: float | None = None
    opc_armed: bool = False


class VNAEmulator(ScpiCommands, Served):
    """A PNA- or ZNB-style VNA on ``host:port`` (port 0 picks a free one) measuring ``cavity``.

    :param cavity: has ``n_meta`` and ``measure(states, freqs_hz, *, if_bandwidth_hz, power_dbm)``.
    :param pattern_source: ``t -> bits`` (uint8 array) the cavity sees at monotonic time ``t``.
    :param atoms: bit indices wired to the meta-atoms (default the first ``cavity.n_meta``).
    :param swap_reversed: ``FORM:BORD SWAP`` sends big-endian (an R&S quirk), NORM little-endian.
    """

    thread_name = "vna-sim"

    def __init__(self, cavity: Any, pattern_source: Callable[[float], np.ndarray], *,
                 host: str = "127.0.0.1", port: int = 0, dialect: str = "pna", atoms=None,
                 swap_reversed: bool = False):
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {sorted(DIALECTS)}, got {dialect!r}")
        self.cavity = cavity
        self.pattern_source = pattern_source
        self.dialect = dialect
        self._d = DIALECTS[dialect]
        n_meta = int(cavity.n_meta)
        self.atoms = np.arange(n_meta) if atoms is None else np.asarray(atoms, dtype=np.intp).ravel()
        if self.atoms.size != n_meta or (self.atoms < 0).any():
            raise ValueError(f"atoms: need {n_meta} non-negative bit indices, got {self.atoms.size}")
        self.host, self._port = host, int(port)
        self.swap_reversed = bool(swap_reversed)
        self._lock = threading.RLock()
        self._errors: deque = deque()
        self.sweeps = 0  #: sweeps started
        self.last_states: np.ndarray | None = None  #: meta-atom states latched by the last sweep
        self._reset()
        self._commands = self._command_table()

    @property
    def resource(self) -> str:
        """The VISA resource string, ``TCPIP::127.0.0.1::PORT::SOCKET``."""
        return f"TCPIP::{self.host}::{self._port}::SOCKET"

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        d = self._d
        with self._lock:
            self._st = _State(start_hz=d.freq_range_hz[0], stop_hz=d.freq_range_hz[1],
                              ifbw_hz=d.preset_ifbw_hz, power_dbm=d.preset_power_dbm)
            self._st.measurements = {d.preset_measurement: _Measurement(1, "S21")}
            self._st.selected = d.preset_measurement
            self._pending: tuple[np.ndarray, np.ndarray] | None = None
            self._trace_f = self._axis()
            self._trace = np.zeros(self._trace_f.size, complex)

    def _axis(self) -> np.ndarray:
        st = self._st
        if st.points == 1:
            return np.array([(st.start_hz + st.stop_hz) / 2])
        return np.linspace(st.start_hz, st.stop_hz, st.points)

    def sweep_time(self) -> float:
        """Seconds one sweep takes with the current points and IF bandwidth."""
        return sweep_time_s(self._st.points, self._st.ifbw_hz)



    def _measure_at(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """One sweep of the pattern seen at monotonic time ``t``: (freqs, S21)."""
        bits = np.asarray(self.pattern_source(t)).ravel()
        if bits.size <= int(self.atoms.max(initial=-1)):
            raise _ScpiError(-200, f"Execution error; metasurface pattern has {bits.size} bits")
        states = (bits[self.atoms] != 0).astype(np.int64)
        self.last_states = states
        freqs = self._axis()
        s21 = np.asarray(self.cavity.measure(states, freqs, if_bandwidth_hz=self._st.ifbw_hz,
                                             power_dbm=self._st.power_dbm), dtype=complex)
        return freqs, s21

    def _trigger(self) -> None:
        t0 = time.monotonic()
        self._pending = self._measure_at(t0)
        self.sweeps += 1
        self._st.sweeping_until = t0 + self.sweep_time()
        self._st.continuous = False  # a single sweep leaves the channel in HOLD

    def _poll_sweep(self) -> None:
        st = self._st
        if st.sweeping_until is not None and time.monotonic() >= st.sweeping_until:
            self._trace_f, self._trace = self._pending
            self._pending = None
            st.sweeping_until = None

    def _current_trace(self) -> tuple[np.ndarray, np.ndarray]:
        if self._st.continuous and self._st.sweeping_until is None:
            self._trace_f, self._trace = self._measure_at(time.monotonic() - self.sweep_time())
        return self._trace_f, self._trace

    # ------------------------------------------------------------------ execution
    def _execute(self, header: str, params: str, prefix: list[str]):
        query = header.endswith("?")
        head = (header[:-1] if query else header).upper()
        if head.startswith("*"):
            handler = self._commands["common"].get(head)
            if handler is None:
                raise _undefined()
            return self._call(handler, params, query, []), prefix
        path = head[1:].split(":") if head.startswith(":") else prefix + head.split(":")
        if any(not p for p in path):
            raise _undefined()
        tokens = _tokens(path)
        for nodes, handler in self._commands["tree"]:
            suffixes = _match(tokens, nodes, [])
            if suffixes is not None:
                return self._call(handler, params, query, suffixes), path[:-1]
        raise _undefined()

    def _call(self, handler, params: str, query: bool, suffixes: list[int]):
        setter, getter, waits = handler
        fn = getter if query else setter
        if fn is None:
            raise _undefined()
        if waits:  # *OPC? and *WAI wait outside the lock
            out = fn(params, suffixes)
        else:
            with self._lock:
                self._poll_sweep()
                out = fn(params, suffixes)
        if out is None:
            return None
        return out if isinstance(out, bytes) else out.encode()

    def _command_table(self):
        st = lambda: self._st  # noqa: E731 - the state object is replaced by *RST
        common = {
            "*IDN": (None, lambda p, s: self._d.idn, False),
            "*RST": (lambda p, s: self._reset(), None, False),
            "*CLS": (self._cls, None, False),
            "*OPC": (self._arm_opc, self._wait_opc, True),
            "*WAI": (lambda p, s: self._wait_opc(p, s) and None, None, True),
            "*ESR": (None, self._read_esr, False),
            "*OPT": (None, lambda p, s: '""', False),
            "*TRG": (lambda p, s: self._trigger(), None, False),
        }
        both = [
            ("SENSe#:FREQuency:STARt", self._chan(self._set_start), self._chan(lambda p: _fmt(st().start_hz))),
            ("SENSe#:FREQuency:STOP", self._chan(self._set_stop), self._chan(lambda p: _fmt(st().stop_hz))),
            ("SENSe#:FREQuency:CENTer", self._chan(self._set_center),
             self._chan(lambda p: _fmt((st().start_hz + st().stop_hz) / 2))),
            ("SENSe#:FREQuency:SPAN", self._chan(self._set_span),
             self._chan(lambda p: _fmt(st().stop_hz - st().start_hz))),
            ("SENSe#:SWEep:POINts", self._chan(self._set_points), self._chan(lambda p: f"{st().points:+d}")),
            ("SENSe#:BANDwidth|BWIDth:[RESolution]", self._chan(self._set_ifbw),
             self._chan(lambda p: _fmt(st().ifbw_hz))),
            ("SENSe#:SWEep:TIME", None, self._chan(lambda p: _fmt(self.sweep_time()))),
            ("SOURce#:POWer#:[LEVel]:[IMMediate]:[AMPLitude]", self._chan(self._set_power),
             self._chan(lambda p: _fmt(st().power_dbm))),
            ("INITiate#:[IMMediate]", self._chan(lambda p: self._trigger()), None),
            ("INITiate#:CONTinuous", self._chan(self._set_continuous),
             self._chan(lambda p: "1" if st().continuous else "0")),
            ("ABORt", lambda p, s: self._abort(), None),
            ("CALCulate#:PARameter:SELect", self._chan(self._select), None),
            ("CALCulate#:PARameter:CATalog", None, self._chan(self._catalog)),
            ("CALCulate#:PARameter:DELete:ALL", self._chan(self._delete_all), None),
            ("CALCulate#:PARameter:DELete", self._chan(self._delete), None),
            ("CALCulate#:FORMat", self._chan(lambda p: self._set_trace_format(self._selected(), p)),
             self._chan(lambda p: self._selected().fmt)),
            ("CALCulate#:DATA", None, self._chan(self._calc_data)),
            ("FORMat:[DATA]", self._set_data_format, lambda p, s: {"ASCII": "ASC,0"}.get(st().data_fmt, st().data_fmt)),
            ("FORMat:BORDer", self._set_border, lambda p, s: st().border),
            ("SYSTem:ERRor:[NEXT]", None, self._next_error),
            ("SYSTem:ERRor:COUNt", None, lambda p, s: str(len(self._errors))),
        ]
        if self.dialect == "pna":
            only = [
                ("CALCulate#:PARameter:DEFine:[EXTended]", self._chan(self._define), None),
                ("CALCulate#:PARameter:EXTended", self._chan(self._define), None),
                ("CALCulate#:PARameter:CATalog:EXTended", None, self._chan(self._catalog)),
                ("CALCulate#:MEASure#:DATA:SDATA", None, self._meas(lambda m, p: self._data(m, "SDATA"))),
                ("CALCulate#:MEASure#:DATA:FDATA", None, self._meas(lambda m, p: self._data(m, "FDATA"))),
                ("CALCulate#:MEASure#:X:[VALues]", None, self._meas(lambda m, p: self._stimulus())),
                ("CALCulate#:MEASure#:PARameter", None, self._meas(lambda m, p: f'"{m.parameter}"')),
                ("CALCulate#:MEASure#:FORMat", self._meas(self._set_trace_format), self._meas(lambda m, p: m.fmt)),
                ("CALCulate#:MEASure#:X:AXIS:UNIT", None, self._meas(lambda m, p: "FREQ")),
                ("CALCulate#:MEASure#:Y:AXIS:UNIT", None, self._meas(lambda m, p: _Y_UNITS[m.fmt])),
                ("CALCulate#:X:[VALues]", None, self._chan(lambda p: self._stimulus())),
                ("SENSe#:X:[VALues]", None, self._chan(lambda p: self._stimulus())),
                ("SENSe#:SWEep:MODE", self._chan(self._set_mode), self._chan(self._get_mode)),
                ("SYSTem:CHANnels:CATalog", None, lambda p, s: '"1"'),
                ("SYSTem:MEASurement:CATalog", None, self._meas_catalog),
                ("OUTPut:[STATe]", self._set_output, lambda p, s: "1" if st().output else "0"),
            ]
        else:
            only = [
                ("CALCulate#:PARameter:SDEFine", self._chan(self._define), None),
                ("CALCulate#:DATA:STIMulus", None, self._chan(lambda p: self._stimulus())),
                ("INITiate:[CONTinuous]:ALL", lambda p, s: self._set_continuous(p), None),
            ]
        table = [(_compile(spec), (setter, getter, False)) for spec, setter, getter in only + both]
        return {"common": common, "tree": table}

    @staticmethod
    def _chan(fn):
        """Wrap a handler of the channel subtree: only channel 1 (and source port 1) exists."""
        def run(params, suffixes):
            if any(s != 1 for s in suffixes):
                raise _ScpiError(-114, "Header suffix out of range")
            return fn(params)
        return run

    def _meas(self, fn):
        """Wrap a ``CALC<ch>:MEAS<n>`` handler: resolve measurement number ``n``."""
        def run(params, suffixes):
            ch, number = suffixes[0], suffixes[1]
            if ch != 1:
                raise _ScpiError(-114, "Header suffix out of range")
            for m in self._st.measurements.values():
                if m.number == number:
                    return fn(m, params)
            raise _ScpiError(-114, "Header suffix out of range")
        return run

    # ------------------------------------------------------------------ handlers: common
    def _cls(self, params, suffixes) -> None:
        self._errors.clear()
        self._st.opc_armed = False

    def _arm_opc(self, params, suffixes) -> None:
        with self._lock:
            self._st.opc_armed = True

    def _read_esr(self, params, suffixes) -> str:
        st = self._st
        done = st.opc_armed and st.sweeping_until is None
        if done:
            st.opc_armed = False
        return "1" if done else "0"

    def _wait_opc(self, params, suffixes) -> str:
        with self._lock:
            until = self._st.sweeping_until
        if until is not None:
            delay = until - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with self._lock:
            self._poll_sweep()
        return "1"

    def _abort(self) -> None:
        self._pending = None
        self._st.sweeping_until = None

    def _next_error(self, params, suffixes) -> str:
        if not self._errors:
            return '0,"No error"'
        code, message = self._errors.popleft()
        return f'{code},"{message}"'

    # ------------------------------------------------------------------ handlers: stimulus, source
    def _frequency(self, params: str) -> float:
        lo, hi = self._d.freq_range_hz
        v = _number(params, _FREQ_UNITS)
        if not lo * (1 - 1e-12) <= v <= hi * (1 + 1e-12):
            raise _ScpiError(-222, "Data out of range")
        return v

    def _set_start(self, params: str) -> None:
        v = self._frequency(params)
        self._st.start_hz, self._st.stop_hz = v, max(self._st.stop_hz, v)

    def _set_stop(self, params: str) -> None:
        v = self._frequency(params)
        self._st.stop_hz, self._st.start_hz = v, min(self._st.start_hz, v)

    def _set_center(self, params: str) -> None:
        c = self._frequency(params)
        half = (self._st.stop_hz - self._st.start_hz) / 2
        lo, hi = self._d.freq_range_hz
        if c - half < lo or c + half > hi:
            raise _ScpiError(-222, "Data out of range")
        self._st.start_hz, self._st.stop_hz = c - half, c + half

    def _set_span(self, params: str) -> None:
        span = _number(params, _FREQ_UNITS)
        c = (self._st.start_hz + self._st.stop_hz) / 2
        lo, hi = self._d.freq_range_hz
        if span < 0 or c - span / 2 < lo or c + span / 2 > hi:
            raise _ScpiError(-222, "Data out of range")
        self._st.start_hz, self._st.stop_hz = c - span / 2, c + span / 2

    def _set_points(self, params: str) -> None:
        v = _number(params, {"": 1.0})
        if v != int(v):
            raise _ScpiError(-224, "Illegal parameter value")
        if not _POINTS_RANGE[0] <= v <= _POINTS_RANGE[1]:
            raise _ScpiError(-222, "Data out of range")
        self._st.points = int(v)

    def _set_ifbw(self, params: str) -> None:
        v = _number(params, _FREQ_UNITS)
        if not _IFBW_RANGE[0] <= v <= _IFBW_RANGE[1] * (1 + 1e-12):
            raise _ScpiError(-222, "Data out of range")
        self._st.ifbw_hz = float(_IFBW_STEPS[np.searchsorted(_IFBW_STEPS, v * (1 - 1e-9))])  # round up

    def _set_power(self, params: str) -> None:
        v = _number(params, _POWER_UNITS)
        lo, hi = self._d.power_range_dbm
        if not lo <= v <= hi:
            raise _ScpiError(-222, "Data out of range")
        self._st.power_dbm = v

    def _set_output(self, params, suffixes) -> None:
        self._st.output = _bool(params)

    # ------------------------------------------------------------------ handlers: sweep control
    def _set_continuous(self, params: str) -> None:
        self._st.continuous = _bool(params)

    def _set_mode(self, params: str) -> None:
        p = params.strip().upper()
        if not p:
            raise _ScpiError(-109, "Missing parameter")
        if p in ("SING", "SINGLE"):
            self._trigger()
        elif p in ("CONT", "CONTINUOUS"):
            self._st.continuous = True
        elif p in ("HOLD",):
            self._st.continuous = False
        elif p in ("GRO", "GROUPS"):
            self._trigger()
        else:
            raise _ScpiError(-224, "Illegal parameter value")

    def _get_mode(self, params: str) -> str:
        return "CONT" if self._st.continuous else "HOLD"

    # ------------------------------------------------------------------ handlers: measurements
    def _define(self, params: str) -> None:
        name, parameter = _string_args(params, 2)
        parameter = parameter.upper()
        if parameter in _REFLECTION or parameter not in _MODELLED:
            raise _ScpiError(-224, "Illegal parameter value")
        if name in self._st.measurements:
            raise _ScpiError(-224, "Illegal parameter value")  # the name is taken
        used = {m.number for m in self._st.measurements.values()}
        number = next(n for n in range(1, len(used) + 2) if n not in used)
        self._st.measurements[name] = _Measurement(number, parameter)

    def _select(self, params: str) -> None:
        (name,) = _string_args(params, 1)
        if name not in self._st.measurements:
            raise _ScpiError(-224, "Illegal parameter value")
        self._st.selected = name

    def _delete(self, params: str) -> None:
        (name,) = _string_args(params, 1)
        if self._st.measurements.pop(name, None) is None:
            raise _ScpiError(-224, "Illegal parameter value")
        if self._st.selected == name:
            self._st.selected = None

    def _delete_all(self, params: str) -> None:
        self._st.measurements.clear()
        self._st.selected = None

    def _catalog(self, params: str) -> str:
        q = self._d.quote
        items = ",".join(f"{name},{m.parameter}" for name, m in self._st.measurements.items())
        return f"{q}{items or 'NO CATALOG'}{q}" if self.dialect == "pna" else f"{q}{items}{q}"

    def _meas_catalog(self, params, suffixes) -> str:
        if params.strip() and params.strip() != "1":
            return '""'
        numbers = sorted(m.number for m in self._st.measurements.values())
        return '"' + ",".join(map(str, numbers)) + '"'

    def _selected(self) -> _Measurement:
        if self._st.selected is None:
            raise _ScpiError(-200, "Execution error; no measurement selected")
        return self._st.measurements[self._st.selected]

    def _set_trace_format(self, m: _Measurement, params: str) -> None:
        p = params.strip().upper()
        if not p:
            raise _ScpiError(-109, "Missing parameter")
        if p not in _FORMATS:
            raise _ScpiError(-224, "Illegal parameter value")
        m.fmt = _FORMATS[p]

    # ------------------------------------------------------------------ handlers: data
    def _set_data_format(self, params, suffixes) -> None:
        p = params.replace(" ", "").replace("+", "").upper()
        table = {"ASCII": "ASCII", "ASC": "ASCII", "ASCII,0": "ASCII", "ASC,0": "ASCII", "REAL": "REAL,64",
                 "REAL,64": "REAL,64", "REAL,32": "REAL,32"}
        if not p:
            raise _ScpiError(-109, "Missing parameter")
        if p not in table:
            raise _ScpiError(-224, "Illegal parameter value")
        self._st.data_fmt = table[p]

    def _set_border(self, params, suffixes) -> None:
        p = params.strip().upper()
        if not p:
            raise _ScpiError(-109, "Missing parameter")
        table = {"SWAP": "SWAP", "SWAPPED": "SWAP", "NORM": "NORM", "NORMAL": "NORM"}
        if p not in table:
            raise _ScpiError(-224, "Illegal parameter value")
        self._st.border = table[p]

    def _calc_data(self, params: str) -> bytes:
        p = params.strip().upper()
        if not p:
            raise _ScpiError(-109, "Missing parameter")
        kinds = {"SDAT": "SDATA", "SDATA": "SDATA", "FDAT": "FDATA", "FDATA": "FDATA"}
        if p not in kinds:
            raise _ScpiError(-224, "Illegal parameter value")
        return self._data(self._selected(), kinds[p])

    def _data(self, m: _Measurement, kind: str) -> bytes:
        _, s21 = self._current_trace()
        if kind == "SDATA":
            values = np.empty(2 * s21.size)
            values[0::2], values[1::2] = s21.real, s21.imag
        elif m.fmt == "MLOG":
            with np.errstate(divide="ignore"):
                values = np.maximum(20 * np.log10(np.abs(s21)), -200.0)
        else:
            values = {"MLIN": np.abs, "PHAS": lambda z: np.degrees(np.angle(z)),
                      "REAL": np.real, "IMAG": np.imag}[m.fmt](s21)
        return self._encode(values)

    def _stimulus(self) -> bytes:
        return self._encode(self._axis())  # follows the settings at once, as on the instruments

    def _encode(self, values: np.ndarray) -> bytes:
        fmt = self._st.data_fmt
        if fmt == "ASCII":
            return ",".join(map(_fmt, np.asarray(values, float).tolist())).encode()
        little = (self._st.border == "SWAP") != self.swap_reversed
        dtype = ("<" if little else ">") + ("f4" if fmt == "REAL,32" else "f8")
        payload = np.asarray(values).astype(dtype).tobytes()
        size = str(len(payload)).encode()
        return b"#" + str(len(size)).encode() + size + payload


# ---------------------------------------------------------------------- socket server
class _TCPServer(TrackedConnections, socketserver.ThreadingTCPServer):
    pass


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        owner: VNAEmulator = self.server.owner
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > _MAX_LINE:
                        return
                    if _QUICKACK is not None:  # ACK at once: the client's next small write is not
                        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # held back by delayed ACK
                    chunk = sock.recv(65536)
                    if not chunk:
                        return  # client gone; a partial line is never executed
                    buf += chunk
                    continue
                raw, buf = buf[:nl], buf[nl + 1:]
                line = raw.rstrip(b"\r").decode("latin-1").strip()
                if not line:
                    continue
                reply = owner.execute_line(line)
                if reply is not None:
                    sock.sendall(reply)
        except (ConnectionError, OSError):
            return


VNAEmulator.server_class = _TCPServer
VNAEmulator.handler_class = _Connection
