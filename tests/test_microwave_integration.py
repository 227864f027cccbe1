"""The whole microwave chain: the metasurface controller emulator on a real pseudo-terminal driven by
the pyserial driver, the VNA emulator on a real TCP socket read by the PyVISA driver, both on one
cavity. A pattern set through the controller is the one the sweep measures; a sweep started before
the settle time ends measures the old one; a silent controller and a wrong read-back are reported;
``labpnn sim microwave`` (the module's ``main``) serves both and stops on SIGTERM. The rig's
overlapped loop on both emulators (a cavity whose S21 spells out the pattern it saw): every row's
trace is its own pattern's, no pattern goes out before the previous sweep has ended, and a wrong
read-back or a silent controller fails its own row, keeping the rows before it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from labpnn.drivers.metasurface import MetasurfaceActuator, RISReadbackError, RISTimeoutError
from labpnn.drivers.vna import VNASensor
from labpnn.sim_instruments.metasurface_cavity import CavityConfig, vna_noise_sigmas
from labpnn.sim_instruments.microwave_bench import MicrowaveBenchEmulators

POINTS, IFBW, POWER = 41, 10e3, -10.0
SETTLE_S = 0.3


@pytest.fixture(scope="module", params=["pna", "znb"])
def chain(request):
    config = CavityConfig(drift_scale=0.0)  # no thermal wander between a sweep and the reference
    bench = MicrowaveBenchEmulators(config, settle_s=SETTLE_S, dialect=request.param).start()
    cavity = bench.cavity
    start, stop = config.band_start_hz, config.band_stop_hz
    vna = VNASensor(bench.vna_resource, dialect=request.param, output="reim", start_hz=start, stop_hz=stop,
                    points=POINTS, if_bandwidth_hz=IFBW, power_dbm=POWER, timeout_s=5)
    meta = MetasurfaceActuator(bench.serial_port, atoms=range(cavity.n_meta), settle_s=SETTLE_S, timeout_s=0.3)
    vna.connect()
    meta.connect()
    vna.acquire()  # the cavity's per-frequency precompute for this band (~0.5 s, once)
    yield bench, vna, meta
    meta.close()
    vna.close()
    bench.stop()


def s21_of(trace: np.ndarray) -> np.ndarray:
    return trace[:POINTS].astype(np.float64) + 1j * trace[POINTS:].astype(np.float64)


def assert_measures(bench, vna, trace: np.ndarray, states: np.ndarray) -> None:
    """``trace`` is the cavity's S21 for ``states`` within the VNA noise (6 sigma) and float32 rounding."""
    f = np.array(vna.axis()["values"][:POINTS])
    ref = bench.cavity.channel(states, f)
    sig_re, sig_im, sig_add = vna_noise_sigmas(IFBW, POWER)
    tol = 6 * (np.hypot(sig_re, sig_im) * np.abs(ref) + np.sqrt(2) * sig_add) + 1e-7 * np.abs(ref).max()
    err = np.abs(s21_of(trace) - ref)
    assert (err <= tol).all(), f"max error {err.max():.3g}, tolerance there {tol[np.argmax(err / tol)]:.3g}"


def controls(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n).astype(np.float32)


def test_a_pattern_set_through_the_controller_is_measured(chain):
    bench, vna, meta = chain
    traces = []
    for seed in (1, 2):
        row = controls(seed, meta.n_controls)
        applied = meta.apply(row)
        np.testing.assert_array_equal(applied, row)
        np.testing.assert_array_equal(bench.controller.latched[: meta.n_controls], row)
        time.sleep(meta.settle_s)
        trace, flags = vna.acquire()
        assert flags == 0 and trace.shape == (vna.n_outputs,)
        assert_measures(bench, vna, trace, row.astype(int))
        np.testing.assert_array_equal(bench.vna.last_states, row.astype(int))
        traces.append(s21_of(trace))
    # the two patterns give traces far apart compared with the noise: the check above discriminates
    sig_re, _, sig_add = vna_noise_sigmas(IFBW, POWER)
    assert np.abs(traces[0] - traces[1]).max() > 100 * (sig_re * np.abs(traces[0]).max() + sig_add)


