"""Copy-to-copy variation of the simulated optical bench (`OpticalBenchConfig(copy_seed=N)`):
copy 0 is the nominal bench exactly; another copy differs by the stated physical amounts; a copy
is deterministic per copy seed and independent of the noise seed; `simulated_rig(copy_seed=N)`
and `labpnn sim optical --copy-seed N` pass it through."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest

from labpnn.sim_instruments.shg import OpticalBenchConfig, SHGBench, fabricate

QUIET = OpticalBenchConfig(noise_scale=0.0, drift_scale=0.0)
#: every copy RMS off: a copy with only the named one on isolates its effect
NONE = {f.name: 0.0 for f in fields(OpticalBenchConfig) if f.name.startswith("copy_") and f.name not in
        ("copy_seed", "copy_variation")}


def only(name: str, value: float, copy_seed: int = 1) -> OpticalBenchConfig:
    return replace(QUIET, copy_seed=copy_seed, **{**NONE, name: value})


def masks(rows: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 10.0, (rows, 64))


def test_copy_zero_is_the_nominal_bench_whatever_the_copy_knobs_say():
    nominal = SHGBench(OpticalBenchConfig(seed=3))
    loud = SHGBench(replace(OpticalBenchConfig(seed=3), copy_seed=0, copy_variation=5.0,
                            **{k: 1.0 for k in NONE}))
    fab = loud.fabrication
    assert fab.nominal and fab.ripple_db is None and fab.efficiency == 1.0 and fab.crystal_length == 1.0
    assert fab.center_thz == 193.4 and fab.shaper_offset_thz == fab.osa_offset_m == fab.phase_match_thz == 0.0
    x = masks()
    a, sat_a = nominal.measure_batch(x)
    b, sat_b = loud.measure_batch(x)
    assert np.array_equal(a, b) and np.array_equal(sat_a, sat_b)  # noise, drift, gap: bit for bit
    assert loud.crystal_delays_ps == pytest.approx((1.1 * 0.55, 1.1 * 0.25), rel=1e-15)
    # copy_variation=0 makes any copy the nominal one too
    assert np.array_equal(SHGBench(replace(QUIET, copy_seed=7, copy_variation=0.0)).measure_batch(x)[0],
                          SHGBench(QUIET).measure_batch(x)[0])


def test_a_copy_differs_by_the_stated_physical_amounts():
    cfg = OpticalBenchConfig()
    fab = fabricate(replace(cfg, copy_seed=1))
    s = fab.summary()
    assert s["ripple_rms_db"] == pytest.approx(cfg.copy_ripple_db, rel=1e-9)  # the ripple's RMS, exactly
    for key, rms in (("crystal_length", cfg.copy_crystal_length), ("efficiency", cfg.copy_efficiency),
                     ("fwhm_thz", cfg.copy_fwhm)):
        nominal = cfg.fwhm_thz if key == "fwhm_thz" else 1.0
        assert 0 < abs(s[key] / nominal - 1) <= 3 * rms  # drawn, clipped at 3 sigma
    assert 0 < abs(s["phase_match_thz"]) <= 3 * cfg.copy_phase_match_thz
    assert 0 < abs(s["osa_offset_nm"]) <= 3 * cfg.copy_osa_offset_nm
    assert s["shaper_offset_thz"] == pytest.approx(round(s["shaper_offset_thz"] / 0.001) * 0.001, abs=1e-12)
    bench = SHGBench(replace(QUIET, copy_seed=1))
    t1, t2 = bench.crystal_delays_ps
    assert (t1, t2) == pytest.approx((0.55 * 1.1 * s["crystal_length"], 0.25 * 1.1 * s["crystal_length"]), rel=1e-12)


def test_each_fabrication_detail_acts_as_stated():
    wl = SHGBench(QUIET).default_wavelengths_m
    # OSA: the copy's pixel p reads what the nominal OSA reads at wavelength p + offset
    osa = SHGBench(only("copy_osa_offset_nm", 0.02))
    off = osa.fabrication.osa_offset_m
    assert off != 0.0
    np.testing.assert_allclose(osa.sh_spectrum(), SHGBench(QUIET).sh_spectrum(wl + off), rtol=1e-12, atol=1e-24)
    # SH efficiency: the whole spectrum scales by it, nothing else changes
    eff = SHGBench(only("copy_efficiency", 0.05))
    np.testing.assert_allclose(eff.sh_spectrum(), eff.fabrication.efficiency * SHGBench(QUIET).sh_spectrum(),
                               rtol=1e-12)
    # shaper ripple: the fully open shaper transmits 10^(-ripple/20), averaged over each 10 GHz bin
    rip = SHGBench(only("copy_ripple_db", 0.3))
    rip.set_mask_channels(np.zeros(64))
    ratio = np.abs(rip.input_field()) / np.abs(SHGBench(QUIET).input_field())
    want = (10 ** (-rip.fabrication.ripple_db / 20)).reshape(-1, 10).mean(1)
    np.testing.assert_allclose(ratio, want, rtol=1e-12)
    assert np.sqrt(np.mean((20 * np.log10(ratio)) ** 2)) == pytest.approx(0.3, rel=0.02)
    # shaper calibration: a mask lands whole grid steps off; channel and profile masks still agree
    shift = SHGBench(only("copy_shaper_offset_thz", 0.004, copy_seed=5))
    assert shift.fabrication.shaper_offset_thz != 0.0
    attn = np.random.default_rng(2).uniform(0, 20, 64)
    shift.set_mask_channels(attn)
    field = shift.input_field()
    j = np.arange(3840)  # the shaper's 0.001 THz grid over the band, as the WaveShaper driver sends it
    shift.set_mask_profile(np.round(191.48 + 0.001 * j, 3), attn[j * 64 // 3840])
    np.testing.assert_allclose(shift.input_field(), field, atol=1e-12)
    nominal = SHGBench(QUIET)
    nominal.set_mask_channels(attn)
    assert np.abs(field - nominal.input_field()).max() > 0.01 * np.abs(field).max()
    # the laser: the copy's pulse is centred at its own frequency
    laser = SHGBench(only("copy_center_nm", 0.1))
    power = np.abs(laser.input_field()) ** 2
    centre = (power * laser.freq_thz).sum() / power.sum()
    assert centre == pytest.approx(laser.fabrication.center_thz, abs=2e-3)
    assert abs(laser.fabrication.center_thz - 193.4) > 1e-3


def test_copies_are_deterministic_independent_of_the_noise_seed_and_differ():
    x = masks()
    one = SHGBench(replace(QUIET, copy_seed=3)).measure_batch(x)[0]
    again = SHGBench(replace(QUIET, copy_seed=3, seed=9)).measure_batch(x)[0]  # seed: noise/drift only (off)
    assert np.array_equal(one, again)
    nominal = SHGBench(QUIET).measure_batch(x)[0]
    peak = nominal.max()
    diffs = []
    for copy_seed in (1, 2, 3, 4):
        other = SHGBench(replace(QUIET, copy_seed=copy_seed)).measure_batch(x)[0]
        diffs.append(float(np.sqrt(np.mean((other - nominal) ** 2)) / peak))
    # RMS trace change against the nominal copy, in units of the peak (documented in shg.py, item 8)
    assert min(diffs) > 0.01 and max(diffs) < 0.15, diffs
    assert len(set(diffs)) == 4


def test_simulated_rig_and_sim_command_take_the_copy_seed():
    from labpnn.benches.optical import simulated_rig

    x = np.random.default_rng(1).uniform(0.6, 1.0, (4, 64)).astype(np.float32)
    got = {}
    for copy_seed in (0, 2, 2):
        with simulated_rig(copy_seed=copy_seed, seed=1) as rig:
            got.setdefault(copy_seed, []).append(rig.run(x))
    assert np.array_equal(got[2][0], got[2][1])  # same copy, same noise seed, same shots
    rel = np.sqrt(np.mean((got[2][0] - got[0][0]) ** 2)) / got[0][0].max()
    assert rel > 0.01  # well above the one-shot noise (~0.5 % of the peak for these masks)
    code = ("import sys; from labpnn.sim_instruments.optical_bench import main; "
            "sys.exit(main(['--shaper-port', '0', '--osa-port', '0', '--copy-seed', '2']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[2].startswith("copy copy_seed=2 crystal_length="), lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
