"""Device server and RigClient over real sockets: round trip, lock and lease, retries, abort,
instrument failure, progress, live stream, CURVE, and the `serve`/`keys`/`monitor` commands."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_alive, assert_same_map, controls, make_test_rig

from labpnn.protocols import codec
from labpnn.protocols.errors import (
    Aborted,
    AuthFailed,
    InstrumentFailure,
    LabpnnError,
    Locked,
    NotLocked,
    RequestTimeout,
)
from labpnn.remote.client import RigClient
from labpnn.remote.server import DeviceServer, InsecureBind, is_loopback

REPO = Path(__file__).resolve().parents[1]


# -- round trip ---------------------------------------------------------------------------------------
def test_round_trip_equals_the_in_process_rig(make_server, make_client):
    server = make_server(rig={"seed": 3, "n_outputs": 128})
    local, local_sim = make_test_rig(n_outputs=128, seed=3)
    client = make_client(server)
    desc = client.describe()
    assert desc["n_controls"] == 16 and desc["n_outputs"] == 128 and desc == local.describe()
    for i, rows in enumerate([1, 5, 32]):
        x = controls(rows, seed=i)
        m = client.measure(x)
        ref = local.measure(x)
        assert_same_map(m.traces, ref.traces, local_sim, x)
        np.testing.assert_array_equal(m.applied, ref.applied)
        assert m.traces.dtype == np.float32 and m.timestamps.dtype == np.float64 and m.flags.dtype == np.uint32
        assert m.error is None and m.n_done == rows and m.busy_s >= 0
        assert np.all(np.diff(m.timestamps) >= 0) and abs(m.timestamps[-1] - time.time()) < 5
    many = [controls(4, seed=10 + i) for i in range(6)]
    got = list(client.measure_many(many, max_in_flight=3))
    batches = [m.meta["batch"] for m in got]
    assert batches == sorted(batches) and len(set(batches)) == 6
    for m, x in zip(got, many, strict=True):
        assert_same_map(m.traces, local.run(x), local_sim, x)
    status = client.status()
    assert status["rows_done"] == 38 + 24 and status["batches_done"] == 9 and status["state"] == "idle"
    assert status["lock"]["you"] and status["lock"]["holder"] != client.token


def test_plain_physical_system_is_wrapped(make_server, make_client):
    from labpnn.sim_instruments.test_rig import SimTestRig

    server = make_server(SimTestRig(16, 32, seed=5))
    client = make_client(server)
    x = controls(3)
    local = SimTestRig(16, 32, seed=5)
    assert_same_map(client.run(x), local.run(x), local, x)
    with pytest.raises(LabpnnError, match="NaN"):
        client.run(np.full((1, 16), np.nan, np.float32))
    assert client.status()["busy_s"] > 0
    assert_alive(server)


def test_configure_validates_and_updates_describe(make_server, make_client):
    server = make_server()
    client = make_client(server)
    assert client.configure({"testrig": {"noise": 0.0}}) == {"testrig": {
        "noise": 0.0, "latency_s": 0.0, "zero_cost": False, "max_mean_control": 1.0}}
    assert client.describe()["settings"]["testrig"]["noise"] == 0.0
    with pytest.raises(LabpnnError) as info:
        client.configure({"testrig": {"noise": -1}})
    assert info.value.code == "BAD_SETTING" and "noise" in str(info.value)
    with pytest.raises(LabpnnError, match="no instrument named 'laser'"):
        client.configure({"laser": {"power": 1}})
    assert_alive(server)


# -- lock and lease -------------------------------------------------------------------------------------
def test_lock_contention_and_identity(make_server, make_client):
    server = make_server()
    alice, bob = make_client(server), make_client(server)
    alice.run(controls(1))  # auto_lock
    with pytest.raises(Locked) as info:
        bob.run(controls(1))
    assert info.value.details["holder"] == alice.hello()["identity"]
    with pytest.raises(Locked):
        bob.lock()
    with pytest.raises(Locked):
        bob.configure({"testrig": {"noise": 0.0}})
    with pytest.raises(Locked):
        bob.abort()
    status = bob.status()
    assert status["lock"]["held"] and not status["lock"]["you"] and alice.token not in str(status)
    # a second client object with alice's token *is* alice (e.g. after a crash and restart)
    alice2 = make_client(server, token=alice.token)
    assert alice2.status()["lock"]["you"]
    alice.unlock()
    bob.run(controls(1))
    nobody = make_client(server, auto_lock=False)
    with pytest.raises(Locked):
        nobody.run(controls(1))
    bob.unlock()
    with pytest.raises(NotLocked):
        nobody.run(controls(1))
    assert nobody.unlock() == {"released": False}
    assert_alive(server)


def test_lease_expires_after_silence_and_auto_lock_retakes_it(make_server, make_client):
    server = make_server(lease_s=0.3)
    alice, bob = make_client(server), make_client(server)
    alice.run(controls(1))
    time.sleep(0.45)
    assert not bob.status()["lock"]["held"]
    alice.run(controls(1))  # NOT_LOCKED -> auto_lock takes the lock again and resends
    assert alice.status()["lock"]["you"] and server.sim.actuations == 2
    time.sleep(0.45)
    bob.lock()
    with pytest.raises(Locked):  # now bob has it
        alice.run(controls(1))
    assert server.sim.actuations == 2


def test_measure_many_retakes_an_expired_lease_and_resends_what_was_refused(make_server, make_client):
    server = make_server(lease_s=0.3)
    client = make_client(server)
    local, _ = make_test_rig()
    client.run(controls(1))
    time.sleep(0.45)  # the lease runs out
    batches = [controls(2, seed=i) for i in range(6)]
    got = list(client.measure_many(batches, max_in_flight=3))
    assert [m.n_done for m in got] == [2] * 6 and server.sim.actuations == 1 + 12  # the refused ones did nothing
    for m, x in zip(got, batches, strict=True):
        np.testing.assert_array_equal(m.controls, x)
    assert client.status()["lock"]["you"]
    assert_alive(server)


def test_lease_is_kept_while_the_holders_batch_runs(make_server, make_client):
    server = make_server(lease_s=0.25, rig={"latency_s": 0.1})
    alice, bob = make_client(server), make_client(server)
    alice.lock()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("m", alice.measure(controls(7))))
    thread.start()
    time.sleep(0.5)  # twice the lease, mid-batch
    with pytest.raises(Locked):
        bob.lock()
    running = bob.status()
    assert running["state"] == "running" and running["running"]["total"] == 7
    thread.join()
    assert result["m"].n_done == 7
    assert alice.status()["lock"]["you"]


# -- retries never actuate twice ---------------------------------------------------------------------
def test_retried_id_gets_the_cached_reply(make_server, raw_peer):
    server = make_server()
    peer = raw_peer(server)
    peer.call("lock", id="l1", token="tok")
    frames = codec.encode_request("run", {}, {"controls": controls(3)}, id="same", token="tok")
    first, a = peer.request(frames)
    second, b = peer.request(frames)
    assert first.ok and second.ok and first.result == second.result
    np.testing.assert_array_equal(a["traces"], b["traces"])
    assert server.sim.actuations == 3
    other = codec.encode_request("ping", id="same", token="tok")
    reply, _ = peer.request(other)
    assert reply.error.code == "BAD_REQUEST" and "already used" in reply.error.message
    assert_alive(server)


def test_retry_from_a_new_socket_attaches_to_the_running_batch(make_server, raw_peer):
    server = make_server(rig={"latency_s": 0.05})
    first = raw_peer(server)
    first.call("lock", id="l1", token="tok")
    frames = codec.encode_request("run", {}, {"controls": controls(6)}, id="run-x", token="tok")
    first.send(frames)
    time.sleep(0.1)
    first.close()  # the client "crashed"; a new socket has a new routing id
    second = raw_peer(server)
    reply, arrays = second.request(frames, timeout_s=5)
    assert reply.ok and reply.result["n_done"] == 6 and arrays["traces"].shape == (6, 64)
    assert server.sim.actuations == 6
    reply, _ = raw_peer(server).request(frames)  # and later from the cache
    assert reply.ok and server.sim.actuations == 6
    assert_alive(server)


def test_client_timeout_reconnects_and_retries_with_the_same_id(make_server, make_client):
    server = make_server(rig={"latency_s": 0.08}, progress_s=30)  # no progress: the client must time out
    client = make_client(server, timeout_s=0.2, retries=5)
    client.lock()
    m = client.measure(controls(5))
    assert m.n_done == 5 and server.sim.actuations == 5
    fast = make_client(server, timeout_s=0.2, retries=1, token=client.token)
    with pytest.raises(RequestTimeout) as info:
        fast.measure(controls(8))
    message = str(info.value)
    assert server.address in message and "'run'" in message and "0.2 s" in message and "2 attempt" in message
    time.sleep(0.5)
    assert server.sim.actuations == 13  # the timed-out batch ran exactly once
    assert_alive(server)


def test_evicted_reply_is_refused_not_rerun(make_server, raw_peer):
    server = make_server(reply_cache=2)
    peer = raw_peer(server)
    peer.call("lock", id="l1", token="tok")
    frames = {i: codec.encode_request("run", {}, {"controls": controls(1)}, id=f"r{i}", token="tok") for i in range(3)}
    for i in range(3):
        assert peer.request(frames[i])[0].ok
    reply, _ = peer.request(frames[0])
    assert reply.error.code == "BAD_REQUEST" and reply.error.details["evicted"] is True
    assert server.sim.actuations == 3
    assert peer.request(frames[2])[0].ok and server.sim.actuations == 3
    assert_alive(server)


# -- abort, failure, progress ---------------------------------------------------------------------
def test_abort_mid_batch_returns_the_completed_rows(make_server, make_client):
    server = make_server(rig={"latency_s": 0.03, "seed": 4})
    local, local_sim = make_test_rig(seed=4)
    client = make_client(server)
    x = controls(40)
    client.lock()
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("m", client.measure(x)))
    thread.start()
    time.sleep(0.3)
    assert client.abort()["running"] is True  # the same client object, from another thread
    thread.join(5)
    m = out["m"]
    assert isinstance(m.error, Aborted) and 0 < m.n_done < 40
    assert m.traces.shape == (m.n_done, 64) and m.timestamps.shape == (m.n_done,)
    assert_same_map(m.traces, local.run(x[: m.n_done]), local_sim, x)  # rows vs one batch: within rounding
    with pytest.raises(Aborted):
        m.raise_for_error()
    assert client.run(controls(2)).shape == (2, 64)
    assert_alive(server)


class ThreadNotingRig:
    """A rig that notes which server thread measured each batch."""

    def __init__(self, rig):
        self.rig, self.threads = rig, []

    def describe(self):
        return self.rig.describe()

    def configure(self, settings):
        return self.rig.configure(settings)

    def measure(self, controls, *, abort=None, progress=None):
        self.threads.append(threading.current_thread().name)
        return self.rig.measure(controls, abort=abort, progress=progress)


def test_quick_batches_run_in_the_socket_thread_and_slow_ones_on_the_worker(make_server, make_client):
    noting = ThreadNotingRig(make_test_rig(seed=2)[0])
    server = make_server(noting)
    local, local_sim = make_test_rig(seed=2)
    client = make_client(server)
    for i in range(4):
        x = controls(3, seed=i)
        assert_same_map(client.run(x), local.run(x), local_sim, x)
    # the first batch measures the rig's pace on the worker; the quick ones after it skip the hand-off
    assert noting.threads == ["labpnn-worker"] + ["labpnn-server"] * 3
    # new settings may slow the rig: the next batch goes to the worker, so ping and abort answer during it
    client.configure({"testrig": {"latency_s": 0.03}})
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("m", client.measure(controls(40))))
    thread.start()
    time.sleep(0.3)
    assert client.ping() > 0 and client.status()["state"] == "running"  # answered while the batch runs
    assert client.abort()["running"] is True
    thread.join(5)
    assert isinstance(out["m"].error, Aborted) and 0 < out["m"].n_done < 40
    assert noting.threads[-1] == "labpnn-worker"
    assert_alive(server)


def test_inline_max_s_zero_sends_every_batch_to_the_worker(make_server, make_client):
    noting = ThreadNotingRig(make_test_rig()[0])
    client = make_client(make_server(noting, inline_max_s=0))
    for i in range(3):
        client.run(controls(2, seed=i))
    assert noting.threads == ["labpnn-worker"] * 3


def test_row_time_estimate_rises_at_once_and_decays_slowly():
    server = DeviceServer(make_test_rig()[0], bind="tcp://127.0.0.1:0", publish="")
    server._note_row_time(0.010, 10)
    assert server._row_s == pytest.approx(0.001)
    server._note_row_time(0.5, 10)  # one slow batch: believed at once
    assert server._row_s == pytest.approx(0.05)
    server._note_row_time(0.0, 10)  # fast again: trusted only gradually
    assert server._row_s == pytest.approx(0.045)


def test_a_batch_that_fails_at_once_does_not_make_the_rig_look_quick(make_server, make_client):
    from labpnn.rig import Rig
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(16, 64, latency_s=0.02)
    flaky = FlakySensor(sim, (0,))  # the first acquisition fails
    server = make_server(Rig([sim], [flaky]).connect())
    client = make_client(server)
    assert isinstance(client.measure(controls(20)).error, InstrumentFailure)
    assert server._row_s is None  # no row was measured: the pace is still unknown
    client.run(controls(2))
    assert server._row_s >= 0.02


def test_abort_cancels_queued_batches(make_server, make_client):
    server = make_server(rig={"latency_s": 0.03})
    client = make_client(server)
    client.lock()
    batches = iter([controls(10)] * 3)
    results = client.measure_many(batches, max_in_flight=3)
    threading.Timer(0.1, client.abort).start()
    first = next(results)
    assert isinstance(first.error, Aborted)
    rest = list(results)
    assert [m.n_done for m in rest] == [0, 0] and all(isinstance(m.error, Aborted) for m in rest)
    assert server.sim.actuations == first.n_done
    assert_alive(server)


class FlakySensor:
    """A sensor that fails at the acquisitions numbered in ``fail_at`` (0-based)."""

    name = "flaky"

    def __init__(self, sim, fail_at):
        self.sim, self.fail_at, self.n_outputs, self.count = sim, set(fail_at), sim.n_outputs, 0

    def identify(self):
        return "flaky sensor"

    def connect(self):
        pass

    def close(self):
        pass

    def settings(self):
        return {}

    def configure(self, **settings):
        pass

    def axis(self):
        return self.sim.axis()

    def acquire(self):
        self.count += 1
        if self.count - 1 in self.fail_at:
            from labpnn.drivers.roles import InstrumentError

            raise InstrumentError("detector vanished")
        return self.sim.acquire()


def test_instrument_failure_mid_batch_returns_completed_rows(make_server, make_client):
    from labpnn.rig import Rig
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(16, 64, seed=8)
    server = make_server(Rig([sim], [FlakySensor(sim, (3, 7))]).connect())
    local, local_sim = make_test_rig(seed=8)
    client = make_client(server)
    x = controls(6)
    m = client.measure(x)
    assert isinstance(m.error, InstrumentFailure) and m.n_done == 3
    assert "flaky" in str(m.error) and "detector vanished" in str(m.error)
    assert_same_map(m.traces, local.run(x[:3]), local_sim, x)  # rows vs one batch: within rounding
    with pytest.raises(InstrumentFailure):
        client.run(x)  # run() raises; rows are discarded
    assert client.status()["last_error"]["code"] == "INSTRUMENT"
    assert_alive(server)


def test_progress_keeps_a_long_run_alive(make_server, make_client):
    server = make_server(rig={"latency_s": 0.1}, progress_s=0.1)
    client = make_client(server, timeout_s=0.35, retries=0)
    m = client.measure(controls(8))  # 0.8 s, more than twice the timeout
    assert m.n_done == 8 and server.sim.actuations == 8


# -- live stream and monitor --------------------------------------------------------------------------
def _monitor_while_running(server, client, *, rows, count, **monitor_kwargs):
    """`monitor` the server's stream for ``count`` batches while ``client`` runs batches of ``rows``."""
    from labpnn.remote.monitor import monitor

    summary = {}
    thread = threading.Thread(target=lambda: summary.update(monitor(
        server.publish_address, count=count, seconds=10, interval_s=0.2, **monitor_kwargs)))
    thread.start()
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        client.run(controls(rows))
        time.sleep(0.02)
    thread.join(5)
    return summary


