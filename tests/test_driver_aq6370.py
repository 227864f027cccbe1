"""AQ6370 driver: protocol tables for the declarative properties (pymeasure's expected_protocol),
and the thin PyVISA parts (login, blocks read by length, sweep polling, byte-order check) against a
transcript-replaying socket server through real PyVISA / pyvisa-py.

Transcripts are written from the AQ6370 remote-command syntax (FIELD-NOTES), never from the emulator.
"""
from __future__ import annotations

import numpy as np
import pytest
from driver_transcripts import ScpiTranscript, Step, block, free_port, lines
from pymeasure.test import expected_protocol

from labpnn.drivers import roles
from labpnn.drivers.aq6370 import (
    AQ6370,
    OSAError,
    OSASensor,
    check_wavelength_axis,
    ieee_block_header,
    parse_ieee_block,
)

NO_ERROR = (":SYST:ERR?", '0,"No error"')
IDN = "YOKOGAWA,AQ6370D,91N123456,02.08"


# -- declarative properties: protocol tables -------------------------------------------------------
@pytest.mark.parametrize(
    ("prop", "value", "command"),
    [
        ("wavelength_start", 1500e-9, ":SENS:WAV:STAR 1.5e-06"),
        ("wavelength_stop", 1600.125e-9, ":SENS:WAV:STOP 1.600125e-06"),
        ("sweep_points", 2001, ":SENS:SWE:POIN 2001"),
        ("sweep_points", 101.0, ":SENS:SWE:POIN 101"),
        ("resolution", 0.1e-9, ":SENS:BWID:RES 1e-10"),
        ("resolution", 0.1 * 1e-9, ":SENS:BWID:RES 1e-10"),  # 1.0000000000000001e-10 snaps
        ("data_format", "REAL,32", ":FORM:DATA REAL,32"),
        ("data_format", "real,64", ":FORM:DATA REAL,64"),
        ("data_format", "ASCii", ":FORM:DATA ASCII"),
        ("y_scale", "LIN", ":DISP:TRAC:Y1:SPAC LIN"),
        ("y_scale", "logarithmic", ":DISP:TRAC:Y1:SPAC LOG"),
    ],
)
def test_set_property_then_checks_error_queue(prop, value, command):
    with expected_protocol(AQ6370, [(command, None), NO_ERROR]) as inst:
        setattr(inst, prop, value)


@pytest.mark.parametrize(
    ("prop", "reply", "value"),
    [
        ("wavelength_start", "+1.50000000E-006", 1.5e-6),
        ("wavelength_stop", "+1.60000000E-006", 1.6e-6),
        ("sweep_points", "+2001", 2001),
        ("resolution", "+1.00000000E-010", 1e-10),
        ("data_format", "REAL,32", "REAL,32"),
        ("data_format", "REAL", "REAL,64"),
        ("data_format", "ASCII", "ASCII"),
        ("y_scale", "1", "LIN"),
        ("y_scale", "0", "LOG"),
        ("id", IDN, IDN),
        ("operation_event", "+1", 1),
    ],
)
def test_get_property(prop, reply, value):
    command = {"wavelength_start": ":SENS:WAV:STAR?", "wavelength_stop": ":SENS:WAV:STOP?",
               "sweep_points": ":SENS:SWE:POIN?", "resolution": ":SENS:BWID:RES?",
               "data_format": ":FORM:DATA?", "y_scale": ":DISP:TRAC:Y1:SPAC?", "id": "*IDN?",
               "operation_event": ":STAT:OPER:EVEN?"}[prop]
    with expected_protocol(AQ6370, [(command, reply)]) as inst:
        assert getattr(inst, prop) == value


@pytest.mark.parametrize(
    ("prop", "value"),
    [("wavelength_start", 500e-9), ("wavelength_stop", 1800e-9), ("sweep_points", 100),
     ("sweep_points", 50002), ("sweep_points", 2001.5), ("resolution", 0.3e-9),
     ("data_format", "REAL,16"), ("y_scale", "dB")],
)
def test_invalid_setting_sends_nothing(prop, value):
    with expected_protocol(AQ6370, []) as inst, pytest.raises(ValueError):
        setattr(inst, prop, value)


