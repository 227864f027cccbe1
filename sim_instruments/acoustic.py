"""Physics of the simulated acoustic bench: speakers -> a plate or a small cavity -> microphones (numpy/scipy).

This module imports nothing from the rest of labpnn; the audio emulators drive it. Every signal is a
float array in units of full scale: the DAC drives ``u`` in [-1, 1], the ADC records in [-1, 1].

The signal path (per sample ``n``, sample rate ``fs`` = 48 kHz, ``T = 1/fs``)
==========================================================================
1. **DAC and amplifier.** ``u_s = g_s(t) clip(d_s, -1, 1)`` for speaker ``s``; ``g_s`` is the slow
   gain wander (item 7), 1 when there is no drift.

2. **Speaker (Hammerstein front end).** A memoryless polynomial, then the linear acoustics::

       v_s = u_s + c2_s u_s^2 + c3_s u_s^3          c2 = 0.10, c3 = -0.25 (nominal)

   ``c3 < 0``: the force factor drops with excursion (compression); the polynomial stays monotonic
   on [-1, 1] (slope >= 0.05). Two tones of amplitude ``A`` give products, relative to a carrier:
   ``f2 - f1``, ``f1 + f2`` at ``c2 A``; ``2 f1``, ``2 f2`` at ``c2 A / 2``; ``2 f1 - f2``, ``2 f2 - f1``
   at ``(3/4) |c3| A^2``. **Default drive level: tones at A = 0.25 of DAC full scale**, where these
   are -32, -38 and -39 dBc (speaker-referred; at a microphone they are further weighted by the
   room's transfer at each frequency). At A = 0.1 they fall to -40 / -46 / -55 dBc, at 0.3 they rise
   to -30.5 / -36.5 / -35.5 dBc. ``nonlinearity_scale`` scales c2, c3 (0 = a linear speaker).

3. **Modes.** The plate or cavity is a bank of ``K`` damped modes. Mode ``k`` (natural frequency
   ``w_k = 2 pi f_k``, damping ``z_k = 1 / (2 Q_k)``) is driven by ``F_k = sum_s B[k, s] v_s`` and
   answers as a band-pass resonator of unit peak gain (velocity-like: it passes no DC, so the
   speaker's c2 offset is silent)::

       x'' + 2 z w x' + w^2 x = 2 z w F,       output q = x'        H_k(s) = 2 z w s / (s^2 + 2 z w s + w^2)

   discretised by impulse invariance as one complex pole per mode,
   ``r_k[n] = p_k r_k[n-1] + F_k[n]``, ``p_k = exp(s_k T)``, ``s_k = -z w + i w sqrt(1 - z^2)``,
   ``q_k[n] = 2 T Re(a_k r_k[n])`` with the residue ``a_k = 2 z w s_k / (s_k - conj(s_k))``. The
   complex amplitudes ``r_k`` are the plant's state (carried across calls; `reset` zeroes them).
   The microphones read ``y_m = h_m(t) sum_k C[m, k] q_k`` (``h_m``: mic gain wander).

   - ``plate`` (1 speaker, 1 mic): a simply supported Kirchhoff plate, aluminium 150 x 120 x 1.5 mm
     (E = 69 GPa, nu = 0.33, rho = 2700 kg/m^3), ``D = E h^3 / (12 (1 - nu^2))``,
     ``f_mn = (pi/2) ((m/a)^2 + (n/b)^2) sqrt(D / (rho h))`` = 415, 901, 1174, 1659, 1710, 2438, ...
     Hz; the 15 modes below 5 kHz. Mode shapes ``2 sin(m pi x/a) sin(n pi y/b)`` at the drive point
     (the voice coil glued to the plate) and at the point the microphone hears. Q 50-100.
     Suggested tone band 800-3000 Hz (8 modes inside).
   - ``cavity`` (4 speakers in the walls, 4 mics inside): a rigid box 0.50 x 0.40 x 0.30 m,
     ``f_lmn = (c/2) sqrt((l/Lx)^2 + (m/Ly)^2 + (n/Lz)^2)``, c = 343.2 m/s (20 C) = 343, 429, 549,
     572, 667, ... Hz; the 44 modes below 1.6 kHz (the (0,0,0) compliance mode is left out: a
     band-pass source does not pump static pressure). Mode shapes
     ``sqrt(e_l e_m e_n) cos(l pi x/Lx) cos(m pi y/Ly) cos(n pi z/Lz)`` (``e`` = 1 for index 0, else
     2: unit mean square). Q 15-35 (a lined box). Tone band 300-900 Hz (11 modes inside), as the
     PhyLL replication.

   Each mode's Q is spread over the preset's range by a fixed low-discrepancy sequence (not by
   frequency). The slowest mode sets ``ringdown_s`` = T60 = 3 ln(10) Q / (pi f): **plate 0.40 s
   (the 415 Hz mode, Q 75), cavity 0.16 s** (nominal copies), so a shot of 0.2-0.5 s with ~one T60
   of silence between shots is clean. Couplings are mode shapes at transducer positions, so the
   transfer ``H[m, s](f)`` over the tone band has mixed signs and changes strongly from tone to tone.

4. **Duffing stiffening (optional, off by default).** With ``duffing_shift`` = delta > 0 each mode
   gets ``w^2 (x + kappa_k x^3)``, kappa_k set so the mode's frequency rises by ``delta`` (relative)
   when one speaker drives it at resonance at the default tone amplitude (backbone
   ``w_eff = w (1 + (3/8) kappa X^2)``). It enters as a force ``-w Q kappa x^3`` from the previous
   sample, computed per sample (a Python loop over samples, vectorised over modes and shots: ~20-30
   ms per 1024-sample block here, slower than real time: for in-process use, not the JACK path).

5. **Levels, noise and ADC.** ``C`` carries one acoustic gain, calibrated once on the nominal copy
   (no model gap) so that the *reference drive* -- every speaker playing the preset's 5 reference
   tones across its tone band at 0.2 of full scale each, Schroeder phases -- peaks at 40 % of the
   ADC on the loudest microphone. Added at the ADC input (``noise_scale`` scales both):
   microphone self-noise, white, independent per mic, RMS 1e-4 of full scale (-80 dBFS); ambient
   (room) noise, RMS 2e-4 of full scale per mic, from 2 sources mixed into the mics with fixed
   weights (correlated across mics), each an AR(1) low-pass with its corner at 150 Hz. The total
   (2.2e-4, -73 dBFS) sits 57 dB (cavity; mic RMS 0.11-0.19) and 60 dB (plate; RMS 0.21) below
   the reference drive. The ADC clips to [-1, 1] and rounds
   to ``adc_bits`` (16) bits: ``round(y 2^(b-1)) / 2^(b-1)``, codes -2^(b-1) .. 2^(b-1) - 1.

6. **Model gap** (``model_gap=True``, default): three weak extra modes inside the tone band (a
   mount/panel resonance; Q 25, couplings 30 % of the typical mode coupling, random signs) and a
   soft cubic compression in the mic preamp ``y - 0.05 y^3``. The acoustic gain stays calibrated on
   the nominal model, so neither is absorbed. ``model_gap=False`` gives the nominal model exactly.

7. **Drift, on the simulated clock (never wall clock).** Ornstein-Uhlenbeck processes sampled every
   ``drift_step_s`` = 0.5 s of simulated time, starting at 0 (the first samples are nominal):
   temperature (stationary RMS 0.5 K, correlation 30 min: ~0.06 K RMS change per minute) and one
   gain per speaker and per mic (stationary RMS 1 %, correlation 60 s). Mode frequencies follow
   ``f_k (1 + alpha (T - 293.15 K))``: the plate's ``alpha`` = -200 ppm/K (the modulus softens); the
   cavity's air modes follow the speed of sound, c ~ sqrt(T), ``alpha = +1/(2 T)`` = +1706 ppm/K
   (override ``temperature_coefficient_per_k``). The temperature holds over each 0.5 s step; gains
   are interpolated linearly inside it. ``drift_scale`` scales all of it (0 = none);
   `AcousticPlant.temperature_k` is settable (shifts the base; the wander continues from there).

8. **Copy-to-copy variation** (``copy_seed``; 0 = the nominal copy, exactly): a fabricated copy
   differs in its mode frequencies (one common factor, RMS 1 %, as thickness/material; and per
   mode, RMS 0.7 %), Q (x exp(0.15 xi)), transducer positions (RMS 3 % of each dimension),
   sensitivities (RMS 10 %) and speaker nonlinearity (RMS 20 %). ``copy_variation`` scales all of
   it. Against the nominal copy, the transfer over the tone band changes by 30-65 % RMS (cavity,
   copies 1-8) and 70-150 % (plate): a network trained on one copy does not transfer as is. The
   model gap alone changes it by 14 % (cavity) and 28 % (plate).

Streaming and shots
-------------------
`AcousticPlant.process` is causal and stateful: it splits its input at the drift steps and, per
segment, adds the forced response (an exact FFT convolution with the modal impulse response
truncated to the segment) to the free decay of the carried modal state, then advances the state in
closed form. Splitting a signal into blocks therefore changes nothing but rounding (~1e-13): a shot
computed whole and streamed in 1024-sample blocks records the same samples. Noise is drawn in sample
order from one generator, so it is identical too. `AcousticPlant.process_shots` runs B shots from
rest at once; each shot has its own noise and its own gains (ramped linearly from the drift's value
at its first sample to that at its last), and all shots of one call see the temperature at the
call's start (it moves ~0.01 K over a 64-shot call at the default drift). It computes the same
model as `process` from rest, faster:

- one FFT convolution per shot over the drives' support only: silence before the call's first and
  after its last non-zero drive sample drives nothing (the speaker polynomial has no constant
  term), so the bench's 20 ms pre-roll and 200 ms tail are not transformed; time runs along the
  last axis and two shots are computed at a time (cache-sized arrays);
- the modal impulse response cut at ``L`` samples (below); the kernel (poles to powers by
  ``exp`` on 256-sample blocks and products, a real matrix product, one FFT) is rebuilt per
  temperature, i.e. about once per call;
- the noise drawn per chunk of 16 shots as before (start values of the ambient sources, then each
  shot's normals in turn), so the numbers drawn do not depend on how the shots are grouped.

Against the direct computation (one 2n - 1 FFT convolution, nothing cut) with the same noise
stream, the recordings agree to the 16-bit code except ~1 sample in 10^6 (1 LSB apart: rounding
ties); the tests check both.

**Truncation bound.** With ``h[m, s, j] = Re(sum_k w_msk p_k^j)``, ``|h[m, s, j]| <= sum_k |w_msk|
|p_k|^j``, so the part of the convolution dropped by cutting at ``L`` is at most
``E_m = g_m sum_s V_s sum_k |w_msk| |p_k|^L / (1 - |p_k|)`` at microphone ``m``, for *any* drive:
``V_s = U_s + |c2_s| U_s^2 + |c3_s| U_s^3`` bounds the speaker's output (the DAC clips to
[-1, 1]; ``U_s`` is the speaker's largest gain in the call), ``g_m`` the mic's largest gain.
``L`` is the first multiple of 256 with ``max_m E_m <= 0.01 LSB`` (`AcousticPlant.
shot_kernel_length`; ``n`` if none: nothing cut). This bounds the ADC input before the preamp's
compression ``y - c y^3``, whose slope ``1 - 3 c y^2`` stays within [-1, 1] up to ``|y| =
sqrt(2 / (3 c))`` = 3.65 full scale at c = 0.05 (and beyond ~1.06 full scale the ADC clips
anyway), so the recording moves by less than 0.01 LSB before rounding. ``L`` comes out at ~2.5
T60: cavity (nominal copy) 18,944 samples = 0.39 s of its 0.72 s shots; plate 47,360 = 0.99 s,
longer than its 0.97 s shots, so nothing is cut there. Tested: the exact tail sums to 0.5-0.65 of
the bound, and a full-scale drive with the signs of the impulse responses (the worst case for one
output sample) moves the ADC input by 0.003-0.004 LSB.

Cost (2 shared cores at load 4-12, so +-50 %; CPU time per row of the in-process rig's batch
path, `SimulatedAudioPath.measure_batch`, shots of 0.72 s cavity / 0.97 s plate, interleaved with
the previous version in one run): cavity ~12 ms (was 34-39), plate 5.5-6.5 ms (was 10-13); wall
time is 1.3-3x that, depending on the load. What is left: the noise (~4 ms of the cavity's 12,
mostly drawing 207,000 normals per row: the noise stream is fixed), the driver's synthesis and
readout (~3 ms), the FFTs (~2 ms). `process` of one 1024-sample block: median 1.2-1.8 ms CPU
(cavity), 0.65-0.8 ms (plate), as before; the block that crosses a 0.5 s drift step rebuilds the
modal kernel for the new temperature (cavity: 99th percentile 3-4.6 ms CPU, was 4-7; the block
lasts 21 ms). Small matrix products are cut into slices: OpenBLAS's threads, on a loaded 2-core
machine, made the whole products 10-100x slower (measured).

Everything is deterministic given ``seed`` (noise, drift) and ``copy_seed`` (fabrication).
"""
from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy.signal import lfilter

