"""Online twin refinement on the simulated SHG bench (driven in-process): twin quality, and the
fitter's adaptation when told the physics changed (`OnlineTwinFitter.drift`; the drift probes of
`labpnn.training.drift` tell it, see tests/test_drift_probe.py — the twin's own error never
raises a drift alarm).

The plant: `SHGBench` with 16 shaper channels and 128 pixels (noise_scale 6, the bench's own slow
per-shot drift on), controls mapped as the WaveShaper driver does (attn = 30 dB x (1 - x)), plus an
injectable attenuation offset on every channel: a +1 dB step is a 21 % drop in pulse energy (SH
power x 0.63). Training-like batches are drawn around 32 fixed operating points. The twin learns
only from the measured rows.

Stated numbers (asserted below):
- after the step, the windowed twin error crosses 2x the noise floor within POOR_WITHIN batches
  (measured: on the first drifted batch) and a ``twin_quality`` event says so (it cannot tell a
  drift from extrapolation; the probes can);
- told of the drift one batch after it, the fitter adapts and the windowed noise ratio is back at
  or below 1.5 within RECOVER_WITHIN batches of the notice (measured: ~10);
- without the step, no twin_quality event over the same run of N_BATCHES batches.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from labpnn.twin import fit_twin
from labpnn.twin.calibrate import calibrate, near_sampler
from labpnn.twin.online import DriftAlarm, OnlineTwinFitter

torch.set_num_threads(1)

from labpnn.sim_instruments import shg  # noqa: E402

N_CH, N_PIX = 16, 128
N_BATCHES, STEP_AT, STEP_DB = 60, 20, 1.0
POOR_WITHIN, RECOVER_WITHIN = 2, 25
THRESHOLD, RECOVERED = 2.0, 1.5


class SHGPlant:
    """A PhysicalSystem around SHGBench (test-only adapter; the lead's optical Rig goes over the
    real drivers). ``offset_db`` is added to every channel's attenuation (the injected drift)."""

    def __init__(self, **config):
        self.bench = shg.SHGBench(shg.OpticalBenchConfig(n_channels=N_CH, n_pixels=N_PIX, **config))
        self.offset_db = 0.0

    def describe(self):
        return {"name": "shg-test", "n_controls": N_CH, "n_outputs": N_PIX,
                "axis": {"name": "wavelength", "unit": "m", "values": self.bench.default_wavelengths_m.tolist()},
                "limits": {"controls": [0.0, 1.0]}, "instruments": {"bench": "SHGBench"}, "settings": {}}

    def run(self, controls):
        attn = 30.0 * (1.0 - np.asarray(controls, np.float64)) + self.offset_db
        power, _ = self.bench.measure_batch(attn)
        return (power * 1e6).astype(np.float32)  # uW


def _operating_points():
    return np.random.default_rng(7).uniform(0.3, 0.9, (32, N_CH)).astype(np.float32)


@pytest.fixture(scope="module")
def calibrated():
    plant = SHGPlant(noise_scale=6.0, seed=1)
    sampler = near_sampler(_operating_points(), 0.1)
    cal = calibrate(plant, 3000, None, batch_size=256, repeats=(32, 4), sampler=sampler, sampler_fraction=0.5,
                    progress=False, keep_data=True)
    twin, report = fit_twin(cal.controls, cal.traces, noise_mask=cal.tags == "noise", width=128, depth=2,
                            epochs=45, max_seconds=30, batch_size=128, progress=False)
    return plant, twin, report, (cal.controls, cal.traces)


class EventLog:
    """Stands in for a SessionWriter's event log."""

    def __init__(self):
        self.events = []

    def event(self, kind, message="", **data):
        self.events.append((kind, message, data))


