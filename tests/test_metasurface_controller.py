"""RIS controller: the codec, the driver against its emulator over a real pseudo-terminal (pyserial
opens it as a serial port), the driver against a byte-exact transcript over ``socket://``, faults
(silence, wrong read-back, dropped lines, invalid commands), the settle-time race and wire time,
and the two-step exchanges an overlapping rig uses.

Fixtures reused by the microwave integration test (import them from this module):
``make_ris_emulator(**kwargs)`` -> a started `MetasurfaceControllerEmulator` (stopped at teardown),
``ris_emulator`` (defaults, settle 2 ms), ``ris_controller`` (an open `RISController` on it).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import serial
from driver_transcripts import ScpiTranscript, Step

from labpnn.drivers import roles
from labpnn.drivers.metasurface import (
    MetasurfaceActuator,
    RISController,
    RISError,
    RISReadbackError,
    RISTimeoutError,
    bits_to_controls,
    controls_to_bits,
    hex_to_pattern,
    pattern_to_hex,
    quantise_controls,
)
from labpnn.sim_instruments.metasurface_controller import (
    MetasurfaceControllerEmulator,
    bits_to_hex,
    hex_to_bits,
)

N_BITS = 256


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def make_ris_emulator():
    """``make_ris_emulator(n_bits=256, **kwargs)`` -> a started emulator (stopped at teardown)."""
    emulators = []

    def make(n_bits: int = N_BITS, **kwargs) -> MetasurfaceControllerEmulator:
        emulator = MetasurfaceControllerEmulator(n_bits, **kwargs).start()
        emulators.append(emulator)
        return emulator

    yield make
    for emulator in emulators:
        emulator.stop()


@pytest.fixture
def ris_emulator(make_ris_emulator) -> MetasurfaceControllerEmulator:
    return make_ris_emulator()


@pytest.fixture
def ris_controller(ris_emulator):
    with RISController(ris_emulator.port, timeout_s=1.0) as controller:
        yield controller


def random_pattern(seed: int, n_bits: int = N_BITS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n_bits).astype(np.uint8)


def read_silence(port: serial.Serial, wait_s: float) -> bytes:
    """Everything the port delivers within ``wait_s`` (b"" when the controller stays silent)."""
    deadline = time.monotonic() + wait_s
    got = b""
    while time.monotonic() < deadline:
        got += port.read(max(1, port.in_waiting))
    return got


# -- codec -----------------------------------------------------------------------------------------
def test_hex_bit_order_is_msb_first():
    assert pattern_to_hex([1, 0, 0, 0, 0, 0, 0, 1]) == "81"
    assert hex_to_pattern("81").tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert hex_to_pattern("a5").tolist() == hex_to_pattern("A5").tolist() == [1, 0, 1, 0, 0, 1, 0, 1]
    bits = np.zeros(N_BITS, np.uint8)
    bits[0] = 1
    assert pattern_to_hex(bits) == "8" + "0" * 63


def test_hex_round_trip_and_agreement_with_the_emulator_codec():
    for seed in range(20):
        bits = random_pattern(seed)
        text = pattern_to_hex(bits)
        assert len(text) == 64 and text == text.upper()
        np.testing.assert_array_equal(hex_to_pattern(text, N_BITS), bits)
        # the firmware side is written independently: both must read the string the same way
        assert bits_to_hex(bits) == text
        np.testing.assert_array_equal(hex_to_bits(text), bits)


@pytest.mark.parametrize("text, n_bits, message", [
    ("12G4", None, "not a hex string"),
    ("", None, "empty"),
    ("1234", 256, "expected 64 hex digits"),
])
def test_hex_to_pattern_refuses(text, n_bits, message):
    with pytest.raises(ValueError, match=message):
        hex_to_pattern(text, n_bits)


@pytest.mark.parametrize("bits", [[1, 0, 1], [0, 1, 2, 0], np.zeros((2, 4))])
def test_pattern_to_hex_refuses(bits):
    with pytest.raises(ValueError):
        pattern_to_hex(bits)


def test_quantise_one_and_two_bits():
    levels, applied = quantise_controls(np.array([0.0, 0.49, 0.5, 0.51, 1.0]), 1)
    assert levels.tolist() == [0, 0, 1, 1, 1]
    assert applied.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    levels, applied = quantise_controls(np.array([0.0, 0.16, 0.17, 0.5, 0.83, 0.84, 1.0]), 2)
    assert levels.tolist() == [0, 0, 1, 2, 2, 3, 3]
    np.testing.assert_allclose(applied, np.array([0, 0, 1, 2, 2, 3, 3]) / 3, rtol=0, atol=1e-7)


def test_controls_to_bits_writes_each_level_msb_first_and_inverts():
    bits, applied = controls_to_bits(np.array([0.0, 1 / 3, 2 / 3, 1.0], np.float32), 2)
    assert bits.tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    np.testing.assert_array_equal(bits_to_controls(bits, 2), applied)
    for k in (1, 2, 3):
        x = np.random.default_rng(k).random(50)
        bits, applied = controls_to_bits(x, k)
        assert bits.size == 50 * k
        np.testing.assert_array_equal(bits_to_controls(bits, k), applied)
        # rounding to the nearest of 2**k levels: never more than half a step away (float32 slack)
        assert np.max(np.abs(applied - x)) <= 0.5 / (2**k - 1) + 1e-6


def test_bits_per_control_is_validated():
    for bad in (0, 17, 1.5, True):
        with pytest.raises(ValueError, match="bits_per_control"):
            controls_to_bits(np.zeros(3), bad)
    with pytest.raises(ValueError, match="whole number of 2-bit"):
        bits_to_controls(np.zeros(3), 2)


# -- driver against the emulator over a real pty --------------------------------------------------
def test_set_and_read_back_patterns(ris_emulator, ris_controller):
    assert ris_emulator.port.startswith("/dev/")
    np.testing.assert_array_equal(ris_controller.pattern(), np.zeros(N_BITS, np.uint8))  # power-on state
    for seed in range(5):
        bits = random_pattern(seed)
        ris_controller.set_pattern(bits)
        np.testing.assert_array_equal(ris_emulator.latched, bits)
        np.testing.assert_array_equal(ris_controller.pattern(), bits)
    assert ris_emulator.patterns_latched == 5


def test_serial_number_and_reset_banner(make_ris_emulator):
    emulator = make_ris_emulator(serial_no="RIS-TEST-0042")
    with RISController(emulator.port, timeout_s=1.0) as controller:
        assert controller.serial_number() == "RIS-TEST-0042"
        controller.set_pattern(np.ones(N_BITS, np.uint8))
        banner = controller.reset()
        assert banner[-1] == "#READY!"
        assert "Serial no.: RIS-TEST-0042" in banner and len(banner) >= 3
        np.testing.assert_array_equal(controller.pattern(), np.zeros(N_BITS, np.uint8))
        np.testing.assert_array_equal(emulator.pattern_at(), np.zeros(N_BITS, np.uint8))


def test_emulator_takes_lower_case_and_crlf_like_the_firmware(ris_emulator):
    with serial.Serial(ris_emulator.port, 115200, timeout=0.05) as port:
        port.write(b"!0x" + b"ab" * 32 + b"\r\n")
        assert port.read_until(b"\n", 64) == b"#OK\n"
        port.write(b"?pattern\n")
        assert port.read_until(b"\n", 128) == b"#0X" + b"AB" * 32 + b"\n"


@pytest.mark.parametrize("line", [
    b"bogus\n",
    b"!0x1234\n",  # too short
    b"!0x" + b"0" * 65 + b"\n",  # too long
    b"!0x" + b"G" * 64 + b"\n",  # not hex
    b"?Patterns\n",
    b"!0x" + b"F" * 200 + b"\n",  # longer than the firmware's FIFO
])
def test_invalid_command_gets_no_reply_and_changes_nothing(ris_emulator, line):
    with serial.Serial(ris_emulator.port, 115200, timeout=0.02) as port:
        port.write(line)
        assert read_silence(port, 0.3) == b""
        port.write(b"?SerialNo\n")  # the controller still answers afterwards
        assert port.read_until(b"\n", 64) == b"#RIS-SIM-0001\n"
    np.testing.assert_array_equal(ris_emulator.latched, np.zeros(N_BITS, np.uint8))


def test_unknown_command_through_the_driver_times_out_naming_it(ris_emulator):
    with RISController(ris_emulator.port, timeout_s=0.2) as controller:
        with pytest.raises(RISTimeoutError, match=r"stayed silent for 0\.2 s after '\?Vext'"):
            controller.query("?Vext")
        assert controller.serial_number() == "RIS-SIM-0001"


def test_silent_controller_times_out_quickly_and_clearly(ris_emulator):
    ris_emulator.silent = True
    bits = random_pattern(1)
    with RISController(ris_emulator.port, timeout_s=0.2) as controller:
        t0 = time.monotonic()
        with pytest.raises(RISTimeoutError) as caught:
            controller.set_pattern(bits)
        elapsed = time.monotonic() - t0
        assert 0.2 <= elapsed < 3.0
        error = caught.value
        assert isinstance(error, roles.InstrumentError)
        assert error.command == "!0x" + pattern_to_hex(bits)
        assert "stayed silent" in str(error) and error.command in str(error) and ris_emulator.port in str(error)
        # it comes back: the driver works again at once
        ris_emulator.silent = False
        controller.set_pattern(bits)
        np.testing.assert_array_equal(controller.pattern(), bits)


def test_dropped_line_fails_without_retries_and_passes_with_one(ris_emulator):
    bits = random_pattern(2)
    with RISController(ris_emulator.port, timeout_s=0.2) as controller:
        ris_emulator.drop_next = 1
        with pytest.raises(RISTimeoutError):
            controller.set_pattern(bits)
        np.testing.assert_array_equal(ris_emulator.latched, np.zeros(N_BITS, np.uint8))
    with RISController(ris_emulator.port, timeout_s=0.2, retries=1) as controller:
        ris_emulator.drop_next = 1
        before = ris_emulator.lines_received
        controller.set_pattern(bits)
        assert ris_emulator.lines_received - before == 2
        np.testing.assert_array_equal(ris_emulator.latched, bits)


def test_readback_mismatch_raises(ris_emulator):
    actuator = MetasurfaceActuator(ris_emulator.port, timeout_s=1.0)
    actuator.connect()
    try:
        ris_emulator.corrupt_readback = True
        with pytest.raises(RISReadbackError, match=r"differs .* in 1 bit\(s\) \(first: \[0\]\)"):
            actuator.apply(np.full(N_BITS, 0.8, np.float32))
        assert actuator.last_pattern is None
        actuator.configure(verify=False)  # without read-back the fault goes unseen (why verify is on)
        applied = actuator.apply(np.full(N_BITS, 0.8, np.float32))
        np.testing.assert_array_equal(applied, np.ones(N_BITS, np.float32))
    finally:
        actuator.close()


def test_not_open_and_bad_port_errors():
    with pytest.raises(RISError, match="not open"):
        RISController("/dev/null-ris").serial_number()
    with pytest.raises(RISError, match="cannot open"):
        RISController("/dev/does-not-exist-ris").open()


# -- timing ----------------------------------------------------------------------------------------
def test_settle_time_race(make_ris_emulator):
    settle_s = 0.3
    emulator = make_ris_emulator(settle_s=settle_s)
    old, new = np.zeros(N_BITS, np.uint8), random_pattern(3)
    with RISController(emulator.port, timeout_s=1.0) as controller:
        controller.set_pattern(new)
        now = time.monotonic()  # a rig sweeping the VNA as soon as #OK is read
        ok = emulator.last_ok_time
        assert ok is not None and ok <= now
        # the race: #OK came, the cavity still shows the old pattern (fails only on a > 0.3 s stall)
        np.testing.assert_array_equal(emulator.pattern_at(now), old)
        np.testing.assert_array_equal(emulator.pattern_at(ok + settle_s - 1e-3), old)
        np.testing.assert_array_equal(emulator.pattern_at(ok + settle_s + 1e-3), new)
        # the latch itself switched at #OK: only the cavity lags
        np.testing.assert_array_equal(controller.pattern(), new)
        time.sleep(max(0.0, ok + settle_s - time.monotonic()) + 0.01)
        np.testing.assert_array_equal(emulator.pattern_at(), new)


def test_pattern_at_is_consistent_while_patterns_change(make_ris_emulator):
    emulator = make_ris_emulator(settle_s=0.0)
    patterns = [random_pattern(100 + i) for i in range(12)]
    order = {"0" * 64: -1} | {pattern_to_hex(p): i for i, p in enumerate(patterns)}
    seen: list[str] = []
    stop = threading.Event()

    def watch():  # another thread, as the VNA emulator
        while not stop.is_set():
            seen.append(pattern_to_hex(emulator.pattern_at(time.monotonic())))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with RISController(emulator.port, timeout_s=1.0) as controller:
            for bits in patterns:
                controller.set_pattern(bits)
    finally:
        stop.set()
        watcher.join()
    assert seen and set(seen) <= set(order)  # never a torn or foreign pattern
    indices = [order[h] for h in seen]
    assert indices == sorted(indices)  # and never one older than a pattern already seen
    np.testing.assert_array_equal(emulator.pattern_at(), patterns[-1])


def test_wire_time_follows_the_baud_rate(make_ris_emulator):
    baud = 9600
    emulator = make_ris_emulator(baud=baud, latch_s=0.0)
    with RISController(emulator.port, baud=baud, timeout_s=2.0) as controller:
        t0 = time.monotonic()
        controller.set_pattern(random_pattern(4))
        set_s = time.monotonic() - t0
        t0 = time.monotonic()
        controller.pattern()
        get_s = time.monotonic() - t0
    # 8N1 = 10 bits per byte: "!0x" + 64 + "\n" out, "#OK\n" back; "?Pattern\n" out, "#0X" + 64 + "\n" back
    expected_set = (68 + 4) * 10 / baud  # 75 ms
    expected_get = (9 + 68) * 10 / baud  # 80 ms
    assert expected_set * 0.95 <= set_s < expected_set + 1.0
    assert expected_get * 0.95 <= get_s < expected_get + 1.0


# -- two-step exchanges (what an overlapping rig uses) ---------------------------------------------
def test_a_two_step_write_leaves_the_wire_time_to_the_caller(make_ris_emulator):
    baud = 9600  # 72 bytes: 75 ms on the wire
    emulator = make_ris_emulator(baud=baud, latch_s=0.0)
    bits = random_pattern(40)
    with RISController(emulator.port, baud=baud, timeout_s=1.0) as controller:
        t0 = time.monotonic()
        controller.start_set_pattern(bits)
        sent_s = time.monotonic() - t0
        assert emulator.patterns_latched == 0  # still on its way
        controller.finish_set_pattern()
        done_s = time.monotonic() - t0
        np.testing.assert_array_equal(emulator.latched, bits)
        controller.start_pattern_query()
        np.testing.assert_array_equal(controller.finish_pattern_query(), bits)
    assert sent_s < 0.03 and done_s >= 72 * 10 / baud * 0.95


def test_a_reply_that_came_in_time_counts_when_read_late(ris_emulator):
    with RISController(ris_emulator.port, timeout_s=0.1) as controller:
        controller.start_set_pattern(random_pattern(41))
        time.sleep(0.3)  # the caller was busy past the timeout; the #OK has been waiting
        controller.finish_set_pattern()
        controller.start_pattern_query()
        time.sleep(0.3)
        np.testing.assert_array_equal(controller.finish_pattern_query(), random_pattern(41))


def test_two_step_exchanges_are_matched_and_an_abandoned_one_is_dropped(ris_emulator):
    with RISController(ris_emulator.port, timeout_s=0.3) as controller:
        with pytest.raises(RISError, match="no '!0x' command awaits its reply"):
            controller.finish_set_pattern()
        controller.start_pattern_query()
        with pytest.raises(RISError, match="no '!0x' command awaits"):
            controller.finish_set_pattern()  # the open exchange is a ?Pattern
        controller.start_pattern_query()
        controller.set_pattern(random_pattern(42))  # waits for that reply first, drops it, then writes
        with pytest.raises(RISError, match="no '\\?Pattern' command awaits"):
            controller.finish_pattern_query()
        np.testing.assert_array_equal(controller.pattern(), random_pattern(42))


def test_a_command_never_goes_out_while_another_is_unanswered(ris_emulator):
    """The firmware takes one command at a time (a '?' or '!' inside an unfinished command is
    garbage to it): a command sent while a two-step one is open waits for its reply first."""
    events: list[tuple[str, float]] = []
    send = ris_emulator._send

    def logged_reply(data):
        # stamped when the reply starts: the controller may read its bytes before the emulated
        # wire time `send` returns has passed
        events.append(("reply " + data[:3].decode(), time.monotonic()))
        return send(data)

    ris_emulator._send = logged_reply
    with RISController(ris_emulator.port, timeout_s=1.0) as controller:
        write = controller._send

        def logged_write(command, **kwargs):
            events.append(("write " + command[:3], time.monotonic()))
            write(command, **kwargs)

        controller._send = logged_write
        controller.start_set_pattern(random_pattern(44))
        controller.set_pattern(random_pattern(45))  # as the rig's safe state after a failure
    deadline = time.monotonic() + 2.0  # the emulator's thread logs its last reply on its own time
    while sum(e.startswith("reply") for e, _ in events) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    events.sort(key=lambda e: e[1])
    assert [e for e, _ in events] == ["write !0x", "reply #OK", "write !0x", "reply #OK"]
    np.testing.assert_array_equal(ris_emulator.latched, random_pattern(45))


def test_a_silent_controller_times_out_a_two_step_write_and_retries_resend_it(ris_emulator):
    bits = random_pattern(43)
    with RISController(ris_emulator.port, timeout_s=0.2) as controller:
        ris_emulator.silent = True
        controller.start_set_pattern(bits)
        t0 = time.monotonic()
        with pytest.raises(RISTimeoutError, match="stayed silent for 0.2 s after '!0x"):
            controller.finish_set_pattern()
        assert time.monotonic() - t0 < 3.0
        ris_emulator.silent = False
    with RISController(ris_emulator.port, timeout_s=0.2, retries=1) as controller:
        ris_emulator.drop_next = 1
        controller.start_set_pattern(bits)
        controller.finish_set_pattern()
        np.testing.assert_array_equal(ris_emulator.latched, bits)


def test_the_actuator_in_three_steps_checks_the_read_back_last(ris_emulator):
    actuator = MetasurfaceActuator(ris_emulator.port, atoms=range(8), timeout_s=1.0)
    assert isinstance(actuator, roles.OverlappedActuator)
    actuator.connect()
    try:
        row = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
        np.testing.assert_array_equal(actuator.begin_apply(row * 0.9), row)  # quantised, at once
        actuator.end_apply()
        np.testing.assert_array_equal(ris_emulator.latched[:8], row)  # latched at #OK
        assert actuator.last_pattern is None  # not yet checked
        actuator.end_verify()
        np.testing.assert_array_equal(actuator.last_pattern[:8], row)
        ris_emulator.corrupt_readback = True
        actuator.begin_apply(1 - row)
        actuator.end_apply()  # the latch is fine; the read-back is not
        with pytest.raises(RISReadbackError, match="differs"):
            actuator.end_verify()
        assert actuator.last_pattern is None
        actuator.configure(verify=False)
        actuator.begin_apply(row)
        actuator.end_apply()
        actuator.end_verify()  # nothing to check
        np.testing.assert_array_equal(actuator.last_pattern[:8], row)
        with pytest.raises(RISError, match="end_apply without begin_apply"):
            actuator.end_apply()
        actuator.prepare(row)  # encoded ahead; a different row sent next is encoded anew
        np.testing.assert_array_equal(actuator.begin_apply(1 - row), 1 - row)
        actuator.end_apply()
        actuator.end_verify()
        np.testing.assert_array_equal(ris_emulator.latched[:8], 1 - row)
    finally:
        ris_emulator.corrupt_readback = False
        actuator.close()


# -- the actuator role -----------------------------------------------------------------------------
def test_actuator_two_bits_per_control_on_chosen_atoms(ris_emulator):
    # PhyLL's microwave layer: 20 inputs x 2 bits on 40 meta-atoms; here on the odd controller bits
    atoms = list(range(1, 81, 2))
    default = "F" * 64  # the bits that carry no control must hold the default pattern
    actuator = MetasurfaceActuator(ris_emulator.port, atoms=atoms, bits_per_control=2, default_pattern=default,
                                   settle_s=0.004, timeout_s=1.0)
    assert isinstance(actuator, roles.Actuator)
    assert actuator.n_controls == 20 and actuator.settle_s == 0.004
    actuator.connect()
    try:
        assert actuator.identify() == "Open Source RIS controller RIS-SIM-0001"
        row = np.random.default_rng(5).random(20).astype(np.float32)
        applied = actuator.apply(row)
        assert applied.dtype == np.float32 and applied.shape == (20,)
        levels = np.floor(row.astype(np.float64) * 3 + 0.5)
        np.testing.assert_allclose(applied, levels / 3, rtol=0, atol=1e-7)  # float32 of k/3
        latched = ris_emulator.latched
        np.testing.assert_array_equal(bits_to_controls(latched[atoms], 2), applied)
        others = np.setdiff1d(np.arange(N_BITS), atoms)
        assert (latched[others] == 1).all()
        np.testing.assert_array_equal(actuator.last_pattern, latched)
        actuator.safe_state()
        assert (ris_emulator.latched == 1).all()
    finally:
        actuator.close()


def test_actuator_check_settings_and_configure():
    actuator = MetasurfaceActuator("/dev/unused", atoms=range(8), bits_per_control=2)
    assert actuator.n_controls == 4
    actuator.check(np.zeros((3, 4), np.float32))
    for bad, message in ((np.zeros((2, 5)), "shape"), (np.array([[0, 0, 1.5, 0]]), "row 0, channel 2"),
                         (np.array([[0, np.nan, 0, 0]]), "row 0, channel 1")):
        with pytest.raises(ValueError, match=message):
            actuator.check(bad)
    settings = actuator.settings()
    assert settings["atoms"] == list(range(8)) and settings["default_pattern"] == "0" * 64
    with pytest.raises(ValueError, match="unknown setting"):
        actuator.configure(colour="red")
    with pytest.raises(ValueError, match="default_pattern"):
        actuator.configure(settle_s=0.1, default_pattern="12")
    assert actuator.settle_s == settings["settle_s"]  # nothing changed on error
    actuator.configure(settle_s=0.1, default_pattern="0x" + "8" + "0" * 63, verify=False)
    assert actuator.settings()["default_pattern"] == "8" + "0" * 63 and actuator.verify is False
    for kwargs in ({"atoms": [0, 0]}, {"atoms": [300]}, {"atoms": [0, 1, 2], "bits_per_control": 2}):
        with pytest.raises(ValueError, match="atoms"):
            MetasurfaceActuator("/dev/unused", **kwargs)


# -- driver against a byte-exact transcript over socket:// -----------------------------------------
def test_driver_bytes_on_the_wire_over_a_socket_url():
    bits = random_pattern(6)
    text = pattern_to_hex(bits)
    steps = [
        Step(b"?SerialNo\n", b"#SN0042\n"),
        Step(b"!0x" + text.encode() + b"\n", b"#OK\n"),
        Step(b"?Pattern\n", b"#0X" + text.encode() + b"\n"),
        Step(b"!Reset\n", b"\nOpen Source RIS\nFirmware version: 1.0\n\n#READY!\n"),
        Step(b"?Pattern\n", b"#OK\n"),  # a confused controller (or a late reply): never taken for the pattern
    ]
    with ScpiTranscript(steps) as transcript:
        actuator = MetasurfaceActuator(f"socket://127.0.0.1:{transcript.port}", timeout_s=0.5)
        actuator.connect()
        try:
            assert actuator.identify() == "Open Source RIS controller SN0042"
            np.testing.assert_array_equal(actuator.apply(bits.astype(np.float32)), bits.astype(np.float32))
            assert actuator.controller.reset()[-1] == "#READY!"
            with pytest.raises(RISError, match="answered only \\['#OK'\\], which does not answer '\\?Pattern'"):
                actuator.controller.pattern()
        finally:
            actuator.close()
    transcript.verify()


# -- a separate process, as next to a real bench ---------------------------------------------------
def test_main_serves_from_its_own_process():
    proc = subprocess.Popen([sys.executable, "-m", "labpnn.sim_instruments.metasurface_controller",
                             "--serial-no", "RIS-PROC-7"], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the emulator printed no port"
        path = proc.stdout.readline().strip()
        assert os.path.exists(path)
        with RISController(path, timeout_s=2.0) as controller:
            assert controller.serial_number() == "RIS-PROC-7"
            bits = random_pattern(7)
            controller.set_pattern(bits)
            np.testing.assert_array_equal(controller.pattern(), bits)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_emulator_validates_its_arguments():
    for kwargs in ({"n_bits": 10}, {"n_bits": 0}, {"baud": 0}, {"settle_s": -1}, {"serial_no": "a\nb"}):
        with pytest.raises(ValueError):
            MetasurfaceControllerEmulator(**kwargs)


def test_a_late_reply_is_not_taken_for_the_next_commands():
    """A controller that answers after the driver gave up: the late `#OK` must not be read as the
    answer to the next command (the driver waits for the line to go quiet after a timeout)."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)

    def controller():
        buf = b""
        replies = [(0.25, b"#OK\n"), (0.0, b"#0X" + b"0" * 64 + b"\n")]  # late, then in time
        while replies:
            buf += os.read(master, 256)
            while b"\n" in buf and replies:
                _, buf = buf.split(b"\n", 1)
                delay, reply = replies.pop(0)
                time.sleep(delay)
                os.write(master, reply)

    worker = threading.Thread(target=controller, daemon=True)
    worker.start()
    ris = RISController(path, timeout_s=0.1)
    ris.open()
    try:
        with pytest.raises(RISTimeoutError, match="stayed silent"):
            ris.set_pattern(np.zeros(256, np.uint8))
        ris.timeout_s = 2.0  # the controller answers ?Pattern only after its late #OK
        assert ris.pattern().sum() == 0  # the ?Pattern reply, not the late #OK
    finally:
        ris.close()
        worker.join(2)
        os.close(master)
        os.close(slave)
