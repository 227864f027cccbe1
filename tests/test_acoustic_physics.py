"""Physics of the simulated acoustic bench (`labpnn.sim_instruments.acoustic`): mode frequencies, Q,
speaker intermodulation, noise, drift, streaming, copy-to-copy variation, model gap, cost."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace

import numpy as np
import pytest

from labpnn.sim_instruments.acoustic import AcousticConfig, AcousticPlant

FS = 48000
LSB16 = 2.0**-15
# a clean bench for measuring the linear physics: no noise, no drift, no gap, fine ADC
CLEAN = dict(noise_scale=0.0, drift_scale=0.0, model_gap=False, adc_bits=24)


def tone(freq_hz: float, seconds: float, amp: float = 0.25, fade_s: float = 0.025, phase: float = 0.0):
    """A sine burst with sin^2 fades at both ends."""
    n = int(round(seconds * FS))
    t = np.arange(n) / FS
    env = np.ones(n)
    k = int(round(fade_s * FS))
    ramp = np.sin(0.5 * np.pi * np.arange(k) / k) ** 2
    env[:k], env[n - k :] = ramp, ramp[::-1]
    return amp * env * np.sin(2 * np.pi * freq_hz * t + phase)


def spectrum_amplitudes(x: np.ndarray, freqs_hz, start_s: float, window_s: float) -> np.ndarray:
    """Amplitude of each (on-grid) frequency in a rectangular window: no window function needed."""
    seg = x[int(start_s * FS) : int((start_s + window_s) * FS)]
    spec = np.fft.rfft(seg, axis=0) * 2 / len(seg)
    bins = np.round(np.asarray(freqs_hz) * window_s).astype(int)
    return np.abs(spec[bins])


def peak_frequency(x: np.ndarray, near_hz: float, half_width_hz: float, pad: int = 8) -> float:
    """Frequency of the largest |FFT| value within near +- half_width (zero-padded, parabolic)."""
    nfft = pad * len(x)
    mag = np.abs(np.fft.rfft(x, n=nfft))
    f = np.fft.rfftfreq(nfft, 1 / FS)
    sel = np.flatnonzero(np.abs(f - near_hz) <= half_width_hz)
    i = sel[np.argmax(mag[sel])]
    a, b, c = np.log(mag[i - 1 : i + 2])
    return float(f[i] + 0.5 * (a - c) / (a - 2 * b + c) * (f[1] - f[0]))


# ----------------------------------------------------------------------------- modes
def test_plate_mode_frequencies_follow_kirchhoff_formula():
    cfg = AcousticConfig.plate(**CLEAN)
    plant = AcousticPlant(cfg)
    a, b, h = cfg.dimensions_m
    rigidity = cfg.youngs_modulus_pa * h**3 / (12 * (1 - cfg.poisson_ratio**2))
    speed = math.sqrt(rigidity / (cfg.density_kg_m3 * h))
    expected = sorted(
        math.pi / 2 * ((m / a) ** 2 + (n / b) ** 2) * speed for m in range(1, 30) for n in range(1, 30)
    )
    expected = np.array([f for f in expected if f <= cfg.max_mode_hz])
    got = plant.mode_frequencies_hz
    assert not plant.mode_is_gap.any()
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(415, abs=1)  # the documented fundamental
    # measured: the impulse response peaks at the isolated low modes (within a tenth of a linewidth)
    impulse = np.zeros((int(2.0 * FS), 1), dtype=np.float32)
    impulse[0] = 1.0
    y = plant.process(impulse)[:, 0].astype(float)
    for f, q in zip(got[:3], plant.mode_q[:3]):
        assert peak_frequency(y, f, f / q) == pytest.approx(f, abs=0.1 * f / q)


def test_cavity_mode_frequencies_follow_room_mode_formula():
    cfg = AcousticConfig.cavity(**CLEAN)
    plant = AcousticPlant(cfg)
    c = cfg.sound_speed_m_s
    dims = cfg.dimensions_m
    expected = sorted(
        c / 2 * math.sqrt(sum((i / d) ** 2 for i, d in zip(idx, dims)))
        for idx in itertools.product(range(12), repeat=3)
        if any(idx)
    )
    expected = np.array([f for f in expected if f <= cfg.max_mode_hz])
    assert plant.mode_frequencies_hz == pytest.approx(expected, rel=1e-12)
    assert plant.mode_frequencies_hz[0] == pytest.approx(c / 2 / dims[0])  # (1, 0, 0)
    lo, hi = cfg.tone_band_hz
    assert ((expected > lo) & (expected < hi)).sum() >= 8  # several modes inside the tone band
    assert plant.mode_q.min() >= 15 and plant.mode_q.max() <= 35
    assert 0.1 < plant.ringdown_s < 0.3


def test_q_from_ringdown():
    plant = AcousticPlant(AcousticConfig.plate(**CLEAN))
    f0, q0 = plant.mode_frequencies_hz[0], plant.mode_q[0]  # the isolated fundamental
    drive = np.concatenate([tone(f0, 0.4, amp=0.1, fade_s=0.02), np.zeros(int(0.4 * FS))])
    y = plant.process(drive[:, None].astype(np.float32))[:, 0].astype(float)
    t = np.arange(len(y)) / FS
    # complex demodulation at the damped frequency, averaged over whole periods
    wd = 2 * np.pi * f0 * math.sqrt(1 - 0.25 / q0**2)
    base = y * np.exp(-1j * wd * t)
    period = int(round(10 * FS / f0))
    env = np.abs(np.convolve(base, np.ones(period) / period, mode="same"))
    sel = (t > 0.43) & (t < 0.70)  # after the fade-out, while well above the ADC floor
    slope = np.polyfit(t[sel], np.log(env[sel]), 1)[0]
    q_measured = math.pi * f0 / -slope
    assert q_measured == pytest.approx(q0, rel=0.02)
    # the documented T60 of the slowest mode follows from the same Q
    assert plant.ringdown_s == pytest.approx(3 * math.log(10) * q0 / (math.pi * f0), rel=1e-9)


def test_cavity_transfer_has_mixed_signs_and_varies_from_tone_to_tone():
    plant = AcousticPlant(AcousticConfig.cavity(noise_scale=0.0, drift_scale=0.0))
    tones = np.arange(300.0, 901.0, 30.0)
    h = plant.transfer_function(tones)  # (F, M, S)
    assert h.shape == (len(tones), 4, 4)
    # at most tones, each mic hears some speakers in phase and others in anti-phase
    re = h.real
    mixed = (re.max(axis=2) > 0) & (re.min(axis=2) < 0)
    assert mixed.mean() > 0.5
    mag = np.abs(h)
    assert (mag.max(axis=0) / mag.min(axis=0)).min() > 3  # every path changes strongly over the band
    # and the simulated recording agrees with the transfer function (small signal, steady state)
    quiet = AcousticPlant(AcousticConfig.cavity(**CLEAN, nonlinearity_scale=0.0))
    drive = np.zeros((int(0.5 * FS), 4))
    drive[:, 2] = tone(600.0, 0.5, amp=0.2)
    y = quiet.process(drive.astype(np.float32)).astype(float)
    got = spectrum_amplitudes(y, [600.0], 0.25, 0.2)[0]
    want = 0.2 * np.abs(quiet.transfer_function([600.0])[0, :, 2])
    assert got == pytest.approx(want, rel=2e-3)


# ----------------------------------------------------------------------------- speaker nonlinearity
@pytest.mark.parametrize("amp", [0.25, 0.1])
def test_intermodulation_matches_hammerstein_and_vanishes_when_off(amp):
    cfg = AcousticConfig.plate(**CLEAN)
    f1, f2 = 1600.0, 1700.0  # on the 5 Hz grid of a 0.2 s window
    products = {"f1+f2": f1 + f2, "2f1-f2": 2 * f1 - f2, "2f2-f1": 2 * f2 - f1, "2f1": 2 * f1}
    drive = (tone(f1, 0.8, amp) + tone(f2, 0.8, amp))[:, None].astype(np.float32)
    levels = {}
    for scale in (1.0, 0.0):
        plant = AcousticPlant(replace(cfg, nonlinearity_scale=scale))
        y = plant.process(drive)[:, 0].astype(float)
        freqs = [f1, *products.values()]
        mic = spectrum_amplitudes(y, freqs, 0.5, 0.2)
        speaker = mic / np.abs(plant.transfer_function(freqs)[:, 0, 0])  # refer back to the speaker
        levels[scale] = dict(zip(["f1", *products], speaker))
    on, off = levels[1.0], levels[0.0]
    c2, c3 = cfg.speaker_c2, cfg.speaker_c3
    # exact for a polynomial front end: carrier compressed by the cubic, products from c2 and c3
    assert on["f1"] == pytest.approx(amp * (1 + 2.25 * c3 * amp**2), rel=1e-3)
    assert on["f1+f2"] == pytest.approx(c2 * amp**2, rel=1e-3)
    assert on["2f1"] == pytest.approx(0.5 * c2 * amp**2, rel=1e-3)
    assert on["2f1-f2"] == pytest.approx(0.75 * abs(c3) * amp**3, rel=1e-3)
    assert on["2f2-f1"] == pytest.approx(0.75 * abs(c3) * amp**3, rel=1e-3)
    dbc = {k: 20 * np.log10(on[k] / on["f1"]) for k in products}
    if amp == 0.25:  # the default drive level: every product between -40 and -20 dBc
        assert all(-40 < v < -20 for v in dbc.values()), dbc
    else:
        assert dbc["2f1-f2"] < -50
    for k in products:  # a linear speaker makes none (24-bit ADC floor ~ -140 dBFS)
        assert 20 * np.log10(off[k] / off["f1"]) < -100


def test_duffing_stiffening_bends_the_resonance_upwards():
    base = AcousticConfig.plate(**CLEAN, nonlinearity_scale=0.0)
    f0, q0 = AcousticPlant(base).mode_frequencies_hz[0], AcousticPlant(base).mode_q[0]
    detune = 0.5 * f0 / q0  # half a linewidth
    ratios = {}
    for shift in (0.0, 0.01):
        amp = {}
        for sign in (-1, 1):
            plant = AcousticPlant(replace(base, duffing_shift=shift))
            f = round((f0 + sign * detune) * 5) / 5  # on the 5 Hz grid of a 0.2 s window
            y = plant.process(tone(f, 0.5, 0.25)[:, None].astype(np.float32))[:, 0].astype(float)
            amp[sign] = spectrum_amplitudes(y, [f], 0.25, 0.2)[0]
        ratios[shift] = amp[1] / amp[-1]
    assert ratios[0.0] == pytest.approx(1.0, abs=0.1)  # linear: symmetric about the resonance
    assert ratios[0.01] > 1.3 * ratios[0.0]  # stiffened: the peak has moved up


# ----------------------------------------------------------------------------- noise and ADC
def test_noise_statistics():
    cfg = AcousticConfig.cavity(drift_scale=0.0)
    silence = np.zeros((4 * FS, 4), dtype=np.float32)
    # self-noise alone: white, independent per mic, at the stated RMS
    self_only = AcousticPlant(replace(cfg, ambient_noise_rms=0.0)).process(silence).astype(float)
    quant = LSB16**2 / 12
    var = self_only.var(axis=0)
    # 192k samples: the variance is known to ~0.3 %; quantisation adds LSB^2/12 (~1 %)
    assert var == pytest.approx(np.full(4, cfg.mic_self_noise_rms**2 + quant), rel=0.02)
    assert np.abs(np.corrcoef(self_only.T) - np.eye(4)).max() < 0.02
    lag1 = (self_only[1:] * self_only[:-1]).mean(0) / var
    assert np.abs(lag1).max() < 0.02
    # ambient alone: low-pass (AR(1), corner 150 Hz) and correlated across mics by the fixed mixing
    plant = AcousticPlant(replace(cfg, mic_self_noise_rms=0.0))
    amb = plant.process(silence).astype(float)
    a = math.exp(-2 * math.pi * cfg.ambient_corner_hz / FS)
    # ~N (1 - a) / (1 + a) = 1900 effective samples: the variance is known to ~3 %, 4 sigma
    assert amb.var(axis=0) == pytest.approx(np.full(4, cfg.ambient_noise_rms**2 + quant), rel=0.13)
    lag1 = (amb[1:] * amb[:-1]).mean(0) / amb.var(0)
    assert lag1 == pytest.approx(np.full(4, a), abs=0.01)
    mix = plant._ambient_mix
    assert np.abs(np.corrcoef(amb.T) - mix @ mix.T).max() < 0.15
    # both together sit 50-70 dB below a typical drive
    full = AcousticPlant(cfg)
    noise_rms = full.process(silence[:FS]).astype(float).std()
    lo, hi = cfg.tone_band_hz
    drive = np.zeros((FS, 4))
    for s in range(4):
        for k, f in enumerate(np.linspace(lo, hi, 5)):
            drive[:, s] += tone(round(f / 5) * 5, 1.0, 0.2, phase=np.pi * k * k / 5 + s)
    signal_rms = full.process(drive.astype(np.float32))[FS // 4 :].astype(float).std()
    assert 50 < 20 * np.log10(signal_rms / noise_rms) < 70


def test_adc_clips_and_quantises():
    plant = AcousticPlant(AcousticConfig.cavity(drift_scale=0.0))
    drive = np.zeros((FS // 2, 4))
    for s in range(4):
        drive[:, s] = tone(343.2, 0.5, 1.0) * (-1) ** s  # full scale on the first mode
    y = plant.process(drive.astype(np.float32))
    assert y.dtype == np.float32 and y.shape == (FS // 2, 4)
    assert np.all(y <= 1 - LSB16) and np.all(y >= -1) and (np.abs(y) >= 1 - LSB16).any()  # clipped
    codes = y.astype(float) / LSB16
    assert np.array_equal(codes, np.round(codes))  # whole 16-bit codes (copied exactly)
    fine = AcousticPlant(AcousticConfig.cavity(drift_scale=0.0, adc_bits=12))
    codes = fine.process(drive[:4800].astype(np.float32) * 0.1).astype(float) * 2**11
    assert np.array_equal(codes, np.round(codes))


# ----------------------------------------------------------------------------- drift
def test_temperature_shifts_modes():
    for preset, coeff in ((AcousticConfig.plate, -200e-6), (AcousticConfig.cavity, 0.5 / 293.15)):
        plant = AcousticPlant(preset(**CLEAN))
        ref = plant.mode_frequencies_hz
        assert plant.temperature_k == pytest.approx(293.15)
        plant.temperature_k = 303.15
        assert plant.temperature_k == pytest.approx(303.15)
        assert plant.mode_frequencies_hz == pytest.approx(ref * (1 + 10 * coeff), rel=1e-12)
    # measured: +20 K moves the plate's fundamental down by 0.4 %
    impulse = np.zeros((2 * FS, 1), dtype=np.float32)
    impulse[0] = 1.0
    peaks = []
    for temp in (293.15, 313.15):
        plant = AcousticPlant(AcousticConfig.plate(**CLEAN))
        plant.temperature_k = temp
        f0, q0 = plant.mode_frequencies_hz[0], plant.mode_q[0]
        y = plant.process(impulse)[:, 0].astype(float)
        peaks.append(peak_frequency(y, f0, f0 / q0))
    assert peaks[1] / peaks[0] - 1 == pytest.approx(-200e-6 * 20, rel=0.05)


def test_drift_follows_the_simulated_clock():
    cfg = AcousticConfig.cavity(**{**CLEAN, "drift_scale": 1.0})
    a, b = AcousticPlant(cfg), AcousticPlant(cfg)
    t0 = a.drift_state
    time.sleep(0.02)
    assert a.drift_state[0] == t0[0] and a.clock_s == 0.0  # wall-clock time changes nothing
    a.idle(1.0)
    b.process(np.zeros((FS, 4), dtype=np.float32))
    assert a.clock_s == b.clock_s == 1.0
    assert a.temperature_k == b.temperature_k and a.temperature_k != t0[0]  # same clock, same drift
    # scale: drift_scale 0 freezes it, 2 doubles the excursion of the same random path
    temps = {}
    for scale in (0.0, 1.0, 2.0):
        p = AcousticPlant(replace(cfg, drift_scale=scale))
        p.idle(600.0)
        temps[scale] = p.temperature_k - cfg.reference_temperature_k
        gains = p.drift_state[1]
        if scale == 0.0:
            assert np.all(gains == 1.0)
    assert temps[0.0] == 0.0
    assert temps[2.0] == pytest.approx(2 * temps[1.0], rel=1e-12)
    # magnitude: RMS change over a minute ~ 0.5 K sqrt(2 (1 - exp(-60/1800))) = 0.13 K; gains ~1 %
    p = AcousticPlant(replace(cfg, seed=3))
    temps, gains = [], []
    for _ in range(120):
        p.idle(60.0)
        temps.append(p.temperature_k)
        gains.append(p.drift_state[1])
    step = np.sqrt(np.mean(np.diff(temps) ** 2))
    assert 0.07 < step < 0.25
    assert 0.005 < np.std(np.array(gains)) < 0.02


def test_recorded_level_follows_gain_and_temperature_drift():
    cfg = AcousticConfig.cavity(**{**CLEAN, "drift_scale": 5.0}, nonlinearity_scale=0.0)
    plant = AcousticPlant(cfg)
    drive = np.zeros((int(0.45 * FS), 4))
    drive[:, 1] = tone(500.0, 0.45, 0.2)
    amps, predicted = [], []
    for _ in range(2):
        plant.reset()
        start = plant.clock_s
        # temperature holds within a 0.5 s drift step; the gains barely move in 0.45 s
        assert int(start / cfg.drift_step_s) == int((start + 0.44) / cfg.drift_step_s)
        y = plant.process(drive[: int(0.3 * FS)].astype(np.float32)).astype(float)
        # the gains ramp inside the step: predict at the middle of the analysis window
        predicted.append(0.2 * np.abs(plant.transfer_function([500.0])[0, :, 1]))
        y = np.concatenate([y, plant.process(drive[int(0.3 * FS) :].astype(np.float32)).astype(float)])
        amps.append(spectrum_amplitudes(y, [500.0], 0.2, 0.2)[0])
        plant.idle(600.0 + cfg.drift_step_s - (plant.clock_s % cfg.drift_step_s))
    change = amps[1] / amps[0]
    assert np.abs(change - 1).max() > 0.02  # the drift is visible in the recording ...
    assert change == pytest.approx(predicted[1] / predicted[0], rel=5e-3)  # ... and is what the model says


# ----------------------------------------------------------------------------- streaming
def _multitone(seconds: float, n_speakers: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((int(seconds * FS), n_speakers))
    for s in range(n_speakers):
        for f in rng.choice(np.arange(300, 900, 10), 4, replace=False):
            out[:, s] += tone(f, seconds, rng.uniform(0.05, 0.25), phase=rng.uniform(0, 6))
    return out.astype(np.float32)


@pytest.mark.parametrize("block", [1024, 777])
def test_streamed_blocks_equal_whole_shot(block):
    cfg = AcousticConfig.cavity(seed=5, copy_seed=2)  # noise, drift and gap all on
    drive = _multitone(0.7, 4)  # crosses a 0.5 s drift step
    whole = AcousticPlant(cfg).process(drive)
    plant = AcousticPlant(cfg)
    parts = np.concatenate([plant.process(drive[i : i + block]) for i in range(0, len(drive), block)])
    assert plant.clock_s == pytest.approx(0.7)
    # the same arithmetic up to rounding (~1e-13), then the same 16-bit codes: at most 1 LSB apart,
    # almost never at all
    diff = np.abs(whole.astype(float) - parts)
    assert diff.max() <= LSB16 and (diff > 0).mean() < 1e-4
    assert np.abs(whole).max() > 0.1  # not a trivially silent comparison


def test_streaming_with_duffing_matches_whole_shot():
    cfg = AcousticConfig.plate(duffing_shift=0.01, seed=1)
    drive = tone(420.0, 0.15, 0.25)[:, None].astype(np.float32)
    whole = AcousticPlant(cfg).process(drive)
    plant = AcousticPlant(cfg)
    parts = np.concatenate([plant.process(drive[i : i + 1024]) for i in range(0, len(drive), 1024)])
    assert np.abs(whole.astype(float) - parts).max() <= LSB16


def test_process_shots_equals_shots_from_rest():
    cfg = AcousticConfig.cavity(noise_scale=0.0, drift_scale=0.0)
    drives = np.stack([_multitone(0.3, 4, seed) for seed in range(3)])
    batch = AcousticPlant(cfg).process_shots(drives)
    plant = AcousticPlant(cfg)
    for i, d in enumerate(drives):
        plant.reset()
        single = plant.process(d)
        assert np.abs(single.astype(float) - batch[i]).max() <= LSB16  # two numeric paths
    assert plant.clock_s == pytest.approx(0.9)
    # noise: independent per shot, and the clock advances by B * n
    noisy = AcousticPlant(AcousticConfig.cavity(drift_scale=0.0))
    silent = noisy.process_shots(np.zeros((3, FS // 4, 4), dtype=np.float32)).astype(float)
    assert noisy.clock_s == pytest.approx(0.75)
    c = np.corrcoef(silent[:, :, 0])
    assert np.abs(c[np.triu_indices(3, 1)]).max() < 0.2
    assert silent[0].std() > 0


def _exact_shots(plant: AcousticPlant, drives: np.ndarray) -> np.ndarray:
    """`process_shots` the direct way, from the plant's own pieces: per chunk of 16 shots, gains
    ramped per shot, the speakers, one FFT convolution with the whole impulse response (2n - 1
    samples, nothing cut), the noise of the chunk, the ADC."""
    b, n, n_s = drives.shape
    start = plant.samples
    kern = plant._kernel_at(plant._temperature_at(start // plant._step))
    out = np.empty((b, n, plant.n_mics), dtype=np.float32)
    ramp = (np.arange(n) / (n - 1))[None, :, None]
    for lo in range(0, b, 16):
        hi = min(b, lo + 16)
        first = start + np.arange(lo, hi) * n
        g0, g1 = plant._gains(first), plant._gains(first + (n - 1))
        g = g0[:, None, :] + ramp * (g1 - g0)[:, None, :]
        v = plant._speakers(drives[lo:hi].astype(float), g[..., :n_s])
        y, _ = plant._linear(kern, v, None)
        noise = plant._draw_noise((hi - lo,), n, fresh_state=True)
        out[lo:hi] = plant._adc(y, g[..., n_s:], noise)
    return out


def test_process_shots_matches_the_exact_convolution_with_the_same_noise():
    cfg = AcousticConfig.cavity(seed=2, copy_seed=1)  # noise, drift and gap all on
    n = int(0.72 * FS)
    drives = np.zeros((20, n, 4), dtype=np.float32)  # 20: a chunk of 16 and a part; silent pre-roll and tail
    for i in range(len(drives)):
        drives[i, 960 : 960 + FS // 2] = _multitone(0.5, 4, seed=i)
    exact = _exact_shots(AcousticPlant(cfg), drives)
    got = AcousticPlant(cfg).process_shots(drives)
    # float rounding, then the same 16-bit codes: at most 1 LSB apart, almost never at all
    diff = np.abs(got.astype(float) - exact) / LSB16
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4
    assert np.abs(exact).max() > 0.05
    # how many shots are computed at once does not change the noise drawn
    for sub in (1, 16):
        plant = AcousticPlant(cfg)
        plant._SHOT_SUB = sub
        assert np.abs(plant.process_shots(drives).astype(float) - got).max() <= LSB16
    # a short burst early in a long shot: the response outlasts the (cut) convolution's span
    short = np.zeros((3, FS, 4), dtype=np.float32)
    short[:, 2400:7200] = _multitone(0.1, 4)
    exact = _exact_shots(AcousticPlant(cfg), short)
    diff = np.abs(AcousticPlant(cfg).process_shots(short).astype(float) - exact)
    assert diff.max() <= LSB16 and (diff > 0).mean() < 1e-4


def _tail_sum(kern, start: int, stop: int) -> np.ndarray:
    """sum_{start <= j < stop} |h[m, s, j]|, (M, S), straight from the poles and residues."""
    total = np.zeros(kern._w_flat.shape[0])
    for lo in range(start, stop, 8192):
        j = np.arange(lo, min(stop, lo + 8192))
        h = (kern._w_flat @ np.exp(kern.log_p[:, None] * j[None, :])).real
        total += np.abs(h).sum(axis=1)
    return total.reshape(kern.cout.shape[0], kern.b.shape[1])


@pytest.mark.parametrize("preset, seconds", [(AcousticConfig.cavity, 1.0), (AcousticConfig.plate, 1.2)])
def test_truncated_impulse_response_stays_below_a_hundredth_of_an_lsb(preset, seconds):
    cfg = preset(noise_scale=0.0, drift_scale=0.0, copy_seed=3)  # gap modes on
    plant = AcousticPlant(cfg)
    kern = plant._kernel_now()
    n = int(seconds * FS)
    cut = plant.shot_kernel_length(n)
    assert cut < n and 2.0 < cut / FS / plant.ringdown_s < 3.0  # about 2.5 T60
    # the bound is one: the exact tail (out to 12 T60 past the cut) sums below it
    bound = kern.tail_bound([cut])[0]  # (M, S)
    tail = _tail_sum(kern, cut, cut + int(12 * plant.ringdown_s * FS))
    assert np.all(tail <= bound) and np.all(tail > 0.3 * bound)
    # and for any drive in [-1, 1] it keeps the dropped part below 0.01 LSB
    vmax = 1 + np.abs(plant.speaker_c2) + np.abs(plant.speaker_c3)
    worst = (bound * vmax[None, :]).sum(axis=1)  # (M,)
    assert worst.max() <= 0.01 * LSB16
    # end to end: the drive that makes the dropped part largest at the last sample of the loudest
    # mic (full scale, the signs of its impulse responses), cut vs nothing cut (all of it convolved)
    m = int(np.argmax(worst))
    j = np.arange(n)
    h = (kern._w_flat.reshape(plant.n_mics, plant.n_speakers, -1)[m] @ np.exp(kern.log_p[:, None] * j)).real
    drive = np.sign(h[:, ::-1]).T[None].astype(np.float32)  # (1, n, S): d[n - 1 - j] = sign h[j]
    linear = {}
    for name, tolerance in (("cut", None), ("whole", 0.0)):
        p = AcousticPlant(cfg)
        if tolerance is not None:
            p._TRUNCATION_LSB = tolerance  # nothing meets it: nothing is cut
        captured = []
        preamp = p._preamp
        p._preamp = lambda y, _keep=captured, _f=preamp: (_keep.append(y.copy()), _f(y))[1]
        p.process_shots(drive)
        linear[name] = captured[0][0]  # (M, n): the mics' linear signal at the ADC input
    err = np.abs(linear["cut"] - linear["whole"])
    assert err.max() < 0.01 * LSB16
    assert err[m, -1] > 0.2 * worst[m]  # this drive really does come near the bound


def test_reset_and_ringing_state():
    plant = AcousticPlant(AcousticConfig.plate(**CLEAN))
    burst = tone(900.0, 0.1, 0.25)[:, None].astype(np.float32)
    plant.process(burst)
    tail = plant.process(np.zeros((480, 1), dtype=np.float32))
    assert np.abs(tail).max() > 1e-3  # the plate still rings after the drive stops
    plant.process(burst)
    plant.reset()
    assert np.all(plant.process(np.zeros((480, 1), dtype=np.float32)) == 0)


def test_determinism_and_validation():
    drive = _multitone(0.2, 4)
    a = AcousticPlant(AcousticConfig.cavity(seed=3)).process(drive)
    b = AcousticPlant(AcousticConfig.cavity(seed=3)).process(drive)
    c = AcousticPlant(AcousticConfig.cavity(seed=4)).process(drive)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    plant = AcousticPlant(AcousticConfig.cavity())
    for bad in (np.zeros((10, 3)), np.zeros(10), np.full((10, 4), np.nan), np.zeros((2, 10, 4))):
        with pytest.raises(ValueError):
            plant.process(bad)
    with pytest.raises(ValueError):
        plant.process_shots(np.zeros((10, 4)))
    with pytest.raises(ValueError):
        AcousticConfig.cavity(speaker_positions=((0.5, 0.5),))
    with pytest.raises(ValueError):
        plant.temperature_k = -1.0
    assert plant.process(np.zeros((0, 4))).shape == (0, 4)
    mono = AcousticPlant(AcousticConfig.plate())
    assert mono.process(np.zeros(64)).shape == (64, 1)  # one speaker: a 1-D drive is accepted


# ----------------------------------------------------------------------------- copies and gap
def test_copy_to_copy_variation():
    base = AcousticConfig.cavity(noise_scale=0.0, drift_scale=0.0, model_gap=False)
    nominal = AcousticPlant(base)
    same = AcousticPlant(replace(base, copy_seed=0, copy_variation=5.0))
    assert np.array_equal(nominal.mode_frequencies_hz, same.mode_frequencies_hz)
    assert np.array_equal(nominal.speaker_coupling, same.speaker_coupling)
    tones = np.arange(300.0, 901.0, 30.0)
    h0 = nominal.transfer_function(tones)
    changes = []
    for seed in (1, 2, 3):
        copy = AcousticPlant(replace(base, copy_seed=seed))
        again = AcousticPlant(replace(base, copy_seed=seed))
        assert np.array_equal(copy.mode_frequencies_hz, again.mode_frequencies_hz)  # deterministic
        rel = copy.mode_frequencies_hz / nominal.mode_frequencies_hz - 1
        assert 0.001 < np.sqrt(np.mean(rel**2)) < 0.05  # a fraction of a percent to a few percent
        assert not np.allclose(copy.mic_coupling, nominal.mic_coupling, rtol=0.02)
        h = copy.transfer_function(tones)
        changes.append(np.sqrt(np.mean(np.abs(h - h0) ** 2) / np.mean(np.abs(h0) ** 2)))
    assert min(changes) > 0.2  # large enough that a trained network does not transfer as is
    # the calibration is the nominal copy's: copies are not rescaled to look alike
    assert AcousticPlant(replace(base, copy_seed=1)).acoustic_gain == nominal.acoustic_gain


def test_model_gap_is_real_but_modest():
    base = AcousticConfig.cavity(noise_scale=0.0, drift_scale=0.0)
    on, off = AcousticPlant(base), AcousticPlant(replace(base, model_gap=False))
    assert on.mode_is_gap.sum() == base.gap_modes and not off.mode_is_gap.any()
    lo, hi = base.tone_band_hz
    gap_f = on.mode_frequencies_hz[on.mode_is_gap]
    assert np.all((gap_f > lo) & (gap_f < hi))
    drive = _multitone(0.4, 4, seed=7)
    y_on = on.process(drive).astype(float)[FS // 5 :]
    y_off = off.process(drive).astype(float)[FS // 5 :]
    rel = np.sqrt(np.mean((y_on - y_off) ** 2) / np.mean(y_off**2))
    assert 0.05 < rel < 0.6
    assert on.acoustic_gain == off.acoustic_gain  # calibrated on the nominal model


# ----------------------------------------------------------------------------- levels and cost
def test_reference_drive_uses_a_good_part_of_the_adc():
    for preset in (AcousticConfig.plate, AcousticConfig.cavity):
        cfg = preset(drift_scale=0.0, model_gap=False, nonlinearity_scale=0.0)
        plant = AcousticPlant(cfg)
        lo, hi = cfg.tone_band_hz
        tones = np.round(np.linspace(lo, hi, cfg.reference_tones) / 10) * 10
        drive = np.zeros((FS // 2, cfg.n_speakers))
        for s in range(cfg.n_speakers):
            for k, f in enumerate(tones):
                drive[:, s] += tone(f, 0.5, 0.2, fade_s=0.05, phase=np.pi * k * k / 5 + 0.5 * np.pi * s + 0.5 * np.pi)
        y = plant.process(drive.astype(np.float32))[FS // 4 :]
        peak = np.abs(y).max()
        assert 0.35 < peak < 0.45  # calibrated to 40 % of full scale (same tones and phases, cosines)


def test_cost_of_a_realtime_block_and_a_batch():
    plant = AcousticPlant(AcousticConfig.cavity())
    block = _multitone(0.1, 4)[2000:3024]
    plant.process(block)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        plant.process(block)
        times.append(time.perf_counter() - t0)
    # a 1024-sample block lasts 21 ms of real time; the budget is < 5 ms; generous on a shared machine
    assert np.median(times) < 0.010
    shots = np.repeat(_multitone(0.25, 4)[None], 16, axis=0)
    t0 = time.perf_counter()
    plant.process_shots(shots)
    assert time.perf_counter() - t0 < 16 * 0.25  # faster than real time
