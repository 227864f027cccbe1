"""Physics of the simulated optical bench: pulse shaper -> chi(2) crystal -> spectrometer (numpy only).

This module imports nothing from the rest of labpnn; the emulators in this package drive it.

The light path
==============
1. **Pulse.** A transform-limited Gaussian femtosecond pulse on a uniform frequency grid
   ``nu_i = b0 + (i + 1/2) * df`` (``df = grid_step_thz`` = 0.01 THz, 384 points) tiling the shaper band
   ``[b0, b1]`` = 191.48-195.32 THz (inside the WaveShaper's 191.250-196.275 THz)::

       E(nu) = sqrt(e_n) * exp(-2 ln2 (nu - nu_c - dnu_n)^2 / FWHM^2)

   ``nu_c`` = 193.4 THz (1550.1 nm), intensity FWHM 1.2 THz (9.6 nm, ~370 fs transform limited);
   ``e_n`` and ``dnu_n`` are the pulse-energy and centre-frequency drift at shot ``n`` (below).
   (The pulse sits at 1550 nm rather than 1560 nm so that its whole band fits in the shaper.)

2. **Shaper.** ``n_channels`` (64) equal channels tile the band (60 GHz each);
   channel ``c`` covers WSP frequencies ``[b0 + c w, b0 + (c+1) w)``, ``w = (b1 - b0) / N``.
   A mask is a complex transmission ``t = 10**(-attn_dB/20) * exp(i phase)``; attenuation above
   ``shaper_max_attn_db`` (40 dB) or ``inf`` blocks (t = 0). The per-frequency profile lives on the
   shaper's 0.001 THz grid; each 10 GHz physics bin averages the 10 profile points it covers
   (unlisted points are blocked; ~ the shaper's own optical resolution). ``E_s = t * E``.

3. **Second harmonic.** Type-II-like phase matching with a linear (group-velocity-mismatch)
   wave-vector mismatch, phase matched at ``nu_c`` (the crystal does not follow the drift)::

       dk(nu1, nu2) L = 2 pi (T1 d1 + T2 d2),   d = nu - nu_c (THz), T1, T2 in ps
       E_SH(Omega) = df * sum_nu1 E_s(nu1) E_s(Omega - nu1) W(nu1, Omega - nu1)
       W = (1/L) int_0^L exp(i dk z) dz = exp(i pi y) sinc(y),   y = T1 d1 + T2 d2
       PSD_SH(Omega) = kappa |E_SH(Omega)|^2         [W/THz]

   ``T1 = 0.55 ps``, ``T2 = 0.25 ps`` (nominal): the acceptance along the SH frequency
   (``d1 = d2``) has a sinc^2 FWHM of 0.886 / ((T1+T2)/2) = 2.2 THz, comparable to the SH bandwidth
   (1.7 THz), and ``T1 != T2`` makes the weight depend on the pair, not only on Omega, so the map is
   not a filtered autoconvolution. It is computed exactly as the crystal integral split into
   ``n_slices`` (5) Gauss-Legendre slices: each slice's weight factorises,
   ``exp(2 pi i y t) = exp(2 pi i T1 d1 t) exp(2 pi i T2 d2 t)``, so each is one FFT convolution
   (max error 4e-7 of the peak against the direct double sum with the exact sinc; see the tests). ``kappa`` (efficiency)
   is calibrated once so that the nominal model's fully transmitted peak reads ``peak_fraction`` of
   full scale on the default spectrometer axis.

4. **Spectrometer (OSA).** Power in the resolution bandwidth at pixel wavelength ``lambda_p``,
   a Gaussian instrument function of FWHM ``R`` (default 0.05 nm) and unit peak::

       P(lambda_p) = sum_k PSD_SH(Omega_k) df exp(-4 ln2 ((lambda_p - lambda_k) / R)^2)

   summed over the SH grid points within 3 FWHM of each pixel (any start/stop/points; axes are
   cached). Default axis 770-780 nm, 512 pixels, 0.05 nm (SH centre 775.06 nm).

5. **Detector.** 16-bit ADC: ``c = P / w_c`` counts above an ADC bias of 200 counts,
   ``w_c = full_scale_w / (65535 - 200)`` (full scale 5 uW = -23 dBm above bias)::

       c' = c / (1 + beta c / C_fs)                       (compression, model gap, beta = 0.03)
       counts = clip(round(bias + c' + s sqrt(g max(c', 0) + r^2) z), 0, 65535),  z ~ N(0, 1)
       P_reported = (counts - bias) * w_c                  [W]  (calibration: `counts_to_watts`)

   shot noise ``g = 1`` count per photo-electron (variance = g * signal), read noise ``r = 4``
   counts, ``s = noise_scale``. A shot is flagged saturated when any pixel hits 65535 counts
   (its reported power is then clipped at ``full_scale_w``). Reported powers are multiples of ``w_c``
   (quantisation) and can be slightly negative around zero signal.

6. **Drift, per shot (never wall clock).** Two independent Ornstein-Uhlenbeck processes in the shot
   index ``n`` (correlation 50,000 shots), starting at 0 (shot 0 is nominal)::

       x_{n+1} = rho x_n + sigma sqrt(1 - rho^2) xi_n,   rho = exp(-1/50000)
       e_n = 1 + drift_scale * x_n,     dnu_n = drift_scale * u_n

   ``sigma`` is set from the RMS change over 1,000 shots: 0.1 % pulse energy (0.2 % SH power) and
   0.003 nm centre wavelength (0.37 GHz). The stationary spread is 5x that. Over a 20,000-shot
   calibration the SH power wanders ~1 % RMS: comparable to the one-shot noise of a typical mask,
   so a twin fitted once goes stale over a long run, and online refinement matters. Tests inject
   more with ``drift_scale``.

7. **Model gap** (``model_gap=True``, default): the crystal is 10 % longer than nominal
   (``T1, T2`` x 1.10: narrower acceptance, different pair weighting) and the detector compresses
   (``beta`` = 3 % at full scale). ``kappa`` stays calibrated on the nominal model, so neither is
   absorbed. ``model_gap=False`` gives the nominal model exactly.

8. **Copy-to-copy variation** (``copy_seed``; 0 = the nominal copy, exactly: today's bench bit for
   bit). Another copy is the same design built again (`fabricate`, deterministic per copy seed,
   independent of ``seed``; each draw Gaussian, clipped at 3 sigma; ``copy_variation`` scales all):
   crystal length (``T1, T2``) RMS 3 % (polishing tolerance), phase-matching centre RMS 0.12 THz
   (~1 nm: cut angle / oven temperature), shaper insertion-loss ripple 0.3 dB RMS across the band
   (a smooth random curve, folded into the channel weights and the profile path alike), shaper
   frequency calibration RMS 3 GHz (whole 1 GHz steps), OSA wavelength offset RMS 0.01 nm, the
   oscillator's centre RMS 0.1 nm and bandwidth RMS 3 %, SH efficiency (focusing, coupling) RMS 5 %.
   ``kappa`` stays the design's calibration. Against the nominal copy, noiseless traces of random
   0-10 dB masks change by 1.4-9 % of the peak RMS (copies 1-5; the one-shot noise is ~1.5 %).
   A vowel classifier trained with PAT on copy 0 (20 epochs, seeds 0 and 1; 52 test samples, 1.9
   points each) scores 92-94 % there, 85-87 % on copy 1, 73-85 % on copy 2, 62-69 % on copy 3;
   at ``copy_variation=0.5`` copies 1 and 2 cost it 2 and 10 points.

Default bench figures (`OpticalBenchConfig()`, measured with this code; checked in the tests)
----------------------------------------------------------------------------------------------
- Peak SNR (mean / std at the peak pixel, one shot): fully transmitted pulse ~200 (peak 0.58 of
  full scale = 2.9 uW in 0.05 nm); all channels at 3 dB ~96; 6 dB ~49; 10 dB ~19 (SH goes as t^4);
  random masks uniform in 0-10 dB per channel ~65-80.
- Drift per 1,000 shots (RMS): pulse energy 0.1 % -> SH power 0.2 %; centre wavelength
  0.003 nm. (A stable fs oscillator at ~100 shots/s: 1,000 shots is 10 s.)
- Gap (gap-on vs gap-off, noiseless): fully transmitted peak 7 % lower (crystal 5.5 %, compression
  1.7 %); RMS trace difference 3-4 % of the peak for random 0-10 dB masks (2-3x the one-shot noise
  at those levels, 8x at full transmission), ~1 % for phase-only masks.
- Cost: ~0.15-0.25 ms per `shot` (512 pixels), similar per row in `measure_batch` (2 shared cores,
  numpy 2; three FFTs of 5 x 768 points dominate). No BLAS calls, so no thread spin-up.

Everything is deterministic given ``seed``, ``copy_seed`` and the sequence of shots (``shot`` and
``measure_batch`` draw the same random streams, so they give identical results).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

__all__ = ["C_M_PER_S", "Fabrication", "OpticalBenchConfig", "SHGBench", "fabricate", "thz_to_m", "m_to_thz"]

C_M_PER_S = 299_792_458.0
_FOUR_LN2 = 4.0 * math.log(2.0)


def thz_to_m(freq_thz):
    """Vacuum wavelength in metres of a frequency in THz."""
    return C_M_PER_S / (np.asarray(freq_thz, dtype=float) * 1e12)


def m_to_thz(wavelength_m):
    """Frequency in THz of a vacuum wavelength in metres."""
    return C_M_PER_S / (np.asarray(wavelength_m, dtype=float) * 1e12)


@dataclass(frozen=True)
class OpticalBenchConfig:
    """The default bench (see the module docstring). Knobs for tests: ``noise_scale``,
    ``drift_scale``, ``model_gap``, ``seed``; ``copy_seed`` picks a copy of the bench (item 8);
    the rest describes the hardware."""

    n_channels: int = 64
    n_pixels: int = 512
    seed: int = 0
    noise_scale: float = 1.0
    drift_scale: float = 1.0
    model_gap: bool = True
    # pulse
    center_thz: float = 193.4
    fwhm_thz: float = 1.2
    # shaper
    shaper_band_thz: tuple[float, float] = (191.48, 195.32)
    shaper_max_attn_db: float = 40.0
    profile_step_thz: float = 0.001
    grid_step_thz: float = 0.01
    # crystal (nominal group-delay mismatches over the crystal length, ps)
    t1_ps: float = 0.55
    t2_ps: float = 0.25
    n_slices: int = 5
    crystal_length_error: float = 0.10  # actual / nominal - 1, applied when model_gap
    # spectrometer defaults
    wavelength_start_m: float = 770e-9
    wavelength_stop_m: float = 780e-9
    resolution_m: float = 0.05e-9
    # detector
    full_scale_counts: int = 65535
    adc_bias_counts: float = 200.0
    full_scale_w: float = 5e-6
    peak_fraction: float = 0.62
    counts_per_electron: float = 1.0
    read_noise_counts: float = 4.0
    compression: float = 0.03  # applied when model_gap
    # drift
    energy_drift_per_1k: float = 0.001  # RMS relative change of pulse energy over 1,000 shots
    center_drift_nm_per_1k: float = 0.003  # RMS change of the centre wavelength over 1,000 shots
    drift_corr_shots: float = 50_000.0
    # copy-to-copy variation: which fabricated/assembled copy of the bench (0 = the nominal copy,
    # exactly); RMS amounts of a second bench built to the same design, all scaled by copy_variation
    copy_seed: int = 0
    copy_variation: float = 1.0
    copy_crystal_length: float = 0.03  # crystal length (T1, T2), relative: polishing tolerance
    copy_phase_match_thz: float = 0.12  # phase-matching centre (crystal cut angle / temperature), THz
    copy_ripple_db: float = 0.3  # shaper insertion-loss ripple across the band, dB (RMS over the band)
    copy_shaper_offset_thz: float = 0.003  # shaper frequency calibration offset, THz
    copy_osa_offset_nm: float = 0.01  # OSA wavelength calibration offset, nm
    copy_center_nm: float = 0.1  # the copy's oscillator: centre wavelength, nm
    copy_fwhm: float = 0.03  # the copy's oscillator: bandwidth, relative
    copy_efficiency: float = 0.05  # SH efficiency (focusing, coupling into the OSA fibre), relative

    def __post_init__(self):
        b0, b1 = self.shaper_band_thz
        if not (0 < b0 < b1):
            raise ValueError("shaper_band_thz must be (start, stop) with 0 < start < stop")
        if self.n_channels < 1 or self.n_pixels < 2 or self.n_slices < 1:
            raise ValueError("n_channels >= 1, n_pixels >= 2 and n_slices >= 1 required")
        m = self.grid_step_thz / self.profile_step_thz
        n_fine = (b1 - b0) / self.profile_step_thz
        if abs(m - round(m)) > 1e-6 or abs(n_fine - round(n_fine)) > 1e-6 or round(n_fine) % round(m):
            raise ValueError("band / grid_step / profile_step must be commensurate")
        if min(self.noise_scale, self.drift_scale, self.resolution_m, self.full_scale_w, self.copy_variation) < 0:
            raise ValueError("scales must be non-negative")
        if not 0 <= self.adc_bias_counts < self.full_scale_counts:
            raise ValueError("adc_bias_counts must lie in [0, full_scale_counts)")


@dataclass(frozen=True)
class Fabrication:
    """What makes one copy of the bench differ from the design (`OpticalBenchConfig` docstring,
    item 8). The nominal copy (``copy_seed=0``) has every offset 0, every factor 1 and no ripple."""

    copy_seed: int
    crystal_length: float  #: actual / design crystal length (on top of the model gap's +10 %)
    phase_match_thz: float  #: phase-matching centre minus the design centre, THz
    ripple_db: np.ndarray | None  #: shaper insertion loss across the band on the 0.001 THz grid, dB
    shaper_offset_thz: float  #: where a mask lands minus where it was sent, THz (whole grid steps)
    osa_offset_m: float  #: true minus reported wavelength of the OSA's pixels, m
    center_thz: float  #: the copy's oscillator centre, THz
    fwhm_thz: float  #: the copy's oscillator bandwidth (intensity FWHM), THz
    efficiency: float  #: SH efficiency relative to the design

    @property
    def nominal(self) -> bool:
        return self.copy_seed == 0 or self.ripple_db is None

    def summary(self) -> dict:
        """Plain numbers (for logs and tests): the offsets above, the ripple's RMS and peak-to-peak."""
        rip = np.zeros(1) if self.ripple_db is None else self.ripple_db
        return {"copy_seed": self.copy_seed, "crystal_length": self.crystal_length,
                "phase_match_thz": self.phase_match_thz, "ripple_rms_db": float(np.sqrt(np.mean(rip**2))),
                "ripple_pp_db": float(np.ptp(rip)), "shaper_offset_thz": self.shaper_offset_thz,
                "osa_offset_nm": self.osa_offset_m * 1e9, "center_thz": self.center_thz, "fwhm_thz": self.fwhm_thz,
                "efficiency": self.efficiency}


