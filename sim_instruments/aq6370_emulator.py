"""AQ6370-style optical spectrum analyser emulator: SCPI text over a raw TCP socket (stdlib only).

Each completed sweep is one shot of the shared `SHGBench`, sampled on the OSA's axis
(start/stop/points) with its resolution: the trace carries the detector noise, quantisation,
compression and saturation of the physics model.

Transport
---------
- Commands end with ``"\\n"`` (``"\\r\\n"`` accepted); replies end with ``"\\n"``. Several commands may
  share a line, separated by ``;`` (a header without a leading ``:`` continues the previous
  command's path, as in SCPI: ``:SENS:WAV:STAR 770NM;STOP 780NM``); the replies to the queries of
  one line are joined by ``;``. Lines longer than 1 MiB close the connection.
- Several clients may connect; they share one instrument state (a lock serialises commands).
  A client vanishing mid-command (a partial line, or a reset while a reply is being sent) is
  dropped silently; the partial command is never executed.
- Login (``require_login=True``; off by default): the first line must be ``OPEN "<user>"`` ->
  ``AUTHENTICATE CRAM-MD5.``; the next line is the password -> ``ready`` (any password, or the
  configured one; a wrong one -> ``ERROR`` and the connection is closed). Any other line before
  login closes the connection without a reply or execution. Without ``require_login`` the same
  handshake is still answered, so clients that always log in work against both modes.

Commands (headers are case-insensitive, short or long form; ``[]`` nodes are optional)
--------------------------------------------------------------------------------------
``*IDN?`` -> ``YOKOGAWA,AQ6370D,SIM000002,01.00``; ``*RST``; ``*CLS`` (clears the error queue and
the operation event register); ``*OPC?`` -> ``1`` once any sweep in progress has completed (it waits);
``*WAI``; ``*ESR?`` -> ``0``; ``*TRG`` = ``:INIT``.

- ``:SENSe:WAVelength:STARt|STOP|CENTer|SPAN <x>[NM|UM|PM|M]`` (and ``?``, reply in metres as
  ``+7.70000000E-007``). Start/stop within 600-1700 nm, span 0-1100 nm. Setting START above STOP
  (or STOP below START) moves the other end along (span 0).
- ``:SENSe:SWEep:POINts <n>`` (101-50001) (and ``?``).
- ``:SENSe:BANDwidth|BWIDth[:RESolution] <x>[unit]`` (and ``?``): snapped to the nearest of
  0.02/0.05/0.1/0.2/0.5/1/2 nm; outside 0.01-2 nm -> -222.
- ``:SENSe:SENSe NHLD|NAUT|MID|HIGH1|HIGH2|HIGH3|NORM`` (and ``?`` -> 0..6): accepted, no effect.
- ``:INITiate:SMODe SINGle|1`` (and ``?`` -> ``1``); other modes -> -224.
- ``:INITiate[:IMMediate]`` starts a single sweep: the shot is taken at once (the mask in place
  now), and the trace replaces the previous one and bit 0 of the operation event register is set
  when the sweep time has elapsed (``sweep_s``, default 0). ``:ABORt`` cancels a sweep in progress.
- ``:STATus:OPERation[:EVENt]?`` -> integer; bit 0 = a sweep completed; reading clears it.
  ``:STATus:OPERation:CONDition?`` -> 1 when no sweep is in progress, else 0.
- ``:TRACe:ACTive TRA`` (and ``?``); only trace A exists (TRB..TRG -> -224).
- ``:TRACe[:DATA]:X? TRA`` (wavelengths, m), ``:TRACe[:DATA]:Y? TRA`` (W when
  ``:DISPlay[:WINDow]:TRACe:Y1[:SCALe]:SPACing LINear|1``, dBm when ``LOGarithmic|0``; ``?`` -> 0/1;
  LOG after ``*RST``; non-positive powers read -210 dBm), ``:TRACe[:DATA]:SNUMber? TRA``.
  Before the first sweep the trace is the current axis with zero power. During a sweep the
  previous trace is returned.
- ``:FORMat[:DATA] ASCii|REAL[,64]|REAL,32`` (and ``?`` -> ``ASCII``/``REAL,64``/``REAL,32``): REAL
  data are IEEE 488.2 definite-length blocks ``#<n><len><little-endian float32/64>`` then ``"\\n"``;
  ASCII is comma-separated ``+d.dddddddddE+ddd``. ASCII after ``*RST``.
- ``:SYSTem:ERRor[:NEXT]?`` -> ``0,"No error"`` or the oldest error. The queue holds 32 entries (the
  last becomes ``-350,"Queue overflow"``). Errors: -113 Undefined header (unknown, or a query of a
  set-only header and vice versa), -109 Missing parameter, -224 Illegal parameter value, -222 Data
  out of range.

``*RST`` state: 770-780 nm, 512 points, 0.05 nm (the bench's defaults, so the SH is in view),
SINGle, TRA, ASCII, LOG.
"""
from __future__ import annotations