def test_monitor_reports_batches_rates_and_no_gaps(make_server, make_client, capsys):

    server = make_server(publish_traces=True)
    client = make_client(server)
    client.lock()
    summary = _monitor_while_running(server, client, rows=4, count=5)
    assert summary["batches"] == 5 and summary["rows"] == 20 and summary["gaps"] == 0
    assert summary["min"] <= summary["mean"] <= summary["max"]
    out = capsys.readouterr().out
    assert "batches/s" in out and "rows/s" in out and "MB/s" in out


def test_monitor_cli_counts_sequence_gaps(make_server):
    from labpnn.remote.monitor import Follower

    follower = Follower()
    for seq in (4, 5, 8, 9):
        follower.add(b"batch", {"seq": seq, "n_done": 1, "trace_bytes": 4, "stats": None})
    assert follower.gaps == 2


# -- CURVE -------------------------------------------------------------------------------------------------
@pytest.fixture
def curve_keys(tmp_path):
    from labpnn.remote.security import create_key_pair

    create_key_pair("server", tmp_path)
    (tmp_path / "authorized").mkdir()
    create_key_pair("alice", tmp_path)
    shutil.copy(tmp_path / "alice.key", tmp_path / "authorized")
    create_key_pair("mallory", tmp_path)
    return tmp_path


