"""VNA driver: protocol tables for the declarative properties and the dialect commands (pymeasure's
expected_protocol), and the thin PyVISA parts (blocks read by length in both byte orders, the
byte-order check, the sweep wait, a silent instrument, the Sensor's whole conversation) against a
transcript-replaying socket server through real PyVISA / pyvisa-py.

Transcripts are written from the PNA / ZNB remote-command syntax (FIELD-NOTES), never from the emulator.
"""
from __future__ import annotations

import numpy as np
import pytest
from driver_transcripts import ScpiTranscript, Step, block, free_port, lines
from pymeasure.test import expected_protocol

from labpnn.drivers import roles
from labpnn.drivers.vna import (
    VNA,
    VNAError,
    VNASensor,
    block_dtype,
    check_stimulus,
    ieee_block_header,
    parse_ieee_block,
)

NO_ERROR = ("SYST:ERR?", '0,"No error"')
PNA_IDN = "Keysight Technologies,N5222B,MY12345678,A.17.20.07"
ZNB_IDN = "Rohde-Schwarz,ZNB8-4Port,1311601062101234,3.45"


# -- declarative properties: protocol tables -------------------------------------------------------
@pytest.mark.parametrize("dialect", ["pna", "znb"])
@pytest.mark.parametrize(
    ("prop", "value", "command"),
    [
        ("start_frequency", 1e9, "SENS1:FREQ:STAR 1000000000"),
        ("stop_frequency", 2.4500000001e9, "SENS1:FREQ:STOP 2450000000.1"),
        ("points", 201, "SENS1:SWE:POIN 201"),
        ("points", 1601.0, "SENS1:SWE:POIN 1601"),
        ("if_bandwidth", 1e3, "SENS1:BWID 1000"),
        ("power", -10, "SOUR1:POW -10"),
        ("power", -7.5, "SOUR1:POW -7.5"),
        ("data_format", "REAL,32", "FORM REAL,32"),
        ("data_format", "real,64", "FORM REAL,64"),
        ("data_format", "ASCii", "FORM ASC,0"),
        ("byte_order", "swap", "FORM:BORD SWAP"),
        ("byte_order", "NORMal", "FORM:BORD NORM"),
    ],
)
def test_set_property_then_checks_error_queue(dialect, prop, value, command):
    with expected_protocol(VNA, [(command, None), NO_ERROR], dialect=dialect) as inst:
        setattr(inst, prop, value)


@pytest.mark.parametrize(
    ("prop", "command", "reply", "value"),
    [
        ("start_frequency", "SENS1:FREQ:STAR?", "+1.00000000000E+09", 1e9),
        ("stop_frequency", "SENS1:FREQ:STOP?", "+2.50000000000E+09", 2.5e9),
        ("points", "SENS1:SWE:POIN?", "+201", 201),
        ("if_bandwidth", "SENS1:BWID?", "+1.50000000000E+03", 1500.0),
        ("power", "SOUR1:POW?", "-1.00000000000E+01", -10.0),
        ("data_format", "FORM?", "REAL,+32", "REAL,32"),  # PNAs may answer with a sign
        ("data_format", "FORM?", "REAL,64", "REAL,64"),
        ("data_format", "FORM?", "ASC,+0", "ASCII"),
        ("byte_order", "FORM:BORD?", "SWAP", "SWAP"),
        ("byte_order", "FORM:BORD?", "NORM", "NORM"),
        ("sweep_time", "SENS1:SWE:TIME?", "+2.41000000000E-01", 0.241),
        ("id", "*IDN?", PNA_IDN, PNA_IDN),
    ],
)
def test_get_property(prop, command, reply, value):
    with expected_protocol(VNA, [(command, reply)]) as inst:
        assert getattr(inst, prop) == value


@pytest.mark.parametrize(
    ("prop", "value"),
    [("start_frequency", 100.0), ("stop_frequency", float("nan")), ("points", 0), ("points", 100002),
     ("points", 201.5), ("points", True), ("if_bandwidth", 0.5), ("if_bandwidth", 20e6), ("power", 40),
     ("power", "high"), ("data_format", "REAL,16"), ("byte_order", "BIG")],
)
def test_invalid_setting_sends_nothing(prop, value):
    with expected_protocol(VNA, []) as inst, pytest.raises(ValueError):
        setattr(inst, prop, value)


