"""ReplayRig, `labpnn import` and `labpnn inspect`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from labpnn.cli import main as labpnn
from labpnn.contract import PhysicalSystem
from labpnn.protocols.errors import BadSetting, InvalidControls
from labpnn.rig import Rig
from labpnn.sessions import RecordingSystem, SessionWriter, open_session
from labpnn.sessions.cli import ImportProblem, import_session
from labpnn.sessions.replay import FLAG_REPLAY_APPROX, NotRecorded, ReplayRig
from labpnn.sim_instruments.test_rig import SimTestRig


@pytest.fixture()
def recorded(tmp_path):
    """A session of a noisy test rig, with some controls measured twice (different noise)."""
    sim = SimTestRig(6, 40, noise=0.05, seed=3)
    rig = Rig([sim], [sim], name="noisy").connect()
    rng = np.random.default_rng(0)
    path = tmp_path / "rec.h5"
    base = rng.random((20, 6), dtype=np.float32)
    with SessionWriter(path, rig.describe()) as w:
        rec = RecordingSystem(rig, w)
        with rec.tagged("calibration"):
            rec.run(base[:12])
        rec.run(base[8:20])  # rows 8..11 measured a second time
    return path


def test_write_read_replay_gives_back_identical_arrays(recorded):
    with open_session(recorded) as r:
        controls, traces, applied, flags = r.controls, r.traces, r.applied, r.flags
    assert not np.array_equal(traces[8:12], traces[12:16])  # the repeats differ by noise
    rig = ReplayRig(recorded)
    assert isinstance(rig, PhysicalSystem)
    m = rig.measure(controls)  # the whole session in recorded order
    np.testing.assert_array_equal(m.traces, traces)
    np.testing.assert_array_equal(m.applied, applied)
    np.testing.assert_array_equal(m.flags, flags)
    assert m.meta["replay"] == "exact" and m.meta["n_approximate"] == 0
    d = rig.describe()
    assert d["replay"]["mode"] == "exact" and d["replay"]["tolerance"] == 1e-6
    assert d["replay"]["source"] == [str(recorded)] and d["n_outputs"] == 40
    order = np.random.default_rng(1).permutation(8)  # any order
    np.testing.assert_array_equal(rig.run(controls[order]), traces[order])


def test_replay_refuses_unmeasured_controls_clearly(recorded):
    rig = ReplayRig(recorded)
    with open_session(recorded) as r:
        known = r.controls[:3].copy()
    unknown = known.copy()
    unknown[1, 2] = min(1.0, unknown[1, 2] + 0.01)
    with pytest.raises(NotRecorded, match=r"row 1 were never measured.*nearest record is 0\.01") as info:
        rig.run(unknown)
    assert isinstance(info.value, InvalidControls) and info.value.details["row"] == 1
    with pytest.raises(InvalidControls):
        rig.run(np.full((1, 6), 1.5, np.float32))
    nudged = np.where(known < 0.5, known + np.float32(5e-7), known - np.float32(5e-7))
    m = rig.measure(nudged)  # within the default tolerance: the recorded rows, not approximations
    np.testing.assert_array_equal(m.traces, rig.run(known))
    assert m.meta["source_rows"] == [0, 1, 2] and 0 < m.meta["max_distance"] <= 1e-6
    assert not (m.flags & FLAG_REPLAY_APPROX).any()
    with pytest.raises(NotRecorded):
        ReplayRig(recorded, tolerance=0.0).run(nudged)


def test_nearest_mode_is_opt_in_and_labelled(recorded):
    rig = ReplayRig(recorded, mode="nearest")
    assert rig.describe()["replay"]["answers_unmeasured_controls"] is True
    with open_session(recorded) as r:
        known, traces = r.controls[:2].copy(), r.traces[:2]
    query = known.copy()
    query[0] = np.clip(query[0] + 0.003, 0, 1)
    m = rig.measure(query)
    assert m.meta["replay"] == "nearest" and m.meta["n_approximate"] == 1
    assert m.meta["max_distance"] == pytest.approx(0.003, abs=1e-4)
    assert m.flags[0] & FLAG_REPLAY_APPROX and not m.flags[1] & FLAG_REPLAY_APPROX
    np.testing.assert_array_equal(m.traces, traces)  # the nearest record of row 0 is row 0
    twin = ReplayRig(recorded, mode="twin", twin=lambda x: np.zeros((x.shape[0], 40), np.float32))
    t = twin.measure(query)
    assert t.meta["replay"] == "twin" and t.meta["source_rows"][0] == -1 and not t.traces[0].any()


def test_replay_settings_are_fixed(recorded):
    rig = ReplayRig(recorded)
    recorded_noise = rig.describe()["settings"]["testrig"]["noise"]
    assert rig.configure({"testrig": {"noise": recorded_noise}}) == {"testrig": rig.describe()["settings"]["testrig"]}
    with pytest.raises(BadSetting, match="cannot change"):
        rig.configure({"testrig": {"noise": 0.5}})


def test_replay_by_tag_and_several_sessions(recorded, tmp_path):
    calib = ReplayRig(recorded, tags=("calibration",))
    assert calib.describe()["replay"]["rows"] == 12
    both = ReplayRig([recorded, recorded])
    assert both.describe()["replay"]["rows"] == 48


def _write_csv(path, array, header=None):
    np.savetxt(path, array, delimiter=",", header=",".join(header) if header else "", comments="")


def test_traces_beyond_the_memory_limit_are_read_from_the_files(recorded, tmp_path):
    other = tmp_path / "other.h5"
    import shutil

    shutil.copy(recorded, other)
    kwargs = {"tags": ["calibration", "train"], "mode": "nearest"}
    in_memory = ReplayRig([recorded, other], **kwargs)
    from_files = ReplayRig([recorded, other], max_memory_bytes=0, **kwargs)
    assert in_memory.describe()["replay"]["traces"] == "memory"
    assert from_files.describe()["replay"]["traces"] == "files"
    with open_session(recorded) as r:
        controls = r.controls
    rng = np.random.default_rng(2)
    for _ in range(4):  # any order, repeats (each answered in turn), and rows between records
        x = controls[rng.integers(0, controls.shape[0], 9)]
        x[0] = np.clip(x[0] + 0.003, 0, 1)
        a, b = in_memory.measure(x), from_files.measure(x)
        np.testing.assert_array_equal(a.traces, b.traces)
        assert a.meta == b.meta
    from_files.close()
    with pytest.raises(RuntimeError, match="closed"):
        from_files.run(controls[:1])


def test_import_csv_then_replay(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.random((30, 4))
    y = rng.standard_normal((30, 9))
    _write_csv(tmp_path / "x.csv", x, header=["a", "b", "c", "d"])
    _write_csv(tmp_path / "y.csv", y)  # no header row
    out = tmp_path / "imp.h5"
    assert labpnn(["import", "--controls", str(tmp_path / "x.csv"), "--traces", str(tmp_path / "y.csv"),
                   "-o", str(out), "--batch-rows", "8", "--axis-name", "frequency", "--axis-unit", "GHz"]) == 0
    with open_session(out) as r:
        assert r.n_rows == 30 and r.n_batches == 4 and set(r.tags) == {"calibration"}
        np.testing.assert_array_equal(r.controls, x.astype(np.float32))  # kept as they are
        np.testing.assert_array_equal(r.traces, y.astype(np.float32))
        assert np.isnan(r.timestamps).all()
        assert r.axis["name"] == "frequency" and r.axis["unit"] == "GHz"
        assert r.describe["import"]["controls_scaling"] is None
        assert r.describe["import"]["sources"]["controls"]["header"] == ["a", "b", "c", "d"]
        assert any(e["kind"] == "import" for e in r.events)
    rig = ReplayRig(out)
    np.testing.assert_array_equal(rig.run(x[::-1].astype(np.float32)), y[::-1].astype(np.float32))


def test_import_npz_refuses_unscaled_controls_and_records_scaling(tmp_path):
    rng = np.random.default_rng(8)
    volts = rng.uniform(-5, 5, (10, 3))
    traces = rng.random((10, 6))
    np.savez(tmp_path / "data.npz", controls=volts, traces=traces)
    src = str(tmp_path / "data.npz")
    with pytest.raises(ImportProblem, match=r"must lie in \[0, 1\].*--scale-controls"):
        import_session(src, src, tmp_path / "a.h5")
    assert not (tmp_path / "a.h5").exists()
    assert labpnn(["import", "--controls", src, "--traces", src, "-o", str(tmp_path / "a.h5")]) == 2
    with pytest.raises(ImportProblem, match="outside the range"):
        import_session(src, src, tmp_path / "a.h5", scale=["-1", "1"])
    out = import_session(f"{src}:controls", f"{src}:traces", tmp_path / "b.h5", scale=["-5", "5"], tag="train")
    with open_session(out) as r:
        np.testing.assert_allclose(r.controls, (volts + 5) / 10, atol=1e-7)
        scaling = r.describe["import"]["controls_scaling"]
        assert scaling["kind"] == "fixed range" and scaling["low"] == [-5.0] * 3 and scaling["high"] == [5.0] * 3
        assert set(r.tags) == {"train"}
    auto = import_session(src, src, tmp_path / "c.h5", scale=["auto"])
    with open_session(auto) as r:
        assert r.controls.min() == 0.0 and r.controls.max() == 1.0
        assert r.describe["import"]["controls_scaling"]["low"] == volts.min(axis=0).tolist()
    with pytest.raises(ImportProblem, match="one measurement per row"):
        np.savez(tmp_path / "bad.npz", controls=volts[:5], traces=traces)
        import_session(str(tmp_path / "bad.npz"), str(tmp_path / "bad.npz"), tmp_path / "d.h5", scale=["auto"])


def test_inspect_text_json_and_plot(recorded, tmp_path, capsys):
    assert labpnn(["inspect", str(recorded)]) == 0
    text = capsys.readouterr().out
    assert "24 in 2 batches" in text and "calibration 12, train 12" in text and "testrig" in text
    png = tmp_path / "view.png"
    assert labpnn(["inspect", str(recorded), "--json", "--plot", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_rows"] == 24 and summary["tags"] == {"calibration": 12, "train": 12}
    assert summary["n_controls"] == 6 and summary["segments"][0]["rows"] == 24
    assert summary["provenance"]["versions"]["h5py"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert labpnn(["inspect", str(tmp_path / "nope.h5")]) == 2


def test_recording_a_nearest_replay_keeps_the_label(recorded, tmp_path, capsys):
    rig = ReplayRig(recorded, mode="nearest")
    with open_session(recorded) as r:
        query = np.clip(r.controls[:4] + np.float32(0.01), 0, 1)
    out = tmp_path / "offline.h5"
    with SessionWriter(out, rig.describe()) as w:
        RecordingSystem(rig, w).run(query)
    with open_session(out) as r:
        (batch,) = list(r.batches())
        assert batch.meta["replay"] == "nearest" and batch.meta["n_approximate"] == 4
        assert r.describe["replay"]["mode"] == "nearest"
        assert (r.flags & FLAG_REPLAY_APPROX).all()
    assert labpnn(["inspect", str(out)]) == 0
    assert "4 rows were APPROXIMATE" in capsys.readouterr().out