def test_curve_allow_list(make_server, make_client, curve_keys):
    server = make_server(curve_keys=curve_keys)
    alice = make_client(server, server_public_key=curve_keys / "server.key",
                        client_keys=curve_keys / "alice.key_secret")
    assert alice.hello()["curve"] is True
    alice.run(controls(1))
    started = time.monotonic()
    mallory = make_client(server, server_public_key=curve_keys / "server.key",
                          client_keys=curve_keys / "mallory.key_secret", timeout_s=5)
    with pytest.raises(AuthFailed, match="not in the server's authorized keys"):
        mallory.ping()
    plain = make_client(server, timeout_s=5)
    with pytest.raises(AuthFailed, match="requires CURVE"):
        plain.ping()
    assert time.monotonic() - started < 3  # at once, not after the 5 s timeouts
    assert alice.ping() > 0


def test_allow_list_changes_apply_to_new_connections_without_a_restart(make_server, make_client, curve_keys):
    server = make_server(curve_keys=curve_keys)
    kwargs = {"server_public_key": curve_keys / "server.key", "timeout_s": 5}
    with pytest.raises(AuthFailed):
        make_client(server, client_keys=curve_keys / "mallory.key_secret", **kwargs).ping()
    shutil.copy(curve_keys / "mallory.key", curve_keys / "authorized")
    (curve_keys / "authorized" / "alice.key").unlink()
    time.sleep(1.5)  # the server looks at the directory every second
    assert make_client(server, client_keys=curve_keys / "mallory.key_secret", **kwargs).ping() > 0
    with pytest.raises(AuthFailed):
        make_client(server, client_keys=curve_keys / "alice.key_secret", **kwargs).ping()


