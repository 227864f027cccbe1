"""A session writer run as a separate process by the session tests (killed with SIGKILL, read
from another process, given a file size limit). Batch ``i`` has content that depends only on ``i``
(see `expected`), so a reader can check every batch it sees.

    python session_worker.py PATH [--period S] [--flush-every K] [--fsize BYTES] [--no-space-check]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from labpnn.contract import Measurement

C, S = 4, 256
DESCRIBE = {"name": "worker", "n_controls": C, "n_outputs": S,
            "axis": {"name": "wavelength", "unit": "nm", "values": list(np.linspace(500, 600, S))},
            "instruments": {"worker": "labpnn tests"}, "settings": {}}


def expected(i: int) -> Measurement:
    n = 8 + i % 5
    controls = np.full((n, C), (i % 100) / 100, np.float32)
    traces = (np.arange(n * S, dtype=np.float32).reshape(n, S) + 1000.0 * i)
    stamps = i + np.arange(n) / 100.0
    flags = np.full(n, i % 7, np.uint32)
    return Measurement(controls, traces, controls * 0.5, stamps, flags)


def tag_of(i: int) -> str:
    return ("calibration", "train", "eval")[i % 3]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--period", type=float, default=0.0)
    parser.add_argument("--flush-every", type=int, default=10)
    parser.add_argument("--fsize", type=int, default=0)
    parser.add_argument("--no-space-check", action="store_true")
    parser.add_argument("--batches", type=int, default=10**9)
    parser.add_argument("--writer", default="thread")
    args = parser.parse_args()
    if args.fsize:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, resource.RLIM_INFINITY))
    from labpnn.sessions import SessionWriteError, SessionWriter

    writer = SessionWriter(args.path, DESCRIBE, queue_batches=4, provenance={"seeds": [7]}, writer=args.writer)
    writer._check_space = not args.no_space_check
    print("ready", getattr(getattr(writer, "_proc", None), "pid", ""), flush=True)
    i = 0
    try:
        while i < args.batches:
            writer.append(expected(i), tag_of(i))
            if i % 25 == 0:
                writer.event("tick", f"batch {i}", i=i)
            i += 1
            if i % args.flush_every == 0:
                writer.flush()
                print(f"flushed {i}", flush=True)
            if args.period:
                time.sleep(args.period)
        writer.close()
    except SessionWriteError as exc:
        print(f"error {exc}", flush=True)
        try:
            writer.close()
        except SessionWriteError as again:
            print(f"close {again}", flush=True)
        return 3
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
