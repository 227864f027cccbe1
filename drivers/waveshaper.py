"""Finisar / II-VI / Coherent WaveShaper over its REST API, and the shaper as an `Actuator`.

Wire protocol (HTTP, no authentication; keep the shaper on an instrument-only network)::

    GET  /waveshaper/devinfo      -> JSON {model, sno, ver, startfreq, stopfreq (THz), ip, portcount, rc?, rctext?}
    GET  /waveshaper/getprofile   -> WSP text (one ``freq_THz  attn_dB  phase_rad  port`` line per grid point)
    POST /waveshaper/loadprofile  JSON {"type": "wsp", "wsp": TEXT, "port": 1}  -> {rc, rctext, sno}
                                  JSON {"type": "blockall"} / {"type": "transmit", "port": n}

``rc == 0`` is success; the vendor codes -30 (invalid frequency), -31 (invalid attenuation),
-33 (invalid spacing) and -34 (band too narrow) become the matching `WaveShaperProfileError`
subclass, any other code a generic `WaveShaperError`; all carry ``rc`` and ``rctext``.

Three layers, smallest first:

- pure codec functions: `format_wsp`, `parse_wsp`, `validate_profile` (no I/O);
- `WaveShaperClient`: one ``requests.Session`` (kept alive, environment proxies ignored), one
  method per REST call, errors turned into `WaveShaperError` subclasses naming the URL;
- `ShaperActuator`: the `labpnn.drivers.roles.Actuator` role: ``n_controls`` attenuation channels
  tiling a frequency band. The profile text is built from a template made once per
  configuration, so an ``apply`` costs a few tens of microseconds before the upload.

Imports nothing of labpnn except the roles.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import requests

from .roles import InstrumentError

__all__ = [
    "ATTN_BLOCK_DB",
    "GRID_THZ",
    "MIN_BAND_THZ",
    "InvalidAttenuationError",
    "InvalidFrequencyError",
    "InvalidSpacingError",
    "NarrowBandwidthError",
    "ShaperActuator",
    "WaveShaperClient",
    "WaveShaperConnectionError",
    "WaveShaperError",
    "WaveShaperProfileError",
    "WspProfile",
    "error_for_rc",
    "format_wsp",
    "parse_wsp",
    "validate_profile",
]

#: The WaveShaper's frequency grid: every WSP line sits on a multiple of 1 GHz.
GRID_THZ = 0.001
#: Narrowest band that may be routed to one port.
MIN_BAND_THZ = 0.010
#: Largest attenuation a profile line may carry (the shaper blocks from ~40 dB up).
ATTN_MAX_DB = 60.0
#: What a blocked grid point gets: attenuation 60 dB *and* port 0.
ATTN_BLOCK_DB = 60.0

_GRID_TOL = 1e-6  # in units of the grid (1 GHz): a frequency within 1 kHz of a grid point is on it


# -- errors ------------------------------------------------------------------------------------
class WaveShaperError(InstrumentError):
    """The WaveShaper failed, refused a request, or could not be reached.

    ``rc``/``rctext`` are the vendor return code and text when the shaper sent one (``rc`` is the
    equivalent vendor code, and ``rctext`` our message, when the client refused a profile before
    uploading it: see ``client_side``); ``url`` is the shaper's base URL when known.
    """

    code: ClassVar[int | None] = None  #: the vendor code this class stands for

    def __init__(self, message: str, *, rc: int | None = None, rctext: str = "", url: str = "",
                 client_side: bool = False):
        super().__init__(message)
        self.rc = rc if rc is not None else self.code
        self.rctext = rctext or message
        self.url = url
        self.client_side = client_side


class WaveShaperConnectionError(WaveShaperError):
    """The shaper did not answer: connection refused, unreachable, timed out."""


class WaveShaperProfileError(WaveShaperError, ValueError):
    """A profile the shaper cannot take (also a ``ValueError``: nothing was applied)."""


class InvalidFrequencyError(WaveShaperProfileError):
    """Frequencies outside [startfreq, stopfreq], or not strictly increasing (WS_INVALIDFREQ)."""

    code = -30


class InvalidAttenuationError(WaveShaperProfileError):
    """Attenuation not finite or outside 0..60 dB (WS_INVALIDATTN)."""

    code = -31


class InvalidSpacingError(WaveShaperProfileError):
    """Frequencies off the 0.001 THz grid (WS_INVALIDSPACING)."""

    code = -33


class NarrowBandwidthError(WaveShaperProfileError):
    """A band routed to a port is narrower than 0.010 THz (WS_NARROWBANDWIDTH)."""

    code = -34


_RC_ERRORS: dict[int, type[WaveShaperError]] = {
    cls.code: cls for cls in (InvalidFrequencyError, InvalidAttenuationError, InvalidSpacingError,
                              NarrowBandwidthError)
}


def error_for_rc(rc: int, rctext: str, *, url: str = "", what: str = "") -> WaveShaperError:
    """The exception for a vendor return code ``rc != 0`` (a generic `WaveShaperError` if unknown)."""
    cls = _RC_ERRORS.get(rc, WaveShaperError)
    where = f"WaveShaper at {url}" if url else "WaveShaper"
    return cls(f"{where} refused {what or 'the request'}: rc={rc} {rctext}".rstrip(),
               rc=rc, rctext=rctext, url=url)


# -- pure codec ----------------------------------------------------------------------------------
class WspProfile(NamedTuple):
    """A WSP profile as arrays of equal length."""

    freq_thz: np.ndarray  #: float64, on the 0.001 THz grid, increasing
    attn_db: np.ndarray  #: float64
    phase_rad: np.ndarray  #: float64
    port: np.ndarray  #: int64, 0 = blocked


def _as_profile(freq, attn, phase, port) -> WspProfile:
    freq = np.asarray(freq, np.float64).reshape(-1)
    n = freq.size
    attn = np.broadcast_to(np.asarray(attn, np.float64), (n,)) if np.ndim(attn) == 0 else \
        np.asarray(attn, np.float64).reshape(-1)
    phase = np.zeros(n) if phase is None else (
        np.broadcast_to(np.asarray(phase, np.float64), (n,)) if np.ndim(phase) == 0
        else np.asarray(phase, np.float64).reshape(-1))
    port_arr = np.asarray(port)
    if port_arr.dtype.kind == "f":
        if not np.all(np.isfinite(port_arr)) or np.any(port_arr != np.rint(port_arr)):
            raise WaveShaperProfileError(f"ports must be whole numbers, got {port!r}", client_side=True)
    elif port_arr.dtype.kind not in "iub":
        raise WaveShaperProfileError(f"ports must be whole numbers, got {port!r}", client_side=True)
    port_arr = port_arr.astype(np.int64)
    port_arr = np.broadcast_to(port_arr, (n,)) if port_arr.ndim == 0 else port_arr.reshape(-1)
    sizes = {"freq": n, "attn": attn.size, "phase": phase.size, "port": port_arr.size}
    if len(set(sizes.values())) != 1:
        raise WaveShaperProfileError(f"profile arrays differ in length: {sizes}", client_side=True)
    return WspProfile(freq, attn, phase, port_arr)


def format_wsp(freq_thz, attn_db, phase_rad=None, port=1) -> str:
    """WSP text: one ``f"{freq:.3f}\\t{attn:.3f}\\t{phase:.3f}\\t{port:d}\\n"`` line per point.

    ``attn_db``, ``phase_rad`` (default 0) and ``port`` may be scalars or arrays as long as
    ``freq_thz``. Frequencies are written on the 0.001 THz grid (rounded to it: call
    `validate_profile` first to refuse off-grid input). No validation here.
    """
    p = _as_profile(freq_thz, attn_db, phase_rad, port)
    if p.freq_thz.size == 0:
        return ""
    freq = np.rint(p.freq_thz / GRID_THZ) * GRID_THZ
    # -0.0 would print as "-0.000"; the shaper's own files never carry a sign on zero.
    attn = p.attn_db + 0.0
    phase = p.phase_rad + 0.0
    fields = np.empty(4 * freq.size, dtype=object)
    fields[0::4] = freq.tolist()
    fields[1::4] = attn.tolist()
    fields[2::4] = phase.tolist()
    fields[3::4] = p.port.tolist()
    return ("%.3f\t%.3f\t%.3f\t%d\n" * freq.size) % tuple(fields)


def parse_wsp(text: str) -> WspProfile:
    """Parse WSP text (tab- or space-separated ``freq attn phase port`` lines).

    Blank lines and lines starting with ``#`` or ``;`` are skipped. A malformed line raises
    `WaveShaperProfileError` naming its number.
    """
    rows: list[tuple[float, float, float, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        parts = stripped.split()
        try:
            if len(parts) != 4:
                raise ValueError(f"expected 4 fields, got {len(parts)}")
            port_f = float(parts[3])
            if port_f != int(port_f):
                raise ValueError(f"port {parts[3]!r} is not a whole number")
            rows.append((float(parts[0]), float(parts[1]), float(parts[2]), int(port_f)))
        except ValueError as exc:
            raise WaveShaperProfileError(f"WSP line {number} {line!r}: {exc}") from None
    if not rows:
        empty = np.empty(0)
        return WspProfile(empty, empty.copy(), empty.copy(), np.empty(0, np.int64))
    freq, attn, phase, port = zip(*rows, strict=True)
    return WspProfile(np.array(freq), np.array(attn), np.array(phase), np.array(port, np.int64))


def validate_profile(freq_thz, attn_db, phase_rad=None, port=1, *, startfreq: float | None = None,
                     stopfreq: float | None = None, portcount: int | None = None) -> WspProfile:
    """Check a profile the way the shaper would, before uploading it; return it as arrays.

    Raises (all `WaveShaperProfileError`, with the vendor code the shaper would have answered):
    `InvalidSpacingError` for a frequency off the 0.001 THz grid; `InvalidFrequencyError` for
    frequencies not strictly increasing or outside [startfreq, stopfreq] (when given);
    `InvalidAttenuationError` for attenuation not finite or outside 0..60 dB; `NarrowBandwidthError`
    for a run of consecutive lines routed to one port (port != 0) whose extent ``last - first``
    is under 0.010 THz; a plain `WaveShaperProfileError` for a non-finite phase or a port outside
    0..portcount.

    The band-width rule is read conservatively: a run of k grid points spans (k - 1) GHz, so it
    needs at least 11 points.
    """
    p = _as_profile(freq_thz, attn_db, phase_rad, port)
    f = p.freq_thz
    if f.size == 0:
        raise WaveShaperProfileError("empty profile", client_side=True)
    if not np.all(np.isfinite(f)):
        raise InvalidFrequencyError("frequencies must be finite", client_side=True)
    ghz = f / GRID_THZ
    off = np.abs(ghz - np.rint(ghz)) > _GRID_TOL
    if off.any():
        i = int(np.argmax(off))
        raise InvalidSpacingError(f"frequency {f[i]!r} THz (line {i + 1}) is not on the 0.001 THz grid",
                                  client_side=True)
    ghz = np.rint(ghz).astype(np.int64)
    steps = np.diff(ghz)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0)) + 1
        raise InvalidFrequencyError(
            f"frequencies must be strictly increasing: line {i + 1} ({f[i]:.3f} THz) follows {f[i - 1]:.3f} THz",
            client_side=True)
    if startfreq is not None and ghz[0] < round(startfreq / GRID_THZ - _GRID_TOL):
        raise InvalidFrequencyError(
            f"frequency {f[0]:.3f} THz is below the shaper's start frequency {startfreq:.3f} THz",
            client_side=True)
    if stopfreq is not None and ghz[-1] > round(stopfreq / GRID_THZ + _GRID_TOL):
        raise InvalidFrequencyError(
            f"frequency {f[-1]:.3f} THz is above the shaper's stop frequency {stopfreq:.3f} THz",
            client_side=True)
    a = p.attn_db
    bad = ~np.isfinite(a) | (a < 0) | (a > ATTN_MAX_DB)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidAttenuationError(
            f"attenuation {a[i]!r} dB at {f[i]:.3f} THz is outside 0..{ATTN_MAX_DB:g} dB", client_side=True)
    if not np.all(np.isfinite(p.phase_rad)):
        i = int(np.argmax(~np.isfinite(p.phase_rad)))
        raise WaveShaperProfileError(f"phase at {f[i]:.3f} THz is not finite", client_side=True)
    ports = p.port
    high = portcount if portcount is not None else np.iinfo(np.int64).max
    bad = (ports < 0) | (ports > high)
    if bad.any():
        i = int(np.argmax(bad))
        raise WaveShaperProfileError(f"port {ports[i]} at {f[i]:.3f} THz is outside 0..{portcount}",
                                     client_side=True)
    # runs of consecutive lines with the same port
    starts = np.flatnonzero(np.r_[True, ports[1:] != ports[:-1]])
    ends = np.r_[starts[1:], ports.size] - 1
    min_ghz = round(MIN_BAND_THZ / GRID_THZ)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        if ports[s] != 0 and ghz[e] - ghz[s] < min_ghz:
            raise NarrowBandwidthError(
                f"band {f[s]:.3f}..{f[e]:.3f} THz routed to port {ports[s]} is narrower than "
                f"{MIN_BAND_THZ:.3f} THz", client_side=True)
    return p


# -- client --------------------------------------------------------------------------------------
class WaveShaperClient:
    """A WaveShaper's REST API at ``url`` (``"http://192.168.1.22"`` or just the host).

    One ``requests.Session`` is reused for every call (keep-alive). Environment proxy settings
    are ignored (``trust_env = False``): the shaper sits on the instrument network.
    """

    def __init__(self, url: str, timeout: float = 5.0, *, session: requests.Session | None = None):
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"url: expected the shaper's address, got {url!r}")
        url = url.strip()
        self.url = (url if "://" in url else "http://" + url).rstrip("/")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout: must be a number of seconds > 0, got {timeout!r}")
        self.timeout = float(timeout)
        self._session = session or requests.Session()
        self._session.trust_env = False
        self._devinfo: dict[str, Any] | None = None

    # -- transport
    def _request(self, method: str, path: str, body: dict | None = None) -> requests.Response:
        what = f"{method} {path}"
        try:
            reply = self._session.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.exceptions.Timeout as exc:
            raise WaveShaperConnectionError(
                f"WaveShaper at {self.url} did not answer {what} within {self.timeout:g} s",
                url=self.url) from exc
        except requests.exceptions.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else f"{exc}"
            raise WaveShaperConnectionError(
                f"cannot reach the WaveShaper at {self.url} ({what}): {reason}", url=self.url) from exc
        except requests.RequestException as exc:
            raise WaveShaperError(f"WaveShaper at {self.url}: {what} failed: {exc}", url=self.url) from exc
        if reply.status_code != 200:
            raise WaveShaperError(
                f"WaveShaper at {self.url} answered {what} with HTTP {reply.status_code}: {reply.text[:200]!r}",
                url=self.url)
        return reply

    def _json(self, reply: requests.Response, what: str) -> dict[str, Any]:
        try:
            data = reply.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise WaveShaperError(
                f"WaveShaper at {self.url} answered {what} with something that is not a JSON object: "
                f"{reply.text[:200]!r}", url=self.url)
        rc = data.get("rc", 0)
        if not isinstance(rc, int) or isinstance(rc, bool):
            raise WaveShaperError(f"WaveShaper at {self.url} answered {what} with a bad rc {rc!r}", url=self.url)
        if rc != 0:
            raise error_for_rc(rc, str(data.get("rctext", "")), url=self.url, what=what)
        return data

    def _load(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self._request("POST", "/waveshaper/loadprofile", body), f"loadprofile {body['type']}")

    # -- REST calls
    def devinfo(self) -> dict[str, Any]:
        """``GET /waveshaper/devinfo``: model, sno, ver, startfreq, stopfreq (THz), portcount, ...

        The reply is cached for profile validation (`limits`).
        """
        info = self._json(self._request("GET", "/waveshaper/devinfo"), "devinfo")
        try:
            info["startfreq"] = float(info["startfreq"])
            info["stopfreq"] = float(info["stopfreq"])
            if "portcount" in info:
                info["portcount"] = int(info["portcount"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WaveShaperError(f"WaveShaper at {self.url}: devinfo lacks a usable {exc}: {info!r}",
                                  url=self.url) from None
        self._devinfo = info
        return dict(info)

    def limits(self) -> tuple[float, float, int | None]:
        """(startfreq, stopfreq, portcount) from the cached devinfo (fetched on first use)."""
        info = self._devinfo if self._devinfo is not None else self.devinfo()
        return info["startfreq"], info["stopfreq"], info.get("portcount")

    def get_profile(self) -> WspProfile:
        """``GET /waveshaper/getprofile``: the profile now loaded, parsed."""
        reply = self._request("GET", "/waveshaper/getprofile")
        text = reply.text
        if text.lstrip().startswith("{"):  # some firmware wraps the text in JSON
            text = str(self._json(reply, "getprofile").get("wsp", ""))
        return parse_wsp(text)

    def load_profile(self, freq_thz, attn_db, phase_rad=None, port=1) -> dict[str, Any]:
        """Validate (`validate_profile`, against devinfo) and upload a profile.

        ``POST /waveshaper/loadprofile {"type": "wsp", "wsp": TEXT, "port": P}`` where P is
        ``port`` if it is a scalar, else the first non-zero port of the array (1 if none).
        Returns the reply ``{rc, rctext, sno}``.
        """
        start, stop, portcount = self.limits()
        p = validate_profile(freq_thz, attn_db, phase_rad, port, startfreq=start, stopfreq=stop,
                             portcount=portcount)
        if np.ndim(port) == 0:
            top = int(port)
        else:
            routed = p.port[p.port != 0]
            top = int(routed[0]) if routed.size else 1
        return self.load_wsp(format_wsp(*p), top)

    def load_wsp(self, text: str, port: int = 1) -> dict[str, Any]:
        """Upload WSP text as is (no client-side checks): the fast path for a validated template."""
        return self._load({"type": "wsp", "wsp": text, "port": int(port)})

    def block_all(self) -> dict[str, Any]:
        """``POST /waveshaper/loadprofile {"type": "blockall"}``: block every frequency."""
        return self._load({"type": "blockall"})

    def transmit(self, port: int = 1) -> dict[str, Any]:
        """``POST /waveshaper/loadprofile {"type": "transmit", "port": port}``: pass all, 0 dB."""
        return self._load({"type": "transmit", "port": int(port)})

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        return f"WaveShaperClient({self.url!r})"


# -- actuator ------------------------------------------------------------------------------------
_SETTINGS = ("attn_min_db", "attn_max_db", "attn_resolution_db", "settle_s", "min_attn_db",
             "max_total_transmission")


def _number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{key}: must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{key}: must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise ValueError(f"{key}: must be <= {high:g}, got {value:g}")
    return value


class ShaperActuator:
    """A WaveShaper as an `Actuator`: ``n_controls`` attenuation channels tiling a band.

    Channel ``c`` covers ``[edges[c], edges[c+1])`` (the last one includes its upper edge); by
    default the edges split ``[band_start_thz, band_stop_thz]`` into equal widths, or pass
    ``edges_thz`` (``n_controls + 1`` increasing values). Each channel must hold at least one
    0.001 THz grid point.

    A control ``x`` in [0, 1] sets the whole channel to
    ``attn_db = attn_max_db * (1 - x) + attn_min_db * x`` (x = 1 transmits most), quantised to
    ``attn_resolution_db``; ``apply`` returns the controls that quantised attenuation stands for.
    Grid points outside the band are blocked: attenuation 60 dB *and* port 0. Everything inside
    the band goes to ``port`` with phase 0.

    Safety limits, enforced by `check` on a whole batch (and again by `apply` on its row):
    ``min_attn_db`` — an attenuation floor (one value, or one per channel): x may not ask for
    less attenuation; ``max_total_transmission`` — a cap on the in-band power transmission
    ``sum_c w_c 10**(-attn_c/10)`` with ``w_c`` the channel's share of the band width (1 =
    everything passes at 0 dB).

    ``settle_s`` is how long the rig waits after `apply` before acquiring.
    """

    def __init__(
        self,
        client: WaveShaperClient | str,
        n_controls: int,
        band_start_thz: float | None = None,
        band_stop_thz: float | None = None,
        *,
        edges_thz: Sequence[float] | None = None,
        attn_min_db: float = 0.0,
        attn_max_db: float = 30.0,
        attn_resolution_db: float = 0.01,
        settle_s: float = 0.0,
        min_attn_db: float | Sequence[float] | None = None,
        max_total_transmission: float | None = None,
        port: int = 1,
        name: str = "shaper",
    ):
        self.client = client if isinstance(client, WaveShaperClient) else WaveShaperClient(client)
        self.name = name
        if isinstance(n_controls, bool) or not isinstance(n_controls, (int, np.integer)) or n_controls < 1:
            raise ValueError(f"n_controls: must be a whole number >= 1, got {n_controls!r}")
        self.n_controls = int(n_controls)
        if edges_thz is not None:
            edges = np.asarray(edges_thz, np.float64).reshape(-1)
            if edges.size != self.n_controls + 1:
                raise ValueError(f"edges_thz: need n_controls + 1 = {self.n_controls + 1} edges, got {edges.size}")
            for key, given, edge in (("band_start_thz", band_start_thz, edges[0]),
                                     ("band_stop_thz", band_stop_thz, edges[-1])):
                if given is not None and abs(given - edge) > 1e-9:
                    raise ValueError(f"{key}: {given!r} disagrees with edges_thz ({edge!r})")
        else:
            if band_start_thz is None or band_stop_thz is None:
                raise ValueError("band_start_thz and band_stop_thz are required unless edges_thz is given")
            start = _number("band_start_thz", band_start_thz, 0, low_open=True)
            stop = _number("band_stop_thz", band_stop_thz, 0, low_open=True)
            edges = np.linspace(start, stop, self.n_controls + 1)
        if not np.all(np.isfinite(edges)) or (np.diff(edges) <= 0).any():
            raise ValueError(f"edges_thz: must be finite and strictly increasing, got {edges.tolist()}")
        self.edges_thz = edges
        if isinstance(port, bool) or not isinstance(port, (int, np.integer)) or port < 1:
            raise ValueError(f"port: must be a whole number >= 1, got {port!r}")
        self.port = int(port)
        self._weights = np.diff(edges) / (edges[-1] - edges[0])
        self.attn_min_db = 0.0
        self.attn_max_db = 30.0
        self.attn_resolution_db = 0.01
        self.settle_s = 0.0
        self.min_attn_db: float | list[float] | None = None
        self.max_total_transmission: float | None = None
        self._floor = np.zeros(self.n_controls)
        self._template: _Template | None = None
        self._identity = ""
        self.configure(attn_min_db=attn_min_db, attn_max_db=attn_max_db,
                       attn_resolution_db=attn_resolution_db, settle_s=settle_s,
                       min_attn_db=min_attn_db, max_total_transmission=max_total_transmission)

    # -- Instrument role
    def connect(self) -> None:
        """Read devinfo, lay the channels on the shaper's grid and validate the profile template."""
        info = self.client.devinfo()
        self._identity = f"{info.get('model', '')} {info.get('sno', '')} {info.get('ver', '')}".strip()
        self._template = _Template(self.edges_thz, info["startfreq"], info["stopfreq"],
                                   info.get("portcount"), self.port)

    def close(self) -> None:
        self.client.close()

    def identify(self) -> str:
        """``"model sno ver"`` from devinfo."""
        if not self._identity:
            info = self.client.devinfo()
            self._identity = f"{info.get('model', '')} {info.get('sno', '')} {info.get('ver', '')}".strip()
        return self._identity

    def settings(self) -> dict[str, Any]:
        return {
            "url": self.client.url,
            "n_controls": self.n_controls,
            "edges_thz": self.edges_thz.tolist(),
            "port": self.port,
            "attn_min_db": self.attn_min_db,
            "attn_max_db": self.attn_max_db,
            "attn_resolution_db": self.attn_resolution_db,
            "settle_s": self.settle_s,
            "min_attn_db": self.min_attn_db,
            "max_total_transmission": self.max_total_transmission,
            "blocked_outside_band": {"attn_db": ATTN_BLOCK_DB, "port": 0},
        }

    def configure(self, **settings: Any) -> None:
        """Change any of attn_min_db, attn_max_db, attn_resolution_db, settle_s, min_attn_db,
        max_total_transmission; all validated together, nothing changes on error."""
        for key in settings:
            if key not in _SETTINGS:
                raise ValueError(f"unknown setting {key!r} (have: {', '.join(_SETTINGS)})")
        new = {key: getattr(self, key) for key in _SETTINGS} | settings
        lo = _number("attn_min_db", new["attn_min_db"], 0, ATTN_MAX_DB)
        hi = _number("attn_max_db", new["attn_max_db"], 0, ATTN_MAX_DB)
        if hi <= lo:
            raise ValueError(f"attn_max_db: must be above attn_min_db ({lo:g}), got {hi:g}")
        res = _number("attn_resolution_db", new["attn_resolution_db"], 0, 1.0, low_open=True)
        for key, value in (("attn_min_db", lo), ("attn_max_db", hi)):
            if abs(value / res - round(value / res)) > 1e-6:
                raise ValueError(f"{key}: {value:g} dB is not a multiple of attn_resolution_db={res:g}")
        settle = _number("settle_s", new["settle_s"], 0)
        floor_setting = new["min_attn_db"]
        if floor_setting is None:
            floor = np.zeros(self.n_controls)
        elif np.ndim(floor_setting) == 0:
            floor = np.full(self.n_controls, _number("min_attn_db", floor_setting, 0, ATTN_MAX_DB))
            floor_setting = float(floor_setting)
        else:
            values = list(floor_setting)
            if len(values) != self.n_controls:
                raise ValueError(f"min_attn_db: need one value or {self.n_controls} (one per channel), got {len(values)}")
            floor = np.array([_number(f"min_attn_db[{i}]", v, 0, ATTN_MAX_DB) for i, v in enumerate(values)])
            floor_setting = floor.tolist()
        cap = new["max_total_transmission"]
        if cap is not None:
            cap = _number("max_total_transmission", cap, 0, 1.0, low_open=True)
        self.attn_min_db, self.attn_max_db, self.attn_resolution_db = lo, hi, res
        self.settle_s, self.min_attn_db, self.max_total_transmission = settle, floor_setting, cap
        self._floor = floor

    # -- Actuator role
    def attenuation_db(self, controls: np.ndarray) -> np.ndarray:
        """Quantised attenuation (dB, float64) for controls of any shape (last axis = channels)."""
        x = np.asarray(controls, np.float64)
        attn = self.attn_max_db * (1.0 - x) + self.attn_min_db * x
        return np.rint(attn / self.attn_resolution_db) * self.attn_resolution_db

    def controls_for(self, attn_db: np.ndarray) -> np.ndarray:
        """The controls (float32, in [0, 1]) that stand for attenuations ``attn_db``."""
        x = (self.attn_max_db - np.asarray(attn_db, np.float64)) / (self.attn_max_db - self.attn_min_db)
        return np.clip(x, 0.0, 1.0).astype(np.float32)

    def check(self, controls: np.ndarray) -> None:
        """Raise ``ValueError`` if a row of float32[B, n_controls] is malformed or breaks a limit."""
        batch = np.asarray(controls)
        if batch.ndim == 1:
            batch = batch[None, :]
        if batch.ndim != 2 or batch.shape[1] != self.n_controls:
            raise ValueError(f"controls must have shape (B, {self.n_controls}), got {np.shape(controls)}")
        if batch.dtype.kind not in "fiu":
            raise ValueError(f"controls must be numbers, got dtype {batch.dtype}")
        bad = ~np.isfinite(batch) | (batch < 0) | (batch > 1)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"row {row}, channel {col}: control {batch[row, col]!r} is not a number in [0, 1]")
        if self.min_attn_db is None and self.max_total_transmission is None:
            return
        attn = self.attenuation_db(batch)
        if self.min_attn_db is not None:
            low = attn < self._floor - 1e-9
            if low.any():
                row, col = (int(i) for i in np.argwhere(low)[0])
                raise ValueError(
                    f"row {row}, channel {col}: control {float(batch[row, col]):.4f} asks for "
                    f"{attn[row, col]:.2f} dB, below the floor min_attn_db={self._floor[col]:g} dB")
        if self.max_total_transmission is not None:
            total = (10.0 ** (-attn / 10.0)) @ self._weights
            over = total > self.max_total_transmission + 1e-12
            if over.any():
                row = int(np.argmax(over))
                raise ValueError(
                    f"row {row}: total transmission {total[row]:.4f} exceeds "
                    f"max_total_transmission={self.max_total_transmission:g}")

    def profile(self, controls: np.ndarray) -> tuple[str, np.ndarray]:
        """(WSP text, applied controls) for one row; no I/O. Needs `connect` first."""
        if self._template is None:
            raise WaveShaperError(f"{self.name}: call connect() before applying controls", url=self.client.url)
        row = np.asarray(controls, np.float32).reshape(-1)
        self.check(row)
        attn = self.attenuation_db(row)
        return self._template.render(attn), self.controls_for(attn)

    def apply(self, controls: np.ndarray) -> np.ndarray:
        """Upload the profile for one row; return the controls actually applied (quantised)."""
        text, applied = self.profile(controls)
        self.client.load_wsp(text, self.port)
        return applied

    def safe_state(self) -> None:
        """Block all light (``{"type": "blockall"}``)."""
        self.client.block_all()

    def grid(self) -> WspProfile:
        """The profile's fixed columns (frequency, phase, port; attenuation 0 in band, 60 outside)."""
        if self._template is None:
            raise WaveShaperError(f"{self.name}: call connect() first", url=self.client.url)
        return self._template.grid