def test_scpi_error_after_a_setting_raises_with_command_and_message():
    comm = [(":SENS:WAV:STAR 1.5e-06", None), (":SYST:ERR?", '-222,"Data out of range"'),
            (":SYST:ERR?", '-113,"Undefined header"'), NO_ERROR]
    with expected_protocol(AQ6370, comm) as inst, pytest.raises(OSAError) as info:
        inst.wavelength_start = 1.5e-6
    assert info.value.command == ":SENS:WAV:STAR 1.5e-06"
    assert "-222, Data out of range; -113, Undefined header" in info.value.message
    assert isinstance(info.value, roles.InstrumentError)


def test_clear_and_sweep_polling_protocol():
    comm = [("*CLS", None), (":INIT:SMOD SING", None), (":INIT", None),
            (":STAT:OPER:EVEN?", "0"), (":STAT:OPER:EVEN?", "+0"), (":STAT:OPER:EVEN?", "+1")]
    with expected_protocol(AQ6370, comm) as inst:
        inst.single_sweep(timeout_s=5)


def test_login_protocol_hides_nothing_but_the_log():
    comm = [('OPEN "anonymous"', "AUTHENTICATE CRAM-MD5."), ("s3cret", "ready")]
    with expected_protocol(AQ6370, comm) as inst:
        inst.login("anonymous", "s3cret")


# -- pure codecs -----------------------------------------------------------------------------------
def test_parse_ieee_block():
    data = np.array([1.5, -2.0, 1e-3], "<f4")
    raw = b"#212" + data.tobytes()
    np.testing.assert_array_equal(parse_ieee_block(raw, "<f4"), data)
    np.testing.assert_array_equal(parse_ieee_block(raw + b"\r\n", "<f4"), data)
    assert ieee_block_header(b"#3024xyz") == (5, 24)
    assert parse_ieee_block(b"#10", "<f8").size == 0
    for bad, match in [(raw[:-1], "declares 12 bytes"), (raw + b"x", "unexpected bytes"),
                       (b"#15" + bytes(5), "multiple of 4"), (b"#0" + bytes(8), "definite-length"),
                       (b"12,3", "not an IEEE"), (b"#2x4", "length field")]:
        with pytest.raises(ValueError, match=match):
            parse_ieee_block(bad, "<f4")


def test_check_wavelength_axis():
    x = np.linspace(1500e-9, 1600e-9, 11).astype("<f4")
    check_wavelength_axis(x, 1500e-9, 1600e-9)  # float32 rounding within tolerance
    with pytest.raises(OSAError, match="only when byte-swapped"):
        check_wavelength_axis(x.byteswap(), 1500e-9, 1600e-9)
    with pytest.raises(OSAError, match="not increasing"):
        check_wavelength_axis(x[::-1], 1500e-9, 1600e-9)
    with pytest.raises(OSAError, match="not increasing"):
        check_wavelength_axis(x, 1500e-9, 1550e-9)


# -- thin PyVISA parts over a real socket ----------------------------------------------------------
def open_osa(srv: ScpiTranscript, term: str = "\n", timeout_s: float = 2.0) -> AQ6370:
    return AQ6370(srv.resource, read_termination=term, write_termination=term, timeout_s=timeout_s)


def floats_with_newlines(n: int, dtype: str = "<f4") -> np.ndarray:
    """Floats whose little-endian bytes hold 0x0A and 0x0D 0x0A (the pyvisa-py pitfall)."""
    y = np.linspace(1e-6, 2e-6, n).astype(dtype)
    size = np.dtype(dtype).itemsize
    y[::7] = np.frombuffer(b"\x0a" * (size - 2) + b"\x0d\x0a", dtype)[0]
    y[3::7] = np.frombuffer(b"\x0d\x0a" + b"\x0a" * (size - 3) + b"\x3a", dtype)[0]
    return y


