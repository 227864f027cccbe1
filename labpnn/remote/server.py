"""The device server: a physical system behind a ZeroMQ ROUTER (protocol: protocols/PROTOCOL.md).

Threads:
- the **socket thread** owns every socket: it decodes requests, answers the quick ops itself
  (hello, describe, status, ping, lock, unlock, abort), keeps the lock, lease and reply cache, and
  sends replies, progress and the live stream;
- the **worker thread** runs actuation jobs (``run``, ``configure``) one at a time, in order; it
  hands each finished reply back through a deque and wakes the socket thread through an inproc
  PAIR (ZeroMQ sockets are never shared between threads). A ``run`` the rig is expected to finish
  within ``inline_max_s`` (from its recent seconds per row; never the first batch, nor the first
  after a ``configure``) runs in the socket thread instead when the worker is idle: two thread
  wake-ups cost more than such a batch, and nothing waits longer than ``inline_max_s`` for it;
- with CURVE, pyzmq's ``ThreadAuthenticator`` answers ZAP requests in a third thread; the socket
  thread re-reads the allow-list directory when its keys change (checked every second), so a key
  added or removed there applies to new connections without a restart.

This module never imports torch (the lab PC may not have it).
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from labpnn.config import ServerSection
from labpnn.drivers.roles import FLAG_SATURATED
from labpnn.protocols.codec import decode_request, dumps, encode_error, encode_progress, encode_reply, peek_id
from labpnn.protocols.errors import (
    Aborted,
    BadArray,
    BadRequest,
    BadVersion,
    InternalError,
    InvalidControls,
    LabpnnError,
    ShuttingDown,
    TooLarge,
)
from labpnn.protocols.messages import CACHED_OPS, LOCKED_OPS, MAX_ARRAYS, MAX_HEADER_BYTES, VERSION
from labpnn.remote.adapter import SystemAdapter
from labpnn.remote.lease import LockLease, identity_hash
from labpnn.remote.reply_cache import ReplyCache

log = logging.getLogger(__name__)

SERVER_SOFTWARE = "labpnn"
MAX_EVICTED_IDS = 4096


class InsecureBind(ValueError):
    """Refusing to bind a non-loopback address without CURVE (pass insecure=True to force)."""


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.*, localhost, ::1, ipc, inproc)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    match = re.match(r"^[a-z]+://(\[[^\]]*\]|[^:]*)(:.*)?$", address)
    if not match:
        return False
    host = match.group(1).strip("[]").split(";")[-1]
    return host == "localhost" or host == "::1" or host.startswith("127.")


# -- jobs and the reply cache ------------------------------------------------------------------
NEVER_ABORTED = threading.Event()  #: for inline batches: nothing can abort them (nothing else runs meanwhile)


@dataclass(eq=False)
class Job:
    key: tuple[str, str]  #: (identity, request id)
    op: str
    route: list[bytes]  #: routing id (+ empty delimiter for REQ clients) of the latest attempt
    identity: str
    controls: np.ndarray | None = None
    settings: dict | None = None
    total: int | None = None
    abort: threading.Event = NEVER_ABORTED  #: a job for the worker gets its own event (`_enqueue`)
    state: str = "queued"
    done_rows: int | None = None
    last_progress: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.key[1]

    def set_done(self, n: int) -> None:
        self.done_rows = n


class DeviceServer:
    """Serve ``system`` over ZeroMQ. See the module docstring and PROTOCOL.md.

    ``server`` gives the defaults (bind, publish, limits, CURVE); ``bind``/``publish`` override
    the addresses (``publish=""`` disables the live stream). ``insecure=True`` allows a
    non-loopback address without CURVE. ``curve_keys`` is a ``--curve-keys`` directory.
    """

    def __init__(
        self,
        system: Any,
        server: ServerSection | None = None,
        *,
        bind: str | None = None,
        publish: str | None = None,
        insecure: bool = False,
        curve_keys: str | os.PathLike | None = None,
        name: str | None = None,
        progress_s: float = 1.0,
        status_interval_s: float = 1.0,
        publish_traces: bool = False,
        reply_cache_bytes: int = 32 * 2**20,
        shutdown_grace_s: float = 1.0,
    ):
        from labpnn.remote import security

        section = server or ServerSection()
        self.bind_address = bind if bind is not None else section.bind
        self.publish_request = publish if publish is not None else section.publish
        self.max_message_bytes = int(section.max_message_bytes)
        self.lease_s = float(section.lease_s)
        self.reply_cache = int(section.reply_cache)
        self.inline_max_s = float(section.inline_max_s)
        self.reply_cache_bytes = int(reply_cache_bytes)
        self.progress_s = float(progress_s)
        self.status_interval_s = float(status_interval_s)
        self.publish_traces = bool(publish_traces)
        self.shutdown_grace_s = float(shutdown_grace_s)

        if curve_keys is not None:
            self._curve = security.server_keys_from_dir(curve_keys)
        elif section.curve is not None:
            self._curve = security.server_keys(section.curve.server_secret_key, section.curve.authorized_keys)
        else:
            self._curve = None
        if self._curve is None and not insecure:
            for address in (self.bind_address, self.publish_request):
                if address and not is_loopback(address):
                    raise InsecureBind(
                        f"refusing to bind {address} without CURVE: anyone on the network could drive "
                        "the rig. Configure [server.curve] (or --curve-keys DIR), or force it with --insecure.")

        self._sys = SystemAdapter(system)
        self.name = name or str(self._sys.description.get("name") or "rig")

        # state shared with the worker thread (guarded by _jobs_lock)
        self._jobs_lock = threading.Lock()
        self._worker_waiting = False  # the worker is (about to be) blocked on _work_signal
        self._work_signal: queue.SimpleQueue[None] = queue.SimpleQueue()  # put() keeps the GIL
        self._result_nudged = False  # a wake-up for finished jobs is on its way to the socket thread
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._finished: collections.deque[tuple[Job, list[Any], dict | None]] = collections.deque()
        self._worker_stop = False
        self._row_s: float | None = None  # seconds per row of recent batches (rises at once, decays slowly)

        # socket-thread state
        self._pending: dict[tuple[str, str], Job] = {}
        self._cache = ReplyCache(self.reply_cache, self.reply_cache_bytes, MAX_EVICTED_IDS)
        self._jobs_of: collections.Counter[str] = collections.Counter()
        self._lock = LockLease(self.lease_s, busy=lambda identity: self._jobs_of[identity] > 0)
        self._rows_done = 0
        self._batches_done = 0
        self._batch_counter = itertools.count()
        self._last_error: dict | None = None
        self._seq = {b"batch": 0, b"status": 0}
        self._subscriptions: collections.Counter[bytes] = collections.Counter()
        self._started_mono = time.monotonic()
        self._status_due = 0.0
        self._housekeeping_due = 0.0
        self._status_dirty = False
        self._keys_due = 0.0
        self._keys_seen = None if self._curve is None else security.allow_list_signature(self._curve.authorized)

        self._ctx: zmq.Context | None = None
        self._auth = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = threading.Event()
        self.address: str | None = None
        self.publish_address: str | None = None
        self._wake_address = f"inproc://labpnn-worker-{id(self):x}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> DeviceServer:
        """Serve in a background thread; returns once the sockets are bound."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._main, name="labpnn-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until `stop()` or (in the main thread) SIGINT/SIGTERM."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.current_thread()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):  # pragma: no cover - platform without it
                    pass
        try:
            self._main()
            if self._start_error is not None:
                raise self._start_error
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def serve_announced(self, prefix: str = "labpnn serve") -> None:
        """`serve_forever`, printing ``PREFIX: NAME listening on ADDRESS`` once bound (what a
        person, or a process that started this one, reads the address from); a bind failure is a
        clear exit."""

        def announce():
            self._ready.wait()
            if self._start_error is None:
                print(f"{prefix}: {self.name} listening on {self.address}"
                      + (f", live stream on {self.publish_address}" if self.publish_address else "")
                      + (" (CURVE)" if self._curve else ""), flush=True)

        threading.Thread(target=announce, daemon=True).start()
        try:
            self.serve_forever()
        except zmq.ZMQError as exc:
            raise SystemExit(f"{prefix}: cannot bind: {exc}") from None

    def _on_signal(self, signum, frame) -> None:
        log.info("signal %s: stopping (answering or aborting the batch in flight)", signum)
        self._stop_requested.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop serving: queued jobs get SHUTDOWN, the running batch gets `shutdown_grace_s` to
        finish and is then aborted (its completed rows are returned), sockets are closed."""
        self._stop_requested.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout)

    def __enter__(self) -> DeviceServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- socket thread -------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            self._start_error = exc
            self._close_sockets()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _open(self) -> None:
        from labpnn.remote import security

        ctx = self._ctx = zmq.Context()
        if self._curve is not None:
            self._auth = security.start_authenticator(ctx, self._curve)
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 1000)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._router.setsockopt(zmq.SNDHWM, 0)  # never drop a reply for a connected client
        self._router.setsockopt(zmq.RCVHWM, 10000)
        if self._curve is not None:
            security.make_curve_server(self._router, self._curve)
        self._router.bind(self.bind_address)
        self.address = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._pub = None
        if self.publish_request:
            self._pub = ctx.socket(zmq.XPUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, 1000)
            self._pub.setsockopt(zmq.MAXMSGSIZE, 1 << 16)  # subscribers only send subscriptions
            if self._curve is not None:
                security.make_curve_server(self._pub, self._curve)
            self._pub.bind(self.publish_request)
            self.publish_address = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(self._wake_address)
        self._worker = threading.Thread(target=self._work, name="labpnn-worker", daemon=True)
        self._worker.start()
        log.info("serving %s on %s%s%s", self.name, self.address,
                 f", live stream on {self.publish_address}" if self.publish_address else "",
                 " (CURVE)" if self._curve else "")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        if self._pub is not None:
            poller.register(self._pub, zmq.POLLIN)
        while not self._stop_requested.is_set():
            try:
                events = dict(poller.poll(50))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            if self._wake in events:
                self._drain_finished()
            if self._router in events:
                router = self._router
                for _ in range(64):  # bounded, so finished jobs are not starved
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
                    if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
            if self._pub is not None and self._pub in events:
                self._read_subscriptions()
            if self._status_dirty or time.monotonic() >= self._housekeeping_due:
                self._housekeeping()

    def _handle(self, frames: list[zmq.Frame]) -> None:
        rid = None
        try:
            route = [frames[0].bytes]
            body = frames[1:]
            if body and len(body[0]) == 0:  # a REQ client's delimiter
                route.append(b"")
                body = body[1:]
            if self._stop_requested.is_set():
                self._send(route, encode_error(peek_id(body), ShuttingDown("the server is shutting down")))
                return
            try:
                request, arrays = decode_request(body, max_bytes=self.max_message_bytes)
            except LabpnnError as exc:
                rid = peek_id(body)
                self._note_error(exc, None)
                self._send(route, encode_error(rid, exc))
                return
            rid = request.id
            identity = self._identity(frames[0], request.token)
            self._touch(identity)
            op = request.op
            key = (identity, rid)
            cached = op in CACHED_OPS
            if (cached or key in self._pending or key in self._cache) and self._retry(key, op, route):
                return
            reply = self._dispatch(op, request, arrays, identity, route, key)
            if reply is not None:
                if cached:
                    self._cache.remember(key, op, reply)
                self._send(route, reply)
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("internal error handling a request")
            err = InternalError(f"internal server error: {type(exc).__name__}: {exc}")
            self._note_error(err, None)
            try:
                self._send([frames[0].bytes], encode_error(rid, err))
            except Exception:
                log.exception("could not even send the error reply")

    def _dispatch(self, op, request, arrays, identity, route, key) -> list[Any] | None:
        try:
            if op in LOCKED_OPS:
                self._require_lock(identity)
            return getattr(self, f"_op_{op}")(request, arrays, identity, route, key)
        except LabpnnError as exc:
            self._note_error(exc, op)
            return encode_error(request.id, exc)

    def _identity(self, first: zmq.Frame, token: str) -> str:
        if self._curve is not None:
            try:
                user = first.get("User-Id")
            except zmq.ZMQError:
                user = None
            if user:
                return f"curve:{user}/{token}"
        return f"token:{token}"

    def _send(self, route: list[bytes], frames: list[Any]) -> None:
        try:
            self._router.send_multipart([*route, *frames], copy=False)
        except zmq.ZMQError as exc:  # e.g. EHOSTUNREACH: the client is gone
            log.debug("reply not sent: %s", exc)

    # -- lock and lease (`LockLease`) ---------------------------------------------------------------
    def _touch(self, identity: str) -> None:
        self._lock.touch(identity)

    def _expire_lease(self) -> None:
        if self._lock.expire():
            self._status_dirty = True

    def _require_lock(self, identity: str) -> None:
        self._expire_lease()
        self._lock.require(identity)

    # -- reply cache -------------------------------------------------------------------------------
    def _retry(self, key, op, route) -> bool:
        """Answer a retried id from the cache or attach it to its job; False if the id is new."""
        job = self._pending.get(key)
        cached = self._cache.get(key) if job is None else None
        if job is None and cached is None:
            if self._cache.was_evicted(key):
                self._send(route, encode_error(key[1], BadRequest(
                    f"request {key[1]!r} already ran, but its reply was evicted from the reply cache",
                    details={"evicted": True})))
                return True
            return False
        original = job.op if job is not None else cached.op
        if original != op:
            self._send(route, encode_error(key[1], BadRequest(
                f"request id {key[1]!r} was already used for {original!r}; ids must be unique",
                details={"id": key[1], "op": original})))
            return True
        if job is not None:
            job.route = route
            log.debug("retry of %s attaches to its %s job", key[1], job.state)
        else:
            self._send(route, cached.frames)
        return True

    # -- quick ops (socket thread) ------------------------------------------------------------------
    def _limits(self) -> dict[str, Any]:
        return {"max_message_bytes": self.max_message_bytes, "max_header_bytes": MAX_HEADER_BYTES,
                "max_arrays": MAX_ARRAYS, "lease_s": self.lease_s, "reply_cache": self.reply_cache,
                "progress_s": self.progress_s}

    def _op_hello(self, request, arrays, identity, route, key):
        if VERSION.decode() not in request.args.versions:
            raise BadVersion(f"no common protocol version: client speaks {request.args.versions}, "
                             f"server speaks ['{VERSION.decode()}']", details={"supported": [VERSION.decode()]})
        if request.args.client:
            log.debug("hello from %s (%s)", identity_hash(identity), request.args.client)
        return encode_reply(request.id, result={
            "version": VERSION.decode(), "server": _software(), "name": self.name,
            "identity": identity_hash(identity), "curve": self._curve is not None, "limits": self._limits()})

    def _op_describe(self, request, arrays, identity, route, key):
        return encode_reply(request.id, result=self._sys.description)

    def _op_status(self, request, arrays, identity, route, key):
        return encode_reply(request.id, result=self._status(identity))

    def _op_ping(self, request, arrays, identity, route, key):
        return encode_reply(request.id, result={"t": time.time()})

    def _op_lock(self, request, arrays, identity, route, key):
        self._expire_lease()
        renewed = self._lock.take(identity, request.args.lease_s)
        if not renewed:
            self._status_dirty = True
        return encode_reply(request.id, result={
            "holder": identity_hash(identity), "lease_s": self._lock.lease_s,
            "lease_remaining_s": self._lock.remaining(), "renewed": renewed})

    def _op_unlock(self, request, arrays, identity, route, key):
        self._expire_lease()
        released = self._lock.release(identity)
        if released:
            self._status_dirty = True
        return encode_reply(request.id, result={"released": released})

    def _op_abort(self, request, arrays, identity, route, key):
        cancelled = []
        with self._jobs_lock:
            for job in list(self._queue):
                if job.identity == identity:
                    self._queue.remove(job)
                    cancelled.append(job)
            running = self._running
            signalled = running is not None and running.identity == identity
            if signalled:
                running.abort.set()
        for job in cancelled:
            self._complete(job, self._cancel_reply(job, Aborted("aborted before it started",
                                                                details={"n_done": 0})), None)
        log.info("abort from %s: running=%s, cancelled %d queued", identity_hash(identity), signalled,
                 len(cancelled))
        return encode_reply(request.id, result={"running": signalled, "cancelled": len(cancelled)})

    def _cancel_reply(self, job: Job, exc: LabpnnError) -> list[Any]:
        if job.op != "run":
            return encode_error(job.id, exc)
        c, s = self._sys.n_controls, self._sys.n_outputs
        return encode_reply(job.id, error=exc, result={"n_rows": job.total, "n_done": 0, "batch": None,
                                                       "busy_s": 0.0},
                            arrays={"traces": np.empty((0, s), np.float32),
                                    "applied": np.empty((0, c), np.float32),
                                    "timestamps": np.empty(0, np.float64), "flags": np.empty(0, np.uint32)})

    # -- actuation ops (queued for the worker) -----------------------------------------------------
    def _op_run(self, request, arrays, identity, route, key):
        controls = arrays.get("controls")
        if controls is None or len(arrays) != 1:
            raise BadArray("run takes exactly one array, 'controls' (float32[B, C])",
                           details={"arrays": sorted(arrays)})
        if controls.dtype != np.float32:
            raise BadArray(f"controls must be float32, got {request.arrays[0].dtype}",
                           details={"dtype": request.arrays[0].dtype})
        c, s = self._sys.n_controls, self._sys.n_outputs
        if controls.ndim != 2 or controls.shape[1] != c:
            raise InvalidControls(f"controls must have shape (B, {c}), got {list(controls.shape)}",
                                  details={"expected_channels": c, "shape": list(controls.shape)})
        rows = controls.shape[0]
        if rows == 0:
            raise InvalidControls("empty batch: controls must have at least one row")
        reply_bytes = rows * (4 * s + 4 * c + 8 + 4)
        if reply_bytes > self.max_message_bytes:
            most = self.max_message_bytes // (4 * s + 4 * c + 12)
            raise TooLarge(f"the reply to {rows} rows would be {reply_bytes} bytes, more than the limit of "
                           f"{self.max_message_bytes}; send at most {most} rows per batch",
                           details={"bytes": reply_bytes, "max_message_bytes": self.max_message_bytes,
                                    "max_rows": most})
        job = Job(key, "run", route, identity, controls=controls, total=rows)
        if not self._run_inline(job):
            self._enqueue(job)
        return None

    def _op_configure(self, request, arrays, identity, route, key):
        if arrays:
            raise BadArray("configure takes no arrays")
        self._enqueue(Job(key, "configure", route, identity, settings=request.args.settings))
        return None

    def _enqueue(self, job: Job) -> None:
        job.abort = threading.Event()
        self._pending[job.key] = job
        self._jobs_of[job.identity] += 1
        with self._jobs_lock:
            self._queue.append(job)
            wake, self._worker_waiting = self._worker_waiting, False
        if wake:
            self._work_signal.put(None)

    def _run_inline(self, job: Job) -> bool:
        """Run ``job`` in this (the socket) thread if the rig is idle and the batch is expected to
        take at most ``inline_max_s``; False if it must go to the worker."""
        row_s = self._row_s
        if row_s is None or row_s * (job.total or 1) > self.inline_max_s:
            return False
        with self._jobs_lock:
            if self._running is not None or self._queue:
                return False  # keep the order: it queues behind them
            job.state = "running"
            self._running = job
        self._pending[job.key] = job
        self._jobs_of[job.identity] += 1
        try:
            frames, summary = self._execute(job)
        except Exception as exc:  # _execute handles errors; this is a last resort
            log.exception("inline %s failed", job.op)
            frames, summary = encode_error(job.id, InternalError(f"{type(exc).__name__}: {exc}")), None
        finally:
            with self._jobs_lock:
                self._running = None
        self._complete(job, frames, summary)
        return True

    def _note_row_time(self, elapsed: float, rows: int) -> None:
        per_row = elapsed / rows
        previous = self._row_s
        self._row_s = per_row if previous is None or per_row > previous else 0.9 * previous + 0.1 * per_row

    # -- worker thread ---------------------------------------------------------------------------
    def _work(self) -> None:
        wake = self._ctx.socket(zmq.PAIR)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_address)
        try:
            while True:
                with self._jobs_lock:
                    job = self._queue.popleft() if self._queue else None
                    if job is not None:
                        job.state = "running"
                        self._running = job
                    else:
                        self._worker_waiting = True
                if job is None:
                    if self._worker_stop:
                        return
                    self._work_signal.get()  # until the socket thread queues a job (or stops us)
                    continue
                try:
                    frames, summary = self._execute(job)
                except Exception as exc:  # _execute handles errors; this is a last resort
                    log.exception("worker failed on %s", job.op)
                    frames, summary = encode_error(job.id, InternalError(f"{type(exc).__name__}: {exc}")), None
                with self._jobs_lock:
                    self._running = None
                    self._finished.append((job, frames, summary))
                    nudge, self._result_nudged = not self._result_nudged, True
                if nudge:  # one wake-up per drain is enough
                    wake.send(b"")
        finally:
            wake.close()

    def _execute(self, job: Job) -> tuple[list[Any], dict | None]:
        if job.op == "configure":
            try:
                self._row_s = None  # new settings may make the rig slower: measure it again
                settings = self._sys.configure(job.settings or {})
                self._sys.description = self._sys.describe()
            except Exception as exc:
                return self._failed(job, exc)
            return encode_reply(job.id, result={"settings": settings}), None
        started = time.perf_counter()
        try:
            m = self._sys.measure(job.controls, job.abort, job.set_done)
        except Exception as exc:
            return self._failed(job, exc)
        elapsed = time.perf_counter() - started
        batch = next(self._batch_counter)
        traces = np.asarray(m.traces, np.float32)
        flags = np.asarray(m.flags, np.uint32)
        n_done = int(traces.shape[0])
        if n_done:  # the pace of rows that were measured (a batch failing at once tells nothing)
            self._note_row_time(elapsed, n_done)
        result = {"n_rows": job.total, "n_done": n_done, "batch": batch, "busy_s": float(m.busy_s)}
        if m.meta:  # e.g. {"replay": "nearest"}: labels that must reach the caller
            result["meta"] = m.meta
        frames = encode_reply(job.id, result=result, error=m.error, arrays={
            "traces": traces, "applied": np.asarray(m.applied, np.float32),
            "timestamps": np.asarray(m.timestamps, np.float64), "flags": flags})
        return frames, {"batch": batch, "n_done": n_done, "traces": traces, "flags": flags,
                        "busy_s": float(m.busy_s), "error": m.error}

    @staticmethod
    def _failed(job: Job, exc: Exception) -> tuple[list[Any], dict]:
        """The error reply for a job whose system call raised: protocol errors as they are,
        anything else as INTERNAL (logged: it is a bug or an unexpected instrument fault)."""
        if not isinstance(exc, LabpnnError):
            log.error("%s failed", job.op, exc_info=exc)
            exc = InternalError(f"{job.op} failed: {type(exc).__name__}: {exc}")
        return encode_error(job.id, exc), {"error": exc}

    # -- results back in the socket thread ------------------------------------------------------
    def _drain_finished(self) -> None:
        try:  # the worker sends one wake-up per drain; a later one makes the poller fire again
            self._wake.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        with self._jobs_lock:
            finished = list(self._finished)
            self._finished.clear()
            self._result_nudged = False
        for job, frames, summary in finished:
            try:
                self._complete(job, frames, summary)
            except Exception:
                log.exception("internal error completing a job")

    def _complete(self, job: Job, frames: list[Any], summary: dict | None) -> None:
        job.state = "done"
        self._pending.pop(job.key, None)
        self._jobs_of[job.identity] -= 1
        if self._jobs_of[job.identity] <= 0:
            del self._jobs_of[job.identity]
        self._lock.touch(job.identity)
        self._send(job.route, frames)  # first: the bookkeeping below is not the client's wait
        self._cache.remember(job.key, job.op, frames)
        error = summary.get("error") if summary else None
        if error is not None:
            self._note_error(error, job.op)
        if summary is not None and "batch" in summary:
            self._rows_done += summary["n_done"]
            self._batches_done += 1
            if self._listening(b"batch"):
                self._publish_batch(job, summary)

    def _note_error(self, exc: LabpnnError, op: str | None) -> None:
        self._last_error = {"code": exc.code.value, "message": str(exc), "op": op, "t": time.time()}

    # -- status, progress, lease (socket thread, periodic) -------------------------------------------
    def _status(self, identity: str | None) -> dict[str, Any]:
        self._expire_lease()
        with self._jobs_lock:
            running = self._running
            queued = len(self._queue)
        remaining = self._lock.remaining()
        holder = self._lock.holder
        lock = {"held": holder is not None,
                "holder": identity_hash(holder) if holder else None,
                "lease_s": self._lock.lease_s if holder else None,
                "lease_remaining_s": None if remaining is None else round(remaining, 3)}
        if identity is not None:
            lock["you"] = identity == holder
        run_info = None
        rows = self._rows_done
        if running is not None:
            run_info = {"op": running.op, "done": running.done_rows, "total": running.total}
            rows += running.done_rows or 0
        return {"state": "running" if running is not None else "idle", "queue": queued, "running": run_info,
                "lock": lock, "rows_done": rows, "batches_done": self._batches_done,
                "busy_s": round(self._sys.busy_s, 6), "uptime_s": round(time.monotonic() - self._started_mono, 3),
                "last_error": self._last_error}

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._housekeeping_due = now + 0.02
        self._expire_lease()
        for job in list(self._pending.values()):
            if now - job.last_progress >= self.progress_s and len(job.route) == 1:
                job.last_progress = now
                if job.state == "running":
                    frames = encode_progress(job.id, state="running", done=job.done_rows, total=job.total)
                else:
                    with self._jobs_lock:
                        ahead = (self._queue.index(job) if job in self._queue else 0) + (
                            self._running is not None)
                    frames = encode_progress(job.id, state="queued", done=0, total=job.total,
                                             queue_position=ahead)
                self._send(job.route, frames)
        if self._auth is not None and now >= self._keys_due:
            self._reload_allow_list(now)
        if self._pub is not None and (self._status_dirty or now >= self._status_due):
            self._status_due = now + self.status_interval_s
            self._status_dirty = False
            if self._listening(b"status"):
                self._publish(b"status", self._status(None))

    def _reload_allow_list(self, now: float) -> None:
        from labpnn.remote import security

        self._keys_due = now + 1.0
        seen = security.allow_list_signature(self._curve.authorized)
        if seen is None or seen == self._keys_seen:
            return  # unchanged, or unreadable (the keys loaded before stay in force)
        self._keys_seen = seen
        self._auth.configure_curve(domain="*", location=str(self._curve.authorized))
        log.info("allow-list %s re-read: %d client key(s)", self._curve.authorized, len(seen))

    # -- live stream -------------------------------------------------------------------------------
    def _read_subscriptions(self) -> None:
        while True:
            try:
                msg = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg:
                continue
            topic = bytes(msg[1:])
            if msg[0] == 1:
                self._subscriptions[topic] += 1
                if topic == b"" or b"status".startswith(topic):
                    self._status_dirty = True  # a new subscriber gets a status at once
            elif msg[0] == 0 and self._subscriptions[topic] > 0:
                self._subscriptions[topic] -= 1
                if not self._subscriptions[topic]:
                    del self._subscriptions[topic]

    def _listening(self, topic: bytes) -> bool:
        return self._pub is not None and any(topic.startswith(p) for p in self._subscriptions)

    def _publish(self, topic: bytes, header: dict, arrays: list | None = None, specs: list | None = None) -> None:
        seq = self._seq[topic]
        self._seq[topic] = seq + 1
        body = {"seq": seq, "t": time.time(), **header, "arrays": specs or []}
        try:
            self._pub.send_multipart([topic, VERSION, dumps(body), *(arrays or [])], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.debug("publish dropped: %s", exc)

    def _publish_batch(self, job: Job, summary: dict) -> None:
        traces, flags = summary["traces"], summary["flags"]
        stats = None
        if traces.size:
            stats = {"min": float(traces.min()), "mean": float(traces.mean()), "max": float(traces.max()),
                     "saturated_rows": int(np.count_nonzero(flags & FLAG_SATURATED))}
        error = summary.get("error")
        header = {"batch": summary["batch"], "holder": identity_hash(job.identity), "n_rows": job.total,
                  "n_done": summary["n_done"], "ok": error is None,
                  "error": error.code.value if error is not None else None, "busy_s": summary["busy_s"],
                  "n_outputs": self._sys.n_outputs, "trace_bytes": int(traces.nbytes), "stats": stats}
        if self.publish_traces:
            specs = [{"name": "traces", "dtype": "float32", "shape": list(traces.shape)}]
            self._publish(b"batch", header, [traces.data if traces.nbytes else b""], specs)
        else:
            self._publish(b"batch", header)

    # -- shutdown ----------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        try:
            with self._jobs_lock:
                queued = list(self._queue)
                self._queue.clear()
                self._worker_stop = True
                running = self._running
            self._work_signal.put(None)
            for job in queued:
                self._complete(job, self._cancel_reply(job, ShuttingDown("the server is shutting down")), None)
            if running is not None:
                deadline = time.monotonic() + self.shutdown_grace_s
                while running.state != "done" and time.monotonic() < deadline:
                    self._wait_finished(0.05)
                if running.state != "done":
                    log.info("aborting the batch in flight")
                    running.abort.set()
            if self._worker is not None:
                give_up = time.monotonic() + self.shutdown_grace_s + 10.0
                while self._worker.is_alive() and time.monotonic() < give_up:
                    self._wait_finished(0.05)
                    self._worker.join(0.01)
                if self._worker.is_alive():
                    log.warning("the instrument did not return within %.0f s of the abort; leaving it behind",
                                self.shutdown_grace_s + 10.0)
                    self._worker_stuck = True
            self._drain_finished()
        except Exception:
            log.exception("error while shutting down")
        finally:
            self._close_sockets()
            self._closed.set()
            log.info("server stopped")

    def _wait_finished(self, timeout: float) -> None:
        if self._wake.poll(int(timeout * 1000)):
            self._drain_finished()

    def _close_sockets(self) -> None:
        for name in ("_wake", "_pub", "_router"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close()
                setattr(self, name, None)
        if self._auth is not None:
            try:
                self._auth.stop()
            except Exception:
                log.exception("stopping the authenticator failed")
            self._auth = None
        if self._ctx is not None:
            if not getattr(self, "_worker_stuck", False):  # term() would wait for the worker's socket
                self._ctx.term()
            self._ctx = None


def _software() -> str:
    try:
        from importlib.metadata import version

        return f"{SERVER_SOFTWARE} {version('labpnn')}"
    except Exception:
        return SERVER_SOFTWARE


__all__ = ["DeviceServer", "InsecureBind", "SystemAdapter", "identity_hash", "is_loopback"]