def test_scpi_error_after_a_setting_raises_with_command_and_message():
    comm = [("SENS1:FREQ:STAR 1000000", None), ("SYST:ERR?", '-222,"Data out of range"'),
            ("SYST:ERR?", '-113,"Undefined header"'), NO_ERROR]
    with expected_protocol(VNA, comm) as inst, pytest.raises(VNAError) as info:
        inst.start_frequency = 1e6
    assert info.value.command == "SENS1:FREQ:STAR 1000000"
    assert "-222, Data out of range; -113, Undefined header" in info.value.message
    assert isinstance(info.value, roles.InstrumentError)


# -- dialect commands ------------------------------------------------------------------------------
def test_pna_defines_a_missing_measurement_and_selects_it():
    comm = [("CALC1:PAR:CAT:EXT?", '"CH1_S11_1,S11"'), ("CALC1:PAR:DEF:EXT 'labpnn_S21','S21'", None), NO_ERROR,
            ("CALC1:PAR:SEL 'labpnn_S21'", None), NO_ERROR, ("SENS1:SWE:MODE HOLD", None), NO_ERROR]
    with expected_protocol(VNA, comm) as inst:
        inst.use_measurement("labpnn_S21", "s21")
        inst.hold()


def test_pna_empty_catalog():
    comm = [("CALC1:PAR:CAT:EXT?", '"NO CATALOG"')]
    with expected_protocol(VNA, comm) as inst:
        assert inst.catalog() == {}


def test_znb_reuses_an_existing_trace():
    comm = [("CALC1:PAR:CAT?", "'Trc1,S11,labpnn_S21,S21'"), ("CALC1:PAR:SEL 'labpnn_S21'", None), NO_ERROR,
            ("INIT1:CONT OFF", None), NO_ERROR]
    with expected_protocol(VNA, comm, dialect="znb") as inst:
        inst.use_measurement("labpnn_S21")
        inst.hold()


def test_znb_defines_with_sdef():
    comm = [("CALC1:PAR:CAT?", "'Trc1,S11'"), ("CALC1:PAR:SDEF 'm','S21'", None), NO_ERROR,
            ("CALC1:PAR:SEL 'm'", None), NO_ERROR]
    with expected_protocol(VNA, comm, dialect="znb") as inst:
        inst.use_measurement("m")


def test_a_measurement_of_another_parameter_is_not_reused():
    with expected_protocol(VNA, [("CALC1:PAR:CAT:EXT?", '"m,S11"')]) as inst, \
            pytest.raises(VNAError, match="exists and measures S11, not S21"):
        inst.use_measurement("m", "S21")
    with expected_protocol(VNA, []) as inst, pytest.raises(ValueError, match="quotes"):
        inst.use_measurement("it's")


def test_expected_sweep_time_is_at_least_points_over_ifbw():
    with expected_protocol(VNA, [("SENS1:SWE:TIME?", "+1.00000000000E-03"),
                                 ("SENS1:SWE:TIME?", "+9.00000000000E-01")]) as inst:
        assert inst.expected_sweep_s(201, 1e3) == pytest.approx(0.201)
        assert inst.expected_sweep_s(201, 1e3) == pytest.approx(0.9)


def test_unknown_dialect():
    with pytest.raises(ValueError, match="dialect"):
        VNA("TCPIP::127.0.0.1::1::SOCKET", dialect="hp8510")


# -- pure codecs -----------------------------------------------------------------------------------
def test_parse_ieee_block_and_dtypes():
    data = np.array([1.5, -2.0, 1e-3], ">f4")
    raw = b"#212" + data.tobytes()
    np.testing.assert_array_equal(parse_ieee_block(raw + b"\n", ">f4"), data)
    assert ieee_block_header(b"#3024xyz") == (5, 24)
    for bad, match in [(raw[:-1], "declares 12 bytes"), (raw + b"x", "unexpected bytes"),
                       (b"#15" + bytes(5), "multiple of 4"), (b"#0" + bytes(8), "definite-length"),
                       (b"1,2", "not an IEEE"), (b"#2x4", "length field")]:
        with pytest.raises(ValueError, match=match):
            parse_ieee_block(bad, ">f4")
    assert block_dtype("REAL,32", "SWAP") == np.dtype("<f4")
    assert block_dtype("REAL,64", "NORM") == np.dtype(">f8")
    assert block_dtype("REAL,32", "SWAP", swap_reversed=True) == np.dtype(">f4")
    with pytest.raises(ValueError):
        block_dtype("ASCII", "SWAP")


