"""VNA emulator over a real TCP socket: its SCPI (raw socket client), our driver against it in both
dialects and byte orders, a sweep longer than the I/O timeout, and pymeasure's own `KeysightPNA`
against it in both byte orders (an outside client, so the emulator and our driver cannot share one
mistake).

The cavity here is a small noiseless stand-in (a random-phase sum of Lorentzians whose centres the
bits move), so traces can be compared with ``cavity.channel`` at float32 rounding; the real cavity
runs in tests/test_microwave_integration.py.
"""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import pyvisa

from labpnn.drivers.vna import VNAError, VNASensor
from labpnn.sim_instruments.vna_emulator import VNAEmulator, sweep_time_s

N_META = 12


class StandInCavity:
    """S21 = sum_k a_k / (1 + 2j (f - f_k) / w): mode k's centre moves with the bits wired to it."""

    def __init__(self, n_meta: int = N_META, n_modes: int = 6, seed: int = 3):
        rng = np.random.default_rng(seed)
        self.n_meta = n_meta
        self.f_k = np.linspace(1.1e9, 1.9e9, n_modes)
        self.a_k = 0.2 * np.exp(2j * np.pi * rng.random(n_modes))
        self.shift = rng.normal(0, 20e6, (n_modes, n_meta))  # Hz per ON bit
        self.calls: list[dict] = []

    def channel(self, states, freqs_hz) -> np.ndarray:
        centres = self.f_k + self.shift @ np.asarray(states, float)
        f = np.asarray(freqs_hz, float)[:, None]
        return (self.a_k / (1 + 2j * (f - centres) / 30e6)).sum(axis=1)

    def measure(self, states, freqs_hz, *, if_bandwidth_hz, power_dbm) -> np.ndarray:
        self.calls.append({"states": np.array(states), "ifbw": if_bandwidth_hz, "power": power_dbm,
                           "t": time.monotonic()})
        return self.channel(states, freqs_hz)


class Patterns:
    """A pattern source whose bits the test sets; remembers the times it was asked about."""

    def __init__(self, n_bits: int = 256):
        self.bits = np.zeros(n_bits, np.uint8)
        self.asked: list[float] = []

    def __call__(self, t: float) -> np.ndarray:
        self.asked.append(t)
        return self.bits.copy()


def bits(seed: int, n: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n).astype(np.uint8)


@pytest.fixture(params=["pna", "znb"])
def dialect(request):
    return request.param


@pytest.fixture
def bench(dialect):
    cavity, patterns = StandInCavity(), Patterns()
    emu = VNAEmulator(cavity, patterns, dialect=dialect).start()
    yield emu, cavity, patterns
    emu.stop()


class Client:
    """A raw socket SCPI client (no PyVISA): exact bytes in, exact bytes out."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    def line(self) -> str:
        while b"\n" not in self.buf:
            self._fill()
        out, self.buf = self.buf.split(b"\n", 1)
        return out.decode()

    def ask(self, line: str) -> str:
        self.send(line)
        return self.line()

    def block(self, line: str) -> bytes:
        """The raw payload of a ``#<n><len>`` reply; checks the ``\\n`` after it."""
        self.send(line)
        while len(self.buf) < 2:
            self._fill()
        assert self.buf[:1] == b"#"
        n = int(self.buf[1:2])
        while len(self.buf) < 2 + n:
            self._fill()
        length = int(self.buf[2:2 + n])
        end = 2 + n + length
        while len(self.buf) < end + 1:
            self._fill()
        payload, term, self.buf = self.buf[2 + n:end], self.buf[end:end + 1], self.buf[end + 1:]
        assert term == b"\n"
        return payload

    def errors(self) -> list[str]:
        out = []
        while (e := self.ask("SYST:ERR?")) != '0,"No error"':
            out.append(e)
        return out

    def close(self) -> None:
        self.sock.close()


