"""The sound-card driver (drivers/soundcard.py) on a real audio path: python-sounddevice ->
PortAudio -> a JACK server on its dummy backend -> the acoustic emulator (a JACK client running
the cavity's physics, with the reference looped through) -> back. Every shot runs at real time.

Skips with the reason when JACK or PortAudio is missing, except in CI (``CI=true``), where it fails.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from labpnn.drivers.audio_shots import ShotPlan
from labpnn.drivers.audio_sim import SimulatedAudioPath
from labpnn.drivers.roles import BatchFailed
from labpnn.drivers.soundcard import FLAG_REMEASURED, AcousticSoundCard, SoundCardError
from labpnn.protocols.errors import LimitExceeded
from labpnn.rig import Rig
from labpnn.sim_instruments.acoustic import AcousticConfig, AcousticPlant
from labpnn.sim_instruments.acoustic_jack import (
    AcousticJackEmulator,
    JackServer,
    available,
    portaudio_available,
)

RATE, PERIOD = 48000, 1024
SERVER = f"h5sc-{os.getpid()}"  # our own server: other sessions' tests never share it
PLAN = ShotPlan(burst_s=0.25, window_start_s=0.125, window_s=0.1, tail_s=0.17)  # 0.44 s a shot


def plant(seed: int = 0) -> AcousticPlant:
    """The cavity (4 speakers, 4 mics, T60 0.16 s) without drift, so repeats differ by noise only."""
    return AcousticPlant(AcousticConfig.cavity(drift_scale=0, seed=seed))


def controls(rows: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((rows, PLAN.n_controls)) * 0.8).astype(np.float32)


@pytest.fixture(scope="module")
def jack_server():
    for ok, reason in (available(), portaudio_available()):
        if not ok:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI must run the sound-card tests: {reason}")
            pytest.skip(reason)
    server = JackServer(SERVER, rate=RATE, period=PERIOD, channels=8).start()
    import sounddevice as sd

    sd._terminate()  # PortAudio enumerates devices at initialisation: redo it with our server
    sd._initialize()
    try:
        yield server
    finally:
        sd._terminate()  # before jackd goes, or PortAudio's JACK client asserts at exit
        server.stop()
        sd._initialize()


@pytest.fixture
def bench(jack_server):
    """``bench(plant, **emulator kwargs) -> (emulator, connected AcousticSoundCard)``; both stopped after."""
    made = []

    def make(physics=None, card_kwargs=None, **kwargs):
        emulator = AcousticJackEmulator(physics or plant(), server_name=SERVER, **kwargs).start()
        made.append(emulator)
        # a loaded machine may flag a few shots in a row (xruns): tests that are not about failures
        # tolerate more before the batch ends; the failure test sets the driver's default of 3
        card = AcousticSoundCard("system", PLAN, **{"max_failures": 8, **(card_kwargs or {})})
        made.append(card)
        card.connect()
        return emulator, card

    yield make
    for thing in reversed(made):
        thing.close() if isinstance(thing, AcousticSoundCard) else thing.stop()


def later(seconds: float, action) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_a_tone_gives_the_plants_response_and_the_latency_is_one_jack_period(bench, jack_server):
    physics = AcousticPlant(AcousticConfig.cavity(drift_scale=0, model_gap=False, nonlinearity_scale=0))
    emulator, card = bench(physics)
    # measured from the reference = what JACK and PortAudio report: one period on the dummy backend
    assert card.latency_frames == PERIOD == emulator.latency_frames == card.card.reported_latency_frames
    assert "JACK" in card.identify() and card.settings()["plan"]["tones_hz"] == list(PLAN.tones_hz)
    rows = np.zeros((2, PLAN.n_controls), np.float32)
    rows[0, 0] = 1.0  # speaker 1, 300 Hz, full amplitude
    rows[1, 7] = 0.5  # speaker 2, 570 Hz, half
    traces, flags = card.measure_batch(rows)
    assert not (flags & ~np.uint32(FLAG_REMEASURED)).any()
    out = traces.reshape(2, PLAN.n_mics, len(PLAN.tones_hz))
    h = physics.transfer_function(np.array(PLAN.tones_hz))  # [F, M, S], linear small-signal
    floor = max(np.delete(out[0], 0, axis=1).max(), np.delete(out[1], 2, axis=1).max())  # noise + ring-up left
    assert 0 < floor < 3e-3 * out.max()
    np.testing.assert_allclose(out[0, :, 0], np.abs(h[0, :, 0]) * PLAN.max_amplitude, atol=3 * floor)
    np.testing.assert_allclose(out[1, :, 2], np.abs(h[2, :, 1]) * 0.5 * PLAN.max_amplitude, atol=3 * floor)


@pytest.mark.slow
def test_jack_path_matches_the_in_process_path_within_repeat_noise_and_rows_have_no_memory(bench):
    emulator, card = bench(plant(seed=1), card_kwargs={"keep_waveforms": True})
    rows = controls(5, seed=2)
    first, flags = card.measure_batch(rows)  # (rows/s against audio time: scripts/bench_acoustic.py)
    assert card.last_recordings.shape == (5, PLAN.capture_frames, PLAN.n_mics + 1)
    order = np.array([4, 2, 0, 3, 1])
    shuffled, flags2 = card.measure_batch(rows[order])
    assert not ((flags | flags2) & ~np.uint32(FLAG_REMEASURED)).any()  # remeasured shots are fine
    repeat = np.sqrt(np.mean((shuffled - first[order]) ** 2))  # other neighbours, same rows
    simulated, _ = SimulatedAudioPath(plant(seed=3), PLAN).measure_batch(rows)
    difference = np.sqrt(np.mean((simulated - first) ** 2))
    assert 0 < repeat < 2e-2 * np.abs(first).max()
    # both are noise of the same size (RMS of 100 values: ratio within ~15 % of 1)
    assert difference < 1.5 * repeat, (difference, repeat)


@pytest.mark.slow
def test_a_stall_discards_the_shot_and_remeasures_it(bench):
    emulator, card = bench(plant(seed=4))
    rows = controls(4, seed=5)
    clean, _ = card.measure_batch(rows)
    timer = later(0.8, lambda: emulator.stall(0.08))  # during the second shot or so
    traces, flags = card.measure_batch(rows)
    timer.join()
    assert emulator.xruns >= 1
    assert card.shots_discarded >= 1, "the stall went unnoticed"
    assert "underflow" in card.last_discard_reason or "overflow" in card.last_discard_reason \
        or "reference" in card.last_discard_reason
    assert (flags & FLAG_REMEASURED).any() and not (flags & ~np.uint32(FLAG_REMEASURED)).any()
    # the remeasured rows read like clean ones (within a few times the noise)
    noise = np.abs(np.delete(clean, np.flatnonzero(flags), axis=0) -
                   np.delete(traces, np.flatnonzero(flags), axis=0)).max()
    np.testing.assert_allclose(traces, clean, atol=3 * noise + 1e-5)


@pytest.mark.slow
def test_a_dead_plant_ends_the_batch_after_three_bad_shots_with_the_rows_done(bench):
    emulator, card = bench(plant(seed=6), card_kwargs={"max_failures": 3})
    rows = controls(8, seed=7)
    clean, _ = SimulatedAudioPath(plant(seed=8), PLAN).measure_batch(rows[:3])  # = the JACK path (test above)
    def stop_after_two_shots():  # then PortAudio records silence, with no flag
        deadline = time.monotonic() + 30
        while card.shots_played - card.shots_discarded < 2 and time.monotonic() < deadline:  # 2 good shots
            time.sleep(0.01)
        emulator.stop()

    timer = later(0.0, stop_after_two_shots)
    with pytest.raises(BatchFailed, match="3 bad shots in a row; last: reference missing") as failed:
        card.measure_batch(rows)
    timer.join()
    done = len(failed.value.traces)
    assert 1 <= done <= 3 and failed.value.flags.shape == (done,)
    np.testing.assert_allclose(failed.value.traces, clean[:done], atol=2e-3 * np.abs(clean).max())
    assert card.shots_discarded >= 3


def test_level_limit_refuses_the_whole_batch_before_anything_plays(bench):
    _, card = bench(card_kwargs={"max_peak": 0.3})
    rig = Rig([card], [card], name="acoustic").connect()
    played = card.shots_played
    loud = np.vstack([controls(2), np.ones((1, PLAN.n_controls), np.float32)])
    with pytest.raises(LimitExceeded, match="row 2: output channel 1 peak"):
        rig.run(loud)
    assert card.shots_played == played
    # row by row (apply/acquire) gives the batch's numbers
    quiet = controls(1, seed=9)
    batch, _ = card.measure_batch(quiet)
    card.apply(quiet[0])
    trace, bits = card.acquire()
    assert bits & ~FLAG_REMEASURED == 0  # remeasured at most (an xrun on a loaded machine)
    np.testing.assert_allclose(trace, batch[0], atol=2e-3 * np.abs(batch).max())


def test_connect_refuses_a_missing_reference_a_wrong_rate_and_an_unknown_device(jack_server):
    emulator = AcousticJackEmulator(plant(), server_name=SERVER, ref_latency_match=False).start()
    try:
        card = AcousticSoundCard("system", PLAN, connect_timeout_s=1.5)
        with pytest.raises(SoundCardError, match="did not come back"):
            card.connect()
        assert not card.card.is_open
    finally:
        emulator.stop()
    with pytest.raises(SoundCardError, match="44100 Hz"):
        AcousticSoundCard("system", PLAN.replace(sample_rate=44100, tones_hz=(300.0, 430.0, 570.0, 720.0, 880.0),
                                                 window_s=0.1)).connect()
    with pytest.raises(SoundCardError, match="no audio device named like 'no-such-card'"):
        AcousticSoundCard("no-such-card", PLAN).connect()