def test_login_over_lan_with_crlf():
    steps = lines(('OPEN "anonymous"', "AUTHENTICATE CRAM-MD5."), ("s3cret", "ready"), ("*IDN?", IDN),
                  term=b"\r\n")
    with ScpiTranscript(steps) as srv:
        inst = open_osa(srv, "\r\n")
        inst.login("anonymous", "s3cret")
        assert inst.id == IDN
        inst.adapter.close()
    srv.verify()


def test_login_refused():
    steps = lines(('OPEN "anonymous"', "AUTHENTICATE CRAM-MD5."), ("wrong", "error"), term=b"\r\n")
    with ScpiTranscript(steps) as srv:
        inst = open_osa(srv, "\r\n")
        with pytest.raises(OSAError, match="login refused for user 'anonymous'") as info:
            inst.login("anonymous", "wrong")
        assert "wrong" not in str(info.value)
        inst.adapter.close()
    srv.verify()


@pytest.mark.parametrize(("term", "fmt"), [(b"\n", "REAL,32"), (b"\r\n", "REAL,64")])
def test_block_with_newline_bytes_is_read_by_length(term, fmt):
    y = floats_with_newlines(64, "<f4" if fmt == "REAL,32" else "<f8")
    payload = y.tobytes()
    assert b"\n" in payload and b"\r\n" in payload
    steps = [Step(b":TRAC:Y? TRA" + term, block(payload, term)), *lines(("*IDN?", IDN), term=term)]
    with ScpiTranscript(steps) as srv:
        inst = open_osa(srv, term.decode())
        got = inst.read_trace("Y", "TRA", fmt)
        np.testing.assert_array_equal(got, y)
        assert inst.id == IDN  # the terminator after the block was consumed, termination restored
        inst.adapter.close()
    srv.verify()


def test_large_block_read_by_length():
    x = np.linspace(600e-9, 1700e-9, 50001)
    steps = [Step(b":TRAC:X? TRA\n", block(x.astype("<f8").tobytes()))]
    with ScpiTranscript(steps) as srv:
        inst = open_osa(srv)
        np.testing.assert_array_equal(inst.read_trace("X", "TRA", "REAL,64"), x)
        inst.adapter.close()
    srv.verify()


def test_ascii_trace():
    steps = lines((":FORM:DATA?", "ASCII"), (":TRAC:Y? TRA", "+1.00000000E-006,+2.50000000E-007"))
    with ScpiTranscript(steps) as srv:
        inst = open_osa(srv)
        assert inst.read_trace("Y").tolist() == [1e-6, 2.5e-7]
        inst.adapter.close()
    srv.verify()


@pytest.mark.parametrize(
    ("reply", "match"),
    [(b"+1.0,+2.0\n", r"expected a definite-length block, got b'\+1.0,\+2.0\\n'"),
     (b"#18" + bytes(8) + b"xx\n", "unexpected bytes after the block"),
     (b"#15" + bytes(5) + b"\n", "multiple of 4")],
)
def test_malformed_blocks(reply, match):
    with ScpiTranscript([Step(b":TRAC:Y? TRA\n", reply), *lines(("*IDN?", IDN))]) as srv:
        inst = open_osa(srv)
        with pytest.raises(OSAError, match=match) as info:
            inst.read_trace("Y", "TRA", "REAL,32")
        assert info.value.command == ":TRAC:Y? TRA"
        assert inst.id == IDN  # the bad reply was consumed whole: the session is still in step
        inst.adapter.close()
    srv.verify()


def test_sweep_that_never_completes_times_out():
    steps = [*lines(("*CLS", None), (":INIT:SMOD SING", None), (":INIT", None)),
             Step(b":STAT:OPER:EVEN?\n", b"0\n", repeat=True)]
    with ScpiTranscript(steps) as srv:
        inst = open_osa(srv)
        with pytest.raises(OSAError, match=r"sweep did not complete within 0.1 s \(:STAT:OPER:EVEN\? still 0\)"):
            inst.single_sweep(timeout_s=0.1)
        inst.adapter.close()
    srv.verify()