def test_check_stimulus():
    f = np.linspace(1e9, 2e9, 11)
    check_stimulus(f.astype("<f4"), 1e9, 2e9, 11)  # float32 rounding within tolerance
    check_stimulus(np.array([1.5e9]), 1e9, 2e9, 1)  # one point sits at the centre
    with pytest.raises(VNAError, match="only when byte-swapped"):
        check_stimulus(f.astype("<f8").view(">f8"), 1e9, 2e9, 11)
    with pytest.raises(VNAError, match="not 11 increasing values"):
        check_stimulus(f[::-1], 1e9, 2e9, 11)
    with pytest.raises(VNAError, match=r"\(10 values"):
        check_stimulus(f[:10], 1e9, 2e9, 11)
    with pytest.raises(VNAError, match="not 11 increasing"):
        check_stimulus(f + 1e4, 1e9, 2e9, 11)  # 10 kHz off: not the frequencies that were set


# -- thin PyVISA parts over a real socket ----------------------------------------------------------
def open_vna(srv: ScpiTranscript, dialect: str = "pna", timeout_s: float = 2.0) -> VNA:
    return VNA(srv.resource, dialect=dialect, timeout_s=timeout_s)


def s21_with_newlines(n: int) -> np.ndarray:
    """Complex values whose float32 bytes (either order) hold 0x0A and 0x0D 0x0A."""
    nl = np.frombuffer(b"\x0a\x0d\x0a\x3f" * n, "<f4")[:n]
    return nl.astype(np.float64) + 1j * np.linspace(-0.5, 0.5, n)


def interleaved(s21: np.ndarray, dtype: str) -> bytes:
    values = np.empty(2 * s21.size)
    values[0::2], values[1::2] = s21.real, s21.imag
    return values.astype(dtype).tobytes()


@pytest.mark.parametrize(("dialect", "order", "dtype"),
                         [("pna", "SWAP", "<f4"), ("pna", "NORM", ">f4"), ("znb", "SWAP", "<f4"),
                          ("znb", "NORM", ">f4")])
def test_sdata_block_with_newline_bytes_is_read_by_length(dialect, order, dtype):
    s21 = s21_with_newlines(64)
    payload = interleaved(s21, dtype)
    assert b"\n" in payload
    command = {"pna": b"CALC1:DATA? SDATA\n", "znb": b"CALC1:DATA? SDAT\n"}[dialect]
    with ScpiTranscript([Step(command, block(payload)), *lines(("*IDN?", PNA_IDN))]) as srv:
        inst = open_vna(srv, dialect)
        got = inst.read_sdata("REAL,32", order)
        np.testing.assert_array_equal(got, s21.astype(np.complex64))  # float32 on the wire: bytes copied
        assert inst.id == PNA_IDN  # the terminator after the block was consumed
        inst.adapter.close()
    srv.verify()


def test_stimulus_as_real64_big_endian_and_ascii_fdata():
    f = np.linspace(1e9, 2e9, 5001)
    steps = [Step(b"SENS1:X?\n", block(f.astype(">f8").tobytes())),
             *lines(("FORM?", "ASC,+0"), ("CALC1:DATA? FDATA", "-3.01000000000E+00,-6.02000000000E+00"))]
    with ScpiTranscript(steps) as srv:
        inst = open_vna(srv)
        np.testing.assert_array_equal(inst.read_stimulus("REAL,64", "NORM"), f)
        assert inst.read_fdata().tolist() == [-3.01, -6.02]
        inst.adapter.close()
    srv.verify()


@pytest.mark.parametrize(
    ("reply", "match"),
    [(b"+1.0,+2.0\n", r"expected a definite-length block, got b'\+1.0,\+2.0\\n'"),
     (b"#18" + bytes(8) + b"xx\n", "unexpected bytes after the block"),
     (b"#15" + bytes(5) + b"\n", "multiple of 4"),
     (b"#212" + bytes(12) + b"\n", "odd number of values")],
)
def test_malformed_blocks(reply, match):
    with ScpiTranscript([Step(b"CALC1:DATA? SDATA\n", reply), *lines(("*IDN?", PNA_IDN))]) as srv:
        inst = open_vna(srv)
        with pytest.raises(VNAError, match=match) as info:
            inst.read_sdata("REAL,32", "SWAP")
        assert info.value.command == "CALC1:DATA? SDATA"
        assert inst.id == PNA_IDN  # the bad reply was consumed whole: the session is still in step
        inst.adapter.close()
    srv.verify()