def _run_online(calibrated, step_db: float | None, notify_at: int | None = None):
    """N_BATCHES batches of 64 rows; the step (if any) from batch STEP_AT on; at batch ``notify_at``
    the fitter is told of the drift, as the drift probes do (the batches since the step are the new regime)."""
    _, twin, _, replay = calibrated
    plant = SHGPlant(noise_scale=6.0, seed=2)  # same physics, fresh noise and drift from nominal
    log = EventLog()
    fitter = OnlineTwinFitter(twin, replay=replay, writer=log, threshold=THRESHOLD, recover_threshold=RECOVERED,
                              max_cpu_fraction=1.0, seed=0).start()
    rng = np.random.default_rng(11)
    sampler = near_sampler(_operating_points(), 0.1)
    notice = DriftAlarm(batch=notify_at or 0, noise_ratio=50.0, threshold=3.0, message="physics drift (test)")
    try:
        for k in range(N_BATCHES):
            plant.offset_db = step_db if (step_db is not None and k >= STEP_AT) else 0.0
            x = sampler(rng, 64)
            fitter.feed(x, plant.run(x))
            if k == notify_at:
                fitter.drift(notice, lookback_batches=k - STEP_AT + 1)
            assert fitter.wait_idle(60)
    finally:
        fitter.stop()
    return fitter, log, notice


def test_twin_adapts_after_a_drift_notice(calibrated):
    fitter, log, notice = _run_online(calibrated, STEP_DB, notify_at=STEP_AT + 1)
    ratios = [s.window_ratio for s in fitter.history]
    assert len(fitter.history) == N_BATCHES
    # before the step the twin is at the noise floor
    assert max(ratios[3:STEP_AT]) < RECOVERED, ratios[:STEP_AT]
    # the twin's error sees the step (as it would see extrapolation): a twin_quality event, no alarm
    poor = [s.batch for s in fitter.history if s.poor]
    assert len(poor) == 1 and STEP_AT <= poor[0] < STEP_AT + POOR_WITHIN, ratios
    kinds = [(k, d.get("state")) for k, _, d in log.events]
    assert kinds[0] == ("twin_quality", "poor") and log.events[0][2]["batch"] == poor[0]
    assert "drift_alarm" not in [k for k, _ in kinds] and not hasattr(fitter, "alarms")
    assert fitter.drifts == [notice] and fitter.stats()["drifts"] == 1
    # adaptation brings the windowed noise ratio back to <= 1.5 (judged on batches after the notice)
    back = next(s.batch for s in fitter.history[STEP_AT + 2:] if s.window_ratio is not None
                and s.window_ratio <= RECOVERED)
    assert back - (STEP_AT + 1) <= RECOVER_WITHIN, ratios[STEP_AT:]
    assert ("twin_quality", "ok") in kinds
    assert np.mean(ratios[-10:]) <= RECOVERED, ratios[-10:]
    assert not fitter.adapting and not fitter.twin_poor


def test_no_drift_twin_stays_at_the_floor(calibrated):
    fitter, log, _ = _run_online(calibrated, None)
    ratios = [s.window_ratio for s in fitter.history]
    assert not log.events and not fitter.drifts and not fitter.twin_poor
    assert max(ratios[2:]) < THRESHOLD
    assert np.mean(ratios[-10:]) <= RECOVERED


def test_calibration_fit_reports_noise_model(calibrated):
    _, twin, report, _ = calibrated
    assert report.noise_model is not None and report.noise_model["b"] > 0  # shot noise grows with signal
    assert twin.meta["noise_model"] == pytest.approx(report.noise_model)
    assert report.noise_ratio < 3.0, report.summary()


# -- mechanics on a tiny twin ---------------------------------------------------------------------
def _tiny_twin(n=400, c=4, s=8, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c, s))
    x = rng.random((n, c), dtype=np.float32)
    rep = np.tile(x[:10], (3, 1))
    X = np.concatenate([x, rep])
    Y = (np.tanh(X @ w) + 0.05 * rng.standard_normal((len(X), s))).astype(np.float32)
    twin, _ = fit_twin(X, Y, width=16, depth=1, epochs=5, max_seconds=None, progress=False)
    return twin, w


