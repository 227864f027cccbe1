"""``labpnn monitor ADDR``: follow a device server's live stream (PROTOCOL.md §12).

Prints, every ``--interval`` seconds, the batch and row rates, the trace volume, trace statistics
(min/mean/max over the interval, rows flagged saturated), missed messages (sequence gaps) and the
server state. ``--count N`` stops after N batches, ``--seconds S`` after S seconds. Read-only: a
monitor never slows or blocks the server (it publishes without waiting; a slow monitor just sees
gaps).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import zmq

from labpnn.protocols.messages import VERSION


class Follower:
    """Accumulates live-stream messages: counts, volumes, trace statistics, sequence gaps."""

    def __init__(self) -> None:
        self.batches = self.rows = self.trace_bytes = self.saturated_rows = self.failed = 0
        self.gaps = 0
        self.status: dict | None = None
        self._last_seq: dict[bytes, int] = {}
        self.min, self.max, self._sum, self._weight = math.inf, -math.inf, 0.0, 0

    def add(self, topic: bytes, header: dict[str, Any]) -> None:
        seq = header.get("seq")
        if isinstance(seq, int):
            last = self._last_seq.get(topic)
            if last is not None and seq > last + 1:
                self.gaps += seq - last - 1
            self._last_seq[topic] = seq
        if topic == b"batch":
            n = int(header.get("n_done") or 0)
            self.batches += 1
            self.rows += n
            self.trace_bytes += int(header.get("trace_bytes") or 0)
            if header.get("ok") is False:
                self.failed += 1
            stats = header.get("stats")
            if stats and n:
                self.min = min(self.min, stats["min"])
                self.max = max(self.max, stats["max"])
                self._sum += stats["mean"] * n
                self._weight += n
                self.saturated_rows += int(stats.get("saturated_rows") or 0)
        elif topic == b"status":
            self.status = header

    @property
    def mean(self) -> float:
        return self._sum / self._weight if self._weight else math.nan

    def summary(self) -> dict[str, Any]:
        return {"batches": self.batches, "rows": self.rows, "trace_bytes": self.trace_bytes,
                "failed": self.failed, "gaps": self.gaps, "saturated_rows": self.saturated_rows,
                "min": self.min if self._weight else math.nan, "mean": self.mean,
                "max": self.max if self._weight else math.nan}


def _line(window: Follower, total: Follower, seconds: float, elapsed: float) -> str:
    dt = max(seconds, 1e-9)
    text = (f"[{elapsed:7.1f} s] {window.batches / dt:8.1f} batches/s {window.rows / dt:9.1f} rows/s "
            f"{window.trace_bytes / dt / 1e6:8.2f} MB/s")
    if window._weight:
        text += f" | traces min {window.min:.4g} mean {window.mean:.4g} max {window.max:.4g}"
        text += f" | saturated rows {window.saturated_rows}"
    if window.failed:
        text += f" | failed batches {window.failed}"
    text += f" | gaps {total.gaps}"
    status = total.status
    if status:
        holder = (status.get("lock") or {}).get("holder") or "-"
        text += f" | {status.get('state', '?')}, queue {status.get('queue', 0)}, lock {holder}"
    return text


def monitor(address: str, *, count: int | None = None, seconds: float | None = None, interval_s: float = 1.0,
            server_public_key: Any = None, client_keys: Any = None,
            out: Callable[[str], None] = print) -> dict[str, Any]:
    """Follow the stream at ``address`` until ``count`` batches or ``seconds`` have passed (or
    forever); print a line every ``interval_s``; return the totals (`Follower.summary`)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10000)
    if server_public_key is not None:
        from labpnn.remote import security

        security.make_curve_client(sock, server_public_key, client_keys)
    sock.setsockopt(zmq.SUBSCRIBE, b"batch")
    sock.setsockopt(zmq.SUBSCRIBE, b"status")
    sock.connect(address)
    total, window = Follower(), Follower()
    started = last = time.monotonic()
    end = None if seconds is None else started + seconds
    try:
        while True:
            now = time.monotonic()
            if (count is not None and total.batches >= count) or (end is not None and now >= end):
                break
            wait = min(last + interval_s, end if end is not None else math.inf) - now
            if sock.poll(max(0, int(wait * 1000))):
                frames = sock.recv_multipart()
                if len(frames) >= 3 and frames[1] == VERSION:
                    try:
                        header = json.loads(frames[2])
                    except ValueError:
                        continue
                    if isinstance(header, dict):
                        total.add(frames[0], header)
                        window.add(frames[0], header)
                        window.status = total.status
            now = time.monotonic()
            if now - last >= interval_s:
                out(_line(window, total, now - last, now - started))
                window, last = Follower(), now
        now = time.monotonic()
        if window.batches or now - last > 0.05:
            out(_line(window, total, now - last, now - started))
        summary = total.summary()
        out(f"total: {summary['batches']} batches, {summary['rows']} rows, "
            f"{summary['trace_bytes'] / 1e6:.2f} MB in {now - started:.1f} s; {summary['gaps']} missed messages")
        return summary
    finally:
        sock.close()
        ctx.term()


def cli_monitor(parser):
    parser.add_argument("address", metavar="ADDR", help="the server's live stream, e.g. tcp://127.0.0.1:5556")
    parser.add_argument("--count", type=int, help="stop after N batches")
    parser.add_argument("--seconds", type=float, help="stop after S seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between lines (default 1)")
    parser.add_argument("--server-key", help="server public key (file or Z85) if the server uses CURVE")
    parser.add_argument("--client-key", help="this client's .key_secret file (CURVE)")

    def handler(args) -> int:
        try:
            monitor(args.address, count=args.count, seconds=args.seconds, interval_s=args.interval,
                    server_public_key=args.server_key, client_keys=args.client_key)
        except KeyboardInterrupt:
            pass
        return 0

    return handler