@pytest.mark.parametrize(("dialect", "command"),
                         [("pna", b"SENS1:SWE:MODE SING;*OPC?\n"), ("znb", b"INIT1:IMM;*OPC?\n")])
def test_single_sweep_waits_for_opc(dialect, command):
    with ScpiTranscript([Step(command, b"1\n"), Step(command, b"+1\n")]) as srv:
        inst = open_vna(srv, dialect)
        inst.single_sweep(expected_s=0.01)
        with pytest.raises(VNAError, match="expected '1' when the sweep ends, got '\\+1'"):
            inst.single_sweep(expected_s=0.01)
        assert inst.adapter.connection.timeout == 2000  # restored after the sweep
        inst.adapter.close()
    srv.verify()


def test_sweep_that_never_ends_times_out_with_the_scaled_limit():
    with ScpiTranscript([Step(b"SENS1:SWE:MODE SING;*OPC?\n", None)]) as srv:
        inst = open_vna(srv, timeout_s=0.2)
        with pytest.raises(VNAError, match=r"sweep did not complete within 0.35 s \(expected 0.1 s\)") as info:
            inst.single_sweep(expected_s=0.1)
        assert info.value.command == "SENS1:SWE:MODE SING;*OPC?"
        inst.adapter.close()
    srv.verify()


def test_silent_instrument_times_out_naming_the_command():
    with ScpiTranscript([Step(b"SENS1:SWE:POIN?\n", None)]) as srv:
        inst = open_vna(srv, timeout_s=0.2)
        with pytest.raises(VNAError, match=r"'SENS1:SWE:POIN\?': no reply") as info:
            _ = inst.points
        assert info.value.command == "SENS1:SWE:POIN?"
        inst.adapter.close()
    srv.verify()


# -- the Sensor role -------------------------------------------------------------------------------
START, STOP, POINTS = 1e9, 2e9, 11
FREQS = np.linspace(START, STOP, POINTS)


def connect_steps(x_block: bytes, catalog: str = '"CH1_S11_1,S11"') -> list[Step]:
    err = NO_ERROR
    return [
        *lines(("*CLS", None), ("*IDN?", PNA_IDN), ("SENS1:SWE:MODE HOLD", None), err,
               ("CALC1:PAR:CAT:EXT?", catalog), ("CALC1:PAR:DEF:EXT 'labpnn_S21','S21'", None), err,
               ("CALC1:PAR:SEL 'labpnn_S21'", None), err,
               ("SENS1:FREQ:STAR 1000000000", None), err, ("SENS1:FREQ:STOP 2000000000", None), err,
               ("SENS1:SWE:POIN 11", None), err, ("SENS1:BWID 1000", None), err, ("SOUR1:POW -10", None), err,
               ("FORM:BORD SWAP", None), err, ("FORM REAL,32", None), err,
               ("SENS1:FREQ:STAR?", "+1.00000000000E+09"), ("SENS1:FREQ:STOP?", "+2.00000000000E+09"),
               ("SENS1:SWE:POIN?", "+11"), ("SENS1:BWID?", "+1.00000000000E+03"),
               ("SOUR1:POW?", "-1.00000000000E+01"), ("SENS1:SWE:TIME?", "+1.82000000000E-02"),
               ("FORM REAL,64", None), err),
        Step(b"SENS1:X?\n", x_block),
        *lines(("FORM REAL,32", None), err),
    ]


def make_sensor(srv: ScpiTranscript, **kwargs) -> VNASensor:
    return VNASensor(srv.resource, timeout_s=2, start_hz=START, stop_hz=STOP, points=POINTS,
                     if_bandwidth_hz=1e3, power_dbm=-10, **kwargs)