def test_a_sweep_before_the_settle_time_ends_sees_the_old_pattern(chain):
    bench, vna, meta = chain
    old, new = controls(3, meta.n_controls), controls(4, meta.n_controls)
    meta.apply(old)
    time.sleep(meta.settle_s)
    meta.apply(new)
    early, _ = vna.acquire()  # at once: the controller said #OK, the cavity has not settled
    assert time.monotonic() - bench.controller.last_ok_time < SETTLE_S  # really inside the window
    assert_measures(bench, vna, early, old.astype(int))
    with pytest.raises(AssertionError):  # and not the new one
        assert_measures(bench, vna, early, new.astype(int))
    time.sleep(meta.settle_s)
    late, _ = vna.acquire()
    assert_measures(bench, vna, late, new.astype(int))


def test_a_silent_controller_is_a_timeout(chain):
    bench, vna, meta = chain
    bench.controller.silent = True
    try:
        with pytest.raises(RISTimeoutError):
            meta.apply(controls(5, meta.n_controls))
    finally:
        bench.controller.silent = False
    vna.acquire()  # the VNA is unaffected


def test_a_pattern_that_reads_back_wrong_is_reported(chain):
    bench, vna, meta = chain
    bench.controller.corrupt_readback = True
    try:
        with pytest.raises(RISReadbackError, match="differs"):
            meta.apply(controls(6, meta.n_controls))
    finally:
        bench.controller.corrupt_readback = False
    meta.apply(controls(6, meta.n_controls))


@pytest.mark.slow
def test_sim_microwave_serves_until_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "labpnn.sim_instruments.microwave_bench", "--vna-port", "0",
                             "--dialect", "znb", "--settle-ms", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        vna_line = proc.stdout.readline().split()
        meta_line = proc.stdout.readline().split()
        assert vna_line[0] == "vna" and vna_line[1].startswith("TCPIP::127.0.0.1::")
        assert meta_line[0] == "metasurface" and os.path.exists(meta_line[1])
        vna = VNASensor(vna_line[1], dialect="znb", start_hz=4.9e9, stop_hz=5.1e9, points=5, output="db")
        vna.connect()
        assert vna.identify().startswith("Rohde-Schwarz,ZNB")
        trace, _ = vna.acquire()
        assert trace.shape == (5,) and np.isfinite(trace).all()
        vna.close()
        meta = MetasurfaceActuator(meta_line[1], settle_s=0.001)
        meta.connect()
        assert "RIS-SIM" in meta.identify()
        meta.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


# -- the overlapped rig loop against both emulators -------------------------------------------------
class CodeCavity:
    """A cavity whose S21 spells out the meta-atom states (Re = 0.25 + 0.5 x state, one point per
    atom), so a trace names the pattern its sweep saw; records every sweep it serves."""

    n_meta = 16

    def __init__(self):
        self.sweeps: list[tuple[float, np.ndarray]] = []  # (monotonic time, states)

    def measure(self, states, freqs_hz, *, if_bandwidth_hz, power_dbm):
        self.sweeps.append((time.monotonic(), np.asarray(states).copy()))
        return np.resize(0.25 + 0.5 * np.asarray(states, float), len(freqs_hz)) + 0j


@pytest.fixture
def coded_rig():
    """A `Rig` (metasurface actuator + VNA sensor, overlapped) on the emulators around a `CodeCavity`,
    settle 3 ms, 16 points at 10 kHz; yields (rig, bench, pattern lines the controller acted on)."""
    from labpnn.rig import Rig

    bench = MicrowaveBenchEmulators(cavity=CodeCavity(), settle_s=0.003).start()
    lines: list[tuple[float, bytes]] = []  # (monotonic time the controller acts on a line, the line)
    handle = bench.controller._handle

    def logged(raw, line_end):
        lines.append((time.monotonic(), raw))
        handle(raw, line_end)

    bench.controller._handle = logged
    trigger, bench.sweep_ends = bench.vna._trigger, []

    def logged_trigger():
        trigger()
        bench.sweep_ends.append(bench.vna._st.sweeping_until)  # when *OPC? may answer

    bench.vna._trigger = logged_trigger
    meta = MetasurfaceActuator(bench.serial_port, atoms=range(16), settle_s=0.003, timeout_s=0.3)
    vna = VNASensor(bench.vna_resource, output="reim", start_hz=4.5e9, stop_hz=5.5e9, points=16,
                    if_bandwidth_hz=10e3, timeout_s=5)
    rig = Rig([meta], [vna]).connect()
    try:
        yield rig, bench, lines
    finally:
        rig.close()
        bench.stop()