__all__ = ["AcousticConfig", "AcousticPlant", "plate_mode_frequencies", "cavity_mode_frequencies"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_LN1000 = 3.0 * math.log(10.0)


def plate_mode_frequencies(dims_m, youngs_pa, poisson, density, max_hz):
    """Simply supported Kirchhoff plate a x b x h: ``[(f_mn, (m, n)), ...]`` below ``max_hz``, ascending."""
    a, b, h = dims_m
    speed = math.sqrt(youngs_pa * h**3 / (12.0 * (1.0 - poisson**2)) / (density * h))
    out = []
    for m in range(1, 200):
        if math.pi / 2 * (m / a) ** 2 * speed > max_hz:
            break
        for n in range(1, 200):
            f = math.pi / 2 * ((m / a) ** 2 + (n / b) ** 2) * speed
            if f > max_hz:
                break
            out.append((f, (m, n)))
    return sorted(out)


def cavity_mode_frequencies(dims_m, sound_speed, max_hz):
    """Rigid-walled box: ``[(f_lmn, (l, m, n)), ...]`` below ``max_hz`` without (0, 0, 0), ascending."""
    top = [int(max_hz * 2 * d / sound_speed) + 1 for d in dims_m]
    out = []
    for idx in itertools.product(*(range(t + 1) for t in top)):
        if any(idx):
            f = sound_speed / 2 * math.sqrt(sum((i / d) ** 2 for i, d in zip(idx, dims_m)))
            if f <= max_hz:
                out.append((f, idx))
    return sorted(out)


@dataclass(frozen=True)
class AcousticConfig:
    """Every knob of the acoustic bench (see the module docstring). Use the presets `plate` (the
    default) and `cavity`; overrides go through as keyword arguments. Positions are fractions of
    each dimension (plate: x/a, y/b; cavity: x/Lx, y/Ly, z/Lz)."""

    geometry: str = "plate"  # "plate" | "cavity"
    sample_rate: int = 48000
    seed: int = 0  # noise and drift
    copy_seed: int = 0  # fabrication; 0 = the nominal copy
    # geometry: plate (a, b, thickness) or cavity (Lx, Ly, Lz), metres
    dimensions_m: tuple[float, ...] = (0.150, 0.120, 0.0015)
    youngs_modulus_pa: float = 69e9
    poisson_ratio: float = 0.33
    density_kg_m3: float = 2700.0
    sound_speed_m_s: float = 343.2
    max_mode_hz: float = 5000.0
    q_range: tuple[float, float] = (50.0, 100.0)
    speaker_positions: tuple[tuple[float, ...], ...] = ((0.31, 0.43),)
    mic_positions: tuple[tuple[float, ...], ...] = ((0.68, 0.27),)
    tone_band_hz: tuple[float, float] = (800.0, 3000.0)  # where encodings should put their tones
    # speaker nonlinearity (Hammerstein u + c2 u^2 + c3 u^3)
    speaker_c2: float = 0.10
    speaker_c3: float = -0.25
    nonlinearity_scale: float = 1.0
    default_tone_amplitude: float = 0.25  # the default drive level (fraction of DAC full scale)
    duffing_shift: float = 0.0  # relative stiffening shift at the default drive; 0 = off
    # levels
    reference_tones: int = 5
    reference_tone_amplitude: float = 0.2
    reference_peak_fraction: float = 0.4
    # noise, ADC
    noise_scale: float = 1.0
    mic_self_noise_rms: float = 1e-4
    ambient_noise_rms: float = 2e-4
    ambient_sources: int = 2
    ambient_corner_hz: float = 150.0
    adc_bits: int = 16
    # drift
    drift_scale: float = 1.0
    drift_step_s: float = 0.5
    reference_temperature_k: float = 293.15
    temperature_coefficient_per_k: float = -200e-6
    temperature_rms_k: float = 0.5
    temperature_corr_s: float = 1800.0
    gain_wander_rms: float = 0.01
    gain_corr_s: float = 60.0
    # model gap
    model_gap: bool = True
    gap_modes: int = 3
    gap_q: float = 25.0
    gap_coupling: float = 0.3
    gap_mic_cubic: float = 0.05
    # copy-to-copy variation (RMS values; all scaled by copy_variation)
    copy_variation: float = 1.0
    copy_frequency_global: float = 0.01
    copy_frequency_per_mode: float = 0.007
    copy_q_log_spread: float = 0.15
    copy_position_jitter: float = 0.03
    copy_sensitivity_spread: float = 0.10
    copy_nonlinearity_spread: float = 0.20

    def __post_init__(self):
        if self.geometry not in ("plate", "cavity"):
            raise ValueError("geometry must be 'plate' or 'cavity'")
        dims = 2 if self.geometry == "plate" else 3
        if len(self.dimensions_m) != 3 or min(self.dimensions_m) <= 0:
            raise ValueError("dimensions_m must be three positive lengths")
        for pos in (*self.speaker_positions, *self.mic_positions):
            if len(pos) != dims or not all(0.0 <= x <= 1.0 for x in pos):
                raise ValueError(f"positions must be {dims} fractions in [0, 1]")
        if not self.speaker_positions or not self.mic_positions:
            raise ValueError("at least one speaker and one microphone")
        if self.sample_rate <= 0 or not 2 <= self.adc_bits <= 24:
            raise ValueError("sample_rate > 0 and 2 <= adc_bits <= 24 required")
        if not 0 < self.q_range[0] <= self.q_range[1] or self.max_mode_hz >= self.sample_rate / 2:
            raise ValueError("0 < q_min <= q_max and max_mode_hz below Nyquist required")
        if min(self.noise_scale, self.drift_scale, self.copy_variation, self.nonlinearity_scale) < 0:
            raise ValueError("scales must be non-negative")
        if self.duffing_shift < 0 or self.drift_step_s <= 0:
            raise ValueError("duffing_shift >= 0 and drift_step_s > 0 required")

    @property
    def n_speakers(self) -> int:
        return len(self.speaker_positions)

    @property
    def n_mics(self) -> int:
        return len(self.mic_positions)

    @classmethod
    def plate(cls, **overrides) -> AcousticConfig:
        """One speaker glued to an aluminium plate, one microphone (the PAT mechanical PNN)."""
        return cls(**overrides)

    @classmethod
    def cavity(cls, **overrides) -> AcousticConfig:
        """Four speakers in the walls of a small lined box, four microphones inside (PhyLL)."""
        preset = dict(
            geometry="cavity",
            dimensions_m=(0.50, 0.40, 0.30),
            max_mode_hz=1600.0,
            q_range=(15.0, 35.0),
            speaker_positions=((0.0, 0.23, 0.71), (1.0, 0.62, 0.18), (0.37, 0.0, 0.56), (0.81, 1.0, 0.87)),
            mic_positions=((0.21, 0.34, 0.39), (0.66, 0.18, 0.74), (0.43, 0.77, 0.29), (0.87, 0.58, 0.63)),
            tone_band_hz=(300.0, 900.0),
            temperature_coefficient_per_k=0.5 / 293.15,
        )
        preset.update(overrides)
        return cls(**preset)


@dataclass
class _System:
    """One fabricated copy's linear acoustics and speakers (before calibration of the output gain)."""

    freqs_hz: np.ndarray  # (K,) at the reference temperature
    q: np.ndarray  # (K,)
    b: np.ndarray  # (K, S) speaker -> mode
    c: np.ndarray  # (M, K) mode -> mic (unit gain)
    c2: np.ndarray  # (S,)
    c3: np.ndarray  # (S,)
    is_gap: np.ndarray  # (K,) bool
    indices: list = field(default_factory=list)


def _mode_shape(geometry: str, idx, pos: np.ndarray) -> np.ndarray:
    """Unit-mean-square mode shapes at positions ``pos`` (P, d) for mode indices ``idx`` (K, d) -> (P, K)."""
    idx = np.asarray(idx, dtype=float)
    arg = np.pi * pos[:, None, :] * idx[None, :, :]
    if geometry == "plate":
        return 2.0 * np.prod(np.sin(arg), axis=2)
    norm = np.sqrt(np.prod(np.where(idx > 0, 2.0, 1.0), axis=1))
    return norm[None, :] * np.prod(np.cos(arg), axis=2)


def _build_system(cfg: AcousticConfig, copy_seed: int, gap: bool) -> _System:
    if cfg.geometry == "plate":
        modes = plate_mode_frequencies(
            cfg.dimensions_m, cfg.youngs_modulus_pa, cfg.poisson_ratio, cfg.density_kg_m3, cfg.max_mode_hz
        )
    else:
        modes = cavity_mode_frequencies(cfg.dimensions_m, cfg.sound_speed_m_s, cfg.max_mode_hz)
    if not modes:
        raise ValueError("no modes below max_mode_hz")
    freqs = np.array([f for f, _ in modes])
    indices = [i for _, i in modes]
    k = len(freqs)
    q_lo, q_hi = cfg.q_range
    q = q_lo + (q_hi - q_lo) * ((0.5 + _GOLDEN * np.arange(k)) % 1.0)
    spk = np.array(cfg.speaker_positions, dtype=float)
    mic = np.array(cfg.mic_positions, dtype=float)
    sens_s, sens_m = np.ones(len(spk)), np.ones(len(mic))
    c2 = np.full(len(spk), cfg.speaker_c2 * cfg.nonlinearity_scale)
    c3 = np.full(len(spk), cfg.speaker_c3 * cfg.nonlinearity_scale)
    v = cfg.copy_variation if copy_seed != 0 else 0.0
    if v > 0:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([copy_seed, 0xC0])))
        freqs = freqs * (1 + v * cfg.copy_frequency_global * rng.standard_normal())
        freqs = freqs * (1 + v * cfg.copy_frequency_per_mode * rng.standard_normal(k))
        q = q * np.exp(v * cfg.copy_q_log_spread * rng.standard_normal(k))
        spk = np.clip(spk + v * cfg.copy_position_jitter * rng.standard_normal(spk.shape), 0.0, 1.0)
        mic = np.clip(mic + v * cfg.copy_position_jitter * rng.standard_normal(mic.shape), 0.0, 1.0)
        sens_s = sens_s * (1 + v * cfg.copy_sensitivity_spread * rng.standard_normal(len(spk)))
        sens_m = sens_m * (1 + v * cfg.copy_sensitivity_spread * rng.standard_normal(len(mic)))
        c2 = c2 * (1 + v * cfg.copy_nonlinearity_spread * rng.standard_normal(len(spk)))
        c3 = c3 * (1 + v * cfg.copy_nonlinearity_spread * rng.standard_normal(len(spk)))
    b = _mode_shape(cfg.geometry, indices, spk).T * sens_s[None, :]
    c = _mode_shape(cfg.geometry, indices, mic) * sens_m[:, None]
    is_gap = np.zeros(k, dtype=bool)
    if gap and cfg.gap_modes > 0:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([copy_seed, 0x6A])))
        lo, hi = cfg.tone_band_hz
        n = cfg.gap_modes
        gap_f = lo + (hi - lo) * (np.arange(n) + 0.5 + 0.3 * rng.uniform(-1, 1, n)) / n
        scale = cfg.gap_coupling * math.sqrt(float(np.mean(b**2)) * float(np.mean(c**2)))
        # split the coupling product evenly between the speaker and the mic side
        gb = math.sqrt(scale) * rng.choice([-1.0, 1.0], (n, len(spk))) * rng.uniform(0.5, 1.5, (n, len(spk)))
        gc = math.sqrt(scale) * rng.choice([-1.0, 1.0], (len(mic), n)) * rng.uniform(0.5, 1.5, (len(mic), n))
        freqs = np.concatenate([freqs, gap_f])
        q = np.concatenate([q, np.full(n, cfg.gap_q)])
        b = np.concatenate([b, gb], axis=0)
        c = np.concatenate([c, gc], axis=1)
        is_gap = np.concatenate([is_gap, np.ones(n, dtype=bool)])
        indices = indices + [None] * n
    return _System(freqs, q, b, c, c2, c3, is_gap, indices)


