"""Physics of the simulated microwave bench: a 2D reverberant cavity with a programmable metasurface.

This module imports nothing from the rest of labpnn (numpy, scipy and stdlib only; threadpoolctl if
present); the VNA and metasurface-controller emulators drive it.

The model (coupled dipoles, in the spirit of PhysFad: Faqiri et al., IEEE TWC 2022)
==================================================================================
Normalised units inside: c = 1, frequency ``f`` = 1 at ``f0_hz`` (5 GHz), so the wavelength at f0 is
1 (6 cm) and ``k = 2 pi f``. Every object is a dipole ``i`` at ``r_i`` in the plane: the two antennas
(TX, RX), the walls (lines of non-resonant dipoles, which leak a little energy through their gaps
and absorb a little: that sets the cavity's Q), a few fixed scatterers inside, and ``n_meta``
meta-atoms lining the walls. The interaction matrix ``W`` (N x N, complex symmetric)::

    W_ii = [(2 pi f_res,i)^2 - (2 pi f)^2] / chi_i^2 + j [k^2/4 + 2 pi f gamma_i / chi_i^2]  (+ j Z0 at a port)
    W_ij = j (k^2/4) H0^(2)(k |r_i - r_j|) = (k^2/4) [Y0(k r) + j J0(k r)]                   (i != j)

Each meta-atom is a Lorentzian whose resonance ``f_res`` is set by its state ``s`` in
``0..n_states-1``: ``meta_f_res`` levels (ON resonant in band, OFF detuned above it; four states
interpolate), each atom with its own fabrication spread (``meta_spread``, per atom and state).

**Ports and passivity.** ``Z = -j W`` is an impedance matrix whose Hermitian part is
``Im W = (k^2/4) J0(k |r_i - r_j|) + diag(2 pi f gamma / chi^2)``: positive semidefinite, since
``J0(k|r|)`` is the Fourier transform of the uniform measure on the circle |q| = k (radiation only
carries power away) and gamma >= 0. The antennas are fed through ports of reference impedance ``Z0``
(``port_impedance``, default pi^2 = the antenna's radiation resistance k^2/4 at f0). Reducing Z to the
ports (a Schur complement keeps the Hermitian part PSD) and normalising to Z0 gives the scattering
matrix of the cavity::

    W' = W + j Z0 (on the two antenna diagonals)
    S = I - 2 j Z0 [W'^-1]_ports          (2 x 2)

which is symmetric (reciprocity, W = W^T) and contractive, ``||S||_2 <= 1``, for every configuration,
frequency and temperature (passivity, |S21| <= 1). ``S21 = -2 j Z0 [W'^-1]_rx,tx`` is PhysFad's channel
``H = W_rx,rx [W^-1]_rx,tx`` with the port loads made explicit and a scale that makes it a true S-parameter.
Because the meta-atoms scatter each other and the walls many times, S21 depends on the states
*nonlinearly* (the inverse of a matrix whose diagonal the states set).

**Why these parameters.** PhysFad's example meta-atoms (chi = 50, OFF at f_res = 5) change |H| by about
2 %: the radiation term swamps them. Here chi_meta = ``meta_chi`` (~1) and OFF sits just above the band, so
an ON atom is a near-resonant, strong scatterer and an OFF atom a weak one; random configurations span
>= 10 dB of |S21| at every frequency of the default band (see figures below).

**Fast solve.** Only the meta-atom diagonal depends on the configuration. Split the dipoles into the
others ``o`` (antennas, walls, scatterers) and the meta-atoms ``m``; per frequency (and temperature)
precompute ``A^-1`` (the ``o`` block, with the port loads), ``S0 = G_mm - B^T A^-1 B``,
``U = P A^-1 B`` and ``H0 = P A^-1 P^T`` (P: the antenna rows). A configuration with meta diagonal
``d`` then costs one ``n_meta x n_meta`` complex solve per frequency::

    [W'^-1]_ports = H0 + U (S0 + diag(d))^-1 U^T

(equal to direct inversion of the full W' to ~1e-14 relative; see the tests). ``channel_batch`` goes
further: per uniform configuration q (all atoms in state q) it also precomputes
``Sinv_q = (S0 + diag d_q)^-1``, and a configuration that differs from its most common state q in the
atoms K (|K| = k) costs a k x k solve (Woodbury)::

    u_rx^T S^-1 u_tx = u_rx^T Sinv_q u_tx - y_rx,K^T (I + diag(delta_K) Sinv_q,KK)^-1 (delta_K y_tx,K)

with ``y = Sinv_q u`` and delta the diagonal change. With two states k <= n_meta / 2 always; with four
states k is usually larger and the full solve is used. The solves run with BLAS limited to one thread
(threadpoolctl): on these small matrices a second OpenBLAS thread is up to 10x slower.

Outside the cavity
==================
- **Cables and calibration.** ``S_meas = C S C`` with ``C = diag(c_1, c_2)``,
  ``c_p = sqrt(g) exp(-j 2 pi f tau / 2)``: ``tau = cable_delay_s`` (total for the S21 path),
  ``g = 10^(cal_factor_db / 20)`` the amplitude of the uncorrected cables and adapters (<= 0 dB, so
  the measured S stays passive and reciprocal).
- **Thermal drift.** The aluminium cavity expands: every position scales by ``1 + alpha_al (T - T_ref)``
  (alpha_al = 23e-6 / K). The temperature ``T = ambient_k + x`` follows an Ornstein-Uhlenbeck process
  ``x`` in the simulated clock ``clock_s`` (standard deviation ``drift_rms_k``, correlation time
  ``drift_corr_s``; scaled by ``drift_scale``). ``measure`` advances ``clock_s`` by the sweep time of the
  VNA (points / IFBW x 1.2 + 3 ms); the emulator may advance ``clock_s`` itself (``advance_clock``).
  The physics sees ``T`` rounded to ``temperature_step_k`` (10 mK: a step changes S21 by ~5e-5 relative,
  below the VNA trace noise) so the per-frequency precompute is cached and reused across sweeps.
- **VNA noise** (Keysight PNA spec; never scaled up): ``S21_meas = S21 (1 + e_mult) + e_add``.
  Trace noise e_mult: magnitude 0.002 dB and phase 0.010 deg rms at 1 kHz IFBW, 0.005 dB / 0.035 deg at
  10 kHz, interpolated as power laws in IFBW (exponents log10 2.5 and log10 3.5), as independent real and
  imaginary parts (sigma_re = dB * ln10 / 20, sigma_im = deg * pi / 180). Noise floor e_add: complex
  Gaussian with power -108 dBm at 10 Hz IFBW + 10 dB per decade, relative to the source power
  ``power_dbm`` (E|e_add|^2 = 10^((floor_dbm - power_dbm) / 10)).
- **Model gap** (``model_gap``, 0 = the nominal model exactly, 1 = default): (a) the atoms' real
  resonances sit ``gap_level_shift`` (1 %) above the nominal levels and (b) their diodes lose
  ``1 + gap_extra_loss`` (2x) the nominal ``meta_gamma``; (c) an unlisted scatterer (a cable clamp) of
  strength ``gap_scatterer_chi`` near the RX antenna; (d) optional (``gap_crosstalk``, default 0) bias
  crosstalk: each resonance is pulled by its two neighbours' detuning from the mid level. All scale
  with ``model_gap``; none is in a model built with model_gap = 0. (d) makes every atom's diagonal
  depend on its neighbours, which disables the low-rank path below (a full solve per configuration).

Copies
======
``seed`` fixes the design (scatterer positions), the drift and noise streams. ``copy_seed`` picks the
fabricated copy: each copy draws its own meta-atom resonance spread (``meta_spread``) and, for copies
other than 0, moves the interior scatterers by ``copy_position_jitter`` (rms, wavelengths) and the
antennas by half that (remounting). ``copy_seed = 0`` is the nominal copy: design positions.

Default figures (``CavityConfig()``, 48 meta-atoms x 20 frequencies, measured with this code on the
2-core shared machine; checked in tests/test_metasurface_cavity.py)
--------------------------------------------------------------------------------------------------
- |S21| over random 1-bit configurations: 1st-99th percentile span median 21 dB over the 20
  frequencies (8 dB at the least sensitive one; 6,000 configurations).
- Nonlinearity (``meta_chi`` is the knob): least squares of |S21| on the 48 bits explains R^2 = 0.55 of
  the held-out variance (pooled; 5,000 configurations), least squares on the bits and all their
  pairwise products 0.79; the default twin (`labpnn.twin`) fitted on 4,000 / 12,000 configurations
  reaches R^2 0.82 / 0.92 (noiseless, 60 s fits). With meta_chi = 1.0 the same figures are 0.25 (linear),
  0.43 (pairwise) and ~0.4 (twin in dB): strongly nonlinear, but beyond what a calibration sweep can learn.
- Speed (one BLAS thread): ``channel_batch`` ~1,000-1,400 configurations/s (low-rank path), ~700-900/s
  with ``low_rank=False``; ``measure`` of one configuration ~1 ms plus the precompute (~0.1 s) each time
  the rounded temperature moves (~every 25 sweeps under default drift). Fast vs direct: ~1e-14.
- Drift: 0.18 % rms change of S21 per kelvin (linear for small dT); a 10 mK step: 2e-5.
- Passivity: max |S21| of the bare cavity (cal 0 dB) over 10^4 configurations at -3..+3 sigma of drift
  <= 1; the singular values of S never exceed 1.
- Copies: |S21| of copy 1 vs copy 0 over the same configurations correlates ~0.57 (median over
  frequencies); the default model gap moves |S21| by ~0.5 of its spread across configurations.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import numpy as np
from scipy.special import j0, y0

try:  # optional: limits BLAS to one thread around the small solves
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - the solves still work, only slower with >1 BLAS thread
    ThreadpoolController = None

__all__ = ["ALPHA_AL_PER_K", "CavityConfig", "MetasurfaceCavity", "vna_noise_sigmas"]

ALPHA_AL_PER_K = 23e-6  # linear expansion of aluminium
_TWO_PI = 2.0 * math.pi
_CHUNK_ELEMENTS = 1 << 19  # complex entries per batched solve chunk (~8 MB)


@dataclass(frozen=True)
class CavityConfig:
    """The default cavity (see the module docstring). Lengths are in wavelengths at ``f0_hz``,
    frequencies normalised to ``f0_hz``. Test knobs: ``drift_scale``, ``model_gap``, ``seed``,
    ``copy_seed``, ``gap_crosstalk``; the rest describes the hardware (set temperature on the instance)."""

    # metasurface
    n_meta: int = 48  #: meta-atoms (>= 40)
    n_states: int = 2  #: resonance states per atom (2: 1 bit; 4: 2 bits)
    meta_f_res: tuple[float, float] = (0.95, 1.25)  #: resonance of state 0 (ON) and of the last state (OFF)
    #: oscillator strength of a meta-atom (PhysFad: 50 -> the atoms barely matter; 1.0: |S21| of 48 atoms
    #: so nonlinear in the bits that a twin fitted on 12k configurations explains only ~0.4 of it; 0.6: the
    #: bits still act nonlinearly (a linear model explains ~0.55) and a twin can learn them)
    meta_chi: float = 0.6
    meta_gamma: float = 0.05  #: meta-atom absorption (diode loss)
    meta_spread: float = 0.01  #: rms relative fabrication spread of each atom's resonances (per copy)
    meta_pitch: float = 0.2  #: spacing along the walls
    meta_offset: float = 0.15  #: distance of the metasurface from the walls
    # frequency
    f0_hz: float = 5e9  #: normalised frequency 1 <-> f0_hz
    band_start_hz: float = 4.5e9  #: default VNA band
    band_stop_hz: float = 5.5e9
    n_points: int = 20  #: default VNA points
    # cavity
    cavity_size: tuple[float, float] = (4.0, 3.0)  #: inner size (x, y) in wavelengths at f0
    wall_spacing: float = 0.3  #: wall dipole spacing (tighter = less leakage = more reverberant)
    wall_f_res: float = 10.0  #: walls: non-resonant dipoles (PhysFad values)
    wall_chi: float = 50.0
    wall_gamma: float = 0.0  #: wall absorption (finite conductivity)
    n_scatterers: int = 5  #: fixed scatterers inside (positions from ``seed``)
    scatterer_f_res: float = 10.0
    scatterer_chi: float = 50.0
    tx_pos: tuple[float, float] = (1.1, 1.9)
    rx_pos: tuple[float, float] = (2.9, 1.1)
    antenna_f_res: float = 1.0
    antenna_chi: float = 0.5
    port_impedance: float = math.pi**2  #: Z0 (normalised units): k^2/4 at f0, matched antennas
    # outside the cavity
    cable_delay_s: float = 6e-9  #: total delay of the S21 path (two ~0.6 m cables)
    cal_factor_db: float = -3.0  #: uncorrected cable/adapter insertion loss of the S21 path (<= 0)
    # thermal drift
    ambient_k: float = 295.15  #: temperature at which the geometry is nominal
    alpha_per_k: float = ALPHA_AL_PER_K
    drift_rms_k: float = 0.5  #: stationary rms of the temperature wander (a lab with HVAC cycling)
    drift_corr_s: float = 3600.0  #: its correlation time
    drift_scale: float = 1.0
    temperature_step_k: float = 0.01  #: the physics sees T rounded to this (precompute cache)
    # model gap (0: nominal model exactly)
    model_gap: float = 1.0
    gap_level_shift: float = 0.01  #: the atoms' real resonances sit this much (relative) above nominal
    gap_extra_loss: float = 1.0  #: the diodes' real loss is meta_gamma x (1 + this)
    gap_crosstalk: float = 0.0  #: neighbour-bias pull on a resonance (off by default: costs the fast path)
    gap_scatterer_chi: float = 10.0  #: unlisted scatterer near RX (strength x model_gap)
    # copies
    seed: int = 0
    copy_seed: int = 0
    copy_position_jitter: float = 0.05  #: rms scatterer displacement of copies != 0 (wavelengths)

    def __post_init__(self):
        if self.n_meta < 1 or self.n_states < 2:
            raise ValueError("n_meta >= 1 and n_states >= 2 required")
        if not (self.f0_hz > 0 and 0 < self.band_start_hz < self.band_stop_hz and self.n_points >= 1):
            raise ValueError("need f0_hz > 0, 0 < band_start_hz < band_stop_hz, n_points >= 1")
        if self.cal_factor_db > 0:
            raise ValueError("cal_factor_db must be <= 0 dB (passive cables)")
        if min(self.meta_chi, self.wall_chi, self.scatterer_chi, self.antenna_chi, self.port_impedance) <= 0:
            raise ValueError("oscillator strengths and port impedance must be positive")
        if min(self.meta_gamma, self.wall_gamma, self.meta_spread, self.drift_rms_k, self.drift_scale,
               self.model_gap, self.copy_position_jitter, self.cable_delay_s) < 0:
            raise ValueError("losses, spreads, drift, gap, jitter and delay must be non-negative")
        if not (self.temperature_step_k > 0 and self.drift_corr_s > 0):
            raise ValueError("temperature_step_k and drift_corr_s must be positive")
        lx, ly = self.cavity_size
        if not (lx > 2 * self.meta_offset and ly > 2 * self.meta_offset):
            raise ValueError("cavity too small for the metasurface offset")
        if self.n_meta * self.meta_pitch > 2 * (lx + ly - 4 * self.meta_offset):
            raise ValueError("n_meta * meta_pitch exceeds the inner perimeter")

    @property
    def default_freqs_hz(self) -> np.ndarray:
        return np.linspace(self.band_start_hz, self.band_stop_hz, self.n_points)


def vna_noise_sigmas(if_bandwidth_hz: float, power_dbm: float) -> tuple[float, float, float]:
    """(sigma of Re e_mult, sigma of Im e_mult, sigma of Re and of Im e_add) for a PNA-class VNA
    at this IF bandwidth and source power (see the module docstring)."""
    if not (if_bandwidth_hz > 0 and math.isfinite(if_bandwidth_hz)):
        raise ValueError("if_bandwidth_hz must be positive")
    if not math.isfinite(power_dbm):
        raise ValueError("power_dbm must be finite")
    decades = math.log10(if_bandwidth_hz / 1e3)
    trace_db = 0.002 * 2.5**decades
    trace_deg = 0.010 * 3.5**decades
    floor_dbm = -108.0 + 10.0 * math.log10(if_bandwidth_hz / 10.0)
    add_power = 10.0 ** ((floor_dbm - power_dbm) / 10.0)
    return trace_db * math.log(10.0) / 20.0, math.radians(trace_deg), math.sqrt(add_power / 2.0)


@dataclass
class _Precomputed:
    """Everything but the meta-atom diagonal, per frequency (F frequencies, M meta-atoms, Q states)."""

    f: np.ndarray  # (F,) normalised frequencies
    s0: np.ndarray  # (F, M, M) G_mm - B^T A^-1 B
    u: np.ndarray  # (F, 2, M) P A^-1 B
    h0: np.ndarray  # (F, 2, 2) P A^-1 P^T
    cable: np.ndarray  # (F, 2) c_1, c_2
    # low-rank path: per uniform base configuration q (every atom in state q)
    d_base: np.ndarray  # (Q, F, M) meta diagonal of the base
    sinv_base: np.ndarray  # (Q, F, M, M) (S0 + diag d_base)^-1
    y_tx: np.ndarray  # (Q, F, M) sinv_base u_tx
    y_rx: np.ndarray  # (Q, F, M) sinv_base u_rx
    beta: np.ndarray  # (Q, F) u_rx . y_tx


class MetasurfaceCavity:
    """The cavity, its cables and drift. Stateful (temperature, clock); thread-safe."""

    def __init__(self, config: CavityConfig | None = None):
        cfg = config if config is not None else CavityConfig()
        self.config = cfg
        self.n_meta = cfg.n_meta
        self.n_states = cfg.n_states
        self._lock = threading.RLock()
        design_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
        copy_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1, cfg.copy_seed]))
        drift_seq, noise_seq = np.random.SeedSequence([cfg.seed, 2]).spawn(2)
        self._drift_rng = np.random.default_rng(drift_seq)
        self._noise_rng = np.random.default_rng(noise_seq)
        self._build_geometry(design_rng, copy_rng)
        self._drift_x = 0.0
        self.clock_s = 0.0  #: simulated time (s); ``measure`` and ``advance_clock`` move it
        self._cache: dict = {}

    # ------------------------------------------------------------------ geometry
    def _build_geometry(self, design_rng: np.random.Generator, copy_rng: np.random.Generator) -> None:
        cfg = self.config
        lx, ly = cfg.cavity_size
        walls = _rectangle_points(0.0, 0.0, lx, ly, cfg.wall_spacing)
        antennas = np.array([cfg.tx_pos, cfg.rx_pos], dtype=float)
        # meta-atoms along the inner perimeter, starting at a corner, centred on their pitch cells
        o = cfg.meta_offset
        arc = (np.arange(cfg.n_meta) + 0.5) * cfg.meta_pitch
        meta = _along_rectangle(o, o, lx - o, ly - o, arc)
        # interior scatterers: away from walls, antennas and each other
        scatterers = []
        while len(scatterers) < cfg.n_scatterers:
            p = design_rng.uniform([0.6, 0.6], [lx - 0.6, ly - 0.6])
            others = np.array(scatterers + [cfg.tx_pos, cfg.rx_pos]).reshape(-1, 2)
            if np.min(np.hypot(*(others - p).T)) > 0.5:
                scatterers.append(p)
        scatterers = np.array(scatterers).reshape(-1, 2)
        # this copy's fabrication: resonance spread (every copy), positions (copies != 0)
        spread = copy_rng.standard_normal((cfg.n_meta, cfg.n_states))
        jitter_s = copy_rng.standard_normal(scatterers.shape)
        jitter_a = copy_rng.standard_normal(antennas.shape)
        if cfg.copy_seed != 0:
            scatterers = scatterers + cfg.copy_position_jitter * jitter_s
            antennas = antennas + 0.5 * cfg.copy_position_jitter * jitter_a
        levels = np.linspace(cfg.meta_f_res[0], cfg.meta_f_res[1], cfg.n_states)
        levels = levels * (1.0 + cfg.model_gap * cfg.gap_level_shift)
        self.meta_f_res = levels[None, :] * (1.0 + cfg.meta_spread * spread)  #: (n_meta, n_states), actual
        self._mid_level = float(levels.mean())
        self._meta_gamma = cfg.meta_gamma * (1.0 + cfg.model_gap * cfg.gap_extra_loss)
        # the other dipoles: antennas (ports) first, walls, scatterers, the gap scatterer
        f_res = [np.full(2, cfg.antenna_f_res), np.full(len(walls), cfg.wall_f_res),
                 np.full(len(scatterers), cfg.scatterer_f_res)]
        chi = [np.full(2, cfg.antenna_chi), np.full(len(walls), cfg.wall_chi),
               np.full(len(scatterers), cfg.scatterer_chi)]
        gamma = [np.zeros(2), np.full(len(walls), cfg.wall_gamma), np.zeros(len(scatterers))]
        pos = [antennas, walls, scatterers]
        if cfg.model_gap > 0 and cfg.gap_scatterer_chi > 0:
            pos.append(np.array([[cfg.rx_pos[0] + 0.35, cfg.rx_pos[1] + 0.2]]))
            f_res.append(np.array([cfg.scatterer_f_res]))
            chi.append(np.array([cfg.gap_scatterer_chi * cfg.model_gap]))
            gamma.append(np.zeros(1))
        self.other_positions = np.concatenate(pos)  #: (n_other, 2) antennas first, at T_ref
        self.meta_positions = meta  #: (n_meta, 2) at T_ref
        self._other_f_res = np.concatenate(f_res)
        self._other_chi = np.concatenate(chi)
        self._other_gamma = np.concatenate(gamma)
        self._port_load = np.zeros(len(self.other_positions))
        self._port_load[:2] = cfg.port_impedance
        # neighbours along the metasurface line (crosstalk of the bias lines)
        n = cfg.n_meta
        self._left = np.r_[0, np.arange(n - 1)]
        self._right = np.r_[np.arange(1, n), n - 1]
        self._has_left = (np.arange(n) > 0).astype(float)
        self._has_right = (np.arange(n) < n - 1).astype(float)

    # ------------------------------------------------------------------ temperature and clock
    @property
    def temperature_k(self) -> float:
        """Cavity temperature (K). Settable; ``measure`` lets it drift from there."""
        return self.config.ambient_k + self._drift_x

    @temperature_k.setter
    def temperature_k(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError("temperature must be a positive number of kelvin")
        with self._lock:
            self._drift_x = value - self.config.ambient_k

    def advance_clock(self, seconds: float) -> None:
        """Advance the simulated clock, letting the temperature drift (exact OU step)."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError("seconds must be >= 0")
        cfg = self.config
        with self._lock:
            self.clock_s += seconds
            sigma = cfg.drift_rms_k * cfg.drift_scale
            if sigma > 0 and seconds > 0:
                rho = math.exp(-seconds / cfg.drift_corr_s)
                self._drift_x = rho * self._drift_x + sigma * math.sqrt(1 - rho**2) * self._drift_rng.standard_normal()

    def _effective_scale(self) -> tuple[float, float]:
        """(rounded temperature, geometry scale factor) the physics sees."""
        cfg = self.config
        step = cfg.temperature_step_k
        t = round(self.temperature_k / step) * step
        return t, 1.0 + cfg.alpha_per_k * (t - cfg.ambient_k)

    # ------------------------------------------------------------------ matrices
    def _freqs(self, freqs_hz) -> np.ndarray:
        f = np.asarray(freqs_hz, dtype=float)
        if f.ndim != 1 or f.size < 1 or not np.all(np.isfinite(f)) or np.any(f <= 0):
            raise ValueError("freqs_hz must be a non-empty 1-D array of positive frequencies")
        return f / self.config.f0_hz

    def _states(self, states) -> np.ndarray:
        s = np.asarray(states)
        if s.shape[-1:] != (self.n_meta,):
            raise ValueError(f"states must have {self.n_meta} entries per configuration, got shape {s.shape}")
        if not np.issubdtype(s.dtype, np.integer):
            if not np.all(np.isfinite(s)) or np.any(s != np.round(s)):
                raise ValueError("states must be integers")
            s = s.astype(np.int64)
        if np.any(s < 0) or np.any(s >= self.n_states):
            raise ValueError(f"states must lie in 0..{self.n_states - 1}")
        return s

    def meta_resonances(self, states) -> np.ndarray:
        """Resonance of each meta-atom (..., n_meta) for states (..., n_meta), with the crosstalk gap."""
        s = self._states(states)
        fr = np.take_along_axis(np.broadcast_to(self.meta_f_res, s.shape[:-1] + self.meta_f_res.shape),
                                s[..., None], axis=-1)[..., 0]
        g = self.config.model_gap * self.config.gap_crosstalk
        if g:
            det = fr - self._mid_level
            fr = fr + g * (det[..., self._left] * self._has_left + det[..., self._right] * self._has_right)
        return fr

    def _meta_diag(self, fr: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Meta-atom inverse polarisabilities: resonances (..., M), frequencies (F,) -> (..., F, M)."""
        cfg = self.config
        chi2 = cfg.meta_chi**2
        fr2 = fr[..., None, :] ** 2
        f_ = f[:, None]
        k2 = (_TWO_PI * f_) ** 2
        return _TWO_PI**2 * (fr2 - f_**2) / chi2 + 1j * (k2 / 4 + _TWO_PI * f_ * self._meta_gamma / chi2)

    def _other_diag(self, f: np.ndarray) -> np.ndarray:
        """(F, n_other) inverse polarisabilities of the fixed dipoles, port loads included."""
        f_ = f[:, None]
        chi2 = self._other_chi**2
        return (_TWO_PI**2 * (self._other_f_res**2 - f_**2) / chi2
                + 1j * ((_TWO_PI * f_) ** 2 / 4 + _TWO_PI * f_ * self._other_gamma / chi2 + self._port_load))

    def _green(self, pa: np.ndarray, pb: np.ndarray, f: np.ndarray, same: bool) -> np.ndarray:
        """Couplings (F, len(pa), len(pb)): (k^2/4) [Y0(kr) + j J0(kr)]; zero diagonal when ``same``."""
        r = np.hypot(pa[:, None, 0] - pb[None, :, 0], pa[:, None, 1] - pb[None, :, 1])
        if same:
            np.fill_diagonal(r, 1.0)  # placeholder, zeroed below
        kr = _TWO_PI * f[:, None, None] * r[None]
        g = ((_TWO_PI * f[:, None, None]) ** 2 / 4) * (y0(kr) + 1j * j0(kr))
        if same:
            idx = np.arange(len(pa))
            g[:, idx, idx] = 0.0
        return g

    def _cable(self, f: np.ndarray) -> np.ndarray:
        cfg = self.config
        amp = 10.0 ** (cfg.cal_factor_db / 40.0)  # half the loss in each cable
        c = amp * np.exp(-1j * math.pi * f * cfg.f0_hz * cfg.cable_delay_s)  # half the delay each
        return np.stack([c, c], axis=-1)

    def _precompute(self, f: np.ndarray) -> _Precomputed:
        t, scale = self._effective_scale()
        key = (t, f.size, hash(f.tobytes()))
        pre = self._cache.get(key)
        if pre is not None:
            return pre
        po, pm = self.other_positions * scale, self.meta_positions * scale
        a = self._green(po, po, f, same=True)
        idx = np.arange(len(po))
        a[:, idx, idx] = self._other_diag(f)
        b = self._green(po, pm, f, same=False)
        g_mm = self._green(pm, pm, f, same=True)
        m = self.n_meta
        uniform = np.repeat(np.arange(self.n_states), m).reshape(self.n_states, m)
        d_base = self._meta_diag(self.meta_resonances(uniform), f)  # (Q, F, M)
        with _one_blas_thread():  # every product here is small: one BLAS thread, contiguous operands
            ainv_b = np.linalg.solve(a, b)  # (F, O, M)
            ainv_p = np.linalg.solve(a, np.broadcast_to(np.eye(len(po))[:, :2], (f.size, len(po), 2)))
            s0 = g_mm - np.ascontiguousarray(np.swapaxes(b, 1, 2)) @ ainv_b
            s0 = 0.5 * (s0 + np.swapaxes(s0, 1, 2))  # exactly symmetric (it is, up to rounding)
            u = np.ascontiguousarray(np.swapaxes(ainv_p, 1, 2)) @ b  # (F, 2, M)
            base = np.broadcast_to(s0, d_base.shape[:1] + s0.shape).copy()
            base[..., np.arange(m), np.arange(m)] += d_base
            sinv_base = np.linalg.inv(base)
            y = sinv_base @ np.ascontiguousarray(np.swapaxes(u, 1, 2))  # (Q, F, M, 2)
        pre = _Precomputed(f=f.copy(), s0=s0, u=u, h0=ainv_p[:, :2, :], cable=self._cable(f),
                           d_base=d_base, sinv_base=sinv_base, y_tx=y[..., 0], y_rx=y[..., 1],
                           beta=np.einsum("fm,qfm->qf", u[:, 1, :], y[..., 0]))
        if len(self._cache) >= 8:
            self._cache.clear()
        self._cache[key] = pre
        return pre

    def _low_rank_transfer(self, states: np.ndarray, d: np.ndarray, pre: _Precomputed) -> np.ndarray | None:
        """[W'^-1]_rx,tx (B, F) by a low-rank (Woodbury) update of the nearest uniform configuration:
        with K the atoms whose diagonal differs from base q by delta,
        ``u_rx^T S^-1 u_tx = beta_q - y_rx,K^T (I + diag(delta) Sinv_q,KK)^-1 (delta * y_tx,K)``,
        a k x k solve, k <= n_meta (1 - 1/n_states). None when k would exceed n_meta / 2 (a full
        solve is then cheaper)."""
        bsz, nf, m = d.shape
        counts = np.stack([(states == q).sum(axis=1) for q in range(self.n_states)], axis=1)
        base = np.argmax(counts, axis=1)  # (B,)
        changed = states != base[:, None]  # (B, M)
        if self.config.model_gap * self.config.gap_crosstalk:  # a neighbour's state moves a resonance
            changed = changed | changed[:, self._left] | changed[:, self._right]
        k = int(changed.sum(axis=1).max()) if bsz else 0
        if k > m // 2:
            return None
        delta = np.where(changed[:, None, :], d - pre.d_base[base], 0.0)  # (B, F, M)
        if k == 0:
            return pre.beta[base]
        # the changed atoms first, padded with atoms whose delta is 0 (identity rows: no effect)
        order = np.argsort(~changed, axis=1, kind="stable")[:, :k]  # (B, k)
        fidx = np.arange(nf)[None, :, None]
        bq = base[:, None, None]
        dk = np.take_along_axis(delta, order[:, None, :], axis=2)  # (B, F, k)
        ytx = pre.y_tx[bq, fidx, order[:, None, :]]  # (B, F, k)
        yrx = pre.y_rx[bq, fidx, order[:, None, :]]
        # Sinv_q[f, K, K] through flat indices (faster than four-way fancy indexing)
        lin = order[:, :, None] * m + order[:, None, :]  # (B, k, k)
        offset = (base[:, None] * nf + np.arange(nf)[None, :]) * (m * m)  # (B, F)
        sub = pre.sinv_base.reshape(-1)[offset[:, :, None, None] + lin[:, None]]
        mat = dk[..., :, None] * sub
        mat[..., np.arange(k), np.arange(k)] += 1.0
        z = np.linalg.solve(mat, (dk * ytx)[..., None])[..., 0]
        return pre.beta[base] - np.einsum("bfk,bfk->bf", yrx, z)

    def _ports_inverse(self, states: np.ndarray, f: np.ndarray, rhs: str,
                       low_rank: bool = True) -> tuple[np.ndarray, _Precomputed]:
        """[W'^-1] at the ports via the Schur complement: (B, F, 2, 2) if rhs == 'both', else the
        (rx, tx) entry (B, F). ``states`` (B, n_meta)."""
        pre = self._precompute(f)
        if self.config.model_gap * self.config.gap_crosstalk:
            d = self._meta_diag(self.meta_resonances(states), f)  # (B, F, M)
        else:  # each atom's diagonal depends on its own state only: gather from the base table
            d = np.take_along_axis(pre.d_base[None], states[:, None, None, :], axis=1)[:, 0]
        bsz, nf, m = d.shape
        u_t = np.swapaxes(pre.u, 1, 2)  # (F, M, 2)
        ncol = 2 if rhs == "both" else 1
        out = np.empty((bsz, nf, 2, 2) if rhs == "both" else (bsz, nf), dtype=complex)
        diag = np.arange(m)
        with _one_blas_thread():
            if rhs != "both" and low_rank:
                chunk = max(1, 4 * _CHUNK_ELEMENTS // (nf * m * m))
                for s in range(0, bsz, chunk):
                    part = self._low_rank_transfer(states[s : s + chunk], d[s : s + chunk], pre)
                    if part is None:
                        break
                    out[s : s + chunk] = pre.h0[:, 1, 0] + part
                else:
                    return out, pre
                start = s
            else:
                start = 0
            chunk = max(1, _CHUNK_ELEMENTS // (nf * m * m))
            for s in range(start, bsz, chunk):
                mat = np.broadcast_to(pre.s0, (min(chunk, bsz - s),) + pre.s0.shape).copy()
                mat[..., diag, diag] += d[s : s + chunk]
                x = np.linalg.solve(mat, np.broadcast_to(u_t[..., :ncol], mat.shape[:2] + (m, ncol)))
                if rhs == "both":
                    out[s : s + chunk] = pre.h0 + pre.u @ x
                else:  # U[rx] . x[:, tx]
                    out[s : s + chunk] = pre.h0[:, 1, 0] + np.einsum("fm,bfm->bf", pre.u[:, 1, :], x[..., 0])
        return out, pre

    # ------------------------------------------------------------------ public API
    def channel_batch(self, states, freqs_hz, *, low_rank: bool = True) -> np.ndarray:
        """Noiseless S21 (complex128[B, F]) for configurations (int[B, n_meta]) at the current
        temperature, with cable delay and calibration factor. ``low_rank=False`` forces the
        n_meta x n_meta solve per frequency (the low-rank update is used when it is cheaper)."""
        s = self._states(states)
        if s.ndim != 2:
            raise ValueError("states must be 2-D (B, n_meta)")
        f = self._freqs(freqs_hz)
        with self._lock:
            inv, pre = self._ports_inverse(s, f, rhs="tx", low_rank=low_rank)
        return -2j * self.config.port_impedance * inv * pre.cable[:, 0] * pre.cable[:, 1]

    def channel(self, states, freqs_hz) -> np.ndarray:
        """Noiseless S21 (complex128[F]) for one configuration (int[n_meta] in 0..n_states-1).
        The per-frequency precompute is cached per grid and temperature."""
        s = self._states(states)
        if s.ndim != 1:
            raise ValueError("states must be 1-D (n_meta,)")
        return self.channel_batch(s[None], freqs_hz)[0]

    def s_matrix(self, states, freqs_hz) -> np.ndarray:
        """Full 2-port S (complex128[F, 2, 2], port 1 = TX, port 2 = RX) as the VNA sees it
        (cables included): symmetric and contractive."""
        s = self._states(states)
        f = self._freqs(freqs_hz)
        with self._lock:
            inv, pre = self._ports_inverse(s.reshape(1, -1), f, rhs="both")
        cavity = np.eye(2) - 2j * self.config.port_impedance * inv[0]
        return pre.cable[:, :, None] * cavity * pre.cable[:, None, :]

    def direct_channel(self, states, freqs_hz) -> np.ndarray:
        """S21 (complex128[F]) by solving the full N x N system per frequency: no precompute,
        no Schur complement (the reference for the fast path)."""
        s = self._states(states)
        if s.ndim != 1:
            raise ValueError("states must be 1-D (n_meta,)")
        f = self._freqs(freqs_hz)
        with self._lock:
            _, scale = self._effective_scale()
            pos = np.concatenate([self.other_positions, self.meta_positions]) * scale
            w = self._green(pos, pos, f, same=True)
            idx = np.arange(len(pos))
            w[:, idx, idx] = np.concatenate([self._other_diag(f), self._meta_diag(self.meta_resonances(s), f)],
                                            axis=-1)
            rhs = np.zeros((f.size, len(pos), 1), dtype=complex)
            rhs[:, 0, 0] = 1.0  # drive the TX port
            with _one_blas_thread():
                x = np.linalg.solve(w, rhs)[:, 1, 0]
            cable = self._cable(f)
        return -2j * self.config.port_impedance * x * cable[:, 0] * cable[:, 1]

    def sweep_time_s(self, n_points: int, if_bandwidth_hz: float) -> float:
        """VNA sweep duration: points / IFBW x 1.2 + 3 ms."""
        return n_points / if_bandwidth_hz * 1.2 + 3e-3

    def measure(self, states, freqs_hz, *, if_bandwidth_hz: float, power_dbm: float,
                rng: np.random.Generator | None = None) -> np.ndarray:
        """S21 (complex128[F]) as a VNA reads it: ``channel * (1 + e_mult) + e_add`` from the PNA spec
        at this IFBW and source power. The sweep sees the temperature at its start, then advances the
        simulated clock (``clock_s``) by the sweep time, letting the temperature drift. Noise comes
        from ``rng`` if given, else from the cavity's own stream (deterministic given ``seed``)."""
        sig_re, sig_im, sig_add = vna_noise_sigmas(if_bandwidth_hz, power_dbm)
        with self._lock:
            s21 = self.channel(states, freqs_hz)
            gen = rng if rng is not None else self._noise_rng
            z = gen.standard_normal((4, s21.size))
            self.advance_clock(self.sweep_time_s(s21.size, if_bandwidth_hz))
        mult = sig_re * z[0] + 1j * sig_im * z[1]
        return s21 * (1.0 + mult) + sig_add * (z[2] + 1j * z[3])


# ---------------------------------------------------------------------- helpers
_controller = None
_controller_lock = threading.Lock()


@contextlib.contextmanager
def _one_blas_thread():
    """BLAS limited to one thread. One controller, made once: `threadpool_limits()` rescans the loaded
    libraries on every call (~0.6 ms, as much as a whole one-configuration sweep)."""
    global _controller
    if ThreadpoolController is None:  # pragma: no cover
        yield
        return
    if _controller is None:
        with _controller_lock:
            if _controller is None:
                _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


def _rectangle_points(x0: float, y0_: float, x1: float, y1: float, spacing: float) -> np.ndarray:
    """Points around a rectangle's perimeter, about ``spacing`` apart, one at each corner."""
    pts = []
    for (ax, ay), (bx, by) in (((x0, y0_), (x1, y0_)), ((x1, y0_), (x1, y1)), ((x1, y1), (x0, y1)),
                               ((x0, y1), (x0, y0_))):
        n = max(1, int(math.ceil(math.hypot(bx - ax, by - ay) / spacing)))
        t = np.arange(n) / n
        pts.append(np.stack([ax + (bx - ax) * t, ay + (by - ay) * t], axis=-1))
    return np.concatenate(pts)


def _along_rectangle(x0: float, y0_: float, x1: float, y1: float, arc: np.ndarray) -> np.ndarray:
    """Points at arc lengths ``arc`` along a rectangle's perimeter, from (x0, y0) counter-clockwise."""
    lx, ly = x1 - x0, y1 - y0_
    a = np.mod(arc, 2 * (lx + ly))
    x = np.where(a < lx, x0 + a, np.where(a < lx + ly, x1, np.where(a < 2 * lx + ly, x1 - (a - lx - ly), x0)))
    y = np.where(a < lx, y0_, np.where(a < lx + ly, y0_ + (a - lx), np.where(a < 2 * lx + ly, y1,
                                                                               y1 - (a - 2 * lx - ly))))
    return np.stack([x, y], axis=-1)