def fabricate(cfg: OpticalBenchConfig) -> Fabrication:
    """The copy ``cfg.copy_seed`` of the bench: deterministic per copy seed, independent of ``seed``
    (noise and drift). Each draw is Gaussian with the config's RMS, clipped at 3 sigma."""
    v = cfg.copy_variation if cfg.copy_seed != 0 else 0.0
    if v == 0.0:
        return Fabrication(cfg.copy_seed, 1.0, 0.0, None, 0.0, 0.0, cfg.center_thz, cfg.fwhm_thz, 1.0)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.copy_seed, 0x5C6])))

    def z() -> float:
        return float(np.clip(rng.standard_normal(), -3.0, 3.0))

    length = 1.0 + v * cfg.copy_crystal_length * z()
    pm = v * cfg.copy_phase_match_thz * z()
    # insertion-loss ripple: a smooth random curve across the band (harmonics 1-6, amplitudes ~ 1/k),
    # scaled to the stated RMS
    b0, b1 = cfg.shaper_band_thz
    n_fine = int(round((b1 - b0) / cfg.profile_step_thz))
    u = (np.arange(n_fine) + 0.5) / n_fine
    k = np.arange(1, 7)
    amp = rng.standard_normal(k.size) / k
    phase = rng.uniform(0, 2 * np.pi, k.size)
    curve = (amp[:, None] * np.sin(np.pi * k[:, None] * u[None, :] + phase[:, None])).sum(0)
    curve = curve - curve.mean()
    ripple = v * cfg.copy_ripple_db * curve / max(float(np.sqrt(np.mean(curve**2))), 1e-12)
    shift = round(v * cfg.copy_shaper_offset_thz * z() / cfg.profile_step_thz) * cfg.profile_step_thz
    osa = v * cfg.copy_osa_offset_nm * z() * 1e-9
    lam_c = thz_to_m(cfg.center_thz) + v * cfg.copy_center_nm * z() * 1e-9
    fwhm = cfg.fwhm_thz * (1.0 + v * cfg.copy_fwhm * z())
    eff = 1.0 + v * cfg.copy_efficiency * z()
    return Fabrication(cfg.copy_seed, length, pm, ripple, float(shift), osa, float(m_to_thz(lam_c)), fwhm, eff)