def decoded(traces: np.ndarray) -> np.ndarray:
    return np.rint((traces[:, :16] - 0.25) / 0.5).astype(np.float32)


def test_the_overlapped_rig_returns_each_rows_trace_for_its_own_pattern(coded_rig):
    rig, bench, lines = coded_rig
    assert rig._overlapped
    rng = np.random.default_rng(7)
    x = rng.random((12, 16), dtype=np.float32)
    x[1::2] = 1 - x[0::2]  # every other row the complement: consecutive traces differ in every point
    states = (x >= 0.5).astype(np.float32)
    m = rig.measure(x)
    assert m.error is None and m.n_done == 12
    np.testing.assert_array_equal(m.applied, states)
    np.testing.assert_array_equal(decoded(m.traces), states)  # its own pattern, settled: not the one before
    np.testing.assert_array_equal(m.traces[:, 16:], 0)
    # on the wire: each pattern went out only after the previous sweep had ended
    ends = bench.sweep_ends[-12:]
    patterns = [t for t, raw in lines if raw.startswith(b"!0x")][-12:]
    assert len(ends) == len(patterns) == 12 and all(p > e for e, p in zip(ends, patterns[1:]))
    assert sum(raw == b"?Pattern" for _, raw in lines) >= 12  # and every one was read back


def test_a_wrong_read_back_fails_its_row_in_the_overlapped_rig(coded_rig):
    rig, bench, lines = coded_rig
    controller = bench.controller
    latched = controller._make_visible

    def corrupt_from_the_fourth(bits, at):  # the read-back of the 4th pattern of the batch comes back wrong
        latched(bits, at)
        if controller.patterns_latched == 4:
            controller.corrupt_readback = True

    controller._make_visible = corrupt_from_the_fourth
    x = np.eye(16, dtype=np.float32)[:6]
    m = rig.measure(x)
    controller.corrupt_readback = False
    assert m.n_done == 3 and m.error.details["instrument_error"] == "RISReadbackError"
    assert "differs from the one written in 1 bit(s)" in str(m.error) and "row 3 of 6" in str(m.error)
    np.testing.assert_array_equal(decoded(m.traces), x[:3])
    np.testing.assert_array_equal(controller.latched, np.zeros(256, np.uint8))  # then the safe state


def test_a_silent_controller_times_out_in_the_overlapped_rig_keeping_the_rows_before(coded_rig):
    rig, bench, lines = coded_rig
    handle = bench.controller._handle

    def silence_after_the_second_read_back(raw, line_end):  # row 1 is read back, row 2 gets no #OK
        handle(raw, line_end)
        if sum(line == b"?Pattern" for _, line in lines) == 2:
            bench.controller.silent = True

    bench.controller._handle = silence_after_the_second_read_back
    x = np.eye(16, dtype=np.float32)[:4]
    t0 = time.monotonic()
    m = rig.measure(x)
    bench.controller._handle = handle
    bench.controller.silent = False
    assert m.n_done == 2 and m.error.details["instrument_error"] == "RISTimeoutError"
    assert "stayed silent for 0.3 s" in str(m.error) and "row 2 of 4" in str(m.error)
    assert time.monotonic() - t0 < 3
    np.testing.assert_array_equal(decoded(m.traces), x[:2])
    m = rig.measure(x[:1])  # and the rig works again
    assert m.error is None
    np.testing.assert_array_equal(decoded(m.traces), x[:1])
