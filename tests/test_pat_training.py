"""Training end to end: PAT vs in-silico with a mismatched twin, pass counting, sessions, a real
device server, checkpoint/resume, pipelined chunks, the CLI and the demo (quick)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labpnn.sim_instruments.test_rig import SimTestRig
from labpnn.training.checkpoint import load_network
from labpnn.training.counting import PassCounter
from labpnn.training.datasets import make_dataset
from labpnn.training.network import build_network
from labpnn.training.pat import PATForward
from labpnn.training.trainer import _step_gradients, train

torch.set_num_threads(1)


class RigTwin(torch.nn.Module):
    """The test rig's own map in torch, with its output weights perturbed by ``gap`` (relative,
    per hidden unit): a twin that is close to, but not, the physics."""

    def __init__(self, sim: SimTestRig, gap: float = 0.5, seed: int = 0):
        super().__init__()
        g = np.random.default_rng(seed)
        self.w1, self.b1, self.b2 = (torch.tensor(a) for a in (sim._w1, sim._b1, sim._b2))
        self.w2 = torch.tensor(sim._w2 * (1 + gap * g.standard_normal((sim._w2.shape[0], 1))).astype(np.float32))

    def forward(self, x):
        return (torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2) ** 2


def blobs(seed: int = 0):
    """3 well separated Gaussian classes in 4 features (150 samples)."""
    g = np.random.default_rng(seed)
    centres = g.normal(0, 3.0, (3, 4))
    y = np.arange(150) % 3
    X = centres[y] + g.normal(0, 0.5, (150, 4))
    return X, y


def blob_dataset(seed: int = 0):
    X, y = blobs()
    return make_dataset(X, y, ["a", "b", "c"], ["f0", "f1", "f2", "f3"], name="blobs", seed=seed)


def test_pat_beats_insilico_when_the_twin_is_wrong():
    ds = blob_dataset(1)
    sim = SimTestRig(16, 64, noise=0.01, seed=0)
    twin = RigTwin(sim, gap=0.5)
    pat_run = train(sim, ds, method="pat", twin=twin, epochs=40, seed=1, progress=False)
    insilico_run = train(sim, ds, method="insilico", twin=twin, epochs=40, seed=1, progress=False)
    assert pat_run.test_accuracy >= 0.85  # both measured on the physics
    assert pat_run.test_accuracy >= insilico_run.test_accuracy + 0.2
    assert insilico_run.twin_test_accuracy > insilico_run.test_accuracy  # in-silico fits the twin, not the physics


def test_passes_are_counted_by_kind_and_recorded_in_the_session(tmp_path):
    from labpnn.sessions import open_session

    ds = blob_dataset(0)
    sim = SimTestRig(16, 64, noise=0.01, seed=0)
    before = sim.actuations
    r = train(sim, ds, method="pat", twin=RigTwin(sim), layers=2, epochs=3, seed=0, batch_size=32,
              session=tmp_path / "s.h5", report_dir=tmp_path / "report", progress=False)
    n_train, n_val, n_test = (len(ds.y_train), len(ds.y_val), len(ds.y_test))
    assert r.passes == {"calibration": 0, "train": 3 * 2 * n_train, "validation": 3 * 2 * n_val, "test": 2 * n_test}
    assert sim.actuations - before == sum(r.passes.values())  # every row the rig ran is counted
    reader = open_session(tmp_path / "s.h5")
    tags, counts = np.unique(np.asarray(reader.tags).astype(str), return_counts=True)
    assert dict(zip(tags.tolist(), counts.tolist(), strict=True)) == {
        "train": r.passes["train"], "validation": r.passes["validation"], "test": r.passes["test"]}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["test_accuracy"] == r.test_accuracy and report["passes"] == r.passes
    assert report["network"].startswith("2-layer physical") and "provenance" in report
    for png in ("learning_curves.png", "confusion.png", "twin_vs_measured.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    # in-silico trains without a single physical pass
    r2 = train(sim, ds, method="insilico", twin=RigTwin(sim), epochs=2, seed=0, progress=False)
    assert r2.passes["train"] == 0 and r2.passes["validation"] == 2 * n_val and r2.passes["test"] == n_test


def test_pat_through_a_real_device_server(make_server, make_client):
    server = make_server(rig={"n_outputs": 64, "noise": 0.01, "seed": 0})
    client = make_client(server)
    ds = blob_dataset(1)
    twin = RigTwin(server.sim, gap=0.5)
    rows0 = client.status()["rows_done"]
    r = train(client, ds, method="pat", twin=twin, epochs=30, seed=1, progress=False, chunk_rows=16, in_flight=2)
    assert r.test_accuracy >= 0.8
    assert client.status()["rows_done"] - rows0 == sum(r.passes.values())
    assert r.duty_cycle["source"] == "server" and r.duty_cycle["busy_s"] > 0 and r.duty_cycle["wall_s"] > 0


def test_chunked_steps_give_the_same_gradient():
    from concurrent.futures import ThreadPoolExecutor

    sim = SimTestRig(16, 64, noise=0.0, seed=0)  # noise-free: the same rows measure the same
    ds = blob_dataset(0)
    net = build_network(16, 4, 3, repeat=3, n_outputs=64, layout="spread", seed=0)
    through = PATForward(PassCounter(sim), RigTwin(sim))
    params = list(net.parameters())
    X, y = torch.from_numpy(ds.X_train), torch.from_numpy(ds.y_train)
    idx = torch.arange(40)
    whole = _step_gradients(net, params, X, y, idx, through, 0, None)
    with ThreadPoolExecutor(3) as pool:
        chunked = _step_gradients(net, params, X, y, idx, through, 8, pool)
    assert whole[0] == pytest.approx(chunked[0], rel=1e-5) and whole[1] == chunked[1]
    for a, b in zip(whole[2], chunked[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_checkpoint_and_resume(tmp_path):
    ds = blob_dataset(0)
    sim = SimTestRig(16, 64, noise=0.01, seed=0)
    ck = tmp_path / "ck.pt"
    first = train(sim, ds, method="pat", twin=RigTwin(sim), epochs=2, seed=0, checkpoint=ck, progress=False)
    assert ck.exists() and len(first.history) == 2
    resumed = train(sim, ds, method="pat", twin=RigTwin(sim), epochs=4, seed=0, resume=ck, checkpoint=ck,
                    progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.passes["train"] == 4 * len(ds.y_train)
    assert resumed.history[:2] == first.history
    net = load_network(ck)
    assert net.name == "1-layer physical network"


def test_train_cli_in_process_rig(tmp_path, capsys):
    from labpnn.cli import main
    from labpnn.twin import fit_twin, save_twin

    # a twin fitted from measurements (the usual way), saved as a file for --twin
    sim = SimTestRig(16, 512, seed=0)
    x = np.random.default_rng(0).random((300, 16)).astype(np.float32)
    twin, _ = fit_twin(x, sim.run(x), epochs=5, max_seconds=5, progress=False)
    save_twin(twin, tmp_path / "twin.pt")
    X, y = blobs()
    np.savez(tmp_path / "blobs.npz", X=X, y=y)
    code = main(["train", "--config", "examples/test-rig.toml", "--dataset", str(tmp_path / "blobs.npz"),
                 "--twin", str(tmp_path / "twin.pt"), "--epochs", "2", "--report", str(tmp_path / "rep"),
                 "--session", str(tmp_path / "s.h5"), "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["passes"]["train"] == 2 * 90 and (tmp_path / "rep" / "report.json").exists()
    # the chosen settings and why, before training (stderr: stdout is the JSON summary), and in the report
    assert "setting features = 3: 4 features > 3 = 60% of 16 channels / 3 copies each: PCA" in captured.err
    assert "setting repeat = 3: round(0.6 x 16 channels / 3 features)" in captured.err
    assert "setting epochs = 2 [user]: given by the caller" in captured.err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["defaults"]["repeat"] == out["defaults"]["repeat"]
    assert report["defaults"]["lr"]["source"] == "rule" and report["settings"]["lr"] == 0.05


def test_train_cli_fits_the_twin_core_asked_for(tmp_path, capsys):
    from labpnn.cli import main

    X, y = blobs()
    np.savez(tmp_path / "blobs.npz", X=X, y=y)
    code = main(["train", "--config", "examples/test-rig.toml", "--dataset", str(tmp_path / "blobs.npz"),
                 "--twin-core", "modulus", "--calibration-rows", "200", "--calibration-budget", "200",
                 "--twin-seconds", "2", "--epochs", "1", "--report", str(tmp_path / "rep"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["defaults"]["twin_core"]["value"] == "modulus" and report["defaults"]["twin_core"]["source"] == "user"
    assert report["twin_fit"]["settings"]["core"]["kind"] == "modulus"


@pytest.mark.slow
def test_demo_quick(tmp_path):
    from labpnn.benches.demo import run_demo

    summary = run_demo(tmp_path / "demo", bench="test", quick=True, epochs=2, progress=False,
                       calibration_rows=200, twin_seconds=3)
    assert set(summary["results"]) == {"pat", "insilico"}
    assert summary["results"]["insilico"]["passes"]["train"] == 0
    assert summary["results"]["pat"]["passes"]["train"] == 2 * 154
    for f in ("demo.json", "calibration.h5", "twin.pt", "pat/report.json", "insilico/report.json"):
        assert (tmp_path / "demo" / f).exists()


def test_frozen_physical_parameters_stay_where_they_started():
    from labpnn.benches import get_bench
    from labpnn.training.datasets import make_dataset

    rng = np.random.default_rng(0)
    X = rng.random((60, 3)).astype(np.float32)
    ds = make_dataset(X, (X[:, 0] > 0.5).astype(np.int64), ["a", "b"], ["f0", "f1", "f2"], name="t", seed=0)
    with get_bench("test").simulated_rig(seed=1) as rig:
        frozen = train(rig, ds, method="pat", epochs=2, seed=0, progress=False, calibration_rows=300,
                       twin_seconds=5, freeze_physical=True, repeat=1)
    from labpnn.training.network import build_network

    fresh = build_network(16, 3, 2, repeat=1, n_outputs=512, layout=frozen.settings["layout"], seed=0)
    np.testing.assert_array_equal(frozen.network.layers[0].theta.detach().numpy(),
                                  fresh.layers[0].theta.detach().numpy())  # the same start, untouched (copied)
    assert frozen.settings["freeze_physical"] is True


def test_online_twin_is_the_default_for_deep_pat(monkeypatch):
    """Unset, ``online_twin`` is on for PAT with 2+ layers when the twin can be refined online (it
    has ``snapshot``), off for one layer, for in-silico and for a twin that cannot be refined."""
    import labpnn.twin.online as online

    started = []

    class Fitter:  # stands in for OnlineTwinFitter: records that `train` started one
        def __init__(self, twin, **_):
            self.twin = twin

        def start(self):
            started.append(self)

        def feed(self, *_, **__):
            pass

        def drift(self, *_, **__):
            pass

        def stop(self):
            pass

    class RefinableTwin(RigTwin):
        def snapshot(self):
            return self

    monkeypatch.setattr(online, "OnlineTwinFitter", Fitter)
    ds = blob_dataset(0)
    sim = SimTestRig(16, 64, noise=0.01, seed=0)
    kw = dict(epochs=1, seed=0, batch_size=32, progress=False, drift_probe_rows=0)
    assert train(sim, ds, method="pat", twin=RefinableTwin(sim), layers=2, **kw).settings["online_twin"] is True
    assert len(started) == 1
    assert train(sim, ds, method="pat", twin=RefinableTwin(sim), layers=1, **kw).settings["online_twin"] is False
    assert train(sim, ds, method="insilico", twin=RefinableTwin(sim), layers=2, **kw).settings["online_twin"] is False
    assert train(sim, ds, method="pat", twin=RigTwin(sim), layers=2, **kw).settings["online_twin"] is False
    assert train(sim, ds, method="pat", twin=RefinableTwin(sim), layers=2, online_twin=False,
                 **kw).settings["online_twin"] is False
    assert len(started) == 1


def test_history_records_where_the_network_operates():
    """Every epoch's validation records the share of controls at the range's ends and the twin's
    error on the traces just measured: small for the rig's own map, large for a twin 50 % off."""
    ds = blob_dataset(1)
    sim = SimTestRig(16, 64, noise=0.01, seed=0)
    exact = train(sim, ds, method="pat", twin=RigTwin(sim, gap=0.0), epochs=3, seed=1, progress=False)
    wrong = train(sim, ds, method="pat", twin=RigTwin(sim, gap=0.5), epochs=3, seed=1, progress=False)
    for run in (exact, wrong):
        assert len(run.history) == 3
        assert all(0.0 <= h["controls_at_edges"] <= 1.0 for h in run.history)
    assert max(h["twin_error"] for h in exact.history) * 3 < min(h["twin_error"] for h in wrong.history)


def test_operating_point_counts_controls_at_the_edges():
    from labpnn.training.trainer import _Seen

    seen = _Seen(lambda c: c * 2.0)
    seen(torch.tensor([[0.0, 0.5, 1.0, 0.995], [0.2, 0.3, 0.011, 0.6]]))
    point = seen.operating_point(lambda c: c * 2.0, (0.0, 1.0))
    assert point["controls_at_edges"] == pytest.approx(3 / 8)  # 0.0, 1.0, 0.995 (0.011 is outside 1 %)
    assert point["twin_error"] == pytest.approx(0.0, abs=1e-7)
    assert seen.operating_point(lambda c: c * 3.0, (0.0, 1.0))["twin_error"] == pytest.approx(0.5, rel=1e-5)
    assert _Seen(None).operating_point(None, (0.0, 1.0)) == {}