@dataclass
class _Crystal:
    ab: np.ndarray  # (2M, n): rows w_m exp(2 pi i T1 d t_m), then exp(2 pi i T2 d t_m)
    w: np.ndarray  # (M,)
    t1_ps: float
    t2_ps: float


@dataclass
class _Axis:
    """A spectrometer axis: which SH grid points each pixel sees through its instrument function."""

    wavelengths_m: np.ndarray
    resolution_m: float
    lam_asc: np.ndarray = field(repr=False)  # SH grid wavelengths, ascending
    lo: np.ndarray = field(repr=False)  # first grid index in each pixel's window
    hi: np.ndarray = field(repr=False)  # one past the last
    active: np.ndarray = field(repr=False)  # pixels whose window holds any grid point
    taps: int = 0
    idx: np.ndarray | None = field(default=None, repr=False)  # (A, taps) cached gather indices
    wts: np.ndarray | None = field(default=None, repr=False)  # (A, taps) cached weights


_CACHE_TAPS = 1 << 20  # cache the gather tables of an axis up to this many entries
_CHUNK = 8  # rows per vectorised step in measure_batch


class SHGBench:
    """The shared light path. Stateful: current mask, shot counter, drift state. Thread-safe."""

    def __init__(self, config: OpticalBenchConfig | None = None):
        cfg = config if config is not None else OpticalBenchConfig()
        self.config = cfg
        self._lock = threading.RLock()
        b0, b1 = cfg.shaper_band_thz
        self._df = cfg.grid_step_thz
        self._m = int(round(cfg.grid_step_thz / cfg.profile_step_thz))
        self._n_fine = int(round((b1 - b0) / cfg.profile_step_thz))
        n = self._n_fine // self._m
        self._n = n
        self.freq_thz = b0 + (np.arange(n) + 0.5) * self._df  #: fundamental grid (bin centres), THz
        self.sh_freq_thz = 2 * b0 + (np.arange(2 * n - 1) + 1.0) * self._df  #: SH grid, THz
        self._nfft = _good_fft_size(2 * n - 1)
        self.fabrication = fab = fabricate(cfg)  #: what makes this copy differ from the design
        self._center_thz, self._fwhm_thz = cfg.center_thz, cfg.fwhm_thz  # the design pulse (for kappa)
        # channel -> bin averaging, sparse: bin k = sum_j w[k, j] * channel idx[k, j] (no BLAS here);
        # a copy's shaper puts channel c at a frequency offset (whole 0.001 THz steps: light below the
        # first channel is blocked) and has an insertion-loss ripple, both folded into the weights
        self._shift = int(round(fab.shaper_offset_thz / cfg.profile_step_thz))
        self._ripple = None if fab.ripple_db is None else 10.0 ** (-fab.ripple_db / 20.0)
        fine = np.arange(self._n_fine)
        if self._shift == 0 and self._ripple is None:
            fine_ch = (fine * cfg.n_channels) // self._n_fine
            cmat = np.zeros((n, cfg.n_channels))
            np.add.at(cmat, (fine // self._m, fine_ch), 1.0 / self._m)
        else:
            fine_ch = ((fine - self._shift) * cfg.n_channels) // self._n_fine
            ok = (fine_ch >= 0) & (fine_ch < cfg.n_channels)
            weight = (np.ones(self._n_fine) if self._ripple is None else self._ripple) / self._m
            cmat = np.zeros((n, cfg.n_channels))
            np.add.at(cmat, (fine[ok] // self._m, fine_ch[ok]), weight[ok])
        width = int((cmat > 0).sum(axis=1).max())
        order = np.argsort(cmat <= 0, axis=1, kind="stable")[:, :width]
        self._bin_ch = order
        self._bin_w = np.take_along_axis(cmat, order, axis=1)
        # crystals: the design (for kappa), and this copy's (model gap, length, phase-matching centre)
        scale = 1.0 + cfg.crystal_length_error if cfg.model_gap else 1.0
        self._nominal = self._make_crystal(cfg.t1_ps, cfg.t2_ps)
        if fab.nominal:
            self._crystal = self._make_crystal(cfg.t1_ps * scale, cfg.t2_ps * scale)
        else:
            scale *= fab.crystal_length
            self._crystal = self._make_crystal(cfg.t1_ps * scale, cfg.t2_ps * scale,
                                               cfg.center_thz + fab.phase_match_thz)
        self._compression = cfg.compression if cfg.model_gap else 0.0
        # detector calibration
        self._c_fs = cfg.full_scale_counts - cfg.adc_bias_counts
        self.watts_per_count = cfg.full_scale_w / self._c_fs
        # drift
        rho = math.exp(-1.0 / cfg.drift_corr_shots)
        k1000 = math.sqrt(2.0 * (1.0 - math.exp(-1000.0 / cfg.drift_corr_shots)))
        dnu_1k = C_M_PER_S * cfg.center_drift_nm_per_1k * 1e-9 / (thz_to_m(cfg.center_thz) ** 2) / 1e12
        self._rho = rho
        self._drift_sigma = np.array([cfg.energy_drift_per_1k / k1000, dnu_1k / k1000])
        self._drift_x = np.zeros(2)  # (energy, centre THz) for the next shot, before drift_scale
        seeds = np.random.SeedSequence(cfg.seed).spawn(2)
        self._drift_rng = np.random.Generator(np.random.PCG64(seeds[0]))
        self._noise_rng = np.random.Generator(np.random.PCG64(seeds[1]))
        self._shots = 0
        self._axes: dict = {}
        self._trans = np.ones(n, dtype=complex)
        if not self.fabrication.nominal:  # the open shaper of a copy: its ripple and calibration
            self._trans = self.channel_transmission(np.zeros(cfg.n_channels)).astype(complex)
        self._default_wl = np.linspace(cfg.wavelength_start_m, cfg.wavelength_stop_m, cfg.n_pixels)
        self._default_wl.flags.writeable = False
        # efficiency calibration on the nominal model, default axis, full transmission, no drift
        self._kappa = 1.0
        e0 = self._pulse(1.0, 0.0)
        psd = self._psd(self._sh_field(e0, self._nominal))
        p0 = self._instrument(psd, self.default_wavelengths_m, cfg.resolution_m)
        self._kappa = cfg.peak_fraction * cfg.full_scale_w / float(p0.max())
        # the copy: its own oscillator and SH efficiency (kappa stays the design's calibration)
        self._osa_offset_m = fab.osa_offset_m
        if not fab.nominal:
            self._center_thz, self._fwhm_thz = fab.center_thz, fab.fwhm_thz
            self._kappa *= fab.efficiency

    # ------------------------------------------------------------------ description
    @property
    def shaper_band_thz(self) -> tuple[float, float]:
        return tuple(self.config.shaper_band_thz)

    @property
    def channel_edges_thz(self) -> np.ndarray:
        b0, b1 = self.config.shaper_band_thz
        return b0 + np.arange(self.config.n_channels + 1) * (b1 - b0) / self.config.n_channels

    @property
    def default_wavelengths_m(self) -> np.ndarray:
        """The default spectrometer axis (read-only): start..stop, ``n_pixels`` points."""
        return self._default_wl

    @property
    def shots(self) -> int:
        """Number of shots taken so far (the drift clock)."""
        return self._shots

    @property
    def drift_state(self) -> tuple[float, float]:
        """(relative pulse energy, centre offset in THz) that the next shot will see."""
        s = self.config.drift_scale
        return 1.0 + s * float(self._drift_x[0]), s * float(self._drift_x[1])

    @property
    def crystal_delays_ps(self) -> tuple[float, float]:
        """(T1, T2) of the actual crystal (includes the length mis-set when ``model_gap``)."""
        return self._crystal.t1_ps, self._crystal.t2_ps

    @property
    def full_scale_w(self) -> float:
        return self.config.full_scale_w

    def counts_to_watts(self, counts):
        """ADC counts -> reported optical power in W (the OSA's calibration)."""
        return (np.asarray(counts, dtype=float) - self.config.adc_bias_counts) * self.watts_per_count

    # ------------------------------------------------------------------ mask
    def channel_transmission(self, attn_db, phase_rad=None) -> np.ndarray:
        """Per-bin complex transmission for per-channel values; shape (..., N) -> (..., n)."""
        attn = np.asarray(attn_db, dtype=float)
        if attn.shape[-1:] != (self.config.n_channels,):
            raise ValueError(f"attn_db must have {self.config.n_channels} channels, got {attn.shape}")
        t = self._amplitude(attn)
        if phase_rad is not None:
            ph = np.asarray(phase_rad, dtype=float)
            if ph.shape != attn.shape or not np.all(np.isfinite(ph)):
                raise ValueError("phase_rad must be finite and shaped like attn_db")
            t = t * np.exp(1j * ph)
        return np.einsum("...kj,kj->...k", np.take(t, self._bin_ch, axis=-1), self._bin_w)

    def set_mask_channels(self, attn_db, phase_rad=None) -> None:
        """Apply per-channel attenuation (dB, >= 0; inf or > 40 dB blocks) and optional phase."""
        trans = self.channel_transmission(attn_db, phase_rad)
        with self._lock:
            self._trans = np.asarray(trans, dtype=complex)

    def set_mask_profile(self, freq_thz, attn_db, phase_rad=None) -> None:
        """Apply a per-frequency profile on the shaper's 0.001 THz grid (what the WaveShaper
        emulator calls). Frequencies outside the shaper band carry no light and are ignored;
        physics bins average their 5 grid points; unlisted points are blocked."""
        f = np.asarray(freq_thz, dtype=float).ravel()
        attn = np.asarray(attn_db, dtype=float).ravel()
        ph = np.zeros_like(f) if phase_rad is None else np.asarray(phase_rad, dtype=float).ravel()
        if not (f.shape == attn.shape == ph.shape):
            raise ValueError("freq_thz, attn_db and phase_rad must have the same length")
        if not np.all(np.isfinite(ph)):
            raise ValueError("phase_rad must be finite")
        t = self._amplitude(attn) * np.exp(1j * ph)
        j = np.rint((f - self.config.shaper_band_thz[0]) / self.config.profile_step_thz).astype(np.int64)
        j += self._shift  # a copy's shaper calibration: where the mask lands
        keep = (j >= 0) & (j < self._n_fine)
        fine = np.zeros(self._n_fine, dtype=complex)
        fine[j[keep]] = t[keep]
        if self._ripple is not None:
            fine *= self._ripple
        trans = fine.reshape(self._n, self._m).mean(axis=1)
        with self._lock:
            self._trans = trans

    def _amplitude(self, attn: np.ndarray) -> np.ndarray:
        if np.any(np.isnan(attn)) or np.any(attn < 0):
            raise ValueError("attenuation must be >= 0 dB and not NaN")
        with np.errstate(over="ignore"):
            amp = 10.0 ** (-np.minimum(attn, 1e3) / 20.0)
        return np.where(attn > self.config.shaper_max_attn_db, 0.0, amp)

    # ------------------------------------------------------------------ physics
    def _make_crystal(self, t1: float, t2: float, phase_match_thz: float | None = None) -> _Crystal:
        if t1 == 0.0 and t2 == 0.0:
            m = 1
            nodes, weights = np.array([0.5]), np.array([1.0])
        else:
            m = self.config.n_slices
            x, w = np.polynomial.legendre.leggauss(m)
            nodes, weights = (x + 1) / 2, w / 2
        d = self.freq_thz - (self.config.center_thz if phase_match_thz is None else phase_match_thz)
        a = weights[:, None] * np.exp(2j * np.pi * t1 * nodes[:, None] * d[None, :])
        b = np.exp(2j * np.pi * t2 * nodes[:, None] * d[None, :])
        return _Crystal(ab=np.concatenate([a, b]), w=weights, t1_ps=t1, t2_ps=t2)

    def _pulse(self, energy, dnu):
        """Field amplitude on the grid; energy/dnu scalars or (B,) arrays -> (n,) or (B, n)."""
        energy = np.asarray(energy, dtype=float)
        dnu = np.asarray(dnu, dtype=float)
        x = self.freq_thz - self._center_thz - dnu[..., None]
        return np.sqrt(np.maximum(energy, 0.0))[..., None] * np.exp(
            -0.5 * _FOUR_LN2 * (x / self._fwhm_thz) ** 2
        )

    def _sh_field(self, e: np.ndarray, crystal: _Crystal) -> np.ndarray:
        """(..., n) shaped field -> (..., 2n-1) SH field (sliced-crystal FFT convolution)."""
        m = crystal.w.size
        f = np.fft.fft(e[..., None, :] * crystal.ab, self._nfft, axis=-1)  # one call for a and b
        spec = np.einsum("...mk,...mk->...k", f[..., :m, :], f[..., m:, :])  # weights folded into a
        return np.fft.ifft(spec, axis=-1)[..., : 2 * self._n - 1] * self._df

    def _psd(self, esh: np.ndarray) -> np.ndarray:
        return self._kappa * (esh.real**2 + esh.imag**2)

    def _axis(self, wavelengths_m, resolution_m) -> _Axis:
        wl = np.ascontiguousarray(wavelengths_m, dtype=float)
        res = float(resolution_m)
        key = (res, wl.size, hash(wl.tobytes()))
        ax = self._axes.get(key)
        if ax is not None:
            return ax
        if wl.ndim != 1 or wl.size < 1 or not np.all(np.isfinite(wl)) or np.any(wl <= 0):
            raise ValueError("wavelengths_m must be a 1-D array of positive wavelengths")
        if not (res > 0 and math.isfinite(res)):
            raise ValueError("resolution_m must be positive")
        wl = wl.copy()
        wl.flags.writeable = False
        # SH grid wavelengths, ascending, and each pixel's window of grid points within 3 FWHM
        lam_asc = thz_to_m(self.sh_freq_thz)[::-1].copy()
        lo = np.searchsorted(lam_asc, wl - 3.0 * res, side="left")
        hi = np.searchsorted(lam_asc, wl + 3.0 * res, side="right")
        active = np.flatnonzero(hi > lo)
        taps = int((hi - lo).max()) if active.size else 0
        ax = _Axis(wavelengths_m=wl, resolution_m=res, lam_asc=lam_asc, lo=lo, hi=hi, active=active, taps=taps)
        if active.size * taps <= _CACHE_TAPS:
            ax.idx, ax.wts = self._taps(ax, active)
        if len(self._axes) >= 8:
            self._axes.clear()
        self._axes[key] = ax
        return ax

    def _taps(self, ax: _Axis, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather indices (into the ascending SH grid padded with one zero) and weights."""
        kdim = ax.lam_asc.size
        idx = ax.lo[pixels, None] + np.arange(ax.taps)[None, :]
        valid = idx < ax.hi[pixels, None]
        idx = np.where(valid, idx, kdim)
        lam_k = np.append(ax.lam_asc, 0.0)[idx]
        dl = (ax.wavelengths_m[pixels, None] - lam_k) / ax.resolution_m
        wts = np.where(valid, np.exp(-_FOUR_LN2 * dl**2) * self._df, 0.0)
        return idx, wts

    def _true_wavelengths(self, wavelengths_m):
        """Where the OSA's pixels really are: a copy's OSA reads its axis with a calibration offset."""
        if self._osa_offset_m == 0.0:
            return wavelengths_m
        return np.asarray(wavelengths_m, dtype=float) + self._osa_offset_m

    def _instrument(self, psd: np.ndarray, wavelengths_m, resolution_m) -> np.ndarray:
        """SH PSD (..., K) on the SH grid -> power in the RBW (W) at each pixel (..., S):
        ``P_p = sum_k PSD_k df exp(-4 ln2 ((lambda_p - lambda_k) / R)^2)`` (3 FWHM window)."""
        ax = self._axis(wavelengths_m, resolution_m)
        padded = np.concatenate([psd[..., ::-1], np.zeros(psd.shape[:-1] + (1,))], axis=-1)
        out = np.zeros(psd.shape[:-1] + (ax.wavelengths_m.size,))
        if ax.idx is not None:
            out[..., ax.active] = np.einsum("...at,at->...a", np.take(padded, ax.idx, axis=-1), ax.wts)
            return out
        step = max(1, _CACHE_TAPS // max(ax.taps, 1))  # large axes: build the taps in chunks
        for s in range(0, ax.active.size, step):
            pix = ax.active[s : s + step]
            idx, wts = self._taps(ax, pix)
            out[..., pix] = np.einsum("...at,at->...a", np.take(padded, idx, axis=-1), wts)
        return out

    def _detect(self, power_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noiseless optical power (..., S) -> (reported W, saturated flags (...,))."""
        cfg = self.config
        c = power_w / self.watts_per_count
        if self._compression:
            c = c / (1.0 + self._compression * np.maximum(c, 0.0) / self._c_fs)
        z = self._noise_rng.standard_normal(c.shape)
        s = cfg.noise_scale
        sigma = s * np.sqrt(cfg.counts_per_electron * np.maximum(c, 0.0) + cfg.read_noise_counts**2)
        counts = np.clip(np.rint(cfg.adc_bias_counts + c + sigma * z), 0, cfg.full_scale_counts)
        saturated = np.any(counts >= cfg.full_scale_counts, axis=-1)
        return self.counts_to_watts(counts), saturated

    def _advance_drift(self, n_shots: int) -> tuple[np.ndarray, np.ndarray]:
        """Drift (energy_rel, dnu_thz) for the next ``n_shots`` shots; advances the state."""
        xi = self._drift_rng.standard_normal((n_shots, 2))
        kick = self._drift_sigma * math.sqrt(1.0 - self._rho**2)
        states = np.empty((n_shots, 2))
        x = self._drift_x
        for i in range(n_shots):
            states[i] = x
            x = self._rho * x + kick * xi[i]
        self._drift_x = x
        self._shots += n_shots
        s = self.config.drift_scale
        return 1.0 + s * states[:, 0], s * states[:, 1]

    # ------------------------------------------------------------------ public measurement API
    def input_field(self) -> np.ndarray:
        """Shaped fundamental field on ``freq_thz`` for the current mask, without drift."""
        with self._lock:
            return self._trans * self._pulse(1.0, 0.0)

    def sh_psd(self) -> tuple[np.ndarray, np.ndarray]:
        """(SH frequency grid in THz, noiseless SH power spectral density in W/THz), no drift."""
        with self._lock:
            return self.sh_freq_thz.copy(), self._psd(self._sh_field(self.input_field(), self._crystal))

    def sh_spectrum(self, wavelengths_m=None, resolution_m=None) -> np.ndarray:
        """Noiseless SH power in the resolution bandwidth (W) on a wavelength axis: no drift, no
        detector (no noise, quantisation, compression or saturation). Pure: no shot is taken."""
        wl = self._true_wavelengths(self.default_wavelengths_m if wavelengths_m is None else wavelengths_m)
        res = self.config.resolution_m if resolution_m is None else resolution_m
        return self._instrument(self.sh_psd()[1], wl, res)

    def shot(self, wavelengths_m=None, resolution_m=None) -> tuple[np.ndarray, bool]:
        """One noisy measurement of the current mask: (power_W float64[S], saturated).
        Advances the drift by one shot."""
        wl = self._true_wavelengths(self.default_wavelengths_m if wavelengths_m is None else wavelengths_m)
        res = self.config.resolution_m if resolution_m is None else resolution_m
        with self._lock:
            energy, dnu = self._advance_drift(1)
            e = self._trans * self._pulse(energy[0], dnu[0])
            power = self._instrument(self._psd(self._sh_field(e, self._crystal)), wl, res)
            out, sat = self._detect(power)
        return out, bool(sat)

    def measure_batch(self, attn_db, phase_rad=None, wavelengths_m=None, resolution_m=None):
        """Per-channel masks (B, N) -> (power_W float64[B, S], saturated bool[B]). Identical to
        ``set_mask_channels(row); shot()`` for each row in turn; leaves the last row applied."""
        attn = np.atleast_2d(np.asarray(attn_db, dtype=float))
        ph = None if phase_rad is None else np.atleast_2d(np.asarray(phase_rad, dtype=float))
        trans = self.channel_transmission(attn, ph)
        wl = self._true_wavelengths(self.default_wavelengths_m if wavelengths_m is None else wavelengths_m)
        res = self.config.resolution_m if resolution_m is None else resolution_m
        b = trans.shape[0]
        outs, sats = [], []
        with self._lock:
            if b == 0:
                return np.zeros((0, np.asarray(wl).size)), np.zeros(0, dtype=bool)
            energy, dnu = self._advance_drift(b)
            for s in range(0, b, _CHUNK):  # chunks keep the FFT workspace in cache
                e = trans[s : s + _CHUNK] * self._pulse(energy[s : s + _CHUNK], dnu[s : s + _CHUNK])
                power = self._instrument(self._psd(self._sh_field(e, self._crystal)), wl, res)
                o, sat = self._detect(power)
                outs.append(o)
                sats.append(sat)
            self._trans = trans[-1].copy()
        return np.concatenate(outs), np.concatenate(sats)


def _good_fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < n:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best
