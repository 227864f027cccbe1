"""WaveShaper-style REST emulator (stdlib ``http.server``), driving a shared `SHGBench`.

Endpoints (no authentication, like the real unit; bind 127.0.0.1):

- ``GET /waveshaper/devinfo`` -> JSON ``{model, sno, ver, startfreq, stopfreq, ip, portcount, rc, rctext}``.
- ``GET /waveshaper/getprofile`` -> the current WSP text (``text/plain``): every 0.001 THz grid point
  from startfreq to stopfreq, ``"%.3f\\t%.3f\\t%.6f\\t%d"`` (freq THz, attn dB, phase rad, port).
  Points a profile did not list read back as ``60.000 0.000000 0`` (blocked).
- ``POST /waveshaper/loadprofile`` with JSON ``{"type": "wsp"|"blockall"|"transmit", "wsp": TEXT,
  "port": n}`` -> JSON ``{"rc", "rctext", "sno"}``; ``rc == 0`` on success. Errors are answered with
  HTTP 200 and the vendor's rc codes, checked in this order (first failure wins):

  ======  ===================  ==========================================================
  rc      name                 when
  ======  ===================  ==========================================================
  -1      WS_ERROR             body is not valid JSON / not an object / bad field types
  -40     WS_NOT_SUPPORTED     unknown ``type``
  -28     WS_FILE_TOOLARGE     body larger than 8 MiB
  -32     WS_INVALIDPROFILE    a WSP line without 4 numeric fields, non-integer port,
                               non-finite phase, or no lines at all
  -30     WS_INVALIDFREQ       frequency outside [startfreq, stopfreq], first line off the
                               0.001 THz grid, or frequencies not strictly increasing
  -33     WS_INVALIDSPACING    a line not a whole number of 0.001 THz steps after the previous
                               one (vendor: "frequencies not incremented in 0.001 THz step")
  -31     WS_INVALIDATTN       attenuation negative, NaN, inf or > 60 dB
  -29     WS_INVALIDPORT       port outside 0..portcount (``transmit``: outside 1..portcount)
  -34     WS_NARROWBANDWIDTH   a run of adjacent grid points routed to one port (!= 0) that is
                               narrower than 0.010 THz (fewer than 10 points)
  ======  ===================  ==========================================================

  Frequencies not listed are blocked; attenuation above 40 dB or port 0 blocks the light.
  ``transmit`` = every grid point at 0 dB to ``port`` (default 1); ``blockall`` = all blocked.
  Unknown paths answer 404, wrong methods 405 (JSON bodies with rc -1).

Timing: with ``settle_s > 0`` a successful load sleeps until ``t_receive + settle_s`` (a deadline,
so handler CPU time is not added on top); the new profile reaches the light path (and
``getprofile``) when the reply is sent. A fresh emulator starts with ``transmit`` applied.
"""
from __future__ import annotations

import io
import json
import threading
import time
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .serving import Served, TrackedConnections
from .shg import SHGBench

__all__ = ["WaveShaperEmulator", "RC_NAMES"]

WS_SUCCESS = 0
WS_ERROR = -1
WS_FILE_TOOLARGE = -28
WS_INVALIDPORT = -29
WS_INVALIDFREQ = -30
WS_INVALIDATTN = -31
WS_INVALIDPROFILE = -32
WS_INVALIDSPACING = -33
WS_NARROWBANDWIDTH = -34
WS_NOT_SUPPORTED = -40

RC_NAMES = {
    WS_SUCCESS: "OK",
    WS_ERROR: "WS_ERROR",
    WS_FILE_TOOLARGE: "WS_FILE_TOOLARGE",
    WS_INVALIDPORT: "WS_INVALIDPORT",
    WS_INVALIDFREQ: "WS_INVALIDFREQ",
    WS_INVALIDATTN: "WS_INVALIDATTN",
    WS_INVALIDPROFILE: "WS_INVALIDPROFILE",
    WS_INVALIDSPACING: "WS_INVALIDSPACING",
    WS_NARROWBANDWIDTH: "WS_NARROWBANDWIDTH",
    WS_NOT_SUPPORTED: "WS_NOT_SUPPORTED",
}

