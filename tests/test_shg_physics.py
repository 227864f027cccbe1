"""Physics of the simulated optical bench (labpnn.sim_instruments.shg), no sockets."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from labpnn.sim_instruments.shg import C_M_PER_S, OpticalBenchConfig, SHGBench

QUIET = OpticalBenchConfig(noise_scale=0.0, drift_scale=0.0)


def _direct_sh_psd(bench: SHGBench) -> np.ndarray:
    """The documented equation, evaluated as the direct double sum with the exact sinc."""
    e = bench.input_field()
    d = bench.freq_thz - bench.config.center_thz
    t1, t2 = bench.crystal_delays_ps
    y = t1 * d[:, None] + t2 * d[None, :]
    pairs = e[:, None] * e[None, :] * np.exp(1j * np.pi * y) * np.sinc(y)
    n = e.size
    flipped = pairs[:, ::-1]  # anti-diagonals of `pairs` (nu1 + nu2 = const) become diagonals
    esh = np.array([np.trace(flipped, offset=n - 1 - k) for k in range(2 * n - 1)]) * bench.config.grid_step_thz
    return np.abs(esh) ** 2


def _moments(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    mean = float((x * w).sum() / w.sum())
    return mean, float(np.sqrt(((x - mean) ** 2 * w).sum() / w.sum()))


# ----------------------------------------------------------------------------- the SH model
def test_sh_energy_scales_as_fourth_power_of_amplitude():
    bench = SHGBench(QUIET)
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 6, bench.config.n_channels)
    phase = rng.uniform(-np.pi, np.pi, bench.config.n_channels)
    energies = {}
    for a in (1.0, 0.7, 0.5, 0.2):
        bench.set_mask_channels(base - 20 * np.log10(a), phase)
        energies[a] = bench.sh_psd()[1].sum()
    for a in (0.7, 0.5, 0.2):
        assert energies[a] / energies[1.0] == pytest.approx(a**4, rel=1e-9)


def test_thin_crystal_gives_gaussian_autoconvolution():
    # a narrower pulse than the default so the band edges do not truncate the Gaussian
    cfg = replace(QUIET, t1_ps=0.0, t2_ps=0.0, model_gap=False, fwhm_thz=0.6)
    bench = SHGBench(cfg)
    fund_mean, fund_std = _moments(bench.freq_thz, np.abs(bench.input_field()) ** 2)
    sh_f, psd = bench.sh_psd()
    sh_mean, sh_std = _moments(sh_f, psd)
    assert fund_mean == pytest.approx(cfg.center_thz, abs=1e-6)
    assert sh_mean == pytest.approx(2 * fund_mean, abs=1e-6)
    assert sh_std == pytest.approx(np.sqrt(2) * fund_std, rel=1e-3)
    assert fund_std * 2 * np.sqrt(2 * np.log(2)) == pytest.approx(cfg.fwhm_thz, rel=2e-3)
    # half maximum of the SH spectrum sits at sqrt(2) * FWHM / 2 from the centre
    half = psd.max() / 2
    above = sh_f[psd >= half]
    assert above[-1] - above[0] == pytest.approx(np.sqrt(2) * cfg.fwhm_thz, abs=2 * cfg.grid_step_thz)
    # and the spectrometer sees it at half the fundamental wavelength
    wl = bench.default_wavelengths_m
    peak = wl[np.argmax(bench.sh_spectrum())]
    assert peak == pytest.approx(C_M_PER_S / (2 * cfg.center_thz * 1e12), abs=0.03e-9)


@pytest.mark.parametrize("gap", [False, True])
def test_sliced_crystal_matches_direct_sum(gap):
    bench = SHGBench(replace(QUIET, model_gap=gap))
    rng = np.random.default_rng(2)
    for attn, phase in [(np.zeros(64), None), (rng.uniform(0, 15, 64), rng.uniform(-3, 3, 64))]:
        bench.set_mask_channels(attn, phase)
        fast = bench.sh_psd()[1]
        direct = _direct_sh_psd(bench)
        fast_n, direct_n = fast / fast.max(), direct / direct.max()
        assert np.abs(fast_n - direct_n).max() < 1e-5


def test_phase_matching_weight_depends_on_the_pair():
    """T1 != T2: the SH is not a filtered autoconvolution (a filter on Omega only)."""
    cfg = replace(QUIET, model_gap=False)
    mean_t = (cfg.t1_ps + cfg.t2_ps) / 2
    thin = SHGBench(replace(cfg, t1_ps=0.0, t2_ps=0.0))
    sym = SHGBench(replace(cfg, t1_ps=mean_t, t2_ps=mean_t))
    asym = SHGBench(cfg)
    rng = np.random.default_rng(3)
    core = slice(300, 467)  # SH bins around the centre, where the thin-crystal SH is bright
    ratios = {"sym": [], "asym": []}
    for _ in range(2):
        attn, phase = rng.uniform(0, 10, 64), rng.uniform(-2, 2, 64)
        for b in (thin, sym, asym):
            b.set_mask_channels(attn, phase)
        ref = thin.sh_psd()[1][core]
        ratios["sym"].append(sym.sh_psd()[1][core] / ref)
        ratios["asym"].append(asym.sh_psd()[1][core] / ref)
    # equal delays: dk depends on Omega only, so the crystal acts as a fixed filter ...
    assert np.allclose(ratios["sym"][0], ratios["sym"][1], rtol=1e-6)
    # ... unequal delays weight each pair differently: no fixed filter explains the output
    assert np.abs(ratios["asym"][0] / ratios["asym"][1] - 1).max() > 0.01


def test_crystal_length_sets_acceptance_bandwidth():
    widths = []
    for scale in (0.0, 1.0, 2.0):
        cfg = replace(QUIET, model_gap=False, t1_ps=0.55 * scale, t2_ps=0.25 * scale)
        f, psd = SHGBench(cfg).sh_psd()
        widths.append(_moments(f, psd)[1])
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[0] == pytest.approx(0.75, abs=0.15)  # comparable to the pulse bandwidth


# ----------------------------------------------------------------------------- masks
def test_profile_and_channel_masks_agree():
    a = SHGBench(QUIET)
    b = SHGBench(QUIET)
    rng = np.random.default_rng(4)
    attn = rng.uniform(0, 30, 64)
    attn[5] = 45.0  # above 40 dB: blocked
    attn[6] = np.inf
    phase = rng.uniform(-3, 3, 64)
    a.set_mask_channels(attn, phase)
    edges = b.channel_edges_thz
    f = np.round(np.arange(191.250, 196.2755, 0.001), 3)
    ch = np.searchsorted(edges, f + 1e-9, side="right") - 1
    inside = (ch >= 0) & (ch < 64)
    b.set_mask_profile(f[inside], attn[ch[inside]], phase[ch[inside]])
    assert np.allclose(a.input_field(), b.input_field(), atol=1e-12)
    assert np.all(a.input_field()[5 * 6 : 7 * 6] == 0)  # channels 5 and 6 (6 bins each) dark
    # unlisted points are blocked: a profile with half the band listed
    b.set_mask_profile(f[inside][::2], np.zeros(inside.sum())[::2], None)
    assert np.allclose(np.abs(b.input_field()), 0.5 * np.abs(SHGBench(QUIET).input_field()))


def test_mask_validation():
    bench = SHGBench(QUIET)
    with pytest.raises(ValueError):
        bench.set_mask_channels(np.zeros(63))
    with pytest.raises(ValueError):
        bench.set_mask_channels(np.full(64, -1.0))
    with pytest.raises(ValueError):
        bench.set_mask_channels(np.full(64, np.nan))
    with pytest.raises(ValueError):
        bench.set_mask_channels(np.zeros(64), np.full(64, np.inf))
    with pytest.raises(ValueError):
        bench.shot(np.array([[1e-6]]))


# ----------------------------------------------------------------------------- detector
@pytest.mark.parametrize("noise_scale", [1.0, 2.5])
def test_noise_statistics_match_the_model(noise_scale):
    cfg = replace(OpticalBenchConfig(), drift_scale=0.0, model_gap=False, noise_scale=noise_scale)
    bench = SHGBench(cfg)
    n = 1500
    wl = np.linspace(760e-9, 790e-9, 512)  # wider than the SH band: dark pixels at both ends
    power, sat = bench.measure_batch(np.full((n, 64), 3.0), wavelengths_m=wl)
    assert not sat.any()
    counts = power / bench.watts_per_count
    expected = bench.sh_spectrum(wl) / bench.watts_per_count  # noiseless, compression off
    mean, var = counts.mean(0), counts.var(0, ddof=1)
    model_var = noise_scale**2 * (cfg.counts_per_electron * expected + cfg.read_noise_counts**2) + 1 / 12
    # unbiased: every pixel's mean within 4 standard errors
    assert np.all(np.abs(mean - expected) < 4 * np.sqrt(model_var / n) + 0.5)
    bright = expected > 1000
    dark = expected < 1e-3
    assert bright.sum() > 50 and dark.sum() > 10
    ratio = var / model_var
    assert ratio[bright].mean() == pytest.approx(1.0, abs=0.03)  # shot noise: variance ~ signal
    assert ratio[dark].mean() == pytest.approx(1.0, abs=0.06)  # read noise floor
    slope = np.polyfit(expected[bright], var[bright], 1)[0]
    assert slope == pytest.approx(noise_scale**2 * cfg.counts_per_electron, rel=0.1)


def test_quantisation_and_calibration():
    bench = SHGBench(OpticalBenchConfig(drift_scale=0.0))
    power, _ = bench.shot()
    counts = power / bench.watts_per_count + bench.config.adc_bias_counts
    assert np.allclose(counts, np.round(counts), atol=1e-6)  # whole ADC steps
    assert np.allclose(bench.counts_to_watts(counts), power)
    assert bench.counts_to_watts(bench.config.full_scale_counts) == pytest.approx(bench.full_scale_w)
    quiet = SHGBench(QUIET)
    quiet.set_mask_channels(np.full(64, 12.0))
    a, _ = quiet.shot()
    b, _ = quiet.shot()
    assert np.array_equal(a, b)  # no noise, no drift: the same quantised trace
    ideal = quiet.sh_spectrum() / quiet.watts_per_count
    comp = ideal / (1 + quiet.config.compression * ideal / (65535 - quiet.config.adc_bias_counts))
    assert np.allclose(a / quiet.watts_per_count, np.round(comp), atol=1e-6)
    steps = np.unique(np.round(np.diff(np.sort(np.unique(a))) / quiet.watts_per_count, 6))
    assert steps.min() == 1.0


def test_saturation_is_flagged():
    bench = SHGBench(replace(OpticalBenchConfig(drift_scale=0.0), peak_fraction=1.6))
    power, sat = bench.shot()
    assert sat
    assert power.max() == pytest.approx(bench.full_scale_w)
    assert np.sum(power >= bench.full_scale_w) > 3
    bench.set_mask_channels(np.full(64, 6.0))
    _, sat = bench.shot()
    assert not sat
    _, sats = bench.measure_batch(np.array([np.zeros(64), np.full(64, 6.0), np.zeros(64)]))
    assert sats.tolist() == [True, False, True]
    default = SHGBench()
    assert not default.shot()[1]  # the default bench does not saturate at full transmission


# ----------------------------------------------------------------------------- drift, seeds
def _sequence(bench: SHGBench, masks, sleep_s: float = 0.0):
    out = []
    for m in masks:
        bench.set_mask_channels(m)
        if sleep_s:
            time.sleep(sleep_s)
        out.append(bench.shot()[0])
    return np.array(out)


def test_drift_advances_per_shot_not_per_second():
    masks = np.random.default_rng(5).uniform(0, 10, (6, 64))
    fast = _sequence(SHGBench(OpticalBenchConfig(seed=7)), masks)
    slow = _sequence(SHGBench(OpticalBenchConfig(seed=7)), masks, sleep_s=0.03)
    assert np.array_equal(fast, slow)
    batch_bench = SHGBench(OpticalBenchConfig(seed=7))
    batched, _ = batch_bench.measure_batch(masks)
    # another code path (batched FFTs and sums): equal before the ADC up to rounding, so a value on a
    # rounding edge may land one ADC step away; the noise and drift streams are the same
    np.testing.assert_allclose(fast, batched, rtol=0, atol=1.01 * batch_bench.watts_per_count)
    assert np.mean(fast == batched) > 0.99
    bench = SHGBench(OpticalBenchConfig(seed=7))
    state0 = bench.drift_state
    time.sleep(0.02)
    assert bench.drift_state == state0 and bench.shots == 0
    bench.shot()
    assert bench.shots == 1 and bench.drift_state != state0


def test_determinism_by_seed():
    masks = np.random.default_rng(6).uniform(0, 10, (4, 64))
    a, _ = SHGBench(OpticalBenchConfig(seed=3)).measure_batch(masks)
    b, _ = SHGBench(OpticalBenchConfig(seed=3)).measure_batch(masks)
    c, _ = SHGBench(OpticalBenchConfig(seed=4)).measure_batch(masks)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_drift_scale_and_magnitude():
    n = 3000
    masks = np.zeros((n, 64))
    cfg = replace(OpticalBenchConfig(), noise_scale=0.0, model_gap=False)
    benches = {s: SHGBench(replace(cfg, drift_scale=s)) for s in (0.0, 1.0, 2.0)}
    states = {}
    for s, b in benches.items():
        b.measure_batch(masks[:500])
        states[s] = b.drift_state
    assert states[0.0] == (1.0, 0.0)
    assert states[2.0][0] - 1 == pytest.approx(2 * (states[1.0][0] - 1), rel=1e-12)
    assert states[2.0][1] == pytest.approx(2 * states[1.0][1], rel=1e-12)
    # documented figure: SH power drifts ~0.2 % RMS per 1,000 shots (0.1 % pulse energy, squared)
    power, _ = SHGBench(cfg).measure_batch(masks)
    total = power.sum(axis=1)
    change = total[1000:] / total[:-1000] - 1
    assert 0.001 < np.sqrt(np.mean(change**2)) < 0.005
    wl = SHGBench(cfg).default_wavelengths_m
    centroid = (power * wl).sum(1) / total
    shift = np.sqrt(np.mean((centroid[1000:] - centroid[:-1000]) ** 2))
    assert 0.1e-12 < shift < 0.006e-9


def test_documented_signal_to_noise():
    bench = SHGBench(OpticalBenchConfig(drift_scale=0.0))
    snr = {}
    for db in (0.0, 3.0):
        p, _ = bench.measure_batch(np.full((400, 64), db))
        k = np.argmax(p.mean(0))
        snr[db] = p[:, k].mean() / p[:, k].std()
    assert 170 < snr[0.0] < 230
    assert 82 < snr[3.0] < 115


def test_model_gap_is_real_but_modest():
    rng = np.random.default_rng(8)
    masks = rng.uniform(0, 10, (20, 64))
    on, _ = SHGBench(QUIET).measure_batch(masks)
    off_bench = SHGBench(replace(QUIET, model_gap=False))
    off, _ = off_bench.measure_batch(masks)
    rel = np.sqrt(((on - off) ** 2).mean(1)) / off.max(1)
    assert 0.01 < rel.mean() < 0.08  # several times the noise (~1 % of peak here), not dominating
    # without the gap the bench is the nominal model exactly (up to quantisation)
    off_bench.set_mask_channels(masks[-1])
    nominal = off_bench.sh_spectrum()
    assert np.abs(off[-1] - nominal).max() <= 0.5 * off_bench.watts_per_count + 1e-18
    assert SHGBench(QUIET).crystal_delays_ps[0] == pytest.approx(1.1 * 0.55)


def test_wavelength_axis_and_resolution_are_respected():
    bench = SHGBench(QUIET)
    wide = np.linspace(600e-9, 1700e-9, 5001)
    p = bench.sh_spectrum(wide, 2e-9)
    assert p[wide > 800e-9].max() == 0.0  # nothing outside the SH band
    coarse = bench.sh_spectrum(resolution_m=0.5e-9)
    fine = bench.sh_spectrum(resolution_m=0.05e-9)
    assert coarse.max() > 5 * fine.max()  # more power in a wider resolution bandwidth
    big = np.linspace(770e-9, 780e-9, 50001)
    p_big = bench.sh_spectrum(big, 2e-9)  # large axes take the chunked path
    assert np.allclose(np.interp(bench.default_wavelengths_m, big, p_big), bench.sh_spectrum(resolution_m=2e-9), rtol=1e-3)


def test_one_shot_costs_well_under_a_millisecond():
    bench = SHGBench()
    bench.shot()
    best = np.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(40):
            bench.shot()
        best = min(best, (time.perf_counter() - t0) / 40)
    assert best < 1e-3
