"""``labpnn serve`` and ``labpnn replay``: a rig from a config, or recorded sessions, behind a
`DeviceServer` (``monitor`` and ``keys`` live beside what they use: `monitor`, `security`).

Imports no torch: the lab PC may not have it.
"""
from __future__ import annotations

import sys
import threading

import zmq

from labpnn.config import ConfigError
from labpnn.remote.server import DeviceServer, InsecureBind


def cli_serve(parser):
    parser.add_argument("--config", required=True, metavar="RIG.toml", help="rig configuration file")
    parser.add_argument("--bind", help="request socket address (default: [server] bind)")
    parser.add_argument("--publish", help="live stream address, '' to disable (default: [server] publish)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback address without CURVE (anyone on the network can drive the rig)")
    parser.add_argument("--curve-keys", metavar="DIR",
                        help="CURVE keys: DIR/server.key_secret and DIR/authorized/*.key (client public keys)")
    parser.add_argument("--publish-traces", action="store_true", help="attach full traces to the live stream")
    parser.add_argument("--record", metavar="DIR", help="record every batch served into a session in DIR")

    def handler(args) -> int:
        import sys

        from labpnn.config import build_rig, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"labpnn serve: {exc}", file=sys.stderr)
            return 2
        try:
            rig = build_rig(config)
        except (ConfigError, ValueError) as exc:
            print(f"labpnn serve: {exc}", file=sys.stderr)
            return 2
        connect = getattr(rig, "connect", None)
        if connect is not None:
            connect()
        system = rig
        if args.record:  # a lab-side record of everything the rig does, whoever asks
            from labpnn.sessions import record_to

            system = record_to(args.record, rig, name=config.name, on_write_error="warn")
            print(f"labpnn serve: recording to {system.writer.path}", flush=True)
        try:
            try:
                server = DeviceServer(system, config.server, bind=args.bind, publish=args.publish,
                                      insecure=args.insecure, curve_keys=args.curve_keys, name=config.name,
                                      publish_traces=args.publish_traces)
            except (InsecureBind, FileNotFoundError, ValueError) as exc:
                print(f"labpnn serve: {exc}", file=sys.stderr)
                return 2
            _serve_cli(server)
        finally:
            close = getattr(system, "close", None)
            if close is not None:
                close()
        return 0

    return handler


def _serve_cli(server: DeviceServer) -> None:
    import sys

    def announce():
        server._ready.wait()
        if server._start_error is None:
            print(f"labpnn serve: {server.name} listening on {server.address}"
                  + (f", live stream on {server.publish_address}" if server.publish_address else "")
                  + (" (CURVE)" if server._curve else ""), flush=True)
            sys.stdout.flush()

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.serve_forever()
    except zmq.ZMQError as exc:
        raise SystemExit(f"labpnn serve: cannot bind: {exc}") from None


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
