"""The acoustic encodings (drivers/audio_shots.py) and the in-process path (drivers/audio_sim.py):
pure numpy, no audio. The sound card itself is tested in test_soundcard.py."""
from __future__ import annotations

import numpy as np
import pytest

from labpnn.drivers.audio_shots import (
    DEFAULT_TONES_HZ,
    ReferenceError,
    ShotPlan,
    levels,
    locate_reference,
    mixing_collisions,
    output_axis,
    readout,
    reference_chirp,
    synthesise,
)
from labpnn.drivers.audio_sim import SimulatedAudioPath
from labpnn.drivers.roles import BatchInstrument
from labpnn.protocols.errors import LimitExceeded
from labpnn.rig import Rig
from labpnn.sim_instruments.acoustic import AcousticConfig, AcousticPlant

FS = 48000
SHORT = dict(burst_s=0.3, window_start_s=0.15, window_s=0.1, tail_s=0.17)  # 0.49 s shots, 10 Hz grid


def one_hot(plan: ShotPlan, index: int, value: float = 1.0) -> np.ndarray:
    c = np.zeros((1, plan.n_controls), np.float32)
    c[0, index] = value
    return c


def window_spectrum(x: np.ndarray, plan: ShotPlan) -> np.ndarray:
    part = x[plan.window_span]
    return 2 * np.abs(np.fft.rfft(part)) / len(part)


def linear_plant(**overrides) -> AcousticPlant:
    """The cavity with no drift, no model gap and a linear speaker: its small-signal transfer
    function is then the whole story, up to noise."""
    return AcousticPlant(AcousticConfig.cavity(drift_scale=0, model_gap=False, nonlinearity_scale=0, **overrides))


# -- the plan -------------------------------------------------------------------------------------
def test_default_tones_are_on_the_window_grid_and_free_of_mixing_products():
    plan = ShotPlan()
    grid = FS / plan.samples(plan.window_s)
    assert grid == 5.0
    for f in plan.tones_hz:
        assert f / grid == int(f / grid)
    assert mixing_collisions(DEFAULT_TONES_HZ) == []
    assert min(plan.tones_hz) >= 300 and max(plan.tones_hz) <= 900


def test_plan_refuses_off_grid_tones_mixing_products_and_a_window_in_the_fades():
    with pytest.raises(ValueError, match="FFT grid"):
        ShotPlan(tones_hz=(300.0, 432.5))
    with pytest.raises(ValueError, match="700 = 300 \\+ 400"):
        ShotPlan(tones_hz=(300.0, 400.0, 700.0))
    assert ShotPlan(tones_hz=(300.0, 400.0, 700.0), allow_mixing=True).n_controls == 12
    with pytest.raises(ValueError, match="steady part"):
        ShotPlan(window_start_s=0.01)
    with pytest.raises(ValueError, match="steady part"):
        ShotPlan(window_start_s=0.3, window_s=0.2)  # ends inside the fade-out (0.475 s)


def test_plan_round_trips_through_its_dict():
    plan = ShotPlan(encoding="segments", n_segments=4, **SHORT)
    assert ShotPlan(**plan.as_dict()) == plan


# -- synthesis ------------------------------------------------------------------------------------
def test_a_tone_lands_in_its_own_window_bin_only():
    plan = ShotPlan()
    for tone in range(len(plan.tones_hz)):
        shot = synthesise(plan, one_hot(plan, tone))[0, :, 0]
        spectrum = window_spectrum(shot, plan)
        k = int(plan.tones_hz[tone] * plan.samples(plan.window_s) / FS)
        # amplitude max_amplitude exactly (float32 samples: ~1e-7 relative), nothing elsewhere
        assert spectrum[k] == pytest.approx(plan.max_amplitude, rel=1e-5)
        assert np.delete(spectrum, k).max() < 1e-6 * plan.max_amplitude * 100


def test_controls_map_linearly_to_amplitude_per_speaker_and_tone():
    plan = ShotPlan(**SHORT)
    controls = np.random.default_rng(1).random((3, plan.n_controls)).astype(np.float32)
    shots = synthesise(plan, controls)
    assert shots.shape == (3, plan.n_samples, plan.n_speakers + 1) and shots.dtype == np.float32
    n = plan.samples(plan.window_s)
    bins = [int(f * n / FS) for f in plan.tones_hz]
    for s in range(plan.n_speakers):
        got = np.stack([window_spectrum(shots[b, :, s], plan)[bins] for b in range(3)])
        want = controls[:, s * len(bins):(s + 1) * len(bins)] * plan.max_amplitude
        np.testing.assert_allclose(got, want, atol=1e-7)  # float32 synthesis