# OpenBLAS goes multi-threaded above ~2^18 multiply-adds; on a loaded 2-core machine the thread
# hand-off cost 10-100x the arithmetic here (measured), so the products are split below that.
_BLAS_ROWS = 64
# rows per slice of a tall, thin product (n x 6 @ 6 x 4 and alike): below that threshold too
_BLAS_TALL = 8192


def _matmul_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for a (L, K) and b (..., K, M), computed in slices of rows of ``a``."""
    if a.shape[0] <= _BLAS_ROWS:
        return a @ b
    return np.concatenate([a[i : i + _BLAS_ROWS] @ b for i in range(0, a.shape[0], _BLAS_ROWS)], axis=-2)


def _matmul_inner(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for a (K, L) and b (..., L, S), summed over slices of the inner dimension."""
    out = a[:, :_BLAS_ROWS] @ b[..., :_BLAS_ROWS, :]
    for i in range(_BLAS_ROWS, a.shape[1], _BLAS_ROWS):
        out += a[:, i : i + _BLAS_ROWS] @ b[..., i : i + _BLAS_ROWS, :]
    return out


def _geometric(log_p: np.ndarray, n: int, block: int = 256) -> np.ndarray:
    """``exp(j log_p)`` for j = 0..n-1 as (K, n): complex exponentials on one block of ``block`` steps
    and on the block starts, then one product each (a few ulp, like ``exp(j log_p)`` itself, at a
    fraction of its cost)."""
    blk = max(1, min(n, block))
    n_blocks = -(-n // blk)
    base = np.exp(log_p[:, None] * np.arange(blk)[None, :])
    starts = np.exp(log_p[:, None] * (blk * np.arange(n_blocks))[None, :])
    return (starts[:, :, None] * base[:, None, :]).reshape(len(log_p), n_blocks * blk)[:, :n]


def _mix_bins(vf: np.ndarray, hf: np.ndarray, block: int = 4096) -> np.ndarray:
    """``yf[c, m, f] = sum_s vf[c, s, f] hf[m, s, f]`` for vf (C, S, F), hf (M, S, F), in blocks of
    bins so the temporaries stay in cache (a broadcast product over the whole arrays was 2-3x slower)."""
    n_c, n_s, n_f = vf.shape
    n_m = hf.shape[0]
    if n_s == 1 and n_m == 1:
        return vf * hf[None, 0]
    yf = np.empty((n_c, n_m, n_f), dtype=np.result_type(vf, hf))
    tmp = np.empty((n_c, min(block, n_f)), dtype=yf.dtype)
    for lo in range(0, n_f, block):
        hi = min(n_f, lo + block)
        t = tmp[:, : hi - lo]
        for m in range(n_m):
            acc = yf[:, m, lo:hi]
            np.multiply(vf[:, 0, lo:hi], hf[m, 0, lo:hi], out=acc)
            for s in range(1, n_s):
                np.multiply(vf[:, s, lo:hi], hf[m, s, lo:hi], out=t)
                acc += t
    return yf


class _Kernel:
    """The modal system at one temperature: poles, residues and cached FFT kernels per segment length."""

    def __init__(self, freqs_hz: np.ndarray, q: np.ndarray, b: np.ndarray, c: np.ndarray, fs: int):
        t = 1.0 / fs
        w = 2 * np.pi * freqs_hz
        z = 0.5 / q
        s = -z * w + 1j * w * np.sqrt(1 - z**2)
        self.log_p = s * t
        self.p = np.exp(self.log_p)
        resid = 2 * z * w * s / (s - s.conj())  # band-pass (velocity) residue
        self.resid_x = 2 * z * w / (s - s.conj())  # displacement residue (Duffing)
        self.cout = c * (2 * t * resid)[None, :]  # (M, K): y = Re(cout @ r)
        self.b = b
        self.w = w
        self.t = t
        self._w_flat = (self.cout[:, None, :] * b.T[None, :, :]).reshape(-1, len(w))  # (M*S, K)
        # h[ms, j] = Re(sum_k w[ms, k] p_k^j) = [Re w, -Im w] @ [Re p^j; Im p^j]
        self._w_real = np.concatenate([self._w_flat.real, -self._w_flat.imag], axis=1)  # (M*S, 2K)
        self._pow = np.ones((len(w), 1), dtype=complex)  # p^j, j = 0..len-1
        self._fft: dict = {}

    def powers(self, n: int) -> np.ndarray:
        """``p_k^j`` for j = 0..n-1, (K, n)."""
        if self._pow.shape[1] < n:
            self._pow = _geometric(self.log_p, n)
        return self._pow[:, :n]

    def impulse(self, n: int) -> np.ndarray:
        """The impulse responses h[m * S + s, j], j = 0..n-1, (M*S, n) (real arithmetic, in column
        slices small enough to keep OpenBLAS single-threaded)."""
        pw = self.powers(n)
        ms, k2 = self._w_real.shape
        blk = max(64, (1 << 18) // (ms * k2))
        out = np.empty((ms, n))
        for i in range(0, n, blk):
            seg = pw[:, i : i + blk]
            out[:, i : i + blk] = self._w_real @ np.concatenate([seg.real, seg.imag])
        return out

    def fft_kernel(self, n: int) -> tuple[int, np.ndarray]:
        """(FFT size, rfft of the impulse responses h[m, s, 0:n]) as (bins, M, S). The FFT size is
        at least 2n - 1, so any segment of up to n samples convolves without wrap-around."""
        if n not in self._fft:
            self._trim_cache()
            nfft = sfft.next_fast_len(2 * n - 1, real=True)
            hf = sfft.rfft(self.impulse(n), n=nfft, axis=1)  # (M*S, bins)
            m, s = self.cout.shape[0], self.b.shape[1]
            self._fft[n] = (nfft, np.ascontiguousarray(hf.T).reshape(-1, m, s))
        return self._fft[n]

    def shot_kernel(self, n: int, nfft: int) -> np.ndarray:
        """rfft (size ``nfft``) of h[m, s, 0:n], time last: (M, S, bins)."""
        key = ("shots", n, nfft)
        if key not in self._fft:
            self._trim_cache()
            hf = sfft.rfft(self.impulse(n), n=nfft, axis=1)
            self._fft[key] = hf.reshape(self.cout.shape[0], self.b.shape[1], -1)
        return self._fft[key]

    def _trim_cache(self) -> None:
        if len(self._fft) > 8:
            self._fft.clear()

    def tail_bound(self, lengths) -> np.ndarray:
        """Upper bounds on ``sum_{j >= L} |h[m, s, j]|`` for each L in ``lengths``: (len, M, S).
        From ``|h[j]| <= sum_k |w_k| |p_k|^j``, summed as geometric series."""
        mag = np.abs(self.p)
        decay = mag[None, :] ** np.asarray(lengths, dtype=float)[:, None] / (1 - mag)[None, :]  # (len, K)
        return (decay @ np.abs(self._w_flat).T).reshape(-1, self.cout.shape[0], self.b.shape[1])

    def transfer(self, freqs_hz: np.ndarray) -> np.ndarray:
        """Exact discrete-time small-signal transfer (F, M, S) of the modal bank (unit drift gains)."""
        zinv = np.exp(-2j * np.pi * np.asarray(freqs_hz, dtype=float) * self.t)[:, None]
        g = 0.5 * self.cout[None, :, :] / (1 - self.p[None, None, :] * zinv[:, :, None])
        g = g + 0.5 * self.cout.conj()[None, :, :] / (1 - self.p.conj()[None, None, :] * zinv[:, :, None])
        return g @ self.b  # (F, M, K) @ (K, S)


def _shot_blocks(b: int, chunk: int, sub: int):
    """(first, end) of the blocks of at most ``sub`` shots that `process_shots` computes at once;
    no block straddles two chunks of ``chunk`` shots (the noise stream's unit)."""
    for lo in range(0, b, chunk):
        hi = min(b, lo + chunk)
        for s0 in range(lo, hi, sub):
            yield s0, min(hi, s0 + sub)


class AcousticPlant:
    """The acoustic bench: speakers -> modes -> microphones -> ADC. Stateful and thread-safe.

    ``process`` streams (state, noise and drift continue across calls); ``process_shots`` runs
    independent shots from rest. Both advance the simulated clock."""

    _SHOT_CHUNK = 16  # the noise is drawn per chunk of shots (part of the noise stream's definition)
    _SHOT_SUB = 2  # process_shots computes this many shots at a time (keeps its arrays in cache)
    # process() works in pieces of at most this many samples with one FFT kernel per temperature,
    # so a drift step costs one kernel build whatever the block lengths
    _STREAM_KERNEL = 1024
    # process_shots cuts the impulse response where the rest can change the ADC input by at most this
    _TRUNCATION_LSB = 0.01

    def __init__(self, config: AcousticConfig | None = None):
        cfg = config if config is not None else AcousticConfig()
        self.config = cfg
        self._lock = threading.RLock()
        self.sample_rate = int(cfg.sample_rate)
        self.n_speakers = cfg.n_speakers
        self.n_mics = cfg.n_mics
        nominal = _build_system(cfg, 0, False)
        self._gain = cfg.reference_peak_fraction / self._reference_peak(nominal)
        sys_ = _build_system(cfg, cfg.copy_seed, cfg.model_gap)
        self._sys = sys_
        self._c = sys_.c * self._gain
        self.speaker_c2, self.speaker_c3 = sys_.c2, sys_.c3
        self.mode_is_gap = sys_.is_gap
        self.mode_indices = sys_.indices
        self.mode_q = sys_.q
        self.speaker_coupling = sys_.b  # (K, S)
        self.mic_coupling = self._c  # (M, K), includes the calibrated acoustic gain
        self._mic_cubic = cfg.gap_mic_cubic if cfg.model_gap else 0.0
        # Duffing coefficients: delta relative shift when one speaker drives the mode at resonance
        self._kappa = None
        if cfg.duffing_shift > 0:
            amp_x = np.abs(sys_.b).max(axis=1) * cfg.default_tone_amplitude / (2 * np.pi * sys_.freqs_hz)
            self._kappa = (8.0 / 3.0) * cfg.duffing_shift / np.maximum(amp_x, 1e-30) ** 2
        # state
        self._state = np.zeros(len(sys_.freqs_hz), dtype=complex)
        self._samples = 0
        seeds = np.random.SeedSequence(cfg.seed).spawn(2)
        self._drift_rng = np.random.Generator(np.random.PCG64(seeds[0]))
        self._noise_rng = np.random.Generator(np.random.PCG64(seeds[1]))
        # drift: OU values at grid points e * step (temperature, then S + M gains)
        self._step = max(1, int(round(cfg.drift_step_s * self.sample_rate)))
        step_s = self._step / self.sample_rate
        self._rho = np.array(
            [math.exp(-step_s / cfg.temperature_corr_s)] + [math.exp(-step_s / cfg.gain_corr_s)] * (
                self.n_speakers + self.n_mics)
        )
        self._sigma = np.array([cfg.temperature_rms_k] + [cfg.gain_wander_rms] * (self.n_speakers + self.n_mics))
        self._drift = np.zeros((1, 1 + self.n_speakers + self.n_mics))
        self._temperature_base = cfg.reference_temperature_k
        self._kernel: _Kernel | None = None
        self._kernel_temp = None
        # ambient noise: AR(1) sources mixed into the mics with fixed weights (unit-norm rows)
        self._ar = math.exp(-2 * np.pi * cfg.ambient_corner_hz / self.sample_rate)
        mix = np.random.Generator(np.random.PCG64(0xA3B1)).standard_normal((self.n_mics, cfg.ambient_sources))
        self._ambient_mix = mix / np.linalg.norm(mix, axis=1, keepdims=True)
        self._ambient_state: np.ndarray | None = None

    # ------------------------------------------------------------------ calibration
    def _reference_peak(self, nominal: _System) -> float:
        cfg = self.config
        lo, hi = cfg.tone_band_hz
        grid = 10.0  # Hz; 0.1 s is one period of the reference drive
        tones = np.round(np.linspace(lo, hi, cfg.reference_tones) / grid) * grid
        kern = _Kernel(nominal.freqs_hz, nominal.q, nominal.b, nominal.c, self.sample_rate)
        h = kern.transfer(tones)  # (F, M, S)
        n_t = len(tones)
        phase = np.pi * np.arange(n_t)[:, None] ** 2 / n_t + 0.5 * np.pi * np.arange(cfg.n_speakers)[None, :]
        amp = (h * (cfg.reference_tone_amplitude * np.exp(1j * phase))[:, None, :]).sum(axis=2)  # (F, M)
        t = np.arange(int(self.sample_rate / grid)) / self.sample_rate
        y = (amp[:, :, None] * np.exp(2j * np.pi * tones[:, None, None] * t[None, None, :])).sum(0).real
        return float(np.abs(y).max())

    # ------------------------------------------------------------------ description
    @property
    def clock_s(self) -> float:
        """Simulated seconds processed so far."""
        return self._samples / self.sample_rate

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def temperature_k(self) -> float:
        """The temperature now (K). Setting it moves the base; the drift wander continues from there."""
        with self._lock:
            return self._temperature_at(self._samples // self._step)

    @temperature_k.setter
    def temperature_k(self, value: float) -> None:
        with self._lock:
            value = float(value)
            if not math.isfinite(value) or value <= 0:
                raise ValueError("temperature must be a positive finite number of kelvin")
            self._temperature_base += value - self.temperature_k

    @property
    def reference_mode_frequencies_hz(self) -> np.ndarray:
        """This copy's mode frequencies at the reference temperature (gap modes last)."""
        return self._sys.freqs_hz.copy()

    @property
    def mode_frequencies_hz(self) -> np.ndarray:
        """Mode frequencies now, at the current temperature (gap modes last; see ``mode_is_gap``)."""
        return self._freqs_at(self.temperature_k)

    @property
    def ringdown_s(self) -> float:
        """T60 of the slowest mode: the silence a shot needs after the drive stops."""
        return float((_LN1000 * self.mode_q / (np.pi * self.mode_frequencies_hz)).max())

    @property
    def acoustic_gain(self) -> float:
        """The calibrated gain folded into ``mic_coupling`` (ADC units per unit modal output)."""
        return self._gain

    @property
    def drift_state(self) -> tuple[float, np.ndarray, np.ndarray]:
        """(temperature K, speaker gains, mic gains) at the current clock."""
        with self._lock:
            g = self._gains(np.array([self._samples]))[0]
            return self.temperature_k, g[: self.n_speakers], g[self.n_speakers :]

    def transfer_function(self, freqs_hz) -> np.ndarray:
        """Small-signal linear transfer now (current temperature and gains), complex (F, M, S),
        DAC units -> ADC units: the exact discrete-time response of the modal bank (no speaker or
        preamp nonlinearity, no noise)."""
        with self._lock:
            _, gs, gm = self.drift_state
            h = self._kernel_now().transfer(freqs_hz)
            return h * gm[None, :, None] * gs[None, None, :]

    def reset(self) -> None:
        """All modes at rest (the clock, the drift and the ambient noise continue)."""
        with self._lock:
            self._state = np.zeros_like(self._state)

    # ------------------------------------------------------------------ drift
    def _freqs_at(self, temperature: float) -> np.ndarray:
        cfg = self.config
        return self._sys.freqs_hz * (1 + cfg.temperature_coefficient_per_k * (temperature - cfg.reference_temperature_k))

    def _grow_drift(self, last_epoch: int) -> None:
        """OU values up to grid point ``last_epoch`` (inclusive), drawn in order."""
        have = len(self._drift)
        if last_epoch < have:
            return
        new = np.empty((last_epoch + 1 - have, self._drift.shape[1]))
        x = self._drift[-1]
        kick = self._sigma * np.sqrt(1 - self._rho**2)
        xi = self._drift_rng.standard_normal(new.shape)
        for i in range(len(new)):
            x = self._rho * x + kick * xi[i]
            new[i] = x
        self._drift = np.concatenate([self._drift, new])

    def _temperature_at(self, epoch: int) -> float:
        self._grow_drift(epoch)
        return self._temperature_base + self.config.drift_scale * float(self._drift[epoch, 0])

    def _gains(self, sample_idx: np.ndarray) -> np.ndarray:
        """Speaker then mic gains at absolute sample indices (..., S + M), linear inside a drift step."""
        epoch = sample_idx // self._step
        self._grow_drift(int(epoch.max()) + 1)
        frac = ((sample_idx - epoch * self._step) / self._step)[..., None]
        g0 = self._drift[epoch, 1:]
        g1 = self._drift[epoch + 1, 1:]
        return 1.0 + self.config.drift_scale * (g0 + frac * (g1 - g0))

    def _kernel_at(self, temperature: float) -> _Kernel:
        if self._kernel is None or temperature != self._kernel_temp:
            s = self._sys
            self._kernel = _Kernel(self._freqs_at(temperature), s.q, s.b, self._c, self.sample_rate)
            self._kernel_temp = temperature
        return self._kernel

    def _kernel_now(self) -> _Kernel:
        return self._kernel_at(self.temperature_k)

    # ------------------------------------------------------------------ signal path pieces
    def _speakers(self, drive: np.ndarray, gains: np.ndarray) -> np.ndarray:
        u = np.clip(drive, -1.0, 1.0)
        u *= gains
        v = self.speaker_c3 * u
        v += self.speaker_c2
        v *= u
        v += 1.0
        v *= u
        return v

    def _preamp(self, y: np.ndarray) -> None:
        """The mic preamp's soft compression ``y - c y^3``, in place."""
        if self._mic_cubic:
            t = y * y
            t *= y
            t *= self._mic_cubic
            y -= t

    def _adc(self, y: np.ndarray, mic_gains: np.ndarray | None, noise: np.ndarray | None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Mic gains, preamp, noise, clip and quantise -> float32 (into ``out`` if given). With
        ``mic_gains`` None, ``y`` is taken as already gained and compressed (and is overwritten)."""
        if mic_gains is not None:
            y = y * mic_gains
            self._preamp(y)
        if noise is not None:
            y += noise
        full = 2.0 ** (self.config.adc_bits - 1)
        y *= full
        np.round(y, out=y)
        np.clip(y, -full, full - 1, out=y)
        if out is None:
            out = np.empty(y.shape, np.float32)
        np.multiply(y, 1.0 / full, out=out, casting="same_kind")  # exact: a power of two
        return out

    def _noise_on(self) -> bool:
        cfg = self.config
        return not (cfg.noise_scale == 0 or (cfg.mic_self_noise_rms == 0 and cfg.ambient_noise_rms == 0))

    def _draw_noise(self, shape_lead: tuple[int, ...], n: int, fresh_state: bool) -> np.ndarray | None:
        """Noise at the ADC input (*lead, n, M), drawn in sample order; None when noise is off."""
        if not self._noise_on():
            return None
        n_amb = self.config.ambient_sources
        if fresh_state:
            init = self._noise_rng.standard_normal((*shape_lead, n_amb))
        else:
            if self._ambient_state is None:
                self._ambient_state = self._noise_rng.standard_normal(n_amb)
            init = self._ambient_state
        noise, last = self._noise_from(init, n)
        if not fresh_state:
            self._ambient_state = last
        return noise

    def _noise_from(self, init: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw the next (*lead, n, M + A) normals and make the noise (*lead, n, M) from them, the
        ambient AR(1) sources starting at ``init`` (*lead, A). Returns (noise, last ambient values)."""
        cfg = self.config
        m, n_amb = self.n_mics, cfg.ambient_sources
        lead = init.shape[:-1]
        xi = self._noise_rng.standard_normal((*lead, n, m + n_amb))
        a = self._ar
        # stationary unit-variance AR(1): x[n] = a x[n-1] + sqrt(1 - a^2) xi[n]
        amb, _ = lfilter([math.sqrt(1 - a * a)], [1.0, -a], xi[..., m:], axis=-2, zi=(a * init)[..., None, :])
        # noise = self_rms xi[..., :M] + ambient_rms amb @ mix.T, all times noise_scale: two thin
        # products per slice of rows (the self-noise weights are zero on the ambient columns)
        w_self = np.zeros((m + n_amb, m))
        w_self[np.arange(m), np.arange(m)] = cfg.noise_scale * cfg.mic_self_noise_rms
        w_amb = (cfg.noise_scale * cfg.ambient_noise_rms) * self._ambient_mix.T  # (A, M)
        xi2, amb2 = xi.reshape(-1, m + n_amb), amb.reshape(-1, n_amb)
        noise = np.empty((xi2.shape[0], m))
        rows = _BLAS_TALL
        tmp = np.empty((min(rows, len(noise)), m))
        for i in range(0, len(noise), rows):
            out = noise[i : i + rows]
            np.matmul(xi2[i : i + rows], w_self, out=out)
            t = tmp[: len(out)]
            np.matmul(amb2[i : i + rows], w_amb, out=t)
            out += t
        return noise.reshape(*lead, n, m), amb[..., -1, :].copy()

    def _linear(self, kern: _Kernel, v: np.ndarray, state: np.ndarray | None, kernel_len: int | None = None):
        """Modal response of segments ``v`` (B, L, S) from ``state`` (B, K) (None = rest), using the
        impulse response truncated at ``kernel_len`` >= L (default L: only h[0:L] matters).
        Returns (y (B, L, M), final state (B, K) or None)."""
        n = v.shape[1]
        nfft, hf = kern.fft_kernel(kernel_len or n)
        vf = sfft.rfft(v, n=nfft, axis=1)  # (B, bins, S)
        yf = vf[:, :, None, 0] * hf[None, :, :, 0]
        for s in range(1, v.shape[2]):
            yf += vf[:, :, None, s] * hf[None, :, :, s]
        y = sfft.irfft(yf, n=nfft, axis=1)[:, :n]  # (B, n, M)
        if state is None:
            return y, None
        pw = kern.powers(n + 1)
        # free decay of the carried state: y[j] += Re(sum_k cout[m, k] p_k^(j+1) r_k)
        y += _matmul_rows(pw[:, 1:].T, state[:, :, None] * kern.cout.T[None, :, :]).real
        # state after the segment: p^n r + sum_i p^(n-1-i) F[i],  F[i] = b @ v[i]
        forced = _matmul_inner(pw[:, n - 1 :: -1], v)  # (B, K, S)
        new_state = pw[:, n][None, :] * state + (forced * kern.b[None, :, :]).sum(axis=2)
        return y, new_state

    def _duffing(self, kern: _Kernel, v: np.ndarray, state: np.ndarray):
        """Per-sample modal recursion with cubic stiffening; v (B, L, S), state (B, K)."""
        force = v @ kern.b.T  # (B, L, K)
        y = np.empty((v.shape[0], v.shape[1], kern.cout.shape[0]))
        r = state.copy()
        stiff = kern.w * self.mode_q * self._kappa  # w Q kappa
        xres = 2 * kern.t * kern.resid_x
        cout_t = kern.cout.T
        for j in range(v.shape[1]):
            x = (xres * r).real
            r = kern.p * r + force[:, j] - stiff * x**3
            y[:, j] = (r @ cout_t).real
        return y, r

    # ------------------------------------------------------------------ public
    def process(self, drive: np.ndarray) -> np.ndarray:
        """Streaming, causal, stateful: drive float32[n, n_speakers] (DAC full scale = +-1) ->
        recording float32[n, n_mics] (ADC full scale +-1, clipped and quantised). Successive calls
        continue the same signal; the simulated clock advances by n samples (drift follows it)."""
        d = self._check(drive, 2)
        n = d.shape[0]
        with self._lock:
            start = self._samples
            out = np.empty((n, self.n_mics), dtype=np.float32)
            if n == 0:
                return out
            noise = self._draw_noise((), n, fresh_state=False)
            pos = 0
            while pos < n:
                absolute = start + pos
                epoch = absolute // self._step
                seg = min(n - pos, (epoch + 1) * self._step - absolute)
                seg = min(seg, self._STREAM_KERNEL)
                kern = self._kernel_at(self._temperature_at(epoch))
                g = self._gains(np.arange(absolute, absolute + seg))
                v = self._speakers(d[pos : pos + seg], g[:, : self.n_speakers])[None]
                if self._kappa is None:
                    y, st = self._linear(kern, v, self._state[None], self._STREAM_KERNEL)
                else:
                    y, st = self._duffing(kern, v, self._state[None])
                self._state = st[0]
                nz = None if noise is None else noise[pos : pos + seg]
                out[pos : pos + seg] = self._adc(y[0], g[:, self.n_speakers :], nz)
                pos += seg
            self._samples = start + n
            return out

    def idle(self, seconds: float) -> None:
        """Let simulated time pass with the speakers silent and nothing recorded: the modes ring
        down, the drift moves on, the clock advances."""
        n = int(round(float(seconds) * self.sample_rate))
        if n < 0:
            raise ValueError("cannot idle for a negative time")
        with self._lock:
            pos = self._samples
            end = pos + n
            while pos < end:
                epoch = pos // self._step
                seg = min(end - pos, (epoch + 1) * self._step - pos)
                if np.any(self._state):
                    w = 2 * np.pi * self._freqs_at(self._temperature_at(epoch))
                    z = 0.5 / self.mode_q
                    log_p = (-z * w + 1j * w * np.sqrt(1 - z**2)) / self.sample_rate
                    self._state = self._state * np.exp(log_p * seg)
                    # far below the ADC's last bit: the modes are at rest
                    if np.abs(self._state).max() * np.abs(self._c).max() / self.sample_rate < 1e-300:
                        self._state = np.zeros_like(self._state)
                else:
                    self._grow_drift(epoch + 1)
                pos += seg
            self._samples = end

    def process_shots(self, drives: np.ndarray) -> np.ndarray:
        """B independent shots, each starting at rest: float32[B, n, n_speakers] -> float32[B, n, n_mics].
        The fast path for in-process sweeps (vectorised over B); the clock advances by B*n samples.
        All shots see the temperature at the call's start; each has its own noise and gain drift.
        The modal impulse response is cut where the rest moves the ADC input by < 0.01 LSB for any
        drive (`shot_kernel_length`; the module docstring states the bound)."""
        d = self._check(drives, 3, cast=self._kappa is not None)  # the linear path reads float32 as is
        b, n = d.shape[:2]
        with self._lock:
            start = self._samples
            out = np.empty((b, n, self.n_mics), dtype=np.float32)
            if b * n == 0:
                self._samples = start + b * n
                return out
            kern = self._kernel_at(self._temperature_at(start // self._step))
            # each shot's gains ramp linearly from its first to its last sample
            first = start + np.arange(b) * n
            g0_all, g1_all = self._gains(first), self._gains(first + (n - 1))  # (B, S + M)
            ramp = np.arange(n) / max(n - 1, 1)
            if self._kappa is None:
                self._shots_linear(kern, d, g0_all, g1_all, ramp, out)
            else:
                for lo in range(0, b, self._SHOT_CHUNK):
                    hi = min(b, lo + self._SHOT_CHUNK)
                    g0, g1 = g0_all[lo:hi], g1_all[lo:hi]
                    g = g0[:, None, :] + ramp[None, :, None] * (g1 - g0)[:, None, :]  # (chunk, n, S + M)
                    v = self._speakers(d[lo:hi], g[..., : self.n_speakers])
                    y, _ = self._duffing(kern, v, np.zeros((hi - lo, len(self.mode_q)), dtype=complex))
                    noise = self._draw_noise((hi - lo,), n, fresh_state=True)
                    self._adc(y, g[..., self.n_speakers :], noise, out=out[lo:hi])
            self._samples = start + b * n
            return out

    def shot_kernel_length(self, n: int, speaker_gain: np.ndarray | float = 1.0,
                           mic_gain: np.ndarray | float = 1.0, kern: _Kernel | None = None) -> int:
        """Where `process_shots` cuts the modal impulse response for outputs of ``n`` samples: the
        shortest ``L`` (a multiple of 256, or ``n``: no cut) with ``max_m mic_gain_m sum_s V_s
        sum_{j >= L} |h[m, s, j]| <= 0.01 LSB``, ``V_s`` the largest speaker output for a drive in
        [-1, 1] at gain ``speaker_gain_s`` (``U + |c2| U^2 + |c3| U^3``, ``U = |gain|``). The sum
        of ``|h|`` is bounded by geometric series (`_Kernel.tail_bound`), so for any drive the cut
        changes the ADC input by less than 0.01 LSB."""
        with self._lock:
            kern = kern if kern is not None else self._kernel_now()
            u = np.abs(np.broadcast_to(np.asarray(speaker_gain, dtype=float), (self.n_speakers,)))
            vmax = u + np.abs(self.speaker_c2) * u**2 + np.abs(self.speaker_c3) * u**3  # (S,)
            gm = np.abs(np.broadcast_to(np.asarray(mic_gain, dtype=float), (self.n_mics,)))
            tol = self._TRUNCATION_LSB * 2.0 ** (1 - self.config.adc_bits)
            grid = np.arange(256, n, 256)
            if len(grid) == 0:
                return n
            err = ((kern.tail_bound(grid) * vmax[None, None, :]).sum(axis=2) * gm[None, :]).max(axis=1)
            ok = np.flatnonzero(err <= tol)
            return int(grid[ok[0]]) if len(ok) else n

    def _shots_linear(self, kern: _Kernel, d: np.ndarray, g0_all: np.ndarray, g1_all: np.ndarray,
                      ramp: np.ndarray, out: np.ndarray) -> None:
        """The linear bank for `process_shots`: FFT convolution over the drive's support with the
        impulse response cut at `shot_kernel_length`, time along the last axis for the FFTs, a few
        shots at a time (cache-sized arrays); the noise is drawn per `_SHOT_CHUNK` shots, in order."""
        b, n, n_s = d.shape
        n_m = self.n_mics
        # silence before the first and after the last non-zero drive sample of the call drives
        # nothing (the speaker polynomial has no constant term): convolve only the support [a, e)
        active = np.flatnonzero(d.reshape(b, -1).any(axis=0).reshape(n, n_s).any(axis=1))
        a, e = (int(active[0]), int(active[-1]) + 1) if len(active) else (n, n)
        sub = min(b, self._SHOT_SUB)
        n_y = 0  # the convolution's non-zero output: samples a .. a + n_y - 1
        if e > a:
            # h beyond n - a - 1 never reaches an output sample
            gain_s = np.abs(np.concatenate([g0_all, g1_all])).max(axis=0)
            klen = min(n - a, self.shot_kernel_length(n, gain_s[:n_s], gain_s[n_s:], kern))
            n_y = min(n - a, e - a + klen - 1)
            nfft = sfft.next_fast_len(e - a + klen - 1, real=True)  # no wrap-around
            hf = kern.shot_kernel(klen, nfft)  # (M, S, bins)
            buf = np.zeros((sub, n_s, nfft))
        c2 = self.speaker_c2[:, None]
        c3 = self.speaker_c3[:, None]
        noise = self._shot_noise(b, n, sub)
        for s0, s1 in _shot_blocks(b, self._SHOT_CHUNK, sub):
            g0, g1 = g0_all[s0:s1], g1_all[s0:s1]
            z = np.empty((s1 - s0, n, n_m))  # the ADC input
            z[:, :a] = 0.0
            z[:, a + n_y :] = 0.0
            if n_y:
                # speakers (as `_speakers`), written time-last into the zero-padded FFT buffer
                gs = g0[:, :n_s, None] + ramp[None, None, a:e] * (g1 - g0)[:, :n_s, None]  # (c, S, e - a)
                u = np.clip(d[s0:s1, a:e].transpose(0, 2, 1), -1.0, 1.0, out=np.empty(gs.shape))
                u *= gs
                v = buf[: s1 - s0, :, : e - a]
                np.multiply(u, c3, out=v)
                v += c2
                v *= u
                v += 1.0
                v *= u
                vf = sfft.rfft(buf[: s1 - s0], axis=2)  # (c, S, bins)
                y = sfft.irfft(_mix_bins(vf, hf), n=nfft, axis=2)[:, :, :n_y]  # (c, M, n_y)
                y *= g0[:, n_s:, None] + ramp[None, None, a : a + n_y] * (g1 - g0)[:, n_s:, None]  # mic gains
                self._preamp(y)
                z[:, a : a + n_y] = y.transpose(0, 2, 1)
            self._adc(z, None, next(noise), out=out[s0:s1])

    def _shot_noise(self, b: int, n: int, sub: int):
        """The noise of `process_shots`, block by block (`_shot_blocks`), in the order of the noise
        stream: per `_SHOT_CHUNK` shots the ambient sources' start values, then the normals of each
        shot in turn (so a chunk cut into blocks draws the very same numbers). None when off."""
        on = self._noise_on()
        init = lo = None
        for s0, s1 in _shot_blocks(b, self._SHOT_CHUNK, sub):
            if not on:
                yield None
                continue
            if s0 % self._SHOT_CHUNK == 0:
                lo = s0
                size = (min(b, lo + self._SHOT_CHUNK) - lo, self.config.ambient_sources)
                init = self._noise_rng.standard_normal(size)
            yield self._noise_from(init[s0 - lo : s1 - lo], n)[0]

    def _check(self, x: np.ndarray, ndim: int, cast: bool = True) -> np.ndarray:
        """The drive as an array of the right shape, finite; float64 (a copy) unless ``cast`` is
        False and it is float32/float64 already (then it may be the caller's array: read it only)."""
        arr = np.asarray(x)
        if ndim == 2 and arr.ndim == 1 and self.n_speakers == 1:
            arr = arr[:, None]
        if arr.ndim != ndim or arr.shape[-1] != self.n_speakers:
            lead = "n" if ndim == 2 else "B, n"
            raise ValueError(f"drive must have shape ({lead}, {self.n_speakers}), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError("drive must be real numbers")
        if cast or arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("drive contains NaN or inf")
        return arr