def test_live_stream_with_curve_reaches_allowed_subscribers_only(make_server, make_client, curve_keys):
    import zmq


    server = make_server(curve_keys=curve_keys)
    keys = {"server_public_key": curve_keys / "server.key", "client_keys": curve_keys / "alice.key_secret"}
    client = make_client(server, **keys)
    client.lock()
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.SUB)
    plain.setsockopt(zmq.LINGER, 0)
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.connect(server.publish_address)
    summary = _monitor_while_running(server, client, rows=2, count=3, out=lambda line: None, **keys)
    assert summary["batches"] == 3 and summary["gaps"] == 0
    assert not plain.poll(300)  # a subscriber without CURVE never completes the handshake
    plain.close()


def test_curve_identity_is_key_and_token(make_server, make_client, curve_keys):
    from labpnn.remote.security import create_key_pair

    create_key_pair("bob", curve_keys)
    shutil.copy(curve_keys / "bob.key", curve_keys / "authorized")
    server = make_server(curve_keys=curve_keys)
    kwargs = {"server_public_key": curve_keys / "server.key"}
    alice = make_client(server, client_keys=curve_keys / "alice.key_secret", **kwargs)
    alice.lock()
    bob_with_alices_token = make_client(server, token=alice.token, client_keys=curve_keys / "bob.key_secret",
                                        **kwargs)
    with pytest.raises(Locked):
        bob_with_alices_token.run(controls(1))


