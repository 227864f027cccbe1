"""What every emulator's server shares: a thread per connection, live connections tracked so
`stop()` can cut them (a client that vanished must not keep a handler thread alive), the
start/stop lifecycle on 127.0.0.1 with port 0 meaning "pick a free one", and the way a bench's
command line serves until SIGINT/SIGTERM (`stop_on_signals`) — or until the process that started
it dies (`stop_with_parent`)."""
from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any


def _prctl(option: int, value: int) -> None:
    """``prctl(option, value)`` on Linux; nothing elsewhere (best effort)."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_LIBC: Any = None


def fine_sleeps() -> None:
    """Let this thread's sleeps end within ~1 us of their deadline instead of Linux's default timer
    slack of 50 us (``prctl(PR_SET_TIMERSLACK)``; best effort, Linux only), so an emulator's modelled
    times (wire, latch, sweep) are kept as a real instrument keeps them."""
    _prctl(29, 1000)  # PR_SET_TIMERSLACK, in ns


def stop_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: Linux sends the child SIGTERM when the thread that started it
    ends (``prctl(PR_SET_PDEATHSIG)``), so an emulator started for a benchmark stops with it even
    when the benchmark is killed and never reaches its ``finally`` (best effort; Linux only). Start
    it from a thread that lives as long as the emulator is needed."""
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGINT and SIGTERM set while the block runs (the previous handlers come back
    after it). Outside the main thread no handler can be installed: the caller stops it otherwise."""
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread
            pass
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TrackedConnections:
    """Mixin for a ``socketserver`` threading server (put it first in the bases)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr, handler, owner: Any):
        self.owner = owner  # the emulator; handlers reach it as ``self.server.owner``
        self.live: set = set()
        self.live_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request_thread(self, request, client_address):
        fine_sleeps()  # e.g. the VNA's *OPC? answers when the sweep ends, not 50-100 us later
        with self.live_lock:
            self.live.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.live_lock:
                self.live.discard(request)


class Served:
    """Lifecycle of an emulator that serves ``server_class((host, port), handler_class, self)``.

    Subclasses set ``server_class``, ``handler_class`` and ``thread_name``, and ``host``/``_port``
    in their ``__init__``."""

    server_class: type[socketserver.BaseServer]
    handler_class: type[socketserver.BaseRequestHandler]
    thread_name = "emulator"
    host: str
    _port: int
    _server: socketserver.BaseServer | None = None
    _thread: threading.Thread | None = None

    def start(self):
        if self._server is not None:
            return self
        self._server = self.server_class((self.host, self._port), self.handler_class, self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        srv.shutdown()
        with srv.live_lock:
            live = list(srv.live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port