def test_fades_make_no_click():
    plan = ShotPlan()
    shot = synthesise(plan, one_hot(plan, 2))[0, :, 0].astype(np.float64)
    burst = shot[plan.burst_span]
    assert burst[0] == 0.0 and burst[-1] == 0.0
    assert not shot[:plan.burst_span.start].any() and not shot[plan.burst_span.stop:].any()
    # Splatter: spectral energy more than 200 Hz from the tone, relative to the total. A
    # rectangular (unfaded) burst puts ~1.5e-3 there; the sin^2 fades must stay below 1e-6.
    n_fft = 8 * len(burst)
    freqs = np.fft.rfftfreq(n_fft, 1 / FS)
    far = np.abs(freqs - plan.tones_hz[2]) > 200

    def splatter(x):
        power = np.abs(np.fft.rfft(x, n_fft)) ** 2
        return power[far].sum() / power.sum()

    rectangular = plan.max_amplitude * np.sin(2 * np.pi * plan.tones_hz[2] * np.arange(len(burst)) / FS)
    assert splatter(rectangular) > 1e-4
    assert splatter(burst) < 1e-6


def test_segments_telescope_to_a_steady_carrier_and_read_back_as_rms():
    plan = ShotPlan(encoding="segments", n_segments=4, n_time_bins=16, segment_carrier_hz=640.0)
    # 0.5 s / 16 bins = 31.25 ms = 20 periods of 640 Hz: a whole number, so a bin's RMS is exact
    shots = synthesise(plan, np.ones((1, plan.n_controls), np.float32))
    env = np.abs(shots[0, plan.burst_span, 0])
    assert env[0] == 0 and env[-1] == 0
    out = readout(shots[:, :, :plan.n_speakers], 0, plan).reshape(plan.n_mics, plan.n_time_bins)
    inner = out[:, 1:-1]  # the first and last bins hold the outer 25 ms fades
    np.testing.assert_allclose(inner, plan.max_amplitude / np.sqrt(2), rtol=1e-5)
    # segment 2 of 4 (125-250 ms) alone at half level: bins 4-7 hold it, and its 25 ms
    # cross-fades (centred on 125 and 250 ms) reach into bins 3 and 8; bins 5 and 6 are steady
    shots = synthesise(plan, one_hot(plan, 1, 0.5))
    bins = readout(shots[:, :, :plan.n_speakers], 0, plan)[0, :plan.n_time_bins]
    np.testing.assert_allclose(bins[5:7], 0.5 * plan.max_amplitude / np.sqrt(2), rtol=1e-5)
    assert bins[:3].max() == 0 and bins[9:].max() == 0 and bins[3] > 0 and bins[8] > 0


# -- readout --------------------------------------------------------------------------------------
def test_readout_of_a_synthetic_recording_is_amplitude_times_gain():
    plan = ShotPlan(**SHORT)
    rng = np.random.default_rng(2)
    controls = rng.random((4, plan.n_controls)).astype(np.float32)
    shots = synthesise(plan, controls)
    gains = np.array([0.5, -1.3, 2.0, 0.25])  # mic m hears speaker m times gain m
    latency = 777
    recording = np.zeros((4, plan.capture_frames, plan.n_mics), np.float32)
    recording[:, latency:latency + plan.n_samples] = shots[:, :, :plan.n_speakers] * gains.astype(np.float32)
    got = readout(recording, latency, plan).reshape(4, plan.n_mics, len(plan.tones_hz))
    want = controls.reshape(4, plan.n_speakers, -1) * plan.max_amplitude * np.abs(gains)[None, :, None]
    np.testing.assert_allclose(got, want, atol=1e-7)  # float32 waveform x gain, float64 DFT
    # per-shot offsets: shifting one shot's recording is undone by its offset
    shifted = np.roll(recording, 100, axis=1)
    np.testing.assert_allclose(readout(shifted, np.full(4, latency + 100), plan).reshape(got.shape), got, atol=1e-7)
    with pytest.raises(ValueError, match="outside"):
        readout(recording, plan.capture_frames, plan)


