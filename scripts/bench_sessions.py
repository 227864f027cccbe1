"""Benchmark session recording.

1. Writer throughput: `SessionWriter.append` (+ close) of B x S float32 batches vs `ndarray.tofile`
   of the same arrays to the same directory in the same run (best of a few alternating rounds).
   Two kinds of input: arrays as a `RigClient` returns them (read-only views of the received
   frames: appended without a copy) and writable arrays (copied on append, so that the caller may
   change them afterwards).
2. `RigClient` throughput with recording off vs on, against a device server in another process
   serving the built-in test rig: zero-cost (transport-bound, the hard case) and with a per-row
   latency (20 ms per row: a rig whose instrument time dominates, as the optical bench's does;
   bench_optical.py measures that stack itself). Recording "trainer"
   wraps the client in a `RecordingSystem`; "lab" records inside the server process
   (what `labpnn serve --record DIR` does). Lockstep `run` and pipelined `measure_many`.

    .venv/bin/python scripts/bench_sessions.py [--dir DIR] [--rows 64] [--outputs 2048] [--quick]

Targets (issue "Sessions"): writer >= 0.5 x tofile; recording on >= 0.95 x off.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from labpnn.contract import Measurement
from labpnn.sessions import RecordingSystem, SessionWriter


def _batches(n_batches: int, rows: int, outputs: int, controls: int = 16, received: bool = False):
    """Measurements of one batch each; ``received``: read-only over immutable bytes, as the arrays of
    a `RigClient` measurement are (views of the received ZeroMQ frames)."""
    rng = np.random.default_rng(0)
    traces = rng.random((rows, outputs), dtype=np.float32)
    ctl = rng.random((rows, controls), dtype=np.float32)
    stamps = np.arange(rows, dtype=np.float64)
    flags = np.zeros(rows, np.uint32)
    if received:
        traces, ctl, stamps, flags = (np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)
                                      for a in (traces, ctl, stamps, flags))
    return [Measurement(ctl, traces, ctl, stamps, flags) for _ in range(n_batches)]


def bench_writer(directory: Path, rows: int, outputs: int, n_batches: int, rounds: int) -> dict:
    ms = _batches(n_batches, rows, outputs)
    inputs = {"received": _batches(n_batches, rows, outputs, received=True), "writable": ms}
    payload = sum(m.traces.nbytes + 2 * m.controls.nbytes + m.timestamps.nbytes + m.flags.nbytes for m in ms)
    describe = {"name": "bench", "n_controls": 16, "n_outputs": outputs,
                "axis": {"name": "pixel", "unit": "1", "values": list(range(outputs))}}
    SessionWriter(directory / "warm-up.h5", describe).close()  # provenance (git) is collected once
    writer_s: dict[str, list[float]] = {kind: [] for kind in inputs}
    tofile_s, create_s = [], []
    for k in range(rounds):
        for kind, batches in inputs.items():
            path = directory / f"bench-{k}-{kind}.h5"
            started = time.perf_counter()
            w = SessionWriter(path, describe)  # creating the file (all datasets, SWMR on) is timed apart
            create_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            with w:
                for m in batches:
                    w.append(m)
            writer_s[kind].append(time.perf_counter() - started)
            size = path.stat().st_size
            path.unlink()
        raw = directory / f"bench-{k}.bin"
        started = time.perf_counter()
        with open(raw, "wb") as fh:
            for m in ms:
                m.traces.tofile(fh)
                m.controls.tofile(fh)
                m.applied.tofile(fh)
                m.timestamps.tofile(fh)
                m.flags.tofile(fh)
                fh.flush()
        tofile_s.append(time.perf_counter() - started)
        raw.unlink()
    w_mb = payload / min(writer_s["received"]) / 1e6
    c_mb = payload / min(writer_s["writable"]) / 1e6
    t_mb = payload / min(tofile_s) / 1e6
    return {"batch": f"{rows}x{outputs}", "batches": n_batches, "MB": round(payload / 1e6, 1),
            "file_overhead": round(size / payload - 1, 4), "writer_MB_s": round(w_mb), "tofile_MB_s": round(t_mb),
            "ratio": round(w_mb / t_mb, 2), "target": ">= 0.5", "writable_MB_s": round(c_mb),
            "writable_ratio": round(c_mb / t_mb, 2), "create_ms": round(1e3 * min(create_s), 1)}


def bench_disk(directory: Path, megabytes: int) -> float:
    """MB/s the disk sustains: ``megabytes`` written and fsync'd (the page cache hides the disk for
    a few seconds of writing, then the kernel throttles writers to it)."""
    block = np.zeros(2**20, np.uint8)
    path = directory / "disk.bin"
    started = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(megabytes):
            fh.write(block.data)
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return megabytes * 2**20 / elapsed / 1e6


# -- device server in a child process -----------------------------------------------------------
def serve_child(args) -> None:
    from labpnn.remote.server import DeviceServer
    from labpnn.rig import Rig
    from labpnn.sessions import record_to
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(16, args.outputs, zero_cost=args.latency == 0, latency_s=args.latency, noise=0.0)
    rig = Rig([sim], [sim], name="bench").connect()
    system = record_to(args.record, rig, writer=args.writer) if args.record else rig
    server = DeviceServer(system, bind=args.bind, publish="")
    server.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()
    system.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(outputs: int, latency: float, record: str | None, writer: str = "thread"):
    address = f"tcp://127.0.0.1:{_free_port()}"
    cmd = [sys.executable, __file__, "--serve-child", "--bind", address, "--outputs", str(outputs),
           "--latency", str(latency), "--writer", writer] + (["--record", record] if record else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc, address


def _rate(system, controls, seconds: float, pipelined: bool, max_batches: int) -> float:
    done, started = 0, time.perf_counter()
    if pipelined:
        def feed():
            while time.perf_counter() - started < seconds and done_box[0] < max_batches:
                yield controls
        done_box = [0]
        for _ in system.measure_many(feed(), max_in_flight=4):
            done_box[0] += 1
        done = done_box[0]
    else:
        while time.perf_counter() - started < seconds and done < max_batches:
            system.run(controls)
            done += 1
    return done * controls.shape[0] / (time.perf_counter() - started)


def bench_client(directory: Path, rows: int, outputs: int, latency: float, seconds: float, rounds: int,
                 max_batches: int, apis=("run", "measure_many")) -> list[dict]:
    """Rows/s through a RigClient with recording off and on: on the trainer side (the client
    wrapped in a RecordingSystem; writer thread, and writer process) and on the lab side (the
    server records, as `labpnn serve --record` does: `record_to`, writer process)."""
    from labpnn.remote.client import RigClient

    controls = np.random.default_rng(1).random((rows, 16), dtype=np.float32)
    results = []
    for api in apis:
        pipelined = api == "measure_many"
        proc, address = _start_server(outputs, latency, None)
        rates: dict[str, list[float]] = {"off": [], "thread": [], "process": []}
        try:
            with RigClient(address) as client:
                _rate(client, controls, min(0.5, seconds), pipelined, 3)  # warm up
                for k in range(rounds):  # alternate, so slow phases of a noisy machine hit all alike
                    rates["off"].append(_rate(client, controls, seconds, pipelined, max_batches))
                    for writer in ("thread", "process"):
                        path = directory / f"trainer-{api}-{latency}-{writer}-{k}.h5"
                        with SessionWriter(path, client.describe(), writer=writer) as w:
                            rates[writer].append(_rate(RecordingSystem(client, w), controls, seconds, pipelined,
                                                       max_batches))
        finally:
            proc.stdin.close()
            proc.wait()
        for writer in ("thread", "process"):
            results.append({"side": f"trainer/{writer}", "api": api, "latency_s_per_row": latency,
                            "rows_s_off": round(max(rates["off"])), "rows_s_on": round(max(rates[writer])),
                            "ratio": round(max(rates[writer]) / max(rates["off"]), 3)})
        lab: dict[bool, list[float]] = {False: [], True: []}
        for k in range(rounds):
            for record in (False, True):
                proc, address = _start_server(outputs, latency, str(directory / f"lab-{api}-{latency}-{k}")
                                              if record else None, "process")
                try:
                    with RigClient(address) as client:
                        _rate(client, controls, min(0.5, seconds), pipelined, 3)
                        lab[record].append(_rate(client, controls, seconds, pipelined, max_batches))
                finally:
                    proc.stdin.close()
                    proc.wait()
        results.append({"side": "lab/process", "api": api, "latency_s_per_row": latency,
                        "rows_s_off": round(max(lab[False])), "rows_s_on": round(max(lab[True])),
                        "ratio": round(max(lab[True]) / max(lab[False]), 3)})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="directory on the disk to test (default: a temporary one)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--outputs", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--writer", choices=("thread", "process"), default="thread",
                        help="session writer: a thread (default) or a separate process")
    args = parser.parse_args()
    if args.serve_child:
        serve_child(args)
        return 0
    directory = Path(tempfile.mkdtemp(prefix="bench-sessions-", dir=args.dir))
    try:
        rounds = 1 if args.quick else 3
        writer = bench_writer(directory, args.rows, args.outputs, 100 if args.quick else 400, rounds)
        fast = bench_client(directory, args.rows, args.outputs, 0.0, 0.5 if args.quick else 2.0, rounds, 10**9)
        slow = bench_client(directory, args.rows, args.outputs, 0.02, 4.0, 1, 2 if args.quick else 3, apis=("run",))
        disk = bench_disk(directory, 500 if args.quick else 2000)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    out = {"disk": str(directory.parent), "cpus": os.cpu_count(), "disk_MB_s": round(disk), "writer": writer,
           "client": fast + slow,
           "note": "latency 0.02 s/row = the built-in test rig standing in for the optical bench"}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"disk {out['disk']}, {out['cpus']} CPUs")
    print(f"writer {writer['batch']} x {writer['batches']} batches ({writer['MB']} MB), tofile "
          f"{writer['tofile_MB_s']} MB/s:\n  received arrays (as RigClient gives them) {writer['writer_MB_s']} MB/s "
          f"-> ratio {writer['ratio']} (target >= 0.5)\n  writable arrays (copied on append)       "
          f"{writer['writable_MB_s']} MB/s -> ratio {writer['writable_ratio']}\n"
          f"  file overhead {writer['file_overhead']:.2%}; creating a session file {writer['create_ms']} ms")
    print(f"RigClient {args.rows}x{args.outputs}, recording off vs on (target ratio >= 0.95):")
    for r in fast + slow:
        lat = "zero-cost" if not r["latency_s_per_row"] else f"{r['latency_s_per_row'] * 1e3:g} ms/row"
        print(f"  {lat:<10} {r['side']:<16} {r['api']:<13} off {r['rows_s_off']:>7} rows/s  "
              f"on {r['rows_s_on']:>7} rows/s  ratio {r['ratio']:.3f}")
    print(f"({out['note']})")
    fastest = max(r["rows_s_off"] for r in fast) * args.outputs * 4 / 1e6
    print(f"the disk sustains {disk:.0f} MB/s (written and fsync'd); the zero-cost rig produces up to "
          f"{fastest:.0f} MB/s of traces, so recording every trace of it for longer than the page cache "
          f"absorbs runs at most {disk / fastest:.2f} x as fast as not recording")
    print("(figures: best of the rounds; this machine is noisy, +-30 %)" if not args.quick
          else "(quick run: one round each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