@pytest.mark.parametrize("output", ["db", "mag", "reim"])
def test_sensor_connect_and_acquire(output):
    s21 = s21_with_newlines(POINTS) * 0.1
    sweep = [Step(b"SENS1:SWE:MODE SING;*OPC?\n", b"1\n"),
             Step(b"CALC1:DATA? SDATA\n", block(interleaved(s21, "<f4")))]
    with ScpiTranscript([*connect_steps(block(FREQS.astype("<f8").tobytes())), *sweep]) as srv:
        vna = make_sensor(srv, output=output)
        assert isinstance(vna, roles.Sensor)
        vna.connect()
        assert vna.identify() == PNA_IDN
        assert vna.n_outputs == (2 * POINTS if output == "reim" else POINTS)
        axis = vna.axis()  # cached: nothing sent
        assert axis["unit"] == "Hz" and len(axis["values"]) == vna.n_outputs
        np.testing.assert_array_equal(axis["values"][:POINTS], FREQS)
        trace, flags = vna.acquire()
        assert trace.dtype == np.float32 and trace.shape == (vna.n_outputs,) and flags == 0
        s21_32 = s21.astype(np.complex64).astype(np.complex128)  # what the wire carried
        expected = {"mag": np.abs(s21_32), "db": 20 * np.log10(np.abs(s21_32)),
                    "reim": np.concatenate([s21_32.real, s21_32.imag])}[output]
        # one float32 rounding of the result
        np.testing.assert_allclose(trace, expected, rtol=2e-7, atol=1e-7 * np.abs(expected).max())
        settings = vna.settings()
        assert settings["points"] == POINTS and settings["sweep_time_s"] == pytest.approx(0.0182)
        vna.close()
    srv.verify()


def test_sensor_rejects_a_byte_swapped_stimulus():
    # the instrument sends big-endian although FORM:BORD SWAP was set (a reversed R&S-style model)
    steps = connect_steps(block(FREQS.astype(">f8").tobytes()))
    with ScpiTranscript(steps) as srv:
        vna = make_sensor(srv)
        with pytest.raises(VNAError, match="only when byte-swapped") as info:
            vna.connect()
        assert "swap_reversed=True" in str(info.value)
        assert vna.inst is None  # closed again
    srv.verify()


def test_sensor_with_swap_reversed_reads_that_model():
    steps = connect_steps(block(FREQS.astype(">f8").tobytes()))
    with ScpiTranscript(steps) as srv:
        vna = make_sensor(srv, swap_reversed=True)
        vna.connect()
        np.testing.assert_array_equal(vna.axis()["values"], FREQS)
        vna.close()
    srv.verify()


def test_sensor_closes_the_session_after_a_sweep_timeout():
    steps = [*connect_steps(block(FREQS.astype("<f8").tobytes())), Step(b"SENS1:SWE:MODE SING;*OPC?\n", None)]
    with ScpiTranscript(steps) as srv:
        vna = make_sensor(srv)
        vna.timeout_s = 0.1
        vna.connect()
        with pytest.raises(VNAError, match="sweep did not complete"):
            vna.acquire()
        assert vna.inst is None
        with pytest.raises(VNAError, match="not connected"):
            vna.acquire()
    srv.verify()


def test_sensor_settings_are_validated_before_anything_is_sent():
    vna = VNASensor("TCPIP::127.0.0.1::1::SOCKET")
    for kwargs, match in [({"start_hz": 10.0}, "start_hz"), ({"points": 0}, "points"),
                          ({"if_bandwidth_hz": 0}, "if_bandwidth_hz"), ({"power_dbm": 99}, "power_dbm"),
                          ({"output": "phase"}, "output"), ({"data_format": "INT"}, "data_format"),
                          ({"byte_order": "LE"}, "byte_order"),
                          ({"start_hz": 2e9, "stop_hz": 1e9}, "stop_hz: must be above"),
                          ({"gain": 1}, "unknown setting 'gain'")]:
        with pytest.raises(ValueError, match=match):
            vna.configure(**kwargs)
    vna.configure(points=401, output="reim")
    assert vna.settings()["points"] == 401 and vna.n_outputs == 802
    with pytest.raises(ValueError, match="dialect"):
        VNASensor("TCPIP::127.0.0.1::1::SOCKET", dialect="hp8510")


def test_sensor_connection_refused_is_a_vna_error():
    address = f"TCPIP::127.0.0.1::{free_port()}::SOCKET"
    vna = VNASensor(address, timeout_s=1)
    with pytest.raises(VNAError, match="(?i)connection refused") as info:
        vna.connect()
    assert address in str(info.value)
    with pytest.raises(VNAError, match="not connected"):
        vna.acquire()
