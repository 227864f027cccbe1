"""The optical bench emulators over real sockets on 127.0.0.1 (plain http.client and socket)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from labpnn.sim_instruments.aq6370_emulator import AQ6370Emulator
from labpnn.sim_instruments.optical_bench import OpticalBenchEmulators, main
from labpnn.sim_instruments.shg import OpticalBenchConfig, SHGBench
from labpnn.sim_instruments.waveshaper_emulator import WaveShaperEmulator

GRID = np.round(191.250 + 0.001 * np.arange(5026), 3)
BAND = GRID[(GRID >= 191.48) & (GRID < 195.32)]


@pytest.fixture(scope="module")
def rig():
    with OpticalBenchEmulators(shaper_port=0, osa_port=0) as emu:
        yield emu


# ----------------------------------------------------------------------------- HTTP helpers
def _request(url: str, method: str, path: str, body: bytes | None = None, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def _load(url: str, payload) -> dict:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, ctype, data = _request(url, "POST", "/waveshaper/loadprofile", body, {"Content-Type": "application/json"})
    assert status == 200 and ctype == "application/json"
    return json.loads(data)


def _wsp(freqs, attn, phase=None, port=None, fdigits=3) -> str:
    phase = np.zeros(len(freqs)) if phase is None else phase
    port = np.ones(len(freqs), dtype=int) if port is None else port
    rows = zip(freqs, attn, phase, port, strict=True)
    return "".join(f"{f:.{fdigits}f}\t{a:.3f}\t{p:.6f}\t{q:d}\n" for f, a, p, q in rows)


def _profile(url: str) -> np.ndarray:
    status, ctype, data = _request(url, "GET", "/waveshaper/getprofile")
    assert status == 200 and ctype.startswith("text/plain")
    return np.loadtxt(data.decode().splitlines(), ndmin=2)


# ----------------------------------------------------------------------------- SCPI helpers
class Scpi:
    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def write(self, cmd: str) -> None:
        self.sock.sendall(cmd.encode() + b"\n")

    def _fill(self, n: int = 1) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def query(self, cmd: str) -> str:
        self.write(cmd)
        return self.readline()

    def read_exact(self, n: int) -> bytes:
        self._fill(n)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def query_block(self, cmd: str, dtype: str) -> np.ndarray:
        """IEEE 488.2 definite-length block, read by its declared length (0x0A bytes may occur)."""
        self.write(cmd)
        head = self.read_exact(2)
        assert head[:1] == b"#"
        length = int(self.read_exact(int(head[1:2])))
        data = self.read_exact(length)
        assert self.read_exact(1) == b"\n"
        return np.frombuffer(data, dtype=dtype)

    def error(self) -> tuple[int, str]:
        code, _, msg = self.query(":SYST:ERR?").partition(",")
        return int(code), msg.strip('"')

    def close(self) -> None:
        self.sock.close()


def _is_closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def osa(rig):
    s = Scpi(rig.osa.port)
    s.write("*RST;*CLS")
    yield s
    s.close()


def _sweep(s: Scpi, fmt="REAL,64") -> np.ndarray:
    s.write(f"*CLS;:FORM:DATA {fmt};:DISP:TRAC:Y1:SPAC LIN;:INIT:SMOD SING;:INIT")
    assert s.query("*OPC?") == "1"
    return s.query_block(":TRAC:Y? TRA", "<f8")


# ============================================================================= WaveShaper
def test_devinfo(rig):
    status, ctype, data = _request(rig.shaper_url, "GET", "/waveshaper/devinfo")
    info = json.loads(data)
    assert status == 200 and ctype == "application/json"
    assert info == {
        "model": "WS-1000S-SIM",
        "sno": "SIM000001",
        "ver": info["ver"],
        "startfreq": 191.25,
        "stopfreq": 196.275,
        "ip": "127.0.0.1",
        "portcount": 1,
        "rc": 0,
        "rctext": "OK",
    }
    with urllib.request.urlopen(rig.shaper_url + "/waveshaper/devinfo", timeout=10) as resp:
        assert json.loads(resp.read())["sno"] == "SIM000001"
    lo, hi = rig.bench.shaper_band_thz
    assert info["startfreq"] <= lo < hi <= info["stopfreq"]


def test_profile_round_trip(rig):
    url = rig.shaper_url
    assert _load(url, {"type": "transmit", "port": 1}) == {"rc": 0, "rctext": "OK", "sno": "SIM000001"}
    prof = _profile(url)
    assert prof.shape == (5026, 4)
    assert np.allclose(prof[:, 0], GRID) and np.all(prof[:, 1] == 0) and np.all(prof[:, 3] == 1)
    rng = np.random.default_rng(0)
    freqs = BAND[100:1100]
    attn = np.round(rng.uniform(0, 30, freqs.size), 3)
    phase = np.round(rng.uniform(-3, 3, freqs.size), 6)
    assert _load(url, {"type": "wsp", "wsp": _wsp(freqs, attn, phase), "port": 1})["rc"] == 0
    prof = _profile(url)
    listed = np.isin(prof[:, 0], freqs)
    assert np.allclose(prof[listed, 1], attn) and np.allclose(prof[listed, 2], phase)
    assert np.all(prof[listed, 3] == 1)
    assert np.all(prof[~listed, 3] == 0) and np.all(prof[~listed, 1] == 60)  # unlisted: blocked
    assert _load(url, {"type": "blockall"})["rc"] == 0
    assert np.all(_profile(url)[:, 3] == 0)
    # tolerant input: CRLF line ends, spaces, blank lines and comments
    text = "# header\r\n\r\n" + _wsp(BAND[:20], np.zeros(20)).replace("\t", " ").replace("\n", "\r\n")
    assert _load(url, {"type": "wsp", "wsp": text})["rc"] == 0
    assert _load(url, {"type": "transmit"})["rc"] == 0


def _bad_wsp_cases():
    ok = BAND[:20]
    z = np.zeros(20)
    return {
        "out_of_band": (-30, _wsp(np.r_[191.0, ok[1:]], z)),
        "off_grid_first": (-30, _wsp(ok + 0.0004, z, fdigits=4)),
        "not_increasing": (-30, _wsp(np.r_[ok[:10], ok[9:19]], z)),
        "decreasing": (-30, _wsp(ok[::-1], z)),
        "spacing": (-33, _wsp(np.r_[ok[:10], ok[10:] + 0.0005], z, fdigits=4)),
        "negative_attn": (-31, _wsp(ok, np.r_[z[:19], -1.0])),
        "nan_attn": (-31, _wsp(ok, np.r_[z[:19], np.nan])),
        "attn_above_60": (-31, _wsp(ok, np.r_[z[:19], 61.0])),
        "port_2": (-29, _wsp(ok, z, port=np.full(20, 2))),
        "narrow_band": (-34, _wsp(ok[:15], z[:15], port=np.r_[np.ones(5, int), np.zeros(10, int)])),
        "narrow_gap": (-34, _wsp(np.r_[ok[:12], ok[14:19]], z[:17])),  # a 5-point run after a gap
        "three_fields": (-32, "193.400\t0.0\t0.0\n"),
        "not_a_number": (-32, _wsp(ok, z).replace("\t0.000\t", "\tabc\t", 1)),
        "fractional_port": (-32, _wsp(ok, z).replace("\t1\n", "\t1.5\n", 1)),
        "empty": (-32, "\n\n"),
    }


@pytest.mark.parametrize("case", sorted(_bad_wsp_cases()))
def test_wsp_errors_use_vendor_codes(rig, case):
    url = rig.shaper_url
    assert _load(url, {"type": "transmit"})["rc"] == 0
    before = _profile(url)
    rc, text = _bad_wsp_cases()[case]
    reply = _load(url, {"type": "wsp", "wsp": text, "port": 1})
    assert reply["rc"] == rc, reply
    assert reply["sno"] == "SIM000001" and reply["rctext"]
    assert np.array_equal(_profile(url), before)  # a rejected profile changes nothing


@pytest.mark.parametrize(
    "body, rc",
    [
        (b"{not json", -1),
        (b"\xff\xfe", -1),
        (b"[1, 2]", -1),
        (b'{"wsp": "x"}', -1),
        (b'{"type": "wsp"}', -1),
        (b'{"type": "bandpass"}', -40),
        (b'{"type": "transmit", "port": 2}', -29),
        (b'{"type": "transmit", "port": "one"}', -29),
        (b"", -1),
    ],
)
def test_malformed_requests_are_answered(rig, body, rc):
    assert _load(rig.shaper_url, body)["rc"] == rc
    assert _request(rig.shaper_url, "GET", "/waveshaper/devinfo")[0] == 200


def test_server_survives_garbage_and_wrong_routes(rig):
    url = rig.shaper_url
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
        s.recv(1024)
    with socket.create_connection((host, int(port)), timeout=5) as s:  # vanishes mid-body
        s.sendall(b"POST /waveshaper/loadprofile HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"type\":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /waveshaper/loadprofile HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):  # the server answers, then closes (it will not read the body)
            reply += chunk
        assert b'"rc": -28' in reply
    assert _request(url, "GET", "/nope")[0] == 404
    assert _request(url, "GET", "/waveshaper/loadprofile")[0] == 405
    assert _request(url, "POST", "/waveshaper/devinfo", b"{}")[0] == 405
    assert json.loads(_request(url, "GET", "/waveshaper/devinfo")[2])["rc"] == 0


def test_keep_alive_connection_serves_many_requests(rig):
    host, port = rig.shaper_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for kind in ("blockall", "transmit", "blockall", "transmit"):
            conn.request("POST", "/waveshaper/loadprofile", body=json.dumps({"type": kind}))
            assert json.loads(conn.getresponse().read())["rc"] == 0
    finally:
        conn.close()


def test_settle_latency_is_a_deadline():
    with WaveShaperEmulator(SHGBench(), port=0, settle_s=0.15) as ws:
        t0 = time.monotonic()
        assert _load(ws.url, {"type": "blockall"})["rc"] == 0
        elapsed = time.monotonic() - t0
        assert 0.15 <= elapsed < 0.6
        t0 = time.monotonic()
        assert _load(ws.url, {"type": "bandpass"})["rc"] == -40  # failures do not wait
        assert time.monotonic() - t0 < 0.15


# ============================================================================= OSA
def test_idn_and_common_commands(osa):
    assert osa.query("*IDN?") == "YOKOGAWA,AQ6370D,SIM000002,01.00"
    assert osa.query("*idn?") == "YOKOGAWA,AQ6370D,SIM000002,01.00"
    assert osa.query("*OPC?") == "1"
    assert osa.query("*ESR?") == "0"
    assert osa.error() == (0, "No error")


def test_wavelength_settings_and_header_forms(osa):
    assert float(osa.query(":SENS:WAV:STAR?")) == pytest.approx(770e-9)
    osa.write(":SENSe:WAVelength:STARt 772NM")
    assert osa.query(":SENSE:WAVELENGTH:START?") == "+7.72000000E-007"
    osa.write(":sens:wav:stop 0.778um")
    assert float(osa.query(":SENS:WAV:STOP?")) == pytest.approx(778e-9)
    osa.write(":SENS:WAV:STAR 7.71E-7")
    assert float(osa.query(":SENS:WAV:STAR?")) == pytest.approx(771e-9)
    osa.write(":SENS:WAV:STAR 773.5 NM;STOP 776.5NM")  # relative header after ';'
    assert osa.query(":SENS:WAV:STAR?;STOP?;CENT?;SPAN?") == (
        "+7.73500000E-007;+7.76500000E-007;+7.75000000E-007;+3.00000000E-009"
    )
    osa.write(":SENS:WAV:CENT 775NM;SPAN 10NM")
    assert float(osa.query(":SENS:WAV:STAR?")) == pytest.approx(770e-9)
    osa.write(":SENSe:SWEep:POINts 1001")
    assert osa.query(":SENS:SWE:POIN?") == "1001"
    osa.write(":SENSe:BANDwidth:RESolution 0.1NM")
    assert float(osa.query(":SENS:BAND:RES?")) == pytest.approx(0.1e-9)
    osa.write(":SENS:BWID:RES 0.06e-9")  # snapped to the nearest available resolution
    assert float(osa.query(":SENS:BWID?")) == pytest.approx(0.05e-9)
    osa.write(":INITiate:SMODe SINGle;:INIT:SMOD 1;:TRACe:ACTive TRA;:SENS:SENS MID")
    assert osa.query(":INIT:SMOD?;:TRAC:ACT?;:SENS:SENS?") == "1;TRA;2"
    assert osa.query(":FORM:DATA?;:DISP:TRAC:Y1:SPAC?") == "ASCII;0"
    assert osa.error() == (0, "No error")
    osa.write("*RST")
    assert float(osa.query(":SENS:WAV:STOP?")) == pytest.approx(780e-9)


def test_error_queue(osa):
    osa.write(":BOGus:COMMand 3")
    osa.write(":SENS:WAV:STAR 100NM")
    osa.write(":SENS:WAV:STAR banana")
    osa.write(":SENS:SWE:POIN")
    osa.write(":INIT:SMOD REPEAT")
    osa.write(":IDN?")
    assert osa.error() == (-113, "Undefined header")
    assert osa.error() == (-222, "Data out of range")
    assert osa.error() == (-224, "Illegal parameter value")
    assert osa.error() == (-109, "Missing parameter")
    assert osa.error() == (-224, "Illegal parameter value")
    assert osa.error() == (-113, "Undefined header")
    assert osa.error() == (0, "No error")
    assert float(osa.query(":SENS:WAV:STAR?")) == pytest.approx(770e-9)  # bad values change nothing
    for _ in range(40):
        osa.write(":NOPE")
    assert osa.query("*OPC?") == "1"
    errors = [osa.error() for _ in range(33)]
    assert errors[30] == (-113, "Undefined header") and errors[31] == (-350, "Queue overflow")
    assert errors[32] == (0, "No error")
    osa.write(":NOPE;*CLS")
    assert osa.error() == (0, "No error")


def test_binary_and_ascii_traces(osa):
    osa.write(":SENS:WAV:STAR 770NM;STOP 780NM;:SENS:SWE:POIN 512")
    y64 = _sweep(osa, "REAL,64")
    assert y64.shape == (512,)
    x64 = osa.query_block(":TRAC:X? TRA", "<f8")
    assert np.allclose(x64, np.linspace(770e-9, 780e-9, 512), rtol=0, atol=1e-18)
    osa.write(":FORM:DATA REAL,32")
    assert osa.query(":FORM:DATA?") == "REAL,32"
    y32 = osa.query_block(":TRACe:DATA:Y? TRA", "<f4")
    assert np.allclose(y32, y64, rtol=1e-6)  # the same trace (no new sweep)
    osa.write(":FORM:DATA ASCii")
    text = osa.query(":TRAC:Y? TRA")
    assert text.count(",") == 511
    assert np.allclose(np.array(text.split(","), dtype=float), y64, rtol=1e-8)
    x_text = osa.query(":TRAC:X? TRA").split(",")
    assert x_text[0] == "+7.70000000E-007"
    assert osa.query(":TRAC:SNUM? TRA") == "512"
    osa.write(":DISP:TRAC:Y1:SPAC LOG;:FORM:DATA REAL")
    dbm = osa.query_block(":TRAC:Y? TRA", "<f8")
    bright = y64 > 1e-9
    assert np.allclose(dbm[bright], 10 * np.log10(y64[bright] / 1e-3))
    assert np.all(dbm[y64 <= 0] == -210.0)
    assert struct.pack("<d", 1.0) == np.array([1.0], "<f8").tobytes()  # little-endian on the wire


def test_trace_follows_axis_and_resolution(osa):
    osa.write(":SENS:WAV:STAR 760NM;STOP 790NM;:SENS:SWE:POIN 2001;:SENS:BWID:RES 0.5NM")
    y = _sweep(osa)
    x = osa.query_block(":TRAC:X? TRA", "<f8")
    assert y.size == x.size == 2001
    assert 772e-9 < x[np.argmax(y)] < 778e-9
    assert y.max() > 0.5 * 5e-6  # more power in a wider resolution bandwidth
    assert abs(y[x < 765e-9]).max() < 1e-9  # dark outside the SH band


def test_sweep_completion_polling():
    bench = SHGBench()
    with AQ6370Emulator(bench, port=0, sweep_s=0.25) as emu:
        s = Scpi(emu.port)
        try:
            s.write("*CLS;:FORM:DATA REAL,64;:DISP:TRAC:Y1:SPAC LIN")
            first = s.query_block(":TRAC:Y? TRA", "<f8")
            assert np.all(first == 0)  # no sweep yet
            t0 = time.monotonic()
            s.write(":INIT")
            assert s.query(":STAT:OPER:EVEN?") == "0"
            assert s.query(":STAT:OPER:COND?") == "0"
            assert np.all(s.query_block(":TRAC:Y? TRA", "<f8") == 0)  # previous trace during a sweep
            polls = 0
            while not int(s.query(":STATus:OPERation:EVENt?")) & 1:
                polls += 1
                time.sleep(0.02)
            elapsed = time.monotonic() - t0
            assert elapsed >= 0.25 and polls >= 1  # no upper bound: a loaded machine may poll late
            assert s.query(":STAT:OPER:EVEN?") == "0"  # reading cleared it
            assert s.query(":STAT:OPER:COND?") == "1"
            assert s.query_block(":TRAC:Y? TRA", "<f8").max() > 1e-6
            assert bench.shots == 1
            t0 = time.monotonic()  # *OPC? waits for the sweep
            assert s.query(":INIT;*OPC?") == "1"
            assert time.monotonic() - t0 >= 0.25
            assert s.query(":STAT:OPER:EVEN?") == "1"
            s.write(":INIT;:ABOR")
            time.sleep(0.3)
            assert s.query(":STAT:OPER:EVEN?") == "0"  # an aborted sweep never completes
        finally:
            s.close()


def test_login_handshake():
    with AQ6370Emulator(SHGBench(), port=0, require_login=True, password="secret") as emu:
        s = Scpi(emu.port)
        assert s.query('OPEN "anonymous"') == "AUTHENTICATE CRAM-MD5."
        assert s.query("secret") == "ready"
        assert s.query("*IDN?").startswith("YOKOGAWA,AQ6370D")
        s.close()
        s = Scpi(emu.port)
        assert s.query('OPEN "anonymous"') == "AUTHENTICATE CRAM-MD5."
        assert s.query("wrong") == "ERROR"
        assert _is_closed(s.sock)
        s.close()
        s = Scpi(emu.port)  # no login: nothing is executed, the connection is closed
        s.write(":SENS:WAV:STAR 700NM")
        assert _is_closed(s.sock)
        s.close()
        s = Scpi(emu.port)
        s.write('OPEN "user"\r')  # CRLF terminators work too
        assert s.readline() == "AUTHENTICATE CRAM-MD5."
        assert s.query("secret\r") == "ready"
        assert float(s.query(":SENS:WAV:STAR?\r")) == pytest.approx(770e-9)
        s.close()
    with AQ6370Emulator(SHGBench(), port=0) as emu:  # login optional: the handshake still works
        s = Scpi(emu.port)
        assert s.query('OPEN "user"') == "AUTHENTICATE CRAM-MD5."
        assert s.query("anything") == "ready"
        s.close()


def test_client_vanishing_mid_command(rig):
    port = rig.osa.port
    s = Scpi(port)
    assert s.query("*RST;*OPC?") == "1"
    s.close()
    s = Scpi(port)
    s.sock.sendall(b":SENS:WAV:STAR 700")  # no terminator, then gone
    s.close()
    big = Scpi(port)  # asks for a large trace and resets the connection without reading it
    big.write(":SENS:SWE:POIN 50001;:FORM:DATA ASCII;:INIT;*OPC?")
    assert big.readline() == "1"
    big.write(":TRAC:Y? TRA;:TRAC:X? TRA")
    big.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    big.close()
    time.sleep(0.05)
    s = Scpi(port)
    assert s.query("*IDN?").startswith("YOKOGAWA")
    assert float(s.query(":SENS:WAV:STAR?")) == pytest.approx(770e-9)  # the partial command never ran
    # wait for the reset to run: a command sent just before closing still executes later, and
    # would reset the next test's settings (the module shares one emulator)
    assert s.query("*RST;*OPC?") == "1"
    s.close()


def test_shared_light_path(rig, osa):
    url = rig.shaper_url
    assert _load(url, {"type": "blockall"})["rc"] == 0
    dark = _sweep(osa)
    assert abs(dark).max() < 40 * rig.bench.watts_per_count  # read noise only
    assert _load(url, {"type": "transmit", "port": 1})["rc"] == 0
    bright = _sweep(osa)
    assert bright.max() > 0.4 * rig.bench.full_scale_w
    # attenuating every channel by 3 dB on the shaper quarters the SH on the OSA
    wsp = _wsp(BAND, np.full(BAND.size, 3.0))
    assert _load(url, {"type": "wsp", "wsp": wsp})["rc"] == 0
    quarter = _sweep(osa)
    assert quarter.max() / bright.max() == pytest.approx(0.25 * 1.013, rel=0.05)  # (x1.013: less compression)
    # the blue half of the band blocked (port 0): a narrower, weaker SH
    port = np.where(BAND < 193.4, 1, 0)
    assert _load(url, {"type": "wsp", "wsp": _wsp(BAND, np.zeros(BAND.size), port=port)})["rc"] == 0
    half = _sweep(osa)
    assert 0.1 * bright.max() < half.max() < 0.5 * bright.max()
    assert _load(url, {"type": "transmit"})["rc"] == 0


# ============================================================================= the launcher
def test_launcher_on_free_ports():
    cfg = OpticalBenchConfig(seed=5)
    with OpticalBenchEmulators(cfg, shaper_port=0, osa_port=0, settle_s=0.0, sweep_s=0.0) as emu:
        assert emu.shaper_url.startswith("http://127.0.0.1:") and emu.shaper.port > 0
        assert emu.osa_resource == f"TCPIP::127.0.0.1::{emu.osa.port}::SOCKET"
        assert emu.shaper.bench is emu.osa.bench is emu.bench
        assert emu.bench.config.seed == 5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", emu.osa.port), timeout=2).close()


def test_main_serves_until_sigterm(tmp_path):
    code = (
        "import sys; from labpnn.sim_instruments.optical_bench import main; "
        "sys.exit(main(['--shaper-port', '0', '--osa-port', '0', '--seed', '3', '--sweep-ms', '1']))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        shaper = proc.stdout.readline().split()
        osa_line = proc.stdout.readline().split()
        assert shaper[0] == "waveshaper" and shaper[1].startswith("http://127.0.0.1:")
        assert osa_line[0] == "osa" and osa_line[1].startswith("TCPIP::127.0.0.1::")
        assert _request(shaper[1], "GET", "/waveshaper/devinfo")[0] == 200
        s = Scpi(int(osa_line[1].split("::")[2]))
        assert s.query("*IDN?").startswith("YOKOGAWA")
        s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_rejects_bad_arguments(capsys):
    assert main(["--settle-ms", "-1", "--shaper-port", "0", "--osa-port", "0"]) == 2