_STEP_THZ = 0.001
_TOL_THZ = 1e-6
_MAX_BODY = 8 << 20
_MAX_ATTN_DB = 60.0
_BLOCK_ATTN_DB = 40.0
_MIN_BAND_POINTS = 10  # 0.010 THz on the 0.001 THz grid


class _ProfileError(Exception):
    def __init__(self, rc: int, detail: str):
        super().__init__(detail)
        self.rc = rc
        self.detail = detail


class _Server(TrackedConnections, ThreadingHTTPServer):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "WaveShaperSim/1.0"
    timeout = 60  # idle keep-alive connections are dropped after a minute
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def log_message(self, format, *args):  # noqa: A002 - quiet by default
        if self.server.owner.verbose:
            super().log_message(format, *args)

    # -------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _rc(self, rc: int, detail: str = "", status: int = HTTPStatus.OK) -> None:
        text = RC_NAMES.get(rc, str(rc)) + (f": {detail}" if detail else "")
        self._json({"rc": rc, "rctext": text, "sno": self.server.owner.sno}, status)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    # -------------------------------------------------------------- methods
    def do_GET(self):  # noqa: N802
        owner = self.server.owner
        path = self._path()
        try:
            if path == "/waveshaper/devinfo":
                self._json(owner.devinfo())
            elif path == "/waveshaper/getprofile":
                self._send(HTTPStatus.OK, owner.profile_text().encode(), "text/plain")
            elif path == "/waveshaper/loadprofile":
                self._rc(WS_ERROR, "use POST", HTTPStatus.METHOD_NOT_ALLOWED)
            else:
                self._rc(WS_ERROR, f"no such resource {path!r}", HTTPStatus.NOT_FOUND)
        except (ConnectionError, OSError):
            self.close_connection = True

    def do_POST(self):  # noqa: N802
        t_receive = time.monotonic()
        owner = self.server.owner
        path = self._path()
        try:
            length = self._content_length()
            if length is None:
                return
            body = self.rfile.read(length) if length else b""
            if path != "/waveshaper/loadprofile":
                status = (
                    HTTPStatus.METHOD_NOT_ALLOWED
                    if path in ("/waveshaper/devinfo", "/waveshaper/getprofile")
                    else HTTPStatus.NOT_FOUND
                )
                self._rc(WS_ERROR, f"no POST on {path!r}", status)
                return
            rc, detail = owner.load_request(body, t_receive)
            self._rc(rc, detail)
        except (ConnectionError, OSError):
            self.close_connection = True
        except Exception as exc:  # never let a request kill the server
            self.close_connection = True
            try:
                self._rc(WS_ERROR, f"internal error: {type(exc).__name__}", HTTPStatus.INTERNAL_SERVER_ERROR)
            except OSError:
                pass

    def _content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else 0
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._rc(WS_ERROR, "bad Content-Length")
            return None
        if length > _MAX_BODY:
            self.close_connection = True  # the body is not read: drop the connection after replying
            self._rc(WS_FILE_TOOLARGE, f"body of {length} bytes exceeds {_MAX_BODY}")
            return None
        return length


