"""The acoustic emulator on a real audio path: jackd (dummy backend) + the plant as a JACK client +
PortAudio through sounddevice, as the driver will use it. Every shot runs at real time (the dummy
clock is not faster), so shots are short.

Skips with the reason when JACK or PortAudio is missing, except in CI (``CI=true``), where it fails.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from labpnn.sim_instruments.acoustic_bench import AcousticBenchEmulators, StandInPlant
from labpnn.sim_instruments.acoustic_jack import (
    AcousticJackEmulator,
    JackServer,
    JackUnavailable,
    _registry_segments,
    available,
    limit_blas_threads,
    portaudio_available,
    registered_servers,
    server_running,
)

RATE = 48000
PERIOD = 1024  # no xruns here with the plant in the loop (BLAS held to one thread); 256 xruns
SERVER = f"lpt-{os.getpid()}"  # one per session: other sessions' servers never clash (and short: see below)


def _require_audio() -> None:
    for ok, reason in (available(), portaudio_available()):
        if not ok:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI must run the JACK tests: {reason}")
            pytest.skip(reason)


@pytest.fixture(scope="module")
def jack_server():
    _require_audio()
    server = JackServer(SERVER, rate=RATE, period=PERIOD, channels=8).start()
    import sounddevice as sd

    sd._terminate()  # PortAudio enumerates devices at initialisation: redo it now that JACK runs
    sd._initialize()
    try:
        yield server
    finally:
        sd._terminate()  # before jackd goes, or PortAudio's JACK client asserts at exit
        server.stop()
        sd._initialize()  # as we found it (initialised), now without our server


def new_plant():
    """The bench's physics (cavity: 4 speakers, 4 mics) with its drift off, so that a fresh copy run
    offline on the same drive predicts the emulator's output up to noise; the stand-in if the
    physics module is absent."""
    try:
        from labpnn.sim_instruments.acoustic import AcousticConfig, AcousticPlant
    except ImportError:
        return StandInPlant(seed=3)
    return AcousticPlant(AcousticConfig.cavity(seed=3, drift_scale=0.0))


@pytest.fixture
def plant():
    return new_plant()


@pytest.fixture
def emulator(jack_server, plant):
    with AcousticJackEmulator(plant, server_name=jack_server.name) as emu:
        yield emu


@pytest.fixture
def jack_client(jack_server):
    import jack

    client = jack.Client("labpnn-test-observer", no_start_server=True, servername=jack_server.name)
    yield client
    client.close()


class Loopback:
    """One long-lived full-duplex stream on PortAudio's JACK device (as the driver keeps one): `shot`
    plays a drive and records the same number of frames plus ``tail``, with the callback's flags."""

    def __init__(self, playback: int, capture: int):
        import sounddevice as sd

        self.lock = threading.Lock()
        self.drive = np.zeros((0, playback), np.float32)
        self.record = np.zeros((0, capture), np.float32)
        self.position = 0
        self.flags: list[str] = []
        self.done = threading.Event()
        self.done.set()
        self.stream = sd.Stream(device="system", samplerate=RATE, channels=(capture, playback), dtype="float32",
                                callback=self._callback)
        self.stream.start()

    def _callback(self, indata, outdata, frames, _time, status) -> None:
        with self.lock:
            outdata.fill(0)
            if self.done.is_set():
                return
            if status:
                self.flags.append(str(status))
            p = self.position
            chunk = self.drive[p:p + frames]
            outdata[:len(chunk)] = chunk
            take = min(frames, len(self.record) - p)
            self.record[p:p + take] = indata[:take]
            self.position += frames
            if self.position >= len(self.record):
                self.done.set()

    def shot(self, drive: np.ndarray, tail: int = 4 * PERIOD, during=None) -> tuple[np.ndarray, list[str]]:
        with self.lock:
            self.drive = np.asarray(drive, np.float32)
            self.record = np.zeros((len(drive) + tail, self.stream.channels[0]), np.float32)
            self.position, self.flags = 0, []
            self.done.clear()
        if during is not None:
            during()
        assert self.done.wait(10 + len(self.record) / RATE), "the stream stopped delivering frames"
        return self.record.copy(), list(self.flags)

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