# -- SCPI over the socket --------------------------------------------------------------------------
def test_identity_and_reset_state(bench, dialect):
    emu, _, _ = bench
    c = Client(emu.port)
    idn = c.ask("*IDN?")
    assert idn.startswith({"pna": "Keysight Technologies,N5222B", "znb": "Rohde-Schwarz,ZNB8"}[dialect])
    c.send("FORM REAL,32;FORM:BORD SWAP;:SENS1:SWE:POIN 11")
    assert c.ask("FORM?;:FORM:BORD?;:SENS1:SWE:POIN?") == "REAL,32;SWAP;+11"
    c.send("*RST")
    assert c.ask("FORM?;:FORM:BORD?;:SENS1:SWE:POIN?") == "ASC,0;NORM;+201"  # *RST: ASCII again
    expected = {"pna": '"CH1_S21_1,S21"', "znb": "'Trc1,S21'"}[dialect]
    assert c.ask("CALC1:PAR:CAT?") == expected
    assert c.errors() == []
    c.close()


def test_settings_round_trip_and_errors(bench, dialect):
    emu, _, _ = bench
    c = Client(emu.port)
    c.send(":SENS1:FREQ:STAR 1.2GHZ;STOP 1800 MHz")  # relative header continues SENS1:FREQ
    assert c.ask("SENS:FREQ:STAR?;STOP?;CENT?;SPAN?") == \
        "+1.20000000000E+09;+1.80000000000E+09;+1.50000000000E+09;+6.00000000000E+08"
    c.send("SENS1:FREQ:STAR 2e9")  # above stop: stop moves along
    assert float(c.ask("SENS1:FREQ:STOP?")) == 2e9
    c.send("SENS1:BWID 900;:SENS1:BANDWIDTH:RESOLUTION 16")  # rounded up to the next step
    assert float(c.ask("SENS1:BWID?")) == 20.0
    c.send("SENS1:BWID 900")
    assert float(c.ask("SENS1:BWID?")) == 1000.0
    c.send("SENS1:SWE:POIN 401")
    assert float(c.ask("SENS1:SWE:TIME?")) == pytest.approx(1.2 * 401 / 1000 + 0.003, rel=1e-9)
    c.send("SOUR1:POW -20")
    assert float(c.ask("SOUR:POW1:LEV:IMM:AMPL?")) == -20.0
    assert c.errors() == []
    bad = [("SENS1:FREQ:STAR 1e15", "-222"), ("SENS1:SWE:POIN 2.5", "-224"), ("SENS1:SWE:POIN", "-109"),
           ("SENS1:FREQ:STAR 1 parsec", "-224"), ("SOUR1:POW 99", "-222"), ("FORM REAL,16", "-224"),
           ("FORM:BORD BIG", "-224"), ("SENS2:SWE:POIN 11", "-114"), ("SENS1:FOO 1", "-113"),
           ("CALC1:PAR:SEL 'nope'", "-224"), ("*FOO", "-113"), ("SENS1:SWE:TIME 1", "-113")]
    for command, code in bad:
        c.send(command)
        assert [e.split(",")[0] for e in c.errors()] == [code], command
    # the other dialect's commands are unknown
    other = {"pna": "CALC1:PAR:SDEF 'x','S21'", "znb": "SENS1:SWE:MODE SING"}[dialect]
    c.send(other)
    assert c.errors() == ['-113,"Undefined header"']
    assert c.ask("SENS1:SWE:POIN?") == "+401"  # nothing changed
    c.close()


def test_error_queue_overflow(bench):
    emu, _, _ = bench
    c = Client(emu.port)
    c.send(";".join(["FOO"] * 40))
    assert c.ask("SYST:ERR:COUN?") == "32"
    errs = c.errors()
    assert len(errs) == 32 and errs[-1] == '-350,"Queue overflow"'
    c.close()


def test_a_partial_line_is_never_executed(bench):
    emu, _, _ = bench
    c = Client(emu.port)
    c.sock.sendall(b"SENS1:SWE:POIN 5")
    c.close()
    c = Client(emu.port)
    assert c.ask("SENS1:SWE:POIN?") == "+201"
    c.close()


@pytest.mark.parametrize(("fmt", "order", "dtype"),
                         [("REAL,32", "SWAP", "<f4"), ("REAL,32", "NORM", ">f4"), ("REAL,64", "SWAP", "<f8"),
                          ("REAL,64", "NORM", ">f8")])