def test_silent_instrument_times_out_naming_the_command():
    with ScpiTranscript([Step(b":SENS:SWE:POIN?\n", None)]) as srv:
        inst = open_osa(srv, timeout_s=0.2)
        with pytest.raises(OSAError, match=r"':SENS:SWE:POIN\?': no reply") as info:
            _ = inst.sweep_points
        assert info.value.command == ":SENS:SWE:POIN?"
        inst.adapter.close()
    srv.verify()


def test_scpi_error_over_the_socket():
    steps = lines((":SENS:SWE:POIN 2001", None), (":SYST:ERR?", '-221,"Settings conflict"'),
                  (":SYST:ERR?", '0,"No error"'))
    with ScpiTranscript(steps) as srv:
        inst = open_osa(srv)
        with pytest.raises(OSAError, match=r"':SENS:SWE:POIN 2001': instrument error: -221, Settings conflict"):
            inst.sweep_points = 2001
        inst.adapter.close()
    srv.verify()


# -- the Sensor role -------------------------------------------------------------------------------
START, STOP, POINTS = 1500e-9, 1600e-9, 101
X = np.linspace(START, STOP, POINTS)


def sweep_steps(term: bytes, polls: int = 1) -> list[Step]:
    pairs = [("*CLS", None), (":INIT:SMOD SING", None), (":INIT", None)]
    pairs += [(":STAT:OPER:EVEN?", "0")] * (polls - 1) + [(":STAT:OPER:EVEN?", "1")]
    return lines(*pairs, term=term)


def connect_steps(term: bytes, x_block: bytes) -> list[Step]:
    err = (":SYST:ERR?", '0,"No error"')
    return [
        *lines(('OPEN "anonymous"', "AUTHENTICATE CRAM-MD5."), ("pw", "ready"), ("*CLS", None),
               (":TRAC:ACT TRA", None), ("*IDN?", IDN),
               (":SENS:WAV:STAR 1.5e-06", None), err, (":SENS:WAV:STOP 1.6e-06", None), err,
               (":SENS:SWE:POIN 101", None), err, (":FORM:DATA REAL,32", None), err,
               (":SENS:WAV:STAR?", "+1.50000000E-006"), (":SENS:WAV:STOP?", "+1.60000000E-006"),
               (":SENS:SWE:POIN?", "+101"), (":SENS:BWID:RES?", "+1.00000000E-010"),
               (":DISP:TRAC:Y1:SPAC LIN", None), err, term=term),
        *sweep_steps(term, polls=2),
        Step(b":TRAC:X? TRA" + term, block(X.astype("<f4").tobytes(), term)),
    ]


def make_sensor(srv: ScpiTranscript, term: str = "\r\n", **kwargs) -> OSASensor:
    return OSASensor(srv.resource, user="anonymous", password="pw", read_termination=term,
                     write_termination=term, timeout_s=2, start_m=START, stop_m=STOP, points=POINTS, **kwargs)


def test_sensor_connect_and_acquire():
    term = b"\r\n"
    y = floats_with_newlines(POINTS)
    steps = [*connect_steps(term, b""), *sweep_steps(term), Step(b":TRAC:Y? TRA\r\n", block(y.tobytes(), term)),
             *sweep_steps(term), Step(b":TRAC:Y? TRA\r\n", block(y.tobytes(), term))]
    with ScpiTranscript(steps) as srv:
        osa = make_sensor(srv, full_scale_w=float(y.max()))
        assert isinstance(osa, roles.Sensor)
        osa.connect()
        assert osa.identify() == IDN and osa.n_outputs == POINTS
        axis = osa.axis()  # cached: no sweep, no :TRAC:X?
        assert axis["name"] == "wavelength" and axis["unit"] == "m"
        np.testing.assert_allclose(axis["values"], X, rtol=1e-7)
        trace, flags = osa.acquire()
        assert trace.dtype == np.float32 and trace.shape == (POINTS,)
        np.testing.assert_array_equal(trace, y)
        assert flags == roles.FLAG_SATURATED
        osa.configure(full_scale_w=1.0)  # no instrument command
        assert osa.acquire()[1] == 0
        assert osa.settings() == {"start_m": START, "stop_m": STOP, "points": POINTS, "resolution_m": 1e-10,
                                  "data_format": "REAL,32", "full_scale_w": 1.0, "sweep_timeout_s": 60.0}
        osa.close()
    srv.verify()