class _Template:
    """The WSP text of one band layout with holes for the per-channel attenuation.

    Channel c's lines all carry the same attenuation string A_c, so its text is
    ``A_c.join(pieces[c])``: rendering a profile is n_controls small formats and joins.
    """

    def __init__(self, edges: np.ndarray, startfreq: float, stopfreq: float, portcount: int | None,
                 port: int):
        first = math.ceil(startfreq / GRID_THZ - _GRID_TOL)
        last = math.floor(stopfreq / GRID_THZ + _GRID_TOL)
        ghz = np.arange(first, last + 1, dtype=np.int64)
        freq = ghz * GRID_THZ
        # channel index of every grid point (-1 outside the band); the last edge is inclusive
        edges_ghz = np.asarray(edges) / GRID_THZ
        chan = np.searchsorted(edges_ghz, ghz + _GRID_TOL, side="right") - 1
        chan[np.abs(ghz - edges_ghz[-1]) <= _GRID_TOL] = edges.size - 2
        chan[(ghz < edges_ghz[0] - _GRID_TOL) | (ghz > edges_ghz[-1] + _GRID_TOL)] = -1
        if edges[0] < startfreq - 1e-9 or edges[-1] > stopfreq + 1e-9:
            raise InvalidFrequencyError(
                f"band {edges[0]:.3f}..{edges[-1]:.3f} THz is not inside the shaper's range "
                f"{startfreq:.3f}..{stopfreq:.3f} THz", client_side=True)
        counts = np.bincount(chan[chan >= 0], minlength=edges.size - 1)
        if (counts == 0).any():
            c = int(np.argmax(counts == 0))
            raise ValueError(f"channel {c} ({edges[c]:.4f}..{edges[c + 1]:.4f} THz) holds no 0.001 THz grid point")
        inband = chan >= 0
        ports = np.where(inband, port, 0)
        attn = np.where(inband, 0.0, ATTN_BLOCK_DB)
        self.grid = validate_profile(freq, attn, 0.0, ports, startfreq=startfreq, stopfreq=stopfreq,
                                     portcount=portcount)
        lines = format_wsp(*self.grid).splitlines(keepends=True)
        lo, hi = int(np.argmax(inband)), int(inband.size - np.argmax(inband[::-1]))
        self._head = "".join(lines[:lo])
        self._tail = "".join(lines[hi:])
        self._pieces: list[list[str]] = []
        for c in range(edges.size - 1):
            idx = np.flatnonzero(chan == c)
            # "191.250\t" + A + "\t0.000\t1\n191.251\t" + A + ... + "\t0.000\t1\n"
            pieces = [lines[idx[0]].split("\t", 1)[0] + "\t"]
            for i in idx[1:]:
                freq_text = lines[i].split("\t", 1)[0]
                pieces.append(f"\t0.000\t{port:d}\n{freq_text}\t")
            pieces.append(f"\t0.000\t{port:d}\n")
            self._pieces.append(pieces)

    def render(self, attn_db: np.ndarray) -> str:
        parts = [self._head]
        for a, pieces in zip(attn_db.tolist(), self._pieces, strict=True):
            parts.append(("%.3f" % (a + 0.0)).join(pieces))
        parts.append(self._tail)
        return "".join(parts)