def test_output_axis_matches_outputs():
    for plan in (ShotPlan(), ShotPlan(encoding="segments")):
        axis = output_axis(plan)
        assert len(axis["values"]) == len(axis["labels"]) == plan.n_outputs
    axis = output_axis(ShotPlan())
    assert axis["unit"] == "Hz" and axis["values"][:5] == list(DEFAULT_TONES_HZ) and axis["labels"][5] == "mic2 300 Hz"


def test_levels_sum_everything_on_a_channel():
    plan = ShotPlan()
    peak, rms = levels(synthesise(plan, np.ones((1, plan.n_controls), np.float32)), plan.burst_span)
    n_tones = len(plan.tones_hz)
    # five unit tones: peak just under 5 * max_amplitude (phases never all align exactly here)
    assert 0.8 * n_tones * plan.max_amplitude < peak[0, 0] <= n_tones * plan.max_amplitude
    # RMS of uncorrelated tones adds in power; each sin^2 fade keeps mean(sin^4) = 3/8 of its power
    expected = plan.max_amplitude * np.sqrt(n_tones / 2 * (1 - 2 * plan.fade_s * 5 / 8 / plan.burst_s))
    assert rms[0, 0] == pytest.approx(expected, rel=1e-3)
    assert peak[0, -1] == pytest.approx(plan.chirp_level, rel=1e-3)


# -- reference ------------------------------------------------------------------------------------
def _reference_recording(plan: ShotPlan, latency: int, gain: float = 1.0) -> np.ndarray:
    shot = synthesise(plan, np.zeros((1, plan.n_controls), np.float32))[0, :, -1]
    rec = np.zeros(plan.capture_frames, np.float32)
    rec[latency:latency + plan.n_samples] = gain * shot
    return rec


def test_reference_is_located_at_a_known_offset():
    plan = ShotPlan(**SHORT)
    for latency in (0, 1, 1024, plan.max_latency_frames):
        offset, quality = locate_reference(_reference_recording(plan, latency), plan, expected=latency)
        assert offset == latency
        assert quality["gain"] == pytest.approx(1.0, abs=1e-6) and quality["residual_lsb"] < 0.1
    # an analogue loopback's gain and a few LSB of noise are accepted
    noisy = _reference_recording(plan, 500, gain=0.7)
    noisy += np.random.default_rng(3).normal(0, 2 ** -15, noisy.shape).astype(np.float32)
    assert locate_reference(noisy, plan)[0] == 500


def test_missing_moved_or_distorted_reference_is_refused():
    plan = ShotPlan(**SHORT)
    with pytest.raises(ReferenceError, match="missing") as missing:
        locate_reference(np.zeros(plan.capture_frames, np.float32), plan)
    assert missing.value.reason == "missing"
    with pytest.raises(ReferenceError, match="missing"):
        locate_reference(_reference_recording(plan, 300, gain=0.1), plan)  # a weak echo
    with pytest.raises(ReferenceError, match="moved"):
        locate_reference(_reference_recording(plan, 1024 + 1), plan, expected=1024)
    clipped = np.clip(_reference_recording(plan, 1024), -0.2, 0.2)  # chirp level 0.25
    with pytest.raises(ReferenceError, match="distorted"):
        locate_reference(clipped, plan)
    died = _reference_recording(plan, 1024)
    died[1024 + plan.window_span.stop:] = 0  # the path went silent after the window: no closing chirp
    with pytest.raises(ReferenceError, match="closing chirp"):
        locate_reference(died, plan)
    glitch = _reference_recording(plan, 1024)
    glitch[plan.burst_span.start + 1024 + 300] += 10 * 2 ** -15  # one sample off by 10 LSB
    with pytest.raises(ReferenceError, match="distorted"):
        locate_reference(glitch, plan)


def test_chirp_is_faded_and_in_band():
    plan = ShotPlan()
    chirp = reference_chirp(plan)
    assert chirp[0] == 0 and chirp[-1] == 0 and np.abs(chirp).max() <= plan.chirp_level