def test_sensor_rejects_a_byte_swapped_axis():
    term = b"\r\n"
    steps = connect_steps(term, b"")
    steps[-1] = Step(b":TRAC:X? TRA\r\n", block(X.astype(">f4").tobytes(), term))
    with ScpiTranscript(steps) as srv:
        osa = make_sensor(srv)
        with pytest.raises(OSAError, match="only when byte-swapped"):
            osa.connect()
        assert osa.inst is None  # closed again
    srv.verify()


def test_sensor_reconfigure_rereads_the_axis():
    term = b"\n"
    x2 = np.linspace(1550e-9, 1560e-9, 201)
    steps = [*connect_steps(term, b"")[2:]]  # no login
    steps += lines((":SENS:SWE:POIN 201", None), (":SYST:ERR?", '0,"No error"'),
                   (":SENS:WAV:STAR?", "+1.55000000E-006"), (":SENS:WAV:STOP?", "+1.56000000E-006"),
                   (":SENS:SWE:POIN?", "+201"), (":SENS:BWID:RES?", "+1.00000000E-010"))
    steps += [*sweep_steps(term), Step(b":TRAC:X? TRA\n", block(x2.astype("<f4").tobytes()))]
    with ScpiTranscript(steps) as srv:
        osa = OSASensor(srv.resource, timeout_s=2, start_m=START, stop_m=STOP, points=POINTS)
        osa.connect()
        osa.configure(points=201)
        assert osa.n_outputs == 201 and len(osa.axis()["values"]) == 201
        osa.close()
    srv.verify()


def test_sensor_settings_are_validated_before_anything_is_sent():
    osa = OSASensor("TCPIP::127.0.0.1::1::SOCKET")
    for kwargs, match in [({"start_m": 100e-9}, "start_m"), ({"points": 7}, "points"),
                          ({"resolution_m": 0.3e-9}, "resolution_m"), ({"data_format": "INT"}, "data_format"),
                          ({"start_m": 1600e-9, "stop_m": 1500e-9}, "stop_m: must be above"),
                          ({"full_scale_w": -1}, "full_scale_w"), ({"sweep_timeout_s": 0}, "sweep_timeout_s"),
                          ({"gain": 1}, "unknown setting 'gain'")]:
        with pytest.raises(ValueError, match=match):
            osa.configure(**kwargs)
    osa.configure(points=2001, resolution_m=0.02e-9)
    assert osa.settings()["points"] == 2001 and osa.n_outputs == 0  # known for sure only after connect


def test_sensor_connection_refused_is_an_osa_error():
    address = f"TCPIP::127.0.0.1::{free_port()}::SOCKET"
    osa = OSASensor(address, timeout_s=1)
    with pytest.raises(OSAError, match="(?i)connection refused") as info:
        osa.connect()
    assert address in str(info.value)
    with pytest.raises(OSAError, match="not connected"):
        osa.acquire()


def test_seabreeze_module_imports_without_seabreeze():
    from labpnn.drivers.seabreeze_spectrometer import SeabreezeSpectrometer, SpectrometerError

    try:
        import seabreeze  # noqa: F401
    except ImportError:
        spec = SeabreezeSpectrometer()
        with pytest.raises(SpectrometerError, match="python-seabreeze is not installed"):
            spec.connect()
    else:  # pragma: no cover - only where seabreeze is installed
        pytest.skip("seabreeze is installed here")


def test_socket_has_nagle_off():
    """Write-then-query must not wait for the peer's delayed ACK (NI-VISA's default is NODELAY)."""
    import socket

    with ScpiTranscript([]) as srv:
        inst = open_osa(srv)
        res = inst.adapter.connection
        sock = res.visalib.sessions[res.session].interface
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        inst.adapter.close()
    srv.verify()
