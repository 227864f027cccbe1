"""Sessions through the device server: import -> replay -> RigClient, and recording on both sides."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import labpnn.remote.client as client_mod
import labpnn.remote.server as server_mod
from labpnn.protocols.errors import InvalidControls  # noqa: E402
from labpnn.rig import Rig  # noqa: E402
from labpnn.sessions import RecordingSystem, SessionWriter, open_session  # noqa: E402
from labpnn.sessions.cli import import_session  # noqa: E402
from labpnn.sessions.replay import ReplayRig  # noqa: E402
from labpnn.sim_instruments.test_rig import SimTestRig  # noqa: E402

DeviceServer, RigClient = server_mod.DeviceServer, client_mod.RigClient


def _client(address):
    client = RigClient(address)
    lock = getattr(client, "lock", None)
    if lock is not None:
        lock()
    return client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def imported(tmp_path):
    rng = np.random.default_rng(11)
    x = rng.random((40, 5))
    y = rng.standard_normal((40, 16))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    np.savetxt(tmp_path / "y.csv", y, delimiter=",", header=",".join(f"p{i}" for i in range(16)), comments="")
    path = import_session(str(tmp_path / "x.csv"), str(tmp_path / "y.csv"), tmp_path / "imp.h5")
    return path, x.astype(np.float32), y.astype(np.float32)


def test_import_replay_rigclient_gets_the_imported_traces(imported):
    path, x, y = imported
    with DeviceServer(ReplayRig(path), bind="tcp://127.0.0.1:*", publish="") as server, \
            _client(server.address) as client:
        assert client.describe()["replay"]["mode"] == "exact"
        order = np.random.default_rng(0).permutation(40)[:16]
        np.testing.assert_array_equal(client.run(x[order]), y[order])
        with pytest.raises(InvalidControls, match="never measured"):
            client.run(np.full((1, 5), 0.123, np.float32))


def test_labpnn_replay_command_serves_a_session(imported):
    path, x, y = imported
    address = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "labpnn.cli", "replay", str(path), "--bind", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving 40 recorded rows" in line and address in line, (line, proc.stderr.read())
        with _client(address) as client:
            np.testing.assert_array_equal(client.run(x[:8]), y[:8])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "answering 8 rows" in out


def test_recording_on_the_lab_side_and_on_the_trainer_side(tmp_path):
    sim = SimTestRig(8, 64, seed=5)
    rig = Rig([sim], [sim], name="lab").connect()
    lab = SessionWriter(tmp_path / "lab.h5", rig.describe())
    rng = np.random.default_rng(2)
    batches = [rng.random((16, 8), dtype=np.float32) for _ in range(5)]
    with DeviceServer(RecordingSystem(rig, lab), bind="tcp://127.0.0.1:*", publish="") as server, \
            _client(server.address) as client:
        trainer = SessionWriter(tmp_path / "trainer.h5", client.describe())
        rec = RecordingSystem(client, trainer)
        got = [rec.run(b) for b in batches[:3]]
        rec.configure({"testrig": {"noise": 0.0}})
        many = rec.measure_many(batches[3:], max_in_flight=2)
        got += [m.traces for m in many]
        trainer.close()
        time.sleep(0.1)
    lab.close()
    for path in (tmp_path / "lab.h5", tmp_path / "trainer.h5"):
        with open_session(path) as r:
            assert r.n_batches == 5
            np.testing.assert_array_equal(r.controls, np.concatenate(batches))
            np.testing.assert_array_equal(r.traces, np.concatenate(got))
            assert any(e["kind"] == "configure" for e in r.events)


def test_replay_label_reaches_a_remote_client(tmp_path):
    """A nearest-neighbour answer is labelled in the reply meta and the flags, over the wire too."""
    import numpy as np

    from labpnn.contract import Measurement
    from labpnn.drivers.roles import FLAG_REPLAY_APPROX
    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer
    from labpnn.sessions import SessionWriter
    from labpnn.sessions.replay import ReplayRig

    controls = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    traces = np.random.default_rng(1).random((8, 16), dtype=np.float32)
    path = tmp_path / "s.h5"
    describe = {"name": "t", "n_controls": 4, "n_outputs": 16,
                "axis": {"name": "pixel", "unit": "1", "values": list(range(16))}}
    with SessionWriter(path, describe) as writer:
        writer.append(Measurement(controls, traces, controls, np.zeros(8), np.zeros(8, np.uint32)))
    with DeviceServer(ReplayRig([path], mode="nearest"), bind="tcp://127.0.0.1:*", publish="") as server, \
            RigClient(server.address) as client:
        measured = client.measure(np.clip(controls[:2] + 0.01, 0, 1))
        assert measured.meta["replay"] == "nearest"
        assert (measured.flags & FLAG_REPLAY_APPROX).all()
        np.testing.assert_array_equal(measured.traces, traces[:2])


@pytest.mark.slow
def test_serve_record_keeps_a_lab_side_session(tmp_path):
    """`labpnn serve --record DIR`: every batch any client runs lands in a session in DIR."""
    import os
    import signal
    import subprocess
    import sys

    import numpy as np

    from labpnn.remote.client import RigClient
    from labpnn.sessions import open_session

    proc = subprocess.Popen(
        [sys.executable, "-m", "labpnn.cli", "serve", "--config", "examples/test-rig.toml",
         "--bind", "tcp://127.0.0.1:*", "--publish", "", "--record", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = None
        for _ in range(5):
            line = proc.stdout.readline()
            if "listening on" in line:
                address = line.split("listening on ")[1].split(",")[0].strip()
                break
        assert address, proc.stderr.read()
        with RigClient(address) as client:
            client.run(np.full((3, 16), 0.5, np.float32))
            client.run(np.full((2, 16), 0.25, np.float32))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    (path,) = sorted(tmp_path.glob("*.h5"))
    with open_session(path) as session:
        assert session.n_rows == 5
        np.testing.assert_array_equal(session.controls[3:], np.full((2, 16), 0.25, np.float32))
