"""Session files: writer, reader, recording wrapper; crash safety, growing files, a full disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from labpnn.contract import Measurement
from labpnn.protocols.errors import Aborted, InvalidControls
from labpnn.rig import Rig
from labpnn.sessions import (
    TAG_VOCABULARY,
    RecordingSystem,
    SessionWriteError,
    SessionWriter,
    open_session,
    provenance,
    record_to,
)
from labpnn.sim_instruments.test_rig import SimTestRig

sys.path.insert(0, str(Path(__file__).parent))
from session_worker import DESCRIBE, expected, tag_of  # noqa: E402

WORKER = str(Path(__file__).parent / "session_worker.py")
PER_ROW = ("traces", "controls", "applied", "timestamps", "flags", "batch_id", "tag")


def _measurement(rng, n, C=3, S=5, n_done=None, error=None):
    controls = rng.random((n, C), dtype=np.float32)
    done = n if n_done is None else n_done
    traces = rng.standard_normal((done, S)).astype(np.float32)
    return Measurement(controls, traces, controls[:done] * 0.9, time.time() + np.arange(done, dtype=np.float64),
                       np.arange(done, dtype=np.uint32), error, busy_s=0.01 * done)


def _describe(C=3, S=5):
    return {"name": "unit", "n_controls": C, "n_outputs": S,
            "axis": {"name": "wavelength", "unit": "nm", "values": [500.0 + i for i in range(S)]},
            "instruments": {"osa": "YOKOGAWA,AQ6370,0,1"}, "settings": {"osa": {"span": 10}}}


def _worker(path, *args):
    return subprocess.Popen([sys.executable, WORKER, str(path), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _check_against_worker(reader, at_least):
    """Every batch the reader shows is intact and complete; at least `at_least` batches."""
    assert reader.n_batches >= at_least
    lengths = {getattr(reader, name).shape[0] for name in ("traces", "controls", "applied", "timestamps",
                                                           "flags", "batch_ids", "tags")}
    assert lengths == {reader.n_rows}
    for k, batch in enumerate(reader.batches()):
        want = expected(batch.batch_id)
        assert batch.batch_id == k and batch.tag == tag_of(k)
        for name in ("controls", "traces", "applied", "timestamps", "flags"):
            np.testing.assert_array_equal(getattr(batch, name), getattr(want, name))


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_write_read_round_trip(tmp_path, writer):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.h5"
    sent = []
    with SessionWriter(path, _describe(), provenance={"seeds": {"torch": 3}}, writer=writer) as w:
        for i in range(6):
            m = _measurement(rng, 4 + i)
            assert w.append(m, tag=["calibration", "train", "eval"][i % 3]) == i
            sent.append(m)
        failed = _measurement(rng, 5, n_done=2, error=Aborted("stop", details={"n_done": 2}))
        assert w.append(failed, tag="pat-step") == 6  # a tag outside the vocabulary
        sent.append(failed)
        w.event("alarm", "temperature high", value=np.float32(41.5), where=np.arange(2))
    with open_session(path) as r:
        assert r.n_batches == 7 and r.n_rows == sum(m.n_done for m in sent)
        np.testing.assert_array_equal(r.controls, np.concatenate([m.controls[:m.n_done] for m in sent]))
        np.testing.assert_array_equal(r.traces, np.concatenate([m.traces for m in sent]))
        np.testing.assert_array_equal(r.applied, np.concatenate([m.applied for m in sent]))
        np.testing.assert_array_equal(r.timestamps, np.concatenate([m.timestamps for m in sent]))
        np.testing.assert_array_equal(r.flags, np.concatenate([m.flags for m in sent]))
        np.testing.assert_array_equal(r.batch_ids, np.repeat(np.arange(7), [m.n_done for m in sent]))
        assert list(r.tags[:4]) == ["calibration"] * 4 and r.tags[-1] == "pat-step"
        assert r.tag_names[: len(TAG_VOCABULARY)] == list(TAG_VOCABULARY)
        np.testing.assert_array_equal(r.select(tags=("calibration",)),
                                      np.flatnonzero(r.tags == "calibration"))
        np.testing.assert_array_equal(r.select("eval", batches=[5]), np.flatnonzero(r.batch_ids == 5))
        batches = list(r.batches())
        assert [b.batch_id for b in batches] == list(range(7))
        bid, tag, rows = batches[1]
        assert (bid, tag) == (1, "train") and r.traces[rows].shape == (5, 5)
        assert batches[-1].n_sent == 5 and batches[-1].error == "ABORTED" and batches[-1].traces.shape == (2, 5)
        assert [b.batch_id for b in r.batches(tags="eval")] == [2, 5]
        assert r.describe["instruments"] == {"osa": "YOKOGAWA,AQ6370,0,1"}
        assert r.axis["name"] == "wavelength" and r.axis["unit"] == "nm"
        np.testing.assert_array_equal(r.axis["values"], 500.0 + np.arange(5))
        prov = r.provenance
        assert prov["seeds"] == {"torch": 3} and prov["versions"]["h5py"] == h5py.__version__
        assert {"host", "python", "git", "time"} <= set(prov)
        alarm = next(e for e in r.events if e["kind"] == "alarm")
        assert alarm["message"] == "temperature high" and alarm["data"] == {"value": 41.5, "where": [0, 1]}
        assert r.events[-1]["kind"] == "close"
    with h5py.File(path, "r") as f:  # NeXus-flavoured for generic viewers
        assert f.attrs["default"] == "entry" and f["entry"].attrs["NX_class"] == "NXentry"
        data = f["entry/data"]
        assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "traces"
        assert list(data.attrs["axes"]) == [".", "output_axis"]
        assert data["output_axis"].attrs["units"] == "nm"
        assert f["entry/controls"].attrs["signal"] == "controls"
        assert f["entry/data/traces"].compression is None


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression_is_optional(tmp_path, compression):
    rng = np.random.default_rng(9)
    ms = [_measurement(rng, n, S=300) for n in (64, 70, 3)]
    with SessionWriter(tmp_path / "c.h5", _describe(S=300), compression=compression) as w:
        for m in ms:
            w.append(m)
    with open_session(tmp_path / "c.h5") as r:
        np.testing.assert_array_equal(r.traces, np.concatenate([m.traces for m in ms]))
        assert r.segments[0].ds["traces"].compression == compression
    with pytest.raises(ValueError, match="compression"):
        SessionWriter(tmp_path / "d.h5", _describe(), compression="zstd")


def test_append_copies_so_caller_may_reuse_buffers(tmp_path):
    rng = np.random.default_rng(2)
    m = _measurement(rng, 4)
    original = m.traces.copy()
    with SessionWriter(tmp_path / "s.h5", _describe(), queue_batches=1) as w:
        w.append(m)
        m.traces[:] = -1.0
        m.controls[:] = 0.0
    with open_session(tmp_path / "s.h5") as r:
        np.testing.assert_array_equal(r.traces, original)
        assert r.controls.min() > 0


def test_refuses_to_overwrite_and_bad_tags(tmp_path):
    path = tmp_path / "s.h5"
    with SessionWriter(path, _describe()) as w, pytest.raises(ValueError, match="tag"):
        w.append(_measurement(np.random.default_rng(0), 2), tag="x" * 40)
    with pytest.raises(FileExistsError):
        SessionWriter(path, _describe())


def test_full_queue_applies_back_pressure_and_drops_nothing(tmp_path, monkeypatch):
    from labpnn.sessions import layout as session

    slow = session._SegmentFile.write_batches

    def write_slowly(self, batches):
        time.sleep(0.01)
        slow(self, batches)

    monkeypatch.setattr(session._SegmentFile, "write_batches", write_slowly)
    rng = np.random.default_rng(3)
    with SessionWriter(tmp_path / "s.h5", _describe(), queue_batches=2) as w:
        for _ in range(40):
            w.append(_measurement(rng, 3))
        assert w.stats["blocked_s"] > 0
    with open_session(tmp_path / "s.h5") as r:
        assert r.n_batches == 40 and r.n_rows == 120


def test_new_segment_when_the_output_shape_changes(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "s.h5"
    with SessionWriter(path, _describe()) as w:
        w.append(_measurement(rng, 3))
        w.append(_measurement(rng, 2, S=7))  # another output length: continues in s.seg1.h5
        w.append(_measurement(rng, 4, S=7))
        w.flush()
        assert [p.name for p in w.segments] == ["s.h5", "s.seg1.h5"]
    assert (tmp_path / "s.seg1.h5").exists()
    for opened in (path, tmp_path / "s.seg1.h5"):  # any segment opens the whole session
        with open_session(opened) as r:
            assert len(r.segments) == 2 and r.n_rows == 9 and r.n_batches == 3
            assert [b.batch_id for b in r.batches()] == [0, 1, 2]
            assert [b.traces.shape[1] for b in r.batches()] == [5, 7, 7]
            assert r.segments[1].read("traces").shape == (6, 7)
            np.testing.assert_array_equal(r.batch_ids, [0, 0, 0, 1, 1, 2, 2, 2, 2])
            with pytest.raises(ValueError, match="segments"):
                r.traces  # noqa: B018
            seg_event = next(e for e in r.events if e["kind"] == "segment")
            assert "s.seg1.h5" in seg_event["message"] and seg_event["segment"] == 0


def _test_rig(**kw):
    sim = SimTestRig(6, 32, **kw)
    return Rig([sim], [sim], name="test-rig").connect()


def test_recording_system_logs_configure_refusals_and_aborts(tmp_path):
    rig = _test_rig(noise=0.0)
    rng = np.random.default_rng(5)
    path = tmp_path / "rec.h5"
    with SessionWriter(path, rig.describe()) as w:
        rec = RecordingSystem(rig, w)
        assert rec.describe()["n_controls"] == 6
        with rec.tagged("calibration"):
            rec.run(rng.random((4, 6), dtype=np.float32))
        assert rec.tag == "train"
        rec.run(rng.random((3, 6), dtype=np.float32))
        result = rec.configure({"testrig": {"noise": 0.05}})  # mid-session change
        assert result["testrig"]["noise"] == 0.05
        with pytest.raises(InvalidControls):
            rec.run(np.full((2, 6), 2.0, np.float32))
        stop = threading.Event()
        stop.set()
        m = rec.measure(rng.random((5, 6), dtype=np.float32), abort=stop)
        assert m.n_done == 0 and isinstance(m.error, Aborted)
        rec.safe_state()
    with open_session(path) as r:
        kinds = [e["kind"] for e in r.events]
        assert kinds[:4] == ["configure", "refused", "abort", "safe_state"]
        configure = r.events[0]
        assert configure["data"]["settings"] == {"testrig": {"noise": 0.05}}
        assert configure["data"]["result"]["testrig"]["noise"] == 0.05
        assert r.events[1]["data"]["code"] == "INVALID_CONTROLS"
        assert r.events[2]["data"]["n_sent"] == 5 and r.events[2]["data"]["n_done"] == 0
        assert r.n_batches == 3 and r.n_rows == 7 and len(r.segments) == 1
        assert list(np.unique(r.tags)) == ["calibration", "train"]
        assert r.batch_table()["error"][-1] == b"ABORTED"


def test_record_to_directory_owns_its_writer(tmp_path):
    rig = _test_rig()
    rec = record_to(tmp_path / "lab", rig, seeds=[1, 2])
    rec.run(np.full((2, 6), 0.5, np.float32))
    rec.close()
    (path,) = (tmp_path / "lab").glob("*.h5")
    assert path.name.startswith("test-rig-")
    with open_session(path) as r:
        assert r.n_rows == 2 and r.provenance["seeds"] == [1, 2]


def test_provenance_does_not_import_torch():
    code = "import sys; from labpnn.sessions import provenance; provenance(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert provenance(seeds=[3])["seeds"] == [3]


def test_reader_in_another_process_sees_rows_appear(tmp_path):
    path = tmp_path / "growing.h5"
    proc = _worker(path, "--period", "0.01", "--flush-every", "1000")
    try:
        assert proc.stdout.readline().startswith("ready")
        with open_session(path) as r:
            seen = [r.n_rows]
            deadline = time.monotonic() + 10
            while len(set(seen)) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
                new = r.refresh()
                assert new >= 0
                seen.append(r.n_rows)
            assert len(set(seen)) >= 4, f"rows did not grow: {seen}"
            assert seen == sorted(seen)
            _check_against_worker(r, 1)
            assert any(e["kind"] == "tick" for e in r.events)
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_mid_run_leaves_every_flushed_batch(tmp_path):
    path = tmp_path / "killed.h5"
    proc = _worker(path, "--flush-every", "10")
    flushed = 0
    for line in proc.stdout:
        if line.startswith("flushed"):
            flushed = int(line.split()[1])
            if flushed >= 60:
                break
    time.sleep(0.003)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flushed >= 60
    with open_session(path) as r:  # opens without repair (no h5clear)
        _check_against_worker(r, flushed)
        assert all(e["kind"] in ("tick", "close") for e in r.events)
        assert r.segments[0].uncommitted_rows >= 0
    with h5py.File(path, "r", swmr=True) as f:
        lengths = [f["entry/data"][name].shape[0] for name in PER_ROW]
        assert min(lengths) >= r.n_rows  # raw datasets hold at least every committed row


@pytest.mark.parametrize("space_check", [True, False], ids=["refused-before-writing", "write-fails"])
def test_full_disk_gives_a_clear_error_and_keeps_earlier_data(tmp_path, space_check):
    path = tmp_path / "full.h5"
    args = ["--fsize", 2_000_000, "--flush-every", "5"] + ([] if space_check else ["--no-space-check"])
    proc = _worker(path, *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, (out, err)
    lines = out.splitlines()
    flushed = max(int(ln.split()[1]) for ln in lines if ln.startswith("flushed"))
    error = next(ln for ln in lines if ln.startswith("error"))
    assert "disk full or file size limit reached" in error and "stay readable" in error
    assert any(ln.startswith("close") for ln in lines)  # close() raises it too
    assert "Segmentation" not in err
    with open_session(path) as r:
        _check_against_worker(r, flushed)
        if space_check:
            assert r.events[-1]["kind"] == "write_error"


def test_write_error_reaches_recording_system_with_the_measurement(tmp_path):
    rig = _test_rig()
    w = SessionWriter(tmp_path / "s.h5", rig.describe())
    rec = RecordingSystem(rig, w)
    w._error = SessionWriteError("disk full (simulated)")
    with pytest.raises(SessionWriteError, match="simulated") as info:
        rec.measure(np.full((2, 6), 0.5, np.float32))
    assert info.value.measurement is not None and info.value.measurement.n_done == 2
    quiet = RecordingSystem(rig, w, on_write_error="warn")
    assert quiet.run(np.full((1, 6), 0.5, np.float32)).shape == (1, 32)
    w._error = None
    w.close()


def test_worker_describe_matches_session(tmp_path):
    path = tmp_path / "w.h5"
    proc = _worker(path, "--batches", "3")
    out, _ = proc.communicate(timeout=30)
    assert "done" in out
    with open_session(path) as r:
        assert r.describe == json.loads(json.dumps(DESCRIBE))
        assert r.axis["unit"] == "nm" and r.n_batches == 3


def test_writer_process_outlives_a_killed_caller_and_closes_the_file(tmp_path):
    path = tmp_path / "orphan.h5"
    proc = _worker(path, "--writer", "process", "--flush-every", "10")
    child = int(proc.stdout.readline().split()[1])
    flushed = 0
    for line in proc.stdout:
        if line.startswith("flushed"):
            flushed = int(line.split()[1])
            if flushed >= 40:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the writer process sees its input end and closes the file
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the writer process did not end after its caller was killed")
    with open_session(path) as r:
        _check_against_worker(r, flushed)
        assert r.segments[0].uncommitted_rows == 0


def test_a_dead_writer_process_is_reported(tmp_path):
    w = SessionWriter(tmp_path / "s.h5", _describe(), writer="process")
    w.append(_measurement(np.random.default_rng(0), 3))
    w.flush()
    w._proc.kill()
    w._proc.wait()
    with pytest.raises(SessionWriteError, match="writer process has stopped"):
        for _ in range(50):
            w.append(_measurement(np.random.default_rng(0), 3))
            time.sleep(0.01)
    with pytest.raises(SessionWriteError):
        w.close()
    with open_session(tmp_path / "s.h5") as r:
        assert r.n_batches >= 1
