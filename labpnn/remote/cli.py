"""``labpnn replay``: recorded sessions behind a `DeviceServer` (``monitor`` and ``keys`` live beside
what they use: `monitor`, `security`; ``labpnn serve`` is the top-level `labpnn.serve`, which may
also serve a fitted twin).

Imports no torch: the lab PC may not have it.
"""
from __future__ import annotations

import sys


def cli_replay(parser):
    parser.add_argument("sessions", nargs="+", metavar="SESSION", help="session file(s) to serve (same shape)")
    parser.add_argument("--bind", default="tcp://127.0.0.1:5555", help="request socket (default tcp://127.0.0.1:5555)")
    parser.add_argument("--publish", default="", help="live stream address (default: none)")
    parser.add_argument("--mode", choices=("exact", "nearest"), default="exact",
                        help="exact: only recorded controls are answered (default); nearest: unmeasured "
                             "controls get the nearest record, labelled as approximate in every reply")
    parser.add_argument("--tolerance", type=float, default=1e-6,
                        help="max-abs difference per channel for controls to match a record (default 1e-6)")
    parser.add_argument("--tags", nargs="+", help="replay only rows with these tags")
    parser.add_argument("--max-memory-mb", type=float, default=1024,
                        help="hold traces in memory up to this size; beyond it read them from the files "
                             "as batches ask (default 1024)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback address without CURVE")

    def handler(args) -> int:
        import signal
        import threading

        from labpnn.sessions.replay import ReplayRig

        try:
            rig = ReplayRig(args.sessions, tolerance=args.tolerance, mode=args.mode, tags=args.tags,
                            max_memory_bytes=int(args.max_memory_mb * 2**20))
        except (FileNotFoundError, ValueError) as exc:
            print(f"labpnn replay: {exc}", file=sys.stderr)
            return 2
        from labpnn.remote.server import DeviceServer

        try:
            server = DeviceServer(rig, bind=args.bind, publish=args.publish, insecure=args.insecure)
            server.start()
        except Exception as exc:  # noqa: BLE001 - bind errors, insecure address
            print(f"labpnn replay: cannot serve: {exc}", file=sys.stderr)
            return 2
        info = rig.describe()["replay"]
        note = "" if args.mode == "exact" else " — ANSWERS UNMEASURED CONTROLS (nearest record), labelled in replies"
        print(f"labpnn replay: serving {info['rows']} recorded rows of {', '.join(args.sessions)} on "
              f"{server.address} (mode {args.mode}, tolerance {args.tolerance:g}, traces in {info['traces']})"
              f"{note}", flush=True)
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            rig.close()
            print(f"labpnn replay: stopped after answering {rig.rows_answered} rows", flush=True)
        return 0

    return handler