def test_snapshots_are_immutable_and_compute_is_bounded():
    twin, w = _tiny_twin()
    fitter = OnlineTwinFitter(twin, steps_per_batch=3, max_cpu_fraction=1.0, threshold=1e9).start()
    first = fitter.twin
    x0 = torch.rand(16, 4)
    with torch.no_grad():
        before = first(x0).clone()
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.random((32, 4), dtype=np.float32)
        fitter.feed(x, np.tanh(x @ w))
    assert fitter.wait_idle(30)
    fitter.stop()
    assert fitter.version == 5 and fitter.twin is not first
    with torch.no_grad():
        assert torch.equal(first(x0), before)  # a published twin never changes
        assert not torch.equal(fitter.twin(x0), before)  # but the fitter moved on
    assert fitter.steps == 15 and all(s.steps == 3 for s in fitter.history)
    assert all(not p.requires_grad for p in fitter.twin.parameters())
    assert fitter.twin.meta["online"]["batches"] == 5
    # the caller's twin is untouched
    with torch.no_grad():
        assert torch.equal(twin(x0), before)


def test_duty_cycle_caps_cpu_use():
    twin, w = _tiny_twin()
    fitter = OnlineTwinFitter(twin, steps_per_batch=20, max_cpu_fraction=0.25, threshold=1e9).start()
    x = np.random.default_rng(2).random((32, 4), dtype=np.float32)
    started = time.perf_counter()
    fitter.feed(x, np.tanh(x @ w))
    assert fitter.wait_idle(30)
    wall = time.perf_counter() - started
    fitter.stop()
    assert fitter.busy_s / wall < 0.4


def test_a_drift_notice_waits_for_the_batches_fed_before_it_and_never_blocks():
    twin, w = _tiny_twin()
    fitter = OnlineTwinFitter(twin, steps_per_batch=2, max_steps_per_s=20, max_cpu_fraction=1.0, queue_batches=2,
                              threshold=1e9).start()
    x = np.random.default_rng(4).random((32, 4), dtype=np.float32)
    for _ in range(4):
        fitter.feed(x, np.tanh(x @ w), block=False)  # a slow fitter: the queue fills, batches are dropped
    started = time.perf_counter()
    fitter.drift(None, lookback_batches=1)
    assert time.perf_counter() - started < 0.05  # never stalls the training loop
    assert fitter.wait_idle(30)
    fitter.stop()
    assert fitter.drifts == [None] and fitter.stats()["drifts"] == 1
    assert 2 <= len(fitter.history) == fitter._fed < 4
    assert fitter._regime_start == fitter._starts[-1]  # applied after every batch fed before it


def test_feed_rejects_wrong_shapes():
    twin, _ = _tiny_twin()
    fitter = OnlineTwinFitter(twin)
    with pytest.raises(ValueError, match="expected controls"):
        fitter.feed(np.zeros((3, 5)), np.zeros((3, 8)))


def test_follow_a_growing_session(tmp_path):
    from labpnn import sessions as session
    from labpnn.contract import Measurement

    twin, w = _tiny_twin()
    describe = {"name": "tiny", "n_controls": 4, "n_outputs": 8, "axis": {"name": "i", "unit": "1",
                                                                          "values": list(range(8))}}
    path = tmp_path / "live.h5"
    writer = session.SessionWriter(path, describe)
    rng = np.random.default_rng(3)

    def batch(n=16):
        x = rng.random((n, 4), dtype=np.float32)
        y = np.tanh(x @ w).astype(np.float32)
        return Measurement(x, y, x, np.full(n, time.time()), np.zeros(n, np.uint32))

    writer.append(batch(), tag="calibration")  # before following: skipped
    writer.flush()
    fitter = OnlineTwinFitter(twin, steps_per_batch=1, max_cpu_fraction=1.0, writer=writer)
    fitter.follow(path, poll_s=0.05)
    time.sleep(0.3)

    def produce():
        for k in range(6):
            writer.append(batch(), tag="test" if k == 2 else "train")
            writer.flush()
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join()
    deadline = time.monotonic() + 20
    while len(fitter.history) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    fitter.wait_idle(10)
    fitter.stop()
    writer.close()
    assert [s.batch_id for s in fitter.history] == [1, 2, 4, 5, 6]  # train batches only, in order
    assert fitter.stats()["rows"] == 5 * 16