def test_insecure_bind_is_refused(make_server):
    rig, _ = make_test_rig()
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("ipc:///x")
    assert is_loopback("tcp://[::1]:5") and not is_loopback("tcp://*:5555") and not is_loopback("tcp://10.0.0.2:1")
    with pytest.raises(InsecureBind, match="--insecure"):
        DeviceServer(rig, bind="tcp://0.0.0.0:*", publish="")
    with pytest.raises(InsecureBind):
        DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="tcp://*:*")
    server = make_server(rig, bind="tcp://0.0.0.0:*", publish="", insecure=True)
    port = server.address.rsplit(":", 1)[1]
    with RigClient(f"tcp://127.0.0.1:{port}", timeout_s=3) as client:
        assert client.ping() > 0


# -- commands ---------------------------------------------------------------------------------------------
def _labpnn(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "labpnn.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_serve_answers_then_exits_0_on_sigterm(tmp_path):
    config = tmp_path / "rig.toml"
    config.write_text('name = "sig"\n[server]\nbind = "tcp://127.0.0.1:*"\npublish = ""\n'
                      '[rig]\nkind = "test"\nn_outputs = 32\nlatency_s = 0.05\n')
    proc = _labpnn("serve", "--config", str(config), "--record", str(tmp_path / "rec"))
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # "recording to ...", "listening on ..."
        assert "recording to" in lines[0], lines
        assert "listening on tcp://127.0.0.1:" in lines[1], lines
        address = lines[1].split("listening on ")[1].split()[0].rstrip(",")
        with RigClient(address, timeout_s=10) as client:
            assert client.describe()["name"] == "sig"
            out = {}
            thread = threading.Thread(target=lambda: out.setdefault("m", client.measure(controls(40))))
            thread.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            thread.join(10)
            m = out["m"]  # answered: the rows done before the batch was aborted
            assert 0 < m.n_done < 40 and isinstance(m.error, Aborted)
            client.holding = False  # the server is gone; do not try to unlock
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_serve_bad_config_exits_2_naming_the_field(tmp_path):
    config = tmp_path / "rig.toml"
    config.write_text('[rig]\nkind = "test"\nn_controls = -3\n')
    proc = _labpnn("serve", "--config", str(config))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, (out, err)
    assert "n_controls" in err and "rig.toml" in err
    config.write_text('[rig]\nkind = "test"\n')
    proc = _labpnn("serve", "--config", str(config), "--bind", "tcp://0.0.0.0:*")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--insecure" in err, (out, err)


def test_server_does_not_import_torch():
    code = ("import sys\nfrom labpnn.config import build_rig, parse_config\nfrom labpnn.remote.server import DeviceServer\n"
            "import labpnn.remote.client, labpnn.remote.monitor, labpnn.remote.security\n"
            "rig = build_rig(parse_config({'rig': {'kind': 'test'}})).connect()\n"
            "s = DeviceServer(rig, bind='tcp://127.0.0.1:*', publish='tcp://127.0.0.1:*').start()\n"
            "c = labpnn.remote.client.RigClient(s.address); c.run(__import__('numpy').zeros((1, 16), 'float32'))\n"
            "c.close(); s.stop()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_keys_command_writes_a_key_pair(tmp_path, capsys):
    from labpnn.cli import main

    assert main(["keys", "alice", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "alice.key").is_file() and (tmp_path / "alice.key_secret").is_file()
    assert os.stat(tmp_path / "alice.key_secret").st_mode & 0o077 == 0
    assert "alice.key" in capsys.readouterr().out
    assert main(["keys", "alice", "--dir", str(tmp_path)]) == 2  # never overwrites a key


def test_raw_client_sees_progress_messages(make_server, raw_peer):
    server = make_server(rig={"latency_s": 0.05}, progress_s=0.1)
    peer = raw_peer(server)
    peer.call("lock", id="l", token="tok")
    peer.send(codec.encode_request("run", {}, {"controls": controls(6)}, id="p", token="tok"))
    kinds = []
    while True:
        frames = peer.recv(3, skip_progress=False)
        assert frames is not None
        message, _ = codec.decode_reply(frames)
        kinds.append(message.kind)
        if message.kind == "reply":
            break
        assert message.id == "p" and message.progress.state == "running" and message.progress.total == 6
    assert kinds.count("progress") >= 1 and kinds[-1] == "reply"