def test_blocks_in_both_byte_orders(bench, dialect, fmt, order, dtype):
    emu, cavity, patterns = bench
    patterns.bits = bits(1)
    c = Client(emu.port)
    c.send(f"SENS1:FREQ:STAR 1e9;STOP 2e9;:SENS1:SWE:POIN 101;:FORM {fmt};FORM:BORD {order}")
    trigger = {"pna": "SENS1:SWE:MODE SING;*OPC?", "znb": "INIT1:CONT OFF;:INIT1:IMM;*OPC?"}[dialect]
    assert c.ask(trigger) == "1"
    stim = {"pna": "SENS1:X?", "znb": "CALC1:DATA:STIM?"}[dialect]
    freqs = np.frombuffer(c.block(stim), dtype)
    expected_f = np.linspace(1e9, 2e9, 101)
    if fmt == "REAL,64":
        np.testing.assert_array_equal(freqs, expected_f)  # 64-bit: the frequencies exactly
    else:
        np.testing.assert_allclose(freqs, expected_f, rtol=6e-8)  # one float32 rounding
    raw = np.frombuffer(c.block("CALC1:DATA? SDATA"), dtype).astype(np.float64)
    s21 = raw[0::2] + 1j * raw[1::2]
    ref = cavity.channel(patterns.bits[:N_META], expected_f)
    tol = 6e-8 if fmt == "REAL,32" else 1e-15
    np.testing.assert_allclose(s21.real, ref.real, rtol=0, atol=tol * np.abs(ref).max())
    np.testing.assert_allclose(s21.imag, ref.imag, rtol=0, atol=tol * np.abs(ref).max())
    db = np.frombuffer(c.block("CALC1:DATA? FDATA"), dtype)
    np.testing.assert_allclose(db, 20 * np.log10(np.abs(ref)), rtol=0, atol=2e-5)
    assert c.errors() == []
    c.close()


def test_formats_and_ascii(bench):
    emu, cavity, patterns = bench
    patterns.bits = bits(2)
    c = Client(emu.port)
    c.send("SENS1:FREQ:STAR 1e9;STOP 2e9;:SENS1:SWE:POIN 5;:INIT1:CONT OFF;:INIT1;*WAI")
    ref = cavity.channel(patterns.bits[:N_META], np.linspace(1e9, 2e9, 5))
    for fmt, expected in [("MLIN", np.abs(ref)), ("PHAS", np.degrees(np.angle(ref))), ("REAL", ref.real),
                          ("IMAG", ref.imag), ("MLOG", 20 * np.log10(np.abs(ref)))]:
        c.send(f"CALC1:FORM {fmt}")
        assert c.ask("CALC1:FORM?") == fmt
        values = np.array(c.ask("CALC1:DATA? FDAT").split(","), float)
        np.testing.assert_allclose(values, expected, rtol=1e-11, atol=1e-13)  # 12 significant digits
    sdata = np.array(c.ask("CALC1:DATA? SDAT").split(","), float)
    np.testing.assert_allclose(sdata[0::2] + 1j * sdata[1::2], ref, rtol=1e-11)
    c.close()