class WaveShaperEmulator(Served):
    """A WaveShaper REST server on ``host:port`` (port 0 picks a free one) shaping ``bench``'s light."""

    thread_name = "waveshaper-sim"
    server_class = _Server
    handler_class = _Handler

    def __init__(
        self,
        bench: SHGBench | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        settle_s: float = 0.0,
        startfreq: float = 191.250,
        stopfreq: float = 196.275,
        portcount: int = 1,
        model: str = "WS-1000S-SIM",
        sno: str = "SIM000001",
        ver: str = "1.0.0-sim",
        verbose: bool = False,
    ):
        if settle_s < 0 or portcount < 1 or not startfreq < stopfreq:
            raise ValueError("need settle_s >= 0, portcount >= 1, startfreq < stopfreq")
        self.bench = bench if bench is not None else SHGBench()
        self.host, self._port = host, int(port)
        self.settle_s = float(settle_s)
        self.startfreq, self.stopfreq = float(startfreq), float(stopfreq)
        self.portcount = int(portcount)
        self.model, self.sno, self.ver = model, sno, ver
        self.verbose = verbose
        n = int(round((self.stopfreq - self.startfreq) / _STEP_THZ)) + 1
        self.freq_thz = np.round(self.startfreq + np.arange(n) * _STEP_THZ, 3)
        self._attn = np.zeros(n)
        self._phase = np.zeros(n)
        self._port_of = np.ones(n, dtype=np.int64)
        self._apply_lock = threading.Lock()
        self._text: str | None = None
        self.loads = 0  #: successful loads so far
        self._apply(self._attn, self._phase, self._port_of)

    # -------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    # -------------------------------------------------------------- state
    def devinfo(self) -> dict:
        return {
            "model": self.model,
            "sno": self.sno,
            "ver": self.ver,
            "startfreq": self.startfreq,
            "stopfreq": self.stopfreq,
            "ip": self.host,
            "portcount": self.portcount,
            "rc": WS_SUCCESS,
            "rctext": "OK",
        }

    def profile(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(freq THz, attn dB, phase rad, port) on the full grid, as ``getprofile`` reports it."""
        with self._apply_lock:
            return self.freq_thz.copy(), self._attn.copy(), self._phase.copy(), self._port_of.copy()

    def profile_text(self) -> str:
        with self._apply_lock:
            if self._text is None:
                cols = (self.freq_thz.tolist(), self._attn.tolist(), self._phase.tolist(), self._port_of.tolist())
                self._text = "".join(map("%.3f\t%.3f\t%.6f\t%d\n".__mod__, zip(*cols, strict=True)))
            return self._text

    def _apply(self, attn: np.ndarray, phase: np.ndarray, port: np.ndarray) -> None:
        with self._apply_lock:
            self._attn, self._phase, self._port_of = attn, phase, port
            self._text = None  # getprofile text, formatted on demand
            blocked = (port == 0) | (attn > _BLOCK_ATTN_DB)
            self.bench.set_mask_profile(self.freq_thz, np.where(blocked, np.inf, attn), phase)

    # -------------------------------------------------------------- loadprofile
    def load_request(self, body: bytes, t_receive: float | None = None) -> tuple[int, str]:
        """Validate and apply one ``loadprofile`` body; returns (rc, detail)."""
        t_receive = time.monotonic() if t_receive is None else t_receive
        try:
            req = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return WS_ERROR, "body is not valid JSON"
        if not isinstance(req, dict):
            return WS_ERROR, "body must be a JSON object"
        kind = req.get("type")
        if not isinstance(kind, str):
            return WS_ERROR, "missing or non-string 'type'"
        try:
            if kind.lower() == "wsp":
                text = req.get("wsp")
                if not isinstance(text, str):
                    return WS_ERROR, "'wsp' must be a string"
                new = self._parse_wsp(text)
            elif kind.lower() == "transmit":
                port = req.get("port", 1)
                if isinstance(port, bool) or not isinstance(port, (int, float)) or port != int(port):
                    return WS_INVALIDPORT, f"port {port!r} is not an integer"
                if not 1 <= int(port) <= self.portcount:
                    return WS_INVALIDPORT, f"port {port} outside 1..{self.portcount}"
                n = self.freq_thz.size
                new = (np.zeros(n), np.zeros(n), np.full(n, int(port), dtype=np.int64))
            elif kind.lower() == "blockall":
                n = self.freq_thz.size
                new = (np.full(n, _MAX_ATTN_DB), np.zeros(n), np.zeros(n, dtype=np.int64))
            else:
                return WS_NOT_SUPPORTED, f"unknown profile type {kind!r}"
        except _ProfileError as err:
            return err.rc, err.detail
        delay = t_receive + self.settle_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._apply(*new)
        self.loads += 1
        return WS_SUCCESS, ""

    def _parse_wsp(self, text: str):
        """WSP text -> full-grid (attn, phase, port); raises `_ProfileError`. The fast path parses
        with numpy's C reader; when anything is wrong the line-by-line path names the line."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = np.loadtxt(io.StringIO(text), dtype=float, comments="#", ndmin=2)
        except ValueError:
            arr = None
        if arr is not None and arr.ndim == 2 and arr.shape[0] > 0 and arr.shape[1] == 4:
            try:
                return self._validate(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], None)
            except _ProfileError:
                pass  # redo it line by line for a message naming the line
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 4:
                raise _ProfileError(WS_INVALIDPROFILE, f"line {lineno}: expected 4 fields, got {len(fields)}")
            try:
                rows.append((lineno, *map(float, fields)))
            except ValueError:
                raise _ProfileError(WS_INVALIDPROFILE, f"line {lineno}: non-numeric field") from None
        if not rows:
            raise _ProfileError(WS_INVALIDPROFILE, "empty profile")
        arr = np.array(rows)
        return self._validate(arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4], arr[:, 0].astype(np.int64))

    def _validate(self, f, a, p, qf, lines):
        """Check a parsed profile in the documented order; returns full-grid arrays."""

        def where(i) -> str:
            return f"line {lines[i]}" if lines is not None else f"row {i + 1}"

        bad = np.flatnonzero(~np.isfinite(qf) | (qf != np.round(qf)))
        if bad.size:
            raise _ProfileError(WS_INVALIDPROFILE, f"{where(bad[0])}: port {qf[bad[0]]} is not an integer")
        bad = np.flatnonzero(~np.isfinite(p))
        if bad.size:
            raise _ProfileError(WS_INVALIDPROFILE, f"{where(bad[0])}: phase {p[bad[0]]} is not finite")
        q = qf.astype(np.int64)
        # frequencies: in band, first on the grid, strictly increasing, whole 0.001 THz steps
        bad = np.flatnonzero(~np.isfinite(f) | (f < self.startfreq - _TOL_THZ) | (f > self.stopfreq + _TOL_THZ))
        if bad.size:
            i = bad[0]
            raise _ProfileError(
                WS_INVALIDFREQ, f"{where(i)}: {f[i]} THz outside {self.startfreq}-{self.stopfreq} THz"
            )
        j0 = (f[0] - self.startfreq) / _STEP_THZ
        if abs(j0 - round(j0)) * _STEP_THZ > _TOL_THZ:
            raise _ProfileError(WS_INVALIDFREQ, f"{where(0)}: {f[0]} THz is not on the 0.001 THz grid")
        df = np.diff(f)
        bad = np.flatnonzero(df <= _TOL_THZ)
        if bad.size:
            raise _ProfileError(WS_INVALIDFREQ, f"{where(bad[0] + 1)}: frequencies not strictly increasing")
        steps = df / _STEP_THZ
        bad = np.flatnonzero(np.abs(steps - np.rint(steps)) * _STEP_THZ > _TOL_THZ)
        if bad.size:
            i = bad[0] + 1
            raise _ProfileError(
                WS_INVALIDSPACING, f"{where(i)}: step {df[i - 1]:.6f} THz is not a multiple of 0.001 THz"
            )
        bad = np.flatnonzero(~np.isfinite(a) | (a < 0) | (a > _MAX_ATTN_DB))
        if bad.size:
            i = bad[0]
            raise _ProfileError(WS_INVALIDATTN, f"{where(i)}: attenuation {a[i]} outside 0..60 dB")
        bad = np.flatnonzero((q < 0) | (q > self.portcount))
        if bad.size:
            i = bad[0]
            raise _ProfileError(WS_INVALIDPORT, f"{where(i)}: port {q[i]} outside 0..{self.portcount}")
        # bandwidth of each run of adjacent grid points routed to one port
        j = np.rint((f - self.startfreq) / _STEP_THZ).astype(np.int64)
        brk = np.flatnonzero((np.diff(j) != 1) | (np.diff(q) != 0)) + 1
        starts = np.concatenate([[0], brk])
        ends = np.concatenate([brk, [j.size]])
        narrow = np.flatnonzero((q[starts] != 0) & (ends - starts < _MIN_BAND_POINTS))
        if narrow.size:
            s, e = starts[narrow[0]], ends[narrow[0]]
            raise _ProfileError(
                WS_NARROWBANDWIDTH,
                f"{where(s)}: {(e - s) * _STEP_THZ:.3f} THz to port {q[s]} is narrower than 0.010 THz",
            )
        n = self.freq_thz.size
        attn = np.full(n, _MAX_ATTN_DB)
        phase = np.zeros(n)
        port = np.zeros(n, dtype=np.int64)
        attn[j], phase[j], port[j] = a, p, q
        return attn, phase, port
