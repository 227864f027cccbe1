"""`RigClient`: a `PhysicalSystem` on the other end of a device server (protocols/PROTOCOL.md).

One DEALER socket per client object, guarded by a lock so that a training thread and a
background thread (status polling, a monitor) can share it. Every request has an id; on timeout
the client opens a new socket and resends the same frames with the same id, so the server answers
from its reply cache (or attaches to the run still in progress) and never actuates twice.
Progress messages from the server restart the timeout. A socket monitor turns a refused CURVE
handshake into `AuthFailed` at once instead of a silent timeout.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from labpnn.contract import Measurement
from labpnn.protocols.codec import decode_reply, encode_request, reply_error
from labpnn.protocols.errors import (
    AuthFailed,
    BadVersion,
    ErrorCode,
    InvalidControls,
    LabpnnError,
    Locked,
    RequestTimeout,
    TooLarge,
)
from labpnn.protocols.messages import MAX_HEADER_BYTES, SUPPORTED_VERSIONS, Progress

log = logging.getLogger(__name__)

_PARTIAL = {ErrorCode.ABORTED.value, ErrorCode.INSTRUMENT.value, ErrorCode.SHUTDOWN.value}
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED
                   | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
_POLL_SLICE_S = 0.05  # the socket lock is never held longer than this while waiting


@dataclass
class _Pending:
    op: str
    frames: list[Any]
    deadline: float
    attempts: int = 1
    started: float = 0.0


class RigClient:
    """A remote rig. ``token`` is this client's identity on the server (default: a fresh random
    one; pass an earlier client's ``token`` to resume its lock). ``server_public_key`` (a key file
    or Z85 key) turns on CURVE; ``client_keys`` is this client's ``.key_secret`` file or a
    (public, secret) pair (default with CURVE: an ephemeral key pair)."""

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 2,
        server_public_key: Any = None,
        client_keys: Any = None,
        auto_lock: bool = True,
    ):
        self.address = address
        self.token = token or secrets.token_hex(16)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.auto_lock = bool(auto_lock)
        self._server_public_key = server_public_key
        self._client_keys = client_keys
        self.curve = server_public_key is not None
        if self.curve:  # fail early on unreadable keys
            from labpnn.remote import security

            security.load_public_key(server_public_key)
            if client_keys is not None:
                security.load_key_pair(client_keys)
        self._ctx = zmq.Context()
        self._lock = threading.RLock()  # taken through _socket(), so that a waiting thread steps aside
        self._wanting = 0  # threads blocked on _lock right now (guarded by _wanting_lock)
        self._wanting_lock = threading.Lock()
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count()
        self._inflight: dict[str, _Pending] = {}
        self._mailbox: dict[str, tuple[Any, dict]] = {}
        self._discard: set[str] = set()
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._rcvtimeo_ms = -1  # the receive timeout set on the socket now
        self._auth_error: AuthFailed | None = None
        self._handshakes = 0
        self._disconnects = 0
        self._hello: dict | None = None
        self._description: dict | None = None
        self.holding = False  #: whether this client believes it holds the lock
        self._closed = False

    # -- PhysicalSystem ------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The rig description (cached; refreshed after `configure`)."""
        if self._description is None:
            self._description = self._call("describe")[0].result
        return self._description

    def run(self, controls: Any) -> np.ndarray:
        """Measure a batch; raises on any failure (partial rows are discarded)."""
        return self.measure(controls).raise_for_error().traces

    def measure(self, controls: Any) -> Measurement:
        """Measure a batch. A batch that fails mid-way (instrument failure, abort) comes back
        with its completed rows and ``error`` set; rejected batches raise."""
        self._ensure_ready(needs_lock=True)
        batch = self._prepare(controls)
        reply, arrays = self._call("run", arrays={"controls": batch}, needs_lock=True, partial_ok=True,
                                   prepared=True)
        return self._measurement(batch, reply, arrays)

    def measure_many(self, batches: Iterable[Any], max_in_flight: int = 4) -> Iterator[Measurement]:
        """Measure batches with up to ``max_in_flight`` requests queued at the server (the rig
        never idles between batches). Yields Measurements in order. If the consumer stops early
        or a batch is rejected, batches already sent still run on the server; their replies are
        discarded."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._ensure_ready(needs_lock=True)
        source = iter(batches)
        window: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        exhausted = False
        relocked = False  # since the last batch that ran
        try:
            while True:
                while not exhausted and len(window) < max_in_flight:
                    try:
                        batch = self._prepare(next(source))
                    except StopIteration:
                        exhausted = True
                        break
                    window.append((self._submit("run", None, {"controls": batch}), batch))
                if not window:
                    return
                rid, batch = window.popleft()
                reply, arrays = self._wait(rid)
                if not reply.ok and self._error_code(reply) not in _PARTIAL:
                    code = self._error_code(reply)
                    if code in (ErrorCode.NOT_LOCKED.value, ErrorCode.LOCKED.value):
                        self.holding = False
                    if code == ErrorCode.NOT_LOCKED.value and self.auto_lock and not relocked:
                        # our lease ran out while we were away: everything in flight was refused
                        # too (refused requests do nothing); take the lock and send it all again
                        log.info("lock lease expired; taking the lock again")
                        relocked = True
                        self._forget(rid for rid, _ in window)
                        again = [batch, *(b for _, b in window)]
                        window.clear()
                        self.lock()
                        window.extend((self._submit("run", None, {"controls": b}), b) for b in again)
                        continue
                    raise reply_error(reply)
                relocked = False
                yield self._measurement(batch, reply, arrays)
        finally:
            self._forget(rid for rid, _ in window)

    def _forget(self, rids: Iterable[str]) -> None:
        """Drop the replies of requests still in flight (they are discarded when they come)."""
        with self._socket():
            for rid in rids:
                if self._inflight.pop(rid, None) is not None:
                    self._discard.add(rid)
                self._mailbox.pop(rid, None)

    # -- other ops -------------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        """Negotiate the version; returns the server's hello result (name, limits...)."""
        reply, _ = self._call("hello", {"versions": list(SUPPORTED_VERSIONS),
                                        "client": f"labpnn RigClient (pid {os.getpid()})"}, hello=False)
        if reply.result.get("version") not in SUPPORTED_VERSIONS:
            raise BadVersion(f"server at {self.address} chose version {reply.result.get('version')!r}")
        self._hello = reply.result
        return reply.result

    @property
    def limits(self) -> dict[str, Any]:
        if self._hello is None:
            self.hello()
        return self._hello["limits"]

    def configure(self, settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Apply ``{instrument: {setting: value}}``; returns the new settings of those touched."""
        reply, _ = self._call("configure", {"settings": {k: dict(v) for k, v in settings.items()}},
                              needs_lock=True)
        self._description = None
        return reply.result["settings"]

    def status(self) -> dict[str, Any]:
        return self._call("status")[0].result

    def ping(self) -> float:
        """Round-trip time in seconds."""
        started = time.perf_counter()
        self._call("ping")
        return time.perf_counter() - started

    def lock(self, lease_s: float | None = None) -> dict[str, Any]:
        try:
            reply, _ = self._call("lock", {} if lease_s is None else {"lease_s": float(lease_s)})
        except Locked:
            self.holding = False
            raise
        self.holding = True
        return reply.result

    def unlock(self) -> dict[str, Any]:
        reply, _ = self._call("unlock")
        self.holding = False
        return reply.result

    def abort(self) -> dict[str, Any]:
        """Abort this client's running batch and cancel its queued ones."""
        return self._call("abort")[0].result

    def close(self) -> None:
        """Release the lock (best effort) and close the socket."""
        if self._closed:
            return
        if self.holding:
            saved = self.timeout_s, self.retries
            self.timeout_s, self.retries = min(self.timeout_s, 1.0), 0
            try:
                self.unlock()
            except LabpnnError as exc:
                log.debug("unlock on close failed: %s", exc)
            finally:
                self.timeout_s, self.retries = saved
        with self._socket():
            self._closed = True
            self._close_socket()
            self._ctx.term()

    def __enter__(self) -> RigClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RigClient({self.address!r}, curve={self.curve})"

    # -- request machinery ------------------------------------------------------------------------
    def _prepare(self, controls: Any) -> np.ndarray:
        batch = np.asarray(controls)
        if batch.dtype != np.float32:
            if batch.dtype.kind not in "fiu":
                raise InvalidControls(f"controls must be float32, got dtype {batch.dtype}")
            batch = batch.astype(np.float32)
        batch = np.ascontiguousarray(batch)
        limit = self._hello["limits"]["max_message_bytes"] if self._hello else None
        if limit is not None and batch.nbytes > limit:
            raise TooLarge(
                f"controls are {batch.nbytes} bytes, more than the server's limit of {limit} bytes "
                "(the server would drop the connection without a reply); split the batch",
                details={"bytes": batch.nbytes, "max_message_bytes": limit})
        return batch

    def _ensure_ready(self, needs_lock: bool) -> None:
        if self._hello is None:
            self.hello()
        if needs_lock and self.auto_lock and not self.holding:
            self.lock()

    def _call(self, op: str, args: dict | None = None, arrays: dict | None = None, *, needs_lock: bool = False,
              partial_ok: bool = False, hello: bool = True, prepared: bool = False) -> tuple[Any, dict]:
        if hello:
            self._ensure_ready(needs_lock)
        if arrays and "controls" in arrays and not prepared:
            arrays = {"controls": self._prepare(arrays["controls"])}
        for attempt in (0, 1):
            reply, out = self._wait(self._submit(op, args, arrays))
            if reply.ok:
                return reply, out
            code = self._error_code(reply)
            if code in (ErrorCode.NOT_LOCKED.value, ErrorCode.LOCKED.value):
                self.holding = False
                # our lease ran out while we were away: take the lock again and resend (a new id:
                # the refused request did nothing)
                if code == ErrorCode.NOT_LOCKED.value and needs_lock and self.auto_lock and attempt == 0:
                    log.info("lock lease expired; taking the lock again")
                    self.lock()
                    continue
            if partial_ok and code in _PARTIAL and reply.result is not None:
                return reply, out
            raise reply_error(reply)
        raise AssertionError("unreachable")

    @staticmethod
    def _error_code(reply) -> str | None:
        err = reply.error
        if err is None:
            return None
        return err.get("code") if isinstance(err, dict) else err.code

    def _measurement(self, batch: np.ndarray, reply, arrays: dict) -> Measurement:
        result = reply.result or {}
        error = None if reply.ok else reply_error(reply)
        n = int(result.get("n_done", 0))
        traces = arrays.get("traces")
        if traces is None:
            s = int(self.describe()["n_outputs"])
            traces = np.empty((0, s), np.float32)
        return Measurement(
            controls=batch, traces=traces,
            applied=arrays.get("applied", np.empty((n, batch.shape[1] if batch.ndim == 2 else 0), np.float32)),
            timestamps=arrays.get("timestamps", np.empty(n)), flags=arrays.get("flags", np.zeros(n, np.uint32)),
            error=error, busy_s=float(result.get("busy_s") or 0.0),
            meta={**(result.get("meta") or {}), "batch": result.get("batch"), "server": self.address})

    def _submit(self, op: str, args: dict | None, arrays: dict | None) -> str:
        rid = f"{self._prefix}-{next(self._counter)}"
        frames = encode_request(op, args, arrays, id=rid, token=self.token)
        if len(frames[1]) > MAX_HEADER_BYTES:
            raise TooLarge(f"request header is {len(frames[1])} bytes, more than {MAX_HEADER_BYTES}")
        with self._socket():
            if self._closed:
                raise RuntimeError("client is closed")
            self._ensure_socket()
            now = time.monotonic()
            self._inflight[rid] = _Pending(op, frames, now + self.timeout_s, 1, now)
            self._sock.send_multipart(frames, copy=False)
        return rid

    def _wait(self, rid: str) -> tuple[Any, dict]:
        while True:
            with self._socket():
                got = self._mailbox.pop(rid, None)
                if got is not None:
                    return got
                pending = self._inflight.get(rid)
                if pending is None:
                    raise RuntimeError(f"request {rid} is not in flight")
                if self._auth_error is not None:
                    error = self._auth_error
                    self._auth_error = None
                    self._inflight.pop(rid, None)
                    self._close_socket()  # the next request starts a fresh handshake
                    raise error
                now = time.monotonic()
                if now >= pending.deadline:
                    self._timed_out(rid, pending, now)
                    continue
                self._pump(min(pending.deadline - now, _POLL_SLICE_S))
            if self._wanting:  # another thread wants the socket (an abort, a status): let it in first
                time.sleep(0.001)

    @contextlib.contextmanager
    def _socket(self):
        """The lock around the socket and the request tables. A thread waiting for a reply holds it
        while it listens and then takes it again at once; Python's locks are not fair, so it steps
        aside (`_wait`) whenever another thread is blocked here."""
        with self._wanting_lock:
            self._wanting += 1
        try:
            self._lock.acquire()
        finally:
            with self._wanting_lock:
                self._wanting -= 1
        try:
            yield
        finally:
            self._lock.release()

    def _timed_out(self, rid: str, pending: _Pending, now: float) -> None:
        if pending.attempts > self.retries:
            self._inflight.pop(rid, None)
            hint = ""
            if self.curve and not self._handshakes:
                hint = (" No CURVE handshake ever completed: check server_public_key (it must be the "
                        "server's public key) and that the server uses CURVE.")
            elif not self.curve and self._disconnects and not self._handshakes:
                hint = " The server closed every connection during the handshake: it may require CURVE."
            raise RequestTimeout(
                f"no reply from {self.address} to {pending.op!r} (request {rid}) after {pending.attempts} "
                f"attempt(s) of {self.timeout_s:g} s ({now - pending.started:.1f} s in all); the server may "
                f"be down, busy or unreachable.{hint}",
                details={"address": self.address, "op": pending.op, "attempts": pending.attempts,
                         "timeout_s": self.timeout_s})
        log.info("no reply to %s %s after %.1f s: reconnecting and retrying with the same id",
                 pending.op, rid, self.timeout_s)
        pending.attempts += 1
        self._close_socket()
        self._ensure_socket()
        for other in self._inflight.values():  # everything in flight went out on the old socket
            other.deadline = now + self.timeout_s
            self._sock.send_multipart(other.frames, copy=False)

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a reply; file replies in the mailbox, read monitor events.

        A blocking receive with a timeout, not a poller over socket and monitor: a poller costs a
        tenth of a loopback round trip, and monitor events only matter when no reply comes (a
        refused handshake), so they are read when the wait ends."""
        sock = self._sock
        ms = max(1, int(timeout_s * 1000))
        if ms != self._rcvtimeo_ms:
            sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo_ms = ms
        try:
            frames = sock.recv_multipart(copy=False)
        except zmq.Again:
            frames = None
        while frames is not None:
            self._file(frames)
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                break
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        if self._mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._read_monitor()

    def _file(self, frames: list) -> None:
        try:
            message, arrays = decode_reply(frames)
        except LabpnnError as exc:
            log.warning("malformed reply from %s dropped: %s", self.address, exc)
            return
        rid = message.id
        if isinstance(message, Progress):
            pending = self._inflight.get(rid)
            if pending is not None:
                pending.deadline = time.monotonic() + self.timeout_s
            return
        if rid is None and len(self._inflight) == 1:  # the server could not read our id
            rid = next(iter(self._inflight))
        if rid in self._inflight:
            del self._inflight[rid]
            self._mailbox[rid] = (message, arrays)
        elif rid in self._discard:
            self._discard.discard(rid)
        else:
            log.debug("reply to unknown request %s dropped", rid)

    def _read_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                self._disconnects += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._auth_error = AuthFailed(
                    f"the server at {self.address} refused our CURVE key (ZAP status {value}): "
                    "this client's public key is not in the server's authorized keys",
                    details={"address": self.address, "zap_status": value})
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                if self.curve:
                    why = ("CURVE handshake failed: the server may not use CURVE, or server_public_key is "
                           "not its public key")
                else:
                    why = ("security handshake failed: the server requires CURVE (pass server_public_key "
                           "and client_keys) or does not speak ZeroMQ")
                self._auth_error = AuthFailed(f"{self.address}: {why} (ZMQ event {kind:#x}, value {value})",
                                              details={"address": self.address, "event": kind, "value": value})

    def _ensure_socket(self) -> None:
        if self._sock is not None:
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve:
            from labpnn.remote import security

            security.make_curve_client(sock, self._server_public_key, self._client_keys)
        mon = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.address)
        self._sock, self._mon, self._rcvtimeo_ms = sock, mon, -1
        self._handshakes = self._disconnects = 0

    def _close_socket(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(linger=0)
        self._sock.close(linger=0)
        self._sock = self._mon = None


__all__ = ["RigClient"]