# -- in-process path ------------------------------------------------------------------------------
def test_in_process_path_reads_the_plants_transfer_function():
    plant = linear_plant()
    plan = ShotPlan(**SHORT)
    sim = SimulatedAudioPath(plant, plan)
    assert isinstance(sim, BatchInstrument)
    assert "in-process acoustic simulation (no audio path)" in sim.identify()
    controls = np.zeros((2, plan.n_controls), np.float32)
    controls[0, 0] = 1.0  # speaker 1, tone 1 at full amplitude
    controls[1, 7] = 0.5  # speaker 2, tone 3 at half
    traces, flags = sim.measure_batch(controls)
    assert not flags.any()
    assert sim.simulated_time_s == pytest.approx(2 * plan.duration_s)
    out = traces.reshape(2, plan.n_mics, len(plan.tones_hz))
    h = plant.transfer_function(np.array(plan.tones_hz))  # [F, M, S]
    expected = [np.abs(h[0, :, 0]) * plan.max_amplitude, np.abs(h[2, :, 1]) * 0.5 * plan.max_amplitude]
    # The bins with no tone read the noise floor plus what is left of the ring-up transient;
    # the tone bins may differ from |H| a by that much (a few of it) and no more.
    floor = max(np.delete(out[0], 0, axis=1).max(), np.delete(out[1], 2, axis=1).max())
    assert 0 < floor < 3e-3 * out.max()  # -73 dBFS of noise under a -34 dBFS tone
    np.testing.assert_allclose(out[0, :, 0], expected[0], atol=3 * floor)
    np.testing.assert_allclose(out[1, :, 2], expected[1], atol=3 * floor)


def test_in_process_rows_have_no_memory_shuffled_rows_give_the_same_traces():
    plant = linear_plant(seed=4)
    plan = ShotPlan(**SHORT)
    sim = SimulatedAudioPath(plant, plan)
    controls = np.random.default_rng(5).random((12, plan.n_controls)).astype(np.float32)
    first, _ = sim.measure_batch(controls)
    repeat, _ = sim.measure_batch(controls)
    order = np.random.default_rng(6).permutation(12)
    shuffled, _ = sim.measure_batch(controls[order])
    noise = np.sqrt(np.mean((first - repeat) ** 2))
    assert 0 < noise < 1e-3 * np.abs(first).max()  # noise is there, and small
    # with the rows in another order, each row reads the same up to that noise (RMS estimates of
    # 240 values each: the ratio of two such is within ~10 % of 1; 1.5 leaves room)
    assert np.sqrt(np.mean((shuffled - first[order]) ** 2)) < 1.5 * noise


def test_in_process_path_through_the_rig_and_its_level_limit():
    plant = linear_plant()
    plan = ShotPlan(**SHORT)
    sim = SimulatedAudioPath(plant, plan, max_peak=0.3)
    rig = Rig([sim], [sim], name="acoustic-sim").connect()
    description = rig.describe()
    assert "no audio path" in description["instruments"]["soundcard"]
    assert description["n_outputs"] == plan.n_outputs and description["axis"]["unit"] == "Hz"
    quiet = np.full((3, plan.n_controls), 0.2, np.float32)
    assert rig.run(quiet).shape == (3, plan.n_outputs)
    clock = plant.clock_s
    loud = np.vstack([quiet, np.ones((1, plan.n_controls), np.float32)])  # the last row peaks near 0.5
    with pytest.raises(LimitExceeded, match="row 3: output channel 1 peak"):
        rig.run(loud)
    assert plant.clock_s == clock  # refused whole: not one shot reached the plant
    sim.configure(max_peak=[0.6, 0.6, 0.6, 0.6, 0.3])
    assert rig.run(loud).shape == (4, plan.n_outputs)
    with pytest.raises(ValueError, match="RMS"):
        sim.configure(max_rms=0.01)
        sim.check(loud)


def test_in_process_path_refuses_a_tail_shorter_than_the_ring_down():
    plant = linear_plant()  # cavity: T60 0.16 s
    with pytest.raises(ValueError, match="ring-down"):
        SimulatedAudioPath(plant, ShotPlan(**{**SHORT, "tail_s": 0.05}))
    with pytest.raises(ValueError, match="speakers"):
        SimulatedAudioPath(plant, ShotPlan(speaker_channels=(1, 2), reference_out=3, **SHORT))


def test_row_by_row_equals_the_batch_within_noise():
    plant = linear_plant(seed=7)
    plan = ShotPlan(**SHORT)
    sim = SimulatedAudioPath(plant, plan)
    controls = np.random.default_rng(8).random((2, plan.n_controls)).astype(np.float32)
    batch, _ = sim.measure_batch(controls)
    again, _ = sim.measure_batch(controls)
    rows = []
    for row in controls:
        sim.apply(row)
        trace, bits = sim.acquire()
        rows.append(trace)
        assert bits == 0
    noise = np.abs(batch - again).max()
    np.testing.assert_allclose(np.array(rows), batch, atol=3 * noise)
