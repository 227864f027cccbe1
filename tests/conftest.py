"""Shared fixtures. Transport fixtures: a device server on 127.0.0.1 with random ports, clients,
and raw DEALER peers for speaking (or mangling) the wire protocol by hand."""
from __future__ import annotations

import numpy as np
import pytest
import zmq

from labpnn.config import ServerSection
from labpnn.protocols.codec import decode_reply, encode_request
from labpnn.rig import Rig
from labpnn.sim_instruments.test_rig import SimTestRig

LOCAL = "tcp://127.0.0.1:*"


def make_test_rig(n_controls: int = 16, n_outputs: int = 64, **kwargs) -> tuple[Rig, SimTestRig]:
    """A connected `Rig` over one `SimTestRig` (actuator and sensor) and the SimTestRig itself
    (whose ``actuations`` counter tests read)."""
    sim = SimTestRig(n_controls, n_outputs, **kwargs)
    return Rig([sim], [sim], name="testrig").connect(), sim


def assert_same_map(got: np.ndarray, want: np.ndarray, sim: SimTestRig, x: np.ndarray) -> None:
    """Two test-rig computations of the traces at ``x`` agree within float32 rounding
    (`SimTestRig.rounding_bound`): a batch (gemm) and rows (gemv), or two processors' kernels, need
    not round alike. Bytes that were only copied are compared exactly instead."""
    assert got.shape == want.shape, (got.shape, want.shape)
    excess = np.abs(got.astype(np.float64) - want) - sim.rounding_bound(x[: len(got)])
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} values differ beyond rounding (worst by {excess.max():.3g})"


def controls(rows: int, n_controls: int = 16, seed: int = 0, high: float = 0.9) -> np.ndarray:
    return (np.random.default_rng(seed).random((rows, n_controls)) * high).astype(np.float32)


@pytest.fixture
def make_server():
    """``make_server(system=None, *, lease_s=..., max_message_bytes=..., reply_cache=..., inline_max_s=...,
    rig=dict(...), **DeviceServer kwargs)`` -> a started DeviceServer (stopped at teardown).
    Without ``system``, serves a fresh test rig (``rig`` = SimTestRig kwargs); the server's
    ``sim`` attribute is then its SimTestRig."""
    from labpnn.remote.server import DeviceServer

    servers = []

    def make(system=None, *, lease_s=10.0, max_message_bytes=256 * 2**20, reply_cache=64, rig=None,
             inline_max_s=0.002, **kwargs):
        sim = None
        if system is None:
            system, sim = make_test_rig(**(rig or {}))
        section = ServerSection(bind=LOCAL, publish=LOCAL, lease_s=lease_s, max_message_bytes=max_message_bytes,
                                reply_cache=reply_cache, inline_max_s=inline_max_s)
        server = DeviceServer(system, section, **kwargs).start()
        server.sim = sim
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_client():
    """``make_client(server_or_address, **RigClient kwargs)`` -> RigClient (closed at teardown)."""
    from labpnn.remote.client import RigClient

    clients = []

    def make(server, **kwargs):
        kwargs.setdefault("timeout_s", 5.0)
        address = server if isinstance(server, str) else server.address
        client = RigClient(address, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class RawPeer:
    """A bare DEALER: send any frames, read raw replies."""

    def __init__(self, context: zmq.Context, address: str, socket_type: int = zmq.DEALER):
        self.address = address
        self.sock = context.socket(socket_type)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames) -> None:
        self.sock.send_multipart(list(frames), copy=True)

    def recv(self, timeout_s: float = 3.0, skip_progress: bool = True) -> list[bytes] | None:
        deadline_ms = int(timeout_s * 1000)
        while self.sock.poll(deadline_ms):
            frames = self.sock.recv_multipart()
            if skip_progress and len(frames) >= 2 and b'"kind":"progress"' in frames[1]:
                continue
            return frames
        return None

    def request(self, frames, timeout_s: float = 3.0):
        """Send frames; return (reply header model, arrays) or None if nothing came back."""
        self.send(frames)
        got = self.recv(timeout_s)
        return None if got is None else decode_reply(got)

    def call(self, op, args=None, arrays=None, *, id="r1", token="raw-token", timeout_s: float = 3.0):
        return self.request(encode_request(op, args, arrays, id=id, token=token), timeout_s)

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw_peer():
    """``raw_peer(address, socket_type=zmq.DEALER)`` -> RawPeer (closed at teardown)."""
    context = zmq.Context()
    peers = []

    def make(address, socket_type=zmq.DEALER):
        peer = RawPeer(context, address if isinstance(address, str) else address.address, socket_type)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
    context.term()


def assert_alive(server, token: str = "alive-check") -> None:
    """The server still answers a well-formed request (ends every negative test)."""
    context = zmq.Context()
    try:
        peer = RawPeer(context, server.address)
        got = peer.call("ping", id="alive", token=token)
        assert got is not None, f"the server at {server.address} no longer answers"
        assert got[0].ok, got[0]
        got = peer.call("status", id="alive2", token=token)
        assert got is not None and got[0].ok and got[0].result["state"] in ("idle", "running"), got
        peer.close()
    finally:
        context.term()


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: two torch threads on a busy 2-core machine are 100x slower than one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