import math
import re
import socket
import socketserver
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .scpi_emulation import ScpiCommands
from .scpi_emulation import ScpiError as _ScpiError
from .scpi_emulation import undefined as _undefined
from .serving import Served, TrackedConnections
from .shg import SHGBench

__all__ = ["AQ6370Emulator", "IDN"]

IDN = "YOKOGAWA,AQ6370D,SIM000002,01.00"
_MAX_LINE = 1 << 20
_RESOLUTIONS_M = np.array([0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]) * 1e-9
_WL_MIN, _WL_MAX, _SPAN_MAX = 600e-9, 1700e-9, 1100e-9
_DBM_FLOOR = -210.0
_SENSE = ["NHLD", "NAUT", "MID", "HIGH1", "HIGH2", "HIGH3", "NORM"]
_NUM_RE = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)$")
_UNITS = {"": 1.0, "M": 1.0, "NM": 1e-9, "UM": 1e-6, "PM": 1e-12}




def _fmt(v: float) -> str:
    """AQ6370-style ASCII number: ``+7.75000000E-007``."""
    mant, exp = f"{v:+.8E}".split("E")
    return f"{mant}E{int(exp):+04d}"


# ---------------------------------------------------------------------- header matching
def _node(spec: str):
    """'BANDwidth|BWIDth' -> set of accepted upper-case spellings (short and long forms)."""
    out = set()
    for alt in spec.split("|"):
        short = "".join(ch for ch in alt if ch.isupper() or ch.isdigit())
        out.update({short, alt.upper()})
    return out


def _pattern(spec: str):
    """'SENSe:BANDwidth|BWIDth:[RESolution]' -> [(accepted spellings, optional), ...]."""
    nodes = []
    for part in spec.split(":"):
        opt = part.startswith("[") and part.endswith("]")
        nodes.append((_node(part.strip("[]")), opt))
    return nodes


def _match(tokens: list[str], nodes) -> bool:
    if not nodes:
        return not tokens
    names, opt = nodes[0]
    if tokens and tokens[0] in names and _match(tokens[1:], nodes[1:]):
        return True
    return opt and _match(tokens, nodes[1:])


@dataclass
class _State:
    start_m: float = 770e-9
    stop_m: float = 780e-9
    points: int = 512
    resolution_m: float = 0.05e-9
    sense: int = 2
    fmt: str = "ASCII"
    linear: bool = False
    sweeping_until: float | None = None
    oper_event: int = 0


