"""Transcript-replaying servers for the driver tests (127.0.0.1 only).

Each expects the exact requests of a script, in order, and sends the scripted replies; anything
else is recorded as a mismatch (and the connection dropped) so `verify()` fails the test. They
share nothing with ``sim_instruments``: the transcripts are written from the instruments'
manuals, byte for byte.
"""
from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


# -- SCPI over a raw socket ------------------------------------------------------------------------
@dataclass
class Step:
    """One exchange: the exact request line (terminator included) and the exact reply bytes.

    ``repeat=True``: the step may match any number of times (at least once) before the next.
    """

    expect: bytes
    reply: bytes | None = None
    repeat: bool = False


class ScpiTranscript:
    """Serves one TCP connection on 127.0.0.1, replaying ``steps``; use as a context manager."""

    def __init__(self, steps: list[Step]):
        self.steps = list(steps)
        self.errors: list[str] = []
        self.received: list[bytes] = []
        self._index = 0
        self._hits = [0] * len(self.steps)
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def resource(self) -> str:
        return f"TCPIP::127.0.0.1::{self.port}::SOCKET"

    def __enter__(self) -> ScpiTranscript:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        conn = None
        while conn is None and not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
        if conn is None:
            return
        conn.settimeout(0.05)
        buffer = b""
        with conn:
            while not self._stop.is_set():
                while b"\n" not in buffer:
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        if self._stop.is_set():
                            return
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return
                    buffer += chunk
                line, buffer = buffer.split(b"\n", 1)
                line += b"\n"
                self.received.append(line)
                step = self._match(line)
                if step is None:
                    return  # mismatch recorded; drop the connection
                if step.reply is not None:
                    conn.sendall(step.reply)

    def _match(self, line: bytes) -> Step | None:
        i = self._index
        if i < len(self.steps) and self.steps[i].expect == line:
            self._hits[i] += 1
            if not self.steps[i].repeat:
                self._index += 1
            return self.steps[i]
        if i < len(self.steps) and self.steps[i].repeat and self._hits[i] \
                and i + 1 < len(self.steps) and self.steps[i + 1].expect == line:
            self._index = i + 1
            return self._match(line)
        expected = self.steps[i].expect if i < len(self.steps) else "(end of script)"
        self.errors.append(f"step {i}: expected {expected!r}, got {line!r}")
        return None

    def verify(self) -> None:
        """Fail unless every request matched and every step was used."""
        assert not self.errors, self.errors
        left = [s.expect for s, hits in zip(self.steps, self._hits, strict=True) if not hits]
        assert not left, f"steps never requested: {left}"


def lines(*pairs: tuple[str, str | bytes | None], term: bytes = b"\n") -> list[Step]:
    """Steps from (request, reply) text pairs, both terminated with ``term`` (bytes replies as is)."""
    out = []
    for request, reply in pairs:
        if isinstance(reply, str):
            reply = reply.encode() + term
        out.append(Step(request.encode() + term, reply))
    return out


def block(payload: bytes, term: bytes = b"\n") -> bytes:
    """``#<n><len><payload><term>``."""
    size = str(len(payload)).encode()
    return b"#" + str(len(size)).encode() + size + payload + term


# -- HTTP ------------------------------------------------------------------------------------------
@dataclass
class HttpStep:
    """One HTTP exchange: the exact method, path and JSON body (None: no body); the reply."""

    method: str
    path: str
    body: Any = None
    reply: Any = None  #: dict/list -> JSON; str/bytes -> as is
    status: int = 200
    content_type: str | None = None


class HttpTranscript:
    """An HTTP server on 127.0.0.1 replaying ``steps``; use as a context manager."""

    def __init__(self, steps: list[HttpStep]):
        self.steps = list(steps)
        self.errors: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self._index = 0
        self._lock = threading.Lock()
        transcript = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as requests.Session uses it
            timeout = 2.0

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, ctype, payload = transcript._answer(self.command, self.path, raw, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> HttpTranscript:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _answer(self, method: str, path: str, raw: bytes, headers: dict) -> tuple[int, str, bytes]:
        with self._lock:
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
            self.requests.append({"method": method, "path": path, "body": body, "headers": headers})
            i = self._index
            if i >= len(self.steps):
                self.errors.append(f"request {method} {path} after the end of the script")
                return 500, "text/plain", b"transcript: unexpected request"
            step = self.steps[i]
            got, want = (method, path, body), (step.method, step.path, step.body)
            if got != want:
                self.errors.append(f"step {i}: expected {want!r}, got {got!r}")
                return 500, "text/plain", b"transcript: mismatch"
            if step.body is not None and "json" not in headers.get("Content-Type", ""):
                self.errors.append(f"step {i}: body sent as {headers.get('Content-Type')!r}, not JSON")
            self._index += 1
            reply = step.reply
            if isinstance(reply, (dict, list)):
                return step.status, step.content_type or "application/json", json.dumps(reply).encode()
            if isinstance(reply, str):
                reply = reply.encode()
            return step.status, step.content_type or "text/plain", reply or b""

    def verify(self) -> None:
        assert not self.errors, self.errors
        assert self._index == len(self.steps), f"steps never requested: {self.steps[self._index:]}"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
