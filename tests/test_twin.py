"""Digital twin: fitting, metrics, checkpoints, sessions, calibration sweep, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labpnn.twin import (
    Twin,
    fit_twin,
    fit_twin_from_sessions,
    load_twin,
    noise_from_repeats,
    noise_variance,
    regression_metrics,
    save_twin,
    split_by_time,
)
from labpnn.twin.calibrate import CALIBRATION_TAG, NOISE_TAG, calibrate, near_sampler, plan_calibration

torch.set_num_threads(1)


# -- a known smooth map ----------------------------------------------------------------------------
C, S, SIGMA = 8, 32, 0.05
_w = np.random.default_rng(123)
A = _w.normal(0, 1.0, (C, 12))
B = _w.normal(0, 1 / np.sqrt(12), (12, S))


def smooth_map(x: np.ndarray) -> np.ndarray:
    return np.sin(x @ A) @ B


def smooth_data(n: int = 3000, n_distinct: int = 40, n_repeats: int = 5, seed: int = 0):
    """Uniform rows with a block of repeated controls in the middle (tagged as noise rows)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, C), dtype=np.float32)
    rep = np.tile(rng.random((n_distinct, C), dtype=np.float32), (n_repeats, 1))
    X = np.concatenate([x[: n // 2], rep, x[n // 2:]])
    mask = np.r_[np.zeros(n // 2, bool), np.ones(len(rep), bool), np.zeros(n - n // 2, bool)]
    Y = (smooth_map(X) + SIGMA * rng.standard_normal((len(X), S))).astype(np.float32)
    return X, Y, mask


def test_noise_variance_is_the_unbiased_repeat_variance():
    rng = np.random.default_rng(1)
    # 50 control vectors x 4 repeats, pixel noise sigma = 0.3 around different means
    means = rng.normal(0, 5, (50, 16))
    traces = np.repeat(means, 4, axis=0) + 0.3 * rng.standard_normal((200, 16))
    groups = np.repeat(np.arange(50), 4)
    sigma2, n = noise_variance(traces, groups)
    assert n == 50
    assert sigma2 == pytest.approx(0.09, rel=0.12)
    # by hand: ddof=1 variance per group and pixel, pooled (equal group sizes: plain mean)
    by_hand = np.mean([traces[groups == g].var(axis=0, ddof=1).mean() for g in range(50)])
    assert sigma2 == pytest.approx(by_hand, rel=1e-9)
    # groups found from identical controls; rows without repeats are ignored
    controls = np.concatenate([np.repeat(rng.random((50, 3)), 4, axis=0), rng.random((7, 3))]).astype(np.float32)
    with_singles = np.concatenate([traces, rng.normal(0, 100, (7, 16))])
    assert noise_from_repeats(controls, with_singles) == (pytest.approx(by_hand, rel=1e-9), 50)
    assert noise_from_repeats(rng.random((5, 3)), rng.random((5, 2))) == (None, 0)


def test_regression_metrics_definitions():
    rng = np.random.default_rng(2)
    target = rng.normal(0, 2, (500, 10))
    pred = target + rng.normal(0, 0.5, target.shape)
    m = regression_metrics(pred, target, noise_var=0.25)
    sse = ((pred - target) ** 2).sum()
    sst = ((target - target.mean(0)) ** 2).sum()
    assert m["mse"] == pytest.approx(sse / target.size)
    assert m["nmse"] == pytest.approx(sse / sst)
    assert m["r2"] == pytest.approx(1 - sse / sst)
    per_pixel = 1 - ((pred - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
    assert m["r2_pixel_mean"] == pytest.approx(per_pixel.mean())
    assert m["noise_ratio"] == pytest.approx(m["mse"] / 0.25)


def test_split_holds_out_the_latest_unseen_rows():
    rng = np.random.default_rng(3)
    controls = rng.random((100, 4)).astype(np.float32)
    controls[95] = controls[10]  # a repeat late in time: may not be held out (its controls were seen)
    stamps = np.arange(100.0)[::-1]  # rows given newest first
    noise = np.array([0, 1, 2])  # the three newest rows are noise rows: never held out
    train, val, hold = split_by_time(100, holdout=0.1, val=0.2, order=np.argsort(stamps), never_holdout=noise,
                                     controls=controls)
    assert set(hold) == set(range(3, 13)) - {10}
    assert len(set(train) | set(val) | set(hold)) == 100 and not set(train) & set(val)
    fit_rows = np.setdiff1d(np.r_[train, val], np.r_[noise, 10])  # row 10: a seen control, dropped from holdout
    assert stamps[hold].min() > stamps[fit_rows].max()
    assert len(val) == round(0.2 * 91)


def test_fit_recovers_a_known_smooth_map():
    X, Y, mask = smooth_data()
    twin, report = fit_twin(X, Y, noise_mask=mask, width=64, depth=2, epochs=150, max_seconds=30,
                            features="linear", progress=False)
    # the noise floor is the noise we put in (unbiased repeat variance)
    assert report.noise_var == pytest.approx(SIGMA**2, rel=0.2)
    assert report.noise_groups == 40
    assert report.n_holdout == 320 and report.n_train + report.n_val == len(X) - 320
    # held-out rows are within 40 % of the noise floor (MSE includes the measurement noise)
    assert report.noise_ratio < 1.4, report.summary()
    assert report.holdout_r2 > 0.97
    # and against the true map on fresh controls, the error is well below the noise
    fresh = np.random.default_rng(9).random((500, C), dtype=np.float32)
    err = float(((twin.predict(fresh) - smooth_map(fresh)) ** 2).mean())
    assert err < 0.4 * SIGMA**2
    assert twin.meta["fit"]["noise_ratio"] == pytest.approx(report.noise_ratio)
    assert twin.meta["noise_var"] == pytest.approx(report.noise_var)
    assert twin.meta["split"]["holdout"][-1][1] == len(X)  # the latest rows


def interference_data(n: int, seed: int = 0, sigma: float = 1e-3):
    """Magnitudes of a field linear in 8 controls at 10 outputs, as a microphone reads a tone that
    several speakers play (mixed signs: the fields cancel in places), repeats in the middle."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((8, 10)) + 1j * rng.standard_normal((8, 10))
    b = 0.5 * (rng.standard_normal(10) + 1j * rng.standard_normal(10))
    x = rng.random((n, 8)).astype(np.float32)
    rep = np.tile(rng.random((20, 8)).astype(np.float32), (5, 1))
    X = np.concatenate([x[: n // 2], rep, x[n // 2:]])
    mask = np.r_[np.zeros(n // 2, bool), np.ones(len(rep), bool), np.zeros(n - n // 2, bool)]
    Y = np.abs(X @ h + b) + sigma * rng.standard_normal((len(X), 10))
    return X, Y.astype(np.float32), mask


@pytest.mark.slow
def test_modulus_core_fits_interference_closer_than_the_generic_mlp():
    X, Y, mask = interference_data(1500, sigma=0.03)
    common = dict(noise_mask=mask, epochs=150, batch_size=64, max_seconds=None, progress=False, seed=0)
    torch.manual_seed(0)
    _, generic = fit_twin(X, Y, **common)
    torch.manual_seed(0)
    twin, modulus = fit_twin(X, Y, core="modulus", **common)
    assert twin.core_spec == {"kind": "modulus", "width": 16, "depth": 1, "block": "gated"}
    assert twin.features.kind == "linear"
    # the structure is the physics: closer to the noise floor on held-out rows, in the same epochs
    # (measured: noise ratio 1.5 vs 2.8 at 1,500 rows)
    assert modulus.noise_ratio < 0.75 * generic.noise_ratio, (modulus.noise_ratio, generic.noise_ratio)


def test_unknown_twin_core_is_refused():
    with pytest.raises(ValueError, match="unknown twin core"):
        Twin(4, 4, core="fourier")


@pytest.mark.parametrize("core, block", [("residual_mlp", "gated"), ("residual_mlp", "mlp"), ("modulus", "gated")])
def test_checkpoint_round_trip(tmp_path, core, block):
    X, Y, mask = smooth_data(600)
    twin, report = fit_twin(X, Y, noise_mask=mask, core=core, width=32, depth=1, block=block, epochs=3,
                            max_seconds=None, progress=False, meta={"note": "round trip"})
    path = save_twin(twin, tmp_path / "twin.pt")
    # loads with weights_only=True: no pickled code in the file
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "labpnn-twin/1" and raw["config"]["core"] == {
        "kind": core, "width": 32, "depth": 1, "block": block}
    back = load_twin(path)
    x = torch.rand(64, C)
    with torch.no_grad():
        assert torch.equal(twin(x), back(x))
    assert back.meta == twin.meta and back.meta["note"] == "round trip"
    assert back.meta["fit"]["n_train"] == report.n_train
    assert back.config() == twin.config()
    # the frozen snapshot still gives input gradients (what PAT's backward needs)
    snap = back.snapshot()
    xg = torch.rand(4, C, requires_grad=True)
    snap(xg).sum().backward()
    assert xg.grad is not None and all(p.grad is None for p in snap.parameters())


class TinyCore(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


def test_plug_in_core(tmp_path):
    X, Y, mask = smooth_data(600)
    twin, _ = fit_twin(X, Y, core=TinyCore(C, S), epochs=2, max_seconds=None, progress=False)
    assert twin.core_spec["kind"] == "custom" and twin.features.kind == "linear"
    path = save_twin(twin, tmp_path / "custom.pt")
    with pytest.raises(ValueError, match="custom core"):
        load_twin(path)
    x = torch.rand(8, C)
    for back in (load_twin(path, core=TinyCore), load_twin(path, trust_core_class=True)):
        with torch.no_grad():
            assert torch.equal(back(x), twin(x))


def test_exp_features_are_standardised():
    x = np.random.default_rng(0).random((2000, 5)).astype(np.float32)
    twin = Twin(5, 3, width=8, depth=1).set_normalisation(x, np.random.rand(2000, 3))
    assert twin.features.n_features == 5 * 7
    f = twin.features(torch.from_numpy(x))
    assert torch.allclose(f.mean(0), torch.zeros(35), atol=1e-4)
    assert torch.allclose(f.std(0), torch.ones(35), atol=1e-3)


def test_twin_modules_never_import_the_simulator():
    code = ("import sys, labpnn.twin, labpnn.twin.online, labpnn.twin.calibrate, labpnn.twin.cli, labpnn.twin.metrics\n"
            "bad = sorted(m for m in sys.modules if m.startswith('labpnn.sim_instruments') or m == 'sim_instruments')\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


# -- calibration sweep -----------------------------------------------------------------------------
def test_plan_spreads_noise_passes_through_the_sweep():
    centres = np.full((3, 6), 0.5, np.float32)
    plan = plan_calibration(6, 1000, batch_size=50, repeats=(20, 4), seed=1,
                            sampler=near_sampler(centres, 0.01), sampler_fraction=0.25)
    tags = np.array(plan.tags)
    assert (tags == CALIBRATION_TAG).sum() == 20 and (tags == NOISE_TAG).sum() == 4
    calib = np.concatenate([b for b, t in zip(plan.batches, plan.tags) if t == CALIBRATION_TAG])
    assert calib.shape == (1000, 6) and calib.dtype == np.float32
    assert calib.min() >= 0 and calib.max() <= 1
    near = (np.abs(calib - 0.5) < 0.06).all(axis=1)
    assert 200 <= near.sum() <= 300  # a quarter drawn around the centres, the rest uniform
    noise_at = np.flatnonzero(tags == NOISE_TAG)
    assert noise_at[0] > 0 and noise_at[-1] < len(tags) - 1 and np.diff(noise_at).min() >= 4
    passes = [b for b, t in zip(plan.batches, plan.tags) if t == NOISE_TAG]
    for rows in passes:  # every pass measures the same 20 controls, in its own order
        assert sorted(map(bytes, rows)) == sorted(map(bytes, plan.noise_controls))
    assert not all(np.array_equal(passes[0], p) for p in passes[1:])


def _sessions_available() -> bool:
    try:
        import labpnn.sessions  # noqa: F401
    except ImportError:
        return False
    return True


needs_sessions = pytest.mark.skipif(not _sessions_available(), reason="labpnn.sessions not available")


@needs_sessions
def test_calibrate_writes_tagged_session_and_fit_from_it(tmp_path):
    from labpnn.rig import Rig
    from labpnn.sessions import SessionWriter, open_session
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(6, 24, hidden=8, noise=0.02, seed=4)
    rig = Rig([sim], [sim], name="testrig").connect()
    path = tmp_path / "calib.h5"
    with SessionWriter(path, rig.describe()) as writer:
        result = calibrate(rig, 1500, writer, batch_size=100, repeats=(25, 4), seed=0, progress=False)
    assert result.n_rows == 1600 and result.n_noise_rows == 100 and result.noise_groups == 25
    assert result.noise_var == pytest.approx(0.02**2, rel=0.25)
    with open_session(path) as reader:
        tags = reader.tags
        assert (tags == "calibration").sum() == 1500 and (tags == "noise").sum() == 100
        kinds = [e["kind"] for e in reader.events]
        assert "calibration_start" in kinds and "calibration_done" in kinds
    twin, report = fit_twin_from_sessions([path], width=32, depth=1, epochs=20, max_seconds=None, progress=False)
    assert report.noise_var == pytest.approx(result.noise_var, rel=1e-6)
    assert report.noise_groups == 25 and report.n_holdout == 160
    assert report.noise_ratio is not None and report.holdout_r2 > 0.5
    src = twin.meta["data"][0]
    assert src["path"] == str(path.resolve()) and src["n_rows"] == 1600
    assert src["tags"] == {"calibration": 1500, "noise": 100} and src["rows"] == [[0, 1600]]
    assert twin.meta["system"]["n_controls"] == 6


@needs_sessions
def test_fit_from_imported_session_matches_recorded(tmp_path):
    from labpnn.rig import Rig
    from labpnn.sessions import SessionWriter, open_session
    from labpnn.sessions.cli import import_session
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(6, 24, hidden=8, noise=0.02, seed=5)
    rig = Rig([sim], [sim], name="testrig").connect()
    recorded = tmp_path / "recorded.h5"
    with SessionWriter(recorded, rig.describe()) as writer:
        calibrate(rig, 1500, writer, batch_size=100, repeats=(25, 4), seed=1, progress=False)
    with open_session(recorded) as reader:
        x, y = reader.controls.copy(), reader.traces.copy()
    np.savez(tmp_path / "export.npz", controls=x, traces=y)
    imported = import_session(str(tmp_path / "export.npz") + ":controls", str(tmp_path / "export.npz") + ":traces",
                              tmp_path / "imported.h5")
    with open_session(imported) as reader:
        assert np.isnan(reader.timestamps).all() and set(reader.tags) == {"calibration"}
    kw = dict(width=32, depth=1, epochs=25, max_seconds=None, progress=False, seed=3)
    twin_r, rep_r = fit_twin_from_sessions(recorded, **kw)
    twin_i, rep_i = fit_twin_from_sessions(imported, **kw)
    # the imported session lost the noise tag, but the repeats are found by their identical controls
    assert rep_i.noise_var == pytest.approx(rep_r.noise_var, rel=1e-6) and rep_i.noise_groups == 25
    # file order stands in for the unknown timestamps: the held-out rows are the latest rows either way
    assert twin_i.meta["split"]["holdout"][-1][1] == 1600 and twin_r.meta["split"]["holdout"][-1][1] == 1600
    assert abs(rep_i.n_holdout - rep_r.n_holdout) <= 100
    assert rep_i.noise_ratio == pytest.approx(rep_r.noise_ratio, rel=0.25)
    assert rep_i.holdout_r2 == pytest.approx(rep_r.holdout_r2, abs=0.05)


@needs_sessions
def test_cli_calibrate_and_twin_fit(tmp_path, capsys):
    from labpnn.cli import main

    session = tmp_path / "cal.h5"
    config = Path(__file__).resolve().parents[1] / "examples" / "test-rig.toml"
    assert main(["calibrate", "--config", str(config), "-n", "640", "-o", str(session),
                 "--repeats", "16", "3", "--no-progress"]) == 0
    assert "noise floor" in capsys.readouterr().out
    out = tmp_path / "twin.pt"
    plot = tmp_path / "fit.png"
    assert main(["twin", "fit", str(session), "-o", str(out), "--json", "--plot", str(plot), "--epochs", "3",
                 "--width", "32", "--depth", "1", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_holdout"] > 0 and report["noise_groups"] == 16 and report["noise_ratio"] > 0
    assert out.exists() and plot.stat().st_size > 10_000
    assert load_twin(out).meta["data"][0]["n_rows"] == 688
    assert main(["twin", "eval", str(out), str(session), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["rows"] == 640 and scored["noise_ratio"] > 0
    assert main(["twin", "show", str(out)]) == 0
    assert "16 controls -> 512 outputs" in capsys.readouterr().out


@needs_sessions
def test_calibrate_over_the_wire(tmp_path, make_server, make_client):
    from labpnn.sessions import SessionWriter, open_session

    server = make_server(rig={"n_controls": 8, "n_outputs": 32, "noise": 0.01})
    client = make_client(server)
    path = tmp_path / "remote.h5"
    with SessionWriter(path, client.describe()) as writer:
        result = calibrate(client, 300, writer, batch_size=32, repeats=(10, 3), progress=False, max_in_flight=4)
    assert result.n_rows == 330
    with open_session(path) as reader:
        assert reader.n_rows == 330 and (reader.tags == "noise").sum() == 30
    assert server.sim.actuations == 330