class AQ6370Emulator(ScpiCommands, Served):
    """An AQ6370-style OSA on ``host:port`` (port 0 picks a free one) reading ``bench``'s SH."""

    quotes = '"'  # its commands quote with " only

    thread_name = "aq6370-sim"

    def __init__(
        self,
        bench: SHGBench | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        sweep_s: float = 0.0,
        require_login: bool = False,
        password: str | None = None,
    ):
        if sweep_s < 0:
            raise ValueError("sweep_s must be >= 0")
        self.bench = bench if bench is not None else SHGBench()
        self.host, self._port = host, int(port)
        self.sweep_s = float(sweep_s)
        self.require_login = bool(require_login)
        self.password = password
        self._lock = threading.RLock()
        self._errors: deque = deque()
        self.sweeps = 0  #: completed sweeps
        self._reset()
        self._commands = self._command_table()

    # ------------------------------------------------------------------ lifecycle
    @property
    def resource(self) -> str:
        """The VISA resource string, ``TCPIP::127.0.0.1::PORT::SOCKET``."""
        return f"TCPIP::{self.host}::{self._port}::SOCKET"

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        cfg = self.bench.config
        with self._lock:
            self._st = _State(
                start_m=cfg.wavelength_start_m,
                stop_m=cfg.wavelength_stop_m,
                points=cfg.n_pixels,
                resolution_m=float(_RESOLUTIONS_M[np.argmin(np.abs(_RESOLUTIONS_M - cfg.resolution_m))]),
            )
            self._pending = None
            self._trace_x = self._axis()
            self._trace_w = np.zeros(self._trace_x.size)

    def _axis(self) -> np.ndarray:
        st = self._st
        return np.linspace(st.start_m, st.stop_m, st.points)


    def _poll_sweep(self) -> None:
        """Complete a sweep whose time has elapsed (called before every command)."""
        st = self._st
        if st.sweeping_until is not None and time.monotonic() >= st.sweeping_until:
            self._trace_x, self._trace_w = self._pending
            self._pending = None
            st.sweeping_until = None
            st.oper_event |= 1
            self.sweeps += 1

    # ------------------------------------------------------------------ execution
    def _execute(self, header: str, params: str, prefix: list[str]):
        query = header.endswith("?")
        head = header[:-1] if query else header
        if head.startswith("*"):
            key = head.upper()
            handler = self._commands["common"].get(key)
            if handler is None:
                raise _undefined()
            return self._call(handler, params, query), prefix
        # an absolute header starts at the root; a relative one continues the previous path
        tokens = head[1:].upper().split(":") if head.startswith(":") else prefix + head.upper().split(":")
        if any(not t for t in tokens):
            raise _undefined()
        new_prefix = tokens[:-1]
        for nodes, handler in self._commands["tree"]:
            if _match(tokens, nodes):
                return self._call(handler, params, query), new_prefix
        raise _undefined()

    def _call(self, handler, params: str, query: bool):
        setter, getter = handler
        fn = getter if query else setter
        if fn is None:
            raise _undefined()
        if query and getter is not self._wait_opc:
            with self._lock:
                self._poll_sweep()
                out = fn(params)
        else:
            out = fn(params)  # *OPC? waits outside the lock
        if out is None:
            return None
        return out if isinstance(out, bytes) else out.encode()

    def _command_table(self):
        locked = self._locked
        common = {
            "*IDN": (None, lambda p: IDN),
            "*RST": (locked(lambda p: self._reset()), None),
            "*CLS": (locked(self._cls), None),
            "*OPC": (lambda p: None, self._wait_opc),
            "*WAI": (lambda p: self._wait_opc(p) and None, None),
            "*ESR": (None, lambda p: "0"),
            "*TRG": (locked(self._initiate), None),
        }
        tree = [
            ("SENSe:WAVelength:STARt", (locked(self._set_start), lambda p: _fmt(self._st.start_m))),
            ("SENSe:WAVelength:STOP", (locked(self._set_stop), lambda p: _fmt(self._st.stop_m))),
            ("SENSe:WAVelength:CENTer", (locked(self._set_center), lambda p: _fmt((self._st.start_m + self._st.stop_m) / 2))),
            ("SENSe:WAVelength:SPAN", (locked(self._set_span), lambda p: _fmt(self._st.stop_m - self._st.start_m))),
            ("SENSe:SWEep:POINts", (locked(self._set_points), lambda p: str(self._st.points))),
            ("SENSe:BANDwidth|BWIDth:[RESolution]", (locked(self._set_resolution), lambda p: _fmt(self._st.resolution_m))),
            ("SENSe:SENSe", (locked(self._set_sense), lambda p: str(self._st.sense))),
            ("INITiate:SMODe", (locked(self._set_smode), lambda p: "1")),
            ("INITiate:[IMMediate]", (locked(self._initiate), None)),
            ("ABORt", (locked(self._abort), None)),
            ("STATus:OPERation:[EVENt]", (None, self._read_oper_event)),
            ("STATus:OPERation:CONDition", (None, lambda p: "0" if self._st.sweeping_until is not None else "1")),
            ("TRACe:ACTive", (lambda p: self._trace_name(p) and None, lambda p: "TRA")),
            ("TRACe:[DATA]:X", (None, lambda p: self._trace_data(p, "X"))),
            ("TRACe:[DATA]:Y", (None, lambda p: self._trace_data(p, "Y"))),
            ("TRACe:[DATA]:SNUMber", (None, lambda p: self._trace_name(p) and str(self._trace_x.size))),
            ("FORMat:[DATA]", (locked(self._set_format), lambda p: self._st.fmt)),
            ("DISPlay:[WINDow]:TRACe:Y1:[SCALe]:SPACing", (locked(self._set_spacing), lambda p: "1" if self._st.linear else "0")),
            ("SYSTem:ERRor:[NEXT]", (None, self._next_error)),
        ]
        return {"common": common, "tree": [(_pattern(s), h) for s, h in tree]}

    def _locked(self, fn):
        def run(params):
            with self._lock:
                self._poll_sweep()
                return fn(params)

        return run

    # ------------------------------------------------------------------ handlers
    def _cls(self, params: str) -> None:
        self._errors.clear()
        self._st.oper_event = 0

    def _wait_opc(self, params: str) -> str:
        with self._lock:
            until = self._st.sweeping_until
        if until is not None:
            delay = until - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with self._lock:
            self._poll_sweep()
        return "1"

    def _wavelength(self, params: str, lo: float, hi: float) -> float:
        value = _number(params, _UNITS)
        if not lo - 1e-15 <= value <= hi + 1e-15:
            raise _ScpiError(-222, "Data out of range")
        return value

    def _set_start(self, params: str) -> None:
        v = self._wavelength(params, _WL_MIN, _WL_MAX)
        self._st.start_m = v
        self._st.stop_m = max(self._st.stop_m, v)

    def _set_stop(self, params: str) -> None:
        v = self._wavelength(params, _WL_MIN, _WL_MAX)
        self._st.stop_m = v
        self._st.start_m = min(self._st.start_m, v)

    def _set_center(self, params: str) -> None:
        c = self._wavelength(params, _WL_MIN, _WL_MAX)
        half = (self._st.stop_m - self._st.start_m) / 2
        if c - half < _WL_MIN - 1e-15 or c + half > _WL_MAX + 1e-15:
            raise _ScpiError(-222, "Data out of range")
        self._st.start_m, self._st.stop_m = c - half, c + half

    def _set_span(self, params: str) -> None:
        span = self._wavelength(params, 0.0, _SPAN_MAX)
        c = (self._st.start_m + self._st.stop_m) / 2
        if c - span / 2 < _WL_MIN - 1e-15 or c + span / 2 > _WL_MAX + 1e-15:
            raise _ScpiError(-222, "Data out of range")
        self._st.start_m, self._st.stop_m = c - span / 2, c + span / 2

    def _set_points(self, params: str) -> None:
        v = _number(params, {"": 1.0})
        if v != int(v):
            raise _ScpiError(-224, "Illegal parameter value")
        if not 101 <= v <= 50001:
            raise _ScpiError(-222, "Data out of range")
        self._st.points = int(v)

    def _set_resolution(self, params: str) -> None:
        v = _number(params, _UNITS)
        if not 0.01e-9 <= v <= 2.0e-9 + 1e-15:
            raise _ScpiError(-222, "Data out of range")
        self._st.resolution_m = float(_RESOLUTIONS_M[np.argmin(np.abs(np.log(_RESOLUTIONS_M / v)))])

    def _set_sense(self, params: str) -> None:
        self._st.sense = _choice(params, {name: i for i, name in enumerate(_SENSE)}, numeric=range(7))

    def _set_smode(self, params: str) -> None:
        _choice(params, {"SINGLE": 1, "SING": 1}, numeric=(1,))

    def _set_format(self, params: str) -> None:
        p = params.replace(" ", "").upper()
        table = {"ASCII": "ASCII", "ASC": "ASCII", "REAL": "REAL,64", "REAL,64": "REAL,64", "REAL,32": "REAL,32"}
        if not p:
            raise _ScpiError(-109, "Missing parameter")
        if p not in table:
            raise _ScpiError(-224, "Illegal parameter value")
        self._st.fmt = table[p]

    def _set_spacing(self, params: str) -> None:
        table = {"LOGARITHMIC": 0, "LOG": 0, "LINEAR": 1, "LIN": 1}
        self._st.linear = bool(_choice(params, table, numeric=(0, 1)))

    def _initiate(self, params: str) -> None:
        st = self._st
        x = self._axis()
        power, _saturated = self.bench.shot(x, st.resolution_m)
        self._pending = (x, power)
        st.sweeping_until = time.monotonic() + self.sweep_s
        self._poll_sweep()  # a zero sweep time completes at once

    def _abort(self, params: str) -> None:
        self._pending = None
        self._st.sweeping_until = None

    def _read_oper_event(self, params: str) -> str:
        value, self._st.oper_event = self._st.oper_event, 0
        return str(value)

    def _next_error(self, params: str) -> str:
        if not self._errors:
            return '0,"No error"'
        code, message = self._errors.popleft()
        return f'{code},"{message}"'

    @staticmethod
    def _trace_name(params: str) -> bool:
        name = params.strip().upper()
        if not name:
            raise _ScpiError(-109, "Missing parameter")
        if name != "TRA":
            raise _ScpiError(-224, "Illegal parameter value")
        return True

    def _trace_data(self, params: str, axis: str) -> bytes:
        self._trace_name(params)
        if axis == "X":
            values = self._trace_x
        elif self._st.linear:
            values = self._trace_w
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                dbm = 10.0 * np.log10(self._trace_w / 1e-3)
            values = np.where(self._trace_w > 0, np.maximum(dbm, _DBM_FLOOR), _DBM_FLOOR)
        fmt = self._st.fmt
        if fmt == "ASCII":
            return ",".join(map(_fmt, values.tolist())).encode()
        payload = values.astype("<f4" if fmt == "REAL,32" else "<f8").tobytes()
        size = str(len(payload)).encode()
        return b"#" + str(len(size)).encode() + size + payload


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