@pytest.fixture
def loopback(jack_server, plant):
    streams = []

    def open_stream(playback: int = plant.n_speakers + 1, capture: int = plant.n_mics + 1) -> Loopback:
        streams.append(Loopback(playback, capture))
        return streams[-1]

    yield open_stream
    for stream in streams:
        stream.close()


def clean_shot(stream: Loopback, drive: np.ndarray, attempts: int = 6) -> np.ndarray:
    """A shot with no under/overflow flag, remeasured as the driver does: on a loaded 2-core machine
    the graph can xrun right after it is rewired."""
    for _ in range(attempts):
        recorded, flags = stream.shot(drive)
        if not flags:
            return recorded
    raise AssertionError(f"{attempts} shots in a row were flagged: {flags}")


def chirp(n: int, seed: int = 0) -> np.ndarray:
    """White noise in [-0.5, 0.5): an unambiguous cross-correlation peak at any lag."""
    return np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32)


def find_lag(recorded: np.ndarray, sent: np.ndarray) -> int:
    corr = np.correlate(recorded.astype(np.float64), sent.astype(np.float64), "valid")
    return int(np.argmax(np.abs(corr)))


def connections(client, port_name: str) -> set[str]:
    return {p.name for p in client.get_all_connections(port_name)}


def portaudio_ports(client, kind: str) -> list[str]:
    """This process's PortAudio ports of one kind ("in"/"out") in channel order. PortAudio's port
    numbers run on across streams, so the first live one is channel 1, whatever its number."""
    ports = [p.name for p in client.get_ports("^PortAudio:", is_audio=True) if p.name.split(":")[1].startswith(kind)]
    return sorted(ports, key=lambda name: int(name.rsplit("_", 1)[1]))


def wired(client, plant) -> bool:
    """Our stream's channels are linked one to one to the plant's ports, and to nothing else."""
    speakers = [f"labpnn-plant:speaker_{k + 1}" for k in range(plant.n_speakers)] + ["labpnn-plant:ref_in"]
    mics = [f"labpnn-plant:mic_{k + 1}" for k in range(plant.n_mics)] + ["labpnn-plant:ref_out"]
    try:
        outs, ins = portaudio_ports(client, "out"), portaudio_ports(client, "in")
        return (len(outs) == len(speakers) and len(ins) == len(mics)
                and all(connections(client, p) == {s} for p, s in zip(outs, speakers))
                and all(connections(client, p) == {m} for p, m in zip(ins, mics)))
    except Exception:  # a port vanished while we looked
        return False


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ----------------------------------------------------------------------------------- no JACK needed
def test_available_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    ok, reason = available()
    assert not ok and "jackd" in reason and "jackd2" in reason


def test_server_names_jack_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="23"):
        JackServer("x" * 24)
    with pytest.raises(ValueError, match="letters"):
        JackServer("bad name")


def test_blas_threads_limited_and_restored():
    from labpnn.sim_instruments.acoustic_jack import _openblas_handles, restore_blas_threads

    handles = _openblas_handles()
    if not handles:
        pytest.skip("no OpenBLAS loaded in this process (another BLAS, or not Linux)")
    before = [get() for get, _ in handles]
    previous = limit_blas_threads(1)
    try:
        assert previous == before and all(get() == 1 for get, _ in handles)
    finally:
        restore_blas_threads(previous)
    assert [get() for get, _ in handles] == before


