"""The wire protocol: the codec on its own, then every kind of bad input over a real socket.

Every negative test over a socket ends with a successful request to the same server
(``assert_alive``), so a dead server cannot pass it.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import zmq
from conftest import assert_alive, controls
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labpnn.protocols import codec
from labpnn.protocols.errors import (
    BadArray,
    BadFrames,
    BadRequest,
    BadVersion,
    ErrorCode,
    InvalidControls,
    TooLarge,
    UnknownOp,
)
from labpnn.protocols.messages import VERSION, Progress, Reply, RunRequest


# -- codec, no sockets -------------------------------------------------------------------------
def test_request_round_trip_shares_memory_and_keeps_dtypes():
    x = controls(3)
    frames = codec.encode_request("run", {}, {"controls": x}, id="a-1", token="tok")
    assert frames[0] == VERSION
    header = json.loads(frames[1])
    assert header == {"id": "a-1", "op": "run", "token": "tok", "args": {},
                      "arrays": [{"name": "controls", "dtype": "float32", "shape": [3, 16]}]}
    request, arrays = codec.decode_request(frames)
    assert isinstance(request, RunRequest)
    np.testing.assert_array_equal(arrays["controls"], x)
    assert arrays["controls"].dtype == np.float32


def test_arrays_decoded_from_zmq_frames_are_read_only_views_that_a_session_need_not_copy():
    import zmq

    from labpnn.sessions.writer import _immutable

    x = controls(2)
    frames = [zmq.Frame(bytes(f)) for f in codec.encode_request("run", {}, {"controls": x}, id="a", token="t")]
    got = codec.decode_request(frames)[1]["controls"]
    np.testing.assert_array_equal(got, x)
    assert not got.flags.writeable and _immutable(got)
    with pytest.raises(ValueError):
        got.flags.writeable = True  # a read-only view of the frame stays read-only
    assert not _immutable(x.copy())


def test_reply_round_trip_with_all_array_kinds():
    arrays = {"traces": np.arange(6, dtype=np.float32).reshape(2, 3), "timestamps": np.array([1.5, 2.5]),
              "flags": np.array([0, 3], np.uint32), "empty": np.empty((0, 4), np.float32),
              "big_endian": np.arange(3, dtype=">i4")}
    frames = codec.encode_reply("x", result={"n_done": 2}, arrays=arrays)
    reply, got = codec.decode_reply(frames)
    assert isinstance(reply, Reply) and reply.ok and reply.result == {"n_done": 2}
    for name, value in arrays.items():
        np.testing.assert_array_equal(got[name], value)
    assert got["big_endian"].dtype == np.dtype("<i4")
    assert got["empty"].shape == (0, 4)


def test_error_reply_and_progress_decode():
    reply, _ = codec.decode_reply(codec.encode_error(None, TooLarge("too big", details={"bytes": 9})))
    assert not reply.ok and reply.id is None and reply.error.code == "TOO_LARGE"
    exc = codec.reply_error(reply)
    assert isinstance(exc, TooLarge) and exc.details == {"bytes": 9}
    progress, _ = codec.decode_reply(codec.encode_progress("r", state="running", done=3, total=9))
    assert isinstance(progress, Progress) and progress.progress.done == 3


def test_json_header_has_no_nan_and_numpy_values_become_json():
    frames = codec.encode_reply("x", result={"a": np.float32(1.5), "b": float("nan"), "c": np.arange(2)})
    assert json.loads(frames[1])["result"] == {"a": 1.5, "b": None, "c": [0, 1]}


def test_json_of_awkward_values_matches_the_stdlib_meaning():
    header = codec.dumps({1: np.float32(2), "big": np.arange(2, dtype=">f4"), "half": np.ones(1, np.float16),
                          "inf": np.array([np.inf, 1.0]), "set": {3}, "tuple": (1, 2)})
    assert json.loads(header) == {"1": 2.0, "big": [0.0, 1.0], "half": [1.0], "inf": [None, 1.0], "set": [3],
                                  "tuple": [1, 2]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        codec.dumps({"x": object()})


@pytest.mark.parametrize("frames, exc, words", [
    ([VERSION], BadFrames, "at least 2 frames"),
    ([b"LPNN9", b"{}"], BadVersion, "LPNN9"),
    ([VERSION, b"{not json"], BadFrames, "not valid JSON"),
    ([VERSION, b"[1, 2]"], BadFrames, "JSON object"),
    ([VERSION, b'{"id": "a", "token": "t"}'], BadRequest, "no 'op'"),
    ([VERSION, b'{"id": "a", "op": "fly", "token": "t"}'], UnknownOp, "fly"),
    ([VERSION, b'{"id": "a", "op": "ping", "token": "t", "colour": 1}'], BadRequest, "colour"),
    ([VERSION, b'{"id": "a", "op": "ping", "token": "t", "args": {"x": 1}}'], BadRequest, "args.x"),
    ([VERSION, b'{"id": "", "op": "ping", "token": "t"}'], BadRequest, "id"),
    ([VERSION, b'{"id": "a", "op": "lock", "token": "t", "args": {"lease_s": -1}}'], BadRequest, "lease_s"),
    ([VERSION, b'{"id": "a", "op": "run", "token": "t", "arrays": '
               b'[{"name": "controls", "dtype": "complex64", "shape": [1, 16]}]}', b"x" * 128], BadArray,
     "complex64"),
    ([VERSION, b'{"id": "a", "op": "run", "token": "t", "arrays": '
               b'[{"name": "controls", "dtype": "float32", "shape": [2, 16]}]}', b"x" * 100], BadArray,
     "needs 128"),
    ([VERSION, b'{"id": "a", "op": "run", "token": "t", "arrays": '
               b'[{"name": "controls", "dtype": "float32", "shape": [2, 16]}]}'], BadFrames, "1 array"),
    ([VERSION, b'{"id": "a", "op": "run", "token": "t", "arrays": '
               b'[{"name": "controls", "dtype": "float32", "shape": [-2, 16]}]}', b""], BadArray, "negative"),
])
def test_decode_request_rejects(frames, exc, words):
    with pytest.raises(exc, match=words):
        codec.decode_request(frames)


def test_declared_size_is_checked_before_frames():
    header = {"id": "a", "op": "run", "token": "t",
              "arrays": [{"name": "controls", "dtype": "float32", "shape": [10**9, 16]}]}
    with pytest.raises(TooLarge, match="limit"):
        codec.decode_request([VERSION, json.dumps(header).encode(), b""], max_bytes=2**20)


def test_peek_id_best_effort():
    assert codec.peek_id([VERSION, b'{"id": "abc", "op": 3}']) == "abc"
    assert codec.peek_id([VERSION, b"garbage"]) is None
    assert codec.peek_id([VERSION]) is None


# -- bad input over a real socket --------------------------------------------------------------------
def _code(got):
    assert got is not None, "no reply"
    reply, _ = got
    assert not reply.ok
    return reply.error.code


@pytest.mark.parametrize("frames, code, rid", [
    ([b"hello?"], "BAD_FRAMES", None),
    ([b"\x00\xff" * 10, b"\x01"], "BAD_VERSION", None),
    ([b"LPNN2", b'{"id": "v2", "op": "ping", "token": "t"}'], "BAD_VERSION", "v2"),
    ([VERSION, b"\xff\xfe not utf8"], "BAD_FRAMES", None),
    ([VERSION, b'{"id": "u1", "op": "teleport", "token": "t"}'], "UNKNOWN_OP", "u1"),
    ([VERSION, b'{"id": "e1", "op": "ping", "token": "t", "args": {}, "arrays": [], "extra": true}'],
     "BAD_REQUEST", "e1"),
    ([VERSION, b'{"id": "e2", "op": "status", "token": "t", "args": {"verbose": true}}'], "BAD_REQUEST", "e2"),
    ([VERSION, b'{"id": "t1", "op": "ping"}'], "BAD_REQUEST", "t1"),
    ([VERSION, b'{"id": "f1", "op": "ping", "token": "t"}', b"stray frame"], "BAD_FRAMES", "f1"),
])
def test_garbage_gets_an_error_reply_and_the_server_keeps_serving(make_server, raw_peer, frames, code, rid):
    server = make_server()
    peer = raw_peer(server)
    got = peer.request(frames)
    assert _code(got) == code
    assert got[0].id == rid
    assert got[0].error.message
    assert_alive(server)


def _run_frames(array, *, rid="run-1", token="tok", dtype=None, shape=None):
    frames = codec.encode_request("run", {}, {"controls": array}, id=rid, token=token)
    if dtype or shape:
        header = json.loads(frames[1])
        header["arrays"][0].update({k: v for k, v in (("dtype", dtype), ("shape", shape)) if v})
        frames[1] = json.dumps(header).encode()
    return frames


@pytest.mark.parametrize("make_array, code, words", [
    (lambda: controls(2).astype(np.float64), "BAD_ARRAY", "float32"),
    (lambda: controls(2, n_controls=15), "INVALID_CONTROLS", "(B, 16)"),
    (lambda: controls(3)[0], "INVALID_CONTROLS", "(B, 16)"),
    (lambda: np.empty((0, 16), np.float32), "INVALID_CONTROLS", "empty"),
    (lambda: np.where(np.eye(3, 16) > 0, np.nan, 0.5).astype(np.float32), "INVALID_CONTROLS", "NaN"),
    (lambda: np.full((2, 16), np.inf, np.float32), "INVALID_CONTROLS", "NaN or inf"),
    (lambda: np.full((2, 16), 1.5, np.float32), "INVALID_CONTROLS", r"\[0, 1\]"),
    (lambda: np.full((2, 16), -0.25, np.float32), "INVALID_CONTROLS", r"\[0, 1\]"),
])
def test_bad_controls_are_refused_before_anything_moves(make_server, make_client, raw_peer, make_array, code,
                                                        words):
    server = make_server()
    peer = raw_peer(server)
    assert peer.call("lock", token="tok")[0].ok
    got = peer.request(_run_frames(make_array()))
    assert _code(got) == code
    assert re.search(words, got[0].error.message), got[0].error.message
    assert server.sim.actuations == 0
    got = peer.request(_run_frames(controls(2), rid="good"))  # the same client can go on
    assert got[0].ok and got[1]["traces"].shape == (2, 64)
    assert_alive(server)


def test_wrong_declared_dtype_and_shape(make_server, raw_peer):
    server = make_server()
    peer = raw_peer(server)
    peer.call("lock", token="tok")
    assert _code(peer.request(_run_frames(controls(2), dtype="uint64"))) == "BAD_ARRAY"
    assert _code(peer.request(_run_frames(controls(2), shape=[4, 16]))) == "BAD_ARRAY"
    two = codec.encode_request("run", {}, {"controls": controls(2), "more": controls(1)}, id="two", token="tok")
    assert _code(peer.request(two)) == "BAD_ARRAY"
    assert server.sim.actuations == 0
    assert_alive(server)


def test_safety_limit_refuses_the_batch_whole(make_server, make_client):
    server = make_server(rig={"max_mean_control": 0.5})
    client = make_client(server)
    batch = controls(4, high=0.4)
    batch[2] = 0.9
    with pytest.raises(Exception) as info:
        client.run(batch)
    assert info.value.code == ErrorCode.LIMIT and "row 2" in str(info.value)
    assert server.sim.actuations == 0
    assert client.run(controls(2, high=0.4)).shape == (2, 64)
    assert_alive(server)


def test_client_side_errors_are_the_protocol_exceptions(make_server, make_client):
    server = make_server()
    client = make_client(server)
    with pytest.raises(InvalidControls):
        client.run(np.full((1, 16), 2.0))
    with pytest.raises(InvalidControls, match="complex64"):
        client.run(np.zeros((1, 16), np.complex64))
    assert client.run(controls(1)).shape == (1, 64)


def test_declared_size_over_the_limit_is_too_large(make_server, raw_peer):
    server = make_server(max_message_bytes=1 << 16)
    peer = raw_peer(server)
    peer.call("lock", token="tok")
    got = peer.request(_run_frames(controls(2), shape=[100_000, 16]))
    assert _code(got) == "TOO_LARGE" and got[0].error.details["max_message_bytes"] == 1 << 16
    assert_alive(server)


def test_reply_that_would_be_too_large_is_refused_before_running(make_server, make_client):
    server = make_server(max_message_bytes=1 << 16, rig={"n_outputs": 512})
    client = make_client(server)
    with pytest.raises(TooLarge) as info:
        client.run(controls(64))  # 64 * 2124 bytes of reply > 64 KiB
    assert info.value.details["max_rows"] == (1 << 16) // (4 * 512 + 4 * 16 + 12)
    assert server.sim.actuations == 0
    assert client.run(controls(8)).shape == (8, 512)


def test_frame_over_maxmsgsize_is_dropped_by_libzmq_without_reply(make_server, make_client, raw_peer):
    """libzmq closes the connection on a frame over ZMQ_MAXMSGSIZE: no reply ever comes (PROTOCOL.md
    §9), the server lives on, and RigClient refuses such a batch before sending it."""
    server = make_server(max_message_bytes=1 << 16)
    peer = raw_peer(server)
    big = controls(2048)  # 128 KiB
    assert peer.request(_run_frames(big), timeout_s=0.5) is None
    client = make_client(server)
    with pytest.raises(TooLarge, match="split the batch"):
        client.run(big)
    assert client.run(controls(2)).shape == (2, 64)
    assert_alive(server)


def test_req_socket_clients_work_in_lockstep(make_server, raw_peer):
    server = make_server()
    peer = raw_peer(server, zmq.REQ)
    reply, _ = peer.call("hello", {"versions": ["LPNN1"]}, id="req-1")
    assert reply.ok and reply.result["version"] == "LPNN1"
    reply, _ = peer.request([b"bogus"])
    assert not reply.ok and reply.error.code == "BAD_FRAMES"
    assert_alive(server)


def test_hello_negotiates_the_version(make_server, raw_peer):
    server = make_server()
    peer = raw_peer(server)
    reply, _ = peer.call("hello", {"versions": ["LPNN7", "LPNN1"], "client": "test"})
    assert reply.ok and reply.result["version"] == "LPNN1"
    limits = reply.result["limits"]
    assert limits["max_message_bytes"] == 256 * 2**20 and limits["lease_s"] == 10.0
    reply, _ = peer.call("hello", {"versions": ["LPNN7"]}, id="h2")
    assert reply.error.code == "BAD_VERSION" and reply.error.details["supported"] == ["LPNN1"]
    assert_alive(server)


def test_unexpected_exception_is_internal_and_server_keeps_serving(make_server, make_client):
    class Broken:
        def describe(self):
            return {"name": "broken", "n_controls": 2, "n_outputs": 3}

        def measure(self, controls, abort=None):
            raise ZeroDivisionError("the driver divided by zero")

    server = make_server(Broken())
    client = make_client(server)
    with pytest.raises(Exception) as info:
        client.run(np.zeros((1, 2), np.float32))
    assert info.value.code == ErrorCode.INTERNAL and "divided by zero" in str(info.value)
    status = client.status()
    assert status["last_error"]["code"] == "INTERNAL"
    assert_alive(server)


# -- random bytes never crash the server -------------------------------------------------------------
_header_keys = st.sampled_from(["id", "op", "token", "args", "arrays", "kind", "x"])
_json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False)
                            | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_headers = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(_header_keys, _json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"id": st.text(min_size=1, max_size=8), "op": st.sampled_from(
        ["run", "lock", "ping", "configure", "status", "abort", "hello"]), "token": st.just("fuzz")},
        optional={"args": st.dictionaries(st.text(max_size=6), _json_values, max_size=2),
                  "arrays": st.lists(st.fixed_dictionaries({"name": st.just("controls"), "dtype": st.sampled_from(
                      ["float32", "float64", "uint8", "bogus"]), "shape": st.lists(st.integers(-2, 20), max_size=3)}),
                      max_size=2)}).map(lambda d: json.dumps(d).encode()),
)
_messages = st.tuples(st.sampled_from([VERSION, b"", b"LPNN", b"\x00"]) | st.binary(max_size=8), _headers,
                      st.lists(st.binary(max_size=256), max_size=3)).map(lambda t: [t[0], t[1], *t[2]]) | st.lists(
    st.binary(max_size=64), min_size=1, max_size=4)


def test_random_frames_never_crash_or_hang_the_server(make_server, raw_peer):
    server = make_server()
    peer = raw_peer(server)
    assert peer.call("lock", token="fuzz")[0].ok  # so that runs get as far as the rig
    started = time.monotonic()

    @settings(max_examples=200, deadline=3000, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_messages)
    def fuzz(frames):
        peer.send(frames)
        reply = peer.recv(3.0)
        assert reply is not None, f"no reply to {frames!r}"
        body = reply[1:] if reply[0] == b"" else reply  # an empty first frame is taken as a REQ delimiter
        assert body[0] == VERSION

    fuzz()
    assert time.monotonic() - started < 30
    assert_alive(server)