def test_the_pattern_is_latched_when_the_sweep_starts(bench):
    emu, cavity, patterns = bench
    c = Client(emu.port)
    c.send("SENS1:FREQ:STAR 1e9;STOP 2e9;:SENS1:SWE:POIN 501;:SENS1:BWID 1000;:FORM REAL,64;FORM:BORD SWAP")
    c.send("INIT1:CONT OFF")
    f = np.linspace(1e9, 2e9, 501)
    a, b = bits(10), bits(11)
    patterns.bits = a
    assert c.ask("INIT1:IMM;*OPC?") == "1"
    patterns.bits = b
    before = time.monotonic()
    c.send("INIT1:IMM")  # a 0.6 s sweep of pattern b
    assert c.ask("*ESR?") == "0"  # *OPC not armed
    # the reply comes after the trigger ran (one connection is served in order): the sweep is running
    running = np.frombuffer(c.block("CALC1:DATA? SDATA"), "<f8")
    patterns.bits = bits(12)  # a change during the sweep is not seen
    assert c.ask("*OPC?") == "1"
    waited = time.monotonic() - before
    done = np.frombuffer(c.block("CALC1:DATA? SDATA"), "<f8")
    ref_a, ref_b = cavity.channel(a[:N_META], f), cavity.channel(b[:N_META], f)
    np.testing.assert_allclose(running[0::2] + 1j * running[1::2], ref_a, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(done[0::2] + 1j * done[1::2], ref_b, rtol=1e-13, atol=1e-15)
    assert waited >= sweep_time_s(501, 1000)  # *OPC? answered only when the sweep ended
    np.testing.assert_array_equal(cavity.calls[-1]["states"], b[:N_META])
    assert cavity.calls[-1]["ifbw"] == 1000.0 and cavity.calls[-1]["power"] == emu._d.preset_power_dbm
    assert patterns.asked[-1] >= before and emu.sweeps == 2
    c.close()


def test_opc_polling_with_esr(bench):
    emu, _, _ = bench
    c = Client(emu.port)
    c.send("SENS1:SWE:POIN 101;:SENS1:BWID 1000;:INIT1:CONT OFF;:INIT1;*OPC")
    polls = 0
    while c.ask("*ESR?") != "1":
        polls += 1
        time.sleep(0.01)
        assert polls < 1000
    assert polls >= 1  # the 0.124 s sweep was still running at the first poll
    c.close()


def test_continuous_mode_measures_the_current_pattern(bench):
    emu, cavity, patterns = bench
    c = Client(emu.port)
    c.send("SENS1:FREQ:STAR 1e9;STOP 2e9;:SENS1:SWE:POIN 11;:FORM REAL,64;FORM:BORD SWAP")  # CONT after *RST
    f = np.linspace(1e9, 2e9, 11)
    for seed in (20, 21):
        patterns.bits = bits(seed)
        raw = np.frombuffer(c.block("CALC1:DATA? SDATA"), "<f8")
        np.testing.assert_allclose(raw[0::2] + 1j * raw[1::2], cavity.channel(patterns.bits[:N_META], f),
                                   rtol=1e-13, atol=1e-15)
        assert patterns.asked[-1] < time.monotonic() - sweep_time_s(11, 100e3) + 1e-3
    c.close()


def test_atoms_select_the_wired_bits():
    cavity, patterns = StandInCavity(), Patterns()
    atoms = [200 + i for i in range(N_META)][::-1]
    with VNAEmulator(cavity, patterns, atoms=atoms) as emu:
        patterns.bits = bits(30)
        c = Client(emu.port)
        assert c.ask("SENS1:SWE:MODE SING;*OPC?") == "1"
        np.testing.assert_array_equal(cavity.calls[-1]["states"], patterns.bits[atoms])
        patterns.bits = np.zeros(100, np.uint8)  # too short for the wired atoms
        c.send("SENS1:SWE:MODE SING")
        assert c.errors()[0].startswith("-200,")
        c.close()
    with pytest.raises(ValueError, match="atoms"):
        VNAEmulator(cavity, patterns, atoms=[1, 2])
    with pytest.raises(ValueError, match="dialect"):
        VNAEmulator(cavity, patterns, dialect="hp8510")


def test_pna_measurement_commands():
    emu = VNAEmulator(StandInCavity(), Patterns(), dialect="pna").start()
    c = Client(emu.port)
    c.send("CALC1:PAR:DEF:EXT 'm2','S12';:CALC1:PAR:EXT 'm3',S21;:CALC1:PAR:DEF:EXT 'bad','S11'")
    assert c.errors() == ['-224,"Illegal parameter value"']  # reflection is not modelled
    assert c.ask("CALC1:PAR:CAT:EXT?") == '"CH1_S21_1,S21,m2,S12,m3,S21"'
    assert c.ask("SYST:MEAS:CAT? 1") == '"1,2,3"' and c.ask("SYST:CHAN:CAT?") == '"1"'
    assert c.ask("CALC1:MEAS2:PAR?") == '"S12"'
    c.send("CALC1:MEAS3:FORM MLIN")
    assert c.ask("CALC1:MEAS3:Y:AXIS:UNIT?;:CALC1:MEAS1:Y:AXIS:UNIT?;:CALC1:MEAS1:X:AXIS:UNIT?") == "UNIT;DB;FREQ"
    c.send("CALC1:PAR:DEL 'm2';:CALC1:MEAS2:PAR?")
    assert c.errors() == ['-114,"Header suffix out of range"']
    c.send("CALC1:PAR:DEL:ALL;:CALC1:DATA? SDATA")
    assert c.errors() == ['-200,"Execution error; no measurement selected"']
    assert c.ask("CALC1:PAR:CAT?") == '"NO CATALOG"'
    c.close()
    emu.stop()


def test_a_second_client_is_served_while_one_waits_for_a_sweep(bench):
    emu, _, _ = bench
    a, b = Client(emu.port), Client(emu.port)
    a.send("SENS1:SWE:POIN 301;:SENS1:BWID 1000;:INIT1:CONT OFF")
    a.send("INIT1;*OPC?")  # 0.36 s
    time.sleep(0.05)
    t0 = time.monotonic()
    assert b.ask("*IDN?")
    answered_in = time.monotonic() - t0
    assert a.line() == "1"
    assert answered_in < sweep_time_s(301, 1000)  # *OPC? waits outside the instrument lock
    a.close()
    b.close()


# -- our driver against the emulator ---------------------------------------------------------------
@pytest.mark.parametrize("order", ["SWAP", "NORM"])
@pytest.mark.parametrize("data_format", ["REAL,32", "REAL,64", "ASCII"])
def test_driver_against_the_emulator(bench, dialect, order, data_format):
    emu, cavity, patterns = bench
    patterns.bits = bits(40)
    vna = VNASensor(emu.resource, dialect=dialect, output="reim", start_hz=1.1e9, stop_hz=1.9e9, points=151,
                    if_bandwidth_hz=10e3, power_dbm=-12, byte_order=order, data_format=data_format, timeout_s=3)
    vna.connect()
    try:
        assert vna.identify() == emu._d.idn
        axis = vna.axis()
        f = np.linspace(1.1e9, 1.9e9, 151)
        np.testing.assert_array_equal(axis["values"][:151], f)  # read as REAL,64: exact
        assert axis["values"][151:] == axis["values"][:151] and vna.n_outputs == 302
        trace, flags = vna.acquire()
        ref = cavity.channel(patterns.bits[:N_META], f)
        # float32 output: one rounding (plus one on the wire for REAL,32; 12 digits for ASCII)
        np.testing.assert_allclose(trace, np.concatenate([ref.real, ref.imag]), rtol=0,
                                   atol=2.5e-7 * np.abs(ref).max())
        assert cavity.calls[-1]["ifbw"] == 10e3 and cavity.calls[-1]["power"] == -12
        vna.configure(output="db")
        db, _ = vna.acquire()
        np.testing.assert_allclose(db, 20 * np.log10(np.abs(ref)), rtol=0, atol=2e-5)
        vna.configure(points=21, output="mag")  # re-reads the stimulus
        assert vna.n_outputs == 21 and len(vna.axis()["values"]) == 21
        mag, _ = vna.acquire()
        np.testing.assert_allclose(mag, np.abs(cavity.channel(patterns.bits[:N_META], np.linspace(1.1e9, 1.9e9, 21))),
                                   rtol=3e-7)
        assert vna.settings()["data_format"] == data_format and vna.settings()["byte_order"] == order
    finally:
        vna.close()
    # the driver left the instrument in its transfer settings, with nothing in the error queue
    c = Client(emu.port)
    assert c.ask("FORM:BORD?") == order and c.errors() == []
    c.close()


def test_driver_detects_a_reversed_byte_order():
    cavity, patterns = StandInCavity(), Patterns()
    with VNAEmulator(cavity, patterns, dialect="znb", swap_reversed=True) as emu:
        vna = VNASensor(emu.resource, dialect="znb", start_hz=1e9, stop_hz=2e9, points=11, timeout_s=3)
        with pytest.raises(VNAError, match="only when byte-swapped"):
            vna.connect()
        vna = VNASensor(emu.resource, dialect="znb", start_hz=1e9, stop_hz=2e9, points=11, timeout_s=3,
                        swap_reversed=True, output="mag")
        vna.connect()
        trace, _ = vna.acquire()
        np.testing.assert_allclose(trace, np.abs(cavity.channel(np.zeros(N_META), np.linspace(1e9, 2e9, 11))),
                                   rtol=3e-7)
        vna.close()


def test_a_sweep_longer_than_the_io_timeout(dialect):
    """401 points at 1 kHz take 0.48 s; the I/O timeout is 0.2 s. The sweep wait is scaled."""
    cavity, patterns = StandInCavity(), Patterns()
    with VNAEmulator(cavity, patterns, dialect=dialect) as emu:
        vna = VNASensor(emu.resource, dialect=dialect, start_hz=1e9, stop_hz=2e9, points=401, if_bandwidth_hz=1e3,
                        timeout_s=0.2, output="mag")
        vna.connect()
        assert vna.settings()["sweep_time_s"] == pytest.approx(sweep_time_s(401, 1e3))
        t0 = time.monotonic()
        trace, _ = vna.acquire()
        assert time.monotonic() - t0 >= sweep_time_s(401, 1e3)
        assert trace.shape == (401,)
        vna.close()
        # the same wait without scaling fails: the test above is not vacuous
        rm = pyvisa.ResourceManager("@py")
        res = rm.open_resource(emu.resource, read_termination="\n", write_termination="\n", timeout=200)
        trigger = {"pna": "SENS1:SWE:MODE SING;*OPC?", "znb": "INIT1:IMM;*OPC?"}[dialect]
        with pytest.raises(pyvisa.errors.VisaIOError):
            res.query(trigger)
        res.close()
        rm.close()


# -- pymeasure's KeysightPNA, an outside client ----------------------------------------------------
@pytest.mark.parametrize("swapped", [True, False])
def test_pymeasure_keysight_pna(swapped):
    from pymeasure.instruments.keysight import KeysightPNA

    cavity, patterns = StandInCavity(), Patterns()
    patterns.bits = bits(50)
    with VNAEmulator(cavity, patterns, dialect="pna") as emu:
        c = Client(emu.port)
        c.send("SENS1:FREQ:STAR 1e9;STOP 2e9;:SENS1:SWE:POIN 101;:SENS1:BWID 10000")
        c.close()
        pna = KeysightPNA(emu.resource, visa_library="@py", data_format="real64", byte_order_swapped=swapped,
                          timeout=3000)
        try:
            assert list(pna.channels) == [1] and list(pna.ch_1.traces) == [1]
            assert pna.byte_order_swapped is swapped and pna.data_format == "real64"
            assert pna.ch_1.number_of_points == 101 and pna.ch_1.tr_1.parameter == "S21"
            pna.ch_1.single()
            assert pna.complete == "1"
            x = pna.ch_1.tr_1.x_data
            y = pna.ch_1.tr_1.y_data_complex
            pna.data_format = "real32"
            y32 = pna.ch_1.tr_1.y_data
        finally:
            pna.adapter.close()
    # KeysightPNA decodes with the machine's (little-endian) byte order: NORM data must be swapped
    if not swapped:
        x, y, y32 = x.byteswap(), y.byteswap(), y32.byteswap()
    f = np.linspace(1e9, 2e9, 101)
    ref = cavity.channel(patterns.bits[:N_META], f)
    np.testing.assert_array_equal(x, f)
    np.testing.assert_allclose(y[:, 0] + 1j * y[:, 1], ref, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(y32, 20 * np.log10(np.abs(ref)), rtol=0, atol=2e-5)
    assert not np.allclose(x.byteswap(), f)  # the other order really is different


def test_emulator_stops_with_a_client_connected():
    cavity, patterns = StandInCavity(), Patterns()
    emu = VNAEmulator(cavity, patterns).start()
    c = Client(emu.port)
    assert c.ask("*IDN?")
    done = threading.Event()
    threading.Thread(target=lambda: (emu.stop(), done.set()), daemon=True).start()
    assert done.wait(5)
    with pytest.raises((ConnectionError, OSError)):
        c.ask("*IDN?")
    c.close()