def test_stand_in_plant_is_causal_stateful_and_seeded():
    drive = np.random.default_rng(1).standard_normal((3000, 4)).astype(np.float32) * 0.1
    whole = StandInPlant(seed=5, noise_rms=0).process(drive)
    blocks = StandInPlant(seed=5, noise_rms=0)
    pieces = np.concatenate([blocks.process(drive[i:i + 1024]) for i in range(0, 3000, 1024)])
    # same float64 recursion split at block edges (state carried): differences only at rounding level
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-6 * np.abs(whole).max())
    late = StandInPlant(seed=5, noise_rms=0).process(np.concatenate([np.zeros((500, 4), np.float32), drive]))
    np.testing.assert_array_equal(late[:500], 0)  # causal: nothing before the drive
    assert not np.allclose(StandInPlant(seed=6, noise_rms=0).process(drive), whole)


# ----------------------------------------------------------------------------------- the server
def test_server_answers_exports_its_name_and_refuses_a_twin(jack_server):
    assert server_running(jack_server.name)
    assert os.environ["JACK_DEFAULT_SERVER"] == jack_server.name
    with pytest.raises(JackUnavailable, match="already running"):
        JackServer(jack_server.name).start()


def test_server_stop_removes_its_files_only(jack_server):
    _require_audio()
    name = f"{SERVER}-short"
    with JackServer(name, export_env=False) as server:
        assert server.running and server_running(name)
        assert any(name in entry for entry in os.listdir("/dev/shm"))
    assert not server_running(name)
    assert not [entry for entry in os.listdir("/dev/shm") if f"_{name}_" in entry]
    assert server_running(jack_server.name)  # the other server is untouched


def test_killed_server_segments_are_removed_at_stop(jack_server):
    name = f"{SERVER}-killed"
    server = JackServer(name, export_env=False).start()
    segments = _registry_segments(server.process.pid)
    assert segments, "the registry lists no segment for the server we started"
    server.process.kill()  # no clean exit: jackd frees nothing itself
    server.process.wait(10)
    assert all(os.path.exists(f"/dev/shm/{seg}") for seg in segments)
    pid = server.process.pid
    assert pid in [p for p, _ in registered_servers()]  # its slot (one of 8 per machine) is still held
    server.stop()
    assert not any(os.path.exists(f"/dev/shm/{seg}") for seg in segments)
    assert pid not in [p for p, _ in registered_servers()]
    assert not [entry for entry in os.listdir("/dev/shm") if f"_{name}_" in entry]
    assert server_running(jack_server.name)