def _choice(params: str, names: dict, numeric=()) -> int:
    p = params.strip().upper()
    if not p:
        raise _ScpiError(-109, "Missing parameter")
    if p in names:
        return names[p]
    try:
        v = int(p)
    except ValueError:
        raise _ScpiError(-224, "Illegal parameter value") from None
    if v not in numeric:
        raise _ScpiError(-224, "Illegal parameter value")
    return v


# ---------------------------------------------------------------------- socket server
class _TCPServer(TrackedConnections, socketserver.ThreadingTCPServer):
    pass


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_OPEN_RE = re.compile(r'^OPEN\s+"?([^"]*)"?\s*$', re.IGNORECASE)


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        owner: AQ6370Emulator = self.server.owner
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        authed = not owner.require_login
        awaiting_password = False
        buf = b""
        try:
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > _MAX_LINE:
                        return
                    if _QUICKACK is not None:  # ACK at once: a client's next small write is not held
                        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # back by Nagle + delayed ACK
                    chunk = sock.recv(65536)
                    if not chunk:
                        return  # client gone; a partial line is never executed
                    buf += chunk
                    continue
                raw, buf = buf[:nl], buf[nl + 1 :]
                line = raw.rstrip(b"\r").decode("latin-1").strip()
                if awaiting_password:
                    awaiting_password = False
                    if owner.password is not None and line != owner.password:
                        sock.sendall(b"ERROR\n")
                        return
                    authed = True
                    sock.sendall(b"ready\n")
                    continue
                if _OPEN_RE.match(line):
                    awaiting_password = True
                    sock.sendall(b"AUTHENTICATE CRAM-MD5.\n")
                    continue
                if not authed:
                    return  # commands before login: no reply, no execution, connection closed
                if line.upper() == "CLOSE":
                    return
                if not line:
                    continue
                reply = owner.execute_line(line)
                if reply is not None:
                    sock.sendall(reply)
        except (ConnectionError, OSError):
            return


# the connection handler is defined after the emulator it serves
AQ6370Emulator.server_class = _TCPServer
AQ6370Emulator.handler_class = _Connection