# ----------------------------------------------------------------------------------- wiring
def test_emulator_wires_streams_opened_before_and_after_it(jack_server, plant, loopback, jack_client):
    def wired_by_channel() -> bool:
        return wired(jack_client, plant)

    early = loopback()
    # PortAudio links its ports to system:* when its stream starts
    assert wait_until(lambda: any(n.startswith("system:") for n in connections(
        jack_client, portaudio_ports(jack_client, "out")[0])))
    with AcousticJackEmulator(plant, server_name=jack_server.name) as emu:
        assert emu.wait_wired(5), "a stream opened before the emulator was not wired"
        assert wait_until(wired_by_channel), "channels wired wrongly, or system:* links left"
        early.close()
        late = loopback()  # PortAudio numbers this stream's ports on from the last: out_5.., not out_0..
        assert emu.wait_wired(5), "a stream opened after the emulator was not wired"
        assert wait_until(wired_by_channel), "channels wired wrongly, or system:* links left"
        drive = np.zeros((RATE // 8, plant.n_speakers + 1), np.float32)
        drive[:, plant.n_speakers] = chirp(len(drive))
        recorded = clean_shot(late, drive)
        assert find_lag(recorded[:, plant.n_mics], drive[:, plant.n_speakers]) == PERIOD


# ----------------------------------------------------------------------------------- the physics through JACK
def test_tone_in_gives_the_plant_response_and_reference_back_exactly_one_period_late(emulator, plant, loopback):
    stream = loopback()
    assert emulator.wait_wired(5)
    n = RATE // 2
    t = np.arange(n) / RATE
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)  # 20 ms ramps: no click
    drive = np.zeros((n, plant.n_speakers + 1), np.float32)
    low, high = getattr(getattr(plant, "config", None), "tone_band_hz", (300.0, 3000.0))
    first, second = low + (high - low) / 3, low + 2 * (high - low) / 3  # inside the band the bench is made for
    drive[:, 0] = 0.3 * fade * np.sin(2 * np.pi * first * t)
    drive[:, 1] = 0.2 * fade * np.sin(2 * np.pi * second * t)
    drive[:, plant.n_speakers] = chirp(n)
    recorded = clean_shot(stream, drive)

    lag = find_lag(recorded[:, plant.n_mics], drive[:, plant.n_speakers])
    reported = round(sum(stream.stream.latency) * RATE)  # PortAudio's figure, from JACK's port latencies
    assert lag == PERIOD == emulator.latency_frames == reported
    # the reference is copied, not computed: bit-exact
    np.testing.assert_array_equal(recorded[lag:lag + n, plant.n_mics], drive[:, plant.n_speakers])

    noise_rms = float(np.sqrt(np.mean(new_plant().process(np.zeros((n, plant.n_speakers), np.float32)) ** 2)))
    expected = new_plant().process(drive[:, :plant.n_speakers])
    got = recorded[lag:lag + n, :plant.n_mics]
    signal_rms = np.sqrt(np.mean(expected**2, axis=0))
    residual_rms = np.sqrt(np.mean((got - expected) ** 2, axis=0))
    # two independent noise draws differ by sqrt(2) x the noise RMS; 3x that allows its estimate's
    # spread. 1e-5 x signal covers float32 rounding and the plant's state from before the shot.
    bound = 3 * np.sqrt(2) * noise_rms + 1e-5 * signal_rms
    assert np.all(signal_rms > 5 * bound), (signal_rms, noise_rms)  # else the comparison proves nothing
    assert np.all(residual_rms <= bound), (residual_rms, noise_rms)
    # and nothing came back before the drive could have reached the microphones
    assert np.sqrt(np.mean(recorded[:lag, :plant.n_mics] ** 2)) <= 3 * noise_rms
    assert emulator.errors == 0 and emulator.nonfinite_blocks == 0


def test_stall_is_flagged_and_the_next_shot_is_clean(emulator, plant, loopback):
    stream = loopback()
    assert emulator.wait_wired(5)
    n = RATE // 2
    drive = np.zeros((n, plant.n_speakers + 1), np.float32)
    drive[:, plant.n_speakers] = chirp(n, seed=1)
    xruns_before = emulator.xruns
    _, flags = stream.shot(drive, during=lambda: (time.sleep(0.1), emulator.stall(0.2)))
    assert any("underflow" in f or "overflow" in f for f in flags), flags
    assert wait_until(lambda: emulator.xruns > xruns_before, 2.0)
    # the shot is remeasured: a clean one, reference back bit-exact at the same latency
    recorded = clean_shot(stream, drive)
    lag = find_lag(recorded[:, plant.n_mics], drive[:, plant.n_speakers])
    assert lag == PERIOD
    np.testing.assert_array_equal(recorded[lag:lag + n, plant.n_mics], drive[:, plant.n_speakers])


def test_callback_exceptions_are_logged_and_give_silence(jack_server, loopback, caplog):
    class Broken(StandInPlant):
        def process(self, drive):
            raise RuntimeError("plant exploded")

    caplog.set_level(logging.ERROR, logger="labpnn.sim_instruments.acoustic_jack")
    with AcousticJackEmulator(Broken(), server_name=jack_server.name) as emu:
        stream = loopback(5, 5)
        assert emu.wait_wired(5)
        drive = np.zeros((RATE // 8, 5), np.float32)
        drive[:, 4] = chirp(len(drive))
        recorded, _ = stream.shot(drive)
        assert emu.errors > 0 and "plant exploded" in emu.last_error
    assert not recorded.any(), "a failing plant must not pass the reference through"
    logged = [r for r in caplog.records if "process callback failed" in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "plant exploded" in str(logged[0].exc_info[1])
    assert len(logged) <= 3 + emu.errors // 1000  # the first few in full, then rate-limited


def test_reference_can_be_withheld(jack_server, plant, loopback):
    with AcousticJackEmulator(plant, server_name=jack_server.name, ref_latency_match=False) as emu:
        stream = loopback()
        assert emu.wait_wired(5)
        drive = np.zeros((RATE // 8, plant.n_speakers + 1), np.float32)
        drive[:, plant.n_speakers] = chirp(len(drive))
        recorded = clean_shot(stream, drive)
    assert not recorded[:, plant.n_mics].any()


# ----------------------------------------------------------------------------------- as a process
def _start_bench(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "labpnn.sim_instruments.acoustic_bench", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.strip() == "ready":
            proc.printed = lines
            return proc
    proc.kill()
    raise AssertionError(f"bench did not get ready: {lines} {proc.stderr.read()}")


@pytest.mark.slow
def test_killed_emulator_process_gives_silence_with_no_flag(jack_server, plant, loopback, jack_client):
    bench = _start_bench("--no-jackd", "--server-name", jack_server.name, "--seed", "3")
    try:
        assert f"server {jack_server.name}" in bench.printed and "device system" in bench.printed
        stream = loopback()
        assert wait_until(lambda: wired(jack_client, plant)), "the emulator process did not wire our stream"
        n = RATE // 4
        drive = np.zeros((n, plant.n_speakers + 1), np.float32)
        drive[:, 0] = 0.3 * np.sin(2 * np.pi * 700.0 * np.arange(n) / RATE)
        drive[:, plant.n_speakers] = chirp(n, seed=2)
        alive = clean_shot(stream, drive)
        assert np.abs(alive[:, : plant.n_mics]).max() > 1e-3
        np.testing.assert_array_equal(alive[PERIOD:PERIOD + n, plant.n_mics], drive[:, plant.n_speakers])
        # SIGUSR1 stalls the process's callback once (--stall-ms, 200 by default): a flagged shot
        _, flags = stream.shot(drive, during=lambda: (time.sleep(0.05), bench.send_signal(signal.SIGUSR1)))
        assert any("underflow" in f or "overflow" in f for f in flags), flags

        bench.kill()
        bench.wait(10)
        assert wait_until(lambda: not jack_client.get_ports("labpnn-plant:"), 10), "JACK kept the dead client"
        dead_shots = [stream.shot(drive) for _ in range(3)]
        assert not any(dead.any() for dead, _ in dead_shots), "a dead plant gives zeros"
        # ... and PortAudio flags nothing (any flag here is the loaded machine's, and not every shot
        # has one): a driver without a reference would take silence for a measurement
        assert any(not flags for _, flags in dead_shots), [flags for _, flags in dead_shots]
    finally:
        if bench.poll() is None:
            bench.kill()
        bench.wait(10)


@pytest.mark.slow
def test_bench_command_starts_jackd_and_stops_it_on_sigterm(jack_server):
    name = f"{SERVER}-cli"
    bench = _start_bench("--server-name", name, "--preset", "plate")
    try:
        assert bench.printed[0] == f"server {name}"
        assert f"env JACK_DEFAULT_SERVER={name}" in bench.printed
        assert server_running(name)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(15) == 0
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
    assert not server_running(name), "the bench left its jackd running"
    assert not [e for e in os.listdir("/dev/shm") if f"_{name}_" in e]


def test_bench_emulators_reuse_a_running_server(jack_server, jack_client):
    config = getattr(new_plant(), "config", None)  # an AcousticConfig when the physics is installed
    with AcousticBenchEmulators(config if config is not None else StandInPlant(),
                                server_name=jack_server.name) as bench:
        assert bench.server is None and bench.emulator.client is not None
        assert bench.device == "system"
        ports = {p.name for p in jack_client.get_ports("labpnn-plant:")}
        assert len(ports) == bench.plant.n_speakers + bench.plant.n_mics + 2
    assert server_running(jack_server.name)
